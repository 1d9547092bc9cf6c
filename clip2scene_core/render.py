"""PNG renders for humans: bird's-eye view by label, labels drawn into camera images, and a
confusion matrix.

Headless on purpose (matplotlib's Agg canvas, never pyplot's global figure state, and cv2
for raster work), so the replay tool, training evaluation and the demo can call these from
any thread on a machine without a display.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np

if TYPE_CHECKING:   # matplotlib is imported only by the plots: the node draws overlays with cv2
    from matplotlib.figure import Figure

from .palette import UNLABELED_COLOR, colorize, palette_for


def _prepare(path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _save(fig: Figure, path: Path, dpi: int) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=dpi, format="png")
    return path


def render_bev(xyz: np.ndarray, labels: np.ndarray, class_names: Sequence[str], path: str | Path,
               *, extent: float | tuple[float, float, float, float] = 50.0,
               palette: np.ndarray | None = None, title: str | None = None,
               point_size: float = 2.0, size_px: int = 1000, show_unlabeled: bool = True) -> Path:
    """Top-down scatter of ``xyz`` (N, 3) coloured by ``labels`` (N,), legend of present classes.

    ``extent`` is a half-width in metres around the origin (the sensor) or explicit
    ``(xmin, xmax, ymin, ymax)``. Points are drawn in height order so low ground does not
    hide objects. Returns the written path.
    """
    xyz = np.asarray(xyz, dtype=np.float64).reshape(-1, 3)
    labels = np.asarray(labels).reshape(-1).astype(np.int64)
    if len(labels) != len(xyz):
        raise ValueError(f"render_bev: {len(xyz)} points but {len(labels)} labels")
    names = list(class_names)
    pal = palette_for(names) if palette is None else np.asarray(palette, dtype=np.uint8)
    if isinstance(extent, (int, float)):
        box = (-float(extent), float(extent), -float(extent), float(extent))
    else:
        box = tuple(float(v) for v in extent)
    finite = np.all(np.isfinite(xyz), axis=1)
    if not show_unlabeled:
        finite &= labels >= 0
    pts, lab = xyz[finite], labels[finite]
    order = np.argsort(pts[:, 2], kind="stable")
    pts, lab = pts[order], lab[order]
    colors = colorize(lab, palette=pal).astype(np.float64) / 255.0

    dpi = 100
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    fig = Figure(figsize=(size_px / dpi * 1.3, size_px / dpi), dpi=dpi)
    ax = fig.add_axes((0.05, 0.05, 0.72, 0.9))
    ax.set_facecolor("black")
    ax.scatter(pts[:, 0], pts[:, 1], c=colors, s=point_size, marker=".", linewidths=0)
    ax.plot([0], [0], marker="^", color="white", markersize=8)
    ax.set_xlim(box[0], box[1])
    ax.set_ylim(box[2], box[3])
    ax.set_aspect("equal")
    ax.set_xlabel("x [m]")
    ax.set_ylabel("y [m]")
    if title:
        ax.set_title(title)
    present, counts = np.unique(lab, return_counts=True)
    handles = []
    for k, n in zip(present, counts):
        if 0 <= k < len(names):
            handles.append(Patch(color=pal[k] / 255.0, label=f"{names[k]} ({n})"))
        elif show_unlabeled and k < 0:
            handles.append(Patch(color=np.array(UNLABELED_COLOR) / 255.0, label=f"unlabeled ({n})"))
    if handles:
        fig.legend(handles=handles, loc="center right", fontsize=8, frameon=False)
    return _save(fig, _prepare(path), dpi)


def draw_points(image: np.ndarray, uv: np.ndarray, colors: np.ndarray, radius: int = 2) -> np.ndarray:
    """Copy of RGB ``image`` with filled discs at pixel coords ``uv`` (N, 2) in ``colors`` (N, 3)."""
    out = np.ascontiguousarray(np.asarray(image, dtype=np.uint8).copy())
    uv = np.asarray(uv, dtype=np.float64).reshape(-1, 2)
    colors = np.asarray(colors, dtype=np.uint8).reshape(-1, 3)
    h, w = out.shape[:2]
    ok = np.all(np.isfinite(uv), axis=1)
    uv_i = np.round(uv[ok]).astype(np.int64)
    col = colors[ok]
    inside = (uv_i[:, 0] >= 0) & (uv_i[:, 0] < w) & (uv_i[:, 1] >= 0) & (uv_i[:, 1] < h)
    uv_i, col = uv_i[inside], col[inside]
    if radius <= 0:
        out[uv_i[:, 1], uv_i[:, 0]] = col
        return out
    # Vectorised discs: paint every offset of the disc stencil at once (cv2.circle per point
    # would be a Python loop over thousands of points).
    r = int(radius)
    dy, dx = np.mgrid[-r:r + 1, -r:r + 1]
    disc = (dx ** 2 + dy ** 2) <= r * r
    for ox, oy in zip(dx[disc], dy[disc]):
        x = uv_i[:, 0] + ox
        y = uv_i[:, 1] + oy
        m = (x >= 0) & (x < w) & (y >= 0) & (y < h)
        out[y[m], x[m]] = col[m]
    return out


def render_projection(image: np.ndarray, uv: np.ndarray, path: str | Path, *,
                      labels: np.ndarray | None = None, class_names: Sequence[str] | None = None,
                      colors: np.ndarray | None = None, depth: np.ndarray | None = None,
                      palette: np.ndarray | None = None, radius: int = 2,
                      legend: bool = True, title: str | None = None) -> Path:
    """Camera ``image`` (H, W, 3 RGB uint8) with points at ``uv`` (N, 2) drawn as dots.

    Colour comes from ``colors`` (N, 3) if given, else from ``labels`` through the palette
    of ``class_names``. With ``depth``, far points are drawn first so near ones stay on top.
    Only pass the points that are valid for this camera (``Projection.valid``).
    """
    uv = np.asarray(uv, dtype=np.float64).reshape(-1, 2)
    names = list(class_names) if class_names is not None else None
    if colors is None:
        if labels is None:
            raise ValueError("render_projection needs labels or colors")
        labels = np.asarray(labels).reshape(-1)
        if len(labels) != len(uv):
            raise ValueError(f"render_projection: {len(uv)} points but {len(labels)} labels")
        pal = palette if palette is not None else (palette_for(names) if names is not None else None)
        colors = colorize(labels, palette=pal)
    colors = np.asarray(colors, dtype=np.uint8).reshape(-1, 3)
    if len(colors) != len(uv):
        raise ValueError(f"render_projection: {len(uv)} points but {len(colors)} colours")
    if depth is not None:
        order = np.argsort(-np.asarray(depth, dtype=np.float64).reshape(-1), kind="stable")
        uv, colors = uv[order], colors[order]
        if labels is not None:
            labels = np.asarray(labels).reshape(-1)[order]
    canvas = draw_points(image, uv, colors, radius=radius)
    if legend and labels is not None and names is not None:
        canvas = _draw_legend(canvas, labels, names, palette if palette is not None else palette_for(names))
    if title:
        scale = max(canvas.shape[1] / 1600.0, 0.4)
        cv2.putText(canvas, title, (10, int(30 * scale) + 5), cv2.FONT_HERSHEY_SIMPLEX, scale,
                    (255, 255, 255), max(1, int(2 * scale)), cv2.LINE_AA)
    path = _prepare(path)
    if not cv2.imwrite(str(path), cv2.cvtColor(canvas, cv2.COLOR_RGB2BGR)):
        raise OSError(f"could not write {path}")
    return path


def _draw_legend(canvas: np.ndarray, labels: np.ndarray, names: list[str], pal: np.ndarray) -> np.ndarray:
    """Small legend (present classes) in the top-right corner of ``canvas``."""
    present = [int(k) for k in np.unique(labels) if 0 <= k < len(names)]
    if not present:
        return canvas
    scale = max(canvas.shape[1] / 1600.0, 0.35) * 0.6
    line = int(28 * scale / 0.6)
    width = int(max(cv2.getTextSize(names[k], cv2.FONT_HERSHEY_SIMPLEX, scale, 1)[0][0]
                    for k in present)) + line + 20
    x0 = max(canvas.shape[1] - width - 10, 0)
    y0 = 10
    h = line * len(present) + 10
    roi = canvas[y0:y0 + h, x0:x0 + width]
    roi[:] = (roi.astype(np.float32) * 0.4).astype(np.uint8)
    for i, k in enumerate(present):
        y = y0 + 5 + i * line
        color = tuple(int(c) for c in pal[k])
        cv2.rectangle(canvas, (x0 + 5, y + 3), (x0 + line - 3, y + line - 5), color, -1)
        cv2.putText(canvas, names[k], (x0 + line + 3, y + line - 8), cv2.FONT_HERSHEY_SIMPLEX,
                    scale, (255, 255, 255), 1, cv2.LINE_AA)
    return canvas


def render_confusion_matrix(matrix: np.ndarray, class_names: Sequence[str], path: str | Path, *,
                            normalize: bool = True, title: str | None = None,
                            iou: np.ndarray | None = None) -> Path:
    """Confusion matrix ``matrix[gt, pred]`` (K, K) as a heat map, rows normalised to recall.

    Rows without ground truth stay blank. With ``iou`` (K,), the per-class IoU is appended to
    the row labels so a single PNG carries the whole evaluation.
    """
    m = np.asarray(matrix, dtype=np.float64)
    names = list(class_names)
    if m.ndim != 2 or m.shape[0] != m.shape[1] or m.shape[0] != len(names):
        raise ValueError(f"confusion matrix {m.shape} does not match {len(names)} class names")
    k = len(names)
    if normalize:
        rows = m.sum(axis=1, keepdims=True)
        with np.errstate(invalid="ignore", divide="ignore"):
            shown = np.where(rows > 0, m / np.maximum(rows, 1), np.nan)
    else:
        shown = m
    cell = 0.45
    from matplotlib.figure import Figure

    fig = Figure(figsize=(max(4.0, 2.5 + cell * k), max(3.5, 2.0 + cell * k)), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(np.ma.masked_invalid(shown), cmap="Blues", vmin=0.0,
                   vmax=1.0 if normalize else max(float(np.nanmax(shown)) if m.size else 1.0, 1.0))
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    ylabels = names if iou is None else [
        f"{n} ({'n/a' if not np.isfinite(v) else f'{100 * v:.1f}'})" for n, v in zip(names, iou)]
    ax.set_xticks(range(k), labels=names, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(k), labels=ylabels, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("ground truth" + (" (IoU %)" if iou is not None else ""))
    if k <= 25:
        for r in range(k):
            for c in range(k):
                v = shown[r, c]
                if np.isfinite(v) and (m[r, c] > 0):
                    txt = f"{v:.2f}" if normalize else f"{int(m[r, c])}"
                    ax.text(c, r, txt, ha="center", va="center", fontsize=6,
                            color="white" if (v > 0.5 if normalize else False) else "black")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return _save(fig, _prepare(path), 100)
