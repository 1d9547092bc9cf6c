"""Replay tool end to end: converted real bags → the node's pipeline → output bag + report.

The segmenter is the real one (tiny random-initialised network from a real checkpoint file),
so its labels are arbitrary but deterministic; the tests check plumbing, geometry and metrics.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from clip2scene_core.checkpoint import Checkpoint, save_checkpoint
from clip2scene_core.clip import Vocabulary
from clip2scene_core.datasets import NuScenesReader
from clip2scene_core.geometry import project_points
from clip2scene_core.models import ModelConfig, build_model
from clip2scene_core.palette import palette_for
from clip2scene_core.types import Calibration
from clip2scene_core.voxelize import VoxelConfig
from clip2scene_ros import replay
from clip2scene_ros.bag import (LABEL_CLASSES_TOPIC, LABELS_TOPIC, BagReader, BagWriter,
                                write_ros1_bag)
from clip2scene_ros.image import camera_info_to_model
from clip2scene_ros.msgs import MessageFactory, header_stamp_ns
from clip2scene_ros.node_config import NodeConfig
from clip2scene_ros.pointcloud2 import (UINT16, UNLABELED, create_cloud, labeled_cloud,
                                        make_point_field, read_points, unpack_rgb)
from training.tools import nuscenes_to_bag, semantickitti_to_bag

NUS3 = "nuscenes/dororo99_v1.0-extract_3samples"
TABLES = "v1.0-extract-subset"
OUT_TOPIC = "/clip2scene_segmenter/labeled_points"


def _checkpoint(path: Path, preset: str) -> Path:
    torch.manual_seed(0)
    cfg = ModelConfig(backbone="minkunet14a", in_channels=1, embed_dim=32, width_multiplier=0.25,
                      voxel=VoxelConfig(voxel_size=0.3, point_range=(-60, -60, -6, 60, 60, 6),
                                        features=("intensity",)))
    vocab = Vocabulary.preset(preset)
    emb = F.normalize(torch.randn(len(vocab.class_names), 32), dim=1)
    save_checkpoint(path, Checkpoint(cfg, build_model(cfg).state_dict(), vocab, emb, "tiny-random", {}))
    return path


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("replay")


@pytest.fixture(scope="module")
def nus_ckpt(work) -> Path:
    return _checkpoint(work / "nus.pt", "nuscenes16")


@pytest.fixture(scope="module")
def nus_bag(work, data_dir) -> Path:
    out = work / "nus_in"
    # the two key frames of scene-0523 (one vehicle, one calibration)
    assert nuscenes_to_bag.main(["--root", str(data_dir / NUS3), "--version-dir", TABLES,
                                 "--out", str(out), "--max-samples", "2", "--quiet"]) == 0
    return out


@pytest.fixture(scope="module")
def replayed(work, nus_bag, nus_ckpt) -> tuple[Path, dict]:
    out = work / "nus_out"
    rc = replay.main([str(nus_bag), "--out", str(out), "--checkpoint", str(nus_ckpt),
                      "--device", "cpu", "--copy-inputs", "--render-frames", "0",
                      "--no-progress", "--quiet"])
    assert rc == 0
    report = json.loads((work / "nus_out_report" / "report.json").read_text())
    return out, report


def _messages(bag: Path) -> list:
    with BagReader(bag) as r:
        return list(r.messages())


def test_output_bag_round_trip(replayed, nus_bag, nus_ckpt):
    out, report = replayed
    inputs = _messages(nus_bag)
    outputs = _messages(out)
    clouds_in = [m for m in inputs if m.topic == "/lidar_top/points"]
    clouds_out = [m for m in outputs if m.topic == OUT_TOPIC]
    assert len(clouds_in) == len(clouds_out) == 2
    # --copy-inputs: every input message is in the output bag as well
    for topic in {m.topic for m in inputs}:
        assert sum(m.topic == topic for m in outputs) == sum(m.topic == topic for m in inputs), topic
    names = report["class_names"]
    assert names == list(Vocabulary.preset("nuscenes16").class_names)
    pal = palette_for(names)
    for cin, cout in zip(clouds_in, clouds_out):
        assert cout.log_time_ns == cin.log_time_ns
        assert header_stamp_ns(cout.msg) == header_stamp_ns(cin.msg)
        assert cout.msg.header.frame_id == cin.msg.header.frame_id == "lidar_top"
        pts_in, pts = read_points(cin.msg), read_points(cout.msg)
        assert pts.dtype.names == ("x", "y", "z", "intensity", "label", "score", "rgb")
        assert pts.size == pts_in.size
        for f in ("x", "y", "z", "intensity"):
            np.testing.assert_array_equal(pts[f], pts_in[f])
        assert pts.dtype["label"] == np.uint32
        lab = pts["label"].astype(np.int64)
        labelled = lab != 65535
        assert labelled.mean() > 0.9 and lab[labelled].max() < len(names)
        assert np.all((pts["score"][labelled] > 0) & (pts["score"][labelled] <= 1))
        np.testing.assert_array_equal(unpack_rgb(pts["rgb"])[labelled], pal[lab[labelled]])


def test_report_latency_drops_and_renders(replayed):
    out, report = replayed
    f = report["frames"]
    assert (f["lidar_messages"], f["processed"], f["ok"], f["written"]) == (2, 2, 2, 2)
    assert report["dropped"] == {} and report["cameras_skipped"] == {}
    for stage in ("convert", "voxelize", "infer", "publish", "total"):
        s = report["latency_ms"][stage]
        assert 0 <= s["p50"] <= s["p95"] <= s["max"] and s["n"] == 2
    assert report["throughput"]["frames_per_s_pipeline"] > 0
    for rec in report["per_frame"]:
        # no teacher and no overlays written: the six images are matched but not decoded
        assert rec["cameras_used"] == [] and rec["cameras_skipped"] == {}
        assert sorted(rec["cameras_idle"]) == ["cam_back", "cam_back_left", "cam_back_right",
                                               "cam_front", "cam_front_left", "cam_front_right"]
    assert report["tf"]["fixed_frame"] == "map" and report["tf"]["fixed_frame_fallbacks"] == 0
    assert not report["bag"]["truncated"] and report["bag"]["missing_messages"] == 0
    assert report["evaluation"] is None   # no ground truth in nuScenes key frames
    renders = [Path(p) for p in report["renders"]]
    assert {p.name for p in renders} >= {"frame_0000_bev.png", "frame_0000_cam_front.png"}
    assert all(p.is_file() and p.stat().st_size > 10_000 for p in renders)
    assert len(renders) == 7


def test_replayed_points_project_like_the_dataset_calibration(replayed, nus_ckpt, data_dir):
    """The LiDAR → camera transform replay hands the pipeline (from the bag's TF, camera at
    the image stamp, LiDAR at the sweep stamp) + the bag's CameraInfo project the replayed
    points exactly where the core projection with the dataset's calibration puts them."""
    out, _ = replayed
    msgs = _messages(out)
    sample = NuScenesReader(data_dir / NUS3, TABLES)[0]
    opts = replay.ReplayOptions(bag=out, out=out.parent / "unused",
                                config=NodeConfig(checkpoint=str(nus_ckpt), device="cpu"))
    rp = replay.Replay(opts)
    for m in msgs:
        if m.topic in ("/tf", "/tf_static"):
            rp._add_tf(m.msg, static=m.topic == "/tf_static")
    cloud = next(m.msg for m in msgs if m.topic == OUT_TOPIC)
    pts = read_points(cloud)
    xyz = np.stack([pts["x"], pts["y"], pts["z"]], axis=1).astype(np.float64)
    sweep_stamp = header_stamp_ns(cloud)
    assert rp.fixed_frame() == "map"   # the params' default "auto": the bag's world frame
    plain_shift = []
    for cam in sample.cameras:
        name = cam.name.lower()
        info = next(m.msg for m in msgs if m.topic == f"/{name}/camera_info"
                    and header_stamp_ns(m.msg) == cam.stamp_ns)
        T = rp.tf_lookup(f"{name}_optical_frame", cam.stamp_ns, "lidar_top", sweep_stamp)
        ours = project_points(xyz, Calibration(camera_info_to_model(info), T))
        ref = project_points(sample.scan.xyz, cam.calibration)
        assert ref.valid.sum() > 1000
        assert np.count_nonzero(ours.valid != ref.valid) <= 2
        both = ours.valid & ref.valid
        np.testing.assert_allclose(ours.uv[both], ref.uv[both], atol=1e-3)
        plain = project_points(xyz, Calibration(camera_info_to_model(info),
                                                rp.tf.lookup(f"{name}_optical_frame", "lidar_top")))
        ok = plain.valid & ref.valid
        plain_shift.append(np.median(np.linalg.norm(plain.uv[ok] - ref.uv[ok], axis=1)))
    # without motion compensation the projection would be off by pixels on this moving car
    assert max(plain_shift) > 5.0
    assert rp.tf_fallbacks == 0


