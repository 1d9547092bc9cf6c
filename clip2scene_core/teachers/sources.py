"""Shared pieces of the file-backed teachers: finding a view's file, class unit vectors."""
from __future__ import annotations

import glob as _glob
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigError
from .base import TeacherError, TeacherView, state_fingerprint

Locator = str | Callable[[TeacherView], "str | Path"]


def class_unit_vectors(num_classes: int, dim: int | None = None, seed: int = 0) -> torch.Tensor:
    """(K, D) fixed unit vectors, one per class: the identity when D = K (one-hot),
    orthonormal random directions when D > K, random unit vectors when D < K.

    They stand in for text embeddings when the teacher's knowledge is class labels: the
    pseudo-label of a pixel is then exactly its class, and the 3D network learns to point each
    point at its class's vector."""
    if num_classes < 1:
        raise ConfigError("a label teacher needs at least one class")
    dim = num_classes if dim is None else int(dim)
    if dim < 2:
        raise ConfigError(f"embed_dim must be >= 2, got {dim}")
    if dim == num_classes:
        return torch.eye(num_classes)
    g = torch.Generator().manual_seed(int(seed))
    if dim > num_classes:
        q, _ = torch.linalg.qr(torch.randn(dim, num_classes, generator=g, dtype=torch.float64))
        return q.t().float().contiguous()
    return torch.nn.functional.normalize(torch.randn(num_classes, dim, generator=g), dim=1)


class SourceLocator:
    """``view`` → the one file a teacher reads for it.

    ``locate`` is a pattern relative to ``root`` with the fields ``{token}``, ``{camera}``,
    ``{scene}``, ``{stamp_ns}`` and optional glob wildcards (``frame{token}-*.png``); it must
    match exactly one file. Or a callable ``view -> path``.
    """

    def __init__(self, root: str | Path | None, locate: Locator, what: str) -> None:
        self.root = Path(root) if root is not None else None
        if self.root is not None and not self.root.is_dir():
            raise FileNotFoundError(f"{what} folder not found: {self.root}")
        if not (isinstance(locate, str) or callable(locate)):
            raise ConfigError(f"{what}: locate must be a path pattern or a callable, got {type(locate).__name__}")
        self.locate = locate
        self.what = what

    def identity(self) -> str:
        """Only a callable's code counts: the file's bytes are in the per-view digest."""
        return "pattern" if isinstance(self.locate, str) else state_fingerprint(self.locate)

    def __call__(self, view: TeacherView) -> Path:
        if not view.token and isinstance(self.locate, str) and "{token}" in self.locate:
            raise TeacherError(f"{self.what}: the sample has no token, so '{self.locate}' cannot name its file")
        if callable(self.locate):
            path = Path(self.locate(view))
            if self.root is not None and not path.is_absolute():
                path = self.root / path
            if not path.is_file():
                raise TeacherError(f"{self.what} for sample '{view.token}' camera '{view.camera}' not found: {path}")
            return path
        try:
            rel = self.locate.format(**view.fields())
        except (KeyError, IndexError, ValueError) as exc:
            raise ConfigError(f"{self.what}: bad pattern '{self.locate}' (fields: token, camera, scene, "
                              f"stamp_ns): {exc}") from exc
        full = Path(rel) if self.root is None or Path(rel).is_absolute() else self.root / rel
        if _glob.has_magic(str(full)):
            matches = sorted(Path(p) for p in _glob.glob(str(full)))
        else:
            matches = [full] if full.is_file() else []
        if not matches:
            raise TeacherError(f"{self.what} for sample '{view.token}' camera '{view.camera}' not found: "
                               f"nothing matches {full}")
        if len(matches) > 1:
            raise TeacherError(f"{self.what} for sample '{view.token}' camera '{view.camera}' is ambiguous: "
                               f"{len(matches)} files match {full} ({', '.join(m.name for m in matches[:3])}, ...)")
        return matches[0]


def scaled_pixels(uv: np.ndarray, image_hw: Sequence[int], source_hw: Sequence[int]) -> np.ndarray:
    """(N, 2) integer (col, row) in a source of another resolution (pixel-centre mapping)."""
    H, W = int(image_hw[0]), int(image_hw[1])
    h, w = int(source_hw[0]), int(source_hw[1])
    uv = np.asarray(uv, dtype=np.float64)
    if uv.ndim != 2 or uv.shape[1] != 2:
        raise ConfigError(f"uv must be (N, 2), got {uv.shape}")
    col = np.floor((uv[:, 0] + 0.5) * (w / W)).astype(np.int64)
    row = np.floor((uv[:, 1] + 0.5) * (h / H)).astype(np.int64)
    return np.stack([np.clip(col, 0, w - 1), np.clip(row, 0, h - 1)], axis=1)
