"""An oracle 2D teacher on real SemanticKITTI frames: what distillation could reach.

No CLIP weights exist offline, so the teacher is made known. Virtual cameras are built from
the real KITTI calibration (P2 intrinsics + velodyne→camera extrinsic of sequence 00, turned
about the LiDAR's vertical axis to cover 360°); into each image the real scan is rasterised
with a z-buffer, each pixel painted with the colour of its nearest point's ground-truth
class. The teacher (``OracleTeacher``) decodes a pixel's colour and returns that class's text
embedding (plus optional isotropic noise: a deliberately imperfect MaskCLIP). Occlusion
makes even the noise-free teacher imperfect: a point hidden behind another in its pixel
gets the front point's class.

Used by ``benchmarks/learning_oracle.py`` (the learning benchmark) and
``test/test_learning_proof.py`` (its fast version). The 3D labels of a ``PaintedKitti``
sample serve evaluation only; ``labels="drop"|"shuffle"`` replaces them to prove that no
training loss reads them (the images are painted from the real labels either way).
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from clip2scene_core.datasets import SemanticKittiReader
from clip2scene_core.datasets.sample import Sample
from clip2scene_core.datasets.semantickitti import kitti_camera_calibration, parse_kitti_calib
from clip2scene_core.geometry import project_points
from clip2scene_core.teachers import TeacherView
from clip2scene_core.types import Calibration, CameraFrame

__all__ = ["KITTI_ROOT", "IMAGE_SIZE", "class_colour", "colour_key", "virtual_cameras", "paint", "PaintedKitti",
           "OracleTeacher", "random_text_embeddings", "density_chunks", "predict_at_density", "score",
           "nearest_labels", "oracle_bounds", "frame_masks", "OracleRecipe", "oracle_config", "run_oracle"]

#: the bundled SemanticKITTI frames, relative to test/data
KITTI_ROOT = "semantickitti/squeezesegv3_sample_data"
IMAGE_SIZE = (1241, 376)          # KITTI colour camera (width, height)


def class_colour(k: np.ndarray) -> np.ndarray:
    """Unique RGB per class index (k + 1, so black = no point)."""
    k = np.asarray(k, dtype=np.int64) + 1
    return np.stack([(k * 40) % 256, (k * 97) % 256, (k * 151) % 256], axis=-1).astype(np.uint8)


def colour_key(rgb: np.ndarray) -> np.ndarray:
    """(…, 3) uint8 → one int64 per colour."""
    rgb = np.asarray(rgb, dtype=np.int64)
    return (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]


def virtual_cameras(calib_file: str | Path, n: int = 4) -> list[Calibration]:
    """The real P2 camera of KITTI seq 00, turned by 360°/n steps about the LiDAR z axis."""
    w, h = IMAGE_SIZE
    base = kitti_camera_calibration(parse_kitti_calib(calib_file), w, h, "P2")
    cams = []
    for i in range(n):
        a = 2 * math.pi * i / n
        rz = np.eye(4)
        rz[:2, :2] = [[math.cos(a), math.sin(a)], [-math.sin(a), math.cos(a)]]   # rotate world by -a
        cams.append(Calibration(base.camera, base.lidar_to_camera @ rz))
    return cams


def paint(xyz: np.ndarray, labels: np.ndarray, cal: Calibration, min_depth: float = 1.0) -> np.ndarray:
    """Rasterise the scan into ``cal``'s image: nearest point per pixel, coloured by class."""
    w, h = IMAGE_SIZE
    proj = project_points(xyz, cal, min_depth=min_depth)
    idx = np.flatnonzero(proj.valid & (labels >= 0))
    uv = np.clip(np.floor(proj.uv[idx] + 0.5).astype(np.int64), 0, [w - 1, h - 1])
    order = np.argsort(-proj.depth[idx], kind="stable")     # far first, near overwrites
    img = np.zeros((h, w, 3), np.uint8)
    img[uv[order, 1], uv[order, 0]] = class_colour(labels[idx[order]])
    return img


