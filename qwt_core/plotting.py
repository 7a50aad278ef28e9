"""Figures of QwT runs (matplotlib, Agg canvas, no pyplot state): accuracy per method and bit width,
and per-block output error to the full-precision model before/after QwT with the gate's R².

Every function validates its input first (one-line ``ValueError`` naming the problem), draws on a
fixed-size figure (so the PNG size is known: :data:`ACCURACY_SIZE_PX`, :data:`BLOCKS_SIZE_PX`,
:func:`summary_size_px`), writes the PNG atomically (temporary file + ``os.replace``) and returns the
path. The numbers drawn are also stored in the PNG as a ``tEXt`` chunk :data:`DATA_KEY` (JSON), so a
test or a reader can check a figure against the JSON results it was made from
(:func:`read_plot_data`).

Inputs:
    rows (accuracy): ``[{"setting": "W4A4", "method": "RepQ-ViT", "top1": 91.2, "std": 0.3}, ...]``;
        ``std`` optional (no error bar when missing/None); bars grouped by setting, one colour per
        method, both in order of first appearance.
    blocks (errors): ``QwTReport.to_dict()["blocks"]``: per block ``index``, ``name``, ``applied``,
        ``r2`` (the R² the gate used; None before ``start_block``), ``mse_before``, ``mse_after``
        (block-output MSE to FP on the calibration rows without / with compensation; None when
        not measured).
"""
from __future__ import annotations

import json
import math
import os
import tempfile
import textwrap
from typing import Any, Mapping, Optional, Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

__all__ = ["plot_accuracy", "plot_block_errors", "plot_summary", "plot_loss_curves", "read_plot_data",
           "summary_size_px", "ACCURACY_SIZE_PX", "BLOCKS_SIZE_PX", "LOSS_SIZE_PX", "DATA_KEY"]

DPI = 100
ACCURACY_SIZE_IN = (8.0, 5.0)
BLOCKS_SIZE_IN = (9.0, 5.0)
LOSS_SIZE_IN = (10.0, 7.0)
#: (width, height) in pixels of the PNGs written by :func:`plot_accuracy` / :func:`plot_block_errors`.
ACCURACY_SIZE_PX = (int(ACCURACY_SIZE_IN[0] * DPI), int(ACCURACY_SIZE_IN[1] * DPI))
BLOCKS_SIZE_PX = (int(BLOCKS_SIZE_IN[0] * DPI), int(BLOCKS_SIZE_IN[1] * DPI))
#: (width, height) in pixels of the PNG written by :func:`plot_loss_curves`.
LOSS_SIZE_PX = (int(LOSS_SIZE_IN[0] * DPI), int(LOSS_SIZE_IN[1] * DPI))
PANEL_WIDTH_IN = 6.5
SUMMARY_HEIGHT_IN = 5.0
#: PNG text chunk holding the plotted numbers as JSON.
DATA_KEY = "qwt-plot-data"

_METHOD_COLORS = {"fp": "#7f7f7f", "baseline": "#d95f02", "qwt": "#1b9e77"}
_EXTRA_COLORS = ["#7570b3", "#e7298a", "#66a61e", "#e6ab02", "#a6761d"]
BEFORE_COLOR = _METHOD_COLORS["baseline"]
AFTER_COLOR = _METHOD_COLORS["qwt"]
R2_COLOR = "#3a3a9a"


def _summary_size_in(n_block_panels: int) -> tuple[float, float]:
    if n_block_panels <= 1:  # one row: accuracy | blocks
        return (PANEL_WIDTH_IN * (1 + n_block_panels), SUMMARY_HEIGHT_IN)
    # two rows: accuracy across the top, one block panel per setting below
    return (max(2 * PANEL_WIDTH_IN, 5.0 * n_block_panels), 2 * SUMMARY_HEIGHT_IN)


def summary_size_px(n_block_panels: int) -> tuple[int, int]:
    """Pixel size of a :func:`plot_summary` PNG with one accuracy panel and ``n`` block panels."""
    w, h = _summary_size_in(n_block_panels)
    return (int(round(w * DPI)), int(round(h * DPI)))


