"""The segmentation pipeline shared by the rclpy node and the replay tool.

`SegmentationPipeline.process` turns one PointCloud2 (+ camera images, CameraInfo and a TF
lookup) into the labelled PointCloud2 and overlay images, with per-stage timings and the
reasons any input was left out. It never imports rclpy: messages are duck-typed (rclpy's or
rosbags' classes) and new ones are built through a `MessageFactory`, so the very code the
robot runs is what the tests and the replay tool run.

`PipelineRunner` adds what the node does around it: the approximate-time `FrameSync`, the
size-1 newest-frame slot between callbacks and the inference thread, statistics for
/diagnostics and throttled warnings. node.py only wires rclpy callbacks to its methods.

Cameras and the CLIP teacher. An image is decoded only when something consumes it: an
overlay someone subscribes to, or inline camera fusion; otherwise the camera is reported
idle (`PipelineOutput.cameras_idle`) at no cost. With a teacher, `PipelineRunner` (by
default, ``teacher_async``) runs it on a `TeacherWorker` thread of its own: every image that
arrives goes to a size-1 slot per camera, the worker predicts the newest one, and each sweep
fuses, per camera, the latest finished prediction stamped within ``teacher_max_age`` of the
sweep (with the LiDAR→camera transform looked up for this sweep and that image stamp). A
sweep never waits for the teacher: a camera without a fitting prediction is LiDAR-only in
that sweep. `SegmentationPipeline.process` alone (the replay tool) fuses inline.

Failure policy (a bad input never stops the stream):
- unreadable cloud / model exception → `status="error"`, no cloud, the next frame runs;
- empty cloud (or nothing finite) → an empty labelled cloud, `status="empty"`;
- NaN/inf points → dropped from the compact output cloud and counted (`dropped_nan`); with
  `output_layout="input"` they stay in place, unlabelled (see `PipelineConfig`);
- a camera with an undecodable image, a CameraInfo that does not fit, or no transform →
  that camera is skipped with a reason; the frame goes on with the others (or LiDAR-only).
  Whatever one camera raises (even a bug: reason "unexpected <type>: ...") skips only that
  camera; skips are counted per camera and reason (`PipelineStats`, the replay report).
"""
from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Collection, Sequence

import numpy as np

from clip2scene_core.errors import CalibrationError, Clip2SceneError, ConfigError, TransformError
from clip2scene_core.geometry import project_points
from clip2scene_core.palette import colorize, palette_for
from clip2scene_core.render import draw_points
from clip2scene_core.types import Calibration, CameraFrame

from .diagnostics import DiagnosticReport, PipelineStats, StageTimes, WarnThrottle, reason_kind
from .image import camera_info_to_model, compressed_to_rgb, image_to_rgb, rgb_to_image
from .msgs import MessageFactory, default_factory, header_stamp_ns
from .pointcloud2 import cloud_to_scan, kept_field_values, labeled_cloud, labeled_cloud_like
from .sync import PAIR_LATEST, CameraInfoPairing, FrameSync, LatestSlot, SyncConfig, SyncedFrame

#: (target_frame, target_stamp_ns, source_frame, source_stamp_ns) → 4×4 matrix taking source
#: coordinates at the source stamp to target coordinates at the target stamp; raises
#: clip2scene_core.errors.TransformError when unavailable. The pipeline asks for the camera
#: optical frame at the image stamp and the LiDAR frame at the sweep stamp; how that is
#: resolved (motion-compensated or not) is `clip2scene_ros.tf.TfResolver`'s one policy,
#: used by the node and the replay tool alike.
TfLookup = Callable[[str, int, str, int], np.ndarray]

#: longest skip reason kept (a reason quoting a huge frame id or value stays readable)
MAX_REASON_CHARS = 500


def _clip(text: str, limit: int = MAX_REASON_CHARS) -> str:
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} chars)"


@dataclass
class CameraInput:
    """One camera's messages for a frame: Image or CompressedImage, and its CameraInfo."""

    name: str
    image: Any
    info: Any
    optical_frame: str = ""   # TF frame of the camera; empty: image header frame_id (then info's)

    @property
    def stamp_ns(self) -> int:
        return header_stamp_ns(self.image)


OUTPUT_LAYOUTS = ("compact", "input")
FILTER_MODES = ("keep", "drop")


