"""Which rule drops junk, not short documents? Real documents of widely varied length (many very
short ones among them) mixed with junk of several kinds, scored by the reference model; what each
rule keeps out of any band — the top 10% by one key (what MidRanking drops), or a multi-key
`drop_top`, and with `min_tokens` the samples too short to rank — is read for junk caught per
kind and for the real documents dropped with it, with their lengths.

    .venv/bin/python bench/bench_rank_keys.py                      # the embedded corpus and model
    .venv/bin/python bench/bench_rank_keys.py --config configs/tiny.yaml --corpus data/corpus-tiny/train.jsonl \
        --real 40 --short 20 --garbage 6                           # a seconds-long smoke

Real documents: `--real` documents drawn from the corpus, and `--short` very short real texts
(the first line of other documents, cut to 1-12 words: headings, one-liners). Junk, `--garbage`
of each kind of data/junk.py (random characters, base64, hex dumps, keyboard mash, word salad,
mojibake, markup soup, numeric tables, a rarely seen script, character noise, and repeated lines
— junk of low loss that no top band can catch), each as long as a real document drawn at random
(so junk spans every length; a donor for the kinds made from real text at least as long), given the source of a real document (contamination sits inside
sources). The multi-key rows drop the union of several keys' tops (`drop_top`), nothing else.
Scored through the `score` stage (the config's model, max_tokens and dtype) into `--out`, then
ranked with the select stage's own `decide` for each key. With the config's target set
(target.paths) the target model is made the way `midrank target` makes it, in `--out` (or
`--target-model` names one made already), and the reducible rows rank by both models.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import sys
from pathlib import Path

import polars as pl

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from data.junk import HIGH_LOSS_KINDS, KINDS, donor_for, junk  # noqa: E402
from pipeline.band_decision import decide  # noqa: E402
from pipeline.codec import parse_json  # noqa: E402
from pipeline.config import BandConfig, DropTop, load_config  # noqa: E402
from pipeline.layout import Layout  # noqa: E402
from pipeline.scores import scan_scores, score_set  # noqa: E402
from pipeline.target_scores import join_target, target_layout  # noqa: E402
from stages import score, target  # noqa: E402

RULES = {
    "loss": {},
    "loss, min_tokens 8": {"min_tokens": 8},
    "bits_per_byte": {"rank_by": "bits_per_byte"},
    "length_adjusted": {"rank_by": "length_adjusted"},
    "length_adjusted by source": {"rank_by": "length_adjusted", "adjust_by_source": True},
    "length_adjusted, min_tokens 8": {"rank_by": "length_adjusted", "min_tokens": 8},
    "tokens_per_byte": {"rank_by": "tokens_per_byte"},
    # the flag keys alone, as drop_top takes them: only what they flag, up to the share
    "markup_share 3%": {"drop_top": {"markup_share": 0.03}},
    "mojibake 3%": {"drop_top": {"mojibake": 0.03}},
    # the union of several keys' tops (drop_top), the rest of the 10% nowhere: the top is the union
    "loss 10% + bits_per_byte 5%": {"drop_top": {"loss": 0.1, "bits_per_byte": 0.05}},
    "loss 20% + bits_per_byte 10%": {"drop_top": {"loss": 0.2, "bits_per_byte": 0.1}},
    "length_adjusted 10% + tokens_per_byte 5%": {
        "drop_top": {"length_adjusted": 0.1, "tokens_per_byte": 0.05}
    },
    "length_adjusted 10% + tokens_per_byte 10%": {
        "drop_top": {"length_adjusted": 0.1, "tokens_per_byte": 0.1}
    },
    "length_adjusted 10% + tokens_per_byte 5% + markup_share 3% + mojibake 3%": {
        "drop_top": {"length_adjusted": 0.1, "tokens_per_byte": 0.05, "markup_share": 0.03, "mojibake": 0.03}
    },
    # the noisy preset's rule (configs/noisy.yaml)
    "length_adjusted 10% + tokens_per_byte 10% + markup_share 3% + mojibake 3%": {
        "drop_top": {"length_adjusted": 0.1, "tokens_per_byte": 0.1, "markup_share": 0.03, "mojibake": 0.03}
    },
    "... + min_tokens 8": {
        "drop_top": {"length_adjusted": 0.1, "tokens_per_byte": 0.1, "markup_share": 0.03, "mojibake": 0.03},
        "min_tokens": 8,
    },
    # rules of the model and tokenizer alone, as large as the preset's drop: what the text counts add
    "tokens_per_byte 30%": {"drop_top": {"tokens_per_byte": 0.3}},
    "length_adjusted 15% + tokens_per_byte 15%, min_tokens 8": {
        "drop_top": {"length_adjusted": 0.15, "tokens_per_byte": 0.15},
        "min_tokens": 8,
    },
    # two models (the target model fine-tuned on the target set): junk is what the fine-tune does
    # not make easier, so it sits at the *bottom* of reducible; the rule keeps the top 90%
    "reducible, bottom 10%": {"strategy": "top", "keep": 1 - 0.1, "rank_by": "reducible"},
    "reducible, bottom 10%, min_tokens 8": {
        "strategy": "top",
        "keep": 1 - 0.1,
        "rank_by": "reducible",
        "min_tokens": 8,
    },
}
DROP = 0.1  # the top share MidRanking drops


def build_corpus(path: Path, corpus: Path, real: int, short: int, per_kind: int, seed: int) -> None:
    rng = random.Random(seed)
    docs = [parse_json(line, str(corpus), ValueError) for line in corpus.open()]
    rng.shuffle(docs)
    if len(docs) < real + short + per_kind:
        raise SystemExit(f"{corpus} has {len(docs)} documents; need {real + short + per_kind}")
    rows = [{"text": d["text"], "source": d["source"], "kind": "real"} for d in docs[:real]]
    for d in docs[real : real + short]:
        first = next((ln for ln in d["text"].splitlines() if ln.strip()), d["text"])
        words = first.split()[: rng.randint(1, 12)]
        rows.append({"text": " ".join(words), "source": d["source"], "kind": "real_short"})
    lengths = [len(r["text"]) for r in rows]
    donors = docs[real + short :]
    for kind in KINDS:
        for _ in range(per_kind):
            length = max(2, rng.choice(lengths))
            text = junk(kind, length, donor_for([d["text"] for d in donors], length, rng), rng)
            rows.append({"text": text, "source": rng.choice(rows[:real])["source"], "kind": kind})
    rng.shuffle(rows)
    with path.open("w") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")


def measure(scores: pl.LazyFrame, kinds: pl.DataFrame, rules: dict[str, dict]) -> list[dict]:
    """Per rule: each junk kind's documents it keeps out of any band (its top, and with min_tokens
    the samples too short to rank), and the real documents it keeps out with them."""
    results = []
    for label, params in rules.items():
        if "strategy" in params:  # a band of its own (reducible: the top, what it leaves out below)
            band = BandConfig(**params)
        elif "drop_top" in params:  # the dropped union is the top; nothing else is skipped
            rest = {k: v for k, v in params.items() if k != "drop_top"}
            band = BandConfig(
                strategy="midranking", skip=0, keep=1, drop_top=DropTop(**params["drop_top"]), **rest
            )
        else:
            band = BandConfig(strategy="midranking", skip=DROP, keep=1 - DROP, **params)
        decided = decide(scores, band, "bench").rows.collect().join(kinds, on="sample_id")
        out = decided.filter(pl.col("reason").is_in(["too_hard", "too_easy", "dropped_top", "too_short"]))
        row = {"rule": label, "dropped": out.height}
        for kind in (*KINDS, "real", "real_short"):
            n = decided.filter(pl.col("kind") == kind).height
            row[kind] = (out.filter(pl.col("kind") == kind).height, n)
        real = out.filter(pl.col("kind").is_in(["real", "real_short"]))
        row["real_dropped"] = real.height
        row["real_median_tokens"] = float(real["n_tokens"].median()) if real.height else float("nan")
        row["real_under_50_tokens"] = real.filter(pl.col("n_tokens") < 50).height
        row["too_short"] = decided.filter(pl.col("reason") == "too_short").height
        results.append(row)
    return results


def table(results: list[dict]) -> str:
    head = [
        "rule",
        "too_short",
        "dropped",
        *KINDS,
        "high-loss kinds >= 95%",
        "high-loss junk dropped",
        "kept",
    ]
    head += ["real docs dropped", "their median tokens", "of them < 50 tokens"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        caught = sum(r[k][0] for k in HIGH_LOSS_KINDS)
        total = sum(r[k][1] for k in HIGH_LOSS_KINDS)
        full = sum(r[k][0] >= 0.95 * r[k][1] for k in HIGH_LOSS_KINDS)
        share = r["dropped"] / sum(r[k][1] for k in (*KINDS, "real", "real_short"))
        cells = [r["rule"], str(r["too_short"]), f"{r['dropped']} ({share:.0%})"]
        cells += [f"{r[k][0]}/{r[k][1]} ({r[k][0] / max(r[k][1], 1):.0%})" for k in KINDS]
        cells += [f"{full}/{len(HIGH_LOSS_KINDS)}", f"{caught}/{total} ({caught / max(total, 1):.0%})"]
        cells += [f"{(total - caught) / max(total, 1):.1%}", str(r["real_dropped"])]
        cells += [
            f"{r['real_median_tokens']:.0f}" if r["real_dropped"] else "—",
            f"{r['real_under_50_tokens']} ({r['real_under_50_tokens'] / max(r['real_dropped'], 1):.0%})",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default="configs/default.yaml")
    parser.add_argument("--corpus", default="data/corpus/train.jsonl")
    parser.add_argument("--out", default="runs/bench-rank-keys")
    parser.add_argument("--real", type=int, default=600)
    parser.add_argument("--short", type=int, default=200)
    # junk a minority, as in a crawl: 6 of each of the 11 kinds is 7.6% of the documents, under the
    # 10% a top band drops, so a key that ranks every junk document above the real ones catches all
    parser.add_argument("--garbage", type=int, default=6, help="documents of each garbage kind")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--target-model",
        help="the target model of the reducible rows, made already (runs/<preset>/train/target/model); "
        "default: fine-tuned here on the config's target.paths",
    )
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    mixed = out / "mixed.jsonl"
    if not mixed.is_file():  # kept for reruns: scoring resumes, and the corpus must stay the one scored
        build_corpus(mixed, Path(args.corpus), args.real, args.short, args.garbage, args.seed)
    overrides = [
        f"out_dir={out / 'run'}",
        f"corpus.paths=[{mixed}]",
        "corpus.num_shards=2",
        "corpus.source_field=source",
    ]
    cfg = load_config(Path(args.config), overrides)
    score.run(cfg)
    files, provenance = score_set(Layout(cfg.out_dir))
    scores = scan_scores(files)
    rules = RULES
    if args.target_model:  # a target model made already (`make target`): only its scoring pass
        model = dataclasses.replace(cfg.model, path=args.target_model)
        score.run(dataclasses.replace(cfg, out_dir=str(target_layout(cfg).out_dir), model=model))
        scores, _ = join_target(cfg, scores, provenance)
    elif cfg.target.paths:  # the reducible rows: the config's target recipe, scoring the mixed corpus
        target.run(cfg)
        scores, _ = join_target(cfg, scores, provenance)
    else:
        rules = {k: v for k, v in RULES.items() if v.get("rank_by") != "reducible"}
    kinds = (
        pl.read_ndjson(mixed)
        .with_row_index("row")
        .select(sample_id=pl.lit(f"{mixed.name}:") + pl.col("row").cast(pl.String), kind="kind")
    )
    results = measure(scores, kinds, rules)
    counts = kinds.group_by("kind").len().sort("kind")
    print(
        f"\n{scores.select(pl.len()).collect().item()} samples: "
        + ", ".join(f"{k} {n}" for k, n in counts.iter_rows())
    )
    print(
        f"kept out of any band by each rule — the top {DROP:.0%} by a key (what MidRanking drops), a multi-key "
        f"drop_top, the bottom {DROP:.0%} by reducible (what its top leaves out), and with min_tokens what is "
        "too short to rank: junk per kind, and the real documents\n"
    )
    print(table(results))
    (out / "results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