def test_fixed_frame_is_the_node_parameter(tmp_path, nus_ckpt):
    """--fixed-frame overrides the params file's fixed_frame, which is the node's parameter:
    both tools resolve TF with the same setting (clip2scene_ros.tf.TfResolver)."""
    params = tmp_path / "params.yaml"
    params.write_text("clip2scene_segmenter:\n  ros__parameters:\n    fixed_frame: odom\n")
    base = ["in_bag", "--out", str(tmp_path / "out"), "--checkpoint", str(nus_ckpt)]
    parse = lambda *a: replay.options_from_args(replay.build_parser().parse_args(base + list(a)))  # noqa: E731
    assert parse().config.fixed_frame == "auto" == NodeConfig().fixed_frame
    assert parse("--params", str(params)).config.fixed_frame == "odom"
    assert parse("--params", str(params), "--fixed-frame", "none").config.fixed_frame == "none"
    rp = replay.Replay(parse("--params", str(params), "--device", "cpu"))
    assert rp.tf_lookup.fixed_frame == "odom" and rp.fixed_frame() == "odom"


@pytest.fixture(scope="module")
def kitti_bag(work, data_dir) -> Path:
    out = work / "kitti_in"
    assert semantickitti_to_bag.main(["--root", str(data_dir / "semantickitti/mmdet3d_tests"),
                                      "--out", str(out), "--quiet"]) == 0
    return out


