"""SegmentationPipeline on a real nuScenes key frame (scene-0061: LIDAR_TOP + CAM_FRONT JPEG +
calibration from the mmdet3d info .pkl), with a tiny random-initialised checkpoint written
and loaded through the real checkpoint / Segmenter API. Messages are rosbags classes.

The helpers at the top (`nuscenes_frame`, `tiny_checkpoint`, ...) are shared with
test_node_logic.py and test_node_rclpy.py.
"""
from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from clip2scene_core.checkpoint import Checkpoint, save_checkpoint
from clip2scene_core.clip.vocabulary import Vocabulary
from clip2scene_core.errors import ConfigError
from clip2scene_core.models import ModelConfig, build_model
from clip2scene_core.palette import palette_for
from clip2scene_core.segmenter import Segmenter
from clip2scene_core.types import CameraModel
from clip2scene_core.voxelize import VoxelConfig
from clip2scene_ros.image import model_to_camera_info, rgb_to_image
from clip2scene_ros.msgs import MessageFactory, make_header
from clip2scene_ros.pipeline import CameraInput, PipelineConfig, SegmentationPipeline
from clip2scene_ros.pointcloud2 import (FLOAT32, FLOAT64, UINT8, UINT16, UINT32, UNLABELED, create_cloud,
                                        dtype_from_fields, make_point_field, read_points, unpack_rgb)
from clip2scene_ros.sync import SKIP_TIMEOUT, FrameSync, SyncConfig
from clip2scene_ros.tf import TfResolver, TransformBuffer, matrix_to_transform

NUSC = "nuscenes/mmdet3d_demo_scene-0061"
LIDAR_STAMP = 1532402927647951000       # from the file names (µs → ns)
FRONT_STAMP = 1532402927612460000
EMBED_DIM = 24
TEXT_CFG = {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}
TINY_CLIP = {"embed_dim": EMBED_DIM, "text_cfg": TEXT_CFG,
             "vision_cfg": {"image_size": 64, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16}}


# ----------------------------------------------------------------------------- shared helpers
@dataclass
class NuscenesFrame:
    points: np.ndarray        # (N, 5) x y z intensity ring, LIDAR_TOP frame
    rgb: np.ndarray           # CAM_FRONT (900, 1600, 3)
    jpeg: np.ndarray          # the JPEG file bytes
    K: np.ndarray             # CAM_FRONT intrinsics
    lidar2cam: np.ndarray     # 4x4, LIDAR_TOP → CAM_FRONT optical frame


def load_nuscenes(data_dir: Path) -> NuscenesFrame:
    d = data_dir / NUSC
    points = np.fromfile(next(d.glob("*__LIDAR_TOP__*.pcd.bin")), np.float32).reshape(-1, 5)
    info = pickle.loads(next(d.glob("*.pkl")).read_bytes())["data_list"][0]["images"]["CAM_FRONT"]
    jpeg_path = next(d.glob("*__CAM_FRONT__*.jpg"))
    rgb = cv2.cvtColor(cv2.imread(str(jpeg_path)), cv2.COLOR_BGR2RGB)
    return NuscenesFrame(points, rgb, np.fromfile(jpeg_path, np.uint8), np.asarray(info["cam2img"]),
                         np.asarray(info["lidar2cam"]))


def make_cloud(points: np.ndarray, factory: MessageFactory, stamp_ns: int = LIDAR_STAMP,
               frame: str = "LIDAR_TOP", names=("x", "y", "z", "intensity", "ring")) -> Any:
    fields = [make_point_field(n, 4 * i, FLOAT32, 1, factory) for i, n in enumerate(names)]
    return create_cloud(make_header(stamp_ns, frame, factory), fields,
                        np.ascontiguousarray(points[:, :len(names)], dtype=np.float32), msg_factory=factory)


def make_camera(frame: NuscenesFrame, factory: MessageFactory, name: str = "front", *,
                stamp_ns: int = FRONT_STAMP, optical_frame: str = "CAM_FRONT", compressed: bool = True,
                info_size: tuple[int, int] = (1600, 900), K: np.ndarray | None = None) -> CameraInput:
    header = make_header(stamp_ns, optical_frame, factory)
    if compressed:
        image = factory.new("CompressedImage", header=header, format="jpeg",
                            data=factory.uint8_data(frame.jpeg))
    else:
        image = rgb_to_image(frame.rgb, header, factory=factory, encoding="bgr8")
    model = CameraModel(info_size[0], info_size[1], frame.K)
    info = model_to_camera_info(model, make_header(stamp_ns, optical_frame, factory), factory)
    if K is not None:
        info.k = factory.float64_array(K)
    return CameraInput(name, image, info)