@dataclass
class PipelineConfig:
    """Run-time options of the pipeline (the node fills them from its parameters).

    ``output_layout`` — the labelled cloud's layout (``label`` is UINT32 in both, 65535 =
    ``UNLABELED``; intensity keeps the input's datatype):

    * ``"compact"`` (default): height 1, only points with finite x, y, z, fields
      ``x y z [intensity] label score rgb``;
    * ``"input"``: the input's own layout — same height × width (organised clouds stay
      organised), every input field passes through with its datatype and count (ring, time,
      reflectivity, ...; input ``label`` / ``score`` / ``rgb`` are replaced by ours), points with
      non-finite x/y/z keep their coordinates and get label ``UNLABELED``, score 0 and the
      unlabelled colour; ``is_dense`` is False when there is any such point.

    ``filter_classes`` / ``filter_mode`` — an extra class-filtered cloud
    (``PipelineOutput.filtered_cloud``; none when ``filter_classes`` is empty), compact
    (height 1, finite points only) with the same fields as the main output: ``"keep"`` keeps the
    points labelled with one of the classes, ``"drop"`` removes those (unlabelled points stay).
    Names are matched against the current class names (case-insensitive) on every vocabulary
    change; names not in the vocabulary are reported once per vocabulary and ignored.
    """

    publish_overlays: bool = True
    overlay_radius: int = 2
    min_depth: float = 0.5
    scan_fields: tuple[str, ...] = ("intensity",)   # extra cloud fields read besides x, y, z
    output_layout: str = "compact"                   # "compact" | "input"
    filter_classes: tuple[str, ...] = ()             # class names of the filtered cloud
    filter_mode: str = "keep"                        # "keep" | "drop" the filter_classes

    def __post_init__(self) -> None:
        if self.output_layout not in OUTPUT_LAYOUTS:
            raise ConfigError(f"output_layout must be one of {OUTPUT_LAYOUTS}, "
                              f"got {self.output_layout!r}")
        if self.filter_mode not in FILTER_MODES:
            raise ConfigError(f"filter_mode must be one of {FILTER_MODES}, got {self.filter_mode!r}")
        names = [self.filter_classes] if isinstance(self.filter_classes, str) else self.filter_classes
        # blank entries dropped: a ROS string-array parameter cannot be empty, [""] stands for []
        self.filter_classes = tuple(n for n in (str(x).strip() for x in names or ()) if n)

    @classmethod
    def from_node_config(cls, cfg: Any) -> "PipelineConfig":
        # getattr: node configs without the output options (older ones) keep the defaults
        return cls(publish_overlays=cfg.publish_overlays, overlay_radius=cfg.overlay_radius,
                   min_depth=cfg.min_depth,
                   output_layout=getattr(cfg, "output_layout", cls.output_layout),
                   filter_classes=tuple(getattr(cfg, "filter_classes", ()) or ()),
                   filter_mode=getattr(cfg, "filter_mode", cls.filter_mode))


@dataclass
class PipelineOutput:
    """Everything one frame produced; `cloud` is None when the frame was dropped (error)."""

    stamp_ns: int
    frame_id: str
    status: str                                   # "ok" | "empty" | "error"
    cloud: Any = None                             # labelled sensor_msgs/PointCloud2
    filtered_cloud: Any = None                    # class-filtered cloud; None: no filter configured
    overlays: dict[str, Any] = field(default_factory=dict)   # camera → sensor_msgs/Image
    timings: dict[str, float] = field(default_factory=dict)  # seconds: convert/voxelize/infer/publish
    error: str = ""
    warnings: list[str] = field(default_factory=list)
    points_in: int = 0          # points in the message
    dropped_nan: int = 0        # non-finite x/y/z: not in the output cloud
    points_out: int = 0         # points in the output cloud (all input points for layout "input")
    points_labeled: int = 0     # of those, with a label (inside the voxel range)
    points_filtered: int = 0    # points in filtered_cloud
    cameras_used: list[str] = field(default_factory=list)
    cameras_skipped: dict[str, str] = field(default_factory=dict)   # camera → reason
    fusion_skipped: dict[str, str] = field(default_factory=dict)    # used for overlays only: why
    cameras_idle: list[str] = field(default_factory=list)   # not decoded: nothing consumed them
    # asynchronous teacher (PipelineRunner): camera → age (s, sweep − image stamp) of the
    # prediction fused into this sweep, and of latest predictions too far from it (not fused)
    teacher_used: dict[str, float] = field(default_factory=dict)
    teacher_stale: dict[str, float] = field(default_factory=dict)
    class_names: list[str] = field(default_factory=list)
    # per point with finite x/y/z (the compact cloud's points; `kept` maps input points to them)
    labels: np.ndarray | None = None   # (kept.sum(),) int64, -1 = unlabelled
    scores: np.ndarray | None = None   # (kept.sum(),) float32
    kept: np.ndarray | None = None     # (points_in,) bool, row-major: input points with finite x/y/z
    received_ns: int = 0               # when the sweep reached the node (its clock); 0 = unknown

    @property
    def ok(self) -> bool:
        return self.status != "error"


def _needed_fields(segmenter: Any, extra: Sequence[str]) -> tuple[str, ...]:
    """Cloud fields the model's voxel features need, plus `extra` (echoed to the output)."""
    voxel = getattr(getattr(segmenter, "model_config", None), "voxel", None)
    wanted = list(extra)
    for name in getattr(voxel, "features", ()):
        if name in ("xyz", "ones"):
            continue
        wanted.append(name)
    return tuple(dict.fromkeys(wanted))


def load_segmenter(checkpoint: str, device: str = "auto", clip_weights: str = "",
                   cpu_threads: int = 0, teacher_precision: str = "auto") -> Any:
    """`Segmenter` from a checkpoint, with the CLIP teacher when `clip_weights` is given.

    Without a teacher the vocabulary is the checkpoint's and cameras only feed overlays; with
    one, `class_names` can change at run time and camera pixels are fused into the labels.
    Sets torch's CPU thread count first (`cpu_threads`; 0: one on machines with two cores
    or fewer, see `clip2scene_core.threads`). ``teacher_precision``: the teacher's image
    forward (`clip2scene_core.segmenter.SegmenterConfig`).
    """
    from clip2scene_core.threads import set_cpu_threads
    from clip2scene_core.segmenter import Segmenter, SegmenterConfig

    set_cpu_threads(cpu_threads)

    segmenter = Segmenter.load(checkpoint, device=device,
                               config=SegmenterConfig(teacher_precision=teacher_precision))
    if clip_weights:
        from clip2scene_core.clip.teacher import ClipTeacher

        segmenter.teacher = ClipTeacher.from_pretrained(segmenter.clip_model, weights=clip_weights,
                                                        device=segmenter.device)
    return segmenter