class PaintedKitti:
    """SemanticKITTI samples of sequence 00 with painted virtual camera images.

    ``labels``: what the samples carry as 3D labels — ``"keep"`` (evaluation, teacher
    agreement), ``"drop"`` (None) or ``"shuffle"`` (a fixed permutation): training must not
    change with them. ``cameras=False`` gives the bare scans (evaluation)."""

    def __init__(self, data_dir: str | Path, labels: Literal["keep", "drop", "shuffle"] = "keep",
                 num_cameras: int = 4) -> None:
        root = Path(data_dir) / KITTI_ROOT
        self.reader = SemanticKittiReader(root, sequences=["00"])
        self.cams = virtual_cameras(root / "sequences/00/calib.txt", num_cameras)
        self.labels = labels
        self._images: dict[int, list[np.ndarray]] = {}   # painting is deterministic: do it once

    def __len__(self) -> int:
        return len(self.reader)

    def with_labels(self, labels: Literal["keep", "drop", "shuffle"]) -> "PaintedKitti":
        """The same frames and images (painted once) carrying other 3D labels."""
        other = object.__new__(PaintedKitti)
        other.reader, other.cams, other._images, other.labels = self.reader, self.cams, self._images, labels
        return other

    def images(self, i: int) -> list[np.ndarray]:
        if i not in self._images:
            s = self.reader[i]
            self._images[i] = [paint(s.scan.xyz, s.labels, c) for c in self.cams]
        return self._images[i]

    def __getitem__(self, i: int) -> Sample:
        s = self.reader[i]
        frames = [CameraFrame(f"virtual_{j}", img, c) for j, (img, c) in enumerate(zip(self.images(i), self.cams))]
        labels = s.labels
        if self.labels == "drop":
            labels = None
        elif self.labels == "shuffle":
            labels = labels[np.random.default_rng(12345).permutation(len(labels))]
        return Sample(scan=s.scan, cameras=frames, labels=labels, vocabulary_name=s.vocabulary_name,
                      token=s.token, scene=s.scene)


def random_text_embeddings(num_classes: int = 19, dim: int = 32, seed: int = 0) -> torch.Tensor:
    """Random unit class embeddings. (A random-init CLIP text tower gives nearly parallel
    class embeddings, mean cosine ≈ 0.9, which no student could separate.)"""
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(num_classes, dim, generator=g), dim=1)


class OracleTeacher:
    """MaskCLIP stand-in (a ``Teacher2D``): pixel colour → class → its text embedding, plus
    Gaussian noise of norm ≈ ``noise`` (0: the oracle). Unpainted pixels give pure noise
    (or, noise-free, no opinion)."""

    model_name = "oracle-teacher"

    def __init__(self, text_emb: torch.Tensor, noise: float = 0.0, seed: int = 0) -> None:
        self.text = F.normalize(text_emb.float(), dim=1)
        self.noise, self.seed = float(noise), int(seed)
        keys = colour_key(class_colour(np.arange(len(self.text))))
        if len(set(keys.tolist())) != len(keys):
            raise ValueError("class colours are not unique")
        self._order = np.argsort(keys)
        self._keys = keys[self._order]

    def identity(self) -> dict[str, Any]:
        from clip2scene_core.teachers import array_digest
        return {"kind": self.model_name, "noise": self.noise, "seed": self.seed, "text": array_digest(self.text)}

    def source_digest(self, view: TeacherView) -> str:  # the image is all it reads
        return ""

    def text_embeddings(self, vocab: Any = None, templates: Any = None, cache_dir: Any = None) -> torch.Tensor:
        return self.text

    def classes(self, image: np.ndarray, uv: np.ndarray) -> np.ndarray:
        """Class index painted at each pixel ``uv`` (-1: no point there)."""
        px = image[np.round(uv[:, 1]).astype(np.int64), np.round(uv[:, 0]).astype(np.int64)]
        key = colour_key(px)
        pos = np.clip(np.searchsorted(self._keys, key), 0, len(self._keys) - 1)
        return np.where(self._keys[pos] == key, self._order[pos], -1)

    def pixel_features(self, image: np.ndarray, uv: np.ndarray, view: TeacherView | None = None) -> torch.Tensor:
        cls = self.classes(image, uv)
        d = self.text.shape[1]
        known = cls >= 0
        feats = np.zeros((len(uv), d), np.float64)
        if self.noise > 0:
            rng = np.random.default_rng([self.seed, int(image.sum()) % (2 ** 31)])
            feats = rng.normal(0, 1 / math.sqrt(d), (len(uv), d))   # ~unit noise; alone where no point
            feats[known] = self.text.numpy()[cls[known]] + self.noise * feats[known]
        else:
            feats[known] = self.text.numpy()[cls[known]]
        return torch.from_numpy(feats).float()