def _iou_by_hand(pred: np.ndarray, gt: np.ndarray, k: int) -> list[float | None]:
    out = []
    for c in range(k):
        tp = int(np.sum((pred == c) & (gt == c)))
        fp = int(np.sum((pred == c) & (gt != c) & (gt >= 0)))
        fn = int(np.sum((gt == c) & (pred != c)))
        out.append(tp / (tp + fp + fn) if tp + fp + fn else None)
    return out


def test_miou_of_a_known_prediction(work, kitti_bag):
    """Replay once to learn the (deterministic) prediction, write it back as ground truth with
    known edits (some points relabelled, some ignored, class list in another order), replay
    again: the report's IoUs equal the hand-computed ones."""
    ckpt = _checkpoint(work / "kitti.pt", "semantickitti19")
    first = work / "kitti_first"
    assert replay.main([str(kitti_bag), "--out", str(first), "--checkpoint", str(ckpt),
                        "--device", "cpu", "--no-progress", "--quiet"]) == 0
    cloud = next(m.msg for m in _messages(first) if m.topic == OUT_TOPIC)
    pred = read_points(cloud)["label"].astype(np.int64)
    pred[pred == 65535] = -1                                 # points the segmenter dropped
    assert pred.size == 50 and (pred >= 0).sum() > 30
    model_names = list(Vocabulary.preset("semantickitti19").class_names)

    gt = np.where(pred >= 0, pred, 0)                        # dropped points: misses of class 0
    rng = np.random.default_rng(0)
    flip = rng.choice(np.flatnonzero(pred >= 0), 12, replace=False)
    gt[flip[:8]] = (gt[flip[:8]] + 3) % len(model_names)     # 8 wrong predictions
    gt[flip[8:]] = -1                                        # 4 ignored points
    # ground truth in its own class order and spelling (reversed, dashes)
    gt_names = [n.replace(" ", "-") for n in reversed(model_names)]
    gt_in_gt_space = np.where(gt >= 0, len(model_names) - 1 - gt, -1)

    factory = MessageFactory.from_rosbags()
    relabelled = work / "kitti_known"
    with BagReader(kitti_bag) as r, BagWriter(relabelled, typestore=factory.typestore) as w:
        for m in r.messages():
            if m.topic == LABELS_TOPIC:
                vals = np.where(gt_in_gt_space < 0, 65535, gt_in_gt_space).astype(np.uint16)
                msg = create_cloud(m.msg.header, [make_point_field("label", 0, UINT16, 1, factory)],
                                   vals.reshape(-1, 1), msg_factory=factory)
                w.write(m.topic, msg, m.log_time_ns)
            elif m.topic == LABEL_CLASSES_TOPIC:
                w.write(m.topic, factory.typestore.types["std_msgs/msg/String"](
                    data=json.dumps({"vocabulary": "custom", "class_names": gt_names})),
                    m.log_time_ns, "std_msgs/msg/String")
            else:
                w.write(m.topic, m.msg, m.log_time_ns)

    rc = replay.main([str(relabelled), "--out", str(work / "kitti_second"), "--checkpoint",
                      str(ckpt), "--device", "cpu", "--no-progress", "--quiet"])
    assert rc == 0
    report = json.loads((work / "kitti_second_report" / "report.json").read_text())
    ev = report["evaluation"]
    want = _iou_by_hand(pred, gt, len(model_names))        # in the model's class space
    got = [ev["iou"][gt_names[len(model_names) - 1 - c]] for c in range(len(model_names))]
    assert [w is None for w in want] == [g is None for g in got]
    np.testing.assert_allclose([g for g in got if g is not None], [w for w in want if w is not None])
    present = [w for w in want if w is not None]
    assert ev["miou"] == pytest.approx(sum(present) / len(present))
    assert ev["points"] == 46 and ev["frames"] == 1
    assert 0.0 < ev["miou"] < 1.0
    assert Path(ev["confusion_png"]).is_file()


