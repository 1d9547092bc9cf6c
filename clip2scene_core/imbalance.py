"""Class-imbalance tools of the losses: Lovász-softmax (Berman et al., CVPR 2018) and
class-balanced weights from label counts.

Used by fine-tuning (CE + Lovász on the 3D labels) and, as options, by pre-training on the
teacher's pseudo-labels (``clip2scene_core.losses.ScrConfig``: ``class_weights``,
``lovasz_weight``), where rare classes (poles, signs, trunks) otherwise end at 0 IoU.
Pure torch on whatever device the inputs live on.
"""
from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from .errors import Clip2SceneError

__all__ = ["CLASS_WEIGHTS", "class_balance_weights", "lovasz_softmax"]

#: per-class weighting modes from label counts n_c (``class_balance_weights``)
CLASS_WEIGHTS = ("none", "inverse_sqrt_freq", "inverse_freq")


def _zero(ref: Tensor) -> Tensor:
    # keeps the graph connected (DDP needs every parameter to receive a gradient)
    return ref.sum() * 0.0


def class_balance_weights(labels: Tensor, num_classes: int, mode: str = "none",
                          ignore_index: int = -1) -> Tensor | None:
    """(K,) class weights from the counts n_c of ``labels`` (the batch's pseudo-labels), or
    None for ``"none"``: ``inverse_sqrt_freq`` w_c ∝ n_c^(-1/2), ``inverse_freq`` w_c ∝ 1/n_c
    (every class present counts as much as any other). Scaled so that the mean weight over
    the labelled points is 1; classes absent from ``labels`` get 0. Not differentiable (counts)."""
    if mode == "none":
        return None
    if mode not in CLASS_WEIGHTS:
        raise ValueError(f"unknown class_weights {mode!r} (one of {', '.join(CLASS_WEIGHTS)})")
    keep = (labels != ignore_index) & (labels >= 0) & (labels < num_classes)
    counts = torch.bincount(labels[keep], minlength=num_classes).to(torch.float64)
    present = counts > 0
    w = torch.zeros(num_classes, dtype=torch.float64, device=labels.device)
    power = 0.5 if mode == "inverse_sqrt_freq" else 1.0
    w[present] = counts[present].pow(-power)
    total = float((w * counts).sum())
    if total > 0:
        w = w * (float(counts.sum()) / total)
    return w.float()


def lovasz_softmax(probs: Tensor, labels: Tensor, classes: Literal["present", "all"] = "present",
                   ignore_index: int = -1) -> Tensor:
    """Lovász-softmax loss (Berman et al., CVPR 2018): a convex surrogate of 1 − IoU per class.

    ``probs`` (N, C) softmax probabilities, ``labels`` (N,). For class c the point errors are
    m_i = |[y_i = c] − p_i(c)|; sorted in decreasing order (π), the loss is the Lovász
    extension of the Jaccard loss Δ_c evaluated at m,

        L_c = Σ_k m_π(k) · (Δ_c(S_k) − Δ_c(S_{k−1})),   Δ_c(S_k) = k / (n_c + k − g_k),

    where S_k is the set of the k largest errors taken as mispredicted, n_c the number of
    points of class c and g_k how many of the first k belong to c: the Jaccard loss of a
    mispredicted set S is |S| / |S ∪ gt_c|, and |S_k ∪ gt_c| = n_c + k − g_k (Δ_c(S_0) = 0).
    On one-hot predictions L_c = 1 − IoU_c exactly. Mean over the classes present in ``labels`` (or all
    classes); points with ``ignore_index`` take no part. All classes at once: O(N log N · C).
    """
    if probs.ndim != 2 or labels.shape != probs.shape[:1]:
        raise Clip2SceneError("lovasz_softmax expects probs (N, C) and labels (N,)")
    keep = labels != ignore_index
    probs, labels = probs[keep], labels[keep]
    if probs.numel() == 0:
        return _zero(probs)
    n, c = probs.shape
    fg = (labels[:, None] == torch.arange(c, device=labels.device)[None]).to(probs.dtype)   # (N, C)
    err, order = torch.sort((fg - probs).abs(), dim=0, descending=True)
    g = fg.gather(0, order).cumsum(0)                                   # g_k per class
    k = torch.arange(1, n + 1, device=probs.device, dtype=probs.dtype)[:, None]
    jaccard = k / (fg.sum(0)[None] + k - g)                             # Δ_c(S_k), k = 1..N
    steps = torch.diff(jaccard, dim=0, prepend=torch.zeros_like(jaccard[:1]))
    per_class = (err * steps).sum(0)                                    # (C,)
    if classes == "present":
        per_class = per_class[fg.sum(0) > 0]
    if per_class.numel() == 0:
        return _zero(probs)
    return per_class.mean()