def make_tf(frame: NuscenesFrame, factory: MessageFactory) -> TransformBuffer:
    """Static CAM_FRONT ← LIDAR_TOP transform, as a robot's /tf_static would publish it."""
    buf = TransformBuffer()
    buf.add(matrix_to_transform(frame.lidar2cam, factory, "CAM_FRONT", "LIDAR_TOP", LIDAR_STAMP),
            static=True)
    return buf


def make_lookup(frame: NuscenesFrame, factory: MessageFactory, fixed_frame: str = "auto") -> TfResolver:
    """The node's / replay's TF policy over `make_tf` (no world frame there: plain lookups)."""
    return TfResolver(make_tf(frame, factory), fixed_frame)


def tiny_checkpoint(path: Path, seed: int = 0, vocabulary: str = "nuscenes16") -> Path:
    """A random-initialised MinkUNet14A at 1/8 width, 1 m voxels, saved as a real checkpoint."""
    torch.manual_seed(seed)
    cfg = ModelConfig(backbone="minkunet14a", in_channels=1, embed_dim=EMBED_DIM,
                      width_multiplier=0.125, voxel=VoxelConfig(voxel_size=1.0))
    vocab = Vocabulary.preset(vocabulary)
    emb = F.normalize(torch.randn(len(vocab.class_names), EMBED_DIM), dim=1)
    save_checkpoint(path, Checkpoint(cfg, build_model(cfg).state_dict(), vocab, emb, "tiny-test", {}))
    return path


def tiny_teacher():
    from clip2scene_core.clip import ClipTeacher

    return ClipTeacher.from_config(TINY_CLIP, device="cpu", seed=0)


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def factory() -> MessageFactory:
    return MessageFactory.from_rosbags()


@pytest.fixture(scope="module")
def nusc(data_dir) -> NuscenesFrame:
    return load_nuscenes(data_dir)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.pt")


@pytest.fixture(scope="module")
def pipeline(checkpoint, factory, nusc) -> SegmentationPipeline:
    torch.set_num_threads(1)
    seg = Segmenter.load(checkpoint, device="cpu")
    return SegmentationPipeline(seg, PipelineConfig(overlay_radius=0), factory, make_lookup(nusc, factory))


@pytest.fixture(scope="module")
def full_output(pipeline, nusc, factory):
    """The whole 34688-point sweep with the front camera (JPEG)."""
    return pipeline.process(make_cloud(nusc.points, factory), [make_camera(nusc, factory)])


def subsample(points: np.ndarray) -> np.ndarray:
    return points[::8].copy()


# ----------------------------------------------------------------------------- tests
def test_labelled_cloud_of_a_real_sweep(full_output, nusc):
    out = full_output
    assert out.status == "ok" and out.error == ""
    assert out.stamp_ns == LIDAR_STAMP and out.frame_id == "LIDAR_TOP"
    assert out.cloud.header.frame_id == "LIDAR_TOP"
    assert out.cloud.header.stamp.sec * 10**9 + out.cloud.header.stamp.nanosec == LIDAR_STAMP
    pts = read_points(out.cloud)
    assert list(pts.dtype.names) == ["x", "y", "z", "intensity", "label", "score", "rgb"]
    assert pts.dtype["label"] == np.uint32 and pts.dtype["score"] == np.float32
    assert pts.dtype["intensity"] == np.float32          # the input's FLOAT32 intensity
    n = len(nusc.points)
    assert n == 34688 and len(pts) == n == out.points_in == out.points_out
    assert out.dropped_nan == 0 and out.points_labeled == n    # no point_range: every point labelled
    np.testing.assert_array_equal(np.stack([pts["x"], pts["y"], pts["z"], pts["intensity"]], 1),
                                  nusc.points[:, :4])
    names = out.class_names
    assert names == Vocabulary.preset("nuscenes16").class_names
    assert pts["label"].max() < len(names)
    np.testing.assert_array_equal(pts["label"], out.labels)
    assert np.all((pts["score"] > 1.0 / len(names) - 1e-6) & (pts["score"] <= 1.0 + 1e-6))
    np.testing.assert_array_equal(unpack_rgb(pts["rgb"]), palette_for(names)[pts["label"]])
    assert {"convert", "voxelize", "infer", "publish"} <= set(out.timings)
    assert all(v >= 0 for v in out.timings.values())
    assert out.cameras_used == ["front"] and out.cameras_skipped == {}
    # no CLIP teacher loaded: the camera only feeds the overlay, and the output says so
    assert "front" in out.fusion_skipped


