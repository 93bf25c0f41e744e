"""Figures for the analyses, drawn with Matplotlib's Agg canvas (no display, no pyplot state) and
written atomically: a PNG is rendered in memory and renamed into place.

Attention maps use a power-law colour scale (``gamma`` 0.5 by default): a few entries (the first
token, the diagonal) hold most of the mass, and a linear scale would hide the rest. The scale tops
out at the largest entry below query row 0 (row 0 is always ``[1, 0, ...]``: the first token can only
attend to itself), with the colour bar extended for larger values. Panels of one layer share a
scale, so models are compared on equal terms.
"""
import io
from typing import List, Optional, Sequence

import numpy as np

__all__ = ["save_figure", "attention_map_figure", "head_maps_figure", "attention_grid_figure",
           "head_scores_figure", "importance_figure", "GRID_CELL_INCHES"]

GRID_CELL_INCHES = 2.2     # side of one attention panel in the grid
_COLORBAR_INCHES = 0.9     # room for a row's colour bar
_MARGIN_INCHES = (0.9, 0.9)  # left (row labels), top (titles)


def _figure(width: float, height: float, layout: Optional[str] = "constrained"):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout=layout)
    FigureCanvasAgg(fig)
    return fig


def _norm(vmax: float, gamma: float):
    from matplotlib.colors import Normalize, PowerNorm

    vmax = float(vmax) if vmax > 0 else 1.0
    return Normalize(0.0, vmax) if gamma == 1.0 else PowerNorm(gamma, vmin=0.0, vmax=vmax)


def _attention_vmax(maps) -> float:
    """Largest attention entry outside query row 0 over ``maps`` (arrays [..., T, T])."""
    return max(float(m[..., 1:, :].max()) if m.shape[-2] > 1 else float(m.max()) for m in maps)


def save_figure(fig, path, dpi: int = 100) -> None:
    """Render ``fig`` as PNG and write it to ``path`` atomically."""
    from ..io.atomic import atomic_write_bytes

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    atomic_write_bytes(path, buf.getvalue())


def _attention_axes(ax, image, norm, title=None, xlabel="key position", ylabel="query position"):
    im = ax.imshow(image, cmap="viridis", norm=norm, interpolation="nearest", aspect="equal")
    if title:
        ax.set_title(title, fontsize=9)
    if xlabel:
        ax.set_xlabel(xlabel, fontsize=8)
    if ylabel:
        ax.set_ylabel(ylabel, fontsize=8)
    ax.tick_params(labelsize=7)
    return im


def attention_map_figure(image: np.ndarray, title: str, gamma: float = 0.5):
    """One averaged attention map [T, T] with its colour bar."""
    fig = _figure(5.6, 4.8)
    ax = fig.add_subplot()
    im = _attention_axes(ax, image, _norm(_attention_vmax([image]), gamma), title)
    fig.colorbar(im, ax=ax, label="attention probability", shrink=0.9, extend="max")
    return fig


