"""The node's logic without rclpy: PipelineRunner (callbacks → sync → latest-frame slot →
pipeline → messages), diagnostics, parameters (config/segment.yaml ↔ NodeConfig), and the
launch / RViz files checked against them.

Inputs are real: the nuScenes scene-0061 sweep and CAM_FRONT JPEG as rosbags messages, and
a tiny random checkpoint saved and loaded through the real checkpoint API.
"""
from __future__ import annotations

import ast
import os
import importlib.util
import sys
import threading
import types
from pathlib import Path
from typing import List

import pytest
import torch
import yaml

from clip2scene_core.errors import ConfigError
from clip2scene_ros import diagnostics as diag
from clip2scene_ros.msgs import MessageFactory, header_stamp_ns
from clip2scene_ros.node_config import (NODE_NAME, CameraConfig, NodeConfig, camera_specs, flatten,
                                        from_parameters, load_params_file, parameter_specs,
                                        to_parameters)
from clip2scene_ros.pipeline import build_pipeline
from clip2scene_ros.runner import PipelineRunner
from clip2scene_ros.pointcloud2 import read_points
from clip2scene_ros.sync import SKIP_NEVER, SyncConfig

from test_pipeline import (FRONT_STAMP, LIDAR_STAMP, load_nuscenes, make_camera, make_cloud,
                           make_lookup, subsample, tiny_checkpoint)

MS = 1_000_000


class FakeClock:
    """The node's ROS clock, stepped by hand (simulated time)."""

    def __init__(self, now: int) -> None:
        self.now = now

    def __call__(self) -> int:
        return self.now


@pytest.fixture(scope="module")
def factory():
    return MessageFactory.from_rosbags()


@pytest.fixture(scope="module")
def nusc(data_dir):
    return load_nuscenes(data_dir)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.pt")


@pytest.fixture(scope="module")
def pipeline(checkpoint, factory, nusc):
    torch.set_num_threads(1)
    cfg = from_parameters({"checkpoint": str(checkpoint), "device": "cpu", "cameras": ["front"]})
    return build_pipeline(cfg, msg_factory=factory, tf_lookup=make_lookup(nusc, factory))


def runner_for(pipeline, cameras=("front",), clock=None, warnings=None, **sync):
    sync_cfg = SyncConfig(**({"slop": 0.05, "camera_timeout": 0.5} | sync))
    return PipelineRunner(pipeline, cameras, sync_cfg, clock=clock or FakeClock(LIDAR_STAMP),
                          warn=(warnings.append if warnings is not None else None),
                          warn_throttle_s=5.0, device="cpu")


def small_cloud(nusc, factory, stamp=LIDAR_STAMP):
    return make_cloud(subsample(nusc.points), factory, stamp)


# ----------------------------------------------------------------------------- runner
def test_cloud_and_camera_callbacks_produce_labelled_cloud_and_overlay(pipeline, nusc, factory):
    clock = FakeClock(LIDAR_STAMP + 5 * MS)
    runner = runner_for(pipeline, clock=clock)
    cam = make_camera(nusc, factory)
    runner.on_camera("front", cam.image, cam.info)
    runner.on_cloud(small_cloud(nusc, factory))
    assert runner.step(timeout=0) is None          # the image right after the sweep may fit better
    later = make_camera(nusc, factory, stamp_ns=FRONT_STAMP + 100 * MS)
    clock.now += 60 * MS
    runner.on_camera("front", later.image, later.info)
    out = runner.step(timeout=0)
    assert out is not None and out.status == "ok"
    assert out.cameras_used == ["front"] and out.cameras_skipped == {}
    # the image 35 ms before the sweep is used; the one 65 ms after it is outside the slop
    assert header_stamp_ns(out.overlays["front"]) == FRONT_STAMP
    assert header_stamp_ns(out.cloud) == LIDAR_STAMP
    assert len(read_points(out.cloud)) == len(subsample(nusc.points))
    report = runner.diagnostics()
    assert report.level == diag.OK
    assert report.values["frames_ok"] == "1" and report.values["camera.front.used"] == "1"
    assert report.values["device"] == "cpu"
    # latency runs from the sweep's arrival (+5 ms) to its output (+65 ms) on the node's clock
    assert report.values["latency_mean_s"] == "0.0600"