def density_chunks(n: int, size: int | None, seed: int = 0) -> list[np.ndarray]:
    """A random partition of ``n`` points into chunks of about ``size`` points (None: one
    chunk): predicting chunk by chunk scores every point of a frame at the density the
    network was trained at (``data.max_points``)."""
    if size is None or size >= n:
        return [np.arange(n)]
    perm = np.random.default_rng(seed).permutation(n)
    k = max(1, int(round(n / size)))
    return [np.sort(c) for c in np.array_split(perm, k)]


def predict_at_density(segmenter: Any, scan: Any, size: int | None, seed: int = 0) -> np.ndarray:
    """(N,) labels of every point of ``scan``, predicted chunk by chunk (``density_chunks``)."""
    out = np.full(len(scan), -1, np.int64)
    for idx in density_chunks(len(scan), size, seed):
        out[idx] = segmenter.segment(scan.select(idx)).labels
    return out


def score(pred: np.ndarray, gt: np.ndarray, masks: dict[str, np.ndarray], num_classes: int) -> dict[str, Any]:
    """Confusion matrix of ``pred`` against ``gt`` over each named point mask."""
    from clip2scene_core.metrics import ConfusionMatrix

    out = {}
    for name, m in masks.items():
        cm = ConfusionMatrix(num_classes)
        cm.update(pred[m], gt[m])
        out[name] = cm
    return out


def nearest_labels(src_xyz: np.ndarray, src_labels: np.ndarray, dst_xyz: np.ndarray, tile: float = 8.0,
                   margin: float = 4.0) -> np.ndarray:
    """Label of the nearest source point (3D Euclidean, exact) for every destination point.

    Destinations are handled per ``tile`` × ``tile`` m xy tile against the sources of the
    tile grown by ``margin``: a hit closer than ``margin`` is the true nearest (every other
    source is farther in xy alone); the rest are searched against all sources."""
    src = torch.from_numpy(np.ascontiguousarray(src_xyz, dtype=np.float32))
    dst = torch.from_numpy(np.ascontiguousarray(dst_xyz, dtype=np.float32))
    best = torch.full((len(dst),), float("inf"))
    arg = torch.zeros(len(dst), dtype=torch.int64)
    cell = torch.floor(dst[:, :2] / tile).to(torch.int64)
    keys, inverse = torch.unique(cell, dim=0, return_inverse=True)
    for t in range(len(keys)):
        rows = torch.nonzero(inverse == t).squeeze(1)
        lo, hi = keys[t].float() * tile - margin, (keys[t].float() + 1) * tile + margin
        cand = torch.nonzero(((src[:, :2] >= lo) & (src[:, :2] < hi)).all(1)).squeeze(1)
        if cand.numel():
            d, j = torch.cdist(dst[rows], src[cand]).min(1)
            best[rows], arg[rows] = d, cand[j]
    far = torch.nonzero(best > margin).squeeze(1)
    for i in range(0, far.numel(), 2048):
        rows = far[i:i + 2048]
        d, j = torch.cdist(dst[rows], src).min(1)
        best[rows], arg[rows] = d, j
    return np.asarray(src_labels)[arg.numpy()]