def test_overlay_paints_each_projected_point_in_its_label_colour(full_output, nusc):
    overlay = full_output.overlays["front"]
    assert (overlay.width, overlay.height, overlay.encoding) == (1600, 900, "rgb8")
    img = np.asarray(overlay.data, dtype=np.uint8).reshape(900, 1600, 3)
    # project independently: p_cam = lidar2cam · p, pixel = K · p_cam / z
    xyz1 = np.c_[nusc.points[:, :3].astype(np.float64), np.ones(len(nusc.points))]
    cam = (nusc.lidar2cam @ xyz1.T).T[:, :3]
    z = cam[:, 2]
    with np.errstate(divide="ignore", invalid="ignore"):
        uv = (nusc.K @ cam.T).T[:, :2] / z[:, None]
    inside = (z >= 0.5) & (uv[:, 0] >= 0) & (uv[:, 0] < 1600) & (uv[:, 1] >= 0) & (uv[:, 1] < 900)
    # the dataset README's check: 3067 points in CAM_FRONT with depth > 1 m
    assert int(np.count_nonzero(inside & (z > 1.0))) == 3067
    rounded = np.full(uv.shape, -1)
    rounded[inside] = np.round(uv[inside]).astype(int)
    inside &= (rounded[:, 0] < 1600) & (rounded[:, 1] < 900)   # a pixel centre inside the image
    px = rounded[inside]
    colors = palette_for(full_output.class_names)[full_output.labels[inside]]
    keys = px[:, 1] * 1600 + px[:, 0]
    uniq, counts = np.unique(keys, return_counts=True)
    alone = np.isin(keys, uniq[counts == 1])
    assert alone.sum() > 2000
    np.testing.assert_array_equal(img[px[alone, 1], px[alone, 0]], colors[alone])
    # everywhere else the camera image is untouched
    untouched = np.ones((900, 1600), bool)
    untouched[px[:, 1], px[:, 0]] = False
    np.testing.assert_array_equal(img[untouched], nusc.rgb[untouched])


def test_overlays_only_for_the_cameras_asked_for(pipeline, nusc, factory):
    cams = [make_camera(nusc, factory, "front"), make_camera(nusc, factory, "front_copy")]
    out = pipeline.process(make_cloud(subsample(nusc.points), factory), cams,
                           overlay_cameras={"front_copy"})
    # no teacher and no overlay wanted: "front" is not decoded (idle, not a skip)
    assert out.cameras_used == ["front_copy"] and set(out.overlays) == {"front_copy"}
    assert out.cameras_idle == ["front"] and out.cameras_skipped == {}


def test_nan_points_are_dropped_and_counted(pipeline, nusc, factory):
    pts = subsample(nusc.points)
    bad = np.zeros(len(pts), bool)
    bad[::37] = True
    pts[bad[:], 0] = np.nan
    pts[5, 2] = np.inf
    bad[5] = True
    out = pipeline.process(make_cloud(pts, factory))
    assert out.status == "ok"
    assert out.dropped_nan == bad.sum() and out.points_in == len(pts)
    got = read_points(out.cloud)
    assert len(got) == out.points_out == len(pts) - bad.sum()
    np.testing.assert_array_equal(out.kept, ~bad)
    np.testing.assert_array_equal(np.stack([got["x"], got["y"], got["z"]], 1), pts[~bad, :3])


def test_empty_cloud_gives_empty_labelled_cloud(pipeline, nusc, factory):
    out = pipeline.process(make_cloud(nusc.points[:0], factory), [make_camera(nusc, factory)])
    assert out.status == "empty" and out.error == ""
    assert out.cloud.width * out.cloud.height == 0
    assert [f.name for f in out.cloud.fields] == ["x", "y", "z", "intensity", "label", "score", "rgb"]
    assert out.points_labeled == 0 and out.cloud.header.frame_id == "LIDAR_TOP"


def test_all_nan_cloud_is_empty_not_an_error(pipeline, nusc, factory):
    pts = subsample(nusc.points)[:50]
    pts[:, 1] = np.nan
    out = pipeline.process(make_cloud(pts, factory))
    assert out.status == "empty" and out.dropped_nan == 50 and out.points_out == 0


