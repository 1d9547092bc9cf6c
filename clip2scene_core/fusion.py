"""Camera fusion: a teacher's dense features → per-point class probabilities, folded and exact.

The straightforward path bilinearly samples the D = 512 features of every point that lands
in an image (``grid_sample``), re-normalises them and takes their dot products with the K
text embeddings: O(D) per corner and point, ~15 ms per camera and sweep. But interpolation is
linear: with corner weights w_c on cells c,

    interp(f) · e_k = Σ_c w_c (f_c · e_k)                  → (K,) scores per cell
    |interp(f)|²    = Σ_c Σ_c' w_c w_c' (f_c · f_c')        → the Gram of each 2×2 square

so once per prediction and vocabulary (`fold_features`, on the teacher's worker) each cell
keeps the K scores of the four corners of the square it anchors and those corners' ten Gram
entries; a point then reads 4·K + 10 numbers instead of 4·D, and its cosine logits are exact
(`folded_probabilities`). The corners are clamped at the border exactly as ``grid_sample``
(bilinear, ``padding_mode="border"``, ``align_corners=False``) clamps them: a clamped
corner is the same cell, so its pair entries are that cell's own squared norm. Same spirit as
`clip2scene_core.classify`, which folds the heads into the text embeddings.

`sampled_probabilities` is the reference (sample D features per point); tests check that both
give the same probabilities. `fuse_into_rows` averages several cameras' probabilities into
only the points they see; every other point keeps its per-row (voxel) probabilities.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .clip.preprocess import ImageGeometry, sample_grid

_EPS = 1e-12   # F.normalize's: norms below it are clamped

# the six corner pairs of a square, in the order of FoldedFeatures.gram[:, 4:]
_PAIRS = ((0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3))
_PAIR_I, _PAIR_J = [i for i, _ in _PAIRS], [j for _, j in _PAIRS]


@dataclass(frozen=True)
class FoldedFeatures:
    """One feature map folded into one set of text embeddings (corners: 0 = the anchor cell
    (y, x), 1 = right (y, x+1), 2 = down (y+1, x), 3 = diagonal (y+1, x+1), each clamped)."""

    embeddings: torch.Tensor    # the (K, D) tensor folded for: the cache key (by identity)
    scores: torch.Tensor        # (h·w, 4, K) float64 f_corner · e_k
    gram: torch.Tensor          # (h·w, 10) float64 |f_c|² of the 4 corners, then the _PAIRS dots
    grid_size: tuple[int, int]  # (h, w)

    def matches(self, embeddings: torch.Tensor) -> bool:
        return self.embeddings is embeddings


class FoldSlot:
    """Where a prediction keeps its fold: one mutable holder shared by the copies of a
    prediction (`CameraPrediction.with_calibration`), so a re-fold made in one sweep (after a
    vocabulary change) serves the next sweeps too. Assigning an attribute is atomic."""

    __slots__ = ("folded",)

    def __init__(self, folded: FoldedFeatures | None = None) -> None:
        self.folded = folded

    def __repr__(self) -> str:
        return f"FoldSlot({'folded' if self.folded is not None else 'empty'})"


def _corner_cells(h: int, w: int, device: torch.device) -> torch.Tensor:
    """(h·w, 4) flat indices of the anchor, right, down and diagonal cells, border-clamped."""
    y = torch.arange(h, device=device)[:, None].expand(h, w)
    x = torch.arange(w, device=device)[None, :].expand(h, w)
    y1, x1 = (y + 1).clamp_max(h - 1), (x + 1).clamp_max(w - 1)
    return torch.stack([y * w + x, y * w + x1, y1 * w + x, y1 * w + x1], dim=-1).reshape(-1, 4)


def fold_features(features: torch.Tensor, embeddings: torch.Tensor) -> FoldedFeatures:
    """Fold (D, h, w) features into (K, D) text embeddings (see the module docstring).

    Float64 on the features' device: O(h·w·D·(K + 10)), a few ms for a ViT-B/16 grid,
    done once per prediction and vocabulary.
    """
    if features.ndim != 3 or embeddings.ndim != 2 or features.shape[0] != embeddings.shape[1]:
        raise ValueError(f"features (D, h, w) and embeddings (K, D) do not fit: "
                         f"{tuple(features.shape)} and {tuple(embeddings.shape)}")
    d, h, w = features.shape
    f = features.detach().reshape(d, h * w).t().double()           # (h·w, D)
    e = embeddings.detach().to(f.device).double()
    cells = _corner_cells(h, w, f.device)
    per_cell = f @ e.t()                                             # (h·w, K)
    scores = per_cell[cells]                                         # (h·w, 4, K)
    sq = (f * f).sum(1)
    gram = [sq[cells[:, i]] for i in range(4)]
    gram += [(f[cells[:, i]] * f[cells[:, j]]).sum(1) for i, j in _PAIRS]
    return FoldedFeatures(embeddings, scores, torch.stack(gram, dim=1), (h, w))


def bilinear_corners(uv: np.ndarray, geometry: ImageGeometry) -> tuple[np.ndarray, np.ndarray]:
    """(N,) int64 anchor cell (flat index) and (N, 4) float64 weights of its corners for the
    original-image pixels ``uv``: ``grid_sample``'s bilinear read with border padding."""
    h, w = geometry.grid_size
    xy = geometry.to_cells(uv)
    x = np.clip(xy[:, 0], 0.0, w - 1)         # border padding clamps the coordinate first
    y = np.clip(xy[:, 1], 0.0, h - 1)
    x0, y0 = np.floor(x), np.floor(y)
    ax, ay = x - x0, y - y0                   # weight of the right / lower corner
    bx, by = 1.0 - ax, 1.0 - ay
    weights = np.stack([by * bx, by * ax, ay * bx, ay * ax], axis=1)
    return y0.astype(np.int64) * w + x0.astype(np.int64), weights


