"""Segmenter + checkpoint on a real nuScenes scan with a tiny random-initialised network."""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from clip2scene_core.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from clip2scene_core.device import cpu_has_fast_bf16, resolve_precision
from clip2scene_core.clip import ClipTeacher, Vocabulary
from clip2scene_core.errors import CheckpointError, ConfigError
from clip2scene_core.models import ModelConfig, VoxelBatch, build_model
from clip2scene_core.segmenter import Segmenter, SegmenterConfig
from clip2scene_core.types import Calibration, CameraFrame, CameraModel, Scan
from clip2scene_core.voxelize import VoxelConfig, voxelize

EMBED = 32
SCENE = "nuscenes/mmdet3d_demo_scene-0061"
TINY_CLIP = {"embed_dim": EMBED,
             "vision_cfg": {"layers": 2, "width": 64, "head_width": 32, "patch_size": 16,
                            "image_size": 64},
             "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2,
                          "layers": 2}}


def _scan(data_dir: Path, step: int = 4) -> Scan:
    f = next((data_dir / SCENE).glob("*LIDAR_TOP*.pcd.bin"))
    pts = np.fromfile(f, dtype=np.float32).reshape(-1, 5)[::step, :4]
    return Scan(pts, ("x", "y", "z", "intensity"), frame_id="LIDAR_TOP")


def _checkpoint(seed: int = 0) -> Checkpoint:
    torch.manual_seed(seed)
    cfg = ModelConfig(backbone="minkunet14a", in_channels=1, embed_dim=EMBED, width_multiplier=0.25,
                      voxel=VoxelConfig(voxel_size=0.2, point_range=(-60, -60, -6, 60, 60, 6),
                                        features=("intensity",)))
    model = build_model(cfg)
    vocab = Vocabulary.preset("nuscenes16")
    emb = F.normalize(torch.randn(len(vocab.class_names), EMBED), dim=1)
    return Checkpoint(cfg, model.state_dict(), vocab, emb, "tiny-random", {"note": "test"})


