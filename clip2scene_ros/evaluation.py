"""Scoring replayed predictions against ground truth: per-class IoU / mIoU of a bag.

`Evaluator` pairs each prediction with the ground truth of the same stamp, whichever comes
first; `load_gt_file` reads ``--gt-dir`` label files. Ground truth from the bag itself arrives
through `clip2scene_ros.frames.FrameSource` (its `GroundTruthSink`).
"""
from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from clip2scene_core.label_spaces import match_classes
from clip2scene_core.metrics import ConfusionMatrix

log = logging.getLogger("clip2scene.replay")


class Evaluator:
    """Pairs predictions and ground truth by stamp and accumulates a confusion matrix.

    Predictions are in the segmenter's class list, ground truth in the dataset's; classes are
    matched by name (``label_spaces.match_classes``), and a predicted class with no
    ground-truth counterpart counts as a miss (named in ``unmatched_pred_classes``). Ground
    truth that cannot be used (unreadable cloud, wrong number of labels, no readable class
    list) is counted per reason in ``skipped``, never dropped silently.
    """

    def __init__(self, gt_class_names: Sequence[str] | None = None) -> None:
        self.gt_class_names: list[str] | None = list(gt_class_names) if gt_class_names else None
        self.cm: ConfusionMatrix | None = None
        self._gt: dict[int, np.ndarray] = {}
        self._pred: dict[int, tuple[np.ndarray, list[str]]] = {}
        self.frames = 0
        self.size_mismatch = 0
        self.unmatched_pred_classes: set[str] = set()
        self.skipped: Counter[str] = Counter()
        self.examples: list[str] = []
        #: a class list was in the bag but none could be read (and none was given)
        self.classes_unreadable = False

    def skip(self, reason: str, example: str = "") -> None:
        """Count one unusable piece of ground truth under ``reason`` (a short, fixed text)."""
        self.skipped[reason] += 1
        if example and len(self.examples) < 10:
            self.examples.append(example)
        log.warning("ground truth skipped: %s%s", reason, f" ({example})" if example else "")

    def set_classes(self, names: Sequence[str]) -> None:
        if self.gt_class_names is None:
            self.gt_class_names = list(names)

    def add_gt(self, stamp: int, labels: np.ndarray) -> None:
        if stamp in self._pred:
            pred, names = self._pred.pop(stamp)
            self._update(pred, names, labels, stamp)
        else:
            self._gt[stamp] = labels

    def add_pred(self, stamp: int, labels: np.ndarray, class_names: Sequence[str]) -> None:
        if stamp in self._gt:
            self._update(labels, list(class_names), self._gt.pop(stamp), stamp)
        else:
            self._pred[stamp] = (labels.astype(np.int32), list(class_names))

    def has_gt(self, stamp: int) -> bool:
        return stamp in self._gt

    def gt_for(self, stamp: int) -> np.ndarray | None:
        return self._gt.get(stamp)

    def _update(self, pred: np.ndarray, names: list[str], gt: np.ndarray, stamp: int = -1) -> None:
        if len(pred) != len(gt):
            self.size_mismatch += 1
            self.skip("wrong length: the ground truth has another number of labels than the "
                      "cloud has points", f"stamp {stamp}: {len(gt)} labels for {len(pred)} points")
            return
        if self.gt_class_names is None:
            if self.classes_unreadable:
                self.skip("no readable class list for the ground truth", f"stamp {stamp}")
                return
            self.gt_class_names = list(names)   # no class list in the bag: assume the model's
        if self.cm is None:
            self.cm = ConfusionMatrix(len(self.gt_class_names))
        lut = np.append(match_classes(names, self.gt_class_names, allow_missing=True,
                                      what="predicted class", among="the ground-truth classes"), -1)
        unmatched = {n for n, j in zip(names, lut) if j < 0} - self.unmatched_pred_classes
        if unmatched:       # reported in the evaluation too; their points count as misses
            log.warning("predicted classes %s have no ground-truth class", sorted(unmatched))
            self.unmatched_pred_classes |= unmatched
        mapped = lut[np.where(pred >= 0, pred, len(names))]
        self.cm.update(mapped, gt)
        self.frames += 1

    @property
    def pending(self) -> int:
        return len(self._pred)

    def result(self) -> dict[str, Any] | None:
        """The evaluation; None when there was no ground truth at all. With ground truth that
        could not be used, ``frames`` is 0 and ``skipped`` says why."""
        if (self.cm is None or self.frames == 0) and not self.skipped:
            return None
        names = self.gt_class_names or []
        ok = self.cm is not None and self.frames > 0
        iou = self.cm.iou() if ok else []
        return {
            "frames": self.frames, "miou": _num(self.cm.miou()) if ok else None,
            "accuracy": _num(self.cm.accuracy()) if ok else None,
            "iou": {n: _num(v) for n, v in zip(names, iou)},
            "points": int(self.cm.matrix.sum() + self.cm.missed.sum()) if ok else 0,
            "frames_without_gt": self.pending, "gt_without_prediction": len(self._gt),
            "size_mismatch": self.size_mismatch,
            "skipped": dict(self.skipped), "skipped_examples": list(self.examples),
            "unmatched_pred_classes": sorted(self.unmatched_pred_classes),
        }


def parse_label_classes(text: Any) -> list[str]:
    """The class list of a /clip2scene/label_classes JSON text; ValueError when it is not one."""
    try:
        data = json.loads(text)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"not JSON ({exc})") from None
    names = data.get("class_names") if isinstance(data, dict) else None
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise ValueError("no 'class_names' list of strings")
    return names


def _num(v: float) -> float | None:
    return None if not np.isfinite(v) else float(v)


def load_gt_file(gt_dir: Path, stamp: int, evaluator: Evaluator) -> None:
    """``<gt_dir>/<stamp>.npy`` (integer labels) or ``.label`` (int32) into ``evaluator``; an
    unreadable file is counted as skipped ground truth, a missing one is no ground truth."""
    for suffix in (".npy", ".label"):
        p = gt_dir / f"{stamp}{suffix}"
        if p.is_file():
            try:
                if suffix == ".npy":
                    arr = np.load(p, allow_pickle=False)
                    if arr.dtype.kind not in "iub":
                        raise ValueError(f"labels must be integers, not {arr.dtype}")
                    arr = arr.reshape(-1)
                else:
                    arr = np.fromfile(p, np.int32)
            except (OSError, ValueError, EOFError) as exc:
                evaluator.skip("unreadable ground-truth file", f"{p}: {str(exc)[:160]}")
                return
            evaluator.add_gt(stamp, arr.astype(np.int64))
            return
