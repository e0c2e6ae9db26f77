"""Build the noisy preset's corpus: the embedded corpus with a share of generated junk mixed in, as a
web crawl carries it — the positive control of `make compare CONFIG=configs/noisy.yaml`.

    python -m data.build_noisy --corpus data/corpus --out data/corpus-noisy --share 0.15

`out/train.jsonl` holds every real training document of `corpus/train.jsonl` and, mixed among them,
junk documents (`share` of all documents; default 15%) of every kind in data/junk.py but
`repeated_line` (which has low loss: no top band is meant to catch it), as evenly as the count
allows. Each junk document is as long as a real document drawn at random and carries the source
of another, so junk sits inside the sources as it does in a crawl. Rows hold `source` and `text`
only; which rows are junk, and of which kind, is in `out/labels.jsonl` (one line per row, in
order: row, sample_id, kind — `real` or the junk kind —, origin of a real document), never in the
corpus. The held-out, out-of-distribution and task sets stay the clean ones of `corpus/`. Seeded:
building twice gives the same bytes.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

from data.build_corpus import log, write_jsonl, write_manifest
from data.junk import HIGH_LOSS_KINDS, donor_for, junk
from pipeline.codec import parse_json


def build(corpus: Path, out: Path, share: float, seed: int = 0) -> dict:
    if not 0 < share < 1:
        raise SystemExit(f"--share must be within (0, 1), got {share}")
    real = [
        parse_json(line, str(corpus), ValueError) for line in (corpus / "train.jsonl").open(encoding="utf-8")
    ]
    rng = random.Random(seed)
    n_junk = round(share * len(real) / (1 - share))
    lengths = sorted(len(d["text"]) for d in real)
    rows = [{"source": d["source"], "text": d["text"], "kind": "real", "origin": d["origin"]} for d in real]
    for i in range(n_junk):
        kind = HIGH_LOSS_KINDS[i % len(HIGH_LOSS_KINDS)]
        length = rng.choice(lengths)
        donor = donor_for([d["text"] for d in real], length, rng)
        rows.append(
            {
                "source": rng.choice(real)["source"],
                "text": junk(kind, length, donor, rng),
                "kind": kind,
                "origin": None,
            }
        )
    rng.shuffle(rows)
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl(out / "train.jsonl", [{"source": r["source"], "text": r["text"]} for r in rows])
    labels = [
        {"row": i, "sample_id": f"train.jsonl:{i}", "kind": r["kind"], "origin": r["origin"]}
        for i, r in enumerate(rows)
    ]
    write_jsonl(out / "labels.jsonl", labels)
    kinds: dict[str, int] = {}
    for r in rows:
        kinds[r["kind"]] = kinds.get(r["kind"], 0) + 1
    manifest = {
        "builder": "python -m data.build_noisy",
        "corpus": str(corpus),
        "share": share,
        "seed": seed,
        "documents": len(rows),
        "kinds": dict(sorted(kinds.items())),
    }
    write_manifest(out, manifest)
    log(f"noisy corpus: {len(real)} real + {n_junk} junk documents -> {out}")
    return manifest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", type=Path, default=Path("data/corpus"))
    parser.add_argument("--out", type=Path, default=Path("data/corpus-noisy"))
    parser.add_argument(
        "--share", type=float, default=0.15, help="junk share of all documents (default %(default)s)"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    build(args.corpus, args.out, args.share, args.seed)


if __name__ == "__main__":
    main()