@pytest.fixture(scope="module")
def ckpt_path(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("ckpt") / "model.pt"
    save_checkpoint(p, _checkpoint())
    return p


def test_round_trip_and_labels_are_nearest_text_embedding(ckpt_path, data_dir):
    scan = _scan(data_dir)
    # fp32: `auto` picks bf16 on CPUs with native bf16 (AVX512-BF16/AMX), whose labels may differ
    # from the fp32 re-computation below on near-ties (tested in the precision tests)
    seg = Segmenter.load(ckpt_path, device="cpu", config=SegmenterConfig(device="cpu", sparse_precision="fp32"))
    assert seg.class_names == list(Vocabulary.preset("nuscenes16").class_names)
    res = seg.segment(scan)
    assert res.labels.shape == (len(scan),) and res.scores.dtype == np.float32
    assert res.valid.all() == (res.labels >= 0).all()
    assert (res.labels[res.valid] < len(seg.class_names)).all()
    assert ((res.scores[res.valid] > 0) & (res.scores[res.valid] <= 1)).all()
    # independent re-computation: network features → cosine with text → argmax
    ck = load_checkpoint(ckpt_path)
    model = build_model(ck.model_config)
    model.load_state_dict(ck.state_dict)
    model.eval()
    vox = voxelize([scan], ck.model_config.voxel)
    with torch.no_grad():
        out = model(VoxelBatch.from_voxels(vox, "cpu"))
    sim = F.normalize(out.local, dim=1) @ F.normalize(ck.text_embeddings, dim=1).t()
    np.testing.assert_array_equal(res.labels[vox.point_mask], sim.argmax(1).numpy())
    assert len(np.unique(res.labels[res.valid])) > 1


def test_bad_points_are_dropped_not_mislabelled(ckpt_path, data_dir):
    scan = _scan(data_dir, step=8)
    pts = scan.points.copy()
    pts[:10, 0] = np.nan
    pts[10:20, 1] = np.inf
    pts[20:25, :3] = 1e4  # outside the voxel range
    res = Segmenter.load(ckpt_path, device="cpu").segment(Scan(pts, scan.fields))
    assert (res.labels[:25] == -1).all() and (res.scores[:25] == 0).all()
    lo, hi = np.array([-60, -60, -6]), np.array([60, 60, 6])
    in_range = np.all((pts[:, :3] >= lo) & (pts[:, :3] < hi), axis=1)
    assert not res.valid[:25].any()
    np.testing.assert_array_equal(res.valid, in_range)
    assert in_range[25:].mean() > 0.95
    assert res.info["points_dropped"] == int((~in_range).sum())


def test_empty_and_all_nan_scans(ckpt_path):
    seg = Segmenter.load(ckpt_path, device="cpu")
    empty = seg.segment(Scan(np.zeros((0, 4), np.float32)))
    assert len(empty) == 0
    nan = seg.segment(Scan(np.full((5, 4), np.nan, np.float32)))
    assert (nan.labels == -1).all() and nan.info["points_dropped"] == 5


def test_corrupt_and_mismatched_checkpoints_are_refused(ckpt_path, tmp_path):
    raw = ckpt_path.read_bytes()
    (tmp_path / "trunc.pt").write_bytes(raw[: len(raw) // 2])
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint at all")
    torch.save({"format": "something-else"}, tmp_path / "other.pt")
    data = torch.load(ckpt_path, weights_only=True)
    data.pop("sha256", None)   # crafted files as written before digests: the other checks still run
    torch.save({**data, "version": 99}, tmp_path / "future.pt")
    bad_state = dict(data["state_dict"])
    bad_state.pop(next(iter(bad_state)))
    torch.save({**data, "state_dict": bad_state}, tmp_path / "missing_weights.pt")
    torch.save({**data, "model_config": {**data["model_config"], "bakbone": "x"}}, tmp_path / "badcfg.pt")
    for name, pattern in [("trunc.pt", "corrupt|cannot be read"), ("garbage.pt", "corrupt|cannot be read"),
                          ("other.pt", "not a clip2scene.checkpoint"), ("future.pt", "version 99"),
                          ("missing_weights.pt", "do not fit"), ("badcfg.pt", "bakbone"),
                          ("absent.pt", "not found")]:
        with pytest.raises(CheckpointError, match=pattern):
            Segmenter.load(tmp_path / name, device="cpu")


def test_vocabulary_swap_at_run_time(ckpt_path, data_dir, tmp_path):
    scan = _scan(data_dir, step=8)
    seg = Segmenter.load(ckpt_path, device="cpu")
    with pytest.raises(ConfigError, match="text encoder"):
        seg.set_vocabulary(["road", "car"])
    emb = F.normalize(torch.randn(3, EMBED), dim=1)
    seg.set_vocabulary(["road", "car", "tree"], emb)
    res = seg.segment(scan)
    assert res.class_names == ["road", "car", "tree"] and res.labels.max() <= 2
    with pytest.raises(ConfigError):
        seg.set_vocabulary(["road", "car"], emb)  # 3 embeddings for 2 names
    with pytest.raises(ConfigError):
        seg.set_vocabulary(["road", "road"], emb[:2])
    # with a (tiny, random) CLIP text encoder the names alone are enough
    teacher = ClipTeacher.from_config(TINY_CLIP, seed=0)
    seg.teacher = teacher
    seg.set_vocabulary(["road", "sidewalk", "car", "pedestrian"])
    assert seg.text_embeddings.shape == (4, EMBED)
    torch.testing.assert_close(seg.text_embeddings,
                               F.normalize(teacher.text_embeddings(seg.vocabulary), dim=1))


def _front_camera(data_dir: Path) -> tuple[np.ndarray, Calibration]:
    """The real CAM_FRONT image of the scene and its calibration from the mmdet3d info file."""
    import cv2

    info = pickle.loads((data_dir / SCENE / "n015-2018-07-24-11-22-45+0800.pkl").read_bytes())
    cam = info["data_list"][0]["images"]["CAM_FRONT"]
    img_path = next((data_dir / SCENE).glob("*__CAM_FRONT__*.jpg"))
    image = cv2.cvtColor(cv2.imread(str(img_path)), cv2.COLOR_BGR2RGB)
    calib = Calibration(CameraModel(image.shape[1], image.shape[0], np.asarray(cam["cam2img"])[:3, :3],
                                    distortion_model="none"), np.asarray(cam["lidar2cam"]))
    return image, calib


def test_camera_fusion_uses_teacher_pixels(ckpt_path, data_dir):
    image, calib = _front_camera(data_dir)
    frame = CameraFrame("CAM_FRONT", image, calib)
    scan = _scan(data_dir, step=2)
    teacher = ClipTeacher.from_config(TINY_CLIP, seed=1)
    lidar_only = Segmenter.load(ckpt_path, device="cpu").segment(scan, [frame])
    assert lidar_only.info["cameras_skipped"] == [("CAM_FRONT", "no CLIP teacher loaded")]
    seg = Segmenter.load(ckpt_path, device="cpu", teacher=teacher,
                         config=SegmenterConfig(camera_weight=1.0))
    fused = seg.segment(scan, [frame])
    assert fused.info["cameras_used"] == ["CAM_FRONT"]
    seen = fused.info["points_seen_by_cameras"]
    assert 500 < seen < len(scan)
    # with weight 1 the seen points take the teacher's pixel label, the others keep the 3D label
    from clip2scene_core.geometry import project_points
    proj = project_points(scan.xyz, calib, min_depth=0.5)
    _, geo = teacher.dense_features_with_geometry(image)
    seen_mask = proj.valid.copy()
    seen_mask[proj.valid] = geo.inside(proj.uv[proj.valid])
    seen_mask &= fused.valid  # points outside the voxel range get no label at all
    assert seen_mask.sum() == seen
    pix = teacher.pixel_features(image, proj.uv[seen_mask])
    expect = (F.normalize(pix, dim=1) @ seg.text_embeddings.t()).argmax(1).numpy()
    np.testing.assert_array_equal(fused.labels[seen_mask], expect)
    np.testing.assert_array_equal(fused.labels[~seen_mask], lidar_only.labels[~seen_mask])
    assert (fused.labels[seen_mask] != lidar_only.labels[seen_mask]).any()


def test_camera_predictions_fused_later_equal_inline_fusion(ckpt_path, data_dir):
    """predict_camera + segment(predictions=...) is the inline fusion split in two: same
    labels and scores; each prediction is projected through its own calibration."""
    image, calib = _front_camera(data_dir)
    frame = CameraFrame("CAM_FRONT", image, calib, stamp_ns=7)
    scan = _scan(data_dir, step=4)
    seg = Segmenter.load(ckpt_path, device="cpu", teacher=ClipTeacher.from_config(TINY_CLIP, seed=1))
    inline = seg.segment(scan, [frame])
    pred = seg.predict_camera(frame)
    assert pred.name == "CAM_FRONT" and pred.stamp_ns == 7 and pred.features.dtype == torch.float32
    assert pred.precision == ("bf16" if cpu_has_fast_bf16() else "fp32") and pred.seconds > 0
    later = seg.segment(scan, predictions=[pred])
    np.testing.assert_array_equal(later.labels, inline.labels)
    np.testing.assert_allclose(later.scores, inline.scores, rtol=1e-5, atol=1e-6)
    assert later.info["cameras_used"] == ["CAM_FRONT"]
    assert later.info["points_seen_by_cameras"] == inline.info["points_seen_by_cameras"]
    # the calibration that maps this sweep into the image is the prediction's own: with the
    # camera 10 km ahead, every point is behind it and the sweep is LiDAR-only
    far = np.asarray(calib.lidar_to_camera, dtype=np.float64).copy()
    far[2, 3] -= 1e4
    away = seg.segment(scan, predictions=[pred.with_calibration(Calibration(calib.camera, far))])
    assert away.info["cameras_skipped"] == [("CAM_FRONT", "no point projects into the image")]
    lidar_only = Segmenter.load(ckpt_path, device="cpu").segment(scan)
    np.testing.assert_array_equal(away.labels, lidar_only.labels)
    # fusion off: predictions are ignored as frames are
    off = Segmenter.load(ckpt_path, device="cpu", config=SegmenterConfig(camera_fusion=False))
    np.testing.assert_array_equal(off.segment(scan, predictions=[pred]).labels, lidar_only.labels)
    with pytest.raises(ConfigError):
        off.predict_camera(frame)          # no teacher


def test_cpu_bf16_answer_can_be_forced_by_the_environment(monkeypatch):
    """CLIP2SCENE_CPU_BF16 overrides the CPU-flag answer (the suite sets 0: fp32 references)."""
    cpu = torch.device("cpu")
    try:
        for value, expected in (("1", "bf16"), ("0", "fp32")):
            monkeypatch.setenv("CLIP2SCENE_CPU_BF16", value)
            cpu_has_fast_bf16.cache_clear()
            assert resolve_precision("auto", cpu) == expected
        monkeypatch.delenv("CLIP2SCENE_CPU_BF16")
        cpu_has_fast_bf16.cache_clear()
        flags = open("/proc/cpuinfo").read() if Path("/proc/cpuinfo").is_file() else ""
        if "avx512_bf16" not in flags and "amx_bf16" not in flags:
            assert cpu_has_fast_bf16() is False         # the flags decide without the override
    finally:
        cpu_has_fast_bf16.cache_clear()


def test_teacher_precision_choice():
    cpu = torch.device("cpu")
    # auto: bf16 only where the CPU has it natively (emulated bf16 is ~10x slower than fp32)
    assert resolve_precision("auto", cpu) == ("bf16" if cpu_has_fast_bf16() else "fp32")
    assert resolve_precision("auto", torch.device("cuda")) == "fp16"
    assert resolve_precision("bf16", cpu) == "bf16" and resolve_precision("fp32", cpu) == "fp32"
    for bad in ("fp8", "half"):
        with pytest.raises(ConfigError):
            resolve_precision(bad, cpu)
    with pytest.raises(ConfigError):
        resolve_precision("fp16", cpu)


def test_vocabulary_from_saved_embedding_file(ckpt_path, data_dir, tmp_path):
    from clip2scene_core.clip import save_text_embeddings

    vocab = Vocabulary.from_names(["road", "building", "vegetation"], name="street")
    emb = F.normalize(torch.randn(3, EMBED), dim=1)
    save_text_embeddings(tmp_path / "street.pt", vocab, emb, "tiny-random")
    seg = Segmenter.load(ckpt_path, device="cpu")
    seg.load_vocabulary_file(tmp_path / "street.pt")
    assert seg.class_names == ["road", "building", "vegetation"]
    torch.testing.assert_close(seg.text_embeddings, emb)
    res = seg.segment(_scan(data_dir, step=16))
    assert set(np.unique(res.labels[res.valid])) <= {0, 1, 2}
    # embeddings of another CLIP model, or of another width, are refused
    save_text_embeddings(tmp_path / "other.pt", vocab, emb, "ViT-B-16")
    with pytest.raises(CheckpointError, match="ViT-B-16"):
        seg.load_vocabulary_file(tmp_path / "other.pt")
    save_text_embeddings(tmp_path / "wide.pt", vocab, F.normalize(torch.randn(3, 64), dim=1), "tiny-random")
    with pytest.raises(CheckpointError, match="dimension"):
        seg.load_vocabulary_file(tmp_path / "wide.pt")
    assert seg.class_names == ["road", "building", "vegetation"]  # a refused file changes nothing


def test_segment_cli_writes_labels_and_render(ckpt_path, data_dir, tmp_path):
    from clip2scene_core import cli

    scan_file = next((data_dir / SCENE).glob("*LIDAR_TOP*.pcd.bin"))
    bad = tmp_path / "bad.bin"
    bad.write_bytes(b"\0" * 22)    # not a whole number of 5-float points
    out = tmp_path / "out"
    rc = cli.main([str(scan_file), str(bad), "--checkpoint", str(ckpt_path), "--device", "cpu",
                   "--fields", "x,y,z,intensity,ring", "--out", str(out)])
    assert rc == 0                 # the bad file is skipped with a message, the good one labelled
    stem = scan_file.name.split(".")[0]
    labels = np.load(out / f"{stem}.labels.npy")
    assert labels.shape == (34688,) and labels.max() < 16 and (labels >= 0).mean() > 0.9
    assert (out / f"{stem}_bev.png").stat().st_size > 10_000
    import json
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary) == [scan_file.name] and summary[scan_file.name]["points"] == 34688
    assert cli.main([str(scan_file), "--checkpoint", str(tmp_path / "missing.pt")]) == 2