def oracle_bounds(xyz: np.ndarray, teacher_labels: np.ndarray) -> dict[str, np.ndarray]:
    """The two oracle predictions: the teacher's label where a camera sees the point, -1
    (wrong) elsewhere; and the same with unseen points copying the nearest seen point."""
    seen = teacher_labels >= 0
    filled = teacher_labels.copy()
    if bool(seen.any()) and not bool(seen.all()):
        filled[~seen] = nearest_labels(xyz[seen], teacher_labels[seen], xyz[~seen])
    return {"visible_only": teacher_labels, "nearest_visible": filled}


def frame_masks(labels: np.ndarray, teacher_labels: np.ndarray) -> dict[str, np.ndarray]:
    """Point masks of the scores: full frame, seen by a camera, unseen."""
    seen = teacher_labels >= 0
    return {"full": np.ones(len(labels), bool), "visible": seen, "invisible": ~seen}


# ----------------------------------------------------------------------------- the distillation run
@dataclass
class OracleRecipe:
    """What a distillation run on the painted frames trains (the knobs of the benchmark)."""

    steps: int = 900                   # ≈ 810 s CPU per seed here (the benchmark allows 15 min)
    max_points: int | None = 60000     # points per training scan; evaluation uses the same density
    backbone: str = "minkunet14a"
    width: float = 0.5
    voxel_size: float = 0.15
    embed_dim: int = 32
    lr: float = 0.5
    batch_size: int = 1                # 600 steps of 1 scan fit far better than 300 of 2 (same compute)
    scheduler: str = "cosine"
    # the project's SCR: the released code's cross-entropy over raw dot products (contrastive:
    # the paper's Eq. 1, the default before; it learned 57.6 % where this learns 80.5 %)
    scr_variant: str = "cross_entropy"  # cross_entropy (released code) | contrastive (paper Eq. 1)
    ce_logits: str = "dot"              # loss.scr.ce_logits of cross_entropy: dot (released) | cosine
    class_weights: str = "none"        # loss.scr.class_weights
    lovasz_weight: float = 0.0         # loss.scr.lovasz_weight
    ssr: bool = True
    noise: float = 0.0                 # teacher noise (0: the oracle)
    train_indices: tuple[int, ...] = (0, 1)
    eval_index: int = 2
    #: further pretrain-config keys as (dotted key, value) pairs, set last (recipe ablations)
    config: tuple[tuple[str, Any], ...] = ()


def oracle_config(recipe: OracleRecipe, out_dir: str | Path, cache_dir: str | Path, seed: int = 0):
    """The ``PretrainConfig`` of a run (paper losses, no self-training, SGD, CPU)."""
    from clip2scene_core.config import from_dict
    from training.engine.config import PretrainConfig, apply_overrides

    r = recipe
    data = {
        "data": {"reader": "SemanticKittiReader", "indices": list(r.train_indices), "max_points": r.max_points,
                 "augment": {"rotate_z": 180.0, "scale": [0.95, 1.05]}},
        "model": {"backbone": r.backbone, "in_channels": 2, "embed_dim": r.embed_dim, "width_multiplier": r.width,
                  "voxel": {"voxel_size": r.voxel_size, "point_range": [-60, -60, -4, 60, 60, 4],
                            "features": ["intensity", "z"]}},
        "teacher": {"model_name": OracleTeacher.model_name, "cache_dir": str(cache_dir), "min_depth": 1.0},
        "vocabulary": {"preset": "semantickitti19"},
        "loss": {"scr": {"variant": r.scr_variant, "ce_logits": r.ce_logits, "temperature": 0.5,
                         "class_weights": r.class_weights, "lovasz_weight": r.lovasz_weight},
                 "ssr": {"enabled": r.ssr, "grid_size": 1.0, "lam": 1.0},
                 "self_training": {"enabled": False}},
        "optim": {"lr": r.lr, "momentum": 0.9, "dampening": 0.1, "steps": r.steps, "batch_size": r.batch_size,
                  "scheduler": r.scheduler},
        "run": {"out_dir": str(out_dir), "seed": seed, "device": "cpu", "progress": False, "log_every": 0},
    }
    # set as `--set key=value` does (JSON is YAML): one mechanism for dotted keys
    return from_dict(PretrainConfig, apply_overrides(data, [f"{k}={json.dumps(v)}" for k, v in r.config]))