def test_image_waits_for_a_camera_info_then_uses_the_latest(pipeline, nusc, factory):
    """The node's own image/CameraInfo pairing: one (latched) CameraInfo serves every image."""
    clock = FakeClock(LIDAR_STAMP)
    warnings: list[str] = []
    runner = runner_for(pipeline, clock=clock, warnings=warnings)
    cam = make_camera(nusc, factory)
    runner.on_image("front", cam.image)                  # no CameraInfo yet: dropped, said why
    assert any("no CameraInfo" in w for w in warnings)
    runner.on_camera_info("front", cam.info)             # once, as a latched publisher sends it
    for i in range(2):
        offset = i * 100 * MS
        clock.now = LIDAR_STAMP + offset
        runner.on_image("front", make_camera(nusc, factory, stamp_ns=FRONT_STAMP + offset).image)
        runner.on_cloud(small_cloud(nusc, factory, LIDAR_STAMP + offset))
    out = runner.step(timeout=0)                         # the first sweep, closed by image 2
    assert out is not None and out.cameras_used == ["front"] and out.stamp_ns == LIDAR_STAMP
    values = runner.diagnostics().values
    assert values["camera.front.dropped[no CameraInfo yet]"] == "1"


def test_slow_inference_keeps_only_the_newest_frame(pipeline, nusc, factory):
    clock = FakeClock(LIDAR_STAMP)
    runner = runner_for(pipeline, cameras=(), clock=clock)
    for i in range(3):
        clock.now = LIDAR_STAMP + i * 50 * MS
        runner.on_cloud(small_cloud(nusc, factory, LIDAR_STAMP + i * 50 * MS))
    out = runner.step(timeout=0)
    assert out.stamp_ns == LIDAR_STAMP + 100 * MS          # the newest sweep
    assert runner.step(timeout=0) is None                    # nothing queued behind it
    assert runner.stats.dropped_busy == 2 and runner.slot.dropped == 2
    report = runner.diagnostics()
    assert report.level == diag.WARN and report.values["dropped_busy"] == "2"
    assert report.values["frames_in"] == "3" and report.values["frames_ok"] == "1"
    assert runner.diagnostics().level == diag.OK          # no new drops since that report


def test_worker_thread_never_queues(pipeline, nusc, factory):
    """Like node.py: a worker loops on step() while callbacks keep coming."""
    runner = runner_for(pipeline, cameras=(), clock=FakeClock(LIDAR_STAMP))
    outputs = []

    def work():
        while not runner.slot.closed:
            out = runner.step(timeout=0.05)
            if out is not None:
                outputs.append(out)

    worker = threading.Thread(target=work)
    worker.start()
    clouds = [small_cloud(nusc, factory, LIDAR_STAMP + i * 50 * MS) for i in range(6)]
    for cloud in clouds:
        runner.on_cloud(cloud)
    runner.close()
    worker.join(60)
    assert not worker.is_alive()
    leftover = 1 if runner.slot.take(0) is not None else 0
    assert len(outputs) + runner.stats.dropped_busy + leftover == 6
    stamps = [o.stamp_ns for o in outputs]
    assert stamps == sorted(stamps) and all(o.status == "ok" for o in outputs)


def test_camera_that_never_arrives_goes_lidar_only_with_throttled_warning(pipeline, nusc, factory):
    clock = FakeClock(LIDAR_STAMP)
    warnings: list[str] = []
    runner = runner_for(pipeline, clock=clock, warnings=warnings)
    runner.on_cloud(small_cloud(nusc, factory))
    runner.on_timer()
    assert runner.step(timeout=0) is None            # still within camera_timeout
    clock.now += 600 * MS
    runner.on_timer()
    out = runner.step(timeout=0)
    assert out.status == "ok" and out.cameras_used == [] and out.overlays == {}
    assert out.cameras_skipped == {"front": SKIP_NEVER}
    assert [w for w in warnings if "front" in w] == [f"camera 'front' skipped: {SKIP_NEVER}"]
    # the same problem again within the throttle period is not repeated
    clock.now += 100 * MS
    runner.on_cloud(small_cloud(nusc, factory, LIDAR_STAMP + 700 * MS))
    assert runner.step(timeout=0).cameras_skipped == {"front": SKIP_NEVER}
    assert len([w for w in warnings if "front" in w]) == 1
    clock.now += 6000 * MS
    runner.on_cloud(small_cloud(nusc, factory, LIDAR_STAMP + 6800 * MS))
    runner.step(timeout=0)
    assert len([w for w in warnings if "front" in w]) == 2
    assert runner.diagnostics().values[f"camera.front.skipped[{SKIP_NEVER}]"] == "3"


