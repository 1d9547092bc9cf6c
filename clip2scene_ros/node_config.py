"""The segmenter node's parameters as one typed, validated dataclass.

ROS parameters are flat dotted names (``camera.front.image_topic``); this module maps them to
`NodeConfig` and back, so the node only declares what `PARAMETERS` lists and the replay tool
can read the very same ``config/segment.yaml`` without ROS (`load_params_file`). A typo, a
wrong type or an impossible value is a `ConfigError` naming the parameter, at start-up.
"""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from clip2scene_core.config import check_scalar, load_yaml
from clip2scene_core.device import PRECISIONS, SPARSE_PRECISIONS
from clip2scene_core.errors import ConfigError

from .sync import SyncConfig

NODE_NAME = "clip2scene_segmenter"
DEVICES = ("auto", "cpu", "cuda", "cuda:N")
_DEVICE_RE = re.compile(r"auto|cpu|cuda(:\d+)?")
QOS_CHOICES = ("sensor_data", "reliable")
TRANSPORTS = ("raw", "compressed")
CAMERA_INFO_POLICIES = ("latest", "synchronized")
OUTPUT_LAYOUTS = ("compact", "input")
FILTER_MODES = ("keep", "drop")
CAMERA_PREFIX = "camera"
#: parameters every rclpy node may be given besides its own (``qos_overrides.*`` too)
ROS_STANDARD_PARAMETERS = ("use_sim_time", "start_type_description_service")


def _p(default: Any, description: str, *, dynamic: bool = False, choices: tuple[str, ...] = (),
       min_value: float | None = None, max_value: float | None = None) -> Any:
    """A dataclass field carrying the ROS parameter descriptor fields."""
    meta = {"description": description, "dynamic": dynamic, "choices": choices,
            "min": min_value, "max": max_value}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class CameraConfig:
    """One camera input: image (raw or compressed) + CameraInfo, optionally a frame override."""

    name: str
    image_topic: str = ""
    info_topic: str = ""
    transport: Literal["raw", "compressed"] = "raw"
    optical_frame: str = ""     # empty: the image header's frame_id

    def __post_init__(self) -> None:
        if self.transport not in TRANSPORTS:
            raise ConfigError(f"{CAMERA_PREFIX}.{self.name}.transport: '{self.transport}' is not "
                              f"one of {list(TRANSPORTS)}")
        # image_transport's naming conventions when the topics are not given
        if not self.image_topic:
            self.image_topic = f"/{self.name}/image_raw" + (
                "/compressed" if self.transport == "compressed" else "")
        if not self.info_topic:
            self.info_topic = f"/{self.name}/camera_info"


CAMERA_FIELDS: dict[str, str] = {
    "image_topic": "image topic (sensor_msgs/Image, or CompressedImage with transport=compressed); "
                   "default /<name>/image_raw[/compressed]",
    "info_topic": "sensor_msgs/CameraInfo topic; default /<name>/camera_info",
    "transport": "raw (sensor_msgs/Image) or compressed (sensor_msgs/CompressedImage)",
    "optical_frame": "TF frame of the camera's optical frame; empty: the image header frame_id",
}


