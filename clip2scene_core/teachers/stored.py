"""``StoredPredictionTeacher``: saved per-image outputs of any 2D network as the teacher.

Run your 2D network once, save one array per image (``.npy``, ``.npz`` or ``.pt``), and
pre-train from the files: no model code enters training. An array holds either

* ``logits`` / ``probabilities`` over K classes: a pixel's feature is
  ``Σ_k p_k · e_k`` with fixed class unit vectors ``e_k`` (p = softmax(logits / temperature)),
  so the pseudo-label is the network's own argmax and its confidence shapes the feature; or
* ``features`` of dimension D together with the (K, D) class embeddings of the same space
  (e.g. a CLIP-like 2D model's pixel embeddings and its text embeddings).

Arrays are (H', W', C) (``layout="hwc"``) or (C, H', W') (``"chw"``) at any resolution; they
are sampled bilinearly at the points' pixels. NaN pixels give no target.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ConfigError
from .base import TeacherError, TeacherView, array_digest, file_digest, require_known_classes
from .sources import Locator, SourceLocator, class_unit_vectors

__all__ = ["StoredPredictionTeacher", "load_prediction_array"]


def load_prediction_array(path: str | Path, key: str | None = None) -> np.ndarray:
    """The array stored in ``path`` (``.npy``; ``.npz`` by ``key`` or its only array; ``.pt``
    holding a tensor, or a dict with ``key``)."""
    path = Path(path)
    try:
        if path.suffix == ".npy":
            return np.load(path, allow_pickle=False)
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                names = list(z.files)
                if key is None and len(names) != 1:
                    raise TeacherError(f"{path} holds {names}: give the array name (key=...)")
                return z[key or names[0]]
        if path.suffix in (".pt", ".pth"):
            obj = torch.load(path, map_location="cpu", weights_only=True)
            if isinstance(obj, dict):
                if key is None or key not in obj:
                    raise TeacherError(f"{path} holds {sorted(obj)}: give the tensor name (key=...)")
                obj = obj[key]
            if not isinstance(obj, torch.Tensor):
                raise TeacherError(f"{path} does not hold a tensor")
            return obj.float().numpy()
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise TeacherError(f"cannot read stored prediction {path}: {exc}") from exc
    raise TeacherError(f"stored prediction {path}: unsupported file type (use .npy, .npz or .pt)")


class StoredPredictionTeacher:
    """Per-image stored outputs of a 2D network (see the module doc).

    ``locate``/``root``: where the array of a view is (as ``LabelImageTeacher``).
    ``class_names``: the K classes. ``content``: ``"logits"``, ``"probabilities"`` or
    ``"features"``. ``class_embeddings``: (K, D), required for ``"features"``; for the other
    two the default is ``class_unit_vectors(K, embed_dim, seed)``.
    """

    def __init__(self, class_names: Sequence[str], locate: Locator, root: str | Path | None = None, *,
                 content: Literal["logits", "probabilities", "features"] = "logits",
                 layout: Literal["hwc", "chw"] = "chw", class_embeddings: np.ndarray | torch.Tensor | None = None,
                 embed_dim: int | None = None, seed: int = 0, temperature: float = 1.0, key: str | None = None,
                 model_name: str = "stored-prediction") -> None:
        self.class_names = [str(n) for n in class_names]
        if content not in ("logits", "probabilities", "features"):
            raise ConfigError(f"content must be logits, probabilities or features, got {content!r}")
        if layout not in ("hwc", "chw"):
            raise ConfigError(f"layout must be hwc or chw, got {layout!r}")
        if temperature <= 0:
            raise ConfigError(f"temperature must be > 0, got {temperature}")
        if class_embeddings is None:
            if content == "features":
                raise ConfigError("stored features need the class_embeddings (K, D) of their space")
            emb = class_unit_vectors(len(self.class_names), embed_dim, seed)
        else:
            emb = torch.as_tensor(np.asarray(class_embeddings), dtype=torch.float32)
            if emb.ndim != 2 or emb.shape[0] != len(self.class_names):
                raise ConfigError(f"class_embeddings must be ({len(self.class_names)}, D), got {tuple(emb.shape)}")
            emb = F.normalize(emb, dim=1)
        self.class_embeddings = emb
        self.content, self.layout, self.temperature, self.key = content, layout, float(temperature), key
        self.locator = SourceLocator(root, locate, "stored prediction")
        self.model_name = model_name

    @property
    def embed_dim(self) -> int:
        return int(self.class_embeddings.shape[1])

    def identity(self) -> dict[str, Any]:
        return {"kind": "stored-prediction", "classes": self.class_names, "content": self.content,
                "layout": self.layout, "temperature": self.temperature, "key": self.key,
                "class_embeddings": array_digest(self.class_embeddings), "locate": self.locator.identity()}

    def source_digest(self, view: TeacherView) -> str:
        return file_digest(self.locator(view))

    def text_embeddings(self, vocab: Any, templates: Any = None, cache_dir: Any = None) -> torch.Tensor:
        names = getattr(vocab, "class_names", vocab)
        return self.class_embeddings[require_known_classes(list(names), self.class_names,
                                                           "the stored-prediction teacher")]

    def _grid(self, view: TeacherView) -> torch.Tensor:
        path = self.locator(view)
        arr = load_prediction_array(path, self.key)
        if arr.ndim != 3:
            raise TeacherError(f"stored prediction {path}: expected a 3-D array ({self.layout}), got {arr.shape}")
        t = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))
        if self.layout == "hwc":
            t = t.permute(2, 0, 1)
        want = self.embed_dim if self.content == "features" else len(self.class_names)
        if t.shape[0] != want:
            raise TeacherError(f"stored prediction {path}: {t.shape[0]} channels, expected {want} "
                               f"({self.content}, layout {self.layout})")
        return t

    def pixel_features(self, image: np.ndarray, uv: np.ndarray, view: TeacherView) -> torch.Tensor:
        grid = self._grid(view)                                    # (C, h, w)
        H, W = np.asarray(image).shape[:2]
        uv = np.asarray(uv, dtype=np.float64)
        # pixel centres: u ∈ [-0.5, W - 0.5] ↦ [-1, 1] (align_corners=False)
        xy = torch.from_numpy(np.stack([(uv[:, 0] + 0.5) / W * 2 - 1, (uv[:, 1] + 0.5) / H * 2 - 1], 1)).float()
        vals = F.grid_sample(grid[None], xy[None, None], mode="bilinear", padding_mode="border",
                             align_corners=False)[0, :, 0].t()      # (N, C)
        if self.content == "features":
            return vals
        if self.content == "logits":
            probs = torch.softmax(vals / self.temperature, dim=1)
        else:
            probs = vals / vals.sum(1, keepdim=True).clamp_min(1e-12)
        return probs @ self.class_embeddings

    def __repr__(self) -> str:
        return (f"StoredPredictionTeacher({self.content}, {len(self.class_names)} classes, D={self.embed_dim}, "
                f"locate={self.locator.locate!r})")
