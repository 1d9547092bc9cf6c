"""Teacher pass: the 2D teacher runs once per image; pixel features of the pixels hit by points
are cached so training epochs never re-run it.

Over ~400 lines: the key, the entry format, its checks, the teacher pass that writes entries
and the reload that reads them are one file format and change together.

One cache entry per (sample, camera), content-addressed: the key is a SHA-256 of the teacher's
identity (``Teacher2D.identity()``: weights / class list / settings, whatever the teacher is
called), the per-image source digest (``Teacher2D.source_digest(view)``: the label image or
stored prediction the teacher reads for this image), the image bytes, the calibration, the
preprocessing and the projected points. Changing any of them gives a new key, so a stale entry
can never be read and two different teachers never share an entry; a pass that was
interrupted simply resumes (entries that exist are skipped). Each entry is written atomically
(temporary file + rename), so a killed pass leaves no half-written file.

Each entry also stores a SHA-256 of its key and arrays (``digest``). The teacher pass reads
every existing entry back and checks it (readable, digest, shapes, finite features, point
indices in range); a damaged one is logged with its path, deleted and recomputed. A damage
found later, while training reads the entry, is an error naming the file, which is deleted
so that the next run's teacher pass recomputes it. Entries written before digests existed
are accepted after the same structural checks (the zip's CRC still covers their bytes).

MaskCLIP's prompt denoising (``Preprocess.prompt_denoising``, off by default) needs the whole
image's class scores: the entry's pass keeps the classes of the image that reach the threshold
(``clip.refine.kept_classes`` on the CLIP teacher's dense map, from the same forward that gives
the points' features), stores them as ``keep`` and never labels a point with another class. Its
threshold is part of the key, so changing it recomputes the entries; off, keys and entries are
exactly those of a cache without the option.

Sweeps in the key-frame cameras (``data.sweeps_to_keyframe_cameras``, as the released
CLIP2Scene code trains): a sample flagged ``sweeps_in_cameras`` (``SweepsInCameras`` in
training.engine.data sets it) is projected as its key frame followed by its sweeps, already
moved into the key frame (``camera_scan``); its entries then hold the pixels of sweep points
too (point indices past the key frame's count), and their keys, which cover the points, differ
from the key-frame-only ones. A sample without sweeps projects exactly its key frame.
"""
from __future__ import annotations

import hashlib
import json
import logging
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from clip2scene_core.atomic import atomic_write
from clip2scene_core.errors import Clip2SceneError, ConfigError
from clip2scene_core.geometry import project_points
from clip2scene_core.teachers import Teacher2D, TeacherView, as_teacher, identity_digest
from clip2scene_core.types import CameraFrame, Scan

CACHE_VERSION = 2

log = logging.getLogger("clip2scene.training")


class CorruptEntryError(Clip2SceneError):
    """A teacher-cache entry cannot be read or fails its checks (it is deleted)."""


#: the teacher interface (``clip2scene_core.teachers.Teacher2D``), under its former name
PixelTeacher = Teacher2D
SourceDigest = Callable[[TeacherView], str]


def view_of(sample: Any, camera: CameraFrame) -> TeacherView:
    """The identity of one image of a sample, as teachers receive it."""
    return TeacherView(token=str(getattr(sample, "token", "") or ""), camera=str(camera.name),
                       scene=str(getattr(sample, "scene", "") or ""), stamp_ns=int(getattr(camera, "stamp_ns", 0) or 0))


@dataclass
class Preprocess:
    """How images and points are prepared for the teacher and its pseudo-labels made; part of
    the cache key.

    ``teacher`` holds the teacher's own settings (image resizing, MaskCLIP options), which
    change its features and so must change the key. ``prompt_denoising``: MaskCLIP's threshold
    (0.5 in the paper) for the pseudo-labels, None = off.
    """

    teacher: dict[str, Any] = field(default_factory=dict)
    min_depth: float = 1.0
    prompt_denoising: float | None = None

    def __post_init__(self) -> None:
        if self.prompt_denoising is not None and not 0.0 <= float(self.prompt_denoising) <= 1.0:
            raise ConfigError(f"prompt_denoising is a confidence in [0, 1] or None, got {self.prompt_denoising}")

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"teacher": self.teacher, "min_depth": float(self.min_depth)}
        if self.prompt_denoising is not None:      # absent when off: today's keys stay valid
            out["prompt_denoising"] = float(self.prompt_denoising)
        return out


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