def test_truncated_input_is_processed_as_far_as_readable(work, nus_bag, nus_ckpt):
    cut = work / "nus_cut"
    shutil.copytree(nus_bag, cut)
    f = next(cut.glob("*.mcap"))
    with open(f, "r+b") as fh:
        fh.truncate(int(f.stat().st_size * 0.75))
    rc = replay.main([str(cut), "--out", str(work / "cut_out"), "--checkpoint", str(nus_ckpt),
                      "--device", "cpu", "--no-progress", "--quiet", "--no-cameras"])
    assert rc == 0
    report = json.loads((work / "cut_out_report" / "report.json").read_text())
    assert report["bag"]["truncated"] and report["bag"]["salvaged"]
    assert report["bag"]["missing_messages"] > 0
    assert report["frames"]["processed"] == report["frames"]["written"] == 1
    with BagReader(work / "cut_out") as r:
        assert r.message_counts == {OUT_TOPIC: 1}
        assert len(list(r.messages())) == 1 and not r.report.damaged


def test_ros1_bag_input(work, nus_bag, nus_ckpt):
    keep = ("/lidar_top/points", "/cam_front/image_raw/compressed", "/cam_front/camera_info",
            "/tf", "/tf_static")
    msgs = [(m.topic, m.msgtype, m.log_time_ns, m.msg) for m in _messages(nus_bag) if m.topic in keep]
    bag1 = write_ros1_bag(work / "nus.bag", msgs)
    rc = replay.main([str(bag1), "--out", str(work / "ros1_out"), "--checkpoint", str(nus_ckpt),
                      "--device", "cpu", "--no-progress", "--quiet", "--max-frames", "1"])
    assert rc == 0
    report = json.loads((work / "ros1_out_report" / "report.json").read_text())
    assert report["bag"]["storage"] == "ros1"
    assert report["frames"]["processed"] == 1 and report["dropped"] == {"beyond --max-frames": 1}
    assert report["per_frame"][0]["cameras_idle"] == ["cam_front"]   # matched, not decoded
    out = [m for m in _messages(work / "ros1_out") if m.topic == OUT_TOPIC]
    assert len(out) == 1 and read_points(out[0].msg).size == 34400


def test_cli_errors(work, kitti_bag, nus_ckpt, capsys):
    assert replay.main([str(kitti_bag), "--out", str(work / "x")]) == 2
    assert "checkpoint" in capsys.readouterr().err
    empty = work / "empty_in"
    with BagWriter(empty) as w:
        w.write("/chatter", MessageFactory.from_rosbags().typestore.types["std_msgs/msg/String"](
            data="hi"), 1, "std_msgs/msg/String")
    assert replay.main([str(empty), "--out", str(work / "y"), "--checkpoint", str(nus_ckpt),
                        "--device", "cpu", "--no-progress"]) == 2
    assert "LiDAR topic" in capsys.readouterr().err
    assert replay.main([str(work / "missing_bag"), "--out", str(work / "z"), "--checkpoint",
                        str(nus_ckpt), "--device", "cpu"]) == 2
    capsys.readouterr()
    assert replay.main([str(kitti_bag), "--out", str(kitti_bag), "--overwrite",
                        "--checkpoint", str(nus_ckpt)]) == 2
    assert "overwrite the input" in capsys.readouterr().err
    assert (kitti_bag / "metadata.yaml").is_file()