def folded_probabilities(folded: FoldedFeatures, uv: np.ndarray, geometry: ImageGeometry,
                         scale: float, device: torch.device | None = None) -> torch.Tensor:
    """(N, K) float32 softmax of ``scale`` × cosine(bilinear feature, e_k) at pixels ``uv``
    (all inside ``geometry``), from the folded maps: exact, O(K) per point."""
    if tuple(folded.grid_size) != tuple(geometry.grid_size):
        raise ValueError(f"folded grid {folded.grid_size} is not the geometry's {geometry.grid_size}")
    dev = folded.scores.device
    anchor, wts = bilinear_corners(uv, geometry)
    a = torch.from_numpy(anchor).to(dev)
    wt = torch.from_numpy(wts).to(dev)
    # a broadcast multiply-add: faster than a bmm of N (1, 4) @ (4, K) products on a CPU
    num = (wt[:, :, None] * folded.scores.index_select(0, a)).sum(1)            # (N, K)
    quad = torch.cat([wt * wt, 2.0 * wt[:, _PAIR_I] * wt[:, _PAIR_J]], dim=1)    # (N, 10)
    norm = (folded.gram.index_select(0, a) * quad).sum(1).clamp_min(0.0).sqrt().clamp_min(_EPS)
    logits = (scale * num / norm[:, None]).float()
    return logits.softmax(dim=1).to(device or dev)


def sampled_probabilities(features: torch.Tensor, uv: np.ndarray, geometry: ImageGeometry,
                          embeddings: torch.Tensor, scale: float,
                          device: torch.device | None = None) -> torch.Tensor:
    """The reference of `folded_probabilities`: sample the D-dim features per point
    (``grid_sample``), normalise, cosine against the embeddings, softmax."""
    dev = device or embeddings.device
    feats = sample_grid(features, uv, geometry, normalize=False).to(dev)
    logits = scale * F.normalize(feats.float(), dim=1) @ embeddings.to(dev).t()
    return logits.softmax(dim=1)


def fuse_into_rows(row_probs: torch.Tensor, point_rows: np.ndarray | None,
                   seen: list[tuple[np.ndarray, torch.Tensor]], weight: float
                   ) -> tuple[np.ndarray, torch.Tensor]:
    """Blend cameras' probabilities into the points they see, without expanding the rest.

    ``row_probs`` (R, K): per voxel (``point_rows`` (P,) the row of each point) or per point
    (``point_rows`` None); ``seen``: per camera, (points, (n, K) probabilities). Returns the
    points seen by any camera (sorted, unique) and their probabilities,
    ``(1 − weight) · row + weight · mean over the cameras that see the point``.
    """
    if not seen:
        return np.zeros(0, np.int64), row_probs.new_zeros((0, row_probs.shape[1]))
    idx = np.concatenate([i for i, _ in seen])
    # how many cameras see each point; positions of the seen ones (a count, not a sort)
    count = np.bincount(idx, minlength=int(idx.max()) + 1)
    points = np.flatnonzero(count)
    slot = np.cumsum(count > 0) - 1
    dev = row_probs.device
    total = row_probs.new_zeros((points.size, row_probs.shape[1]))
    total.index_add_(0, torch.from_numpy(slot[idx]).to(dev),
                     torch.cat([p.to(dev, row_probs.dtype) for _, p in seen]))
    rows = points if point_rows is None else point_rows[points]
    base = row_probs.index_select(0, torch.from_numpy(np.asarray(rows, np.int64)).to(dev))
    cnt = torch.from_numpy(count[points]).to(dev, total.dtype)
    return points, (1 - weight) * base + weight * total / cnt[:, None]