def build_pipeline(cfg: Any, segmenter: Any = None, msg_factory: MessageFactory | None = None,
                   tf_lookup: TfLookup | None = None) -> "SegmentationPipeline":
    """The pipeline a `NodeConfig` describes (loads the segmenter unless one is given).

    Used by the node and by the replay tool, so both apply the same parameters.
    """
    if segmenter is None:
        segmenter = load_segmenter(cfg.require_checkpoint(), cfg.device, cfg.clip_weights,
                                   getattr(cfg, "cpu_threads", 0),
                                   getattr(cfg, "teacher_precision", "auto"))
    pipeline = SegmentationPipeline(segmenter, PipelineConfig.from_node_config(cfg), msg_factory,
                                    tf_lookup)
    if cfg.class_names:
        pipeline.set_class_names(cfg.class_names)
    return pipeline


class SegmentationPipeline:
    """Messages in, labelled cloud + overlays out, around one `Segmenter`."""

    def __init__(self, segmenter: Any, config: PipelineConfig | None = None,
                 msg_factory: MessageFactory | None = None,
                 tf_lookup: TfLookup | None = None) -> None:
        self.segmenter = segmenter
        self.config = config or PipelineConfig()
        self.factory = msg_factory or default_factory()
        self.tf_lookup = tf_lookup
        self._fields = _needed_fields(segmenter, self.config.scan_fields)
        self._original_vocab = (segmenter.vocabulary, segmenter.text_embeddings) \
            if hasattr(segmenter, "text_embeddings") else None
        self._pending_names: list[str] | None = None
        self._vocab_lock = threading.Lock()
        self._palette_key: tuple[str, ...] = ()
        self._palette = np.zeros((0, 3), np.uint8)
        self._filter_key: tuple | None = None
        self._filter_ids = np.zeros(0, np.int64)

    # -- vocabulary ------------------------------------------------------------------------
    @property
    def class_names(self) -> list[str]:
        return list(self.segmenter.class_names)

    @property
    def original_class_names(self) -> list[str]:
        """The checkpoint's own classes (what an empty `set_class_names` restores)."""
        if self._original_vocab is None:
            return self.class_names
        return list(self._original_vocab[0].class_names)

    def check_class_names(self, names: Sequence[str]) -> str | None:
        """Why `names` cannot become the vocabulary (None when it can); for parameter callbacks."""
        names = [str(n).strip() for n in names]
        if not names:
            return None  # back to the checkpoint's vocabulary
        if any(not n for n in names) or len(set(names)) != len(names):
            return f"class names must be non-empty and unique, got {names}"
        if getattr(self.segmenter, "teacher", None) is None:
            return ("no CLIP text encoder is loaded, so new class names cannot be embedded "
                    "(start the node with clip_weights set)")
        return None

    def set_class_names(self, names: Sequence[str]) -> None:
        """Queue a vocabulary change; it takes effect at the start of the next frame.

        An empty list restores the checkpoint's own classes.
        """
        reason = self.check_class_names(names)
        if reason:
            raise ConfigError(reason)
        with self._vocab_lock:
            self._pending_names = [str(n).strip() for n in names]

    def _apply_pending_vocabulary(self) -> str | None:
        with self._vocab_lock:
            names, self._pending_names = self._pending_names, None
        if names is None:
            return None
        try:
            if not names and self._original_vocab is not None:
                self.segmenter.set_vocabulary(*self._original_vocab)
            elif names:
                self.segmenter.set_vocabulary(names)
        except Exception as exc:  # keep the old vocabulary and say why
            return f"vocabulary change to {names} failed: {type(exc).__name__}: {exc}"
        return None

    def palette(self, class_names: Sequence[str]) -> np.ndarray:
        """(K, 3) uint8 colours of the current classes (cached: it only changes with them)."""
        key = tuple(class_names)
        if key != self._palette_key:
            self._palette_key, self._palette = key, palette_for(key)
        return self._palette

    def _filter_classes(self, class_names: Sequence[str]) -> tuple[np.ndarray | None, str | None]:
        """Class indices named by ``config.filter_classes`` in ``class_names`` (None: no
        filter), and a warning about unknown names the first time this vocabulary is seen."""
        # read per frame: a node may change the filter options while running
        wanted = tuple(n for n in (str(x).strip() for x in self.config.filter_classes) if n)
        mode = self.config.filter_mode
        if not wanted:
            return None, None
        key = (tuple(class_names), wanted, mode)
        if key == self._filter_key:
            return self._filter_ids, None
        have = [str(n).strip().lower() for n in class_names]
        folded = {n.lower() for n in wanted}
        unknown = [n for n in wanted if n.lower() not in have]
        self._filter_ids = np.array([i for i, n in enumerate(have) if n in folded], dtype=np.int64)
        self._filter_key = key
        warning = None
        if unknown:
            warning = (f"filter_classes {unknown} are not among the current classes "
                       f"{list(class_names)}: ignored by the {mode!r} filter")
        return self._filter_ids, warning

    # -- cameras ---------------------------------------------------------------------------
    @property
    def fuses_inline(self) -> bool:
        """Whether the segmenter uses the camera frames `process` gives it (a teacher is loaded
        and camera fusion is on: `Segmenter.consumes_cameras`); only then are images decoded
        for it."""
        seg = self.segmenter
        flag = getattr(seg, "consumes_cameras", None)
        if flag is not None:
            return bool(flag)
        return getattr(seg, "teacher", None) is not None and \
            bool(getattr(getattr(seg, "config", None), "camera_fusion", True))

    def decode_camera(self, cam: CameraInput) -> tuple[np.ndarray, Any]:
        """The (H, W, 3) RGB image and its CameraModel; any problem raises a Clip2SceneError.

        The CameraInfo is checked first and the image's size (from its header, for a
        CompressedImage) against it before anything is decoded, so a bad message costs no
        decoding.
        """
        img_msg = cam.image
        model = camera_info_to_model(cam.info)
        size = (model.width, model.height)
        if hasattr(img_msg, "format") and not hasattr(img_msg, "encoding"):
            rgb = compressed_to_rgb(img_msg, expected_size=size)
        else:
            rgb = image_to_rgb(img_msg, expected_size=size)
        h, w = rgb.shape[:2]
        if (w, h) != size:   # the converters checked it already; kept as the contract
            raise CalibrationError(
                f"image is {w}x{h} but CameraInfo says {model.width}x{model.height}")
        return rgb, model

    @staticmethod
    def optical_frame(cam: CameraInput) -> str:
        """The camera's TF frame: configured, else the image's header frame_id, else the info's."""
        try:
            frame = cam.optical_frame or str(cam.image.header.frame_id) \
                or str(cam.info.header.frame_id)
        except AttributeError as exc:
            raise CalibrationError(f"camera message without a header: {exc}") from None
        if not frame:
            raise CalibrationError("neither the image nor its CameraInfo names a frame_id")
        return frame

    def lidar_to_camera(self, optical_frame: str, image_stamp_ns: int, lidar_frame: str,
                        lidar_stamp_ns: int, tf_lookup: TfLookup | None = None) -> np.ndarray:
        """4×4 taking points of the sweep (LiDAR frame at its stamp) into the camera at the
        image stamp: both stamps go to the lookup, which decides."""
        lookup = tf_lookup or self.tf_lookup
        if lookup is None:
            raise TransformError("no TF lookup given to the pipeline")
        return np.asarray(lookup(optical_frame, image_stamp_ns, lidar_frame, lidar_stamp_ns),
                          dtype=np.float64)

    def camera_frame(self, cam: CameraInput, lidar_frame: str, lidar_stamp_ns: int,
                     tf_lookup: TfLookup | None = None) -> CameraFrame:
        """Decode, check and calibrate one camera; any problem raises a Clip2SceneError.

        ``lidar_to_camera`` maps points of the sweep (LiDAR frame at ``lidar_stamp_ns``)
        into the camera at its image stamp (see `lidar_to_camera`).
        """
        rgb, model = self.decode_camera(cam)
        frame = self.optical_frame(cam)
        T = self.lidar_to_camera(frame, cam.stamp_ns, lidar_frame, lidar_stamp_ns, tf_lookup)
        return CameraFrame(cam.name, rgb, Calibration(model, T), cam.stamp_ns)

    # -- one frame -------------------------------------------------------------------------
    def process(self, cloud_msg: Any, cameras: Sequence[CameraInput] = (),
                tf_lookup: TfLookup | None = None, skipped: dict[str, str] | None = None,
                overlay_cameras: Collection[str] | None = None,
                predictions: "Sequence[TeacherPrediction] | None" = None) -> PipelineOutput:
        """Segment one sweep; never raises for bad data (see the module docstring).

        Overlays are drawn when `config.publish_overlays` is set, for the cameras in
        `overlay_cameras` (None: every camera used) — the node passes the ones with subscribers.
        ``predictions`` None: the teacher (if any) runs inline on the cameras; a sequence
        (asynchronous teacher): those predictions are fused, each with the transform for this
        sweep, and cameras are decoded for overlays only. A camera nothing consumes is not
        decoded (`PipelineOutput.cameras_idle`).
        """
        t0 = time.perf_counter()
        try:
            stamp, frame_id = header_stamp_ns(cloud_msg), str(cloud_msg.header.frame_id)
        except (AttributeError, TypeError) as exc:
            return PipelineOutput(0, "", "error", error=f"not a PointCloud2 header: {exc}")
        out = PipelineOutput(stamp, frame_id, "ok", cameras_skipped=dict(skipped or {}))
        vocab_problem = self._apply_pending_vocabulary()
        if vocab_problem:
            out.warnings.append(vocab_problem)
        try:
            scan, stats = cloud_to_scan(cloud_msg, self._fields)
        except Clip2SceneError as exc:
            out.status, out.error = "error", f"invalid PointCloud2: {exc}"
            out.timings["convert"] = time.perf_counter() - t0
            return out
        out.points_in, out.dropped_nan, out.points_out = stats.n_points, stats.n_nonfinite, len(scan)
        out.kept = stats.kept
        if stats.missing_fields:
            out.warnings.append(f"cloud has no {list(stats.missing_fields)} field: using zeros")
        frames: list[CameraFrame] = []
        inline = predictions is None and self.fuses_inline
        overlays = self.config.publish_overlays
        for cam in cameras:
            name = str(getattr(cam, "name", "?"))
            if not inline and not (overlays and (overlay_cameras is None or name in overlay_cameras)):
                out.cameras_idle.append(name)   # nothing consumes it: not decoded
                continue
            # a camera that fails is skipped and counted (cameras_skipped → diagnostics and the
            # replay report); the sweep goes on with the others or LiDAR-only
            try:
                frames.append(self.camera_frame(cam, frame_id, stamp, tf_lookup))
            except Clip2SceneError as exc:
                out.cameras_skipped[str(getattr(cam, "name", "?"))] = \
                    f"{type(exc).__name__}: {_clip(str(exc))}"
            except Exception as exc:  # noqa: BLE001 - a bug or a lookup's own error type
                # must not drop the LiDAR output either; named so that it stands out
                out.cameras_skipped[str(getattr(cam, "name", "?"))] = \
                    f"unexpected {type(exc).__name__}: {_clip(str(exc))}"
        out.cameras_used = [f.name for f in frames]
        fused = self._calibrate_predictions(out, predictions or (), tf_lookup) if len(scan) else []
        out.timings["convert"] = time.perf_counter() - t0

        if len(scan) == 0:
            labels = np.zeros(0, np.int64)
            scores = np.zeros(0, np.float32)
            out.status = "empty"
            out.class_names = self.class_names
        else:
            try:
                if predictions is None:
                    result = self.segmenter.segment(scan, frames)
                else:
                    result = self.segmenter.segment(scan, (), [p for p, _ in fused])
            except Exception as exc:  # a model failure drops this frame, not the node
                out.status, out.error = "error", f"segmentation failed: {type(exc).__name__}: {exc}"
                return out
            labels, scores = result.labels, result.scores
            out.class_names = list(result.class_names)
            for stage, seconds in result.timings.items():
                out.timings[stage] = float(seconds)
            info = result.info or {}
            out.fusion_skipped.update({name: reason for name, reason in info.get("cameras_skipped", [])})
            out.teacher_used = {p.name: age for p, age in fused if p.name not in out.fusion_skipped}
        t1 = time.perf_counter()
        out.labels, out.scores = labels, scores
        out.points_labeled = int(np.count_nonzero(labels >= 0))
        pal = self.palette(out.class_names)
        colors = colorize(labels, palette=pal)
        filter_ids, filter_warning = self._filter_classes(out.class_names)
        if filter_warning:
            out.warnings.append(filter_warning)
        chosen = None
        if filter_ids is not None:
            chosen = np.isin(labels, filter_ids)
            if self.config.filter_mode == "drop":
                chosen = ~chosen
            out.points_filtered = int(np.count_nonzero(chosen))
        if self.config.output_layout == "input":
            self._input_layout_clouds(out, cloud_msg, stats.kept, labels, scores, pal, chosen)
        else:
            # the input's own intensity values and datatype (the Scan holds float32 copies)
            intensity = kept_field_values(cloud_msg, stats, "intensity") if scan.has("intensity") else None
            out.cloud = labeled_cloud(cloud_msg.header, scan.xyz, labels, scores, intensity=intensity,
                                      rgb=colors, msg_factory=self.factory)
            if chosen is not None:
                out.filtered_cloud = labeled_cloud(
                    cloud_msg.header, scan.xyz[chosen], labels[chosen], scores[chosen],
                    intensity=None if intensity is None else intensity[chosen], rgb=colors[chosen],
                    msg_factory=self.factory)
        if self.config.publish_overlays:
            for frame in frames:
                if overlay_cameras is None or frame.name in overlay_cameras:
                    out.overlays[frame.name] = self._overlay(frame, scan.xyz, colors, cameras)
        out.timings["publish"] = time.perf_counter() - t1
        return out

    def _calibrate_predictions(self, out: PipelineOutput, predictions: "Sequence[TeacherPrediction]",
                               tf_lookup: TfLookup | None) -> list[tuple[Any, float]]:
        """(prediction with this sweep's LiDAR→camera transform, age s) per prediction; one
        whose transform is unavailable is left out (`fusion_skipped`)."""
        fused = []
        for tp in predictions:
            pred = tp.prediction
            try:
                T = self.lidar_to_camera(tp.optical_frame, pred.stamp_ns, out.frame_id,
                                         out.stamp_ns, tf_lookup)
                pred = pred.with_calibration(Calibration(pred.calibration.camera, T))
            except Exception as exc:  # noqa: BLE001 - the lookup's own error types too
                out.fusion_skipped[pred.name] = \
                    f"teacher prediction: {type(exc).__name__}: {_clip(str(exc))}"
                continue
            fused.append((pred, (out.stamp_ns - pred.stamp_ns) / 1e9))
        return fused

    def _input_layout_clouds(self, out: PipelineOutput, cloud_msg: Any, kept: np.ndarray,
                             labels: np.ndarray, scores: np.ndarray, pal: np.ndarray,
                             chosen: np.ndarray | None) -> None:
        """`output_layout="input"`: the labelled cloud (and filtered cloud) in the input's fields."""
        n = kept.size
        full_labels = np.full(n, -1, np.int64)
        full_labels[kept] = labels
        full_scores = np.zeros(n, np.float32)
        full_scores[kept] = scores
        full_colors = colorize(full_labels, palette=pal)
        out.cloud = labeled_cloud_like(cloud_msg, full_labels, full_scores, full_colors,
                                       msg_factory=self.factory)
        out.points_out = n
        if chosen is not None:
            select = np.zeros(n, bool)
            select[kept] = chosen
            out.filtered_cloud = labeled_cloud_like(cloud_msg, full_labels, full_scores, full_colors,
                                                    select=select, msg_factory=self.factory)

    def process_frame(self, frame: SyncedFrame, tf_lookup: TfLookup | None = None,
                      overlay_cameras: Collection[str] | None = None,
                      predictions: "Sequence[TeacherPrediction] | None" = None) -> PipelineOutput:
        """`process` for a `SyncedFrame` whose lidar is a PointCloud2 and cameras `CameraInput`s."""
        out = self.process(frame.lidar, list(frame.cameras.values()), tf_lookup, frame.skipped,
                           overlay_cameras, predictions)
        out.received_ns = frame.received_ns
        return out

    def _overlay(self, frame: CameraFrame, xyz: np.ndarray, colors: np.ndarray,
                 cameras: Sequence[CameraInput]) -> Any:
        """The camera image with every point that projects into it drawn in its label colour."""
        proj = project_points(xyz, frame.calibration, min_depth=self.config.min_depth)
        idx = np.flatnonzero(proj.valid)
        idx = idx[np.argsort(-proj.depth[idx], kind="stable")]   # near points drawn last
        canvas = draw_points(frame.image, proj.uv[idx], colors[idx], radius=self.config.overlay_radius)
        src = next(c for c in cameras if c.name == frame.name)
        return rgb_to_image(canvas, src.image.header, factory=self.factory)