def test_ground_truth_from_sidecar_directory(work, kitti_bag, data_dir):
    """``--gt-dir`` with one ``<stamp_ns>.npy`` per scan replaces the bag's label topic."""
    from clip2scene_core.datasets import SemanticKittiReader

    sample = SemanticKittiReader(data_dir / "semantickitti/mmdet3d_tests")[0]
    gt_dir = work / "gt_files"
    gt_dir.mkdir()
    labels = sample.labels.copy()
    labels[:10] = -1
    np.save(gt_dir / f"{10**9}.npy", labels)      # the converter's first stamp: 1 s
    ckpt = work / "kitti.pt" if (work / "kitti.pt").is_file() else _checkpoint(work / "kitti.pt",
                                                                                "semantickitti19")
    assert replay.main([str(kitti_bag), "--out", str(work / "sidecar_out"), "--checkpoint",
                        str(ckpt), "--device", "cpu", "--no-progress", "--quiet",
                        "--gt-dir", str(gt_dir), "--gt-classes", "semantickitti19"]) == 0
    ev = json.loads((work / "sidecar_out_report" / "report.json").read_text())["evaluation"]
    assert ev["frames"] == 1 and ev["points"] == int((labels >= 0).sum())
    assert list(ev["iou"]) == ["car", "bicycle", "motorcycle", "truck", "other-vehicle", "person",
                               "bicyclist", "motorcyclist", "road", "parking", "sidewalk",
                               "other-ground", "building", "fence", "vegetation", "trunk",
                               "terrain", "pole", "traffic-sign"]


def test_ground_truth_reads_uint16_and_uint32_label_clouds(kitti_bag):
    """Ground truth as the converters write it (UINT16) and a labelled output cloud (UINT32)
    used as ground truth: the same sentinel means "ignore" in both."""
    gt_msg = next(m.msg for m in _messages(kitti_bag) if m.topic == LABELS_TOPIC)
    assert [(f.name, f.datatype) for f in gt_msg.fields] == [("label", UINT16)]
    gt = replay.labels_from_cloud(gt_msg)
    raw = read_points(gt_msg)["label"].astype(np.int64)
    np.testing.assert_array_equal(gt, np.where(raw == UNLABELED, -1, raw))
    assert gt.dtype == np.int64 and gt.size == 50
    factory = MessageFactory.from_rosbags()
    xyz = np.zeros((gt.size, 3), np.float32)
    out_cloud = labeled_cloud(gt_msg.header, xyz, gt, np.ones(gt.size), msg_factory=factory)
    assert read_points(out_cloud)["label"].dtype == np.uint32
    np.testing.assert_array_equal(replay.labels_from_cloud(out_cloud), gt)


def test_renders_reuse_the_pipelines_decoded_cameras(work, nus_bag, nus_ckpt, monkeypatch):
    """With overlays on, every camera is decoded and projected once per sweep by the pipeline;
    the frame render draws from those (no second decode), and looks the same as a render that
    decodes for itself (overlays off: the cameras are idle, the renderer decodes them)."""
    from clip2scene_ros.pipeline import SegmentationPipeline

    calls: list[str] = []
    original = SegmentationPipeline.camera_frame

    def counting(self, cam, *a, **kw):
        calls.append(cam.name)
        return original(self, cam, *a, **kw)

    monkeypatch.setattr(SegmentationPipeline, "camera_frame", counting)
    pngs = {}
    for name, extra in (("with_overlays", ["--overlays"]), ("idle", [])):
        calls.clear()
        assert replay.main([str(nus_bag), "--out", str(work / f"render_{name}"), "--checkpoint", str(nus_ckpt),
                            "--device", "cpu", "--render-frames", "0", "--max-frames", "1",
                            "--no-progress", "--quiet", *extra]) == 0
        assert sorted(calls) == sorted(set(calls)) and len(calls) == 6, calls   # once per camera
        report = json.loads((work / f"render_{name}_report" / "report.json").read_text())
        pngs[name] = {Path(p).name: Path(p).read_bytes() for p in report["renders"]}
    assert len(pngs["idle"]) == 7 and pngs["with_overlays"] == pngs["idle"]