def run_oracle(data_dir: str | Path, recipe: OracleRecipe, out_dir: str | Path, seed: int = 0,
               cache_dir: str | Path | None = None, heads: Sequence[str] = ("local", "global", "both"),
               labels: Literal["keep", "drop", "shuffle"] = "keep", data: PaintedKitti | None = None
               ) -> dict[str, Any]:
    """Pre-train on the painted training frames, then score the held-out frame.

    Returns ``scores[model][region]`` (``ConfusionMatrix``; models: the oracle bounds
    ``visible_only`` / ``nearest_visible``, ``untrained``, ``pretrained_<head>``; regions:
    ``full`` / ``visible`` / ``invisible``), ``train_agreement`` (the first of ``heads``
    against its own training pseudo-labels), ``teacher_agreement``, ``history``, ``seconds``,
    ``checkpoint``, ``class_names``. Every prediction is made at the training density.
    ``data``: painted frames to reuse (their images; ``labels`` still applies)."""
    from clip2scene_core.metrics import ConfusionMatrix
    from clip2scene_core.segmenter import Segmenter, SegmenterConfig
    from training import pretrain

    t0, c0 = time.perf_counter(), time.process_time()
    out_dir = Path(out_dir)
    cache_dir = Path(cache_dir) if cache_dir is not None else out_dir / "teacher_cache"
    text = random_text_embeddings(19, recipe.embed_dim, seed=0)
    data = PaintedKitti(data_dir) if data is None else data
    data = data.with_labels(labels)
    teacher = OracleTeacher(text, noise=recipe.noise)
    cfg = oracle_config(recipe, out_dir / "run", cache_dir, seed)
    out = pretrain.run(cfg, reader=data, teacher=teacher)
    t_train, c_train = time.perf_counter() - t0, time.process_time() - c0
    cache = out["teacher_cache"]
    cache.build([data[recipe.eval_index]], teacher, text, progress=False)    # the held-out frame's bounds
    ev = data.reader[recipe.eval_index]
    pseudo = cache.pseudo_labels(data[recipe.eval_index], text)
    names = list(ev.class_names)
    masks = frame_masks(ev.labels, pseudo)
    scores = {m: score(p, ev.labels, masks, len(names)) for m, p in oracle_bounds(ev.scan.xyz, pseudo).items()}
    models = {"untrained": (out["initial_checkpoint"], "local")}
    models.update({f"pretrained_{h}": (out["checkpoint"], h) for h in heads})
    size = recipe.max_points
    segs = {}
    for name, (path, head) in models.items():
        seg = segs[name] = Segmenter.load(path, device="cpu", config=SegmenterConfig(device="cpu", head=head))
        scores[name] = score(predict_at_density(seg, ev.scan, size, seed), ev.labels, masks, len(names))
    fit = ConfusionMatrix(len(names))    # the SCR head against its own training pseudo-labels
    for i in recipe.train_indices:
        s = data[i]
        fit.update(predict_at_density(segs[f"pretrained_{heads[0]}"], s.scan, size, seed), cache.pseudo_labels(s, text))
    agree = {"accuracy": fit.accuracy(), "miou": fit.miou(), "points": int(fit.matrix.sum() + fit.missed.sum()),
             "head": heads[0]}
    return {"scores": scores, "train_agreement": agree, "teacher_agreement": out["teacher_agreement"],
            "history": out["history"], "class_names": names, "checkpoint": out["checkpoint"],
            "seconds": {"train": t_train, "total": time.perf_counter() - t0, "train_cpu": c_train,
                        "total_cpu": time.process_time() - c0}}