def test_bad_cameras_are_skipped_with_reasons(pipeline, nusc, factory):
    good = make_camera(nusc, factory, "front", compressed=False)
    unknown_encoding = make_camera(nusc, factory, "bad_encoding", compressed=False)
    unknown_encoding.image.encoding = "yuv420_weird"
    wrong_size = make_camera(nusc, factory, "wrong_size", info_size=(800, 450))
    zero_k = make_camera(nusc, factory, "zero_k", K=np.zeros(9))
    no_tf = make_camera(nusc, factory, "no_tf", optical_frame="CAM_NOT_IN_TF")
    broken_jpeg = make_camera(nusc, factory, "broken_jpeg")
    broken_jpeg.image.data = factory.uint8_data(nusc.jpeg[:200])
    cams = [unknown_encoding, good, wrong_size, zero_k, no_tf, broken_jpeg]
    out = pipeline.process(make_cloud(subsample(nusc.points), factory), cams)
    assert out.status == "ok"
    assert out.cameras_used == ["front"] and set(out.overlays) == {"front"}
    reasons = out.cameras_skipped
    assert set(reasons) == {"bad_encoding", "wrong_size", "zero_k", "no_tf", "broken_jpeg"}
    assert "ImageDecodeError" in reasons["bad_encoding"] and "yuv420_weird" in reasons["bad_encoding"]
    assert "CalibrationError" in reasons["wrong_size"]
    assert "1600x900" in reasons["wrong_size"] and "800x450" in reasons["wrong_size"]
    assert "CalibrationError" in reasons["zero_k"]
    assert "TransformError" in reasons["no_tf"] and "CAM_NOT_IN_TF" in reasons["no_tf"]
    assert "ImageDecodeError" in reasons["broken_jpeg"]


def test_tf_lookup_gets_the_camera_at_the_image_stamp_and_the_lidar_at_the_sweep_stamp(
        pipeline, nusc, factory):
    """The pipeline hands both stamps over, so the lookup can compensate the motion between
    them (the node and replay use `TfResolver` for that); what it returns is the calibration."""
    calls = []
    moved = nusc.lidar2cam.copy()
    moved[0, 3] += 0.5   # a different extrinsic: the camera must be calibrated with this one

    def lookup(target, target_stamp, source, source_stamp):
        calls.append((target, target_stamp, source, source_stamp))
        return moved

    cam = make_camera(nusc, factory, stamp_ns=FRONT_STAMP)
    frame = pipeline.camera_frame(cam, "LIDAR_TOP", LIDAR_STAMP, lookup)
    np.testing.assert_array_equal(frame.calibration.lidar_to_camera, moved)
    assert frame.stamp_ns == FRONT_STAMP
    out = pipeline.process(make_cloud(subsample(nusc.points), factory), [cam], tf_lookup=lookup)
    assert out.cameras_used == ["front"]
    assert calls == [("CAM_FRONT", FRONT_STAMP, "LIDAR_TOP", LIDAR_STAMP)] * 2


def test_model_failure_drops_the_frame_and_the_next_one_runs(pipeline, nusc, factory):
    pts = subsample(nusc.points)
    pts[0, :3] = [1e7, 0, 0]   # beyond the voxel grid: the segmenter raises
    out = pipeline.process(make_cloud(pts, factory))
    assert out.status == "error" and out.cloud is None and not out.ok
    assert "segmentation failed" in out.error and "voxel" in out.error
    again = pipeline.process(make_cloud(subsample(nusc.points), factory))
    assert again.status == "ok" and again.points_labeled == len(subsample(nusc.points))


def test_malformed_cloud_is_an_error_output(pipeline, nusc, factory):
    cloud = make_cloud(subsample(nusc.points), factory)
    cloud.data = cloud.data[:-7]
    out = pipeline.process(cloud)
    assert out.status == "error" and out.cloud is None and "invalid PointCloud2" in out.error


def test_cloud_without_intensity(pipeline, nusc, factory):
    out = pipeline.process(make_cloud(subsample(nusc.points), factory, names=("x", "y", "z")))
    assert out.status == "ok"
    assert [f.name for f in out.cloud.fields] == ["x", "y", "z", "label", "score", "rgb"]
    assert any("intensity" in w for w in out.warnings)


def test_sync_skip_reasons_reach_the_output(pipeline, nusc, factory):
    sync = FrameSync(("front", "rear"), SyncConfig(slop=0.05, camera_timeout=0.2))
    sync.add_camera("front", make_camera(nusc, factory), FRONT_STAMP)
    sync.add_camera("rear", make_camera(nusc, factory, "rear"), FRONT_STAMP - 10**9)   # stale
    frames = sync.add_lidar(make_cloud(subsample(nusc.points), factory), LIDAR_STAMP)
    frames += sync.poll(LIDAR_STAMP + 3 * 10**8)
    assert len(frames) == 1
    out = pipeline.process_frame(frames[0])
    assert out.cameras_used == ["front"]
    assert out.cameras_skipped == {"rear": SKIP_TIMEOUT}