@dataclass
class TeacherPrediction:
    """A finished teacher prediction of one camera, and the TF frame to look its pose up in."""

    prediction: Any          # clip2scene_core.segmenter.CameraPrediction
    optical_frame: str


class TeacherWorker:
    """Runs the CLIP teacher on camera images at its own rate, on a thread of its own.

    `submit` (any thread, cheap) puts an image into its camera's size-1 slot, replacing one
    the worker has not started yet; the worker takes the camera that has waited longest,
    decodes the image, runs `Segmenter.predict_camera` and keeps the latest prediction per
    camera (`latest`). The thread starts with the first image; `close` stops it (a prediction
    in progress finishes first), `reopen` allows a new start with no old predictions.
    """

    def __init__(self, pipeline: SegmentationPipeline, precision: str | None = None,
                 on_failure: Callable[[str, str], None] | None = None) -> None:
        self.pipeline = pipeline
        self.precision = precision          # None: the segmenter's config.teacher_precision
        self.on_failure = on_failure        # (camera, reason), called on the worker thread
        self._cond = threading.Condition()
        self._pending: dict[str, CameraInput] = {}   # insertion order = waiting longest first
        self._results: dict[str, TeacherPrediction] = {}
        self._busy = False
        self._closed = False
        self._thread: threading.Thread | None = None
        self._generation = 0                 # a thread of an older generation (closed) ends
        # statistics (read under the condition's lock)
        self.times = StageTimes()            # "decode", "teacher" seconds per image
        self.done = 0
        self.replaced = 0                    # superseded in their slot before the worker got to them
        self.failed: Counter[tuple[str, str]] = Counter()   # (camera, reason kind)
        self.last_failure = ""

    def submit(self, cam: CameraInput) -> None:
        with self._cond:
            if self._closed:
                return
            if cam.name in self._pending:
                self.replaced += 1
            self._pending[cam.name] = cam    # an existing key keeps its place in the queue
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, args=(self._generation,),
                                                name="clip2scene_teacher", daemon=True)
                self._thread.start()
            self._cond.notify_all()

    def latest(self) -> dict[str, TeacherPrediction]:
        """The newest finished prediction per camera."""
        with self._cond:
            return dict(self._results)

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until every submitted image is predicted (tests, benchmarks)."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._pending and not self._busy, timeout)

    def close(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._closed = True
            self._generation += 1
            self._pending.clear()
            self._cond.notify_all()
            thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def reopen(self) -> None:
        with self._cond:
            self._closed = False
            self._results.clear()

    def _run(self, generation: int) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._pending or generation != self._generation)
                if generation != self._generation:
                    return
                name = next(iter(self._pending))
                cam = self._pending.pop(name)
                self._busy = True
            result, times, failure = self._predict(cam)
            with self._cond:
                self._busy = False
                if result is not None and generation == self._generation:
                    self._results[name] = result
                    self.done += 1
                    self.times.add(times)
                elif failure:
                    self.failed[(name, reason_kind(failure))] += 1
                    self.last_failure = f"camera '{name}': {failure}"
                self._cond.notify_all()
            if failure and self.on_failure is not None:
                self.on_failure(name, failure)

    def _predict(self, cam: CameraInput) -> tuple[TeacherPrediction | None, dict[str, float], str]:
        t0 = time.perf_counter()
        try:
            rgb, model = self.pipeline.decode_camera(cam)
            optical = self.pipeline.optical_frame(cam)
            t1 = time.perf_counter()
            # the extrinsics are the sweep's, looked up when a sweep fuses the prediction
            frame = CameraFrame(cam.name, rgb, Calibration(model), cam.stamp_ns)
            pred = self.pipeline.segmenter.predict_camera(frame, self.precision)
        except Clip2SceneError as exc:
            return None, {}, f"{type(exc).__name__}: {_clip(str(exc))}"
        except Exception as exc:  # noqa: BLE001 - a bug must not kill the worker
            return None, {}, f"unexpected {type(exc).__name__}: {_clip(str(exc))}"
        t2 = time.perf_counter()
        return TeacherPrediction(pred, optical), {"decode": t1 - t0, "teacher": t2 - t1}, ""