def entry_digest(key: str, arrays: dict[str, np.ndarray]) -> str:
    """SHA-256 of an entry's key and its arrays (names, dtypes, shapes, bytes)."""
    parts: list[bytes | str] = [f"entry-v{CACHE_VERSION}", key]
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        parts += [name, f"{a.dtype.str}|{a.shape}", a.tobytes()]
    return _digest(*parts)


def text_digest(text_emb: torch.Tensor) -> str:
    return _digest(np.ascontiguousarray(text_emb.detach().float().cpu().numpy()).tobytes())[:16]


def _clip_logit_scale(teacher: Any) -> float:
    """The softmax scale of the teacher's scores: its learnt CLIP scale (clamped to 100, as in
    training), 100 when it has none (``ClipTeacher.dense_scores`` does the same)."""
    from clip2scene_core.clip.refine import CLIP_LOGIT_SCALE

    scale = getattr(getattr(teacher, "model", None), "logit_scale", None)
    return CLIP_LOGIT_SCALE if scale is None else min(float(scale.exp()), CLIP_LOGIT_SCALE)


def denoised_pixel_features(teacher: Any, image: np.ndarray, uv: np.ndarray, text_emb: torch.Tensor,
                            threshold: float) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(features at ``uv``, (K,) kept classes) from one dense forward of a CLIP teacher (one
    with ``dense_features_with_geometry``); None for other teachers (no dense class map).

    The features equal ``pixel_features``; the classes are decided on the whole feature grid
    (padding to the stride adds less than one cell, so every cell holds image pixels)."""
    from clip2scene_core.clip.preprocess import sample_grid
    from clip2scene_core.clip.refine import kept_classes

    dense = getattr(teacher, "dense_features_with_geometry", None)
    if not callable(dense):
        return None
    feats, geo = dense(image)
    fmap = feats[0].float()
    text = F.normalize(text_emb.to(fmap.device, torch.float32), dim=1)
    scores = torch.einsum("dhw,kd->khw", F.normalize(fmap, dim=0), text)
    keep = kept_classes(scores, float(threshold), _clip_logit_scale(teacher))
    return sample_grid(fmap, uv, geo), keep.cpu()


def aligned_sweep_xyz(sweep: Scan, transform: np.ndarray) -> np.ndarray:
    """(N, 3) float32 points of ``sweep`` in the key frame (``transform``: sweep → key-frame
    lidar). The one computation of it: training's data pipeline and the cache's projection
    (``camera_scan``) both call it, so both see the same points."""
    T = np.asarray(transform, dtype=np.float64)
    xyz = sweep.points[:, :3].astype(np.float64) @ T[:3, :3].T + T[:3, 3]
    return xyz.astype(np.float32)


def camera_scan(sample: Any) -> Scan:
    """The points of ``sample`` the teacher cache projects into its cameras: the key frame,
    followed by every sweep moved into the key frame when ``sample.sweeps_in_cameras`` is set
    (xyz only: entries depend on nothing else)."""
    scan: Scan = sample.scan
    sweeps = getattr(sample, "sweeps", None) or []
    if not getattr(sample, "sweeps_in_cameras", False) or not sweeps:
        return scan
    xyz = np.concatenate([scan.xyz.astype(np.float32)] + [aligned_sweep_xyz(sw, T) for sw, T in sweeps])
    return Scan(np.ascontiguousarray(xyz), ("x", "y", "z"), scan.frame_id, scan.stamp_ns)


def key_frame_targets(targets: PixelTargets, num_key: int) -> PixelTargets:
    """The part of ``targets`` on the key frame's ``num_key`` points (drops sweep points)."""
    m = targets.point_index < num_key
    if m.all():
        return targets
    return PixelTargets(targets.point_index[m], targets.features[m], targets.labels[m])


