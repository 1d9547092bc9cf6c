"""``LabelImageTeacher``: per-pixel class images (a dataset's 2D annotations, or a 2D
segmenter's saved argmax) as the teacher of pre-training.

Each pixel's feature is a fixed unit vector of its class (``class_unit_vectors``); the
"text embedding" of a class is the same vector. Pseudo-labels are therefore exactly the
pixel classes, and pre-training transfers the 2D labels to every point, including those no
camera sees. Unlabelled pixels (values mapped to -1) give no target.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import ConfigError, ImageDecodeError
from .base import TeacherView, array_digest, file_digest, require_known_classes
from .sources import Locator, SourceLocator, class_unit_vectors, scaled_pixels

__all__ = ["LabelImageTeacher", "read_label_image", "rellis3d_label_teacher"]


def read_label_image(path: str | Path) -> np.ndarray:
    """(H, W) integer class image from a single-channel PNG/TIFF (8 or 16 bit) or a ``.npy``."""
    path = Path(path)
    if path.suffix == ".npy":
        arr = np.load(path, allow_pickle=False)
    else:
        import cv2

        arr = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        if arr is None:
            raise ImageDecodeError(f"cannot decode label image {path}")
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.integer):
        raise ImageDecodeError(f"label image {path} must be one integer channel (class ids), got "
                               f"{arr.shape} {arr.dtype}; colour-coded labels must be converted to ids first")
    return arr


def _value_lut(value_to_class: Mapping[int, int] | np.ndarray | None, k: int) -> np.ndarray:
    if value_to_class is None:                      # the pixel value is the class index
        return np.arange(k, dtype=np.int64)
    if isinstance(value_to_class, Mapping):
        if not value_to_class:
            return np.zeros(0, np.int64)
        lut = np.full(max(int(v) for v in value_to_class) + 1, -1, np.int64)
        for v, c in value_to_class.items():
            if int(v) < 0:
                raise ConfigError(f"label value {v} is negative")
            lut[int(v)] = int(c)
    else:
        lut = np.asarray(value_to_class).astype(np.int64).reshape(-1)
    if lut.size and (lut.min() < -1 or lut.max() >= k):
        raise ConfigError(f"value_to_class maps to classes outside [-1, {k - 1}]")
    return lut


class LabelImageTeacher:
    """Class images + a class list as a 2D teacher.

    ``class_names``: the K classes. ``locate``: where the class image of a view is, relative to
    ``root`` (pattern with ``{token}``, ``{camera}``, ``{scene}``, ``{stamp_ns}`` and glob
    wildcards, matching one file; or a callable ``view -> path``). ``value_to_class``: pixel
    value → class index (-1 = unlabelled), a mapping or a lookup array; None when pixel values
    already are class indices. ``embed_dim``: dimension D of the class vectors (default K,
    one-hot); the 3D network's ``model.embed_dim`` must equal it. Class images may have another
    resolution than the camera image (nearest pixel after scaling).
    """

    def __init__(self, class_names: Sequence[str], locate: Locator, root: str | Path | None = None, *,
                 value_to_class: Mapping[int, int] | np.ndarray | None = None, embed_dim: int | None = None,
                 seed: int = 0, model_name: str = "label-image") -> None:
        self.class_names = [str(n) for n in class_names]
        if len(set(self.class_names)) != len(self.class_names):
            raise ConfigError(f"class names must be unique: {self.class_names}")
        self.lut = _value_lut(value_to_class, len(self.class_names))
        self.vectors = class_unit_vectors(len(self.class_names), embed_dim, seed)
        self.locator = SourceLocator(root, locate, "label image")
        self.model_name = model_name

    @property
    def embed_dim(self) -> int:
        return int(self.vectors.shape[1])

    def identity(self) -> dict[str, Any]:
        return {"kind": "label-image", "classes": self.class_names, "value_to_class": array_digest(self.lut),
                "vectors": array_digest(self.vectors), "locate": self.locator.identity()}

    def source_digest(self, view: TeacherView) -> str:
        return file_digest(self.locator(view))

    def text_embeddings(self, vocab: Any, templates: Any = None, cache_dir: Any = None) -> torch.Tensor:
        """The class vectors of the vocabulary's classes (each must be one of ``class_names``)."""
        names = getattr(vocab, "class_names", vocab)
        return self.vectors[require_known_classes(list(names), self.class_names, "the label-image teacher")]

    def pixel_classes(self, image: np.ndarray, uv: np.ndarray, view: TeacherView) -> np.ndarray:
        """(N,) class index of each pixel (-1 = unlabelled), read from the view's class image."""
        labels = read_label_image(self.locator(view))
        px = scaled_pixels(uv, np.asarray(image).shape[:2], labels.shape)
        values = labels[px[:, 1], px[:, 0]].astype(np.int64)
        out = np.full(values.shape, -1, np.int64)
        ok = (values >= 0) & (values < self.lut.size)
        out[ok] = self.lut[values[ok]]
        return out

    def pixel_features(self, image: np.ndarray, uv: np.ndarray, view: TeacherView) -> torch.Tensor:
        cls = torch.from_numpy(self.pixel_classes(image, uv, view))
        feats = torch.zeros(len(cls), self.embed_dim)
        known = cls >= 0
        feats[known] = self.vectors[cls[known]]
        return feats

    def __repr__(self) -> str:
        return f"LabelImageTeacher({len(self.class_names)} classes, D={self.embed_dim}, locate={self.locator.locate!r})"


def rellis3d_label_teacher(root: str | Path, embed_dim: int | None = None, seed: int = 0) -> LabelImageTeacher:
    """RELLIS-3D's 2D annotations as the teacher: ``pylon_camera_node_label_id/frame<token>-*.png``
    (release layout) or ``frame<token>-*.png`` next to the images (flat folder), ontology ids
    mapped to ``RELLIS3D_CLASSES`` (void → unlabelled)."""
    from ..datasets.classes import RELLIS3D_CLASSES, rellis3d_to_index

    root = Path(root)
    sub = root / "pylon_camera_node_label_id"
    folder = sub if sub.is_dir() else root
    lut = rellis3d_to_index(np.arange(1 << 16))
    lut = lut[: int(np.flatnonzero(lut >= 0).max()) + 1]
    return LabelImageTeacher(RELLIS3D_CLASSES, "frame{token}-*.png", folder, value_to_class=lut,
                             embed_dim=embed_dim, seed=seed, model_name="rellis3d-2d-labels")
