"""Data pipeline of training: reader → (teacher targets, sweeps, augmentation) → voxel batch.

Randomness (point subsampling, augmentation) is drawn from a generator seeded by
``(seed, epoch, sample index)``, never from global state, so a batch is the same whichever
worker builds it and whether or not the run was resumed in the middle of an epoch.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from clip2scene_core.datasets import READERS
from clip2scene_core.errors import ConfigError
from clip2scene_core.label_spaces import remap_labels
from clip2scene_core.types import Scan
from clip2scene_core.voxelize import VoxelConfig, Voxels, voxelize

from .config import AugmentConfig, DataConfig
from .teacher_cache import PixelTargets, TeacherCache, aligned_sweep_xyz

_PATH_KEYS = ("root", "path", "pkl", "file", "bag", "posed_images")


# ----------------------------------------------------------------------------- readers
def _resolve_paths(args: dict[str, Any], base: Path) -> dict[str, Any]:
    out = {}
    for k, v in args.items():
        if isinstance(v, str) and any(k.endswith(s) for s in _PATH_KEYS) and not Path(v).is_absolute() \
                and (base / v).exists():
            out[k] = str((base / v).resolve())
        else:
            out[k] = v
    return out


def _rosbag_reader(**args: Any) -> Sequence[Any]:
    """The user's own recordings (PointCloud2 + cameras + CameraInfo + TF, no labels), read
    through clip2scene_ros (bag reader, sync, TF) as the node would see them; imported only
    when a config names it."""
    from .rosbag_source import RosbagSampleReader

    return RosbagSampleReader(**args)


#: readers only training can build (they need more than ``clip2scene_core``), added to
#: ``clip2scene_core.datasets.READERS``
TRAINING_READERS: dict[str, Callable[..., Sequence[Any]]] = {
    "rosbag": _rosbag_reader,
    "RosbagSampleReader": _rosbag_reader,
}


class SweepsInCameras:
    """A reader whose samples ask for their sweeps in the key-frame cameras
    (``data.sweeps_to_keyframe_cameras``): each sample gets ``sweeps_in_cameras = True``, so
    the teacher cache projects its aligned sweeps too (``teacher_cache.camera_scan``) and
    ``prepare_sample`` pairs the sweep points that got a pixel."""

    def __init__(self, base: Sequence[Any]) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> Any:
        sample = copy.copy(self.base[i])     # a shallow copy: the base's sample stays unflagged
        sample.sweeps_in_cameras = True
        return sample

    def sample_scenes(self) -> list[str]:
        return sample_scenes(self.base)


def with_sweeps_in_cameras(reader: Sequence[Any], cfg: DataConfig) -> Sequence[Any]:
    """``reader`` wrapped in ``SweepsInCameras`` when ``cfg`` feeds sweeps and asks for them in
    the cameras (once: a wrapped reader is returned as it is), else ``reader``."""
    if not (cfg.use_sweeps and cfg.sweeps_to_keyframe_cameras) or isinstance(reader, SweepsInCameras):
        return reader
    return SweepsInCameras(reader)


def build_reader(cfg: DataConfig, base_dir: str | Path = ".") -> Sequence[Any]:
    """Instantiate the reader named in ``cfg`` (a ``Sequence[Sample]``) from the registry
    (wrapped by ``with_sweeps_in_cameras``)."""
    readers = {**READERS, **TRAINING_READERS}
    factory = readers.get(cfg.reader)
    if factory is None:
        raise ConfigError(f"data.reader: unknown reader '{cfg.reader}'; known: {sorted(readers)}")
    args = _resolve_paths(dict(cfg.args), Path(base_dir))
    try:
        reader = factory(**args)
    except TypeError as exc:
        raise ConfigError(f"data.args do not fit {cfg.reader}: {exc}") from exc
    return with_sweeps_in_cameras(reader, cfg)


def sample_scenes(reader: Sequence[Any]) -> list[str]:
    """Scene id of every sample (cheap when the reader exposes ``scenes``)."""
    method = getattr(reader, "sample_scenes", None)
    if callable(method):
        return [str(s) for s in method()]
    frames = getattr(reader, "_frames", None)   # the bundled readers keep an index of frames
    if frames is not None and len(frames) == len(reader):
        out = []
        for f in frames:
            s = getattr(f, "scene", None)
            out.append(str(s if s is not None else (f[0] if isinstance(f, tuple) else f)))
        return out
    return [str(reader[i].scene) for i in range(len(reader))]


def scene_subsample(scenes: Sequence[str], fraction: float, seed: int = 0) -> list[int]:
    """Indices of the samples of a random ``fraction`` of the scenes (CLIP2Scene's label-
    efficiency protocol: whole scenes, at least one)."""
    if not 0 < fraction <= 1:
        raise ConfigError(f"label_fraction must be in (0, 1], got {fraction}")
    uniq = sorted(set(scenes))
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(uniq))
    k = max(1, int(math.ceil(fraction * len(uniq) - 1e-9)))
    chosen = {uniq[i] for i in order[:k]}
    return [i for i, s in enumerate(scenes) if s in chosen]


class Subset:
    """A view of some samples of a reader."""

    def __init__(self, base: Sequence[Any], indices: Sequence[int]) -> None:
        self.base, self.indices = base, list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> Any:
        return self.base[self.indices[i]]

    def sample_scenes(self) -> list[str]:
        scenes = sample_scenes(self.base)
        return [scenes[i] for i in self.indices]


# ----------------------------------------------------------------------------- samples
@dataclass
class Prepared:
    """One sample ready for batching.

    ``scans[0]`` is the key frame, the rest are its sweeps moved into the key frame; all are
    augmented with the same transform. ``has_pixel``/``pixel_labels`` follow the key-frame
    points; ``sweep_has_pixel``/``sweep_pixel_labels`` (one array per sweep, empty when
    sweeps get no pixels) the sweeps'. ``pixel_features`` rows: the key frame's paired points,
    then each sweep's, in order.
    """

    scans: list[Scan]
    point_index: np.ndarray            # (N_key,) index in the original key-frame scan
    has_pixel: np.ndarray              # (N_key,) bool
    pixel_features: np.ndarray         # (P, D) float32, rows of the points where has_pixel
    pixel_labels: np.ndarray           # (N_key,) int64, -1 where no pixel
    gt: np.ndarray | None              # (N_key,) int64
    token: str
    num_original: int
    sweep_has_pixel: list[np.ndarray] = field(default_factory=list)
    sweep_pixel_labels: list[np.ndarray] = field(default_factory=list)


def _augment_matrix(cfg: AugmentConfig, rng: np.random.Generator) -> np.ndarray:
    a = np.deg2rad(rng.uniform(-cfg.rotate_z, cfg.rotate_z)) if cfg.rotate_z > 0 else 0.0
    c, s = np.cos(a), np.sin(a)
    R = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]], dtype=np.float64)
    flip = np.ones(3)
    if cfg.flip_x and rng.random() < 0.5:
        flip[0] = -1
    if cfg.flip_y and rng.random() < 0.5:
        flip[1] = -1
    scale = rng.uniform(*cfg.scale) if cfg.scale[0] != cfg.scale[1] else cfg.scale[0]
    return (R * flip[None, :]) * scale


def _with_xyz(scan: Scan, xyz: np.ndarray) -> Scan:
    """``scan`` with its coordinates replaced by ``xyz`` (other fields kept)."""
    pts = scan.points.copy()
    pts[:, :3] = xyz
    return Scan(pts, scan.fields, scan.frame_id, scan.stamp_ns)


def _transform_scan(scan: Scan, M: np.ndarray) -> Scan:
    return _with_xyz(scan, (scan.points[:, :3].astype(np.float64) @ M.T).astype(np.float32))


def prepare_sample(sample: Any, targets: PixelTargets | None, cfg: DataConfig, rng: np.random.Generator,
                   augment: bool, embed_dim: int) -> Prepared:
    """Subsample, attach teacher targets, align sweeps, augment.

    With ``sample.sweeps_in_cameras`` the targets index the key frame followed by the sweeps
    (``teacher_cache.camera_scan``) and the sweep points that got a pixel are paired."""
    scan: Scan = sample.scan
    n = len(scan)
    sweeps = list(getattr(sample, "sweeps", []) or [])
    in_cams = bool(getattr(sample, "sweeps_in_cameras", False))
    covered = n + (sum(len(sw) for sw, _ in sweeps) if in_cams else 0)
    row = np.full(covered, -1, np.int64)           # point → row of targets (no dense (N, D) copy)
    plab = np.full(covered, -1, np.int64)
    if targets is not None and len(targets):
        row[targets.point_index] = np.arange(len(targets))
        plab[targets.point_index] = targets.labels
    sel = np.arange(n)
    if cfg.max_points is not None and n > cfg.max_points:
        sel = np.sort(rng.choice(n, cfg.max_points, replace=False))
    r = row[sel]
    has = r >= 0
    rows = [r[has]]
    key = scan.select(sel)
    scans = [key]
    sweep_has, sweep_lab = [], []
    if cfg.use_sweeps:
        offset = n
        for sw, T in sweeps:
            full = len(sw)
            s_sel = np.arange(full)
            if cfg.max_sweep_points is not None and full > cfg.max_sweep_points:
                s_sel = np.sort(rng.choice(full, cfg.max_sweep_points, replace=False))
                sw = sw.select(s_sel)
            # the same arithmetic the teacher cache projects (camera_scan): the same points
            scans.append(_with_xyz(sw, aligned_sweep_xyz(sw, T)))
            if in_cams:                   # this sweep's rows of the targets follow the earlier ones
                sr = row[offset + s_sel]
                sweep_has.append(sr >= 0)
                sweep_lab.append(plab[offset + s_sel])
                rows.append(sr[sr >= 0])
                offset += full
    have = targets is not None and len(targets)
    pfeat = (targets.features[np.concatenate(rows)].astype(np.float32) if have
             else np.zeros((0, embed_dim), np.float32))
    if augment and cfg.augment.enabled:
        M = _augment_matrix(cfg.augment, rng)
        scans = [_transform_scan(s, M) for s in scans]
    gt = None if getattr(sample, "labels", None) is None else np.asarray(sample.labels)[sel]
    return Prepared(scans, sel, has, pfeat, plab[sel], gt, str(getattr(sample, "token", "")), n,
                    sweep_has, sweep_lab)


class TrainDataset(torch.utils.data.Dataset):
    """Reader + teacher cache → ``Prepared`` samples; ``set_epoch`` reseeds the augmentation."""

    def __init__(self, reader: Sequence[Any], cfg: DataConfig, seed: int, embed_dim: int,
                 cache: TeacherCache | None = None, text_emb: torch.Tensor | None = None,
                 augment: bool = True, need_labels: bool = False,
                 label_map: np.ndarray | None = None) -> None:
        self.reader, self.cfg, self.seed = with_sweeps_in_cameras(reader, cfg), cfg, int(seed)
        self.label_map = label_map            # dataset class index → vocabulary index
        self.cache, self.text_emb = cache, text_emb
        self.augment, self.embed_dim, self.need_labels = augment, embed_dim, need_labels
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.reader)

    def __getitem__(self, index: int) -> Prepared:
        sample = self.reader[index]
        if self.need_labels and getattr(sample, "labels", None) is None:
            raise ConfigError(f"sample '{getattr(sample, 'token', index)}' has no labels")
        targets = None
        if self.cache is not None:
            targets = self.cache.load_sample(sample, self.text_emb)
        rng = np.random.default_rng([self.seed, self.epoch, int(index)])
        prep = prepare_sample(sample, targets, self.cfg, rng, self.augment, self.embed_dim)
        if self.label_map is not None and prep.gt is not None:
            prep.gt = remap_labels(prep.gt, self.label_map)
        return prep


# ----------------------------------------------------------------------------- batches
@dataclass
class Batch:
    """Per-kept-point tensors of a batch (rows follow ``voxels``' kept points)."""

    voxels: Voxels
    sample: torch.Tensor          # (N,) sample index in the batch
    is_key: torch.Tensor          # (N,) bool: key-frame point (not a sweep)
    xyz: torch.Tensor             # (N, 3) float32 in the (augmented) key frame
    has_pixel: torch.Tensor       # (N,) bool (sweep points too with sweeps_to_keyframe_cameras)
    pixel_labels: torch.Tensor    # (N,) int64 (-1 where no pixel)
    pixel_features: torch.Tensor  # (P, D) for the rows where has_pixel, in order
    gt: torch.Tensor | None       # (N,) int64 (-1 for sweeps / ignore)
    point_index: torch.Tensor     # (N,) index in the original key-frame scan (-1 for sweeps)
    num_original: list[int]
    tokens: list[str]

    def to(self, device: torch.device) -> "Batch":
        mv = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return Batch(self.voxels, mv(self.sample), mv(self.is_key), mv(self.xyz), mv(self.has_pixel),
                     mv(self.pixel_labels), mv(self.pixel_features), mv(self.gt), mv(self.point_index),
                     self.num_original, self.tokens)


def make_collate(voxel_cfg: VoxelConfig) -> Callable[[list[Prepared]], Batch]:
    def collate(items: list[Prepared]) -> Batch:
        return collate_prepared(items, voxel_cfg)
    return collate


def collate_prepared(items: list[Prepared], voxel_cfg: VoxelConfig) -> Batch:
    """Key frames first (batch rows 0..B-1), then every sweep as its own batch row, so the
    network sees each sweep separately and SSR fuses them in the key frame's grid."""
    scans, sample_id, is_key, pix_row, pix_lab, pix_feat, gt, pidx = [], [], [], [], [], [], [], []
    with_gt = all(it.gt is not None for it in items)
    # next row of ``pixel_features`` per item: items' rows are concatenated in item order,
    # each the key frame's then its sweeps' (visited in that order below)
    nxt = np.cumsum([0] + [len(it.pixel_features) for it in items])[:-1]
    pix_feat = [it.pixel_features for it in items]
    order = [(b, 0) for b in range(len(items))] + [(b, s) for b, it in enumerate(items)
                                                     for s in range(1, len(it.scans))]
    for b, s in order:
        it = items[b]
        sc = it.scans[s]
        n = len(sc)
        scans.append(sc)
        sample_id.append(np.full(n, b, np.int64))
        is_key.append(np.full(n, s == 0))
        if s == 0:
            has, lab = it.has_pixel, it.pixel_labels
        elif s - 1 < len(it.sweep_has_pixel):
            has, lab = it.sweep_has_pixel[s - 1], it.sweep_pixel_labels[s - 1]
        else:
            has, lab = np.zeros(n, bool), np.full(n, -1, np.int64)
        r = np.full(n, -1, np.int64)
        r[has] = nxt[b] + np.arange(int(has.sum()))
        nxt[b] += int(has.sum())
        pix_row.append(r)
        pix_lab.append(lab)
        if s == 0:
            pidx.append(it.point_index.astype(np.int64))
            if with_gt:
                gt.append(it.gt.astype(np.int64))
        else:
            pidx.append(np.full(n, -1, np.int64))
            if with_gt:
                gt.append(np.full(n, -1, np.int64))
    vox = voxelize(scans, voxel_cfg)
    m = vox.point_mask
    xyz = np.concatenate([s.xyz for s in scans])[m]
    rows = np.concatenate(pix_row)[m]
    has = rows >= 0
    dim = max((f.shape[1] for f in pix_feat), default=0)
    feats = np.concatenate(pix_feat) if pix_feat else np.zeros((0, dim), np.float32)
    return Batch(
        voxels=vox,
        sample=torch.from_numpy(np.concatenate(sample_id)[m]),
        is_key=torch.from_numpy(np.concatenate(is_key)[m]),
        xyz=torch.from_numpy(np.ascontiguousarray(xyz, dtype=np.float32)),
        has_pixel=torch.from_numpy(has),
        pixel_labels=torch.from_numpy(np.concatenate(pix_lab)[m]),
        pixel_features=torch.from_numpy(np.ascontiguousarray(feats[rows[has]], dtype=np.float32)),
        gt=torch.from_numpy(np.concatenate(gt)[m]) if with_gt else None,
        point_index=torch.from_numpy(np.concatenate(pidx)[m]),
        num_original=[it.num_original for it in items],
        tokens=[it.token for it in items],
    )


def epoch_batches(num_samples: int, batch_size: int, epoch: int, seed: int, rank: int = 0,
                  world_size: int = 1, shuffle: bool = True) -> list[list[int]]:
    """This rank's batches of ``epoch``: one permutation per (seed, epoch), padded by wrapping so
    every rank runs the same number of steps (DDP needs equal step counts)."""
    if num_samples <= 0:
        raise ConfigError("the dataset is empty")
    order = (np.random.default_rng([seed, epoch, 7919]).permutation(num_samples) if shuffle
             else np.arange(num_samples))
    per_rank = int(math.ceil(num_samples / world_size))
    steps = int(math.ceil(per_rank / batch_size))
    total = steps * batch_size * world_size
    order = np.resize(order, total)           # wraps around
    mine = order[rank::world_size]
    return [mine[i * batch_size:(i + 1) * batch_size].tolist() for i in range(steps)]


def make_loader(dataset: TrainDataset, batches: list[list[int]], voxel_cfg: VoxelConfig,
                num_workers: int = 0) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(dataset, batch_sampler=batches, collate_fn=make_collate(voxel_cfg),
                                       num_workers=num_workers, persistent_workers=False,
                                       pin_memory=torch.cuda.is_available())