def test_class_names_need_a_text_encoder(pipeline):
    assert pipeline.check_class_names(["car", "road"]) is not None
    with pytest.raises(ConfigError):
        pipeline.set_class_names(["car", "road"])
    assert pipeline.check_class_names([]) is None


def test_class_names_change_on_the_next_frame_with_camera_fusion(checkpoint, nusc, factory):
    seg = Segmenter.load(checkpoint, device="cpu", teacher=tiny_teacher())
    pipe = SegmentationPipeline(seg, PipelineConfig(), factory, make_lookup(nusc, factory))
    assert pipe.check_class_names(["car", "car"]) is not None      # duplicates
    assert pipe.check_class_names(["car", " "]) is not None        # blank
    pipe.set_class_names(["car", "road", "building"])
    assert len(pipe.class_names) == 16          # not before the next frame
    pts = subsample(nusc.points)
    out = pipe.process(make_cloud(pts, factory), [make_camera(nusc, factory)])
    assert out.status == "ok" and out.class_names == ["car", "road", "building"]
    assert out.labels.max() < 3 and out.fusion_skipped == {} and "cameras" in out.timings
    got = read_points(out.cloud)
    np.testing.assert_array_equal(unpack_rgb(got["rgb"]),
                                  palette_for(["car", "road", "building"])[got["label"]])
    pipe.set_class_names([])                     # back to the checkpoint's vocabulary
    back = pipe.process(make_cloud(pts, factory))
    assert back.class_names == Vocabulary.preset("nuscenes16").class_names
    assert set(np.unique(read_points(back.cloud)["label"])) <= set(range(16)) | {UNLABELED}


# ----------------------------------------------------------------------------- output layouts
def driver_cloud(points: np.ndarray, factory: MessageFactory, organised: tuple[int, int] | None = None,
                 stamp_ns: int = LIDAR_STAMP) -> Any:
    """A velodyne/ouster-style cloud of a real scan: FLOAT32 x y z, UINT8 intensity, UINT16 ring,
    FLOAT64 time, an old UINT16 label; (H, W) when `organised`."""
    fields = [make_point_field(n, 4 * i, FLOAT32, 1, factory) for i, n in enumerate("xyz")] + [
        make_point_field("intensity", 12, UINT8, 1, factory),
        make_point_field("ring", 14, UINT16, 1, factory),
        make_point_field("time", 16, FLOAT64, 1, factory),
        make_point_field("label", 24, UINT16, 1, factory)]
    dt = dtype_from_fields(fields, 32).newbyteorder("=")
    v = np.zeros(len(points), dtype=dt)
    for i, c in enumerate("xyz"):
        v[c] = points[:, i]
    v["intensity"] = np.nan_to_num(points[:, 3]).astype(np.uint8)    # nuScenes intensity: 0..255
    v["ring"] = np.nan_to_num(points[:, 4]).astype(np.uint16)
    v["time"] = np.linspace(0.0, 0.05, len(points))
    v["label"] = 3
    if organised is not None:
        v = v.reshape(organised)
    return create_cloud(make_header(stamp_ns, "LIDAR_TOP", factory), fields, v, point_step=32,
                        msg_factory=factory)


@pytest.fixture(scope="module")
def segmenter(checkpoint):
    torch.set_num_threads(1)
    return Segmenter.load(checkpoint, device="cpu")


def test_uint8_intensity_stays_uint8_and_the_model_sees_the_same_values(pipeline, nusc, factory):
    pts = subsample(nusc.points)
    out = pipeline.process(driver_cloud(pts, factory))
    ref = pipeline.process(make_cloud(pts, factory))          # FLOAT32 intensity, same values
    assert out.status == "ok"
    types = {f.name: f.datatype for f in out.cloud.fields}
    assert list(types) == ["x", "y", "z", "intensity", "label", "score", "rgb"]
    assert (types["intensity"], types["label"]) == (UINT8, UINT32)
    got = read_points(out.cloud)
    assert got["intensity"].dtype == np.uint8
    np.testing.assert_array_equal(got["intensity"], pts[:, 3].astype(np.uint8))
    np.testing.assert_array_equal(out.labels, ref.labels)     # features are floats either way
    np.testing.assert_array_equal(got["label"], read_points(ref.cloud)["label"])


