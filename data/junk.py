"""Generated junk of the kinds web corpora carry, for the noisy preset (data/build_noisy.py) and the
garbage bench (bench/bench_rank_keys.py).

    text = junk("mojibake", length=800, donor=real_text, rng=random.Random(0))

Each kind is made `length` characters long (about: whole lines or words) from a seeded
`random.Random`, some from a real `donor` document, so building twice gives the same bytes:

- random_chars: uniformly random printable ASCII, spaces among them;
- base64: an encoded random binary blob, in 76-character lines (a mail attachment);
- hex_dump: `xxd`-style lines of offsets, hex bytes and their ASCII column;
- keyboard_mash: runs along the keyboard's rows (`asdfjkl`, `qwerty`), repeated letters, spaces;
- word_salad: the donor's own words in random order (each word real, no sentence);
- mojibake: the donor with a fifth of its vowels accented (é, ü, å, ...), encoded as UTF-8 and
  decoded as cp1252 — what a wrong charset makes of accented text (`Ã©`, `Ã¼`);
- markup_soup: HTML boilerplate — nested divs and spans with classes, links, inline script,
  cookie-banner and navigation fragments — with few words of text;
- numeric_table: rows of numbers, ids and dates separated by pipes (a dump of a spreadsheet);
- foreign_script: words of Georgian letters (Mkhedruli), a script the reference model rarely saw;
- char_noise: the donor with a quarter of its letters replaced at random (bad OCR);
- repeated_line: one real line repeated (junk of *low* loss: no top band can catch it).
"""

from __future__ import annotations

import base64
import random
import string

KINDS = (
    "random_chars", "base64", "hex_dump", "keyboard_mash", "word_salad", "mojibake", "markup_soup",
    "numeric_table", "foreign_script", "char_noise", "repeated_line",
)  # fmt: skip

HIGH_LOSS_KINDS = tuple(k for k in KINDS if k != "repeated_line")
"""The kinds a top band by loss is meant to catch."""

KEYBOARD_ROWS = ("qwertyuiop", "asdfghjkl", "zxcvbnm", "1234567890")
ACCENTED = {"a": "àáâäå", "e": "èéêë", "i": "ìíîï", "o": "òóôöø", "u": "ùúûü"}
GEORGIAN = [chr(c) for c in range(0x10D0, 0x10F1)]
TAGS = ("div", "span", "a", "li", "ul", "p", "section", "nav", "footer", "button")
CLASSES = ("nav-item", "col-md-4", "btn btn-primary", "footer__link", "cookie-consent", "row", "sr-only")
BOILERPLATE = (
    "Accept all cookies",
    "Home",
    "Sign in",
    "Privacy policy",
    "Share",
    "Read more",
    "Menu",
    "Subscribe",
)


def junk(kind: str, length: int, donor: str, rng: random.Random) -> str:
    """One junk document of `kind`, about `length` characters; never empty."""
    length = max(2, length)
    text = _MAKERS[kind](length, donor, rng)
    return text if text.strip() else "x"


def donor_for(texts: list[str], length: int, rng: random.Random) -> str:
    """A real text to make junk of `length` characters from: one at least as long, so that the
    kinds built from a donor are not a short text repeated (a one-line donor repeated is
    repetition, which the model learns in context, not word salad)."""
    return rng.choice([t for t in texts if len(t) >= length] or [max(texts, key=len)])


def _random_chars(length: int, donor: str, rng: random.Random) -> str:
    alphabet = string.ascii_letters + string.digits + string.punctuation + " " * 8
    return "".join(rng.choice(alphabet) for _ in range(length))


def _base64(length: int, donor: str, rng: random.Random) -> str:
    blob = base64.b64encode(rng.randbytes(length)).decode()[:length]
    return "\n".join(blob[i : i + 76] for i in range(0, len(blob), 76))


def _hex_dump(length: int, donor: str, rng: random.Random) -> str:
    lines, offset = [], rng.randrange(0, 1 << 20, 16)
    while sum(len(line) + 1 for line in lines) < length:
        data = rng.randbytes(16)
        pairs = " ".join(data[i : i + 2].hex() for i in range(0, 16, 2))
        shown = "".join(chr(b) if 32 <= b < 127 else "." for b in data)
        lines.append(f"{offset:08x}: {pairs}  {shown}")
        offset += 16
    return "\n".join(lines)[: max(length, 60)]