def test_missing_transform_skips_the_camera_and_warns(pipeline, nusc, factory):
    from clip2scene_ros.tf import TfResolver, TransformBuffer, matrix_to_transform

    clock = FakeClock(LIDAR_STAMP)
    warnings: list[str] = []
    runner = runner_for(pipeline, clock=clock, warnings=warnings)
    # the extrinsic was last published (as a dynamic transform) 10 s before the sweep
    stale = TransformBuffer()
    stale.add(matrix_to_transform(nusc.lidar2cam, factory, "CAM_FRONT", "LIDAR_TOP",
                                  LIDAR_STAMP - 10 * 10**9))
    runner.tf_lookup = TfResolver(stale, "auto")   # no world frame in this tree: plain lookups
    outs = []
    for i in range(2):       # every failure names its own image stamp
        stamp = FRONT_STAMP + i * 100 * MS
        cam = make_camera(nusc, factory, stamp_ns=stamp)
        runner.on_camera("front", cam.image, cam.info)
        runner.on_cloud(small_cloud(nusc, factory, LIDAR_STAMP + i * 100 * MS))
        clock.now += 600 * MS
        runner.on_timer()
        outs.append(runner.step(timeout=0))
    assert all(o.status == "ok" and o.cameras_used == [] for o in outs)
    assert all("TransformError" in o.cameras_skipped["front"] for o in outs)
    assert outs[0].cameras_skipped != outs[1].cameras_skipped
    # ...but they are one kind of problem: one warning per throttle period, one counter
    tf_warnings = [w for w in warnings if "not available at" in w]
    assert len(tf_warnings) == 1
    assert runner.diagnostics().values["camera.front.skipped[TransformError]"] == "2"


def test_model_failure_is_reported_and_the_node_keeps_going(pipeline, nusc, factory):
    clock = FakeClock(LIDAR_STAMP)
    warnings: list[str] = []
    runner = runner_for(pipeline, cameras=(), clock=clock, warnings=warnings)
    pts = subsample(nusc.points)
    pts[3, :3] = [0, -3e7, 0]
    runner.on_cloud(make_cloud(pts, factory))
    out = runner.step(timeout=0)
    assert out.status == "error" and out.cloud is None
    report = runner.diagnostics()
    assert report.level == diag.ERROR and "segmentation failed" in report.message
    assert any("segmentation failed" in w for w in warnings)
    clock.now += 100 * MS
    runner.on_cloud(small_cloud(nusc, factory, LIDAR_STAMP + 100 * MS))
    assert runner.step(timeout=0).status == "ok"
    report = runner.diagnostics()
    assert report.level == diag.OK and report.values["frames_failed"] == "1"


def test_runtime_class_names_without_text_encoder_are_refused(pipeline):
    """What the node's parameter callback does: ask the pipeline, refuse with its reason."""
    reason = pipeline.check_class_names(["car", "person"])
    assert reason and "text encoder" in reason
    with pytest.raises(ConfigError):
        build_pipeline(from_parameters({"checkpoint": "x.pt", "class_names": ["car"]}),
                       segmenter=pipeline.segmenter)


# ----------------------------------------------------------------------------- diagnostics
def test_rate_meter_on_real_lidar_stamps(data_dir):
    import json

    rows = json.loads((data_dir / "nuscenes/dororo99_v1.0-extract_3samples/v1.0-extract-subset/"
                       "sample_data.json").read_text())
    stamps = sorted(r["timestamp"] * 1000 for r in rows
                    if "LIDAR_TOP" in r["filename"] and "n008-" in r["filename"])
    meter = diag.RateMeter(window_s=5.0)
    for s in stamps:
        meter.tick(s)
    # two key frames 0.500964 s apart (nuScenes key frames are 2 Hz)
    assert meter.rate(stamps[-1]) == pytest.approx(1 / 0.500964, rel=1e-6)
    assert meter.rate(stamps[-1] + 10 * 10**9) == 0.0      # the window moved past them