def test_input_layout_keeps_an_organised_cloud_and_its_fields(segmenter, nusc, factory):
    pts = nusc.points.copy()
    grid_rows = pts.reshape(32, 1084, 5)
    grid_rows[[0, 7, 31]] = np.nan                          # three rings without returns
    grid_rows[10, 100:200, :3] = np.inf
    cloud = driver_cloud(pts, factory, organised=(32, 1084))
    pipe = SegmentationPipeline(segmenter, PipelineConfig(output_layout="input"), factory)
    out = pipe.process(cloud)
    compact = SegmentationPipeline(segmenter, PipelineConfig(), factory).process(cloud)
    bad = ~np.isfinite(pts[:, :3]).all(axis=1)
    assert out.status == "ok" and out.dropped_nan == bad.sum() == 3 * 1084 + 100
    assert (out.cloud.height, out.cloud.width, out.cloud.is_dense) == (32, 1084, False)
    assert out.points_in == out.points_out == len(pts)
    fields = [(f.name, f.offset, f.datatype, f.count) for f in out.cloud.fields]
    assert fields[:6] == [("x", 0, FLOAT32, 1), ("y", 4, FLOAT32, 1), ("z", 8, FLOAT32, 1),
                          ("intensity", 12, UINT8, 1), ("ring", 14, UINT16, 1),
                          ("time", 16, FLOAT64, 1)]
    assert [f[0] for f in fields[6:]] == ["label", "score", "rgb"] and fields[6][2] == UINT32
    grid = read_points(out.cloud, reshape_organized_cloud=True)
    src = read_points(cloud, reshape_organized_cloud=True)
    assert grid.shape == (32, 1084)
    for name in ("x", "y", "z", "intensity", "ring", "time"):
        assert grid[name].dtype == src[name].dtype
        np.testing.assert_array_equal(grid[name], src[name])    # NaN / inf points kept as they were
    flat = grid.reshape(-1)
    np.testing.assert_array_equal(out.kept, ~bad)
    assert (flat["label"][bad] == UNLABELED).all() and (flat["score"][bad] == 0).all()
    # the valid points carry exactly the compact output's values
    comp = read_points(compact.cloud)
    for name in ("x", "y", "z", "intensity", "label", "score", "rgb"):
        np.testing.assert_array_equal(flat[name][~bad], comp[name])
    np.testing.assert_array_equal(flat["label"][~bad], out.labels)
    assert out.filtered_cloud is None


def test_input_layout_of_an_empty_and_an_all_nan_cloud(segmenter, nusc, factory):
    pipe = SegmentationPipeline(segmenter, PipelineConfig(output_layout="input",
                                                          filter_classes=("car",)), factory)
    pts = subsample(nusc.points)[:64].copy()
    pts[:, 0] = np.nan
    out = pipe.process(driver_cloud(pts, factory, organised=(4, 16)))
    assert out.status == "empty" and (out.cloud.height, out.cloud.width) == (4, 16)
    assert (read_points(out.cloud)["label"] == UNLABELED).all()
    assert out.filtered_cloud.width * out.filtered_cloud.height == 0
    empty = pipe.process(driver_cloud(pts[:0], factory))
    assert empty.status == "empty" and empty.cloud.width * empty.cloud.height == 0
    assert [f.name for f in empty.cloud.fields][-3:] == ["label", "score", "rgb"]


@pytest.mark.parametrize("layout", ["compact", "input"])
def test_filtered_cloud_keeps_or_drops_the_named_classes(segmenter, nusc, factory, layout):
    pts = subsample(nusc.points)
    pts[::97, 1] = np.nan
    cloud = driver_cloud(pts, factory)
    plain = SegmentationPipeline(segmenter, PipelineConfig(output_layout=layout), factory).process(cloud)
    assert plain.filtered_cloud is None
    names = plain.class_names
    counts = np.bincount(plain.labels, minlength=len(names))
    present = [names[i] for i in np.argsort(-counts)[:2]]         # the two most frequent classes
    ids = [names.index(n) for n in present]
    main = read_points(plain.cloud)
    valid = np.isfinite(main["x"]) & np.isfinite(main["y"]) & np.isfinite(main["z"])
    assert valid.sum() == len(pts) - len(pts[::97])
    assert len(main) == (len(pts) if layout == "input" else valid.sum())
    for mode in ("keep", "drop"):
        cfg = PipelineConfig(output_layout=layout, filter_classes=(present[0], present[1].upper()),
                             filter_mode=mode)
        out = SegmentationPipeline(segmenter, cfg, factory).process(cloud)
        assert out.warnings == []
        np.testing.assert_array_equal(out.labels, plain.labels)
        got = read_points(out.filtered_cloud)
        assert out.filtered_cloud.height == 1 and out.filtered_cloud.is_dense
        assert [f.name for f in out.filtered_cloud.fields] == [f.name for f in out.cloud.fields]
        hit = valid & np.isin(main["label"], ids)
        want = hit if mode == "keep" else valid & ~hit
        assert len(got) == out.points_filtered == want.sum() > 0
        np.testing.assert_array_equal(got, main[want])
    kept = read_points(SegmentationPipeline(segmenter, PipelineConfig(
        output_layout=layout, filter_classes=tuple(present), filter_mode="keep"), factory).process(cloud)
        .filtered_cloud)
    dropped = read_points(SegmentationPipeline(segmenter, PipelineConfig(
        output_layout=layout, filter_classes=tuple(present), filter_mode="drop"), factory).process(cloud)
        .filtered_cloud)
    assert len(kept) + len(dropped) == valid.sum()


