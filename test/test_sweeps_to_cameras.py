"""``data.sweeps_to_keyframe_cameras``: sweeps projected into the key-frame cameras.

On a real nuScenes key frame whose sweep is the scene's previous key frame, moved into it by
the real ego poses, with a small random MaskCLIP teacher:

* off, cache keys and targets are those of the key frame alone and no sweep point is paired;
* on, a sweep point gets a pixel target exactly where a direct projection of it (same
  ``project_points`` and min_depth) hits a key-frame camera, equal to the teacher's feature
  and pseudo-label at that pixel; sweep points outside every camera stay unpaired; the
  key frame's targets do not change; batches carry the sweep pairs in order;
* a short pre-training run with the option on trains on those pairs.
"""
from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from clip2scene_core.datasets import NuScenesReader
from clip2scene_core.geometry import project_points

ROOT = Path(__file__).resolve().parents[1]
DORORO = "nuscenes/dororo99_v1.0-extract_3samples"
TEXT_CFG = {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}
VIT_CFG = {"embed_dim": 24, "vision_cfg": {"image_size": 64, "layers": 1, "width": 32, "patch_size": 16,
                                           "head_width": 16}, "text_cfg": TEXT_CFG}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def teacher():
    from clip2scene_core.clip import ClipTeacher, PreprocessConfig

    return ClipTeacher.from_config(VIT_CFG, device="cpu", seed=0, preprocess=PreprocessConfig(short_side=96))


@pytest.fixture(scope="module")
def text_emb(teacher):
    from clip2scene_core.clip import Vocabulary

    return teacher.text_embeddings(Vocabulary.preset("nuscenes16"), "single", use_cache=False).float().cpu()


@pytest.fixture(scope="module")
def sample(data_dir):
    """Key frame 1 of scene-0523 with key frame 0 (0.5 s earlier, ~3 m behind) as its sweep,
    moved into key frame 1's LiDAR frame by the two ego poses (the extract has no sweep files)."""
    reader = NuScenesReader(data_dir / DORORO, version_dir="v1.0-extract-subset",
                            cameras=("CAM_FRONT", "CAM_FRONT_LEFT"))
    prev, key = reader[0], reader[1]
    assert prev.scene == key.scene
    T = np.linalg.inv(key.lidar_to_world) @ prev.lidar_to_world
    return _with_sweeps(key, [(prev.scan, T)])


def _with_sweeps(sample, sweeps):
    out = copy.copy(sample)
    out.sweeps = sweeps
    return out


def _cache(root, teacher):
    from training.engine.teacher_cache import open_cache

    return open_cache(teacher, root, 1.0)


def _data_cfg(on: bool, **kw):
    from training.engine.config import AugmentConfig, DataConfig

    return DataConfig(sweeps_to_keyframe_cameras=on, augment=AugmentConfig(enabled=False), **kw)


def _prepared(sample, cache, text_emb, on: bool, **kw):
    from training.engine.data import TrainDataset

    return TrainDataset([sample], _data_cfg(on, **kw), seed=0, embed_dim=24, cache=cache, text_emb=text_emb,
                        augment=False)[0]


def _direct(teacher, text_emb, cameras, xyz: np.ndarray):
    """(valid, features, labels) of ``xyz`` from projecting into ``cameras`` (first camera
    wins) and sampling the teacher at the pixels, as a reference."""
    n = len(xyz)
    valid = np.zeros(n, bool)
    feats = np.zeros((n, text_emb.shape[1]), np.float32)
    for cam in cameras:
        proj = project_points(xyz, cam.calibration, min_depth=1.0)
        idx = np.flatnonzero(proj.valid & ~valid)
        if not idx.size:
            continue
        H, W = cam.image.shape[:2]
        uv = np.clip(proj.uv[idx], 0.0, [W - 1.0, H - 1.0])
        f = F.normalize(torch.as_tensor(teacher.pixel_features(cam.image, uv)).float(), dim=1)
        feats[idx] = f.numpy()
        valid[idx] = True
    labels = (torch.from_numpy(feats) @ F.normalize(text_emb, dim=1).t()).argmax(1).numpy()
    return valid, feats, np.where(valid, labels, -1)


