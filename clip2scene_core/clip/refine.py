"""MaskCLIP's two training-free refinements of dense predictions (Zhou et al., ECCV 2022, §3.2).

* **Key smoothing.** MaskCLIP's dense predictions are noisy patch by patch, while the *keys*
  of the last attention block group patches of one object well (that is what attention
  matches on). Each patch's prediction is replaced by a weighted mean over the patches whose
  L2-normalised keys are similar to its own (cosine ≥ ``threshold``, optionally only the
  ``top_k`` most similar, weights = cosine or ``exp((cos - 1) / temperature)``). Each row of
  weights sums to one, so a constant map stays constant.
* **Prompt denoising.** With many candidate classes, classes absent from the image still win
  scattered patches. A class whose confidence (softmax over classes of the scaled cosine
  scores) stays below ``threshold`` (0.5 in the paper) at *every* pixel of an image is
  removed from that image's candidates (score -inf before the argmax). The class holding the
  image's highest confidence is always kept, so every pixel keeps a label.

Both work on (C, h, w) maps or batches (B, C, h, w); nothing here knows about CLIP models.
Key smoothing compares all pairs of patches: O((h·w)²) memory and time per image (a nuScenes
frame at the teacher's default 224-pixel short side has 25×14 = 350 patches).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import ConfigError

__all__ = ["KeySmoothing", "key_smoothing", "smoothing_weights", "smooth_features", "class_confidence", "kept_classes",
           "prompt_denoise", "CLIP_LOGIT_SCALE"]

#: CLIP's learnt logit scale (clamped to 100 in training): the softmax temperature of its scores
CLIP_LOGIT_SCALE = 100.0


@dataclass
class KeySmoothing:
    """Key smoothing of the teacher's dense features (off by default).

    ``threshold``: smallest key cosine that contributes (the patch itself always does).
    ``top_k``: keep at most this many most similar patches per patch (None: all above the
    threshold). ``temperature``: None weighs neighbours by their cosine; a value T weighs them
    by ``exp((cos - 1) / T)`` (sharper for small T). Not tuned on real CLIP weights.
    """

    enabled: bool = False
    threshold: float = 0.5
    top_k: int | None = None
    temperature: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.enabled, bool):
            raise ConfigError(f"key_smoothing.enabled must be true or false, got {self.enabled!r}")
        if not -1.0 <= float(self.threshold) <= 1.0:
            raise ConfigError(f"key_smoothing.threshold is a cosine in [-1, 1], got {self.threshold}")
        if self.top_k is not None and int(self.top_k) < 1:
            raise ConfigError(f"key_smoothing.top_k must be >= 1 or None, got {self.top_k}")
        if self.temperature is not None and not float(self.temperature) > 0:
            raise ConfigError(f"key_smoothing.temperature must be > 0 or None, got {self.temperature}")


def _batched(x: Tensor, name: str) -> tuple[Tensor, bool]:
    if x.ndim == 3:
        return x[None], True
    if x.ndim == 4:
        return x, False
    raise ConfigError(f"{name} must be (C, h, w) or (B, C, h, w), got shape {tuple(x.shape)}")


def smoothing_weights(keys: Tensor, threshold: float = 0.5, top_k: int | None = None,
                      temperature: float | None = None) -> Tensor:
    """(B, n, n) row-stochastic weights from (B, Ck, n) keys: row i = how much patch j counts for i."""
    k = F.normalize(keys.float(), dim=1)
    sim = k.transpose(1, 2) @ k                                        # (B, n, n) cosines
    n = sim.shape[-1]
    eye = torch.eye(n, dtype=torch.bool, device=sim.device)
    sim = sim.masked_fill(eye, 1.0)        # a patch always counts for itself (even a zero key)
    keep = sim >= threshold
    if top_k is not None and top_k < n:
        kth = sim.topk(int(top_k), dim=-1).values[..., -1:]
        keep &= sim >= kth
    w = sim.clamp_min(0.0) if temperature is None else torch.exp((sim - 1.0) / float(temperature))
    w = torch.where(keep | eye, w, torch.zeros((), dtype=w.dtype, device=w.device))
    return w / w.sum(dim=-1, keepdim=True)


def key_smoothing(values: Tensor, keys: Tensor, threshold: float = 0.5, top_k: int | None = None,
                  temperature: float | None = None) -> Tensor:
    """``values`` (C, h, w) (features or class scores) averaged over patches with similar keys.

    ``keys``: (Ck, h, w) on the same grid (batches (B, ·, h, w) too). Returns ``values``'
    shape and dtype. Linear in ``values``: smoothing features then taking dot products with
    text embeddings equals smoothing the dot products.
    """
    v, single = _batched(values, "values")
    k, _ = _batched(keys, "keys")
    if k.shape[0] != v.shape[0] or k.shape[2:] != v.shape[2:]:
        raise ConfigError(f"keys {tuple(keys.shape)} and values {tuple(values.shape)} must share the "
                          f"batch and the (h, w) grid")
    b, c, h, w = v.shape
    weights = smoothing_weights(k.flatten(2), threshold, top_k, temperature)
    out = (v.flatten(2).float() @ weights.transpose(1, 2)).reshape(b, c, h, w).to(values.dtype)
    return out[0] if single else out


def smooth_features(features: Tensor, keys: Tensor, cfg: KeySmoothing) -> Tensor:
    """Key smoothing of dense CLIP features, normalised before and after (see ClipTeacher).

    Each patch's feature is L2-normalised first so every neighbour votes with its cosine
    scores at equal weight; the mean is re-normalised, which scales all class scores of a
    patch by one positive factor: the argmax equals that of smoothing the cosine scores.
    """
    f = F.normalize(features.float(), dim=-3)
    out = key_smoothing(f, keys, cfg.threshold, cfg.top_k, cfg.temperature)
    return F.normalize(out, dim=-3)


def class_confidence(scores: Tensor, logit_scale: float = CLIP_LOGIT_SCALE) -> Tensor:
    """Softmax over classes (dim -3) of ``logit_scale`` × scores (cosines); -inf stays 0."""
    s, single = _batched(scores, "scores")
    conf = torch.softmax(float(logit_scale) * s.float(), dim=1)
    return conf[0] if single else conf


def kept_classes(scores: Tensor, threshold: float = 0.5, logit_scale: float = CLIP_LOGIT_SCALE) -> Tensor:
    """(C,) / (B, C) bool: classes whose confidence reaches ``threshold`` at some pixel, plus the
    class of the highest confidence anywhere in the image (so at least one is always kept)."""
    if not 0.0 <= float(threshold) <= 1.0:
        raise ConfigError(f"prompt denoising threshold is a probability in [0, 1], got {threshold}")
    s, single = _batched(scores, "scores")
    if s.shape[1] == 0:
        raise ConfigError("prompt denoising needs at least one class")
    peak = class_confidence(s, logit_scale).flatten(2).amax(dim=2)     # (B, C) best pixel per class
    keep = peak >= threshold
    keep[torch.arange(s.shape[0], device=s.device), peak.argmax(dim=1)] = True
    return keep[0] if single else keep


def prompt_denoise(scores: Tensor, threshold: float = 0.5, logit_scale: float = CLIP_LOGIT_SCALE) -> Tensor:
    """``scores`` (C, h, w) with the classes removed by prompt denoising set to -inf.

    ``scores`` are cosine similarities (or logits divided by ``logit_scale``); pass the scale
    the scores were trained with (CLIP: 100). Kept classes' scores are unchanged.
    """
    keep = kept_classes(scores, threshold, logit_scale)
    mask = keep[..., None, None] if keep.ndim == 1 else keep[:, :, None, None]
    return scores.masked_fill(~mask, float("-inf"))