# ----------------------------------------------------------------------------------------- checks
def _check_path(path: str) -> str:
    if not isinstance(path, (str, os.PathLike)) or not str(path).lower().endswith(".png"):
        raise ValueError(f"plot path {path!r} must end with .png (figures are written as PNG)")
    return str(path)


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check_rows(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    if not rows:
        raise ValueError("plot_accuracy got no rows: pass [{'setting', 'method', 'top1', 'std'}, ...]")
    out, seen = [], set()
    for i, r in enumerate(rows):
        missing = [k for k in ("setting", "method", "top1") if k not in r]
        if missing:
            raise ValueError(f"accuracy row {i} lacks {', '.join(missing)}: each row needs setting, method, "
                             f"top1 (and optionally std)")
        if not _finite(r["top1"]):
            raise ValueError(f"accuracy row {i} ({r['setting']}, {r['method']}) has top1={r['top1']!r}, "
                             f"not a finite number")
        std = r.get("std")
        if std is not None and (not _finite(std) or std < 0):
            raise ValueError(f"accuracy row {i} ({r['setting']}, {r['method']}) has std={std!r}: "
                             f"use a number >= 0 or None")
        key = (str(r["setting"]), str(r["method"]))
        if key in seen:
            raise ValueError(f"accuracy rows repeat setting {key[0]!r}, method {key[1]!r}: one row each")
        seen.add(key)
        out.append({"setting": key[0], "method": key[1], "top1": float(r["top1"]),
                    "std": None if std is None else float(std)})
    return out


def _check_blocks(blocks: Sequence[Mapping[str, Any]], what: str = "blocks") -> list[dict[str, Any]]:
    if not blocks:
        raise ValueError(f"plot_block_errors got no {what}: pass QwTReport.to_dict()['blocks']")
    lacking = [k for k in ("index", "name", "r2", "applied", "mse_before", "mse_after") if k not in blocks[0]]
    if lacking:
        raise ValueError(f"{what} lack {', '.join(lacking)}: pass QwTReport.to_dict()['blocks'] from a "
                         f"qwt_core that reports mse_before/mse_after (rerun the calibration)")
    out = []
    for b in blocks:
        vals = {k: (float(b[k]) if _finite(b.get(k)) else None) for k in ("r2", "mse_before", "mse_after")}
        for k in ("mse_before", "mse_after"):
            if vals[k] is not None and vals[k] < 0:
                raise ValueError(f"block {b['name']} has {k}={vals[k]} < 0: not a mean squared error")
        out.append({"index": int(b["index"]), "name": str(b["name"]), "applied": bool(b["applied"]), **vals})
    if all(b["mse_before"] is None and b["mse_after"] is None and b["r2"] is None for b in out):
        raise ValueError(f"no block of {what} has an R² or an MSE (all before start_block?): nothing to plot")
    return out


# ------------------------------------------------------------------------------------------ drawing
def _set_title(ax, title: str) -> None:
    """Title wrapped to the axes width (about 13 characters of 10 pt text per inch)."""
    chars = max(20, int(ax.get_position().width * ax.figure.get_figwidth() * 13))
    lines = [w for part in str(title).split("\n") for w in (textwrap.wrap(part, chars) or [""])]
    ax.set_title("\n".join(lines), fontsize=10)


def _method_color(method: str, index: int) -> str:
    m = method.lower()
    if "qwt" in m:
        return _METHOD_COLORS["qwt"]
    if m.startswith("fp") or "full" in m:
        return _METHOD_COLORS["fp"]
    if index <= 1:
        return _METHOD_COLORS["baseline"]
    return _EXTRA_COLORS[index % len(_EXTRA_COLORS)]


def _draw_accuracy(ax, rows: list[dict[str, Any]], title: str, ylabel: str = "top-1 accuracy (%)") -> dict:
    settings = list(dict.fromkeys(r["setting"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    table = {(r["setting"], r["method"]): r for r in rows}
    width = 0.8 / len(methods)
    top = max(r["top1"] + (r["std"] or 0.0) for r in rows)
    low = min(r["top1"] - (r["std"] or 0.0) for r in rows)
    # Accuracies far from 0: start the axis at a round value below the lowest bar (said on the axis),
    # so that differences of a few points are visible.
    bottom = float(max(0, math.floor((low - 10.0) / 10.0) * 10)) if low >= 40.0 else 0.0
    span = max(top - bottom, 1.0)
    for j, method in enumerate(methods):
        xs, hs, es = [], [], []
        for i, setting in enumerate(settings):
            r = table.get((setting, method))
            if r is None:
                continue
            xs.append(i + (j - (len(methods) - 1) / 2) * width)
            hs.append(r["top1"])
            es.append(r["std"] if r["std"] is not None else 0.0)
        has_err = any(r["std"] is not None for r in rows if r["method"] == method)
        bars = ax.bar(xs, hs, width * 0.92, yerr=es if has_err else None, capsize=4 if has_err else 0,
                      color=_method_color(method, j), label=method, edgecolor="black", linewidth=0.5,
                      error_kw={"elinewidth": 1.2, "ecolor": "black"})
        for x, h, e, bar in zip(xs, hs, es, bars):
            label = f"{h:.1f}" + (f"\n±{e:.1f}" if has_err else "")
            ax.text(x, h + e + 0.01 * span, label, ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(settings)))
    ax.set_xticklabels(settings)
    ax.set_ylabel(ylabel + (f"  (axis starts at {bottom:g})" if bottom > 0 else ""))
    ax.set_ylim(bottom, top + 0.32 * span)
    _set_title(ax, title)
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    ax.legend(loc="upper center", ncol=len(methods), fontsize=8, framealpha=0.9)
    return {"settings": settings, "methods": methods, "y_bottom": bottom,
            "rows": [{"setting": r["setting"], "method": r["method"], "top1": r["top1"], "std": r["std"]}
                     for r in rows]}


def _short(name: str) -> str:
    """``backbone.stages.2.blocks.3`` → ``s2.b3``; ``blocks.7`` → ``7``."""
    parts = name.split(".")
    out, i = [], 0
    while i < len(parts):
        p = parts[i]
        if i + 1 < len(parts) and parts[i + 1].isdigit():
            out.append(("s" if p.startswith(("stage", "layer")) else "") + parts[i + 1])
            i += 2
        else:
            i += 1
    return ".".join(out) if out else name


def _draw_blocks(ax, blocks: list[dict[str, Any]], title: str) -> dict:
    xs = list(range(len(blocks)))
    before = [b["mse_before"] for b in blocks]
    after = [b["mse_after"] for b in blocks]
    nan = float("nan")
    ax.plot(xs, [nan if v is None else v for v in before], "o-", color=BEFORE_COLOR, lw=1.8, ms=5,
            label="before QwT (RepQ-ViT)")
    ax.plot(xs, [nan if v is None else v for v in after], "s-", color=AFTER_COLOR, lw=1.8, ms=5,
            label="after QwT")
    positive = [v for v in before + after if v is not None and v > 0]
    if positive:
        ax.set_yscale("log")
    ax.set_ylabel("block output MSE to FP (log)")
    labels = [_short(b["name"]) for b in blocks]
    step = max(1, math.ceil(len(blocks) / 24))
    ax.set_xticks(xs[::step])
    ax.set_xticklabels(labels[::step], rotation=90 if len(blocks) > 12 else 0, fontsize=8)
    ax.set_xlabel("block")
    ax.grid(alpha=0.3, which="both")
    _set_title(ax, title)
    r2 = [b["r2"] for b in blocks]
    ax2 = ax.twinx()
    applied_x = [x for x, b in zip(xs, blocks) if b["r2"] is not None and b["applied"]]
    skipped_x = [x for x, b in zip(xs, blocks) if b["r2"] is not None and not b["applied"]]
    ax2.plot(xs, [nan if v is None else v for v in r2], ":", color=R2_COLOR, lw=1)
    ax2.scatter(applied_x, [r2[x] for x in applied_x], marker="^", color=R2_COLOR, s=28, zorder=3,
                label="R² (compensated)")
    if skipped_x:
        ax2.scatter(skipped_x, [r2[x] for x in skipped_x], marker="x", color="red", s=36, zorder=3,
                    label="R² ≤ gate (not compensated)")
    finite_r2 = [v for v in r2 if v is not None]
    lo = min([0.0] + finite_r2)
    ax2.set_ylim(max(lo, -1.0) - 0.05, 1.05)
    ax2.set_ylabel("R² of the compensation", color=R2_COLOR)
    ax2.tick_params(axis="y", colors=R2_COLOR)
    ax2.axhline(0.0, color=R2_COLOR, lw=0.6, alpha=0.4)
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, loc="best", fontsize=8, framealpha=0.9)
    return {"blocks": [{"index": b["index"], "name": b["name"], "applied": b["applied"], "r2": b["r2"],
                        "mse_before": b["mse_before"], "mse_after": b["mse_after"]} for b in blocks]}


def _save(fig: Figure, path: str, data: dict) -> str:
    """Write ``fig`` to ``path`` atomically (temporary PNG in the same folder, then ``os.replace``)."""
    path = os.path.abspath(path)
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    FigureCanvasAgg(fig)
    fd, tmp = tempfile.mkstemp(prefix=".plot-", suffix=".png", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            fig.savefig(f, format="png", dpi=DPI, metadata={DATA_KEY: json.dumps(data)})
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


# ------------------------------------------------------------------------------------------ public
def plot_accuracy(rows: Sequence[Mapping[str, Any]], path: str, title: str,
                  ylabel: str = "top-1 accuracy (%)") -> str:
    """Bars of accuracy per method, grouped by setting (bit width), with std error bars.

    Args:
        rows: ``[{"setting": "W4A4", "method": "RepQ-ViT", "top1": 91.2, "std": 0.3}, ...]``.
        path: PNG file (``.png``); its folder is created. Size :data:`ACCURACY_SIZE_PX`.
        title: figure title.
    Returns:
        ``path`` (absolute).
    """
    path = _check_path(path)
    rows = _check_rows(rows)
    fig = Figure(figsize=ACCURACY_SIZE_IN, dpi=DPI, layout="constrained")
    data = _draw_accuracy(fig.add_subplot(1, 1, 1), rows, title, ylabel)
    return _save(fig, path, {"kind": "accuracy", "title": title, **data})


def plot_block_errors(blocks: Sequence[Mapping[str, Any]], path: str, title: str) -> str:
    """Per-block output MSE to FP before and after QwT (log scale) with the gate's R² (right axis).

    Args:
        blocks: ``QwTReport.to_dict()["blocks"]`` (needs index, name, applied, r2, mse_before,
            mse_after; ``None`` values are left as gaps).
        path: PNG file (``.png``); its folder is created. Size :data:`BLOCKS_SIZE_PX`.
        title: figure title.
    Returns:
        ``path`` (absolute).
    """
    path = _check_path(path)
    blocks = _check_blocks(blocks)
    fig = Figure(figsize=BLOCKS_SIZE_IN, dpi=DPI, layout="constrained")
    data = _draw_blocks(fig.add_subplot(1, 1, 1), blocks, title)
    return _save(fig, path, {"kind": "blocks", "title": title, **data})


def plot_summary(rows: Sequence[Mapping[str, Any]], block_sets: Mapping[str, Sequence[Mapping[str, Any]]],
                 path: str, title: str, accuracy_title: str = "accuracy",
                 ylabel: str = "top-1 accuracy (%)") -> str:
    """One PNG: the accuracy panel (as :func:`plot_accuracy`) and one per-block error panel per entry
    of ``block_sets`` (panel title → ``QwTReport.to_dict()["blocks"]``). Size :func:`summary_size_px`.
    """
    path = _check_path(path)
    rows = _check_rows(rows)
    checked = {name: _check_blocks(b, f"blocks of {name!r}") for name, b in block_sets.items()}
    n = len(checked)
    fig = Figure(figsize=_summary_size_in(n), dpi=DPI, layout="constrained")
    fig.suptitle(title, fontsize=12)
    if n <= 1:
        acc_ax, block_axes = fig.add_subplot(1, 2 if n else 1, 1), ([fig.add_subplot(1, 2, 2)] if n else [])
    else:
        grid = fig.add_gridspec(2, n)
        acc_ax = fig.add_subplot(grid[0, :])
        block_axes = [fig.add_subplot(grid[1, k]) for k in range(n)]
    data: dict[str, Any] = {"kind": "summary", "title": title,
                            "accuracy": _draw_accuracy(acc_ax, rows, accuracy_title, ylabel), "block_sets": {}}
    for ax, (name, blocks) in zip(block_axes, checked.items()):
        data["block_sets"][name] = _draw_blocks(ax, blocks, name)
    return _save(fig, path, data)


def plot_loss_curves(history: Sequence[Mapping[str, Any]], path: str, title: str,
                     terms: Sequence[str] = ("total", "det", "kl", "mse")) -> str:
    """Training loss per iteration, one panel per loss term (2 columns), epoch boundaries dotted
    (linear axes: a term can be 0, e.g. KL while the student still equals the teacher).

    Args:
        history: ``[{"iter": 1, "epoch": 1, "total": .., "det": .., "kl": .., "mse": ..}, ...]``
            (``iter`` global and increasing; a term missing or non-finite in a row is a gap).
        path: PNG file (``.png``); its folder is created. Size :data:`LOSS_SIZE_PX`.
        title: figure title.
        terms: the keys to draw, one panel each (a term absent from every row is an error).
    Returns:
        ``path`` (absolute).
    """
    path = _check_path(path)
    rows = list(history)
    if not rows:
        raise ValueError("plot_loss_curves got an empty history: train for at least one iteration")
    if any(not _finite(r.get("iter")) for r in rows):
        raise ValueError("plot_loss_curves: every history row needs a numeric 'iter'")
    absent = [t for t in terms if not any(t in r for r in rows)]
    if absent:
        raise ValueError(f"plot_loss_curves: no row has the loss term {absent[0]!r}")
    fig = Figure(figsize=LOSS_SIZE_IN, dpi=DPI, layout="constrained")
    fig.suptitle(title, fontsize=11)
    ncols = 2 if len(terms) > 1 else 1
    nrows = math.ceil(len(terms) / ncols)
    its = [int(r["iter"]) for r in rows]
    bounds = [its[k] - 0.5 for k in range(1, len(rows)) if rows[k].get("epoch") != rows[k - 1].get("epoch")]
    data: dict[str, Any] = {"kind": "loss_curves", "title": title, "iters": its, "curves": {},
                            "epoch_bounds": bounds}
    for k, term in enumerate(terms):
        ax = fig.add_subplot(nrows, ncols, k + 1)
        ys = [float(r[term]) if _finite(r.get(term)) else None for r in rows]
        ax.plot(its, [math.nan if y is None else y for y in ys], color=_EXTRA_COLORS[k % len(_EXTRA_COLORS)],
                lw=1.2, marker="." if len(its) <= 50 else None)
        for b in bounds:
            ax.axvline(b, color="#999999", ls=":", lw=0.8)
        ax.set_title(term, fontsize=10)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("iteration")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
        data["curves"][term] = ys
    return _save(fig, path, data)


def read_plot_data(path: str) -> dict[str, Any]:
    """The numbers a figure of this module was drawn from (its :data:`DATA_KEY` PNG text chunk)."""
    from PIL import Image

    with Image.open(path) as im:
        im.load()
        text = getattr(im, "text", {}) or im.info
        if DATA_KEY not in text:
            raise ValueError(f"{path} has no {DATA_KEY} chunk: not written by qwt_core.plotting")
        return json.loads(text[DATA_KEY])


def block_rows_from_result(qwt: Optional[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """``results["qwt"]["blocks"]`` of a CLI JSON, with a one-line error when QwT did not run."""
    if not qwt or not qwt.get("blocks"):
        raise ValueError("the results have no QwT report (run without --skip_qwt to plot per-block errors)")
    return list(qwt["blocks"])
