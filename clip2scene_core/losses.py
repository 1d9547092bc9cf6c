"""CLIP2Scene training losses (Chen et al., CVPR 2023) and Lovász-softmax for fine-tuning.

* Semantic Consistency Regularization (SCR, Eq. 1): point features of the *local* head are
  contrasted with CLIP text embeddings. The positive of a point is the text embedding of the
  pseudo-label its pixel got from MaskCLIP; negatives are the points of *other* pseudo-labels
  against that text (points of the same class are not pushed away from it). τ = 0.5.
  The released code instead uses plain cross-entropy over the text classifier; that variant is
  selectable (``ScrConfig.variant = "cross_entropy"``).
* Semantic-guided Spatial-Temporal Consistency Regularization (SSR, Eq. 2–4): the keyframe and
  its sweeps (already aligned into the keyframe by ego poses) are partitioned into a grid. In
  each grid cell the pixel features and point features are fused by text-guided attention
  (weights = softmax of the similarity to the text embedding of the cell's semantic label, / λ),
  and every point of the cell (global head) is pulled to the fused feature.
* Switchable self-training: after ``switch_epoch`` the targets switch between the pixel
  pseudo-labels and the network's own predictions.

Everything here is pure torch on whatever device the inputs live on.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import Clip2SceneError

__all__ = [
    "ScrConfig", "SsrConfig", "SelfTrainingConfig",
    "cosine_logits", "scr_contrastive_loss", "scr_cross_entropy_loss", "semantic_consistency_loss",
    "grid_partition", "grid_labels", "text_guided_fusion", "ssr_loss",
    "switchable_targets", "lovasz_softmax", "segmentation_loss",
]


# ----------------------------------------------------------------------------- configs
@dataclass
class ScrConfig:
    """Semantic Consistency Regularization (Eq. 1) on the local head."""

    enabled: bool = True
    variant: Literal["contrastive", "cross_entropy"] = "contrastive"
    temperature: float = 0.5          # τ of Eq. 1 (paper: 0.5)
    ce_temperature: float = 0.07      # logit scale of the released code's CE-over-text variant
    weight: float = 1.0

    def __post_init__(self) -> None:
        if self.temperature <= 0 or self.ce_temperature <= 0:
            raise ValueError("temperatures must be positive")


@dataclass
class SsrConfig:
    """Semantic-guided Spatial-Temporal Consistency Regularization (Eq. 2–4) on the global head."""

    enabled: bool = True
    weight: float = 1.0
    lam: float = 1.0                  # λ of the text-guided attention (paper: 1)
    grid_size: float = 1.0            # metres; cell edge of the spatial-temporal partition
    similarity: Literal["cosine", "sigmoid_dot"] = "cosine"   # Eq. 2 (released code: sigmoid_dot)
    detach_target: bool = False       # stop gradients through the fused cell feature

    def __post_init__(self) -> None:
        if self.lam <= 0 or self.grid_size <= 0:
            raise ValueError("lam and grid_size must be positive")


@dataclass
class SelfTrainingConfig:
    """Switchable self-training: from ``switch_epoch`` on, targets alternate between the pixel
    pseudo-labels and the point network's own predictions with ``probability``."""

    enabled: bool = True
    switch_epoch: int = 10
    probability: float = 0.5          # chance of using the network's own prediction
    mode: Literal["batch", "point"] = "batch"   # one coin per step (released code) or per point

    def __post_init__(self) -> None:
        if not 0.0 <= self.probability <= 1.0:
            raise ValueError("probability must be in [0, 1]")


# ----------------------------------------------------------------------------- helpers
def _check_labels(feats: Tensor, text_emb: Tensor, labels: Tensor) -> None:
    if feats.ndim != 2 or text_emb.ndim != 2 or feats.shape[1] != text_emb.shape[1]:
        raise Clip2SceneError(
            f"feature dims disagree: points {tuple(feats.shape)}, text {tuple(text_emb.shape)}")
    if labels.shape != feats.shape[:1]:
        raise Clip2SceneError(f"labels {tuple(labels.shape)} do not match features {tuple(feats.shape)}")
    if labels.numel() and int(labels.max()) >= text_emb.shape[0]:
        raise Clip2SceneError(f"label {int(labels.max())} >= number of classes {text_emb.shape[0]}")


