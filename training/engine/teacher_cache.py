"""Teacher pass: MaskCLIP runs once per image; pixel features of the pixels hit by points are
cached so training epochs never re-run CLIP.

One cache entry per (sample, camera), content-addressed: the key is a SHA-256 of the teacher
id (model + weights), the image bytes, the calibration, the preprocessing and the projected
points. Changing any of them gives a new key, so a stale entry can never be read, and a pass
that was interrupted simply resumes (entries that exist are skipped). Each entry is written
atomically (temporary file + rename), so a killed pass leaves no half-written file.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path
from typing import Any, Iterable, Protocol, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from clip2scene_core.atomic import atomic_write
from clip2scene_core.errors import Clip2SceneError
from clip2scene_core.geometry import project_points
from clip2scene_core.types import CameraFrame, Scan

CACHE_VERSION = 1


class PixelTeacher(Protocol):
    """What the cache needs from a teacher (``ClipTeacher`` satisfies it)."""

    def pixel_features(self, image: np.ndarray, uv: np.ndarray) -> torch.Tensor: ...


@dataclass
class Preprocess:
    """How images and points are prepared for the teacher; part of the cache key.

    ``teacher`` holds the teacher's own settings (image resizing, MaskCLIP options), which
    change its features and so must change the key.
    """

    teacher: dict[str, Any] = field(default_factory=dict)
    min_depth: float = 1.0

    def as_dict(self) -> dict[str, Any]:
        return {"teacher": self.teacher, "min_depth": float(self.min_depth)}


@dataclass
class PixelTargets:
    """Teacher output for the key-frame points of one sample.

    ``point_index`` (P,) indices of key-frame points hit by at least one camera (first camera
    wins where views overlap), ``features`` (P, D) float32 pixel features, ``labels`` (P,)
    int64 pseudo-labels (argmax over the text embeddings).
    """

    point_index: np.ndarray
    features: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return int(self.point_index.shape[0])


def _digest(*parts: bytes | str) -> str:
    h = hashlib.sha256()
    for p in parts:
        b = p.encode() if isinstance(p, str) else p
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()


def text_digest(text_emb: torch.Tensor) -> str:
    return _digest(np.ascontiguousarray(text_emb.detach().float().cpu().numpy()).tobytes())[:16]


def entry_key(teacher_id: str, camera: CameraFrame, xyz: np.ndarray, pre: Preprocess) -> str:
    """Content address of one (image, calibration, points, preprocessing, teacher) entry."""
    cal = camera.calibration
    cam = cal.camera
    calib = json.dumps({"w": cam.width, "h": cam.height, "K": np.asarray(cam.K).tolist(),
                        "D": np.asarray(cam.D).tolist(), "model": cam.distortion_model,
                        "T": np.asarray(cal.lidar_to_camera).tolist()}, sort_keys=True)
    img = np.ascontiguousarray(camera.image)
    return _digest(f"v{CACHE_VERSION}", teacher_id, json.dumps(pre.as_dict(), sort_keys=True), calib,
                   str(img.shape), img.tobytes(), np.ascontiguousarray(xyz, dtype=np.float32).tobytes())


class TeacherCache:
    """Folder of ``<key[:2]>/<key>.npz`` entries (float16 features, int32 point indices)."""

    def __init__(self, root: str | Path, teacher_id: str, preprocess: Preprocess | None = None) -> None:
        self.root = Path(root)
        self.teacher_id = teacher_id
        self.preprocess = preprocess or Preprocess()

    def path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.npz"

    def keys_for(self, scan: Scan, cameras: Sequence[CameraFrame]) -> list[str]:
        return [entry_key(self.teacher_id, cam, scan.xyz, self.preprocess) for cam in cameras]

    # ------------------------------------------------------------------ writing
    def _write(self, key: str, arrays: dict[str, np.ndarray]) -> None:
        atomic_write(self.path(key), lambda fh: np.savez(fh, **arrays))

    @torch.no_grad()
    def compute_entry(self, teacher: PixelTeacher, scan: Scan, camera: CameraFrame,
                      text_emb: torch.Tensor, key: str | None = None) -> str:
        """Run the teacher on one camera and store the features of the pixels hit by points."""
        key = key or entry_key(self.teacher_id, camera, scan.xyz, self.preprocess)
        proj = project_points(scan.xyz, camera.calibration, min_depth=self.preprocess.min_depth)
        idx = np.flatnonzero(proj.valid).astype(np.int32)
        dim = int(text_emb.shape[1])
        if idx.size:
            H, W = camera.image.shape[:2]
            # project_points accepts the outer half pixel (v up to H - 0.5); the teacher samples
            # pixel centres 0..H-1. Clamping moves such points by at most half a pixel.
            uv = np.clip(proj.uv[idx], 0.0, [W - 1.0, H - 1.0])
            feats = teacher.pixel_features(camera.image, uv)
            feats = F.normalize(torch.as_tensor(feats).float().cpu(), dim=1)
            if feats.shape != (idx.size, dim):
                raise Clip2SceneError(f"teacher returned {tuple(feats.shape)} features for "
                                      f"{idx.size} pixels of dimension {dim}")
            labels = (feats @ F.normalize(text_emb.float().cpu(), dim=1).t()).argmax(1)
        else:
            feats, labels = torch.zeros(0, dim), torch.zeros(0, dtype=torch.long)
        self._write(key, {"point_index": idx, "features": feats.numpy().astype(np.float16),
                          "labels": labels.numpy().astype(np.int16),
                          "text_digest": np.array(text_digest(text_emb))})
        return key

    def build(self, samples: Iterable[Any], teacher: PixelTeacher, text_emb: torch.Tensor,
              total: int | None = None, progress: bool = True, desc: str = "teacher pass") -> dict[str, int]:
        """Fill the cache for every camera of every sample; existing entries are skipped."""
        from tqdm import tqdm

        stats = {"computed": 0, "cached": 0, "samples": 0}
        bar = tqdm(samples, total=total, desc=desc, disable=not progress, unit="sample")
        for sample in bar:
            for cam, key in zip(sample.cameras, self.keys_for(sample.scan, sample.cameras)):
                if self.path(key).is_file():
                    stats["cached"] += 1
                    continue
                self.compute_entry(teacher, sample.scan, cam, text_emb, key)
                stats["computed"] += 1
            stats["samples"] += 1
            bar.set_postfix(computed=stats["computed"], cached=stats["cached"])
        return stats

    # ------------------------------------------------------------------ reading
    def load(self, scan: Scan, cameras: Sequence[CameraFrame], text_emb: torch.Tensor | None = None) -> PixelTargets:
        """Merged teacher targets of one sample; a missing entry is an error naming the fix."""
        n = len(scan)
        owner = np.full(n, -1, dtype=np.int64)
        feats_list, labels_list, idx_list = [], [], []
        digest = text_digest(text_emb) if text_emb is not None else None
        for key in self.keys_for(scan, cameras):
            path = self.path(key)
            if not path.is_file():
                raise Clip2SceneError(
                    f"teacher cache entry {path} is missing: run the teacher pass first "
                    f"(training/pretrain.py runs it before training)")
            try:
                with np.load(path) as z:
                    idx = z["point_index"].astype(np.int64)
                    f = z["features"]
                    lab = z["labels"].astype(np.int64)
                    stored_digest = str(z["text_digest"])
            except (OSError, ValueError, KeyError) as exc:
                raise Clip2SceneError(f"teacher cache entry {path} is corrupt: {exc}") from exc
            if digest is not None and stored_digest != digest and len(idx):
                emb = F.normalize(text_emb.float().cpu(), dim=1)
                lab = (torch.from_numpy(f.astype(np.float32)) @ emb.t()).argmax(1).numpy()
            new = owner[idx] < 0          # first camera wins where views overlap
            owner[idx[new]] = 1
            idx_list.append(idx[new])
            feats_list.append(f[new])
            labels_list.append(lab[new])
        if not idx_list:
            dim = int(text_emb.shape[1]) if text_emb is not None else 0
            return PixelTargets(np.zeros(0, np.int64), np.zeros((0, dim), np.float32), np.zeros(0, np.int64))
        return PixelTargets(np.concatenate(idx_list), np.concatenate(feats_list).astype(np.float32),
                            np.concatenate(labels_list))


def teacher_identity(teacher: Any) -> tuple[str, dict[str, Any]]:
    """(id, preprocessing) of a teacher for cache keys: a hash of its model name and *all* its
    weights (so two different checkpoints never share entries) and its image settings."""
    ident = getattr(teacher, "cache_id", None)
    if isinstance(ident, str):
        pre = getattr(teacher, "cache_preprocess", {})
        return ident, dict(pre)
    h = hashlib.blake2b(digest_size=16)
    h.update(str(getattr(teacher, "model_name", type(teacher).__name__)).encode())
    model = getattr(teacher, "model", None)
    if model is not None:
        for k, v in sorted(model.state_dict().items()):
            t = v.detach().float().cpu().contiguous()
            h.update(f"{k}:{tuple(t.shape)};".encode())
            h.update(t.view(-1).view(torch.uint8).numpy())
    pre: dict[str, Any] = {}
    for name in ("preprocess", "options"):
        obj = getattr(teacher, name, None)
        if obj is not None and is_dataclass(obj):
            pre[name] = json.loads(json.dumps(asdict(obj), default=str))
    return h.hexdigest(), pre