def _keyboard_mash(length: int, donor: str, rng: random.Random) -> str:
    out = []
    while sum(len(w) + 1 for w in out) < length:
        row = rng.choice(KEYBOARD_ROWS)
        start = rng.randrange(len(row) - 2)
        run = row[start : start + rng.randint(3, len(row) - start)]
        if rng.random() < 0.3:
            run = run[::-1]
        if rng.random() < 0.3:
            run += run[-1] * rng.randint(2, 6)
        out.append(run.upper() if rng.random() < 0.1 else run)
    return " ".join(out)[:length]


def _word_salad(length: int, donor: str, rng: random.Random) -> str:
    words = donor.split() or ["x"]
    rng.shuffle(words)
    while sum(len(w) + 1 for w in words) < length:  # a short donor: its words again, reshuffled
        more = donor.split() or ["x"]
        rng.shuffle(more)
        words += more
    return " ".join(words)[:length]


def _donor_text(length: int, donor: str) -> str:
    """The donor, repeated when it is shorter than `length`, cut to it."""
    donor = donor or "x"
    return (donor + "\n") * (length // (len(donor) + 1)) + donor if len(donor) < length else donor[:length]


def _mojibake(length: int, donor: str, rng: random.Random) -> str:
    accented = "".join(
        rng.choice(ACCENTED[c.lower()]) if c.lower() in ACCENTED and rng.random() < 0.2 else c
        for c in _donor_text(length, donor)[:length]
    )
    return accented.encode("utf-8").decode("cp1252", errors="replace")


def _markup_soup(length: int, donor: str, rng: random.Random) -> str:
    parts = []
    while sum(len(p) for p in parts) < length:
        tag, cls = rng.choice(TAGS), rng.choice(CLASSES)
        if rng.random() < 0.15:
            parts.append(
                f'<script>window.dataLayer=window.dataLayer||[];gtag("config","UA-{rng.randrange(10**7)}-1");</script>'
            )
        elif tag == "a":
            parts.append(
                f'<a href="/{rng.choice(BOILERPLATE).lower().replace(" ", "-")}" class="{cls}">{rng.choice(BOILERPLATE)}</a>'
            )
        else:
            parts.append(f'<{tag} class="{cls}" id="{tag}-{rng.randrange(1000)}"><{rng.choice(TAGS)}>')
            parts.append(rng.choice(BOILERPLATE) if rng.random() < 0.4 else "")
            parts.append(f"</{tag}>")
    return "\n".join(p for p in parts if p)[: max(length, 40)]


def _numeric_table(length: int, donor: str, rng: random.Random) -> str:
    rows = []
    while sum(len(r) + 1 for r in rows) < length:
        cells = [
            str(rng.randrange(1, 100000)),
            f"{rng.uniform(-1000, 1000):.2f}",
            f"20{rng.randrange(10, 30)}-{rng.randrange(1, 13):02d}-{rng.randrange(1, 29):02d}",
            f"{rng.random():.4f}",
            str(rng.randrange(0, 2)),
        ]
        rows.append(" | ".join(rng.sample(cells, k=len(cells))))
    return "\n".join(rows)


def _foreign_script(length: int, donor: str, rng: random.Random) -> str:
    words = []
    while sum(len(w) + 1 for w in words) < length:
        words.append("".join(rng.choice(GEORGIAN) for _ in range(rng.randint(2, 9))))
        if rng.random() < 0.08:
            words[-1] += "."
    return " ".join(words)[:length]


def _char_noise(length: int, donor: str, rng: random.Random) -> str:
    return "".join(
        rng.choice(string.ascii_lowercase) if c.isalpha() and rng.random() < 0.25 else c
        for c in _donor_text(length, donor)[:length]
    )


def _repeated_line(length: int, donor: str, rng: random.Random) -> str:
    line = next((ln.strip() for ln in donor.splitlines() if ln.strip()), "ok")[:60]
    return "\n".join([line] * max(1, length // (len(line) + 1)))


_MAKERS = {
    "random_chars": _random_chars,
    "base64": _base64,
    "hex_dump": _hex_dump,
    "keyboard_mash": _keyboard_mash,
    "word_salad": _word_salad,
    "mojibake": _mojibake,
    "markup_soup": _markup_soup,
    "numeric_table": _numeric_table,
    "foreign_script": _foreign_script,
    "char_noise": _char_noise,
    "repeated_line": _repeated_line,
}
assert set(_MAKERS) == set(KINDS)