def cosine_logits(feats: Tensor, text_emb: Tensor) -> Tensor:
    """(N, K) cosine similarity between point features and class text embeddings."""
    return F.normalize(feats, dim=-1) @ F.normalize(text_emb, dim=-1).t()


def _zero(ref: Tensor) -> Tensor:
    # keeps the graph connected (DDP needs every parameter to receive a gradient)
    return ref.sum() * 0.0


# ----------------------------------------------------------------------------- SCR (Eq. 1)
def scr_contrastive_loss(point_feats: Tensor, text_emb: Tensor, labels: Tensor,
                         temperature: float = 0.5, ignore_index: int = -1) -> Tensor:
    """Semantic-driven contrastive loss of Eq. 1.

    For point i with pseudo-label c_i the positive pair is (F_i, t_{c_i}); the negatives are
    (F_j, t_{c_i}) for every point j whose pseudo-label differs from c_i:

        L = -1/M Σ_i log  exp(D(F_i,t_ci)/τ) / (exp(D(F_i,t_ci)/τ) + Σ_{j: c_j≠c_i} exp(D(F_j,t_ci)/τ))

    D is cosine similarity. O(N·K): the negative sum is computed once per class.
    """
    _check_labels(point_feats, text_emb, labels)
    keep = labels != ignore_index
    if not bool(keep.any()):
        return _zero(point_feats)
    sim = cosine_logits(point_feats, text_emb) / temperature            # (N, K)
    lab = labels.clamp_min(0)
    num_classes = text_emb.shape[0]
    # negatives of class k: kept points whose label is not k (ignored points are negatives of
    # nothing, so they do not move).
    neg_mask = keep[:, None] & (lab[:, None] != torch.arange(num_classes, device=lab.device)[None])
    neg_logits = sim.masked_fill(~neg_mask, float("-inf"))
    neg_lse = torch.logsumexp(neg_logits, dim=0)                       # (K,) log Σ_j exp
    pos = sim.gather(1, lab[:, None]).squeeze(1)                       # (N,)
    denom = torch.logaddexp(pos, neg_lse[lab])                         # -inf + x = x
    loss = (denom - pos)[keep]
    return loss.mean()


def scr_cross_entropy_loss(point_feats: Tensor, text_emb: Tensor, labels: Tensor,
                           temperature: float = 0.07, ignore_index: int = -1) -> Tensor:
    """Released-code variant: cross-entropy over the text classifier (cosine / temperature)."""
    _check_labels(point_feats, text_emb, labels)
    if not bool((labels != ignore_index).any()):
        return _zero(point_feats)
    logits = cosine_logits(point_feats, text_emb) / temperature
    return F.cross_entropy(logits, labels, ignore_index=ignore_index)


def semantic_consistency_loss(point_feats: Tensor, text_emb: Tensor, labels: Tensor,
                              cfg: ScrConfig, ignore_index: int = -1) -> Tensor:
    """SCR with the variant chosen in ``cfg`` (unweighted)."""
    if cfg.variant == "contrastive":
        return scr_contrastive_loss(point_feats, text_emb, labels, cfg.temperature, ignore_index)
    return scr_cross_entropy_loss(point_feats, text_emb, labels, cfg.ce_temperature, ignore_index)


# ----------------------------------------------------------------------------- SSR (Eq. 2–4)
def grid_partition(xyz: Tensor, batch_index: Tensor, grid_size: float) -> Tensor:
    """Dense cell id (0..G-1) of each point: cells are ``grid_size`` cubes, separate per scene.

    ``xyz`` must already be in the keyframe frame (sweeps aligned by ego poses) so that the
    same cell collects the same piece of the world across time.
    """
    if xyz.ndim != 2 or xyz.shape[1] != 3 or batch_index.shape != xyz.shape[:1]:
        raise Clip2SceneError("grid_partition expects xyz (N, 3) and batch_index (N,)")
    cell = torch.floor(xyz / grid_size).to(torch.int64)
    key = torch.cat([batch_index.to(torch.int64)[:, None], cell], dim=1)
    _, inverse = torch.unique(key, dim=0, return_inverse=True)
    return inverse