def test_unknown_filter_class_warns_once_per_vocabulary(checkpoint, nusc, factory):
    seg = Segmenter.load(checkpoint, device="cpu", teacher=tiny_teacher())
    cfg = PipelineConfig(filter_classes=("car", "unicorn"), filter_mode="keep")
    pipe = SegmentationPipeline(seg, cfg, factory)
    cloud = make_cloud(subsample(nusc.points), factory)
    first = pipe.process(cloud)
    assert first.status == "ok" and len(first.warnings) == 1
    assert "unicorn" in first.warnings[0] and "'car'" not in first.warnings[0].split("among")[0]
    car = first.class_names.index("car")
    assert (read_points(first.filtered_cloud)["label"] == car).all()
    assert first.points_filtered == int((first.labels == car).sum())
    assert pipe.process(cloud).warnings == []                  # same vocabulary: said once
    pipe.set_class_names(["road", "unicorn", "car"])            # the names follow the vocabulary
    second = pipe.process(cloud)
    assert second.class_names == ["road", "unicorn", "car"] and second.warnings == []
    assert set(np.unique(read_points(second.filtered_cloud)["label"])) <= {1, 2}
    assert second.points_filtered == int(np.isin(second.labels, [1, 2]).sum())
    pipe.set_class_names(["road", "building"])
    third = pipe.process(cloud)
    assert len(third.warnings) == 1 and "car" in third.warnings[0] and "unicorn" in third.warnings[0]
    assert third.points_filtered == 0 and third.filtered_cloud.width == 0


def test_output_options_from_a_node_config():
    from types import SimpleNamespace

    base = dict(publish_overlays=False, overlay_radius=3, min_depth=1.0)
    old = PipelineConfig.from_node_config(SimpleNamespace(**base))    # before NodeConfig has them
    assert (old.output_layout, old.filter_classes, old.filter_mode) == ("compact", (), "keep")
    new = PipelineConfig.from_node_config(SimpleNamespace(
        **base, output_layout="input", filter_classes=["car", " ", "truck"], filter_mode="drop"))
    assert (new.output_layout, new.filter_classes, new.filter_mode) == ("input", ("car", "truck"), "drop")
    assert PipelineConfig(filter_classes=[""]).filter_classes == ()   # ROS's "empty" string array
    with pytest.raises(ConfigError, match="output_layout"):
        PipelineConfig(output_layout="organized")
    with pytest.raises(ConfigError, match="filter_mode"):
        PipelineConfig(filter_mode="exclude")


def test_a_failing_camera_is_skipped_and_counted_and_the_sweep_still_goes_out(pipeline, nusc, factory):
    """Issue 9: a BMP in a CompressedImage (cv2.error), a PNG claiming 20000x20000, a CameraInfo
    with NaN in K and a TF lookup failing with a foreign exception type each skip only their
    camera; the sweep is labelled and the skips are counted in the diagnostics."""
    import struct
    import zlib

    from clip2scene_ros.diagnostics import PipelineStats

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    bmp = bytearray(cv2.imencode(".bmp", np.zeros((2, 3, 3), np.uint8))[1].tobytes())
    bmp[18:26] = struct.pack("<ii", 2**31 - 1, 2**31 - 1)
    huge_png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 20000, 20000, 8, 2, 0, 0, 0))
                + chunk(b"IDAT", zlib.compress(b"\x00" * 60001)) + chunk(b"IEND", b""))
    cams = {name: make_camera(nusc, factory, name) for name in ("front", "bmp", "png", "nan_k")}
    cams["bmp"].image.data = factory.uint8_data(np.frombuffer(bytes(bmp), np.uint8))
    cams["png"].image.data = factory.uint8_data(np.frombuffer(huge_png, np.uint8))
    cams["nan_k"].info.k = factory.float64_array([np.nan] + [0.0] * 8)
    out = pipeline.process(make_cloud(subsample(nusc.points), factory), list(cams.values()))
    assert out.status == "ok" and out.cloud is not None and out.cameras_used == ["front"]
    reasons = out.cameras_skipped
    assert reasons["bmp"].startswith("ImageDecodeError") and "BMP" in reasons["bmp"]
    assert reasons["png"].startswith("ImageDecodeError") and "20000x20000" in reasons["png"]
    assert reasons["nan_k"].startswith("CalibrationError") and "not finite" in reasons["nan_k"]

    def foreign_lookup(*_args):
        raise RuntimeError("backend exploded")

    out2 = pipeline.process(make_cloud(subsample(nusc.points), factory), [cams["front"]],
                            tf_lookup=foreign_lookup)
    assert out2.status == "ok" and out2.cloud is not None and out2.cameras_used == []
    assert out2.cameras_skipped == {"front": "unexpected RuntimeError: backend exploded"}
    stats = PipelineStats()
    stats.on_output(out, 1)
    stats.on_output(out2, 2)
    assert stats.camera_skipped[("bmp", "ImageDecodeError")] == 1
    assert stats.camera_skipped[("front", "unexpected RuntimeError")] == 1


