"""Camera fusion from folded teacher features (`clip2scene_core.fusion`) against the reference
that samples D features per point, and the front-only projection against the plain formula.

Real inputs: the nuScenes scene-0061 sweep, its six camera images and their calibrations, a
tiny random-initialised CLIP teacher and a random checkpoint (as test_segmenter.py builds).
"""
from __future__ import annotations

import dataclasses
import pickle

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from clip2scene_core.clip import ClipTeacher
from clip2scene_core.clip.preprocess import sample_grid
from clip2scene_core.fusion import (fold_features, folded_probabilities, fuse_into_rows,
                                    sampled_probabilities)
from clip2scene_core.geometry import project_points
from clip2scene_core.geometry.camera import distort, max_valid_radius, to_pixels
from clip2scene_core.segmenter import Segmenter, SegmenterConfig
from clip2scene_core.types import Calibration, CameraFrame, CameraModel

from test_segmenter import SCENE, TINY_CLIP, _checkpoint, _scan

SCALE = 100.0


@pytest.fixture(scope="module")
def cameras(data_dir) -> list[CameraFrame]:
    """The scene's six real images with their calibrations (mmdet3d info file)."""
    root = data_dir / SCENE
    images = pickle.loads(next(root.glob("*.pkl")).read_bytes())["data_list"][0]["images"]
    frames = []
    for name, cam in images.items():
        rgb = cv2.cvtColor(cv2.imread(str(next(root.glob(f"*__{name}__*.jpg")))), cv2.COLOR_BGR2RGB)
        model = CameraModel(rgb.shape[1], rgb.shape[0], np.asarray(cam["cam2img"])[:3, :3])
        frames.append(CameraFrame(name, rgb, Calibration(model, np.asarray(cam["lidar2cam"])), 5))
    assert len(frames) == 6
    return frames


@pytest.fixture(scope="module")
def teacher() -> ClipTeacher:
    torch.set_num_threads(1)
    return ClipTeacher.from_config(TINY_CLIP, seed=1)


def _reference64(features, uv, geo, emb) -> torch.Tensor:
    """The reference in float64: what both float paths approximate."""
    feats = F.normalize(sample_grid(features.double(), uv, geo, normalize=False), dim=1)
    return (SCALE * feats @ emb.double().t()).softmax(dim=1)


def test_folded_probabilities_equal_sampled_features(cameras, teacher, data_dir):
    """Every seen LiDAR point of the six cameras, plus a pixel lattice reaching every border
    and corner (where grid_sample clamps): the same probabilities and the same labels."""
    scan = _scan(data_dir, step=1)
    emb = F.normalize(torch.randn(16, TINY_CLIP["embed_dim"], generator=torch.Generator().manual_seed(3)),
                      dim=1)
    checked = 0
    for frame in cameras:
        dense, geo = teacher.dense_features_with_geometry(frame.image)
        feats = dense[0].float()
        proj = project_points(scan.xyz, frame.calibration)
        h, w = frame.image.shape[:2]
        lattice = np.stack(np.meshgrid(np.linspace(-0.5, w - 0.5, 97), np.linspace(-0.5, h - 0.5, 53)),
                           axis=-1).reshape(-1, 2)
        uv = np.concatenate([proj.uv[proj.valid], lattice])
        uv = uv[geo.inside(uv)]
        folded = fold_features(feats, emb)
        fast = folded_probabilities(folded, uv, geo, SCALE)
        ref = sampled_probabilities(feats, uv, geo, emb, SCALE)
        exact = _reference64(feats, uv, geo, emb)
        assert fast.dtype == torch.float32 and fast.shape == ref.shape == (len(uv), 16)
        # exact to float32 rounding; the float32 reference itself is off by up to a few 1e-5
        # at logit scale 100 (its grid_sample and normalisation round in float32)
        np.testing.assert_allclose(fast.double().numpy(), exact.numpy(), rtol=0, atol=1e-6)
        np.testing.assert_allclose(ref.double().numpy(), exact.numpy(), rtol=0, atol=1e-4)
        np.testing.assert_allclose(fast.numpy(), ref.numpy(), rtol=0, atol=1e-4)
        np.testing.assert_array_equal(fast.argmax(1).numpy(), ref.argmax(1).numpy())
        checked += len(uv)
    assert checked > 20000


def test_fold_is_exact_where_features_are_not_unit(cameras, teacher):
    """Interpolated rows shorten (and a zero cell has no direction): the norm comes from the
    corners' Gram entries, exactly, also for a map whose cells differ wildly in length."""
    dense, geo = teacher.dense_features_with_geometry(cameras[0].image)
    feats = dense[0].float() * torch.linspace(0.0, 3.0, dense.shape[-1])   # column 0 is zero
    emb = F.normalize(torch.randn(5, feats.shape[0], generator=torch.Generator().manual_seed(0)), dim=1)
    h, w = cameras[0].image.shape[:2]
    uv = np.stack(np.meshgrid(np.linspace(0, w - 1, 61), np.linspace(0, h - 1, 31)), -1).reshape(-1, 2)
    fast = folded_probabilities(fold_features(feats, emb), uv, geo, SCALE)
    np.testing.assert_allclose(fast.double().numpy(), _reference64(feats, uv, geo, emb).numpy(),
                               rtol=0, atol=1e-6)