def head_maps_figure(heads: np.ndarray, title: str, gamma: float = 0.5):
    """Per-head averaged maps [H, T, T] of one layer, sharing one colour scale."""
    n = len(heads)
    cols = min(n, 4)
    rows = -(-n // cols)
    fig = _figure(2.6 * cols + 1.0, 2.6 * rows + 0.6)
    axes = fig.subplots(rows, cols, squeeze=False)
    norm = _norm(_attention_vmax([heads]), gamma)
    im = None
    for h, ax in enumerate(axes.flat):
        if h >= n:
            ax.set_axis_off()
            continue
        first_col, last_row = h % cols == 0, h // cols == rows - 1
        im = _attention_axes(ax, heads[h], norm, f"head {h}", "key" if last_row else None,
                             "query" if first_col else None)
    fig.colorbar(im, ax=axes, label="attention probability", shrink=0.8, extend="max")
    fig.suptitle(title, fontsize=11)
    return fig


def attention_grid_size(n_layers: int, n_models: int):
    """(width, height) in inches of :func:`attention_grid_figure`."""
    return (_MARGIN_INCHES[0] + n_models * GRID_CELL_INCHES + _COLORBAR_INCHES,
            _MARGIN_INCHES[1] + n_layers * GRID_CELL_INCHES)


def attention_grid_figure(maps: Sequence[np.ndarray], labels: Sequence[str], title: str, gamma: float = 0.5,
                          layer_ids: Optional[Sequence[int]] = None):
    """Rows = layers, columns = models: ``maps[m]`` is model m's [L, T, T] average.

    A layer's panels share one colour scale (its row's colour bar), so a column-to-column difference
    is a difference in attention, not in scaling. ``layer_ids`` names the rows when ``maps`` hold a
    selection of layers (default 0..L-1).
    """
    n_models, n_layers = len(maps), maps[0].shape[0]
    if len(labels) != n_models or any(m.shape[0] != n_layers for m in maps):
        raise ValueError("every model needs a label and the same number of layers")
    fig = _figure(*attention_grid_size(n_layers, n_models))
    axes = fig.subplots(n_layers, n_models, squeeze=False)
    for layer in range(n_layers):
        norm = _norm(_attention_vmax([m[layer] for m in maps]), gamma)
        for col, (m, label) in enumerate(zip(maps, labels)):
            im = _attention_axes(axes[layer, col], m[layer], norm, label if layer == 0 else None,
                                 "key" if layer == n_layers - 1 else None,
                                 f"layer {layer if layer_ids is None else layer_ids[layer]}\nquery"
                                 if col == 0 else None)
        bar = fig.colorbar(im, ax=axes[layer, :], shrink=0.9, pad=0.02, extend="max")
        bar.set_label("attention", fontsize=7)
        bar.ax.tick_params(labelsize=7)
    fig.suptitle(title, fontsize=12)
    return fig


def _score_axes(ax, scores, vmin, vmax, title, cmap="viridis"):
    im = ax.imshow(scores, cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest", aspect="auto",
                   origin="lower")
    n_layer, n_head = scores.shape
    ax.set_xlabel("head", fontsize=8)
    ax.set_ylabel("layer", fontsize=8)
    step_h, step_l = max(1, n_head // 12), max(1, n_layer // 12)
    ax.set_xticks(range(0, n_head, step_h))
    ax.set_yticks(range(0, n_layer, step_l))
    ax.tick_params(labelsize=7)
    ax.set_title(title, fontsize=9)
    return im


def head_scores_figure(rows: Sequence[tuple], labels: Sequence[str], title: str):
    """Heatmaps [layer x head], one row per score and one column per model.

    Args:
        rows: ``(score name, [per-model [L, H] arrays], vmin, vmax)``; vmin/vmax None = data range.
    """
    n_models = len(labels)
    n_layer, n_head = rows[0][1][0].shape
    cell_w = min(4.0, max(2.4, 0.28 * n_head + 1.0))
    cell_h = min(5.0, max(2.0, 0.2 * n_layer + 1.0))
    fig = _figure(cell_w * n_models + 1.2, cell_h * len(rows) + 0.7)
    axes = fig.subplots(len(rows), n_models, squeeze=False)
    for r, (name, per_model, vmin, vmax) in enumerate(rows):
        lo = min(float(s.min()) for s in per_model) if vmin is None else vmin
        hi = max(float(s.max()) for s in per_model) if vmax is None else vmax
        for c, (scores, label) in enumerate(zip(per_model, labels)):
            im = _score_axes(axes[r, c], scores, lo, hi, f"{label}: {name}")
        fig.colorbar(im, ax=axes[r, :], label=name, shrink=0.9)
    fig.suptitle(title, fontsize=11)
    return fig


def importance_figure(importance: Sequence[np.ndarray], ffn_delta: Sequence[np.ndarray],
                      labels: Sequence[str], title: str, colour_label: str = "head importance"):
    """Per model: the head importance heatmap (one colour scale for all models) above the FFN
    knock-out bars."""
    n_models = len(labels)
    n_layer, n_head = importance[0].shape
    cell_w = min(4.5, max(2.8, 0.28 * n_head + 1.2))
    cell_h = min(5.0, max(2.2, 0.2 * n_layer + 1.2))
    fig = _figure(cell_w * n_models + 1.2, cell_h + 2.6 + 0.7)
    grid = fig.add_gridspec(2, n_models, height_ratios=[cell_h, 2.6])
    hi = max(float(s.max()) for s in importance) or 1.0
    lo_d = min(0.0, min(float(d.min()) for d in ffn_delta))
    hi_d = max(0.0, max(float(d.max()) for d in ffn_delta))
    pad = 0.05 * (hi_d - lo_d or 1.0)
    heat_axes, im = [], None
    for c, (scores, delta, label) in enumerate(zip(importance, ffn_delta, labels)):
        ax = fig.add_subplot(grid[0, c])
        im = _score_axes(ax, scores, 0.0, hi, f"{label}: head importance")
        heat_axes.append(ax)
        bar = fig.add_subplot(grid[1, c])
        colors = ["tab:red" if d > 0 else "tab:blue" for d in delta]
        bar.bar(np.arange(n_layer), delta, color=colors)
        bar.axhline(0.0, color="black", linewidth=0.6)
        bar.set_ylim(lo_d - pad, hi_d + pad)
        bar.set_xlabel("layer (FFN removed)", fontsize=8)
        bar.set_ylabel("loss change (nats)", fontsize=8)
        bar.tick_params(labelsize=7)
        bar.set_title(f"{label}: FFN knock-out", fontsize=9)
    fig.colorbar(im, ax=heat_axes, label=colour_label, shrink=0.9)
    fig.suptitle(title, fontsize=11)
    return fig
