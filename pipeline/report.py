"""The inspect report as one self-contained HTML page (the PNGs sit next to it).

    paths.index.write_text(render_report(summary))

`summary` is the `ReportSummary` that `stages/inspect.py` also writes as summary.json. Every string that comes
from the data (texts, sample ids, source and band names) goes through `html.escape`: corpus text
is hostile input, and a `<script>` in a document must show as text.
"""

from __future__ import annotations

from html import escape
from typing import Any

from pipeline.outputs import ReportBand, ReportSummary, SourceCount

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 1200px; color: #212529; }
table { border-collapse: collapse; margin: 0.5rem 0 1.5rem; font-size: 0.9rem; }
th, td { border: 1px solid #dee2e6; padding: 0.25rem 0.6rem; text-align: right; }
th { background: #f1f3f5; } td.l, th.l { text-align: left; }
img { max-width: 100%; border: 1px solid #dee2e6; margin: 0.5rem 0; }
pre { white-space: pre-wrap; word-break: break-word; margin: 0; font-size: 0.8rem; max-width: 760px; }
.muted { color: #868e96; }
"""


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"<td>{value:.3f}</td>"
    if isinstance(value, int):
        return f"<td>{value:,}</td>"
    return f'<td class="l">{escape(str(value))}</td>'


def table(header: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f'<th class="{"l" if i == 0 else ""}">{escape(h)}</th>' for i, h in enumerate(header))
    body = "".join("<tr>" + "".join(_cell(v) for v in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _share(part: int, whole: int) -> str:
    return f"{part / whole:.1%}" if whole else "-"


def _examples(regions: list[dict[str, Any]], key: str = "loss") -> str:
    parts = []
    with_ifd = key != "ifd" and any(row.get("ifd") is not None for r in regions for row in r["rows"])
    for region, rows in ((r["region"], r["rows"]) for r in regions):
        parts.append(f"<h4>{escape(region)}</h4>")
        if not rows:
            parts.append('<p class="muted">no sample in this region</p>')
            continue
        body = []
        for row in rows:
            if row.get("text") is None:
                text = '<span class="muted">(text unavailable)</span>'
            else:
                text = f"<pre>{escape(row['text'])}{'…' if row.get('text_cut') else ''}</pre>"
            key_cell = f"<td>{row[key]:.3f}</td>" if key != "loss" else ""
            if with_ifd:  # instruction data scored without prompts too: the plain ratio
                key_cell += f"<td>{row['ifd']:.3f}</td>" if row.get("ifd") is not None else "<td>-</td>"
            body.append(
                f"<tr>{key_cell}<td>{row['loss']:.3f}</td><td>{row['n_tokens']:,}</td>"
                f'<td class="l">{escape(row["source"])}</td><td class="l">{escape(row["sample_id"])}</td>'
                f'<td class="l">{text}</td></tr>'
            )
        columns = ([key] if key != "loss" else []) + (["ifd"] if with_ifd else [])
        columns += ["loss", "tokens", "source", "sample_id", "text"]
        head = "".join(f"<th>{h}</th>" for h in columns)
        parts.append(f"<table><tr>{head}</tr>{''.join(body)}</table>")
    return "\n".join(parts)


def _figures(images: dict[str, str], wanted) -> str:
    return "".join(
        f'<figure><img src="{escape(file)}" alt="{escape(caption)}"><figcaption>{escape(caption)}</figcaption></figure>'
        for file, caption in images.items()
        if wanted(file)
    )


def _band_section(band: ReportBand, images: dict[str, str]) -> str:
    m = band.manifest
    where = (
        f"ranked by {band.key}, kept {band.key} {band.interval[0]:.3f} .. {band.interval[1]:.3f}"
        if band.interval
        else f"not a single {band.key} interval of the whole corpus (random or per-source band)"
    )
    totals = table(
        ["", "in", "kept", "kept share"],
        [
            [label, c.total, c.kept, _share(c.kept, c.total)]
            for label, c in (("samples", m.samples), ("tokens", m.tokens))
        ],
    )
    rejected = table(["rejected because", "samples"], [[k, v] for k, v in m.rejected.items()])
    if m.dropped_top:  # which key caught what: a key's "alone" is what no other key would have dropped
        d = m.dropped_top
        rejected += table(
            ["drop_top key", "top share", "dropped", "dropped by it alone"],
            [[key, f"{share:g}", d.by_key[key], d.alone[key]] for key, share in d.shares.items()]
            + [["together (two or more keys)", "", d.together, ""], ["union", "", d.samples, ""]],
        )
    before, after = m.per_source.before, m.per_source.after
    all_before = sum(v.tokens for v in before.values())
    all_after = sum(v.tokens for v in after.values())
    mix_rows = []
    for source, b in before.items():
        a = after.get(source, SourceCount(0, 0))
        mix_rows.append(
            [
                source,
                b.samples,
                a.samples,
                b.tokens,
                a.tokens,
                _share(b.tokens, all_before),
                _share(a.tokens, all_after),
            ]
        )
    mix = table(
        [
            "source",
            "samples before",
            "samples kept",
            "tokens before",
            "tokens kept",
            "token share before",
            "token share after",
        ],
        mix_rows,
    )
    figures = _figures(images, lambda file: file.endswith(f"-{band.name}.png"))
    return (
        f"<h2>Band {escape(band.name)}</h2><p>strategy {escape(m.strategy)}, positions "
        f"{m.positions.start:g} .. {m.positions.stop:g} of the {escape(m.positions.measure)} "
        f"(from the hardest); {escape(where)}</p>{totals}{rejected}<h3>Mix per source</h3>{mix}{figures}"
        f"<h3>Examples by region</h3>{_examples(band.examples, band.key)}"
    )


def render_report(summary: ReportSummary) -> str:
    quantile_table = table(
        ["quantile", *(f"{float(q):g}" for q in summary.quantiles)],
        [["loss", *summary.quantiles.values()]],
    )
    sources = table(
        ["source", "samples", "tokens", "mean loss", "median loss", "share of the top-10% loss"],
        [
            [
                s["source"],
                s["samples"],
                s["tokens"],
                s["mean_loss"],
                s["median_loss"],
                f"{s['top_decile_share']:.1%}",
            ]
            for s in summary.sources
        ],
    )
    plotted = len(summary.sources_plotted)
    if plotted < len(summary.sources):
        sources += f'<p class="muted">panels show the {plotted} largest of {len(summary.sources)} sources</p>'
    general = _figures(
        summary.images, lambda file: not any(file.endswith(f"-{b.name}.png") for b in summary.bands)
    )
    if summary.bands:
        bands = "".join(_band_section(b, summary.images) for b in summary.bands)
    else:
        bands = '<p class="muted">No band selected yet: run <code>midrank select</code>.</p>' + _examples(
            summary.examples
        )
    model = summary.model
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>midrank report: {escape(summary.out_dir)}</title>
<style>{STYLE}</style></head><body>
<h1>midrank: loss report</h1>
<p>{summary.samples:,} samples, {summary.tokens:,} scored tokens in {escape(summary.out_dir)};
reference model {escape(str(model.get("path")))} ({escape(str(model.get("dtype")))}).</p>
<h2>Loss distribution</h2>{quantile_table}{sources}{general}
{bands}
</body></html>
"""