def test_off_keeps_key_frame_entries_and_leaves_sweeps_unpaired(tmp_path, teacher, text_emb, sample):
    from training.engine.data import build_reader, with_sweeps_in_cameras

    cache = _cache(tmp_path / "cache", teacher)
    keys = cache.keys_for_sample(sample)
    assert keys == cache.keys_for(sample.scan, sample.cameras)         # the key frame's points only
    # the reader is wrapped only when the option is on and sweeps are fed
    assert with_sweeps_in_cameras([sample], _data_cfg(False))[0] is sample
    assert with_sweeps_in_cameras([sample], _data_cfg(True, use_sweeps=False))[0] is sample
    on = with_sweeps_in_cameras([sample], _data_cfg(True))
    assert with_sweeps_in_cameras(on, _data_cfg(True)) is on
    assert cache.keys_for_sample(on[0]) != keys and not getattr(sample, "sweeps_in_cameras", False)
    # a sample without sweeps keys exactly as before with the option on
    bare = with_sweeps_in_cameras([_with_sweeps(sample, [])], _data_cfg(True))[0]
    assert cache.keys_for_sample(bare) == keys
    cfg = _data_cfg(True, reader="NuScenesReader",
                    args={"root": str(ROOT / "test/data" / DORORO), "version_dir": "v1.0-extract-subset"})
    assert getattr(build_reader(cfg)[0], "sweeps_in_cameras", False)

    assert cache.build([sample], teacher, text_emb, progress=False)["computed"] == 2
    prep = _prepared(sample, cache, text_emb, on=False)
    assert prep.sweep_has_pixel == [] and len(prep.scans) == 2
    assert len(prep.pixel_features) == int(prep.has_pixel.sum()) > 0
    t = cache.load_sample(sample, text_emb)
    assert t.point_index.max() < len(sample.scan)


def test_on_gives_sweep_points_the_pixels_a_direct_projection_gives(tmp_path, teacher, text_emb, sample):
    from clip2scene_core.voxelize import VoxelConfig
    from training.engine.data import SweepsInCameras, collate_prepared

    prev, T = sample.sweeps[0]
    # a second sweep (every other point of the first, same pose) so that sweep offsets matter
    two = _with_sweeps(sample, [(prev, T), (prev.select(np.arange(0, len(prev), 2)), T)])
    cache = _cache(tmp_path / "cache", teacher)
    flagged = SweepsInCameras([two])
    assert cache.build([two], teacher, text_emb, progress=False)["computed"] == 2
    assert cache.build(flagged, teacher, text_emb, progress=False)["computed"] == 2   # other keys
    off = _prepared(two, cache, text_emb, on=False, max_sweep_points=12000)
    on = _prepared(two, cache, text_emb, on=True, max_sweep_points=12000)
    # the key frame's targets do not change; the sweeps are the same points either way
    assert np.array_equal(on.has_pixel, off.has_pixel) and np.array_equal(on.pixel_labels, off.pixel_labels)
    k = int(off.has_pixel.sum())
    assert np.array_equal(on.pixel_features[:k], off.pixel_features) and len(off.pixel_features) == k
    assert all(np.array_equal(a.points, b.points) for a, b in zip(on.scans, off.scans))
    assert len(on.sweep_has_pixel) == len(on.scans) - 1 == 2
    row = k
    for j, sc in enumerate(on.scans[1:]):
        # the (subsampled) sweep's points, already in the key frame, projected directly
        assert len(sc) == 12000
        valid, feats, labels = _direct(teacher, text_emb, two.cameras, sc.xyz)
        has = on.sweep_has_pixel[j]
        assert np.array_equal(has, valid)
        assert 100 < int(has.sum()) < len(has) - 100    # some sweep points seen, others outside every camera
        assert np.all(on.sweep_pixel_labels[j][~has] == -1)
        got = on.pixel_features[row:row + int(has.sum())]
        row += int(has.sum())
        np.testing.assert_allclose(got, feats[has], atol=2e-3)          # float16 storage
        assert float((on.sweep_pixel_labels[j][has] == labels[has]).mean()) > 0.99
    assert row == len(on.pixel_features)

    # a batch pairs the kept sweep points with their rows, after the key frame's
    vcfg = VoxelConfig(voxel_size=0.25, point_range=(-60.0, -60.0, -5.0, 60.0, 60.0, 5.0), features=("intensity",))
    batch = collate_prepared([on, off], vcfg)

    def dense(it, s):             # per-point features (NaN: no pixel) and labels of scan s of it
        has = [it.has_pixel] + (it.sweep_has_pixel or [np.zeros(len(x), bool) for x in it.scans[1:]])
        lab = [it.pixel_labels] + (it.sweep_pixel_labels or [np.full(len(x), -1) for x in it.scans[1:]])
        start = sum(int(h.sum()) for h in has[:s])
        d = np.full((len(it.scans[s]), 24), np.nan, np.float32)
        d[has[s]] = it.pixel_features[start:start + int(has[s].sum())]
        return d, lab[s]

    parts = [dense(on, 0), dense(off, 0)] + [dense(on, s) for s in (1, 2)] + [dense(off, s) for s in (1, 2)]
    m = batch.voxels.point_mask
    feats_all = np.concatenate([p[0] for p in parts])[m]
    has_b = batch.has_pixel.numpy()
    assert np.array_equal(has_b, ~np.isnan(feats_all[:, 0]))
    assert np.array_equal(batch.pixel_features.numpy(), feats_all[has_b])
    assert np.array_equal(batch.pixel_labels.numpy(), np.concatenate([p[1] for p in parts])[m])
    sweep_pairs = has_b & ~batch.is_key.numpy()
    assert sweep_pairs.any() and np.all(batch.sample.numpy()[sweep_pairs] == 0)   # only the item with the option
    # teacher agreement and pseudo-labels stay on the key frame's points
    assert np.array_equal(cache.pseudo_labels(flagged[0], text_emb), cache.pseudo_labels(two, text_emb))