@dataclass
class NodeConfig:
    """Every parameter of `clip2scene_segmenter` (plus ``camera.<name>.*`` in `cameras_config`)."""

    checkpoint: str = _p("", "path of the deployable clip2scene checkpoint (.pt)")
    clip_weights: str = _p("", "CLIP weights (local file or open_clip tag) for the checkpoint's "
                               "clip_model; enables run-time class_names and camera fusion. "
                               "Empty: the checkpoint's fixed vocabulary, LiDAR-only inference")
    device: str = _p("auto", "inference device: auto (CUDA if available), cpu, cuda or cuda:N")
    cpu_threads: int = _p(0, "torch CPU threads for inference; 0: automatic (one on machines "
                             "with two cores or fewer, else half the cores, at most 4). OpenMP "
                             "workers wait passively (OMP_WAIT_POLICY=PASSIVE unless set)",
                          min_value=0, max_value=1024)
    teacher_async: bool = _p(True, "with clip_weights and cameras: run the CLIP teacher on its own "
                                   "thread at its own rate, off the sweep's critical path (each "
                                   "sweep fuses the latest fitting prediction, never waits); false: "
                                   "run it inline on every sweep's images")
    teacher_max_age: float = _p(0.5, "asynchronous teacher: a camera's latest prediction is fused "
                                     "into a sweep only if its image stamp is within this many "
                                     "seconds of the sweep's", min_value=0.0, max_value=3600.0)
    teacher_precision: str = _p("auto", "the teacher's image forward: auto (fp16 on CUDA, bf16 on "
                                        "a CPU with native bf16 (AVX512-BF16 / AMX), else fp32), "
                                        "fp32, bf16 or fp16 (CUDA only)", choices=PRECISIONS)
    sparse_precision: str = _p("auto", "the sparse backbone's convolutions: auto (bf16 on a CPU "
                                       "with native bf16 (AVX512-BF16 / AMX), else fp32), fp32 "
                                       "or bf16", choices=SPARSE_PRECISIONS)
    lidar_topic: str = _p("/points", "input sensor_msgs/PointCloud2 topic")
    cameras: list[str] = _p([], "camera names; each reads camera.<name>.image_topic/info_topic/"
                                "transport/optical_frame")
    qos: str = _p("sensor_data", "subscription QoS of the LiDAR and camera topics: sensor_data "
                                 "(best effort) or reliable; qos_overrides.<topic>.subscription.* "
                                 "refine it per topic", choices=QOS_CHOICES)
    output_qos: str = _p("reliable", "QoS of ~/labeled_points, ~/filtered_points and overlays: "
                                     "reliable (depth 10) or sensor_data (best effort); "
                                     "qos_overrides.<topic>.publisher.* refine it",
                         choices=QOS_CHOICES)
    camera_info_policy: str = _p(
        "latest", "how an image gets its CameraInfo: latest (the newest CameraInfo received on "
                  "that camera's info topic; works with latched or low-rate CameraInfo) or "
                  "synchronized (a CameraInfo stamped within slop of the image, paired by "
                  "message_filters' ApproximateTimeSynchronizer when installed)",
        choices=CAMERA_INFO_POLICIES)
    queue_size: int = _p(10, "per-stream queue of the approximate-time synchroniser",
                         min_value=1, max_value=1000)
    slop: float = _p(0.05, "max stamp difference (s) between a sweep and its images",
                     min_value=0.0, max_value=10.0)
    camera_timeout: float = _p(1.0, "a camera silent this long (s) is skipped: LiDAR-only",
                               min_value=0.001, max_value=3600.0)
    tf_timeout: float = _p(0.05, "how long (s) to wait for a LiDAR→camera transform",
                           min_value=0.0, max_value=10.0)
    fixed_frame: str = _p("auto", "world-fixed TF frame for motion-compensated LiDAR→camera "
                                  "lookups (camera pose at the image stamp, LiDAR pose at the sweep "
                                  "stamp, tf2 time travel), e.g. odom; 'auto': the first of odom, "
                                  "map, world in the TF tree; 'none' (or ''): plain lookup at the image "
                                  "stamp")
    class_names: list[str] = _p([], "open vocabulary; unset: the checkpoint's classes. Read back, "
                                    "it is the vocabulary in effect (label i = class_names[i]); "
                                    "changeable at run time", dynamic=True)
    query: str = _p("", "open-vocabulary query: free text whose per-point relevance (0..1, the "
                        "query's softmax probability against the classes) becomes the "
                        "~/labeled_points field 'relevance'; empty: no query, no field. "
                        "Changeable at run time", dynamic=True)
    query_embeddings: str = _p("", "embedding file (clip2scene_core.clip.save_text_embeddings) "
                                   "whose class names are the query texts; empty: the query is "
                                   "embedded by the CLIP text encoder (needs clip_weights)")
    output_layout: str = _p("compact", "~/labeled_points layout: compact (finite points only, "
                                       "height 1) or input (the input's height x width and extra "
                                       "fields such as ring/time; invalid points unlabelled)",
                            choices=OUTPUT_LAYOUTS)
    filter_classes: list[str] = _p([], "class names for ~/filtered_points (empty: not published)")
    filter_mode: str = _p("keep", "~/filtered_points keeps (keep) or removes (drop) the points of "
                                  "filter_classes", choices=FILTER_MODES)
    publish_overlays: bool = _p(True, "publish ~/overlay/<camera> images with projected labels")
    overlay_radius: int = _p(2, "dot radius (px) of projected points in overlays",
                             min_value=0, max_value=20)
    min_depth: float = _p(0.5, "points closer than this (m) to a camera are not projected",
                          min_value=0.0, max_value=100.0)
    diagnostics_period: float = _p(1.0, "seconds between /diagnostics messages",
                                   min_value=0.05, max_value=3600.0)
    warn_throttle: float = _p(5.0, "repeat the same warning at most this often (s)",
                              min_value=0.0, max_value=3600.0)
    cameras_config: dict[str, CameraConfig] = field(default_factory=dict,
                                                    metadata={"internal": True})

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            meta = f.metadata
            if meta.get("internal"):
                continue
            value = getattr(self, f.name)
            if f.name == "device" and not _DEVICE_RE.fullmatch(str(value)):
                raise ConfigError(f"device: '{value}' is not one of auto, cpu, cuda, cuda:<index>")
            if meta.get("choices") and value not in meta["choices"]:
                raise ConfigError(f"{f.name}: '{value}' is not one of {list(meta['choices'])}")
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"{f.name}: {value} is not a finite number")
            if meta.get("min") is not None and value < meta["min"]:
                raise ConfigError(f"{f.name}: {value} is below the minimum {meta['min']}")
            if meta.get("max") is not None and value > meta["max"]:
                raise ConfigError(f"{f.name}: {value} is above the maximum {meta['max']}")
        if len(set(self.cameras)) != len(self.cameras) or any(not c for c in self.cameras):
            raise ConfigError(f"cameras: names must be unique and non-empty, got {self.cameras}")
        for name in self.cameras:
            if not name.replace("_", "a").isalnum():
                raise ConfigError(f"cameras: '{name}' must use letters, digits and '_' only "
                                  "(it becomes a parameter and topic name)")
        extra = set(self.cameras_config) - set(self.cameras)
        if extra:
            raise ConfigError(f"{CAMERA_PREFIX}.*: settings for {sorted(extra)} which are not in "
                              f"cameras {self.cameras}")
        for name in self.cameras:
            self.cameras_config.setdefault(name, CameraConfig(name))
        # tf2 (ROS 2) rejects a leading '/' and names with spaces: say so at start-up
        if self.fixed_frame.startswith("/") or any(c.isspace() for c in self.fixed_frame):
            raise ConfigError(f"fixed_frame: '{self.fixed_frame}' must be a TF frame id without a "
                              "leading '/' or spaces ('auto', or 'none' for plain lookups)")
        names = [str(n).strip() for n in self.class_names]
        if any(not n for n in names) or len(set(names)) != len(names):
            raise ConfigError(f"class_names must be non-empty and unique, got {self.class_names}")
        self.class_names = names
        self.query = str(self.query).strip()
        self.filter_classes = [str(n).strip() for n in self.filter_classes]
        if any(not n for n in self.filter_classes):
            raise ConfigError(f"filter_classes must be non-empty names, got {self.filter_classes}")

    def require_checkpoint(self) -> str:
        """The checkpoint path, or a ConfigError saying how to give one."""
        if not self.checkpoint:
            raise ConfigError("parameter 'checkpoint' is empty: pass checkpoint:=/path/to/model.pt")
        return self.checkpoint

    @property
    def camera_list(self) -> list[CameraConfig]:
        """Camera settings in the order of `cameras`."""
        return [self.cameras_config[n] for n in self.cameras]

    @property
    def sync(self) -> SyncConfig:
        return SyncConfig(queue_size=self.queue_size, slop=self.slop,
                          camera_timeout=self.camera_timeout)