def grid_labels(point_labels: Tensor, cells: Tensor, num_classes: int, ignore_index: int = -1) -> Tensor:
    """Semantic label of each cell = majority vote of the (pixel) labels of its points; cells
    with no labelled point get ``ignore_index``."""
    num_cells = int(cells.max()) + 1 if cells.numel() else 0
    valid = point_labels != ignore_index
    votes = torch.zeros(num_cells * num_classes, device=cells.device, dtype=torch.float32)
    idx = cells[valid] * num_classes + point_labels[valid]
    votes.index_add_(0, idx, torch.ones_like(idx, dtype=torch.float32))
    votes = votes.view(num_cells, num_classes)
    lab = votes.argmax(dim=1)
    lab[votes.sum(dim=1) == 0] = ignore_index
    return lab


def _segment_softmax(logits: Tensor, group: Tensor, num_groups: int) -> Tensor:
    gmax = torch.full((num_groups,), float("-inf"), device=logits.device, dtype=logits.dtype)
    gmax = gmax.scatter_reduce(0, group, logits, reduce="amax", include_self=True)
    ex = torch.exp(logits - gmax[group])
    den = torch.zeros(num_groups, device=logits.device, dtype=logits.dtype).index_add(0, group, ex)
    return ex / den[group]


def text_guided_fusion(members: Tensor, group: Tensor, group_text: Tensor, lam: float = 1.0) -> Tensor:
    """Eq. 3–4: f_n = Σ_m softmax_m(D(x_m, t_n)/λ) x_m over the members m of cell n.

    ``members`` (M, D) are pixel and point features, ``group`` (M,) their cell, ``group_text``
    (G, D) the text embedding of each cell's semantic label. Returns (G, D); cells without
    members get zeros.
    """
    num_groups = group_text.shape[0]
    x = F.normalize(members, dim=-1)
    t = F.normalize(group_text, dim=-1)
    att = _segment_softmax((x * t[group]).sum(-1) / lam, group, num_groups)
    fused = torch.zeros(num_groups, members.shape[1], device=members.device, dtype=members.dtype)
    return fused.index_add(0, group, att[:, None] * x)


def ssr_loss(point_feats: Tensor, cells: Tensor, pixel_feats: Tensor, pixel_cells: Tensor,
             cell_labels: Tensor, text_emb: Tensor, cfg: SsrConfig, ignore_index: int = -1) -> Tensor:
    """Eq. 2: mean over points of labelled cells of 1 - D(F_i, f_n).

    ``point_feats`` (N, D) global-head features of keyframe + sweep points and their ``cells``;
    ``pixel_feats`` (P, D) teacher features of the pixels hit by points, in ``pixel_cells``;
    ``cell_labels`` (G,) from :func:`grid_labels`. Cells without a label are skipped.
    """
    if point_feats.shape[1] != text_emb.shape[1] or (pixel_feats.numel() and pixel_feats.shape[1] != text_emb.shape[1]):
        raise Clip2SceneError("SSR: point, pixel and text feature dims must agree")
    labelled = cell_labels != ignore_index
    pmask = labelled[cells]
    if not bool(pmask.any()):
        return _zero(point_feats)
    # re-index the labelled cells densely
    remap = torch.full_like(cell_labels, -1)
    remap[labelled] = torch.arange(int(labelled.sum()), device=cells.device)
    pt_cells = remap[cells[pmask]]
    pt_feats = point_feats[pmask]
    xmask = labelled[pixel_cells] if pixel_cells.numel() else pixel_cells.bool()
    px_cells = remap[pixel_cells[xmask]]
    px_feats = pixel_feats[xmask].to(pt_feats.dtype)
    group_text = text_emb[cell_labels[labelled]].to(pt_feats.dtype)
    members = torch.cat([px_feats, pt_feats], dim=0)
    group = torch.cat([px_cells, pt_cells], dim=0)
    fused = text_guided_fusion(members, group, group_text, cfg.lam)
    if cfg.detach_target:
        fused = fused.detach()
    target = fused[pt_cells]
    if cfg.similarity == "cosine":
        sim = F.cosine_similarity(pt_feats, target, dim=-1)
    else:
        sim = torch.sigmoid((F.normalize(pt_feats, dim=-1) * target).sum(-1))
    return (1.0 - sim).mean()