@pytest.mark.parametrize("folded_heads", [True, False])   # voxel rows / point rows
def test_fused_sweep_folded_equals_reference(cameras, teacher, data_dir, folded_heads):
    """segment(predictions=six cameras): folded fusion gives the reference's labels and scores,
    touching only the points the cameras see."""
    scan = _scan(data_dir, step=2)
    ckpt = _checkpoint()
    cfg = SegmenterConfig(device="cpu", folded_heads=folded_heads)
    seg = Segmenter.from_checkpoint(ckpt, teacher, cfg)
    ref = Segmenter.from_checkpoint(ckpt, teacher, dataclasses.replace(cfg, folded_fusion=False))
    preds = [seg.predict_camera(f) for f in cameras]
    for p in preds:      # folded where predicted, for the vocabulary in effect
        assert p.fold.folded is not None and p.fold.folded.matches(seg.text_embeddings)
    fast = seg.segment(scan, predictions=preds)
    slow = ref.segment(scan, predictions=preds)
    lidar = seg.segment(scan)
    np.testing.assert_array_equal(fast.labels, slow.labels)
    np.testing.assert_allclose(fast.scores, slow.scores, rtol=0, atol=5e-5)   # the reference rounds in float32
    assert fast.info["cameras_used"] == slow.info["cameras_used"] == [f.name for f in cameras]
    seen = fast.info["points_seen_by_cameras"]
    assert seen == slow.info["points_seen_by_cameras"] and 2000 < seen < len(scan) * 0.8
    changed = fast.labels != lidar.labels
    assert 0 < changed.sum() <= seen
    # unseen points keep the LiDAR label and score exactly
    unseen = np.ones(len(scan), bool)
    for f in cameras:
        p = project_points(scan.xyz, f.calibration)
        unseen &= ~p.valid
    np.testing.assert_array_equal(fast.labels[unseen], lidar.labels[unseen])
    np.testing.assert_array_equal(fast.scores[unseen], lidar.scores[unseen])
    # inline frames (teacher run in segment) are the same fusion
    inline = seg.segment(scan, cameras)
    np.testing.assert_array_equal(inline.labels, fast.labels)


def test_vocabulary_change_refolds_and_the_copies_share_the_fold(cameras, teacher, data_dir):
    scan = _scan(data_dir, step=4)
    ckpt = _checkpoint()
    seg = Segmenter.from_checkpoint(ckpt, teacher, SegmenterConfig(device="cpu"))
    ref = Segmenter.from_checkpoint(ckpt, teacher, SegmenterConfig(device="cpu", folded_fusion=False))
    pred = seg.predict_camera(cameras[0])
    old = pred.fold.folded
    names = ["car", "road", "tree", "person", "building"]
    emb = F.normalize(torch.randn(5, TINY_CLIP["embed_dim"], generator=torch.Generator().manual_seed(7)), dim=1)
    seg.set_vocabulary(names, emb)
    ref.set_vocabulary(names, emb)
    copy = pred.with_calibration(cameras[0].calibration)     # what a sweep fuses
    fast = seg.segment(scan, predictions=[copy])
    slow = ref.segment(scan, predictions=[copy])
    assert fast.class_names == names
    np.testing.assert_array_equal(fast.labels, slow.labels)
    np.testing.assert_allclose(fast.scores, slow.scores, rtol=0, atol=5e-5)   # the reference rounds in float32
    # re-folded once for the new vocabulary, visible through the original prediction too
    assert pred.fold.folded is not old and pred.fold.folded.matches(seg.text_embeddings)
    assert pred.fold.folded.scores.shape[-1] == 5


def test_fuse_into_rows_blends_only_seen_points():
    rows = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.5, 0.5]])
    point_rows = np.array([0, 0, 1, 2, 2])
    seen = [(np.array([1, 3]), torch.tensor([[0.0, 1.0], [1.0, 0.0]])),
            (np.array([3]), torch.tensor([[0.0, 1.0]]))]
    points, probs = fuse_into_rows(rows, point_rows, seen, 0.5)
    np.testing.assert_array_equal(points, [1, 3])
    torch.testing.assert_close(probs, torch.tensor([[0.45, 0.55], [0.5, 0.5]]))
    none, empty = fuse_into_rows(rows, None, [], 0.5)
    assert none.size == 0 and empty.shape == (0, 2)


def test_projection_of_points_in_front_equals_the_plain_formula(data_dir, cameras):
    """`project_points` runs the lens model on the points in front of the camera only: the
    same uv / depth / valid as the formula over every point, with a distorted lens and
    non-finite points in the sweep."""
    xyz = _scan(data_dir, step=1).xyz.astype(np.float64)
    xyz[::97] = np.nan
    xyz[5::101, 1] = np.inf
    base = cameras[0].calibration
    for cam in (base.camera, dataclasses.replace(base.camera, distortion_model="plumb_bob",
                                                 D=np.array([-0.3, 0.1, 1e-3, -1e-3, 0.02]))):
        calib = Calibration(cam, base.lidar_to_camera)
        got = project_points(xyz, calib, min_depth=0.5)
        T = calib.lidar_to_camera
        with np.errstate(all="ignore"):
            pc = xyz @ T[:3, :3].T + T[:3, 3]
            finite = np.isfinite(pc).all(1)
            front = finite & (pc[:, 2] >= 0.5)
            z = np.where(front, pc[:, 2], 1.0)
            x, y = np.where(front, pc[:, 0] / z, np.nan), np.where(front, pc[:, 1] / z, np.nan)
            uv = to_pixels(cam, *distort(cam, x, y))
            valid = front & (x * x + y * y < max_valid_radius(cam) ** 2) & np.isfinite(uv).all(1) \
                & (uv[:, 0] >= 0) & (uv[:, 0] < cam.width) & (uv[:, 1] >= 0) & (uv[:, 1] < cam.height)
        np.testing.assert_array_equal(got.valid, valid)
        np.testing.assert_allclose(got.uv, uv, rtol=1e-12, atol=1e-9)
        np.testing.assert_allclose(got.depth, np.where(finite, pc[:, 2], np.nan), rtol=1e-12, atol=1e-12)
        assert 1000 < valid.sum() < len(xyz) // 4
