"""CLIP2Scene training losses (Chen et al., CVPR 2023), Lovász-softmax for fine-tuning and for
class-imbalance handling on the pre-training pseudo-labels.

Over ~400 lines: each loss and its released-code variants (training recipes ``released`` /
``paper``, ``training.engine.config``) share one config and the same helpers; splitting them
would scatter one equation over modules.

Equation numbers are those of the CVPR 2023 paper (Sec. 3.2). Where the released code
(github.com/runnanchen/CLIP2Scene, ``pretrain/lightning_trainer.py``, ``model/fusionNet.py``)
does something else, the paper is the default and the released behaviour is an option — with
one exception, the form of Eq. 1 (below), where the printed form is an option.

* Semantic Consistency Regularization (SCR, Eq. 1) on the head that classifies at inference
  (our ``local`` head; the released SPVCNN calls it ``point_mapping_global``): points get the
  MaskCLIP pseudo-label of their pixel; the text embedding t_c is contrasted against the
  points: positives are the points labelled c, negatives the points of other labels (never
  points of the same label), D/τ with τ = 0.5. As printed, Eq. 1 has one log term per class,
  summed over classes, with all positives inside one log:

      L = -Σ_c log( Σ_{i: y_i=c} exp(D(t_c,p_i)/τ) / Σ_j exp(D(t_c,p_j)/τ) )

  (the paper's denominator shows only the negatives j ∉ c; with the positives included it is
  the InfoNCE log-probability that t_c picks a point of its class) — ``ScrConfig.form =
  "per_class"``. The default, ``"per_point"``, keeps the same anchors, positives, negatives and
  τ but gives every point its own term (its positive against all negatives of its text),
  averaged over points: in the annotation-free learning proof (test_learning_proof.py, seeds
  0/1/2) the printed form lifts the local head to 5.2/3.3/2.5 % mIoU against 8.2/10.1/8.8 %
  for the per-point form (averaging over classes instead of summing: 7.6/3.5/6.2 %) — the
  log of a sum is satisfied once a few points of a class match its text, and every point must.
  The released code trains this head with cross-entropy over the text classifier instead
  (``variant = "cross_entropy"``; its ``semantic_NCELoss`` is a point-pixel InfoNCE with
  same-label pairs removed and is not used).
* Semantic-guided Spatial-Temporal Consistency Regularization (SSR, Eq. 2–4) on the other head:
  key frame and sweeps (aligned into the key frame by ego poses) are cut into a grid; in cell
  g_n the pixel features x and point features p of its pixel-point pairs are fused,
      f_n = Σ a_i x_i + b_i p_i,  a_i, b_i = softmax over all pixels *and* points of the cell
      of D(·, t)/λ (Eq. 3–4, λ = 1),
  and every point of the cell is pulled to f_n by  L = Σ_n Σ_{i∈g_n} (1 - sigmoid(D(p_i, f_n))) / N
  with N the number of cells (Eq. 2).
* Class imbalance on the pseudo-labels (not in the paper, off by default; ``ScrConfig``):
  ``class_weights`` weighs the SCR terms by the inverse (square root of the) pseudo-label
  frequency of the batch, ``lovasz_weight`` adds a Lovász-softmax term on the SCR head's
  text classifier against the same targets. Without either, rare classes (poles, signs,
  trunks) end at 0 IoU in the oracle-teacher benchmark (benchmarks/learning_oracle.py).
* Switchable self-training (Sec. 3.2.3): from ``switch_epoch`` on (paper: after 10 epochs) the
  SCR targets are, by a coin, the pixel pseudo-labels or the point head's own predictions.

D is the scalar product of L2-normalised features (cosine) throughout; the released code uses
raw dot products of unnormalised features. Everything here is pure torch on whatever device
the inputs live on.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import Clip2SceneError
from .imbalance import CLASS_WEIGHTS, class_balance_weights, lovasz_softmax

__all__ = [
    "ScrConfig", "SsrConfig", "SelfTrainingConfig",
    "cosine_logits", "scr_contrastive_loss", "scr_cross_entropy_loss", "semantic_consistency_loss",
    "grid_partition", "grid_labels", "first_in_cell", "text_guided_fusion", "ssr_loss", "ssr_pair_loss",
    "switchable_targets", "lovasz_softmax", "segmentation_loss", "CLASS_WEIGHTS", "class_balance_weights",
    "pseudo_label_lovasz",
]


# ----------------------------------------------------------------------------- configs
@dataclass
class ScrConfig:
    """Semantic Consistency Regularization (Eq. 1) on the local head."""

    enabled: bool = True
    variant: Literal["contrastive", "cross_entropy"] = "contrastive"   # released code: cross_entropy
    temperature: float = 0.5          # τ of Eq. 1 (paper: 0.5)
    form: Literal["per_point", "per_class"] = "per_point"   # one term per point / Eq. 1 as printed
    ce_temperature: float = 0.07      # logit scale of the CE-over-text variant
    # logits of the CE variant: cosine / ce_temperature, or "dot": the released code's raw
    # scalar product of the point feature and the (unit) text embedding, scale 1
    ce_logits: Literal["cosine", "dot"] = "cosine"
    weight: float = 1.0
    # class-imbalance handling on the pseudo-labels (not in the paper; off by default):
    # per-point weights of the SCR term from the batch's pseudo-label frequencies, and a
    # Lovász-softmax term (Berman et al. 2018) on softmax(cos(point, text) / lovasz_temperature)
    class_weights: Literal["none", "inverse_sqrt_freq", "inverse_freq"] = "none"
    lovasz_weight: float = 0.0
    lovasz_temperature: float = 0.07

    def __post_init__(self) -> None:
        if self.temperature <= 0 or self.ce_temperature <= 0 or self.lovasz_temperature <= 0:
            raise ValueError("temperatures must be positive")
        if self.form not in ("per_class", "per_point"):
            raise ValueError(f"unknown SCR form {self.form!r}")
        if self.ce_logits not in ("cosine", "dot"):
            raise ValueError(f"unknown SCR ce_logits {self.ce_logits!r}")
        if self.class_weights not in CLASS_WEIGHTS:
            raise ValueError(f"unknown class_weights {self.class_weights!r} (one of {', '.join(CLASS_WEIGHTS)})")
        if not (isinstance(self.lovasz_weight, (int, float)) and math.isfinite(self.lovasz_weight)
                and self.lovasz_weight >= 0):
            raise ValueError(f"lovasz_weight must be a finite number >= 0, got {self.lovasz_weight!r}")


@dataclass
class SsrConfig:
    """Semantic-guided Spatial-Temporal Consistency Regularization (Eq. 2–4) on the global head."""

    enabled: bool = True
    weight: float = 1.0
    lam: float = 1.0                  # λ of the text-guided attention, Eq. 4 (paper: 1)
    grid_size: float = 1.0            # metres; cell edge of the spatial-temporal partition
    # Eq. 2: per-point distance 1 - sigmoid(D(p, f_n)) (paper and released code); "cosine" is
    # 1 - cos(p, f_n), which reaches 0 and has a larger gradient
    similarity: Literal["sigmoid_dot", "cosine"] = "sigmoid_dot"
    # Eq. 2 divides the sum over the cells' points by N, the number of cells ("cells");
    # "points" averages over the points instead; "slots" divides by N * max_members, as the
    # released code's mean over its packed (cell, slot) table does (empty slots add a constant)
    normalize: Literal["cells", "points", "slots"] = "cells"
    # Eq. 2 sums over pixel-point pairs: key-frame points without a pixel stay out unless this
    # is set (sweep points without a pixel enter SSR as point members; with
    # data.sweeps_to_keyframe_cameras those a key-frame camera sees are pairs)
    unpaired_points: bool = False
    detach_target: bool = False       # stop gradients through the fused cell feature
    # "cell": Eq. 2-4 over grid cells; "pair": the released ScanNet loss, the mean over
    # pixel-point pairs of 1 - cos(pixel feature, point feature) (no cells, no fusion)
    form: Literal["cell", "pair"] = "cell"
    # members fused into f_n (Eq. 3): the cell's pixel *and* point features (the paper), or
    # its point features only (the released code loads the pixels but fuses the points)
    features: Literal["fused", "points"] = "fused"
    # D of Eq. 2-4: cosine of L2-normalised features, or "dot": raw scalar products of
    # unnormalised point features (the released code; the text embeddings stay unit vectors)
    metric: Literal["cosine", "dot"] = "cosine"
    max_members: int | None = None    # keep the first k points of each cell (released: 8)

    def __post_init__(self) -> None:
        if self.lam <= 0 or self.grid_size <= 0:
            raise ValueError("lam and grid_size must be positive")
        if self.form not in ("cell", "pair") or self.features not in ("fused", "points") \
                or self.metric not in ("cosine", "dot"):
            raise ValueError(f"unknown SSR form {self.form!r}, features {self.features!r} or metric {self.metric!r}")
        if self.max_members is not None and self.max_members < 1:
            raise ValueError(f"max_members must be >= 1 or null, got {self.max_members}")
        if self.normalize == "slots" and self.max_members is None:
            raise ValueError("normalize 'slots' needs max_members (the slots per cell)")
        if self.similarity not in ("sigmoid_dot", "cosine") or self.normalize not in ("cells", "points", "slots"):
            raise ValueError(f"unknown SSR similarity {self.similarity!r} or normalize {self.normalize!r}")


@dataclass
class SelfTrainingConfig:
    """Switchable self-training (Sec. 3.2.3): from ``switch_epoch`` on (paper: after 10 epochs),
    targets alternate between the pixel pseudo-labels and the point network's own predictions
    with ``probability`` (released code: one coin per step, 0.5)."""

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
                         temperature: float = 0.5, ignore_index: int = -1,
                         form: Literal["per_point", "per_class"] = "per_point",
                         class_weights: Tensor | None = None) -> Tensor:
    """Semantic-driven contrastive loss of Eq. 1, anchored on the text embeddings.

    With s_jc = D(p_j, t_c)/τ (D = cosine) over the labelled points j:

    ``per_class`` (Eq. 1 as printed): one term per class c present, summed over classes,

        L = -Σ_c log( Σ_{i: y_i=c} exp(s_ic) / Σ_j exp(s_jc) )

    i.e. the InfoNCE log-probability that t_c picks a point of class c among all points
    (the paper's denominator prints only the negatives j: y_j ≠ c; here the positives are
    included so that the term is a log-probability).

    ``per_point`` (default, see the module docstring for why): one term per point, averaged
    over points, its own positive against all negatives of its class's text (other positives
    are left out of its denominator):

        L = -1/M Σ_i log( exp(s_ic_i) / (exp(s_ic_i) + Σ_{j: y_j≠c_i} exp(s_jc_i)) )

    Points with ``ignore_index`` take no part. O(N·K). ``class_weights`` (K,) weigh the
    terms by class: the per-class terms are multiplied by w_c, the per-point mean becomes
    Σ_i w_{c_i} L_i / Σ_i w_{c_i}.
    """
    _check_labels(point_feats, text_emb, labels)
    keep = labels != ignore_index
    if not bool(keep.any()):
        return _zero(point_feats)
    sim = cosine_logits(point_feats, text_emb) / temperature            # (N, K)
    lab = labels.clamp_min(0)
    num_classes = text_emb.shape[0]
    is_class = keep[:, None] & (lab[:, None] == torch.arange(num_classes, device=lab.device)[None])
    if form == "per_class":
        present = torch.nonzero(is_class.any(dim=0)).squeeze(1)          # classes with a point
        s_p = sim[:, present]
        pos = is_class[:, present]
        lse_pos = torch.logsumexp(s_p.masked_fill(~pos, float("-inf")), dim=0)
        lse_all = torch.logsumexp(s_p.masked_fill(~keep[:, None], float("-inf")), dim=0)
        if class_weights is not None:
            return ((lse_all - lse_pos) * class_weights.to(sim.dtype)[present]).sum()
        return (lse_all - lse_pos).sum()
    if form != "per_point":
        raise ValueError(f"unknown SCR form {form!r}")
    # negatives of class k: kept points whose label is not k (ignored points are negatives of
    # nothing, so they do not move).
    neg_mask = keep[:, None] & ~is_class
    neg_logits = sim.masked_fill(~neg_mask, float("-inf"))
    neg_lse = torch.logsumexp(neg_logits, dim=0)                       # (K,) log Σ_j exp
    pos = sim.gather(1, lab[:, None]).squeeze(1)                       # (N,)
    denom = torch.logaddexp(pos, neg_lse[lab])                         # -inf + x = x
    loss = (denom - pos)[keep]
    if class_weights is not None:
        w = class_weights.to(loss.dtype)[lab[keep]]
        return (loss * w).sum() / w.sum()
    return loss.mean()


def scr_cross_entropy_loss(point_feats: Tensor, text_emb: Tensor, labels: Tensor,
                           temperature: float = 0.07, ignore_index: int = -1,
                           class_weights: Tensor | None = None,
                           logits_form: Literal["cosine", "dot"] = "cosine") -> Tensor:
    """Released-code variant: cross-entropy over the text classifier. ``logits_form="dot"``
    is the released code's raw dot product with the unit text embeddings (logit scale 1);
    ``"cosine"``: cosine / ``temperature``. ``class_weights``: the weighted mean of
    ``F.cross_entropy``."""
    _check_labels(point_feats, text_emb, labels)
    if not bool((labels != ignore_index).any()):
        return _zero(point_feats)
    if logits_form == "dot":
        logits = point_feats @ F.normalize(text_emb, dim=-1).t()
    else:
        logits = cosine_logits(point_feats, text_emb) / temperature
    w = None if class_weights is None else class_weights.to(logits.dtype)
    return F.cross_entropy(logits, labels, weight=w, ignore_index=ignore_index)


def semantic_consistency_loss(point_feats: Tensor, text_emb: Tensor, labels: Tensor,
                              cfg: ScrConfig, ignore_index: int = -1) -> Tensor:
    """SCR with the variant chosen in ``cfg`` (not multiplied by ``cfg.weight``), its terms
    weighted by ``cfg.class_weights`` from the pseudo-label counts of ``labels``; without the
    Lovász term (``pseudo_label_lovasz``)."""
    w = class_balance_weights(labels, text_emb.shape[0], cfg.class_weights, ignore_index)
    if cfg.variant == "contrastive":
        return scr_contrastive_loss(point_feats, text_emb, labels, cfg.temperature, ignore_index, cfg.form,
                                    class_weights=w)
    return scr_cross_entropy_loss(point_feats, text_emb, labels, cfg.ce_temperature, ignore_index,
                                  class_weights=w, logits_form=cfg.ce_logits)


def pseudo_label_lovasz(point_feats: Tensor, text_emb: Tensor, labels: Tensor, temperature: float = 0.07,
                        ignore_index: int = -1) -> Tensor:
    """Lovász-softmax (``lovasz_softmax``) of the text classifier softmax(cos(p, t) / τ)
    against the pseudo-labels: a surrogate of 1 − IoU of every pseudo-label class present,
    so rare classes (poles, signs) weigh as much as road and vegetation."""
    _check_labels(point_feats, text_emb, labels)
    probs = F.softmax(cosine_logits(point_feats, text_emb) / temperature, dim=1)
    return lovasz_softmax(probs, labels, ignore_index=ignore_index)


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


def first_in_cell(cells: Tensor, k: int | None) -> Tensor:
    """(N,) bool: the first ``k`` rows (in row order) of every cell; all rows when ``k`` is
    None. The released code packs at most 8 pixel-point pairs per voxel the same way."""
    if k is None or cells.numel() == 0:
        return torch.ones_like(cells, dtype=torch.bool)
    order = torch.sort(cells, stable=True).indices
    sc = cells[order]
    pos = torch.arange(sc.numel(), device=cells.device)
    start = torch.ones_like(sc, dtype=torch.bool)
    start[1:] = sc[1:] != sc[:-1]
    first = torch.cummax(torch.where(start, pos, torch.zeros_like(pos)), dim=0).values
    keep = torch.empty_like(start)
    keep[order] = (pos - first) < k
    return keep


def _segment_softmax(logits: Tensor, group: Tensor, num_groups: int) -> Tensor:
    gmax = torch.full((num_groups,), float("-inf"), device=logits.device, dtype=logits.dtype)
    gmax = gmax.scatter_reduce(0, group, logits, reduce="amax", include_self=True)
    ex = torch.exp(logits - gmax[group])
    den = torch.zeros(num_groups, device=logits.device, dtype=logits.dtype).index_add(0, group, ex)
    return ex / den[group]


def text_guided_fusion(members: Tensor, group: Tensor, group_text: Tensor, lam: float = 1.0,
                       normalize: bool = True) -> Tensor:
    """Eq. 3–4: f_n = Σ_m softmax_m(D(x_m, t_n)/λ) x_m over the members m of cell n.

    ``members`` (M, D) are the pixel *and* point features of the cell's pairs, all in one
    softmax (Eq. 4: the a's of the pixels and the b's of the points share one denominator, so
    Σa + Σb = 1); ``group`` (M,) their cell, ``group_text`` (G, D) the text embedding of the
    cell's semantic label. Members are L2-normalised (D = cosine), so f_n lies in the unit
    ball. λ → ∞ gives the plain mean, λ → 0 the member closest to the text. Returns (G, D);
    cells without members get zeros.

    The paper writes the text per pair (t_i); here a cell has one text, that of the majority
    pseudo-label of its pairs (:func:`grid_labels`); the released code takes one text per cell
    too (the label of one of its pairs) and fuses only the point features, unnormalised
    (``normalize=False``: D is then the raw scalar product with the unit text).
    """
    num_groups = group_text.shape[0]
    x = F.normalize(members, dim=-1) if normalize else members
    t = F.normalize(group_text, dim=-1)
    att = _segment_softmax((x * t[group]).sum(-1) / lam, group, num_groups)
    fused = torch.zeros(num_groups, members.shape[1], device=members.device, dtype=members.dtype)
    return fused.index_add(0, group, att[:, None] * x)


def ssr_loss(point_feats: Tensor, cells: Tensor, pixel_feats: Tensor, pixel_cells: Tensor,
             cell_labels: Tensor, text_emb: Tensor, cfg: SsrConfig, ignore_index: int = -1) -> Tensor:
    """Eq. 2: L = Σ_n Σ_{i∈g_n} (1 - sigmoid(D(p_i, f_n))) / N over the labelled cells g_n.

    ``point_feats`` (N, D) SSR-head features of the points taking part (key-frame points with
    a pixel, and sweep points) and their ``cells``; ``pixel_feats`` (P, D) teacher features of
    the pixels of the paired points, in ``pixel_cells``; ``cell_labels`` (G,) from
    :func:`grid_labels`. Cells without a label are skipped. f_n is :func:`text_guided_fusion`
    of the cell's pixels and points (Eq. 3–4), not detached unless ``cfg.detach_target``.

    ``cfg.similarity = "cosine"`` replaces 1 - sigmoid(D) by 1 - cos(p_i, f_n);
    ``cfg.normalize = "points"`` divides by the number of points instead of cells;
    ``cfg.features = "points"`` fuses the point features only; ``cfg.metric = "dot"`` takes
    D as the raw scalar product (unnormalised points). ``cfg.form`` and ``cfg.max_members``
    are the caller's (``ssr_pair_loss``, :func:`first_in_cell`).
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
    if cfg.features == "points":
        members, group = pt_feats, pt_cells
    else:
        members, group = torch.cat([px_feats, pt_feats], dim=0), torch.cat([px_cells, pt_cells], dim=0)
    cosine = cfg.metric == "cosine"
    fused = text_guided_fusion(members, group, group_text, cfg.lam, normalize=cosine)
    if cfg.detach_target:
        fused = fused.detach()
    target = fused[pt_cells]
    if cfg.similarity == "cosine":
        dist = 1.0 - F.cosine_similarity(pt_feats, target, dim=-1)
    else:
        p = F.normalize(pt_feats, dim=-1) if cosine else pt_feats
        dist = 1.0 - torch.sigmoid((p * target).sum(-1))
    if cfg.normalize == "points":
        return dist.mean()
    num_cells = int(torch.unique(pt_cells).numel())      # N: the cells that hold points
    if cfg.normalize == "slots":
        return dist.sum() / (num_cells * int(cfg.max_members or 1))
    return dist.sum() / num_cells


def ssr_pair_loss(point_feats: Tensor, pixel_feats: Tensor) -> Tensor:
    """``SsrConfig.form = "pair"``, the released ScanNet spatial loss: the mean over
    pixel-point pairs (rows aligned) of 1 - cos(pixel feature, point feature)."""
    if point_feats.shape != pixel_feats.shape:
        raise Clip2SceneError(f"SSR pairs: point {tuple(point_feats.shape)} and pixel "
                              f"{tuple(pixel_feats.shape)} features must align")
    if point_feats.shape[0] == 0:
        return _zero(point_feats)
    return (1.0 - F.cosine_similarity(pixel_feats.to(point_feats.dtype), point_feats, dim=1)).mean()


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
