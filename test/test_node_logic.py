"""The node's logic without rclpy: PipelineRunner (callbacks → sync → latest-frame slot →
pipeline → messages), diagnostics, parameters (config/segment.yaml ↔ NodeConfig), and the
launch / RViz files checked against them.

Inputs are real: the nuScenes scene-0061 sweep and CAM_FRONT JPEG as rosbags messages, and
a tiny random checkpoint saved and loaded through the real checkpoint API.
"""
from __future__ import annotations

import ast
import importlib.util
import sys
import threading
import types
from pathlib import Path
from typing import List

import numpy as np
import pytest
import torch
import yaml

from clip2scene_core.errors import ConfigError
from clip2scene_ros import diagnostics as diag
from clip2scene_ros.msgs import MessageFactory, header_stamp_ns
from clip2scene_ros.node_config import (NODE_NAME, CameraConfig, NodeConfig, camera_specs, flatten,
                                        from_parameters, load_params_file, parameter_specs,
                                        to_parameters)
from clip2scene_ros.pipeline import PipelineRunner, build_pipeline
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
    raw = flatten(yaml.safe_load(path.read_text())[NODE_NAME]["ros__parameters"])
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
    params = yaml.safe_load("\n".join(l[len(indent):] for l in example.splitlines()))
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


@pytest.mark.parametrize("params, message", [
    ({"slopp": 0.1}, "unknown parameter"),
    ({"queue_size": "10"}, "queue_size"),
    ({"queue_size": 0}, "minimum"),
    ({"slop": -0.5}, "slop"),
    ({"device": "tpu"}, "device"),
    ({"qos": "fast"}, "qos"),
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


def test_parameter_round_trip_and_specs():
    cfg = from_parameters({"cameras": ["front", "left"], "camera.left.transport": "compressed",
                           "class_names": ["car", "road"], "slop": 1, "use_sim_time": True})
    assert cfg.slop == 1.0 and isinstance(cfg.slop, float)
    assert from_parameters(to_parameters(cfg)) == cfg
    specs = parameter_specs()
    assert [s.name for s in specs if s.dynamic] == ["class_names"]
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
    assert {"rclpy", "message_filters", "tf2_ros", "diagnostic_msgs"} <= imported


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
        "launch_ros.actions": {"Node": Node},
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
    assert kw["parameters"] == ["/opt/ros/share/clip2scene_ros/config/segment.yaml", {"use_sim_time": False}]


def test_launch_arguments_become_valid_node_parameters(repo_root, monkeypatch):
    actions = _run_launch(repo_root, monkeypatch, checkpoint="/models/c2s.pt", cameras="front, left",
                          camera_transport="compressed", class_names="car,road", device="cuda",
                          lidar_topic="/lidar/top", rviz="true", fixed_frame="odom",
                          use_sim_time="true", config=str(repo_root / "config" / "segment.yaml"))
    node, rviz = actions
    config_file, typed = node.kwargs["parameters"]
    assert typed["cameras"].value_type == List[str] and typed["device"].value_type is str
    overrides = {k: getattr(v, "value", v) for k, v in typed.items()}
    assert overrides == {"use_sim_time": True, "checkpoint": "/models/c2s.pt", "cameras": ["front", "left"],
                         "device": "cuda", "class_names": ["car", "road"], "lidar_topic": "/lidar/top",
                         "fixed_frame": "odom",
                         "camera.front.transport": "compressed", "camera.left.transport": "compressed"}
    # what the node receives: the file, then the overrides on top
    merged = flatten(yaml.safe_load(Path(config_file).read_text())[NODE_NAME]["ros__parameters"]) | overrides
    cfg = from_parameters(merged)
    assert [c.image_topic for c in cfg.camera_list] == ["/front/image_raw/compressed",
                                                        "/left/image_raw/compressed"]
    assert cfg.device == "cuda" and cfg.class_names == ["car", "road"] and cfg.fixed_frame == "odom"
    assert rviz.kwargs["executable"] == "rviz2"
    # one world frame for the launch: the node's TF lookups go through it, RViz shows it
    assert rviz.kwargs["arguments"] == ["-d", "/opt/ros/share/clip2scene_ros/rviz/segment.rviz",
                                        "-f", "odom"]


def test_launch_fixed_frame_policies_reach_the_node_only(repo_root, monkeypatch):
    node, rviz = _run_launch(repo_root, monkeypatch, rviz="true", fixed_frame="none")
    assert node.kwargs["parameters"][1]["fixed_frame"].value == "none"
    assert from_parameters({"fixed_frame": "none"}).fixed_frame == "none"
    assert rviz.kwargs["arguments"] == ["-d", "/opt/ros/share/clip2scene_ros/rviz/segment.rviz"]


# ----------------------------------------------------------------------------- node.py glue
def _install_stand_in_ros(monkeypatch) -> dict:
    """Just enough of rclpy / message_filters / tf2_ros / ROS messages to run node.py here.

    Only used where ROS 2 cannot be installed (test_node_rclpy.py runs the real thing).
    Message classes are the rosbags ones behind a keyword constructor, like rclpy's.
    """
    import enum

    rosbags = MessageFactory.from_rosbags()
    state: dict = {"now": LIDAR_STAMP, "logs": [], "syncs": []}

    def module(name: str, **attrs) -> types.ModuleType:
        m = types.ModuleType(name)
        m.__dict__.update(attrs)
        monkeypatch.setitem(sys.modules, name, m)
        return m

    def msg_class(full: str):
        return type(full.rsplit("/", 1)[1], (), {"__new__": lambda cls, **kw: rosbags.new(full, **kw)})

    for pkg, names in {"sensor_msgs": ["PointCloud2", "PointField", "Image", "CompressedImage",
                                       "CameraInfo", "RegionOfInterest"],
                       "std_msgs": ["Header"], "builtin_interfaces": ["Time"], "tf2_msgs": ["TFMessage"],
                       "geometry_msgs": ["Transform", "TransformStamped", "Vector3", "Quaternion"]}.items():
        module(pkg)
        module(f"{pkg}.msg", **{n: msg_class(f"{pkg}/msg/{n}") for n in names})

    class Plain:
        defaults: dict = {}

        def __init__(self, **kw):
            unknown = set(kw) - set(self.defaults)
            assert not unknown, unknown
            self.__dict__.update({k: (v() if callable(v) else v) for k, v in self.defaults.items()} | kw)

    def plain(cls_name, **defaults):
        return type(cls_name, (Plain,), {"defaults": defaults})

    module("diagnostic_msgs")
    status = plain("DiagnosticStatus", level=b"\x00", name="", message="", hardware_id="", values=list)
    module("diagnostic_msgs.msg", KeyValue=plain("KeyValue", key="", value=""), DiagnosticStatus=status,
           DiagnosticArray=plain("DiagnosticArray", header=lambda: rosbags.new("Header"), status=list))
    module("rcl_interfaces")
    module("rcl_interfaces.msg",
           FloatingPointRange=plain("FloatingPointRange", from_value=0.0, to_value=0.0, step=0.0),
           IntegerRange=plain("IntegerRange", from_value=0, to_value=0, step=0),
           ParameterDescriptor=plain("ParameterDescriptor", description="", read_only=False,
                                     additional_constraints="", floating_point_range=list,
                                     integer_range=list),
           SetParametersResult=plain("SetParametersResult", successful=True, reason=""))

    class Parameter:
        Type = enum.Enum("Type", "NOT_SET BOOL INTEGER DOUBLE STRING BYTE_ARRAY BOOL_ARRAY "
                                 "INTEGER_ARRAY DOUBLE_ARRAY STRING_ARRAY")

        def __init__(self, name, type_=None, value=None):
            self.name, self.type_, self.value = name, type_, value

    class ParameterUninitializedException(Exception):
        pass

    class Logger:
        def __getattr__(self, level):
            return lambda text, **kw: state["logs"].append((level, text))

    class Stamp:
        def __init__(self, nanoseconds):
            self.nanoseconds = nanoseconds

        def to_msg(self):
            return rosbags.new("Time", sec=self.nanoseconds // 10**9, nanosec=self.nanoseconds % 10**9)

    class Publisher:
        def __init__(self, msg_type, topic):
            self.msg_type, self.topic, self.sent, self.subscribers = msg_type, topic, [], 0

        def get_subscription_count(self):
            return self.subscribers

        def publish(self, msg):
            self.sent.append(msg)

    sensor_qos = object()

    class Node:
        def __init__(self, name, *, parameter_overrides=()):
            self._name, self.params, self.descriptors, self.callbacks = name, {}, {}, []
            self.overrides = {p.name: p.value for p in parameter_overrides}
            self.publishers, self.subscriptions, self.timers = {}, {}, []

        def declare_parameter(self, name, value=None, descriptor=None):
            assert name not in self.params, f"{name} declared twice"
            if isinstance(value, Parameter.Type):
                value = None
            elif isinstance(value, list):
                assert value, "an empty list default has no type"
            self.params[name] = self.overrides.get(name, value)
            self.descriptors[name] = descriptor
            return Parameter(name, value=self.params[name])

        def get_parameter(self, name):
            if self.params[name] is None:
                raise ParameterUninitializedException(name)
            return Parameter(name, value=self.params[name])

        def set_parameters(self, params):
            results = []
            for p in params:
                result_type = sys.modules["rcl_interfaces.msg"].SetParametersResult
                result = result_type()
                if self.descriptors[p.name].read_only:
                    result = result_type(successful=False, reason="read-only")
                else:
                    for cb in self.callbacks:
                        result = cb([p])
                        if not result.successful:
                            break
                if result.successful:
                    self.params[p.name] = p.value
                results.append(result)
            return results

        def add_on_set_parameters_callback(self, cb):
            self.callbacks.insert(0, cb)

        def create_publisher(self, msg_type, topic, qos):
            self.publishers[topic] = Publisher(msg_type, topic)
            return self.publishers[topic]

        def create_subscription(self, msg_type, topic, callback, qos, **kw):
            self.subscriptions[topic] = (msg_type, callback, qos)

        def create_timer(self, period, callback):
            self.timers.append((period, callback))

        def get_clock(self):
            return types.SimpleNamespace(now=lambda: Stamp(state["now"]))

        def get_logger(self):
            return Logger()

        def get_name(self):
            return self._name

        def destroy_node(self):
            pass

    rclpy = module("rclpy", ok=lambda: True, init=lambda args=None: None, spin=lambda node: None,
                   shutdown=lambda: None)
    rclpy.logging = module("rclpy.logging", get_logger=lambda name: Logger())
    module("rclpy.node", Node=Node)
    module("rclpy.parameter", Parameter=Parameter)
    module("rclpy.exceptions", ParameterUninitializedException=ParameterUninitializedException)
    module("rclpy.executors", ExternalShutdownException=type("ExternalShutdownException", (Exception,), {}))
    module("rclpy.duration", Duration=lambda seconds=0.0: seconds)
    module("rclpy.time", Time=lambda nanoseconds=0: nanoseconds)
    module("rclpy.qos", QoSProfile=lambda **kw: kw, qos_profile_sensor_data=sensor_qos,
           ReliabilityPolicy=types.SimpleNamespace(RELIABLE="reliable"))

    class Subscriber:
        def __init__(self, node, msg_type, topic, qos_profile=None):
            self.msg_type, self.topic, self.qos = msg_type, topic, qos_profile

    class ApproximateTimeSynchronizer:
        def __init__(self, subscribers, queue_size, slop):
            self.subscribers, self.queue_size, self.slop = subscribers, queue_size, slop
            state["syncs"].append(self)

        def registerCallback(self, callback):
            self.callback = callback

    module("message_filters", Subscriber=Subscriber, ApproximateTimeSynchronizer=ApproximateTimeSynchronizer)

    class TransformException(Exception):
        pass

    class Buffer:
        """tf2_ros.Buffer's query API over canned answers; records what it was asked."""

        def __init__(self):
            self.transforms = {}        # (target, source) → TransformStamped
            self.full_transforms = {}   # (target, source, fixed) → TransformStamped
            self.frames = set()         # what _frameExists knows besides the canned frames
            self.calls = []

        def _frameExists(self, frame):
            return frame in self.frames or any(frame in key[:2] for key in self.transforms)

        def lookup_transform(self, target, source, time, timeout=None):
            self.calls.append(("lookup_transform", target, source, time, timeout))
            try:
                return self.transforms[(target, source)]
            except KeyError:
                raise TransformException(f"{source} -> {target} unknown") from None

        def lookup_transform_full(self, target, target_time, source, source_time, fixed,
                                  timeout=None):
            self.calls.append(("lookup_transform_full", target, target_time, source, source_time,
                               fixed, timeout))
            try:
                return self.full_transforms[(target, source, fixed)]
            except KeyError:
                raise TransformException(f"{source} -> {target} via {fixed} unknown") from None

    module("tf2_ros", Buffer=Buffer, TransformException=TransformException,
           TransformListener=lambda buffer, node, **kw: None)
    state.update(Parameter=Parameter, sensor_qos=sensor_qos)
    return state


@pytest.fixture
def stand_in_node_module(monkeypatch):
    if importlib.util.find_spec("rclpy") is not None:
        pytest.skip("real rclpy available: test_node_rclpy.py runs the node itself")
    import clip2scene_ros
    import clip2scene_ros.msgs as msgs

    state = _install_stand_in_ros(monkeypatch)
    monkeypatch.setattr(msgs, "_DEFAULT", msgs._DEFAULT)     # never keep a stand-in factory
    monkeypatch.delitem(sys.modules, "clip2scene_ros.node", raising=False)
    node_module = importlib.import_module("clip2scene_ros.node")
    yield node_module, state
    sys.modules.pop("clip2scene_ros.node", None)             # bound to the stand-ins: forget it
    if getattr(clip2scene_ros, "node", None) is node_module:
        delattr(clip2scene_ros, "node")


def test_node_glue_with_stand_in_rclpy(stand_in_node_module, checkpoint, nusc):
    node_module, ros = stand_in_node_module
    P = ros["Parameter"]
    node = node_module.SegmenterNode(parameter_overrides=[
        P("checkpoint", value=str(checkpoint)), P("device", value="cpu"), P("cameras", value=["front"]),
        P("camera.front.transport", value="compressed"), P("camera_timeout", value=0.5)])
    try:
        # parameters: declared with descriptors, only class_names writable, unset lists typed
        assert node.params["class_names"] is None and node.descriptors["slop"].read_only
        assert not node.descriptors["class_names"].read_only
        assert node.descriptors["slop"].floating_point_range[0].to_value == 10.0
        assert node.params["camera.front.image_topic"] == ""
        # topics: the cloud with SensorDataQoS, the camera pair through message_filters
        msg_type, on_cloud, qos = node.subscriptions["/points"]
        assert msg_type.__name__ == "PointCloud2" and qos is ros["sensor_qos"]
        (pair,) = ros["syncs"]
        assert [(s.msg_type.__name__, s.topic) for s in pair.subscribers] == [
            ("CompressedImage", "/front/image_raw/compressed"), ("CameraInfo", "/front/camera_info")]
        assert (pair.queue_size, pair.slop) == (10, 0.05)
        assert set(node.publishers) == {"~/labeled_points", "~/overlay/front", "/diagnostics"}

        factory = MessageFactory.from_rosbags()
        from clip2scene_ros.tf import matrix_to_transform

        node.tf_buffer.transforms[("CAM_FRONT", "LIDAR_TOP")] = matrix_to_transform(
            nusc.lidar2cam, factory, "CAM_FRONT", "LIDAR_TOP", 0)
        published = node.publishers["~/labeled_points"].sent
        overlays = node.publishers["~/overlay/front"]

        def frame(stamp_offset: int) -> None:
            cam = make_camera(nusc, factory, stamp_ns=FRONT_STAMP + stamp_offset)
            pair.callback(cam.image, cam.info)
            on_cloud(small_cloud(nusc, factory, LIDAR_STAMP + stamp_offset))
            ros["now"] += 600 * MS                  # the camera went quiet: release the sweep
            for _, timer in node.timers:
                timer()
            count = len(published)
            for _ in range(600):                     # the inference thread publishes
                if len(published) > count:
                    return
                threading.Event().wait(0.1)

        overlays.subscribers = 1
        frame(0)
        assert len(read_points(published[0])) == len(subsample(nusc.points))
        # fixed_frame "auto" and no odom/map/world in this TF tree: tf2's plain lookup at the
        # image stamp (rclpy Time / Duration stand-ins are nanoseconds / seconds)
        assert node.runner.tf_lookup is node.tf_resolver
        assert node.tf_buffer.calls == [("lookup_transform", "CAM_FRONT", "LIDAR_TOP", FRONT_STAMP, 0.05)]
        assert [header_stamp_ns(m) for m in overlays.sent] == [FRONT_STAMP]
        overlays.subscribers = 0                     # nobody watches: no overlay is drawn
        frame(100 * MS)
        assert len(published) == 2 and len(overlays.sent) == 1
        for _, timer in node.timers:
            timer()
        diag_msg = node.publishers["/diagnostics"].sent[-1]
        (status,) = diag_msg.status
        assert status.level == bytes([diag.OK]) and status.hardware_id == "cpu"
        assert {kv.key: kv.value for kv in status.values}["frames_ok"] == "2"

        # run-time parameters
        refused = node.set_parameters([P("class_names", value=["car"])])[0]
        assert not refused.successful and "text encoder" in refused.reason
        assert not node.set_parameters([P("slop", value=0.2)])[0].successful
    finally:
        node.shutdown()
    assert not node._worker.is_alive()


def test_node_fixed_frame_is_tf2_time_travel_with_a_fallback(stand_in_node_module, checkpoint, nusc):
    """fixed_frame set: lookup_transform_full(camera @ image stamp, LiDAR @ sweep stamp, fixed);
    when that fails, the plain lookup and a throttled warning (the replay tool counts them)."""
    from clip2scene_ros.tf import matrix_to_transform, transform_to_matrix

    node_module, ros = stand_in_node_module
    P = ros["Parameter"]
    node = node_module.SegmenterNode(parameter_overrides=[
        P("checkpoint", value=str(checkpoint)), P("device", value="cpu"), P("fixed_frame", value="odom"),
        P("tf_timeout", value=0.2)])
    try:
        factory = MessageFactory.from_rosbags()
        moved = nusc.lidar2cam.copy()
        moved[:3, 3] += [0.3, 0.0, -0.1]     # what motion compensation would add
        buf = node.tf_buffer
        buf.transforms[("CAM_FRONT", "LIDAR_TOP")] = matrix_to_transform(
            nusc.lidar2cam, factory, "CAM_FRONT", "LIDAR_TOP", 0)
        buf.full_transforms[("CAM_FRONT", "LIDAR_TOP", "odom")] = matrix_to_transform(
            moved, factory, "CAM_FRONT", "LIDAR_TOP", 0)
        buf.frames.add("odom")
        plain = transform_to_matrix(buf.transforms[("CAM_FRONT", "LIDAR_TOP")])
        full = transform_to_matrix(buf.full_transforms[("CAM_FRONT", "LIDAR_TOP", "odom")])
        T = node.runner.tf_lookup("CAM_FRONT", FRONT_STAMP, "LIDAR_TOP", LIDAR_STAMP)
        np.testing.assert_array_equal(T, full)
        assert buf.calls == [("lookup_transform_full", "CAM_FRONT", FRONT_STAMP, "LIDAR_TOP",
                              LIDAR_STAMP, "odom", 0.2)]
        # odom poses missing at a stamp → the plain lookup, counted and warned about (once)
        del buf.full_transforms[("CAM_FRONT", "LIDAR_TOP", "odom")]
        for _ in range(2):
            T = node.runner.tf_lookup("CAM_FRONT", FRONT_STAMP, "LIDAR_TOP", LIDAR_STAMP)
            np.testing.assert_array_equal(T, plain)
        assert buf.calls[-1] == ("lookup_transform", "CAM_FRONT", "LIDAR_TOP", FRONT_STAMP, 0.2)
        assert node.tf_resolver.fallbacks == 2
        warned = [text for level, text in ros["logs"] if level == "warning" and "'odom'" in text]
        assert len(warned) == 1 and "via odom unknown" in warned[0]
        # odom not in the tree at all: no tf2 call that would wait out the timeout
        buf.frames.clear()
        n_calls = len(buf.calls)
        node.runner.tf_lookup("CAM_FRONT", FRONT_STAMP, "LIDAR_TOP", LIDAR_STAMP)
        assert [c[0] for c in buf.calls[n_calls:]] == ["lookup_transform"]
        assert node.tf_resolver.fallbacks == 3
    finally:
        node.shutdown()


def test_node_main_exits_non_zero_on_a_bad_parameter(stand_in_node_module, monkeypatch):
    node_module, ros = stand_in_node_module

    class Refusing(node_module.SegmenterNode):
        def __init__(self):
            super().__init__(parameter_overrides=[ros["Parameter"]("device", value="tpu")])

    monkeypatch.setattr(node_module, "SegmenterNode", Refusing)
    assert node_module.main([]) == 1
    assert any("device" in text for level, text in ros["logs"] if level == "fatal")