def test_a_short_pretraining_run_pairs_sweep_points(tmp_path, sample) -> None:
    from training import pretrain
    from training.engine.config import PretrainConfig, load_training_config
    from training.engine.data import with_sweeps_in_cameras

    data = yaml.safe_load((ROOT / "config/pretrain_demo.yaml").read_text())
    del data["model"]["backbone"], data["model"]["voxel"]["voxel_size"]
    data["loss"] = {"self_training": {"switch_epoch": 1}}
    path = tmp_path / "released.yaml"
    path.write_text(yaml.safe_dump(data))
    cfg = load_training_config(PretrainConfig, path, [
        "recipe=released", "data.max_points=1500", "data.max_sweep_points=1500", "optim.epochs=2",
        "optim.batch_size=1", "model.voxel.point_range=[-60, -60, -5, 60, 60, 5]",
        f"teacher.cache_dir={tmp_path / 'cache'}", f"run.out_dir={tmp_path / 'run'}", "run.progress=false",
        "run.num_threads=1"])
    assert cfg.data.sweeps_to_keyframe_cameras and cfg.data.use_sweeps
    out = pretrain.run(cfg, reader=[sample])                 # run() marks a given reader's samples too
    reader = with_sweeps_in_cameras([sample], cfg.data)
    hist = out["history"]
    assert len(hist) == 2 and all(np.isfinite(h["loss"]) and h["scr"] > 0 and h["ssr"] > 0 for h in hist)
    cache = out["teacher_cache"]
    assert sorted(p.stem for p in (tmp_path / "cache").glob("*/*.npz")) == sorted(cache.keys_for_sample(reader[0]))
    # the pairs of the run's batches include sweep points
    from training.engine.data import TrainDataset, collate_prepared

    ds = TrainDataset(reader, cfg.data, cfg.run.seed, cfg.model.embed_dim, cache, out["text_embeddings"])
    batch = collate_prepared([ds[0]], cfg.model.voxel)
    assert bool((batch.has_pixel & ~batch.is_key).any())
