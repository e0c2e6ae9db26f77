"""Two kinds of junk a reference model cannot rank at the top, counted in the text a sample's targets
cover when it is scored (the rank keys `markup_share` and `mojibake` of pipeline/rank_keys.py).

    markup_bytes('<div class="nav">Home</div>')   # 21: the bytes of the two tags
    mojibake_count("naÃ¯ve cafÃ©")                # 2: sequences a wrong charset makes

Both are regular, so the model predicts them *better* than prose once it has seen a few: markup
soup (nested tags with classes, inline script) costs ~2.1 nats per token against ~3.3 for the
embedded corpus's documents, and UTF-8 read as cp1252 (`Ã©` for `é`) only a little more than the
text it garbles. Loss, bits per byte and tokens per byte all leave them in a band.

- markup: the bytes of HTML/XML tags (`<name ...>`, `</name>`, `<!...>`, and a tag the text ends in
  the middle of), so a page's boilerplate that extraction left in counts, and `a < b` does not.
- mojibake: the sequences ftfy (the field's detector and fixer of wrong-charset text, used by
  web-data pipelines before any filtering) counts as signs of it (`ftfy.badness.badness`).
"""

from __future__ import annotations

import re

TAG = re.compile(r"</?[A-Za-z][A-Za-z0-9:_-]*(?:\s[^<>]*)?/?(?:>|$)|<![^<>]*(?:>|$)")


def markup_bytes(text: str) -> int:
    """UTF-8 bytes of `text` inside markup tags."""
    return sum(len(m.group().encode("utf-8")) for m in TAG.finditer(text))


def mojibake_count(text: str) -> int:
    """How many wrong-charset sequences ftfy finds in `text`."""
    from ftfy.badness import badness  # imported on first use: only the scorer counts

    return badness(text)
