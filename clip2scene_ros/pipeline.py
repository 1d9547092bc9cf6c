"""The segmentation pipeline shared by the rclpy node and the replay tool.

(Over ~400 lines: one class, the per-sweep path from messages to published clouds and
overlays, with its config and output records.)

`SegmentationPipeline.process` turns one PointCloud2 (+ camera images, CameraInfo and a TF
lookup) into the labelled PointCloud2 and overlay images, with per-stage timings and the
reasons any input was left out. It never imports rclpy: messages are duck-typed (rclpy's or
rosbags' classes) and new ones are built through a `MessageFactory`, so the very code the
robot runs is what the tests and the replay tool run. What the node adds around it (sync,
newest-frame slot, the asynchronous teacher, statistics) is `clip2scene_ros.runner`.

Cameras. An image is decoded only when something consumes it: an overlay someone subscribes
to, or inline camera fusion; otherwise the camera is reported idle
(`PipelineOutput.cameras_idle`) at no cost. Each decoded camera is projected once per sweep,
at `PipelineConfig.min_depth`; fusion and its overlay share that projection
(`PipelineOutput.projections`). `SegmentationPipeline.process` alone (the replay tool) fuses
inline; given `TeacherPrediction`s (the runner's asynchronous teacher) it fuses those.

Output fields. The labelled clouds' per-point fields (label, score, rgb, ...) are the rows of
`output_schema.OUTPUT_SCHEMA`, read from the segmenter's result; ``relevance`` only while an
open-vocabulary query is set (`SegmentationPipeline.set_query`: queued like a vocabulary
change, applied at the start of the next frame).

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
from dataclasses import dataclass, field
from typing import Any, Callable, Collection, Sequence

import numpy as np

from clip2scene_core.errors import CalibrationError, Clip2SceneError, ConfigError, TransformError
from clip2scene_core.geometry import Projection, project_points, project_to_cameras
from clip2scene_core.palette import colorize, palette_for
from clip2scene_core.render import draw_points
from clip2scene_core.types import Calibration, CameraFrame

from .image import camera_info_to_model, compressed_to_rgb, image_to_rgb, rgb_to_image
from .msgs import MessageFactory, default_factory, header_stamp_ns
from .output_schema import (OUTPUT_SCHEMA, OutputField, empty_sources, expand_sources,
                            output_columns, result_sources)
from .pointcloud2 import cloud_to_scan, kept_field_values, output_cloud, output_cloud_like
from .sync import SyncedFrame

#: (target_frame, target_stamp_ns, source_frame, source_stamp_ns) → 4×4 matrix taking source
#: coordinates at the source stamp to target coordinates at the target stamp; raises
#: clip2scene_core.errors.TransformError when unavailable. The pipeline asks for the camera
#: optical frame at the image stamp and the LiDAR frame at the sweep stamp; how that is
#: resolved (motion-compensated or not) is `clip2scene_ros.tf.TfResolver`'s one policy,
#: used by the node and the replay tool alike.
TfLookup = Callable[[str, int, str, int], np.ndarray]

#: longest skip reason kept (a reason quoting a huge frame id or value stays readable)
MAX_REASON_CHARS = 500


def clip_reason(text: str, limit: int = MAX_REASON_CHARS) -> str:
    """``text`` cut to ``limit`` characters (skip reasons and failures quote values)."""
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
    query_embeddings: str = ""   # embedding file of the query texts; "": the CLIP text encoder

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
                   filter_mode=getattr(cfg, "filter_mode", cls.filter_mode),
                   query_embeddings=getattr(cfg, "query_embeddings", cls.query_embeddings))


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
    # camera → where those points (the order of `labels`) land in its decoded image, at
    # `PipelineConfig.min_depth`: computed once per camera and sweep, shared by camera fusion
    # and overlays (renders can reuse it); only cameras in `cameras_used`
    projections: dict[str, Projection] = field(default_factory=dict)
    # the decoded images those projections belong to (renders reuse them: decoded once)
    camera_frames: dict[str, CameraFrame] = field(default_factory=dict)

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
                   cpu_threads: int = 0, teacher_precision: str = "auto",
                   sparse_precision: str = "auto") -> Any:
    """`Segmenter` from a checkpoint, with the CLIP teacher when `clip_weights` is given.

    Without a teacher the vocabulary is the checkpoint's and cameras only feed overlays; with
    one, `class_names` can change at run time and camera pixels are fused into the labels.
    Sets torch's CPU thread count first (`cpu_threads`; 0: one on machines with two cores
    or fewer, see `clip2scene_core.threads`). ``teacher_precision``: the teacher's image
    forward, ``sparse_precision``: the backbone's convolutions
    (`clip2scene_core.segmenter.SegmenterConfig`).
    """
    from clip2scene_core.threads import set_cpu_threads
    from clip2scene_core.segmenter import Segmenter, SegmenterConfig

    set_cpu_threads(cpu_threads)

    segmenter = Segmenter.load(checkpoint, device=device,
                               config=SegmenterConfig(teacher_precision=teacher_precision,
                                                      sparse_precision=sparse_precision))
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
                                   getattr(cfg, "teacher_precision", "auto"),
                                   getattr(cfg, "sparse_precision", "auto"))
    pipeline = SegmentationPipeline(segmenter, PipelineConfig.from_node_config(cfg), msg_factory,
                                    tf_lookup)
    if cfg.class_names:
        pipeline.set_class_names(cfg.class_names)
    if getattr(cfg, "query", ""):
        pipeline.set_query(cfg.query)
    return pipeline


class SegmentationPipeline:
    """Messages in, labelled cloud + overlays out, around one `Segmenter`.

    The segmenter is duck-typed: ``segment(scan, cameras, predictions=(), projections=None)``
    returning a result with the attributes `schema` reads (``labels``, ``scores``, ...) plus
    ``class_names``, ``timings`` and ``info``. ``schema``: the per-point output fields
    (`output_schema.OUTPUT_SCHEMA`).
    """

    def __init__(self, segmenter: Any, config: PipelineConfig | None = None,
                 msg_factory: MessageFactory | None = None,
                 tf_lookup: TfLookup | None = None,
                 schema: Sequence[OutputField] = OUTPUT_SCHEMA) -> None:
        self.segmenter = segmenter
        self.schema = tuple(schema)
        self.config = config or PipelineConfig()
        self.factory = msg_factory or default_factory()
        self.tf_lookup = tf_lookup
        self._fields = _needed_fields(segmenter, self.config.scan_fields)
        self._original_vocab = (segmenter.vocabulary, segmenter.text_embeddings) \
            if hasattr(segmenter, "text_embeddings") else None
        self._pending_names: list[str] | None = None
        self._pending_query: tuple[str, Any] | None = None   # (text, embedding or None)
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
        except Exception as exc:  # noqa: BLE001 - keep the old vocabulary and say why
            return f"vocabulary change to {names} failed: {type(exc).__name__}: {exc}"
        return None

    # -- open-vocabulary query ---------------------------------------------------------------
    @property
    def query(self) -> str:
        """The query in effect ("" = none; a queued change applies at the next frame)."""
        return str(getattr(self.segmenter, "query", None) or "")

    def set_query(self, text: str) -> None:
        """Queue a query (``""``: none); it takes effect at the start of the next frame.

        Its embedding comes from ``config.query_embeddings`` (looked up now: an unknown text
        is a ConfigError naming the file and the texts it holds), else from the CLIP text
        encoder (embedded on the next frame); without either: ConfigError.
        """
        text = str(text or "").strip()
        emb = None
        if not callable(getattr(self.segmenter, "set_query", None)):
            if text:
                raise ConfigError("this segmenter does not support queries")
            return
        if text:
            if self.config.query_embeddings:
                emb = self.segmenter.query_embedding(text, self.config.query_embeddings)
            elif getattr(self.segmenter, "teacher", None) is None:
                raise ConfigError(
                    f"query {text!r}: no CLIP text encoder is loaded (clip_weights) and "
                    "query_embeddings names no embedding file: cannot embed it")
        with self._vocab_lock:
            self._pending_query = (text, emb)

    def _apply_pending_query(self) -> str | None:
        with self._vocab_lock:
            pending, self._pending_query = self._pending_query, None
        if pending is None:
            return None
        text, emb = pending
        try:
            self.segmenter.set_query(text or None, embedding=emb)
        except Exception as exc:  # noqa: BLE001 - a query never stops the stream: off, and why
            self.segmenter.set_query(None)
            return f"query {text!r} failed ({type(exc).__name__}: {exc}): no relevance field"
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
        for problem in (self._apply_pending_vocabulary(), self._apply_pending_query()):
            if problem:
                out.warnings.append(problem)
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
        projs: list[Projection] = []      # where the scan's points land in each of `frames`
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
                frame = self.camera_frame(cam, frame_id, stamp, tf_lookup)
                # once per camera and sweep: fusion and overlays share it
                projs.append(project_points(scan.xyz, frame.calibration,
                                            min_depth=self.config.min_depth))
                frames.append(frame)
                out.projections[frame.name] = projs[-1]
                out.camera_frames[frame.name] = frame
            except Clip2SceneError as exc:
                out.cameras_skipped[name] = f"{type(exc).__name__}: {clip_reason(str(exc))}"
            except Exception as exc:  # noqa: BLE001 - a bug or a lookup's own error type
                # must not drop the LiDAR output either; named so that it stands out
                out.cameras_skipped[name] = f"unexpected {type(exc).__name__}: {clip_reason(str(exc))}"
        out.cameras_used = [f.name for f in frames]
        fused = self._calibrate_predictions(out, predictions or (), tf_lookup) if len(scan) else []
        out.timings["convert"] = time.perf_counter() - t0

        if len(scan) == 0:
            labels = np.zeros(0, np.int64)
            scores = np.zeros(0, np.float32)
            sources = empty_sources(self.schema, getattr(self.segmenter, "optional_sources", ()))
            out.status = "empty"
            out.class_names = self.class_names
        else:
            try:
                if predictions is None:
                    result = self.segmenter.segment(scan, frames, projections=projs)
                else:
                    preds = [p for p, _ in fused]
                    result = self.segmenter.segment(scan, (), preds, projections=project_to_cameras(
                        scan.xyz, [p.calibration for p in preds], self.config.min_depth))
                labels, scores = result.labels, result.scores
                sources = result_sources(result, self.schema)
            except Exception as exc:  # noqa: BLE001 - a model failure drops this frame, not the node
                out.status, out.error = "error", f"segmentation failed: {type(exc).__name__}: {exc}"
                return out
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
            self._input_layout_clouds(out, cloud_msg, stats.kept, sources, pal, chosen)
        else:
            columns = output_columns(sources, pal, len(scan), self.schema)
            # the input's own intensity values and datatype (the Scan holds float32 copies)
            intensity = kept_field_values(cloud_msg, stats, "intensity", scan) \
                if scan.has("intensity") else None
            out.cloud = output_cloud(cloud_msg.header, scan.xyz, columns, intensity=intensity,
                                     msg_factory=self.factory)
            if chosen is not None:
                out.filtered_cloud = output_cloud(
                    cloud_msg.header, scan.xyz[chosen], [(n, v[chosen]) for n, v in columns],
                    intensity=None if intensity is None else intensity[chosen],
                    msg_factory=self.factory)
        if self.config.publish_overlays:
            drawn = [(f, p) for f, p in zip(frames, projs)
                     if overlay_cameras is None or f.name in overlay_cameras]
            colors = colorize(labels, palette=pal) if drawn else None
            for frame, proj in drawn:
                out.overlays[frame.name] = self._overlay(frame, proj, colors, cameras)
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
                    f"teacher prediction: {type(exc).__name__}: {clip_reason(str(exc))}"
                continue
            fused.append((pred, (out.stamp_ns - pred.stamp_ns) / 1e9))
        return fused

    def _input_layout_clouds(self, out: PipelineOutput, cloud_msg: Any, kept: np.ndarray,
                             sources: dict[str, np.ndarray], pal: np.ndarray,
                             chosen: np.ndarray | None) -> None:
        """`output_layout="input"`: the labelled cloud (and filtered cloud) in the input's fields."""
        n = kept.size
        columns = output_columns(expand_sources(sources, kept, self.schema), pal, n, self.schema)
        out.cloud = output_cloud_like(cloud_msg, columns, msg_factory=self.factory)
        out.points_out = n
        if chosen is not None:
            select = np.zeros(n, bool)
            select[kept] = chosen
            out.filtered_cloud = output_cloud_like(cloud_msg, columns, select=select,
                                                   msg_factory=self.factory)

    def process_frame(self, frame: SyncedFrame, tf_lookup: TfLookup | None = None,
                      overlay_cameras: Collection[str] | None = None,
                      predictions: "Sequence[TeacherPrediction] | None" = None) -> PipelineOutput:
        """`process` for a `SyncedFrame` whose lidar is a PointCloud2 and cameras `CameraInput`s."""
        out = self.process(frame.lidar, list(frame.cameras.values()), tf_lookup, frame.skipped,
                           overlay_cameras, predictions)
        out.received_ns = frame.received_ns
        return out

    def _overlay(self, frame: CameraFrame, proj: Projection, colors: np.ndarray,
                 cameras: Sequence[CameraInput]) -> Any:
        """The camera image with every point that projects into it drawn in its label colour."""
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
