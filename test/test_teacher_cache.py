"""Teacher cache on a real nuScenes key frame with a small random MaskCLIP teacher: content
addressing, resumable builds, stored features = the teacher's, multi-camera merge, errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from clip2scene_core.datasets import NuScenesReader
from clip2scene_core.errors import Clip2SceneError
from clip2scene_core.geometry import project_points
from clip2scene_core.types import CameraFrame, Scan

TEXT_CFG = {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}
VIT_CFG = {"embed_dim": 24, "vision_cfg": {"image_size": 64, "layers": 1, "width": 32, "patch_size": 16,
                                           "head_width": 16}, "text_cfg": TEXT_CFG}


@pytest.fixture(scope="module")
def teacher():
    from clip2scene_core.clip import ClipTeacher, PreprocessConfig

    return ClipTeacher.from_config(VIT_CFG, device="cpu", seed=0, preprocess=PreprocessConfig(short_side=96))


@pytest.fixture(scope="module")
def sample(data_dir):
    reader = NuScenesReader(data_dir / "nuscenes/dororo99_v1.0-extract_3samples", version_dir="v1.0-extract-subset",
                            cameras=("CAM_FRONT", "CAM_FRONT_LEFT"))
    return reader[0]


@pytest.fixture(scope="module")
def text_emb(teacher):
    from clip2scene_core.clip import Vocabulary

    return teacher.text_embeddings(Vocabulary.preset("nuscenes16"), "single", use_cache=False).float().cpu()


def _cache(tmp_path, teacher):
    from training.engine.teacher_cache import Preprocess, TeacherCache, teacher_identity

    ident, pre = teacher_identity(teacher)
    return TeacherCache(tmp_path / "cache", ident, Preprocess(pre, 1.0))


def test_keys_are_content_addressed(tmp_path, teacher, sample):
    from training.engine.teacher_cache import Preprocess, TeacherCache, teacher_identity

    cache = _cache(tmp_path, teacher)
    keys = cache.keys_for(sample.scan, sample.cameras)
    assert len(set(keys)) == 2 and keys == cache.keys_for(sample.scan, sample.cameras)
    cam = sample.cameras[0]
    img = cam.image.copy()
    img[0, 0, 0] ^= 1                                             # one bit of one pixel
    assert cache.keys_for(sample.scan, [CameraFrame(cam.name, img, cam.calibration)])[0] != keys[0]
    pts = sample.scan.points.copy()
    pts[0, 0] += 0.01
    assert cache.keys_for(Scan(pts, sample.scan.fields), sample.cameras[:1])[0] != keys[0]
    other = TeacherCache(tmp_path / "cache", "another-model", cache.preprocess)
    assert other.keys_for(sample.scan, sample.cameras[:1])[0] != keys[0]
    pre2 = TeacherCache(tmp_path / "cache", cache.teacher_id, Preprocess({"preprocess": {"short_side": 224}}, 1.0))
    assert pre2.keys_for(sample.scan, sample.cameras[:1])[0] != keys[0]
    # the identity hashes the weights: a different seed is a different teacher
    from clip2scene_core.clip import ClipTeacher
    assert teacher_identity(ClipTeacher.from_config(VIT_CFG, device="cpu", seed=1))[0] != cache.teacher_id


def test_build_is_resumable_and_stores_teacher_features(tmp_path, teacher, sample, text_emb):
    cache = _cache(tmp_path, teacher)
    stats = cache.build([sample], teacher, text_emb, progress=False)
    assert stats == {"computed": 2, "cached": 0, "samples": 1}
    assert cache.build([sample], teacher, text_emb, progress=False)["computed"] == 0
    keys = cache.keys_for(sample.scan, sample.cameras)
    cache.path(keys[1]).unlink()                                   # as if killed mid-pass
    assert cache.build([sample], teacher, text_emb, progress=False) == {"computed": 1, "cached": 1, "samples": 1}
    assert not list((tmp_path / "cache").rglob("*.tmp"))

    targets = cache.load(sample.scan, sample.cameras, text_emb)
    # first camera: stored features equal the teacher's pixel features of the projected points
    proj = project_points(sample.scan.xyz, sample.cameras[0].calibration, min_depth=1.0)
    idx = np.flatnonzero(proj.valid)
    assert len(idx) > 500
    H, W = sample.cameras[0].image.shape[:2]
    want = teacher.pixel_features(sample.cameras[0].image, np.clip(proj.uv[idx], 0, [W - 1, H - 1])).float()
    first = targets.point_index[: len(idx)]
    assert np.array_equal(first, idx)
    got = torch.from_numpy(targets.features[: len(idx)])
    assert torch.allclose(got, torch.nn.functional.normalize(want, dim=1), atol=2e-3)
    assert np.array_equal(targets.labels[: len(idx)], (want @ text_emb.t()).argmax(1).numpy())
    # every point at most once (overlapping views: first camera wins)
    assert len(np.unique(targets.point_index)) == len(targets)
    assert targets.features.shape == (len(targets), text_emb.shape[1])
    # a different vocabulary relabels from the stored features without recomputing
    perm = text_emb[torch.arange(len(text_emb) - 1, -1, -1)]
    relabelled = cache.load(sample.scan, sample.cameras, perm)
    want_lab = (torch.from_numpy(targets.features) @ torch.nn.functional.normalize(perm, dim=1).t()).argmax(1)
    assert np.array_equal(relabelled.labels, want_lab.numpy())
    assert np.mean(relabelled.labels == len(text_emb) - 1 - targets.labels) > 0.95   # fp16 storage


def test_missing_and_corrupt_entries_are_errors(tmp_path, teacher, sample, text_emb):
    cache = _cache(tmp_path, teacher)
    with pytest.raises(Clip2SceneError, match="teacher pass"):
        cache.load(sample.scan, sample.cameras, text_emb)
    cache.build([sample], teacher, text_emb, progress=False)
    cache.path(cache.keys_for(sample.scan, sample.cameras)[0]).write_bytes(b"garbage")
    with pytest.raises(Clip2SceneError, match="corrupt"):
        cache.load(sample.scan, sample.cameras, text_emb)


def test_dataset_attaches_targets_to_the_right_points(tmp_path, teacher, sample, text_emb):
    """After subsampling and augmentation, each kept point still carries its own pixel target."""
    from training.engine.config import DataConfig
    from training.engine.data import TrainDataset, collate_prepared
    from clip2scene_core.voxelize import VoxelConfig

    cache = _cache(tmp_path, teacher)
    cache.build([sample], teacher, text_emb, progress=False)
    full = cache.load(sample.scan, sample.cameras, text_emb)
    ds = TrainDataset([sample], DataConfig(max_points=5000), seed=0, embed_dim=24, cache=cache, text_emb=text_emb)
    prep = ds[0]
    lookup = dict(zip(full.point_index.tolist(), full.labels.tolist()))
    for j, orig in enumerate(prep.point_index.tolist()):
        assert prep.has_pixel[j] == (orig in lookup)
        if prep.has_pixel[j]:
            assert prep.pixel_labels[j] == lookup[orig]
    assert not np.allclose(prep.scans[0].xyz, sample.scan.xyz[prep.point_index])     # augmented
    ratio = (np.linalg.norm(prep.scans[0].xyz[:, :2], axis=1)
             / np.linalg.norm(sample.scan.xyz[prep.point_index, :2], axis=1))
    assert np.allclose(ratio, ratio[0], rtol=1e-4)                  # one rotation + one scale
    batch = collate_prepared([prep, prep], VoxelConfig(voxel_size=0.2, point_range=(-60, -60, -5, 60, 60, 5)))
    assert batch.pixel_features.shape[0] == int(batch.has_pixel.sum())
    assert set(batch.sample.tolist()) == {0, 1}
    # rows of pixel_features follow the kept points that have a pixel, in order
    row_of = {p: i for i, p in enumerate(full.point_index.tolist())}
    orig = batch.point_index[batch.has_pixel].tolist()
    assert np.array_equal(batch.pixel_features.numpy(), full.features[[row_of[o] for o in orig]])
    assert np.array_equal(batch.pixel_labels[batch.has_pixel].numpy(), full.labels[[row_of[o] for o in orig]])


def test_rosbag_recording_feeds_the_teacher_pass(data_dir, tmp_path, teacher, text_emb):
    """A rosbag2 recording (PointCloud2 + JPEG images + CameraInfo + TF, no labels; written from
    the real nuScenes frames by training/tools/nuscenes_to_bag.py) read through the node's
    sync/TF path gives the same scan and calibration as the dataset reader."""
    from training.engine.config import DataConfig
    from training.engine.data import build_reader
    from training.tools import nuscenes_to_bag

    root = data_dir / "nuscenes/dororo99_v1.0-extract_3samples"
    bag = tmp_path / "rec"
    assert nuscenes_to_bag.main(["--root", str(root), "--version-dir", "v1.0-extract-subset", "--out", str(bag),
                                 "--cameras", "CAM_FRONT", "--max-samples", "2", "--quiet"]) == 0
    reader = build_reader(DataConfig(reader="rosbag", args={"bag": str(bag)}))
    assert len(reader) == 2 and reader[0].labels is None
    ref = NuScenesReader(root, version_dir="v1.0-extract-subset", cameras=("CAM_FRONT",))[0]
    s = reader[0]
    assert np.allclose(s.scan.xyz, ref.scan.xyz)
    assert [c.name for c in s.cameras] == ["cam_front"]
    a = project_points(s.scan.xyz, s.cameras[0].calibration, 1.0)
    b = project_points(ref.scan.xyz, ref.cameras[0].calibration, 1.0)
    assert np.array_equal(a.valid, b.valid) and np.allclose(a.uv[a.valid], b.uv[b.valid], atol=0.05)
    cache = _cache(tmp_path, teacher)
    assert cache.build(reader, teacher, text_emb, progress=False)["computed"] == 2
    assert len(cache.load(s.scan, s.cameras, text_emb)) == int(a.valid.sum())