def entry_key(teacher_id: str, camera: CameraFrame, xyz: np.ndarray, pre: Preprocess, source: str = "") -> str:
    """Content address of one (image, calibration, points, preprocessing, teacher, source) entry."""
    cal = camera.calibration
    cam = cal.camera
    calib = json.dumps({"w": cam.width, "h": cam.height, "K": np.asarray(cam.K).tolist(),
                        "D": np.asarray(cam.D).tolist(), "model": cam.distortion_model,
                        "T": np.asarray(cal.lidar_to_camera).tolist()}, sort_keys=True)
    img = np.ascontiguousarray(camera.image)
    return _digest(f"v{CACHE_VERSION}", teacher_id, json.dumps(pre.as_dict(), sort_keys=True), calib,
                   str(img.shape), img.tobytes(), np.ascontiguousarray(xyz, dtype=np.float32).tobytes(),
                   f"source:{source}")


class TeacherCache:
    """Folder of ``<key[:2]>/<key>.npz`` entries (float16 features, int32 point indices).

    ``source_digest`` is the teacher's ``source_digest`` when it reads per-image files (label
    images, stored predictions): keys then need the sample's identity, so use the ``*_sample``
    methods. Build one with ``open_cache(teacher, cache_dir)``.
    """

    def __init__(self, root: str | Path, teacher_id: str, preprocess: Preprocess | None = None,
                 source_digest: SourceDigest | None = None) -> None:
        self.root = Path(root)
        self.teacher_id = teacher_id
        self.preprocess = preprocess or Preprocess()
        self.source_digest = source_digest
        self._noted_no_denoise = False

    def path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.npz"

    def keys_for(self, scan: Scan, cameras: Sequence[CameraFrame],
                 views: Sequence[TeacherView] | None = None) -> list[str]:
        if self.source_digest is not None and views is None:
            raise Clip2SceneError("this teacher reads per-image sources: cache keys need the sample "
                                  "(use keys_for_sample / load_sample)")
        sources = ([self.source_digest(v) for v in views] if self.source_digest is not None and views is not None
                   else [""] * len(cameras))
        return [entry_key(self.teacher_id, cam, scan.xyz, self.preprocess, src) for cam, src in zip(cameras, sources)]

    def keys_for_sample(self, sample: Any) -> list[str]:
        return self.keys_for(camera_scan(sample), sample.cameras, [view_of(sample, c) for c in sample.cameras])

    # ------------------------------------------------------------------ writing
    def _write(self, key: str, arrays: dict[str, np.ndarray]) -> None:
        arrays = {**arrays, "digest": np.array(entry_digest(key, arrays))}
        atomic_write(self.path(key), lambda fh: np.savez(fh, **arrays))

    def read_entry(self, key: str, num_points: int | None = None) -> dict[str, np.ndarray]:
        """The arrays of entry ``key``, checked; ``CorruptEntryError`` naming the file when it
        cannot be read, its digest does not match, or its content is inconsistent (non-finite
        features, point indices outside ``[0, num_points)``)."""
        path = self.path(key)
        try:
            with np.load(path, allow_pickle=False) as z:
                arrays = {name: z[name] for name in z.files}
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, zlib.error, RuntimeError,
                NotImplementedError, MemoryError, TypeError, AttributeError, IndexError) as exc:
            # zipfile / numpy raise any of these on a damaged file (e.g. an unknown compression
            # method after one flipped header byte)
            raise CorruptEntryError(f"teacher cache entry {path} is corrupt (unreadable: "
                                    f"{type(exc).__name__}: {exc})") from exc
        stored = arrays.pop("digest", None)
        need = ("point_index", "features", "labels", "text_digest")
        missing = [n for n in need if n not in arrays]
        if missing:
            raise CorruptEntryError(f"teacher cache entry {path} is corrupt (lacks {missing})")
        if stored is not None and str(stored) != entry_digest(key, arrays):
            raise CorruptEntryError(f"teacher cache entry {path} is corrupt (content digest mismatch)")
        idx, f, lab = arrays["point_index"], arrays["features"], arrays["labels"]
        if (idx.ndim != 1 or f.ndim != 2 or lab.shape != idx.shape or f.shape[0] != idx.shape[0]
                or idx.dtype.kind not in "iu" or lab.dtype.kind not in "iu" or f.dtype.kind != "f"):
            raise CorruptEntryError(f"teacher cache entry {path} is corrupt (inconsistent arrays "
                                    f"{idx.shape}, {f.shape}, {lab.shape})")
        if not np.isfinite(f).all():
            raise CorruptEntryError(f"teacher cache entry {path} is corrupt (non-finite features)")
        if idx.size and (idx.min() < 0 or (num_points is not None and idx.max() >= num_points)):
            raise CorruptEntryError(f"teacher cache entry {path} is corrupt (point indices outside the scan)")
        keep = arrays.get("keep")
        if keep is not None and (keep.ndim != 1 or keep.dtype != np.bool_ or not keep.any()
                                 or (lab.size and (lab.min() < 0 or lab.max() >= keep.size
                                                   or not keep[lab].all()))):
            raise CorruptEntryError(f"teacher cache entry {path} is corrupt (labels outside its kept classes)")
        return arrays

    def discard(self, key: str, reason: Exception | str) -> None:
        """Log and delete a damaged entry (the next teacher pass recomputes it)."""
        path = self.path(key)
        log.warning("%s; discarded: the teacher pass recomputes it", reason)
        try:
            path.unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("could not delete %s: %s", path, exc)

    def _entry_ok(self, key: str, num_points: int, text: str | None = None) -> bool:
        """True when entry ``key`` exists and passes ``read_entry``; a damaged one is discarded.
        A prompt-denoised entry whose classes were kept for other class embeddings than
        ``text`` (a digest) is stale: False, so that it is recomputed."""
        if not self.path(key).is_file():
            return False
        try:
            arrays = self.read_entry(key, num_points)
        except CorruptEntryError as exc:
            self.discard(key, exc)
            return False
        if text is not None and "keep" in arrays and str(arrays["text_digest"]) != text:
            log.info("%s was prompt-denoised for other class embeddings: recomputed", self.path(key))
            return False
        return True

    @torch.no_grad()
    def compute_entry(self, teacher: Teacher2D, scan: Scan, camera: CameraFrame,
                      text_emb: torch.Tensor, key: str | None = None, view: TeacherView | None = None) -> str:
        """Run the teacher on one camera and store the features of the pixels hit by points.

        Rows the teacher leaves at zero or NaN ("no opinion", e.g. unlabelled pixels) are not
        stored: those points get no target. With prompt denoising the image's kept classes
        are stored as ``keep`` and the labels are the argmax over them."""
        view = view or TeacherView(token="", camera=str(camera.name), stamp_ns=int(camera.stamp_ns))
        if key is None:
            src = self.source_digest(view) if self.source_digest is not None else ""
            key = entry_key(self.teacher_id, camera, scan.xyz, self.preprocess, src)
        proj = project_points(scan.xyz, camera.calibration, min_depth=self.preprocess.min_depth)
        idx = np.flatnonzero(proj.valid).astype(np.int32)
        dim = int(text_emb.shape[1])
        denoised = None
        if idx.size:
            H, W = camera.image.shape[:2]
            # project_points accepts the outer half pixel (v up to H - 0.5); the teacher samples
            # pixel centres 0..H-1. Clamping moves such points by at most half a pixel.
            uv = np.clip(proj.uv[idx], 0.0, [W - 1.0, H - 1.0])
            if self.preprocess.prompt_denoising is not None:
                denoised = denoised_pixel_features(teacher, camera.image, uv, text_emb,
                                                   self.preprocess.prompt_denoising)
                if denoised is None and not self._noted_no_denoise:
                    self._noted_no_denoise = True
                    log.info("prompt denoising skipped: teacher %s has no dense class map "
                             "(dense_features_with_geometry); its pseudo-labels are plain argmaxes",
                             getattr(teacher, "model_name", type(teacher).__name__))
            if denoised is not None:
                raw, keep_cls = denoised[0].float().cpu(), denoised[1]
            else:
                raw = torch.as_tensor(teacher.pixel_features(camera.image, uv, view)).float().cpu()
            if raw.shape != (idx.size, dim):
                raise Clip2SceneError(f"teacher {getattr(teacher, 'model_name', type(teacher).__name__)} returned "
                                      f"{tuple(raw.shape)} features for {idx.size} pixels; expected "
                                      f"({idx.size}, {dim}) like its class embeddings")
            keep = torch.isfinite(raw).all(1) & (raw.abs().sum(1) > 0)
            idx = idx[keep.numpy()]
            feats = F.normalize(raw[keep], dim=1)
            logits = feats @ F.normalize(text_emb.float().cpu(), dim=1).t()
            if denoised is not None:
                logits[:, ~keep_cls] = float("-inf")
            labels = logits.argmax(1)
        else:
            feats, labels = torch.zeros(0, dim), torch.zeros(0, dtype=torch.long)
        arrays = {"point_index": idx, "features": feats.numpy().astype(np.float16),
                  "labels": labels.numpy().astype(np.int16), "text_digest": np.array(text_digest(text_emb))}
        if denoised is not None:
            arrays["keep"] = keep_cls.numpy().astype(np.bool_)
        self._write(key, arrays)
        return key

    def write_manifest(self, identity: dict[str, Any]) -> Path:
        """``<root>/teachers/<teacher_id>.json``: what the teacher id stands for (for people)."""
        path = self.root / "teachers" / f"{self.teacher_id}.json"
        if not path.is_file():
            text = json.dumps({"teacher_id": self.teacher_id, "identity": identity,
                               "preprocess": self.preprocess.as_dict()}, indent=1, sort_keys=True, default=str)
            atomic_write(path, lambda fh: fh.write(text.encode()))
        return path

    def build(self, samples: Iterable[Any], teacher: Teacher2D, text_emb: torch.Tensor,
              total: int | None = None, progress: bool = True, desc: str = "teacher pass",
              agreement: "TeacherAgreement | None" = None) -> dict[str, int]:
        """Fill the cache for every camera of every sample; existing entries are checked
        (``read_entry``) and skipped, damaged ones discarded and recomputed (counted in
        ``computed`` and, when there were any, in ``repaired``, as are prompt-denoised entries
        made for other class embeddings).
        With ``agreement``, the pseudo-labels are scored against the samples' 3D labels."""
        from tqdm import tqdm

        stats = {"computed": 0, "cached": 0, "samples": 0}
        repaired = 0
        text = text_digest(text_emb)
        bar = tqdm(samples, total=total, desc=desc, disable=not progress, unit="sample")
        for sample in bar:
            views = [view_of(sample, c) for c in sample.cameras]
            scan = camera_scan(sample)
            keys = self.keys_for(scan, sample.cameras, views)
            for cam, key, view in zip(sample.cameras, keys, views):
                existed = self.path(key).is_file()
                if self._entry_ok(key, len(scan), text):
                    stats["cached"] += 1
                    continue
                self.compute_entry(teacher, scan, cam, text_emb, key, view)
                stats["computed"] += 1
                repaired += int(existed)
            if agreement is not None and getattr(sample, "labels", None) is not None:
                agreement.update(sample, key_frame_targets(self._load_keys(scan, keys, text_emb), len(sample.scan)))
            stats["samples"] += 1
            bar.set_postfix(computed=stats["computed"], cached=stats["cached"])
        if repaired:
            stats["repaired"] = repaired
        return stats

    # ------------------------------------------------------------------ reading
    def load(self, scan: Scan, cameras: Sequence[CameraFrame], text_emb: torch.Tensor | None = None) -> PixelTargets:
        """Merged teacher targets of one sample; a missing entry is an error naming the fix.
        (Teachers that read per-image sources need ``load_sample``.)"""
        return self._load_keys(scan, self.keys_for(scan, cameras), text_emb)

    def load_sample(self, sample: Any, text_emb: torch.Tensor | None = None) -> PixelTargets:
        """Merged teacher targets of one sample (works for every teacher); with
        ``sweeps_in_cameras`` they index ``camera_scan(sample)`` (key frame, then sweeps)."""
        return self._load_keys(camera_scan(sample), self.keys_for_sample(sample), text_emb)

    def pseudo_labels(self, sample: Any, text_emb: torch.Tensor) -> np.ndarray:
        """(N,) the teacher's pseudo-label of every point of ``sample`` (-1: no camera pixel)."""
        t = key_frame_targets(self.load_sample(sample, text_emb), len(sample.scan))
        out = np.full(len(sample.scan), -1, np.int64)
        out[t.point_index] = t.labels
        return out

    def _load_keys(self, scan: Scan, keys: Sequence[str], text_emb: torch.Tensor | None) -> PixelTargets:
        n = len(scan)
        owner = np.full(n, -1, dtype=np.int64)
        feats_list, labels_list, idx_list = [], [], []
        digest = text_digest(text_emb) if text_emb is not None else None
        for key in keys:
            path = self.path(key)
            if not path.is_file():
                raise Clip2SceneError(
                    f"teacher cache entry {path} is missing: run the teacher pass first "
                    f"(training/pretrain.py runs it before training)")
            try:
                z = self.read_entry(key, n)
            except CorruptEntryError as exc:
                self.discard(key, exc)
                raise CorruptEntryError(f"{exc}; it was deleted: run pre-training again, its teacher pass "
                                        f"recomputes the entry") from exc
            idx = z["point_index"].astype(np.int64)
            f = z["features"]
            lab = z["labels"].astype(np.int64)
            stored_digest = str(z["text_digest"])
            if digest is not None and stored_digest != digest and len(idx) and "keep" in z:
                raise Clip2SceneError(f"teacher cache entry {path} was prompt-denoised for other class "
                                      f"embeddings: run the teacher pass with these (training/pretrain.py "
                                      f"runs it before training; it recomputes the entry)")
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
    """(id, identity) of a teacher for cache keys: the digest of ``identity()`` and its class,
    so teachers differing in weights, class lists, settings or code never share entries,
    whatever they are named. Old-style teachers are identified through ``as_teacher``."""
    t = as_teacher(teacher)
    ident = t.identity()
    if not isinstance(ident, dict):
        raise Clip2SceneError(f"{type(t).__name__}.identity() must return a dict, got {type(ident).__name__}")
    cls = type(t)
    full = {"class": f"{cls.__module__}.{cls.__qualname__}", "identity": ident}
    return identity_digest(full), ident


