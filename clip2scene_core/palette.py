"""Per-class colours for renders and the PointCloud2 ``rgb`` field.

Known benchmark classes keep the colours people recognise from the nuScenes devkit and the
SemanticKITTI ``semantic-kitti.yaml`` (``clip2scene_core.label_spaces``), so a render can be
compared with published figures at a glance. Names outside those presets (open-vocabulary
prompts) get generated colours: golden-ratio hue steps, each kept away from the colours
already handed out, and a pure function of the class list, so the same vocabulary always
renders the same way.
"""
from __future__ import annotations

import colorsys
from collections.abc import Sequence

import numpy as np

from .label_spaces import LABEL_SPACES, NUSCENES16, SEMANTICKITTI19, class_key

#: colour of points without a label (-1: dropped / outside the voxel range / ignored)
UNLABELED_COLOR: tuple[int, int, int] = (128, 128, 128)

#: conventional colours by dataset class name (the records in ``clip2scene_core.label_spaces``)
NUSCENES16_COLORS: dict[str, tuple[int, int, int]] = NUSCENES16.colors()
SEMANTICKITTI19_COLORS: dict[str, tuple[int, int, int]] = SEMANTICKITTI19.colors()

#: per label space with colours, in registry order: class key → colour
_TABLES: tuple[dict[str, tuple[int, int, int]], ...] = tuple(
    t for t in ({class_key(c.name): c.color for c in s.classes if c.color is not None}
                for s in LABEL_SPACES.values()) if t)


def _preset_colors(names: Sequence[str]) -> list[tuple[int, int, int] | None]:
    """Conventional colour of each name (None: none known). Names are matched with
    ``label_spaces.class_key``; the label space sharing most names with the list wins shared
    names (a SemanticKITTI-looking vocabulary gets KITTI's "car"), earlier spaces on a tie."""
    keys = [class_key(n) for n in names]
    present = set(keys)
    tables = sorted(_TABLES, key=lambda t: -len(present & t.keys()))
    return [next((t[k] for t in tables if k in t), None) for k in keys]


def _distance(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.min(np.linalg.norm(b.astype(np.float64) - a.astype(np.float64), axis=1)))


def generate_colors(count: int, avoid: np.ndarray | None = None, min_distance: float = 60.0
                    ) -> np.ndarray:
    """``count`` distinct RGB colours (uint8): golden-ratio hues over a few saturation/value rings.

    Candidates closer than ``min_distance`` (RGB euclidean) to a colour already used (or in
    ``avoid``) are skipped while that is possible, so neighbouring classes stay distinguishable.
    """
    used = [] if avoid is None else [np.asarray(c, dtype=np.uint8) for c in np.asarray(avoid).reshape(-1, 3)]
    used.append(np.array(UNLABELED_COLOR, dtype=np.uint8))
    out: list[np.ndarray] = []
    rings = [(0.85, 0.95), (0.55, 0.85), (0.95, 0.65), (0.4, 0.6)]
    i = 0
    threshold = min_distance
    while len(out) < count:
        hue = (0.13 + i * 0.618033988749895) % 1.0
        sat, val = rings[(i // 7) % len(rings)]
        cand = np.array([round(255 * c) for c in colorsys.hsv_to_rgb(hue, sat, val)], dtype=np.uint8)
        i += 1
        if _distance(cand, np.stack(used)) >= threshold:
            out.append(cand)
            used.append(cand)
        if i % 200 == 0:  # crowded palette: relax the distance rather than loop forever
            threshold *= 0.7
    return np.stack(out) if out else np.zeros((0, 3), dtype=np.uint8)


def palette_for(class_names: Sequence[str]) -> np.ndarray:
    """(K, 3) uint8 colours for ``class_names``: preset colours where known, generated otherwise."""
    names = list(class_names)
    colors = np.zeros((len(names), 3), dtype=np.uint8)
    unknown: list[int] = []
    for i, c in enumerate(_preset_colors(names)):
        if c is None:
            unknown.append(i)
        else:
            colors[i] = c
    if unknown:
        known = np.array([colors[i] for i in range(len(names)) if i not in unknown], dtype=np.uint8)
        colors[unknown] = generate_colors(len(unknown), avoid=known if len(known) else None)
    return colors


def colorize(labels: np.ndarray, class_names: Sequence[str] | None = None,
             palette: np.ndarray | None = None,
             unlabeled: tuple[int, int, int] = UNLABELED_COLOR) -> np.ndarray:
    """(N,) integer labels → (N, 3) uint8 RGB; labels < 0 or ≥ K get ``unlabeled``.

    The palette is ``palette`` if given, else ``palette_for(class_names)``, else generated
    for ``max(labels) + 1`` classes.
    """
    labels = np.asarray(labels).reshape(-1).astype(np.int64)
    if palette is None:
        if class_names is not None:
            palette = palette_for(class_names)
        else:
            k = int(labels.max()) + 1 if labels.size and labels.max() >= 0 else 0
            palette = generate_colors(k)
    palette = np.asarray(palette, dtype=np.uint8).reshape(-1, 3)
    out = np.empty((labels.size, 3), dtype=np.uint8)
    out[:] = unlabeled
    ok = (labels >= 0) & (labels < len(palette))
    out[ok] = palette[labels[ok]]
    return out


def pack_rgb(colors: np.ndarray) -> np.ndarray:
    """(N, 3) colours in [0, 255] → (N,) float32 whose bits are 0x00RRGGBB (PCL / RViz ``rgb``).

    Out-of-range or non-finite values are refused rather than wrapped into another colour.
    """
    c = np.asarray(colors).reshape(-1, 3)
    if c.dtype != np.uint8:
        if c.size and (not np.all(np.isfinite(c)) or c.min() < 0 or c.max() > 255):
            raise ValueError("rgb values must be finite and in [0, 255]")
        c = c.astype(np.uint8)
    c = c.astype(np.uint32)
    return ((c[:, 0] << 16) | (c[:, 1] << 8) | c[:, 2]).view(np.float32)


def unpack_rgb(rgb: np.ndarray) -> np.ndarray:
    """Inverse of :func:`pack_rgb`: float32 (or uint32) bit patterns (any shape) → (..., 3) uint8."""
    arr = np.ascontiguousarray(rgb)
    bits = arr.view(np.uint32) if arr.dtype.itemsize == 4 else arr.astype(np.uint32)
    return np.stack([(bits >> 16) & 255, (bits >> 8) & 255, bits & 255], axis=-1).astype(np.uint8)