@dataclass(frozen=True)
class ParamSpec:
    """What the node needs to declare one parameter."""

    name: str
    type: type            # bool, int, float, str or list (of str)
    default: Any
    description: str
    dynamic: bool = False
    choices: tuple[str, ...] = ()
    min: float | None = None
    max: float | None = None


_TYPES = {"str": str, "int": int, "float": float, "bool": bool, "list[str]": list}


def parameter_specs() -> list[ParamSpec]:
    """The node's top-level parameters (per-camera ones come from `camera_specs`)."""
    specs = []
    for f in dataclasses.fields(NodeConfig):
        if f.metadata.get("internal"):
            continue
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        specs.append(ParamSpec(f.name, _TYPES[str(f.type)], default, f.metadata["description"],
                               f.metadata["dynamic"], f.metadata["choices"], f.metadata["min"],
                               f.metadata["max"]))
    return specs


def camera_specs(name: str) -> list[ParamSpec]:
    """``camera.<name>.*`` parameters of camera `name`."""
    # topics default to "" (derived from the name and transport in CameraConfig)
    return [ParamSpec(f"{CAMERA_PREFIX}.{name}.{key}", str, "raw" if key == "transport" else "", desc,
                      choices=TRANSPORTS if key == "transport" else ())
            for key, desc in CAMERA_FIELDS.items()]