def test_warn_throttle():
    t = diag.WarnThrottle(period_s=2.0)
    assert t.should_log("a", 0) and not t.should_log("a", 10**9) and t.should_log("b", 10**9)
    assert t.should_log("a", 2 * 10**9) and t.suppressed["a"] == 1


def test_stats_report_goes_stale_without_output():
    stats = diag.PipelineStats(device="cuda:0", stale_after_s=1.0)
    assert stats.report(0).message == "no LiDAR input yet"
    stats.on_input(0)
    assert stats.report(0).level == diag.WARN      # input but nothing processed yet

    class Out:
        stamp_ns, timings, dropped_nan, status, error = 0, {"infer": 0.2}, 4, "ok", ""
        cameras_used, cameras_skipped = ["front"], {}

    stats.on_output(Out(), 3 * 10**8)
    report = stats.report(4 * 10**8)
    assert report.level == diag.OK
    assert report.values["latency_mean_s"] == "0.3000" and report.values["infer_mean_s"] == "0.2000"
    assert report.values["nan_points_dropped"] == "4" and report.values["device"] == "cuda:0"
    assert stats.report(2 * 10**9).level == diag.STALE


# ----------------------------------------------------------------------------- parameters
def test_config_file_matches_node_parameters(repo_root):
    path = repo_root / "config" / "segment.yaml"
    cfg = load_params_file(path)
    raw = flatten(yaml.safe_load(path.read_text())["/**"]["ros__parameters"])
    defaults = {s.name: s.default for s in parameter_specs()}
    assert set(raw) <= set(defaults)
    # the file documents the defaults: they must not drift from node_config
    assert {k: v for k, v in raw.items()} == {k: defaults[k] for k in raw}
    assert to_parameters(cfg) == defaults
    assert cfg.cameras == [] and cfg.sync == SyncConfig(10, 0.05, 1.0)


def test_commented_camera_example_in_config_is_valid(repo_root):
    text = (repo_root / "config" / "segment.yaml").read_text()
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip().startswith("# cameras:"))
    example = "\n".join(line.replace("# ", "", 1) for line in lines[start:] if line.strip())
    indent = " " * 4
    params = yaml.safe_load("\n".join(line[len(indent):] for line in example.splitlines()))
    cfg = from_parameters(flatten(params))
    cam = cfg.camera_list[0]
    assert (cam.name, cam.transport, cam.image_topic) == (
        "front", "compressed", "/camera/front/image_raw/compressed")


def test_params_file_formats(tmp_path):
    p = tmp_path / "p.yaml"
    p.write_text("/**:\n  ros__parameters:\n    use_sim_time: true\n    slop: 0.1\n"
                 f"{NODE_NAME}:\n  ros__parameters:\n    cameras: [front, left]\n"
                 "    camera:\n      left:\n        transport: compressed\n")
    cfg = load_params_file(p)
    assert cfg.slop == 0.1 and cfg.cameras == ["front", "left"]
    assert cfg.cameras_config["front"] == CameraConfig("front", "/front/image_raw", "/front/camera_info")
    assert cfg.cameras_config["left"].image_topic == "/left/image_raw/compressed"
    p.write_text("other_node:\n  ros__parameters:\n    slop: 0.1\n")
    with pytest.raises(ConfigError, match=NODE_NAME):
        load_params_file(p)