def _stamp_or(msg: Any, now_ns: int) -> int:
    """A message's header stamp (ns), or the arrival time when it has no readable header."""
    try:
        return header_stamp_ns(msg)
    except (AttributeError, TypeError):
        return now_ns


class PipelineRunner:
    """The node's logic without rclpy: callbacks → sync → newest-frame slot → pipeline.

    The node calls `on_cloud` / `on_camera` from subscription callbacks, `on_timer`
    periodically (releases sweeps whose cameras went quiet), and runs `step` in a loop on
    its inference thread, publishing what it returns. `clock` gives "now" in nanoseconds
    (the node's ROS clock, so simulated time works).

    With a teacher loaded and camera fusion on, ``teacher_async`` (default) runs it on a
    `TeacherWorker` (``self.teacher``): each sweep fuses, per camera, the latest finished
    prediction whose image stamp is within ``teacher_max_age`` seconds of the sweep's, and
    never waits for one. ``teacher_async=False``: the teacher runs inline in `step`.
    """

    def __init__(self, pipeline: SegmentationPipeline, camera_names: Sequence[str] = (),
                 sync_config: SyncConfig | None = None, tf_lookup: TfLookup | None = None,
                 clock: Callable[[], int] | None = None,
                 warn: Callable[[str], None] | None = None, warn_throttle_s: float = 5.0,
                 device: str = "",
                 overlay_cameras: Callable[[], Collection[str] | None] | None = None,
                 camera_info_policy: str = PAIR_LATEST, teacher_async: bool = True,
                 teacher_max_age: float = 0.5, teacher_precision: str | None = None) -> None:
        self.pipeline = pipeline
        self.teacher: TeacherWorker | None = (
            TeacherWorker(pipeline, teacher_precision, self._on_teacher_failure)
            if teacher_async and camera_names and pipeline.fuses_inline
            and hasattr(pipeline.segmenter, "predict_camera") else None)
        self.teacher_max_age_ns = int(round(float(teacher_max_age) * 1e9))
        self.teacher_used: Counter[str] = Counter()
        self.teacher_stale: Counter[str] = Counter()
        self.sync = FrameSync(camera_names, sync_config or SyncConfig())
        # image ↔ CameraInfo, per camera (used by on_image / on_camera_info; a node whose
        # message_filters pairs them itself calls on_camera directly)
        self.pairings = {name: CameraInfoPairing(camera_info_policy, sync_config or SyncConfig())
                         for name in camera_names}
        self._optical_frames: dict[str, str] = {}
        self.slot: LatestSlot[SyncedFrame] = LatestSlot()
        self.tf_lookup = tf_lookup
        self.clock = clock or time.time_ns
        self.warn = warn
        self.throttle = WarnThrottle(warn_throttle_s)
        self.stats = PipelineStats(device=device)
        self.overlay_cameras = overlay_cameras   # asked per frame: which overlays anyone wants
        self._lock = threading.Lock()

    # -- callbacks (any thread) ------------------------------------------------------------
    def on_cloud(self, msg: Any) -> None:
        now = self.clock()
        with self._lock:
            self.stats.on_input(now)
            stamp = _stamp_or(msg, now)
            self._offer(self.sync.add_lidar(msg, stamp, now))

    def on_camera(self, name: str, image: Any, info: Any, optical_frame: str = "") -> None:
        now = self.clock()
        cam = CameraInput(name, image, info, optical_frame)
        if self.teacher is not None and name in self.pairings:
            self.teacher.submit(cam)      # its newest image, predicted at the teacher's own rate
        with self._lock:
            stamp = _stamp_or(image, now)
            self._offer(self.sync.add_camera(name, cam, stamp, now))

    def on_image(self, name: str, image: Any, optical_frame: str = "") -> None:
        """An image of camera `name`; it goes on once it has its CameraInfo (see `pairings`)."""
        pairing = self.pairings.get(name)
        if pairing is None:
            return
        now = self.clock()
        self._optical_frames[name] = optical_frame
        stamp = _stamp_or(image, now)
        before = pairing.counters.no_info
        for img, info in pairing.on_image(image, stamp, now):
            self.on_camera(name, img, info, optical_frame)
        if pairing.counters.no_info > before:
            self._warn(("no_info", name), f"camera '{name}': no CameraInfo received yet, image "
                       "dropped (a latched CameraInfo needs a transient_local subscription: "
                       "qos_overrides.<info topic>.subscription.durability)")

    def on_camera_info(self, name: str, info: Any) -> None:
        """A CameraInfo of camera `name` (cached; releases images waiting for it)."""
        pairing = self.pairings.get(name)
        if pairing is None:
            return
        now = self.clock()
        stamp = _stamp_or(info, now)
        for img, paired in pairing.on_info(info, stamp, now):
            self.on_camera(name, img, paired, self._optical_frames.get(name, ""))

    def on_timer(self) -> None:
        now = self.clock()
        for name, pairing in self.pairings.items():
            for img, info in pairing.poll(now):
                self.on_camera(name, img, info, self._optical_frames.get(name, ""))
        with self._lock:
            self._offer(self.sync.poll(self.clock()))

    def _offer(self, frames: list[SyncedFrame]) -> None:
        for frame in frames:
            if self.slot.put(frame):
                self.stats.dropped_busy += 1
                self._warn("busy", "inference is slower than the input: dropped the older frame")

    # -- inference thread ------------------------------------------------------------------
    def step(self, timeout: float | None = 0.1) -> PipelineOutput | None:
        """Process the newest waiting frame (None if none came within `timeout` seconds)."""
        frame = self.slot.take(timeout)
        if frame is None:
            return None
        try:
            wanted = self.overlay_cameras() if self.overlay_cameras is not None else None
            preds, stale = self._matching_predictions(frame.stamp_ns)
            out = self.pipeline.process_frame(frame, self.tf_lookup, wanted, preds)
            out.teacher_stale = stale
        except Exception as exc:  # a bug must not kill the inference thread: report it
            out = PipelineOutput(frame.stamp_ns, "", "error", received_ns=frame.received_ns,
                                 error=f"internal error: {type(exc).__name__}: {exc}")
        now = self.clock()
        with self._lock:
            self.stats.on_output(out, now)
            self.teacher_used.update(out.teacher_used.keys())     # counts per camera
            self.teacher_stale.update(out.teacher_stale.keys())
        for name, reason in out.fusion_skipped.items():
            if reason.startswith("teacher prediction:"):
                self._warn(("teacher", name, reason_kind(reason[19:])), f"camera '{name}': {reason}")
        if out.status == "error":
            self._warn(("error", reason_kind(out.error)), out.error)
        for name, reason in out.cameras_skipped.items():
            self._warn(("camera", name, reason_kind(reason)), f"camera '{name}' skipped: {reason}")
        for text in out.warnings:
            self._warn(("warning", text), text)
        return out

    def warn_throttled(self, key: Any, text: str) -> None:
        """A warning from outside the pipeline (e.g. TF fallbacks), throttled per ``key``."""
        self._warn(("external", key), text)

    def _on_teacher_failure(self, name: str, reason: str) -> None:
        self._warn(("teacher", name, reason_kind(reason)),
                   f"camera '{name}': teacher prediction failed: {reason}")

    def _matching_predictions(self, stamp_ns: int
                              ) -> tuple[list[TeacherPrediction] | None, dict[str, float]]:
        """Asynchronous teacher: the latest prediction per camera within ``teacher_max_age`` of
        the sweep, and the ages (s) of the others (stale); (None, {}): the teacher is inline."""
        if self.teacher is None:
            return None, {}
        used, stale = [], {}
        for name, tp in self.teacher.latest().items():
            age = stamp_ns - tp.prediction.stamp_ns
            if abs(age) <= self.teacher_max_age_ns:
                used.append(tp)
            else:
                stale[name] = age / 1e9
        return used, stale

    def close(self) -> None:
        self.slot.close()
        if self.teacher is not None:
            self.teacher.close()

    def reopen(self) -> None:
        """Undo `close` (a managed node's next activation)."""
        self.slot.reopen()
        if self.teacher is not None:
            self.teacher.reopen()

    # -- reporting -------------------------------------------------------------------------
    def diagnostics(self) -> DiagnosticReport:
        with self._lock:
            self.stats.dropped_sync = self.sync.counters.lidar_overflow
            report = self.stats.report(self.clock())
        for name, pairing in self.pairings.items():
            c = pairing.counters
            if c.no_info:
                report.values[f"camera.{name}.dropped[no CameraInfo yet]"] = str(c.no_info)
            if c.unmatched:
                report.values[f"camera.{name}.dropped[no CameraInfo within slop]"] = str(c.unmatched)
        worker = self.teacher
        if worker is not None:
            with worker._cond:
                v = report.values
                v["teacher.mode"] = "async"
                v["teacher.predictions"] = str(worker.done)
                v["teacher.replaced"] = str(worker.replaced)
                v["teacher.latency_mean_s"] = f"{worker.times.mean('teacher'):.4f}"
                v["teacher.latency_max_s"] = f"{worker.times.max('teacher'):.4f}"
                v["teacher.decode_mean_s"] = f"{worker.times.mean('decode'):.4f}"
                for (name, kind), n in sorted(worker.failed.items()):
                    v[f"camera.{name}.teacher_failed[{kind}]"] = str(n)
                if worker.last_failure:
                    v["teacher.last_failure"] = worker.last_failure
            with self._lock:
                for name, n in sorted(self.teacher_used.items()):
                    report.values[f"camera.{name}.teacher_used"] = str(n)
                for name, n in sorted(self.teacher_stale.items()):
                    report.values[f"camera.{name}.teacher_stale"] = str(n)
        elif self.pipeline.fuses_inline and self.pairings:
            report.values["teacher.mode"] = "inline"
        return report

    def _warn(self, key: Any, text: str) -> None:
        if self.warn is not None and self.throttle.should_log(key, self.clock()):
            self.warn(text)