def check_type(name: str, value: Any, tp: type) -> Any:
    """`value` as parameter type `tp` (an int is fine for a float), else a ConfigError naming it.

    Scalars go through the core's one check (`clip2scene_core.config.check_scalar`)."""
    if tp is list:
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{name}: expected a list of strings, got {value!r}")
        return list(value)
    if tp in (bool, int, float, str):
        return check_scalar(value, tp, name)
    raise ConfigError(f"{name}: unsupported type {tp}")


def from_parameters(params: dict[str, Any]) -> NodeConfig:
    """Flat ``{name: value}`` (as rclpy or a flattened params file gives them) → NodeConfig.

    Unknown names are errors, except the standard ones every rclpy node accepts
    (`ROS_STANDARD_PARAMETERS`, ``qos_overrides.*``). Integers are accepted for doubles.
    """
    specs = {s.name: s for s in parameter_specs()}
    top: dict[str, Any] = {}
    cams: dict[str, dict[str, Any]] = {}
    unknown = []
    for name, value in params.items():
        if name in ROS_STANDARD_PARAMETERS or name.startswith("qos_overrides."):
            continue
        if name in specs:
            top[name] = check_type(name, value, specs[name].type)
            continue
        parts = name.split(".")
        if len(parts) == 3 and parts[0] == CAMERA_PREFIX and parts[2] in CAMERA_FIELDS:
            cams.setdefault(parts[1], {})[parts[2]] = check_type(name, value, str)
            continue
        unknown.append(name)
    if unknown:
        allowed = sorted(specs) + [f"{CAMERA_PREFIX}.<name>.{k}" for k in CAMERA_FIELDS]
        raise ConfigError(f"unknown parameter(s) {sorted(unknown)}; allowed: {allowed}")
    cameras_config = {n: CameraConfig(n, **kw) for n, kw in cams.items()}
    try:
        return NodeConfig(**top, cameras_config=cameras_config)
    except TypeError as exc:  # pragma: no cover - guarded by the spec check above
        raise ConfigError(str(exc)) from exc


def to_parameters(cfg: NodeConfig) -> dict[str, Any]:
    """NodeConfig → flat parameter dict (inverse of `from_parameters`)."""
    out = {s.name: getattr(cfg, s.name) for s in parameter_specs()}
    for cam in cfg.camera_list:
        for key in CAMERA_FIELDS:
            out[f"{CAMERA_PREFIX}.{cam.name}.{key}"] = getattr(cam, key)
    return out


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested YAML mapping → dotted names, as ROS does for ``ros__parameters``."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def _clip(text: str, limit: int = 500) -> str:
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} chars)"


def load_params_file(path: str | Path, node_name: str = NODE_NAME) -> NodeConfig:
    """Read a ROS 2 params file (``<node>: ros__parameters: ...``, also ``/**``) into NodeConfig.

    Every problem is one ``ConfigError`` naming the file: missing, larger than
    ``clip2scene_core.config.MAX_YAML_BYTES``, binary, invalid YAML, YAML aliases (refused like
    ROS 2's own params parser does), wrong structure or parameters; messages quoting a value
    are cut to a few hundred characters.
    """
    data = load_yaml(path, aliases=False)
    merged: dict[str, Any] = {}
    found = False
    for key in ("/**", "**", node_name, f"/{node_name}", f"/**/{node_name}"):
        section = data.get(key)
        if section is None:
            continue
        if not isinstance(section, dict) or "ros__parameters" not in section:
            raise ConfigError(f"{path}: '{key}' must hold a 'ros__parameters' mapping")
        params = section["ros__parameters"] or {}
        if not isinstance(params, dict):
            raise ConfigError(f"{path}: '{key}.ros__parameters' must be a mapping, got "
                              f"{type(params).__name__}")
        merged.update(flatten(params))
        found = True
    if not found:
        keys = sorted(str(k) for k in data)
        listed = ", ".join(_clip(k, 60) for k in keys[:20]) + (" ..." if len(keys) > 20 else "")
        raise ConfigError(f"{path}: no '{node_name}: ros__parameters:' section "
                          f"(top-level keys: [{listed}])")
    try:
        return from_parameters(merged)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {_clip(str(exc))}") from None