def test_hostile_params_files_are_one_clear_config_error(tmp_path):
    """Issue 9: a binary params file gave a traceback; a 1 KB alias bomb in class_names took
    100 s and 5.9 GB to build its error message. rcl's own params parser refuses YAML aliases
    ("Will not support aliasing"), so the replay's reader refuses them too."""
    p = tmp_path / "p.yaml"
    p.write_bytes(bytes(range(256)) * 8)
    with pytest.raises(ConfigError, match="not a YAML text file"):
        load_params_file(p)
    lines = ["/**:", "  ros__parameters:", '    l0: &l0 ["lol"]']
    lines += [f"    l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, 9)]
    lines.append(f"    class_names: [{', '.join(['*l8'] * 9)}]")
    p.write_text("\n".join(lines) + "\n")
    assert p.stat().st_size < 1200
    with pytest.raises(ConfigError, match="aliases"):
        load_params_file(p)
    p.write_text("/**:\n  ros__parameters:\n    a: &a [car]\n    class_names: *a\n")
    with pytest.raises(ConfigError, match="aliases"):
        load_params_file(p)
    p.write_text("/**:\n  ros__parameters: [1, 2]\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_params_file(p)
    p.write_text("1: x\nfoo: y\n")   # keys of mixed types listed without a TypeError
    with pytest.raises(ConfigError, match="top-level keys: \\[1, foo\\]"):
        load_params_file(p)


def test_params_file_error_messages_stay_short(tmp_path):
    p = tmp_path / "p.yaml"
    names = ", ".join(f"name_{i}" for i in range(20000))
    p.write_text(f"/**:\n  ros__parameters:\n    class_names: [{names}, name_1]\n")
    with pytest.raises(ConfigError, match="class_names") as err:
        load_params_file(p)
    assert len(str(err.value)) < 800 and str(p) in str(err.value)


@pytest.mark.parametrize("params, message", [
    ({"slopp": 0.1}, "unknown parameter"),
    ({"queue_size": "10"}, "queue_size"),
    ({"queue_size": 0}, "minimum"),
    ({"slop": -0.5}, "slop"),
    ({"device": "tpu"}, "device"),
    ({"device": "cuda:x"}, "device"),
    ({"device": "cuda:"}, "device"),
    ({"qos": "fast"}, "qos"),
    ({"output_qos": "fast"}, "output_qos"),
    ({"slop": float("nan")}, "finite"),
    ({"tf_timeout": float("inf")}, "finite"),
    ({"camera_info_policy": "newest"}, "camera_info_policy"),
    ({"output_layout": "organized"}, "output_layout"),
    ({"filter_mode": "both"}, "filter_mode"),
    ({"filter_classes": ["car", " "]}, "filter_classes"),
    ({"cameras": ["front", "front"]}, "unique"),
    ({"cameras": ["front/left"]}, "letters"),
    ({"cameras": "front"}, "list of strings"),
    ({"cameras": ["front"], "camera.front.transport": "h264"}, "transport"),
    ({"camera.rear.image_topic": "/rear"}, "rear"),
    ({"camera.front.exposure": 1.0}, "unknown parameter"),
    ({"class_names": ["car", ""]}, "class_names"),
    ({"publish_overlays": "yes"}, "true/false"),
    ({"fixed_frame": "/odom"}, "fixed_frame"),
    ({"fixed_frame": "my odom"}, "fixed_frame"),
])
def test_invalid_parameters_are_clear_errors(params, message):
    with pytest.raises(ConfigError, match=message):
        from_parameters(params)


def test_node_accepts_gpu_index_ints_for_doubles_and_standard_ros_keys():
    cfg = from_parameters({"device": "cuda:1", "slop": 1, "camera_timeout": 2,
                           "use_sim_time": True, "start_type_description_service": False,
                           "qos_overrides./points.subscription.reliability": "reliable"})
    assert cfg.device == "cuda:1" and cfg.slop == 1.0 and isinstance(cfg.slop, float)
    assert cfg.camera_timeout == 2.0


def test_every_entry_point_sets_the_cpu_threads(checkpoint, tmp_path):
    """Node and replay set torch's thread count from cpu_threads (default 1) when they load."""
    from clip2scene_core.threads import default_threads
    from clip2scene_ros.pipeline import load_segmenter
    from clip2scene_ros.replay import build_parser, options_from_args

    before = torch.get_num_threads()
    try:
        load_segmenter(str(checkpoint), "cpu", "", 2)
        assert torch.get_num_threads() == 2
        load_segmenter(str(checkpoint), "cpu")          # cpu_threads 0: automatic
        assert NodeConfig().cpu_threads == 0 and torch.get_num_threads() == default_threads()
        assert [default_threads(n) for n in (1, 2, 3, 8, 64)] == [1, 1, 1, 4, 4]
        assert os.environ.get("OMP_WAIT_POLICY")       # set before torch ran (conftest or here)
        args = build_parser().parse_args(["in.bag", "--out", str(tmp_path / "o"), "--checkpoint",
                                          str(checkpoint), "--threads", "3"])
        assert options_from_args(args).config.cpu_threads == 3
        with pytest.raises(ConfigError, match="cpu_threads"):
            from_parameters({"cpu_threads": -1})
    finally:
        torch.set_num_threads(before)


def test_parameter_round_trip_and_specs():
    cfg = from_parameters({"cameras": ["front", "left"], "camera.left.transport": "compressed",
                           "class_names": ["car", "road"], "slop": 1, "use_sim_time": True})
    assert cfg.slop == 1.0 and isinstance(cfg.slop, float)
    assert from_parameters(to_parameters(cfg)) == cfg
    specs = parameter_specs()
    assert [s.name for s in specs if s.dynamic] == ["class_names", "query"]
    assert all(s.description for s in specs)
    assert [s.name for s in camera_specs("left")] == [
        "camera.left.image_topic", "camera.left.info_topic", "camera.left.transport",
        "camera.left.optical_frame"]
    with pytest.raises(ConfigError, match="checkpoint"):
        NodeConfig().require_checkpoint()


# ----------------------------------------------------------------------------- launch / rviz / node
def _module_ast(path: Path) -> ast.Module:
    source = path.read_text()
    compile(source, str(path), "exec")
    return ast.parse(source)


def _literal(tree: ast.Module, name: str):
    node = next(n for n in tree.body if isinstance(n, ast.Assign)
                and any(isinstance(t, ast.Name) and t.id == name for t in n.targets))
    return ast.literal_eval(node.value)


def test_launch_arguments_match_node_parameters(repo_root):
    tree = _module_ast(repo_root / "launch" / "segment.launch.py")
    node_args = [a[0] for a in _literal(tree, "NODE_ARGUMENTS")]
    launch_args = [a[0] for a in _literal(tree, "LAUNCH_ARGUMENTS")]
    params = {s.name for s in parameter_specs()}
    assert set(node_args) <= params
    assert {"lidar_topic", "cameras", "checkpoint", "device"} <= set(node_args)
    assert {"config", "rviz", "camera_transport"} <= set(launch_args)
    assert not set(launch_args) & params
    assert set(_literal(tree, "LIST_ARGUMENTS")) == {
        s.name for s in parameter_specs() if s.type is list}
    assert _literal(tree, "NODE_NAME") == NODE_NAME
    assert any(isinstance(n, ast.FunctionDef) and n.name == "generate_launch_description"
               for n in tree.body)


def test_rviz_config_shows_the_node_outputs(repo_root):
    cfg = yaml.safe_load((repo_root / "rviz" / "segment.rviz").read_text())
    displays = cfg["Visualization Manager"]["Displays"]
    by_topic = {}
    for d in displays:
        topic = d.get("Topic", {}).get("Value")
        if topic:
            by_topic.setdefault(topic, []).append(d)
    labeled = by_topic[f"/{NODE_NAME}/labeled_points"]
    transformers = {(d["Color Transformer"], d["Channel Name"]) for d in labeled}
    assert ("RGB8", "rgb") in transformers and ("Intensity", "label") in transformers
    assert any(d["Class"] == "rviz_default_plugins/Image" for d in by_topic[f"/{NODE_NAME}/overlay/front"])
    assert NodeConfig().lidar_topic in by_topic


def test_node_module_is_thin_glue(repo_root):
    tree = _module_ast(repo_root / "clip2scene_ros" / "node.py")
    imported = set()
    for n in ast.walk(tree):
        if isinstance(n, ast.Import):
            imported |= {a.name.split(".")[0] for a in n.names}
        elif isinstance(n, ast.ImportFrom) and n.module:
            imported.add(n.module.split(".")[0])
    assert "torch" not in imported and "cv2" not in imported
    assert {"rclpy", "diagnostic_msgs", "sensor_msgs", "std_msgs"} <= imported
    # the optional packages are looked up at run time, with our own code as the fallback
    optional = {n.args[0].value for n in ast.walk(tree) if isinstance(n, ast.Call)
                and getattr(n.func, "id", "") == "optional_module" and n.args
                and isinstance(n.args[0], ast.Constant)}
    assert {"tf2_ros", "message_filters", "vision_msgs.msg", "tf2_msgs.msg"} <= optional


def _fake_launch_modules(monkeypatch) -> dict:
    """Minimal stand-ins for launch / launch_ros (ROS-only packages) that record what the
    launch file builds, so its argument handling can run here."""

    class LaunchConfiguration:
        def __init__(self, name):
            self.name = name

        def perform(self, context):
            return context[self.name]

    class DeclareLaunchArgument:
        def __init__(self, name, default_value="", description=""):
            self.name, self.default, self.description = name, default_value, description

    class OpaqueFunction:
        def __init__(self, function):
            self.function = function

    class Node:
        def __init__(self, **kwargs):
            self.kwargs = kwargs

    class LifecycleNode(Node):
        pass

    class ParameterValue:
        def __init__(self, value, *, value_type=None):
            self.value, self.value_type = value, value_type

    class FindPackageShare:
        def __init__(self, package):
            self.package = package

        def perform(self, context):
            return f"/opt/ros/share/{self.package}"

    fakes = {
        "launch": {"LaunchDescription": list},
        "launch.actions": {"DeclareLaunchArgument": DeclareLaunchArgument, "OpaqueFunction": OpaqueFunction},
        "launch.substitutions": {"LaunchConfiguration": LaunchConfiguration},
        "launch_ros": {},
        "launch_ros.actions": {"Node": Node, "LifecycleNode": LifecycleNode},
        "launch_ros.parameter_descriptions": {"ParameterValue": ParameterValue},
        "launch_ros.substitutions": {"FindPackageShare": FindPackageShare},
    }
    for name, attrs in fakes.items():
        module = types.ModuleType(name)
        module.__dict__.update(attrs)
        monkeypatch.setitem(sys.modules, name, module)
    return {"DeclareLaunchArgument": DeclareLaunchArgument, "OpaqueFunction": OpaqueFunction}


def _run_launch(repo_root, monkeypatch, **arguments):
    kinds = _fake_launch_modules(monkeypatch)
    spec = importlib.util.spec_from_file_location("segment_launch", repo_root / "launch" / "segment.launch.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    description = module.generate_launch_description()
    declared = {a.name: a.default for a in description if isinstance(a, kinds["DeclareLaunchArgument"])}
    assert set(arguments) <= set(declared)
    setup = next(a for a in description if isinstance(a, kinds["OpaqueFunction"]))
    return setup.function(declared | arguments)


def test_launch_defaults_use_the_config_file(repo_root, monkeypatch):
    actions = _run_launch(repo_root, monkeypatch)
    assert len(actions) == 1
    kw = actions[0].kwargs
    assert (kw["package"], kw["executable"], kw["name"]) == ("clip2scene_ros", NODE_NAME, NODE_NAME)
    assert kw["namespace"] == "" and kw["remappings"] == []
    assert kw["parameters"] == ["/opt/ros/share/clip2scene_ros/config/segment.yaml", {"use_sim_time": False}]


def test_launch_arguments_become_valid_node_parameters(repo_root, monkeypatch):
    actions = _run_launch(repo_root, monkeypatch, checkpoint="/models/c2s.pt", cameras="front, left",
                          camera_transport="compressed", class_names="car,road", device="cuda:1",
                          lidar_topic="/lidar/top", rviz="true", fixed_frame="odom",
                          use_sim_time="true", config=str(repo_root / "config" / "segment.yaml"),
                          rviz_config=str(repo_root / "rviz" / "segment.rviz"))
    node, rviz = actions
    config_file, typed = node.kwargs["parameters"]
    assert typed["cameras"].value_type == List[str] and typed["device"].value_type is str
    overrides = {k: getattr(v, "value", v) for k, v in typed.items()}
    assert overrides == {"use_sim_time": True, "checkpoint": "/models/c2s.pt", "cameras": ["front", "left"],
                         "device": "cuda:1", "class_names": ["car", "road"], "lidar_topic": "/lidar/top",
                         "fixed_frame": "odom",
                         "camera.front.transport": "compressed", "camera.left.transport": "compressed"}
    # what the node receives: the file, then the overrides on top
    merged = flatten(yaml.safe_load(Path(config_file).read_text())["/**"]["ros__parameters"]) | overrides
    cfg = from_parameters(merged)
    assert [c.image_topic for c in cfg.camera_list] == ["/front/image_raw/compressed",
                                                        "/left/image_raw/compressed"]
    assert cfg.device == "cuda:1" and cfg.class_names == ["car", "road"] and cfg.fixed_frame == "odom"
    assert rviz.kwargs["executable"] == "rviz2"
    # RViz follows the launch: one world frame (the node's TF lookups go through it too), the
    # input topic, an overlay per camera, the label-id range of the two classes
    flag, path = rviz.kwargs["arguments"]
    shown = yaml.safe_load(Path(path).read_text())["Visualization Manager"]
    Path(path).unlink()
    assert flag == "-d" and shown["Global Options"]["Fixed Frame"] == "odom"
    topics = {d["Name"]: d.get("Topic", {}).get("Value") for d in shown["Displays"]}
    assert topics["Input cloud"] == "/lidar/top"
    assert topics["Overlay front"] == f"/{NODE_NAME}/overlay/front"
    assert topics["Overlay left"] == f"/{NODE_NAME}/overlay/left"
    label_view = next(d for d in shown["Displays"] if d.get("Channel Name") == "label")
    assert (label_view["Min Intensity"], label_view["Max Intensity"]) == (0, 1)
    assert not label_view["Autocompute Intensity Bounds"]


def test_launch_fixed_frame_policies_reach_the_node_only(repo_root, monkeypatch):
    node, rviz = _run_launch(repo_root, monkeypatch, rviz="true", fixed_frame="none",
                             rviz_config=str(repo_root / "rviz" / "segment.rviz"))
    assert node.kwargs["parameters"][1]["fixed_frame"].value == "none"
    assert from_parameters({"fixed_frame": "none"}).fixed_frame == "none"
    path = rviz.kwargs["arguments"][1]
    shown = yaml.safe_load(Path(path).read_text())["Visualization Manager"]
    Path(path).unlink()
    template = yaml.safe_load((repo_root / "rviz" / "segment.rviz").read_text())
    assert shown["Global Options"]["Fixed Frame"] == \
        template["Visualization Manager"]["Global Options"]["Fixed Frame"]


def test_launch_namespace_remaps_and_managed_node(repo_root, monkeypatch, tmp_path):
    """Two LiDARs = two launches in two namespaces; the managed variant is a LifecycleNode."""
    (node,) = _run_launch(repo_root, monkeypatch, namespace="/right", node_name="seg_right",
                          labeled_points_topic="/perception/right/labels",
                          remappings="~/filtered_points:=/obstacles ; /tf:=/robot/tf")
    kw = node.kwargs
    assert (kw["namespace"], kw["name"], kw["executable"]) == ("right", "seg_right", NODE_NAME)
    assert kw["remappings"] == [("~/labeled_points", "/perception/right/labels"),
                                ("~/filtered_points", "/obstacles"), ("/tf", "/robot/tf")]
    (managed,) = _run_launch(repo_root, monkeypatch, managed="true", autostart="false")
    assert type(managed).__name__ == "LifecycleNode"
    assert managed.kwargs["executable"] == f"{NODE_NAME}_managed" and managed.kwargs["autostart"] is False
    with pytest.raises(ValueError, match="from:=to"):
        _run_launch(repo_root, monkeypatch, remappings="oops")
    # the rendered RViz layout follows the namespace and a remapped output
    from clip2scene_ros.rviz_config import render_rviz_config

    shown = yaml.safe_load(render_rviz_config(
        (repo_root / "rviz" / "segment.rviz").read_text(), node_name="seg_right",
        namespace="right", cameras=["front"], num_classes=16))["Visualization Manager"]
    topics = [d.get("Topic", {}).get("Value") for d in shown["Displays"]]
    assert "/right/seg_right/labeled_points" in topics and "/right/seg_right/overlay/front" in topics
    label_view = next(d for d in shown["Displays"] if d.get("Channel Name") == "label")
    assert label_view["Max Intensity"] == 15


def test_parameters_and_yaml_configs_share_one_scalar_type_check():
    from clip2scene_core.config import check_scalar
    from clip2scene_ros.node_config import check_type

    for tp, bad in ((int, 1.5), (int, True), (float, "x"), (float, False), (bool, 1), (str, 3)):
        with pytest.raises(ConfigError) as core:
            check_scalar(bad, tp, "p")
        with pytest.raises(ConfigError) as node:
            check_type("p", bad, tp)
        assert str(core.value) == str(node.value)
    assert check_type("p", 2, float) == 2.0 and isinstance(check_type("p", 2, float), float)
    with pytest.raises(ConfigError, match="list of strings"):
        check_type("p", ["a", 1], list)