# ----------------------------------------------------------------------------- shared projections
def test_each_camera_is_projected_once_per_sweep_for_fusion_and_overlay(checkpoint, nusc, factory,
                                                                       monkeypatch):
    import clip2scene_core.geometry.projection as projection

    calls = []
    real = projection._project
    monkeypatch.setattr(projection, "_project", lambda *a: calls.append(a) or real(*a))
    seg = Segmenter.load(checkpoint, device="cpu", teacher=tiny_teacher())
    pipe = SegmentationPipeline(seg, PipelineConfig(), factory, make_lookup(nusc, factory))
    pts = subsample(nusc.points)
    out = pipe.process(make_cloud(pts, factory), [make_camera(nusc, factory)])
    assert out.status == "ok" and out.fusion_skipped == {} and set(out.overlays) == {"front"}
    assert len(calls) == 1                      # fusion and the overlay shared one projection
    proj = out.projections["front"]
    assert len(proj) == len(out.labels) == len(pts) and proj.valid.any()


def test_the_node_min_depth_governs_camera_fusion(checkpoint, nusc, factory):
    """Points closer than `min_depth` to the camera are neither drawn nor fused: with a
    min_depth beyond every point, the camera adds nothing to the labels."""
    seg = Segmenter.load(checkpoint, device="cpu", teacher=tiny_teacher())
    assert seg.config.min_depth == 0.5            # the segmenter's own default is not what counts
    lidar_only = Segmenter.load(checkpoint, device="cpu")
    cloud = make_cloud(subsample(nusc.points), factory)
    lookup = make_lookup(nusc, factory)
    near = SegmentationPipeline(seg, PipelineConfig(), factory, lookup).process(
        cloud, [make_camera(nusc, factory)])
    far = SegmentationPipeline(seg, PipelineConfig(min_depth=1000.0), factory, lookup).process(
        cloud, [make_camera(nusc, factory)])
    ref = SegmentationPipeline(lidar_only, PipelineConfig(), factory, lookup).process(cloud)
    assert near.fusion_skipped == {} and near.projections["front"].valid.any()
    assert not far.projections["front"].valid.any()
    assert far.fusion_skipped == {"front": "no point projects into the image"}
    np.testing.assert_array_equal(far.labels, ref.labels)
    np.testing.assert_array_equal(far.scores, ref.scores)
    assert not np.array_equal(near.scores, ref.scores)


def test_segmenter_fuses_given_projections_exactly_as_its_own(checkpoint, nusc):
    """A projection of every point of the scan, rows picked for the points the network kept,
    gives bit for bit the labels of the segmenter projecting the kept points itself."""
    from clip2scene_core.geometry import project_points
    from clip2scene_core.types import Calibration, CameraFrame, Scan

    seg = Segmenter.load(checkpoint, device="cpu", teacher=tiny_teacher())
    pts = subsample(nusc.points)[:, :4].copy()
    pts[::13, :3] = np.nan                        # dropped by the voxeliser: rows must line up
    scan = Scan(pts)
    cal = Calibration(CameraModel(1600, 900, nusc.K), nusc.lidar2cam)
    frame = CameraFrame("front", nusc.rgb, cal)
    own = seg.segment(scan, [frame])
    given = seg.segment(scan, [frame], projections=[project_points(scan.xyz, cal, min_depth=0.5)])
    assert own.info["cameras_used"] == given.info["cameras_used"] == ["front"]
    np.testing.assert_array_equal(given.labels, own.labels)
    np.testing.assert_array_equal(given.scores, own.scores)
    with pytest.raises(ConfigError, match="one per camera"):
        seg.segment(scan, [frame], projections=[])
