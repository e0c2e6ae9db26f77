"""Two kinds of junk counted in the text a sample's targets cover when it is scored (the flag keys
`markup_share` and `mojibake` of pipeline/rank_keys.py).

    markup_bytes('<div class="nav">Home</div>')   # 23: the bytes of the two tags
    mojibake_count("naÃ¯ve cafÃ©")                # 2: sequences a wrong charset makes

Both read almost as regular text to the model and the tokenizer. Markup soup (nested tags with classes,
inline script) costs the reference model ~2.2 nats per token against ~3.3 for the embedded
corpus's documents, and splits into 0.44 tokens per byte against 0.27; UTF-8 read as cp1252
(`Ã©` for `é`) costs ~4.6 nats and 0.41 tokens per byte, inside the spread of real documents
(loss up to 5.6, tokens per byte up to 0.41 for 95% of them). A key of the model or the
tokenizer reaches them only with a drop large enough to take real text with them
(docs/results/2026-12-04-rank-keys-garbage.md); these counts flag them and nothing else.

- markup: the bytes of HTML/XML tags — `<name ...>`, `</name>`, `<!...>`, each on one line with at
  most 200 characters between the brackets, or a tag the text ends in the middle of — so a page's
  boilerplate that extraction left in counts, and `a < b` or a stray `<b` in prose does not (a
  tag spread over lines is missed). The tokenizer's special
  tokens are taken out first (`<end_of_turn>`, `</s>` in a chat template are not markup).
- mojibake: the sequences ftfy (the field's detector and fixer of wrong-charset text, used by
  web-data pipelines before any filtering) counts as signs of it (`ftfy.badness.badness`).
"""

from __future__ import annotations

import re

TAG = re.compile(
    r"</?[A-Za-z][A-Za-z0-9:_-]*(?:\s[^<>\n]{0,200})?/?>"  # a whole tag, on one line
    r"|<![^<>\n]{0,200}>"  # a declaration or comment
    r"|</?[A-Za-z][A-Za-z0-9:_-]*(?:\s[^<>\n]{0,200})?\Z"  # a tag cut off at the end of the text
)


def markup_bytes(text: str, special: tuple[str, ...] = ()) -> int:
    """UTF-8 bytes of `text` inside markup tags, the strings in `special` (a tokenizer's special
    tokens) left out."""
    for token in special:
        text = text.replace(token, " ")
    return sum(len(m.group().encode("utf-8")) for m in TAG.finditer(text))


def mojibake_count(text: str) -> int:
    """How many wrong-charset sequences ftfy finds in `text`."""
    from ftfy.badness import badness  # imported on first use: only the scorer counts

    return badness(text)
