"""Figures of the score distribution, rendered to PNG with matplotlib's Agg backend (no display).

    panels = [Panel("all", counts, kept=kept_counts, band=(2.9, 5.1)), Panel("man", ...)]
    plot_histograms(panels, edges, Path("loss.png"), xlabel="loss (nats/token)")
    plot_loss_vs_length(counts_2d, token_edges, loss_edges, Path("length.png"), bands={"mid": (2.9, 5.1)})

Counts come binned already (pipeline/histograms.py); nothing here sees a row.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # before pyplot: render to files, never open a window

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.colors import ListedColormap, LogNorm

from pipeline.artifacts import atomic_path
from pipeline.log import inert

# labels come from the data (source names, band names): "$x^$" is a name, not math to typeset, and
# a control character is shown escaped (`inert`)
matplotlib.rcParams["text.parse_math"] = False

ALL_COLOR, KEPT_COLOR, CUT_COLOR = "#9aa5b1", "#d9480f", "#1c7ed6"
BAND_COLORS = ("#1c7ed6", "#2b8a3e", "#862e9c", "#e67700")


@dataclass(frozen=True, slots=True)
class Panel:
    title: str
    counts: np.ndarray
    kept: np.ndarray | None = None
    """Counts of the kept samples, drawn filled over the whole distribution."""
    band: tuple[float, float] | None = None
    """The kept loss interval, drawn as two cut-off lines (None when the band is not an interval
    of this panel's losses, e.g. a random sample)."""


def plot_histograms(
    panels: list[Panel], edges: np.ndarray, path: Path, *, xlabel: str, title: str = "", log_x: bool = False
) -> Path:
    """A grid of histograms sharing the bin edges: the first panel is usually the whole corpus."""
    columns = min(3, len(panels))
    rows = math.ceil(len(panels) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(5.2 * columns, 3.4 * rows), squeeze=False)
    for ax, panel in zip(axes.flat, panels, strict=False):
        ax.stairs(panel.counts, edges, fill=True, color=ALL_COLOR, alpha=0.45, label="all samples")
        if panel.kept is not None:
            ax.stairs(panel.kept, edges, fill=True, color=KEPT_COLOR, alpha=0.85, label="kept")
        if panel.band is not None:
            for cut in panel.band:
                ax.axvline(cut, color=CUT_COLOR, linestyle="--", linewidth=1.2)
        ax.set_title(inert(f"{panel.title}  (n={int(panel.counts.sum()):,})"), fontsize=10)
        ax.set_xlabel(xlabel, fontsize=9)
        ax.set_ylabel("samples", fontsize=9)
        if log_x:
            ax.set_xscale("log")
    for ax in list(axes.flat)[len(panels) :]:
        ax.set_visible(False)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    if panels[0].band is not None:
        handles.append(plt.Line2D([], [], color=CUT_COLOR, linestyle="--"))
        labels.append("band cut-offs")
    fig.legend(handles, labels, loc="upper right", fontsize=9)
    if title:
        fig.suptitle(inert(title), fontsize=12, x=0.02, ha="left")
    fig.tight_layout(rect=(0, 0, 0.88 if columns == 1 else 0.94, 0.95 if title else 1))
    return _save(fig, path)


def plot_loss_vs_length(
    counts: np.ndarray,
    token_edges: np.ndarray,
    loss_edges: np.ndarray,
    path: Path,
    *,
    bands: dict[str, tuple[float, float]],
    curve: tuple[np.ndarray, np.ndarray] | None = None,
    kept: np.ndarray | None = None,
    adjusted_band: tuple[float, float] | None = None,
    title: str = "loss against length",
) -> Path:
    """Sample counts over (length in tokens, loss), log colour scale, with each band's loss
    interval drawn across: a band that sits in one corner is really a length filter. `curve`:
    the expected loss at each length (lengths, losses); `kept`: one band's kept counts on the same
    grid, drawn over the whole; `adjusted_band`: a length_adjusted band's kept key range, drawn
    as the curve shifted by its two ends."""
    fig, ax = plt.subplots(figsize=(7.5, 5))
    grid = np.ma.masked_equal(counts.T, 0)
    cmap = "Greys" if kept is not None else None
    mesh = ax.pcolormesh(
        token_edges, loss_edges, grid, norm=LogNorm(vmin=1, vmax=max(1, counts.max())), cmap=cmap
    )
    fig.colorbar(mesh, ax=ax, label="samples")
    if kept is not None:  # every cell holding a kept sample, in one solid colour over the grey
        ax.pcolormesh(
            token_edges,
            loss_edges,
            np.ma.masked_equal(kept.T, 0),
            cmap=ListedColormap([KEPT_COLOR]),
            alpha=0.8,
        )
        ax.plot([], [], "s", color=KEPT_COLOR, label="cells holding kept samples")
    ax.set_xscale("log")
    ax.set_xlabel("length (scored tokens)")
    ax.set_ylabel("loss (nats/token)")
    ax.set_ylim(loss_edges[0], loss_edges[-1])
    for (name, (low, high)), color in zip(bands.items(), BAND_COLORS * len(bands), strict=False):
        ax.axhline(low, color=color, linestyle="--", linewidth=1.2, label=name)
        ax.axhline(high, color=color, linestyle="--", linewidth=1.2)
    if curve is not None:
        ax.plot(*curve, color="black", linewidth=1.6, label="expected loss at that length (median)")
        if adjusted_band is not None:
            for shift in adjusted_band:
                ax.plot(curve[0], curve[1] + shift, color=CUT_COLOR, linestyle="--", linewidth=1.2)
            ax.plot([], [], color=CUT_COLOR, linestyle="--", label="band cut-offs")
    if bands or curve is not None or kept is not None:
        ax.legend(fontsize=8, loc="upper right")
    ax.set_title(inert(title))
    fig.tight_layout()
    return _save(fig, path)


def plot_paired_losses(
    counts: np.ndarray,
    edges: np.ndarray,
    path: Path,
    *,
    kept: np.ndarray | None,
    title: str,
    axes: tuple[str, str],
    diagonal: str,
) -> Path:
    """Two losses of the same samples, x against y (`axes`: their labels), binned on `edges`, log
    colour scale, with a band's kept cells drawn over them and the diagonal (`diagonal`: what lying
    on it means)."""
    fig, ax = plt.subplots(figsize=(6.6, 5.6))
    grid = np.ma.masked_equal(counts.T, 0)
    mesh = ax.pcolormesh(edges, edges, grid, norm=LogNorm(vmin=1, vmax=max(1, counts.max())), cmap="Greys")
    fig.colorbar(mesh, ax=ax, label="samples")
    if kept is not None:
        ax.pcolormesh(
            edges, edges, np.ma.masked_equal(kept.T, 0), cmap=ListedColormap([KEPT_COLOR]), alpha=0.8
        )
        ax.plot([], [], "s", color=KEPT_COLOR, label="cells holding kept samples")
    ax.plot(edges[[0, -1]], edges[[0, -1]], color="black", linewidth=1, label=diagonal)
    ax.set_xlabel(axes[0])
    ax.set_ylabel(axes[1])
    ax.legend(fontsize=8, loc="upper left")
    ax.set_title(inert(title), fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def _save(fig: plt.Figure, path: Path) -> Path:
    try:
        with atomic_path(path) as tmp:  # a fresh file, never written through a link; errors name `path`
            fig.savefig(tmp, dpi=110, format="png")
    finally:
        plt.close(fig)
    return path


def plot_compare(rows: list, reference: str, path: Path) -> Path:
    """One panel per tested metric: each contrast's difference with its 95% interval over seeds
    and documents/items; the shaded band is the equivalence margin. Losses: left of zero is
    better."""
    from pipeline.comparison import contrast_label

    tested = [r for r in rows if r.role in ("primary", "secondary", "calibration")]
    metrics = list(dict.fromkeys(r.metric for r in tested))
    labels = list(dict.fromkeys(contrast_label(r, reference) for r in tested if r.metric == metrics[0]))
    fig, axes = plt.subplots(
        1,
        len(metrics),
        figsize=(3.4 * len(metrics) + 2.0, 0.45 * len(labels) + 1.8),
        sharey=True,
        squeeze=False,
    )
    y = np.arange(len(labels))[::-1]
    for ax, metric in zip(axes[0], metrics, strict=True):
        mine = {contrast_label(r, reference): r for r in tested if r.metric == metric}
        first = next(iter(mine.values()))
        if first.margin:
            ax.axvspan(-first.margin, first.margin, color=ALL_COLOR, alpha=0.15, linewidth=0)
        for yi, label in zip(y, labels, strict=True):
            r = mine.get(label)
            if r is None:
                continue
            low, high = r.interval()
            if not np.isnan(low):
                ax.plot([low, high], [yi, yi], color=ALL_COLOR, linewidth=3.0, alpha=0.7)
            ax.plot([r.estimate.mean], [yi], "o", color=KEPT_COLOR if r.role == "primary" else "black")
        ax.axvline(0, color="black", linewidth=0.8)
        ax.set_title(f"{inert(metric)}\n({first.unit}, lower is better)", fontsize=9)
        ax.tick_params(axis="x", labelsize=8)
    axes[0][0].set_yticks(y, [inert(label) for label in labels], fontsize=9)
    fig.suptitle(
        f"Difference (against {reference} unless named), 95% intervals over seeds and documents; "
        "shaded: the equivalence margin; orange: the primary contrast",
        fontsize=10,
    )
    fig.tight_layout()
    return _save(fig, path)