# ----------------------------------------------------------------------------- self-training
def switchable_targets(pixel_labels: Tensor, point_logits: Tensor, epoch: int,
                       cfg: SelfTrainingConfig, generator: torch.Generator | None = None,
                       ignore_index: int = -1) -> Tensor:
    """Targets for SCR: the pixel pseudo-labels before ``switch_epoch``; afterwards, with
    probability ``cfg.probability`` (per step or per point), the network's own argmax.

    Randomness comes from ``generator`` (kept on CPU, saved with the training state) so a
    resumed run draws the same coins. Ignored points stay ignored.
    """
    if not cfg.enabled or epoch < cfg.switch_epoch or cfg.probability == 0.0:
        return pixel_labels
    own = point_logits.detach().argmax(dim=1)
    if cfg.mode == "batch":
        coin = float(torch.rand((), generator=generator))
        out = own if coin < cfg.probability else pixel_labels
    else:
        coins = torch.rand(pixel_labels.shape[0], generator=generator).to(pixel_labels.device)
        out = torch.where(coins < cfg.probability, own, pixel_labels)
    return torch.where(pixel_labels == ignore_index, pixel_labels, out)


# ----------------------------------------------------------------------------- fine-tuning
def _lovasz_grad(gt_sorted: Tensor) -> Tensor:
    """Gradient of the Lovász extension of the Jaccard loss w.r.t. sorted errors."""
    gts = gt_sorted.sum()
    inter = gts - gt_sorted.cumsum(0)
    union = gts + (1.0 - gt_sorted).cumsum(0)
    jac = 1.0 - inter / union
    if gt_sorted.numel() > 1:
        jac = torch.cat([jac[:1], jac[1:] - jac[:-1]])
    return jac


def lovasz_softmax(probs: Tensor, labels: Tensor, classes: Literal["present", "all"] = "present",
                   ignore_index: int = -1) -> Tensor:
    """Lovász-softmax loss (Berman et al., CVPR 2018): a convex surrogate of 1 - IoU per class.

    ``probs`` (N, C) softmax probabilities, ``labels`` (N,). Mean over the classes present in
    ``labels`` (or all classes).
    """
    if probs.ndim != 2 or labels.shape != probs.shape[:1]:
        raise Clip2SceneError("lovasz_softmax expects probs (N, C) and labels (N,)")
    keep = labels != ignore_index
    probs, labels = probs[keep], labels[keep]
    if probs.numel() == 0:
        return _zero(probs)
    losses = []
    for c in range(probs.shape[1]):
        fg = (labels == c).to(probs.dtype)
        if classes == "present" and not bool(fg.any()):
            continue
        err = (fg - probs[:, c]).abs()
        err_sorted, order = torch.sort(err, descending=True)
        losses.append(torch.dot(err_sorted, _lovasz_grad(fg[order])))
    if not losses:
        return _zero(probs)
    return torch.stack(losses).mean()


def segmentation_loss(logits: Tensor, labels: Tensor, lovasz_weight: float = 1.0,
                      ignore_index: int = -1, class_weights: Tensor | None = None) -> Tensor:
    """Fine-tuning loss: cross-entropy + ``lovasz_weight`` × Lovász-softmax."""
    if not bool((labels != ignore_index).any()):
        return _zero(logits)
    loss = F.cross_entropy(logits, labels, weight=class_weights, ignore_index=ignore_index)
    if lovasz_weight > 0:
        loss = loss + lovasz_weight * lovasz_softmax(F.softmax(logits, dim=1), labels, ignore_index=ignore_index)
    if not math.isfinite(float(loss.detach())):
        raise Clip2SceneError("segmentation loss is not finite")
    return loss