def open_cache(teacher: Any, cache_dir: str | Path, min_depth: float = 1.0,
               prompt_denoising: float | None = None) -> TeacherCache:
    """The cache of ``teacher`` under ``cache_dir`` (what the teacher pass fills): read the
    teacher's pseudo-labels and features of a sample with ``load_sample`` / ``pseudo_labels``.

    The cache keeps the teacher's ``source_digest`` only when it reads per-image files
    (``reads_sources`` is not False), so a CLIP teacher can leave memory after the pass.
    ``prompt_denoising``: MaskCLIP's threshold for the pseudo-labels (None: off)."""
    t = as_teacher(teacher)
    ident, _ = teacher_identity(t)
    digest = t.source_digest if getattr(t, "reads_sources", True) is not False else None
    return TeacherCache(cache_dir, ident, Preprocess({}, min_depth, prompt_denoising), digest)


class TeacherAgreement:
    """How often the teacher's pseudo-labels equal the 3D labels on the points it covers
    (accuracy, mIoU over the vocabulary's classes): the ceiling distillation aims for."""

    def __init__(self, vocab_names: Sequence[str]) -> None:
        from clip2scene_core.metrics import ConfusionMatrix

        self.names = list(vocab_names)
        self.confusion = ConfusionMatrix(len(self.names))

    def update(self, sample: Any, targets: PixelTargets) -> None:
        from clip2scene_core.label_spaces import class_map, remap_labels

        if sample.labels is None or not len(targets):
            return
        gt = np.asarray(sample.labels, dtype=np.int64)[targets.point_index]
        gt = remap_labels(gt, class_map(getattr(sample, "class_names", None), self.names))
        self.confusion.update(targets.labels, gt)

    def summary(self) -> dict[str, float] | None:
        """``{"points", "accuracy", "miou"}``, or None when no labelled point was covered."""
        points = int(self.confusion.matrix.sum() + self.confusion.missed.sum())
        if points == 0:
            return None
        return {"points": points, "accuracy": self.confusion.accuracy(), "miou": self.confusion.miou()}
