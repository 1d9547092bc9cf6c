"""Cosine classification of backbone features against text embeddings, folded into the heads.

The straightforward path embeds every point with a D = 512 linear head, normalises the
embedding and takes its dot product with the K text embeddings: O(F·D) per row plus a D-wide
gather to every point. But for a head z = W f + b and unit text embeddings e_k

    z · e_k   = f · (W^T e_k) + b · e_k                      → a (K, F) matrix and a (K,) bias
    |z|^2     = f^T (W^T W) f + 2 (W^T b) · f + |b|^2         → an (F, F) quadratic form

so the exact cosine logits cost O(F·K + F²) per row, with F the backbone width (16–96) and K
the classes, and nothing D-wide is ever materialised. With a voxel backbone the rows are
voxels (every point of a voxel shares its features): labels are computed per voxel and
gathered to points last. ``head="both"`` (normalise each head, add, normalise again) folds the
same way with the cross term z_l · z_g. Folded once per vocabulary, in float64.

An open-vocabulary query is one more text embedding folded with the vocabulary's: its column of
logits against the class columns gives a per-row relevance (`query_relevance`, the query's
softmax probability among the classes that are not the query itself, `query_negatives`).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

_EPS = 1e-12   # F.normalize's: norms below it are clamped


@dataclass
class _Folded:
    M: torch.Tensor      # (K, F)  E W
    c: torch.Tensor      # (K,)    E b
    G: torch.Tensor      # (F, F)  W^T W
    h: torch.Tensor      # (F,)    W^T b   (counted twice in |z|^2)
    bb: torch.Tensor     # ()      |b|^2

    @classmethod
    def of(cls, head: nn.Linear, emb: torch.Tensor) -> "_Folded":
        W = head.weight.detach().double()
        b = head.bias.detach().double() if head.bias is not None else W.new_zeros(W.shape[0])
        E = emb.detach().double()
        return cls(E @ W, E @ b, W.t() @ W, W.t() @ b, b @ b)

    def numerator(self, f: torch.Tensor) -> torch.Tensor:
        return f @ self.M.t() + self.c

    def norm(self, f: torch.Tensor) -> torch.Tensor:
        sq = ((f @ self.G) * f).sum(dim=1) + 2.0 * (f @ self.h) + self.bb
        return sq.clamp_min(0.0).sqrt().clamp_min(_EPS)


class FoldedClassifier:
    """Exact cosine logits ``scale · normalize(head(f)) @ emb.T`` without computing head(f).

    ``head`` is ``"local"``, ``"global"`` or ``"both"`` (the Segmenter's head roles);
    ``emb`` (K, D) must be unit rows, as the Segmenter stores them.
    """

    def __init__(self, local: nn.Linear, global_: nn.Linear, emb: torch.Tensor, head: str,
                 scale: float, dtype: torch.dtype = torch.float32) -> None:
        self.head, self.scale, self.dtype = head, float(scale), dtype
        device = emb.device
        folds = []
        if head in ("local", "both"):
            folds.append(_Folded.of(local, emb))
        if head in ("global", "both"):
            folds.append(_Folded.of(global_, emb))
        if not folds:
            raise ValueError(f"unknown head {head!r}")
        self._folds = [_Folded(*(t.to(device=device, dtype=dtype) for t in vars(fd).values()))
                       for fd in folds]
        if head == "both":
            # z_l · z_g = f^T W_l^T W_g f + (W_l^T b_g + W_g^T b_l) · f + b_l · b_g
            Wl, Wg = local.weight.detach().double(), global_.weight.detach().double()
            bl = local.bias.detach().double() if local.bias is not None else Wl.new_zeros(Wl.shape[0])
            bg = global_.bias.detach().double() if global_.bias is not None else Wg.new_zeros(Wg.shape[0])
            self._cross = [t.to(device=device, dtype=dtype)
                           for t in (Wl.t() @ Wg, Wl.t() @ bg + Wg.t() @ bl, bl @ bg)]

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """(R, K) scaled cosine logits of (R, F) backbone rows."""
        f = features.to(self.dtype)
        if self.head != "both":
            fd = self._folds[0]
            return self.scale * fd.numerator(f) / fd.norm(f)[:, None]
        (fl, fg), (C, u, w) = self._folds, self._cross
        nl, ng = fl.norm(f), fg.norm(f)
        cos_lg = (((f @ C) * f).sum(dim=1) + f @ u + w) / (nl * ng)
        s_norm = (2.0 + 2.0 * cos_lg).clamp_min(0.0).sqrt().clamp_min(_EPS)
        num = fl.numerator(f) / nl[:, None] + fg.numerator(f) / ng[:, None]
        return self.scale * num / s_norm[:, None]


def query_negatives(class_names: Sequence[str], emb: torch.Tensor, text: str,
                    query: torch.Tensor, same: float = 1.0 - 1e-6) -> torch.Tensor:
    """(K,) bool: the vocabulary classes a query is weighed against.

    Every class except those that *are* the query: the same name (case-insensitive) or the
    same text embedding (cosine ≥ ``same``). A query for "car" with "car" in the vocabulary
    then gets the probability the segmenter gives "car" instead of half of it.
    """
    name = text.strip().lower()
    by_name = torch.tensor([str(n).strip().lower() == name for n in class_names],
                           dtype=torch.bool, device=emb.device)
    q = query.reshape(1, -1).to(device=emb.device, dtype=emb.dtype)
    by_emb = (emb @ q.t()).reshape(-1) >= same
    return ~(by_name | by_emb)


def query_relevance(logits: torch.Tensor, query_logit: torch.Tensor,
                    negatives: torch.Tensor) -> torch.Tensor:
    """(R,) float32 in [0, 1]: the softmax probability of the query among the query plus the
    ``negatives`` classes, from (R, K) class logits and (R,) query logits (same scale).

    ``exp(q) / (exp(q) + Σ_k exp(l_k)) = sigmoid(q − logsumexp(l))``, computed in that
    stable form; with no negative class it is 1.
    """
    q = query_logit.float().reshape(-1)
    if not bool(negatives.any()):
        return torch.ones_like(q)
    return torch.sigmoid(q - torch.logsumexp(logits[:, negatives].float(), dim=1))
