"""Segmentation metrics: confusion matrix, per-class IoU and mIoU.

Classes that never occur in ground truth nor in predictions have no IoU (NaN) and are left
out of the mean, as in the nuScenes / SemanticKITTI benchmarks.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class ConfusionMatrix:
    """Accumulates ``matrix[gt, pred]`` counts over many scans; ``ignore_index`` is skipped."""

    num_classes: int
    ignore_index: int = -1
    matrix: np.ndarray = field(init=False)
    #: ground-truth points whose prediction was outside the class range (e.g. -1, dropped)
    missed: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        if self.num_classes <= 0:
            raise ValueError("num_classes must be positive")
        self.matrix = np.zeros((self.num_classes, self.num_classes), dtype=np.int64)
        self.missed = np.zeros(self.num_classes, dtype=np.int64)

    def update(self, pred: np.ndarray, gt: np.ndarray) -> None:
        pred = np.asarray(pred).reshape(-1).astype(np.int64)
        gt = np.asarray(gt).reshape(-1).astype(np.int64)
        if pred.shape != gt.shape:
            raise ValueError(f"prediction has {pred.size} labels but ground truth has {gt.size}")
        keep = (gt != self.ignore_index) & (gt >= 0) & (gt < self.num_classes)
        pred, gt = pred[keep], gt[keep]
        # A prediction outside the class range (e.g. -1 for a dropped point) counts as wrong:
        # it is accumulated in no column, so it lowers recall without inflating any class.
        ok = (pred >= 0) & (pred < self.num_classes)
        self.matrix += np.bincount(gt[ok] * self.num_classes + pred[ok],
                                   minlength=self.num_classes ** 2).reshape(self.num_classes, -1)
        self.missed += np.bincount(gt[~ok], minlength=self.num_classes)

    def merge(self, other: "ConfusionMatrix") -> None:
        self.matrix += other.matrix
        self.missed += other.missed

    def iou(self) -> np.ndarray:
        """Per-class IoU = TP / (TP + FP + FN); NaN for classes absent from gt and pred."""
        tp = np.diag(self.matrix).astype(np.float64)
        fp = self.matrix.sum(axis=0) - tp
        fn = self.matrix.sum(axis=1) - tp + self.missed
        denom = tp + fp + fn
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(denom > 0, tp / np.maximum(denom, 1), np.nan)

    def miou(self) -> float:
        iou = self.iou()
        return float(np.nanmean(iou)) if np.any(~np.isnan(iou)) else float("nan")

    def accuracy(self) -> float:
        total = self.matrix.sum() + int(np.sum(self.missed))
        return float(np.trace(self.matrix) / total) if total else float("nan")

    def table(self, class_names: list[str] | None = None) -> str:
        """Plain-text per-class IoU table for logs and reports."""
        names = class_names or [str(i) for i in range(self.num_classes)]
        iou = self.iou()
        width = max(len(n) for n in names) + 2
        lines = [f"{'class':<{width}} {'IoU':>7} {'points':>10}"]
        support = self.matrix.sum(axis=1) + self.missed
        for n, v, s in zip(names, iou, support):
            lines.append(f"{n:<{width}} {('   n/a' if np.isnan(v) else f'{100 * v:6.2f}'):>7} {int(s):>10}")
        lines.append(f"{'mIoU':<{width}} {100 * self.miou():7.2f}")
        return "\n".join(lines)
