"""``clip2scene-replay`` / ``ros2 run clip2scene_ros replay``: evaluate a bag without ROS.

Reads a rosbag2 (mcap / sqlite3) or ROS 1 bag, feeds it message by message (bag time order)
through exactly what the node runs — ``FrameSync`` (approximate time), the node's TF policy
``TfResolver`` over a ``TransformBuffer`` filled from the bag's /tf_static and /tf (with a
fixed frame such as ``odom`` / ``map`` the LiDAR pose is taken at the sweep stamp and the
camera pose at the image stamp, compensating the vehicle's motion between them; see the
``fixed_frame`` parameter and ``--fixed-frame``), and the shared ``SegmentationPipeline`` built
from the node's parameters
(``--params config/segment.yaml``, overridden by the options) — and writes a rosbag2 with
the labelled PointCloud2 (same fields as the node publishes: x, y, z, [intensity], label,
score, rgb) on ``/clip2scene_segmenter/labeled_points``, at the input cloud's bag time, so
``ros2 bag play`` of the result drives RViz like the live node. ``--copy-inputs`` copies the
input topics alongside.

It reports per-frame latency (p50 / p95 / max of convert, voxelize, infer, publish, total),
throughput, frames dropped and why, and what the bag reader had to skip (a truncated or
damaged bag is processed as far as it can be read). With ground truth in the bag (the
``/clip2scene/labels`` + ``/clip2scene/label_classes`` topics the dataset converters write)
or in ``--gt-dir`` (``<stamp_ns>.npy`` label arrays), it computes per-class IoU / mIoU and a
confusion-matrix PNG. ``--render-frames 0,5`` writes bird's-eye-view and camera PNGs of those
frames. Everything lands in ``--report-dir`` (default ``<out>_report``): report.json, PNGs.

Every run that reaches the bag writes its report and closes the output bag with its
metadata.yaml, also when it stops early (damaged bag without a readable LiDAR topic, disk
full, Ctrl-C, SIGTERM, a bug); the report then says why. Exit status: 0 when labelled frames
were written, 1 when none was, 2 on an error, 3 on an unexpected error, 130/143 when
interrupted. ``--overwrite`` replaces only a bag this tool wrote or an empty folder.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import signal
import sys
import time
import traceback
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from clip2scene_core.errors import Clip2SceneError, ConfigError
from clip2scene_core.geometry import project_points
from clip2scene_core.metrics import ConfusionMatrix
from clip2scene_core.palette import normalize_name
from clip2scene_core.threads import prepare_openmp

from .bag import (CAMERA_INFO, COMPRESSED_IMAGE, IMAGE, LABEL_CLASSES_TOPIC, LABEL_IGNORE,
                  LABELS_TOPIC, POINTCLOUD2, TF_MESSAGE, BagError, BagReader, BagWriter,
                  check_output_bag, convert_message, os_error_text)
from .msgs import MessageFactory, header_stamp_ns
from .node_config import NODE_NAME, CameraConfig, NodeConfig, load_params_file
from .pipeline import CameraInput, PipelineOutput, build_pipeline
from .pointcloud2 import read_points
from .sync import FrameSync, SyncedFrame
from .tf import TfResolver, TransformBuffer

log = logging.getLogger("clip2scene.replay")

OUTPUT_NS = f"/{NODE_NAME}"
OUTPUT_TOPIC = f"{OUTPUT_NS}/labeled_points"
STAGES = ("convert", "voxelize", "infer", "publish", "total")


# --------------------------------------------------------------------------------------
# topic discovery
# --------------------------------------------------------------------------------------

@dataclass
class ReplayTopics:
    """Which input topics feed the pipeline."""

    lidar: str
    cameras: list[CameraConfig] = field(default_factory=list)
    tf: list[str] = field(default_factory=list)
    tf_static: list[str] = field(default_factory=list)
    gt: str | None = None
    gt_classes: str | None = None


def _namespace(topic: str) -> str:
    """``/cam_front/image_raw/compressed`` → ``/cam_front`` (the camera's namespace)."""
    parts = topic.rstrip("/").split("/")
    if parts[-1] == "compressed":
        parts = parts[:-1]
    return "/".join(parts[:-1]) or "/"


def discover_topics(topics: dict[str, str], cfg: NodeConfig, *, lidar_topic: str | None = None,
                    use_cameras: bool = True, gt_topic: str | None = None) -> ReplayTopics:
    """Pick the pipeline's inputs from a bag's topic table.

    The node's parameters win when the bag has those topics; otherwise the single
    PointCloud2 topic (besides ground truth and earlier replay output) and every image topic
    with a CameraInfo in the same namespace (camera name = namespace's last part).
    """
    ours = lambda t: t.startswith(OUTPUT_NS + "/") or t in (LABELS_TOPIC, LABEL_CLASSES_TOPIC)  # noqa: E731
    lidar = lidar_topic or (cfg.lidar_topic if cfg.lidar_topic in topics else None)
    if lidar is None:
        clouds = [t for t, typ in topics.items() if typ == POINTCLOUD2 and not ours(t)]
        if len(clouds) != 1:
            raise ConfigError(f"cannot tell the LiDAR topic: PointCloud2 topics are {sorted(clouds)}; "
                              "pass --lidar-topic")
        lidar = clouds[0]
    elif lidar not in topics:
        raise ConfigError(f"LiDAR topic {lidar} is not in the bag (topics: {sorted(topics)})")
    cameras: list[CameraConfig] = []
    if use_cameras and cfg.cameras:
        for cam in cfg.camera_list:
            if cam.image_topic in topics and cam.info_topic in topics:
                cameras.append(cam)
            else:
                log.warning("camera %s: %s / %s not in the bag, left out", cam.name,
                            cam.image_topic, cam.info_topic)
    elif use_cameras:
        infos = {_namespace(t): t for t, typ in topics.items() if typ == CAMERA_INFO and not ours(t)}
        for t, typ in sorted(topics.items()):
            if typ not in (IMAGE, COMPRESSED_IMAGE) or ours(t):
                continue
            ns = _namespace(t)
            if ns not in infos:
                continue
            name = "".join(c if c.isalnum() else "_" for c in ns.strip("/").split("/")[-1]) or "camera"
            if any(c.name == name for c in cameras):
                continue  # raw and compressed of the same camera: keep the first (raw sorts first)
            cameras.append(CameraConfig(name, t, infos[ns],
                                        "compressed" if typ == COMPRESSED_IMAGE else "raw"))
    tf = [t for t, typ in topics.items() if typ == TF_MESSAGE and "static" not in t]
    tf_static = [t for t, typ in topics.items() if typ == TF_MESSAGE and "static" in t]
    gt = gt_topic if gt_topic else (LABELS_TOPIC if LABELS_TOPIC in topics else None)
    if gt is not None and gt not in topics:
        raise ConfigError(f"ground-truth topic {gt} is not in the bag")
    classes = LABEL_CLASSES_TOPIC if LABEL_CLASSES_TOPIC in topics else None
    return ReplayTopics(lidar, cameras, tf, tf_static, gt, classes)


# --------------------------------------------------------------------------------------
# evaluation
# --------------------------------------------------------------------------------------

class Evaluator:
    """Pairs predictions and ground truth by stamp and accumulates a confusion matrix.

    Predictions are in the segmenter's class list, ground truth in the dataset's; classes are
    matched by (normalised) name, and a predicted class with no ground-truth counterpart
    counts as a miss. Ground truth that cannot be used (unreadable cloud, wrong number of
    labels, no readable class list) is counted per reason in ``skipped``, never dropped
    silently.
    """

    def __init__(self, gt_class_names: Sequence[str] | None = None) -> None:
        self.gt_class_names: list[str] | None = list(gt_class_names) if gt_class_names else None
        self.cm: ConfusionMatrix | None = None
        self._gt: dict[int, np.ndarray] = {}
        self._pred: dict[int, tuple[np.ndarray, list[str]]] = {}
        self.frames = 0
        self.size_mismatch = 0
        self.unmatched_pred_classes: set[str] = set()
        self.skipped: Counter[str] = Counter()
        self.examples: list[str] = []
        #: a class list was in the bag but none could be read (and none was given)
        self.classes_unreadable = False

    def skip(self, reason: str, example: str = "") -> None:
        """Count one unusable piece of ground truth under ``reason`` (a short, fixed text)."""
        self.skipped[reason] += 1
        if example and len(self.examples) < 10:
            self.examples.append(example)
        log.warning("ground truth skipped: %s%s", reason, f" ({example})" if example else "")

    def set_classes(self, names: Sequence[str]) -> None:
        if self.gt_class_names is None:
            self.gt_class_names = list(names)

    def add_gt(self, stamp: int, labels: np.ndarray) -> None:
        if stamp in self._pred:
            pred, names = self._pred.pop(stamp)
            self._update(pred, names, labels, stamp)
        else:
            self._gt[stamp] = labels

    def add_pred(self, stamp: int, labels: np.ndarray, class_names: Sequence[str]) -> None:
        if stamp in self._gt:
            self._update(labels, list(class_names), self._gt.pop(stamp), stamp)
        else:
            self._pred[stamp] = (labels.astype(np.int32), list(class_names))

    def has_gt(self, stamp: int) -> bool:
        return stamp in self._gt

    def gt_for(self, stamp: int) -> np.ndarray | None:
        return self._gt.get(stamp)

    def _update(self, pred: np.ndarray, names: list[str], gt: np.ndarray, stamp: int = -1) -> None:
        if len(pred) != len(gt):
            self.size_mismatch += 1
            self.skip("wrong length: the ground truth has another number of labels than the "
                      "cloud has points", f"stamp {stamp}: {len(gt)} labels for {len(pred)} points")
            return
        if self.gt_class_names is None:
            if self.classes_unreadable:
                self.skip("no readable class list for the ground truth", f"stamp {stamp}")
                return
            self.gt_class_names = list(names)   # no class list in the bag: assume the model's
        if self.cm is None:
            self.cm = ConfusionMatrix(len(self.gt_class_names))
        index = {normalize_name(n): i for i, n in enumerate(self.gt_class_names)}
        lut = np.full(len(names) + 1, -1, dtype=np.int64)
        for i, n in enumerate(names):
            j = index.get(normalize_name(n))
            if j is None:
                self.unmatched_pred_classes.add(n)
            else:
                lut[i] = j
        mapped = lut[np.where(pred >= 0, pred, len(names))]
        self.cm.update(mapped, gt)
        self.frames += 1

    @property
    def pending(self) -> int:
        return len(self._pred)

    def result(self) -> dict[str, Any] | None:
        """The evaluation; None when there was no ground truth at all. With ground truth that
        could not be used, ``frames`` is 0 and ``skipped`` says why."""
        if (self.cm is None or self.frames == 0) and not self.skipped:
            return None
        names = self.gt_class_names or []
        ok = self.cm is not None and self.frames > 0
        iou = self.cm.iou() if ok else []
        return {
            "frames": self.frames, "miou": _num(self.cm.miou()) if ok else None,
            "accuracy": _num(self.cm.accuracy()) if ok else None,
            "iou": {n: _num(v) for n, v in zip(names, iou)},
            "points": int(self.cm.matrix.sum() + self.cm.missed.sum()) if ok else 0,
            "frames_without_gt": self.pending, "gt_without_prediction": len(self._gt),
            "size_mismatch": self.size_mismatch,
            "skipped": dict(self.skipped), "skipped_examples": list(self.examples),
            "unmatched_pred_classes": sorted(self.unmatched_pred_classes),
        }


def parse_label_classes(text: Any) -> list[str]:
    """The class list of a /clip2scene/label_classes JSON text; ValueError when it is not one."""
    try:
        data = json.loads(text)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"not JSON ({exc})") from None
    names = data.get("class_names") if isinstance(data, dict) else None
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise ValueError("no 'class_names' list of strings")
    return names


def _num(v: float) -> float | None:
    return None if not np.isfinite(v) else float(v)


def labels_from_cloud(msg: Any) -> np.ndarray:
    """Ground truth of a /clip2scene/labels cloud: int64 labels, 65535 → -1 (ignore)."""
    arr = read_points(msg, ["label"])["label"].reshape(-1).astype(np.int64)
    arr[arr == LABEL_IGNORE] = -1
    return arr


# --------------------------------------------------------------------------------------
# statistics
# --------------------------------------------------------------------------------------

def latency_table(records: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """p50 / p95 / max / mean (ms) per stage over the processed frames."""
    out: dict[str, dict[str, float]] = {}
    for stage in STAGES:
        v = np.array([r["timings"][stage] for r in records if stage in r.get("timings", {})]) * 1000.0
        if v.size:
            out[stage] = {"p50": float(np.percentile(v, 50)), "p95": float(np.percentile(v, 95)),
                          "max": float(v.max()), "mean": float(v.mean()), "n": int(v.size)}
    return out


def format_table(report: dict[str, Any]) -> str:
    lines = []
    lat = report["latency_ms"]
    lines.append(f"{'stage':<10} {'p50 ms':>9} {'p95 ms':>9} {'max ms':>9}")
    for stage, s in lat.items():
        lines.append(f"{stage:<10} {s['p50']:9.1f} {s['p95']:9.1f} {s['max']:9.1f}")
    f = report["frames"]
    lines.append(f"frames: {f['lidar_messages']} sweeps in, {f['processed']} processed "
                 f"({f['ok']} ok, {f['empty']} empty, {f['error']} error), {f['written']} written")
    thr = report["throughput"]
    lines.append(f"throughput: {thr['frames_per_s_pipeline']:.2f} frames/s in the pipeline, "
                 f"{thr['frames_per_s_wall']:.2f} frames/s end to end, "
                 f"{thr['points_per_s'] / 1e3:.1f} kpoints/s")
    if report["dropped"]:
        lines.append("dropped: " + ", ".join(f"{k}: {v}" for k, v in report["dropped"].items()))
    for cam, reasons in report["cameras_skipped"].items():
        lines.append(f"camera {cam} skipped: " + ", ".join(f"{r} ×{n}" for r, n in reasons.items()))
    for text, n in (report.get("warnings") or {}).items():
        lines.append(f"warning ×{n}: {text}")
    b = report.get("bag") or {}
    if b.get("damaged"):
        lines.append(f"bag damage: {b.get('damage', '')} (truncated={b['truncated']} corrupt "
                     f"messages={b['corrupt_messages']} unreadable chunks={b['unreadable_chunks']} "
                     f"rows={b['unreadable_rows']} missing={b.get('missing_messages')})")
    ev = report.get("evaluation")
    if ev and ev.get("skipped"):
        lines.append("ground truth skipped: " + ", ".join(f"{r} ×{n}" for r, n in ev["skipped"].items()))
    if ev and ev["frames"]:
        lines.append(f"{'class':<22} {'IoU %':>7}")
        for n, v in ev["iou"].items():
            lines.append(f"{n:<22} {'   n/a' if v is None else f'{100 * v:7.2f}'}")
        miou = ev["miou"]
        lines.append(f"{'mIoU':<22} {'   n/a' if miou is None else f'{100 * miou:7.2f}'}  "
                     f"({ev['frames']} frames, {ev['points']} points)")
    elif ev:
        lines.append("evaluation: no frame could be evaluated")
    if report.get("error"):
        lines.append(f"run stopped: {report['error']}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------
# the replay loop
# --------------------------------------------------------------------------------------

@dataclass
class ReplayOptions:
    bag: Path
    out: Path
    config: NodeConfig
    lidar_topic: str | None = None
    use_cameras: bool = True
    output_topic: str = OUTPUT_TOPIC
    copy_inputs: bool = False
    write_overlays: bool = False
    storage: str = "mcap"
    overwrite: bool = False
    gt_topic: str | None = None
    gt_dir: Path | None = None
    gt_classes: list[str] | None = None
    evaluate: bool = True
    report_dir: Path | None = None
    render_frames: tuple[int, ...] = ()
    max_frames: int | None = None
    tf_tolerance_s: float = 0.05      # the TF policy itself is config.fixed_frame, as in the node
    progress: bool = True
    salvage: bool = True


class Replay:
    """One replay run (see the module docstring); ``run()`` returns the report dict."""

    def __init__(self, opts: ReplayOptions, segmenter: Any = None) -> None:
        self.opts = opts
        tol = opts.tf_tolerance_s
        if not isinstance(tol, (int, float)) or not math.isfinite(tol) or tol < 0:
            raise ConfigError(f"tf tolerance must be a finite number of seconds >= 0, got {tol!r}")
        self.factory = MessageFactory.from_rosbags()
        self.tf = TransformBuffer(cache_duration_ns=60 * 1_000_000_000,
                                  tolerance_ns=int(opts.tf_tolerance_s * 1e9))
        # the node's policy and parameter (clip2scene_ros.tf.TfResolver), over the bag's TF
        self.tf_lookup = TfResolver(self.tf, opts.config.fixed_frame)
        # overlays cost a full-image draw per camera: only made when they are written
        cfg = dataclasses.replace(opts.config, publish_overlays=opts.write_overlays)
        self.pipeline = build_pipeline(cfg, segmenter, self.factory, self.tf_lookup)
        self.records: list[dict[str, Any]] = []
        self.dropped: Counter[str] = Counter()
        self.camera_skips: dict[str, Counter[str]] = defaultdict(Counter)
        self.written = 0
        self.lidar_messages = 0
        self.renders: list[str] = []
        self.evaluator = Evaluator(opts.gt_classes)
        #: pipeline warnings (e.g. a missing intensity field), counted per text, as the node logs them
        self.warnings: Counter[str] = Counter()
        self.report_dir = opts.report_dir or opts.out.parent / f"{opts.out.name}_report"
        self.topics: ReplayTopics | None = None
        self.bag_report: dict[str, Any] | None = None
        self._writer: BagWriter | None = None
        self._reader: BagReader | None = None

    # -- TF -------------------------------------------------------------------------------
    def fixed_frame(self) -> str:
        """The world-fixed frame of motion-compensated lookups now ('' = plain lookups)."""
        return self.tf_lookup.active_fixed_frame()

    @property
    def tf_fallbacks(self) -> int:
        """Time-travel lookups that failed and used the plain lookup instead."""
        return self.tf_lookup.fallbacks

    # -- inputs ---------------------------------------------------------------------------
    def _camera_input(self, cam: CameraConfig, image: Any, info: Any) -> CameraInput:
        return CameraInput(cam.name, image, info, cam.optical_frame)

    def run(self) -> dict[str, Any]:
        """Replay the bag; returns the report (also written to ``report_dir/report.json``).

        The report is written and the output bag closed (with its metadata.yaml) whatever
        happens: on an error (damaged bag without a LiDAR topic, disk full, a bug, Ctrl-C) the
        report says what was done and why the run stopped, and the error is raised again.
        """
        t_start = time.perf_counter()
        failure: BaseException | None = None
        try:
            self._read_and_process()
        except BaseException as exc:  # noqa: BLE001 - recorded in the report, raised again below
            failure = exc
        failure, report = self._finish(time.perf_counter() - t_start, failure)
        if failure is not None:
            raise failure
        return report

    def _read_and_process(self) -> None:
        opts = self.opts
        check_output_bag(opts.out, opts.overwrite)
        reader = self._reader = BagReader(opts.bag, salvage=opts.salvage).open()
        try:
            topics = discover_topics(reader.topics, opts.config, lidar_topic=opts.lidar_topic,
                                     use_cameras=opts.use_cameras, gt_topic=opts.gt_topic)
        except ConfigError as exc:
            if not reader.report.damaged:
                raise
            counts = reader.message_counts
            found = ", ".join(f"{t} ({counts.get(t, 0)})" for t in sorted(reader.topics)[:8]) or "none"
            if len(reader.topics) > 8:
                found += f" and {len(reader.topics) - 8} more"
            raise BagError(f"{opts.bag}: the bag is damaged ({reader.report.summary_line()}) and no "
                           f"usable LiDAR topic could be read from it; readable topics: {found}") from exc
        self.topics = topics
        if not opts.evaluate or opts.gt_dir is not None:
            topics.gt = None   # --gt-dir replaces the bag's label topic
        classes_json = reader.custom_data.get("clip2scene.label_classes")
        if classes_json is not None and not opts.gt_classes:
            self._set_gt_classes(classes_json, "metadata.yaml custom_data")
        cams = {c.image_topic: c for c in topics.cameras}
        infos = {c.info_topic: c for c in topics.cameras}
        sync = FrameSync([c.name for c in topics.cameras], opts.config.sync)
        latest_info: dict[str, Any] = {}
        waiting_image: dict[str, Any] = {}
        needed = {topics.lidar, *cams, *infos, *topics.tf, *topics.tf_static}
        if topics.gt:
            needed.add(topics.gt)
        if topics.gt_classes:
            needed.add(topics.gt_classes)
        read = set(reader.topics) if opts.copy_inputs else needed
        total = sum(n for t, n in reader.message_counts.items() if t in read)
        self._writer = BagWriter(opts.out, storage=opts.storage, typestore=self.factory.typestore,
                                 overwrite=opts.overwrite).open()
        bar = _progress(total, opts.progress)
        last_t = 0
        try:
            for topic, typ, t, raw, source in reader.raw_messages(read):
                bar.update(1)
                last_t = t
                if opts.copy_inputs:
                    self._copy(reader, topic, typ, t, raw, source)
                if topic not in needed:
                    continue
                m = reader.decode(topic, typ, t, raw, source)
                if m is None:
                    if topic == topics.lidar:
                        self.lidar_messages += 1
                        self.dropped["corrupt LiDAR message"] += 1
                    elif topic == topics.gt:
                        self.evaluator.skip("ground-truth message does not deserialize", f"bag time {t}")
                    elif topic == topics.gt_classes:
                        self._set_gt_classes(None, f"{topic} at bag time {t}")
                    continue
                msg = m.msg
                if topic in topics.tf_static or topic in topics.tf:
                    self._add_tf(msg, static=topic in topics.tf_static)
                elif topic == topics.gt:
                    self._add_gt_cloud(msg, t)
                elif topic == topics.gt_classes:
                    if not opts.gt_classes:
                        self._set_gt_classes(getattr(msg, "data", None), f"{topic} at bag time {t}")
                elif topic in infos:
                    cam = infos[topic]
                    latest_info[cam.name] = msg
                    if cam.name in waiting_image:   # its image came first
                        img = waiting_image.pop(cam.name)
                        self._emit(sync.add_camera(cam.name, self._camera_input(cam, img, msg),
                                                   header_stamp_ns(img), t))
                elif topic in cams:
                    cam = cams[topic]
                    if cam.name not in latest_info:
                        if cam.name in waiting_image:
                            self.camera_skips[cam.name]["no CameraInfo before the image"] += 1
                        waiting_image[cam.name] = msg
                        continue
                    self._emit(sync.add_camera(cam.name, self._camera_input(
                        cam, msg, latest_info[cam.name]), header_stamp_ns(msg), t))
                elif topic == topics.lidar:
                    self.lidar_messages += 1
                    if opts.max_frames is not None and self.lidar_messages > opts.max_frames:
                        self.dropped["beyond --max-frames"] += 1
                        continue
                    self._emit(sync.add_lidar(msg, header_stamp_ns(msg), t))
            # the bag is over: every camera is as complete as it will get
            horizon = last_t + 2 * opts.config.sync.camera_timeout_ns + 1
            self._emit(sync.poll(horizon))
        finally:
            bar.close()
            self.dropped["LiDAR queue overflow while waiting for cameras"] += sync.counters.lidar_overflow

    def _set_gt_classes(self, text: Any, where: str) -> None:
        """Class list of the ground truth from JSON; an unreadable one is counted and skipped."""
        if self.opts.gt_classes:
            return
        try:
            names = parse_label_classes(text)
        except ValueError as exc:
            self.evaluator.skip("unreadable ground-truth class list", f"{where}: {exc}")
            if self.evaluator.gt_class_names is None:
                self.evaluator.classes_unreadable = True
            return
        self.evaluator.set_classes(names)

    def _add_gt_cloud(self, msg: Any, t: int) -> None:
        try:
            stamp = header_stamp_ns(msg)
            labels = labels_from_cloud(msg)
        except (Clip2SceneError, ValueError, TypeError, KeyError, IndexError, AttributeError) as exc:
            self.evaluator.skip("unreadable ground-truth cloud",
                                f"bag time {t}: {type(exc).__name__}: {str(exc)[:160]}")
            return
        self.evaluator.add_gt(stamp, labels)

    def _finish(self, wall: float, failure: BaseException | None
                ) -> tuple[BaseException | None, dict[str, Any]]:
        """Close the output bag and the reader, write the report; never raises itself."""
        problems: list[str] = []
        if self._writer is not None:
            try:
                self._writer.close()
            except BagError as exc:
                problems.append(str(exc))
                failure = failure or exc
        if self._reader is not None:
            self.bag_report = self._reader.report.to_dict()
            try:
                self._reader.close()
            except Exception as exc:  # noqa: BLE001
                problems.append(f"closing the input bag: {exc}")
        report = self._report(wall)
        if failure is not None:
            report["status"] = "error"
            report["error"] = _error_text(failure)
            if not isinstance(failure, (Clip2SceneError, OSError, KeyboardInterrupt, Terminated)):
                report["traceback"] = "".join(traceback.format_exception(failure))
        else:
            report["status"] = "ok" if self.written else "nothing written"
        report["problems"] = problems
        report["output_bag_complete"] = self._writer is not None and self._writer.complete
        report["report_json"] = None
        try:
            self.report_dir.mkdir(parents=True, exist_ok=True)
            ev = report.get("evaluation")
            if ev and ev["frames"] and self.evaluator.cm is not None:
                from clip2scene_core.render import render_confusion_matrix

                path = render_confusion_matrix(
                    self.evaluator.cm.matrix, self.evaluator.gt_class_names,
                    self.report_dir / "confusion_matrix.png", iou=self.evaluator.cm.iou(),
                    title=f"mIoU {100 * (ev['miou'] or 0):.1f}% ({ev['frames']} frames)")
                ev["confusion_png"] = str(path)
            target = self.report_dir / "report.json"
            tmp = target.with_name(".report.json.tmp")
            tmp.write_text(json.dumps(report, indent=2, default=str))
            tmp.replace(target)
            report["report_json"] = str(target)
        except (OSError, Clip2SceneError, ValueError) as exc:
            text = os_error_text(exc) if isinstance(exc, OSError) else str(exc)
            log.error("cannot write the report to %s: %s", self.report_dir, text)
            report["report_error"] = f"cannot write the report to {self.report_dir}: {text}"
        return failure, report

    def _add_tf(self, msg: Any, static: bool) -> None:
        for tr in getattr(msg, "transforms", []):
            try:
                self.tf.add(tr, static=static)
            except Clip2SceneError as exc:
                self.dropped[f"bad transform ignored ({type(exc).__name__})"] += 1

    def _copy(self, reader: BagReader, topic: str, typ: str, t: int, raw: bytes, source: Any) -> None:
        if topic == self.opts.output_topic or topic.startswith(f"{OUTPUT_NS}/overlay/"):
            self.dropped[f"not copied: {topic} (this replay writes it)"] += 1
            return
        try:
            if reader.is_ros1(source):
                m = reader.decode(topic, typ, t, raw, source)
                if m is not None:
                    self._writer.write(topic, convert_message(m.msg, typ, self.factory.typestore), t, typ)
            else:
                self._writer.write_raw(topic, typ, raw, t, getattr(source, "typestore", None))
        except (BagError, KeyError) as exc:
            self.dropped[f"not copied: {topic} ({type(exc).__name__})"] += 1

    # -- outputs --------------------------------------------------------------------------
    def _emit(self, frames: list[SyncedFrame]) -> None:
        for frame in frames:
            self._process(frame)

    def _process(self, frame: SyncedFrame) -> None:
        index = len(self.records)
        out: PipelineOutput = self.pipeline.process_frame(frame, self.tf_lookup)
        t0 = time.perf_counter()
        for name, reason in out.cameras_skipped.items():
            self.camera_skips[name][reason.split(" (")[0][:120]] += 1
        for text in out.warnings:   # what the node logs as (throttled) warnings
            self.warnings[str(text)[:200]] += 1
        rec: dict[str, Any] = {"index": index, "stamp_ns": out.stamp_ns, "status": out.status,
                               "points_in": out.points_in, "points_out": out.points_out,
                               "points_labeled": out.points_labeled, "dropped_nan": out.dropped_nan,
                               "cameras_used": out.cameras_used,
                               "cameras_idle": list(out.cameras_idle),
                               "cameras_skipped": dict(out.cameras_skipped)}
        if out.status == "error" or out.cloud is None:
            self.dropped[f"pipeline error: {out.error.split(':')[0]}"] += 1
            rec["error"] = out.error
            write_s = 0.0
        else:
            self._writer.write(self.opts.output_topic, out.cloud, frame.received_ns or out.stamp_ns,
                               "sensor_msgs/msg/PointCloud2")
            if self.opts.write_overlays:
                for cam, img in out.overlays.items():
                    self._writer.write(f"{OUTPUT_NS}/overlay/{cam}", img,
                                       frame.received_ns or out.stamp_ns, "sensor_msgs/msg/Image")
            self.written += 1
            gt = None
            if out.labels is not None and self.opts.evaluate:
                if self.opts.gt_dir is not None:
                    self._load_gt_file(out.stamp_ns)
                gt = self.evaluator.gt_for(out.stamp_ns)
                if self.topics.gt is not None or self.opts.gt_dir is not None:
                    self.evaluator.add_pred(out.stamp_ns, self._pred_for_gt(frame, out),
                                            out.class_names)
            write_s = time.perf_counter() - t0
            if index in self.opts.render_frames:   # not part of the latency figures
                try:
                    self._render(index, frame, out, gt)
                except (Clip2SceneError, ValueError, OSError) as exc:
                    self.warnings[f"render of frame {index} failed: {type(exc).__name__}"] += 1
        timings = dict(out.timings)
        # the node's "publish" is building the messages and handing them over; here the
        # hand-over is the bag write (evaluation bookkeeping is included, renders are not)
        timings["publish"] = timings.get("publish", 0.0) + write_s
        timings["total"] = sum(timings.get(s, 0.0) for s in ("convert", "voxelize", "infer", "publish"))
        rec["timings"] = timings
        self.records.append(rec)

    def _pred_for_gt(self, frame: SyncedFrame, out: PipelineOutput) -> np.ndarray:
        """Predictions aligned with the input points: the pipeline drops non-finite points, so
        those come back as -1 (ground truth keeps one label per input point)."""
        labels = np.asarray(out.labels)
        if out.dropped_nan == 0:
            return labels
        xyz = read_points(frame.lidar, ["x", "y", "z"])
        kept = np.isfinite(xyz["x"]) & np.isfinite(xyz["y"]) & np.isfinite(xyz["z"])
        full = np.full(kept.size, -1, dtype=np.int64)
        full[kept.reshape(-1)] = labels
        return full

    def _load_gt_file(self, stamp: int) -> None:
        assert self.opts.gt_dir is not None
        for suffix in (".npy", ".label"):
            p = self.opts.gt_dir / f"{stamp}{suffix}"
            if p.is_file():
                try:
                    if suffix == ".npy":
                        arr = np.load(p, allow_pickle=False)
                        if arr.dtype.kind not in "iub":
                            raise ValueError(f"labels must be integers, not {arr.dtype}")
                        arr = arr.reshape(-1)
                    else:
                        arr = np.fromfile(p, np.int32)
                except (OSError, ValueError, EOFError) as exc:
                    self.evaluator.skip("unreadable ground-truth file", f"{p}: {str(exc)[:160]}")
                    return
                self.evaluator.add_gt(stamp, arr.astype(np.int64))
                return

    def _render(self, index: int, frame: SyncedFrame, out: PipelineOutput,
                gt: np.ndarray | None = None) -> None:
        """BEV by predicted label (+ ground truth when known) and each camera with points drawn."""
        from clip2scene_core.render import render_bev, render_projection

        xyz_arr = read_points(out.cloud, ["x", "y", "z"])
        xyz = np.stack([xyz_arr["x"], xyz_arr["y"], xyz_arr["z"]], axis=1).reshape(-1, 3)
        labels = np.asarray(out.labels)
        if len(xyz) != len(labels) and out.kept is not None:   # output_layout: input
            xyz = xyz[np.asarray(out.kept).reshape(-1)]
        names = out.class_names
        d = self.report_dir / "renders"
        self.renders.append(str(render_bev(xyz, labels, names, d / f"frame_{index:04d}_bev.png",
                                           title=f"frame {index} @ {out.stamp_ns} (prediction)")))
        if gt is not None and self.evaluator.gt_class_names and len(gt) == out.points_in == len(labels):
            self.renders.append(str(render_bev(xyz, gt, self.evaluator.gt_class_names,
                                               d / f"frame_{index:04d}_bev_gt.png",
                                               title=f"frame {index} (ground truth)")))
        for cam in frame.cameras.values():
            try:
                cf = self.pipeline.camera_frame(cam, out.frame_id, out.stamp_ns, self.tf_lookup)
            except (Clip2SceneError, LookupError) as exc:
                log.warning("frame %d: cannot render %s: %s", index, cam.name, exc)
                continue
            proj = project_points(xyz, cf.calibration, min_depth=self.pipeline.config.min_depth)
            v = proj.valid
            self.renders.append(str(render_projection(
                cf.image, proj.uv[v], d / f"frame_{index:04d}_{cam.name}.png", labels=labels[v],
                class_names=names, depth=proj.depth[v], title=f"{cam.name} frame {index}")))

    def _report(self, wall_s: float) -> dict[str, Any]:
        recs = self.records
        processed = len(recs)
        status = Counter(r["status"] for r in recs)
        pipeline_s = sum(r["timings"].get("total", 0.0) for r in recs)
        points = sum(r["points_in"] for r in recs)
        return {
            "input_bag": str(self.opts.bag), "output_bag": str(self.opts.out),
            "output_topic": self.opts.output_topic,
            "topics": dataclasses.asdict(self.topics) if self.topics is not None else None,
            "device": str(getattr(self.pipeline.segmenter, "device", "")),
            "class_names": self.pipeline.class_names,
            "frames": {"lidar_messages": self.lidar_messages, "processed": processed,
                       "ok": status.get("ok", 0), "empty": status.get("empty", 0),
                       "error": status.get("error", 0), "written": self.written},
            "dropped": {k: v for k, v in self.dropped.items() if v},
            "tf": {"fixed_frame_param": self.opts.config.fixed_frame,
                   "fixed_frame": self.fixed_frame(), "fixed_frame_fallbacks": self.tf_fallbacks},
            "cameras_skipped": {c: dict(r) for c, r in self.camera_skips.items()},
            "warnings": dict(self.warnings),
            "latency_ms": latency_table(recs),
            "throughput": {"frames_per_s_pipeline": processed / pipeline_s if pipeline_s else 0.0,
                           "frames_per_s_wall": processed / wall_s if wall_s else 0.0,
                           "points_per_s": points / pipeline_s if pipeline_s else 0.0,
                           "wall_s": wall_s},
            "bag": self.bag_report,
            "evaluation": self.evaluator.result(),
            "renders": self.renders,
            "per_frame": recs,
        }


class Terminated(BaseException):
    """SIGTERM during a run: raised in the main thread so the bag is closed and the report
    written before the process ends (exit status 143)."""


def _on_sigterm(signum: int, frame: Any) -> None:
    raise Terminated()


def _error_text(exc: BaseException) -> str:
    """One line for a failure: the project's errors as they are, the rest with their type."""
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted (Ctrl-C)"
    if isinstance(exc, Terminated):
        return "terminated (SIGTERM)"
    if isinstance(exc, OSError) and not isinstance(exc, Clip2SceneError):
        name = f" {exc.filename}" if exc.filename else ""
        return f"{os_error_text(exc)}{name}"
    if isinstance(exc, (Clip2SceneError, FileNotFoundError)):
        return str(exc)
    return f"unexpected {type(exc).__name__}: {exc} (a bug: the traceback is in report.json)"


def _progress(total: int, enabled: bool) -> Any:
    try:
        from tqdm import tqdm

        return tqdm(total=total, unit="msg", desc="replay", disable=not enabled, file=sys.stderr)
    except ImportError:  # pragma: no cover
        class _Null:
            def update(self, n: int) -> None: ...
            def close(self) -> None: ...
        return _Null()


# --------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------

def _frames(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected frame indices like 0,5 — got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="clip2scene-replay", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("bag", type=Path, help="input rosbag2 directory, .mcap / .db3 file or ROS 1 .bag")
    p.add_argument("--out", "-o", type=Path, required=True, help="output rosbag2 directory")
    p.add_argument("--checkpoint", help="deployable checkpoint (.pt); overrides the params file")
    p.add_argument("--params", type=Path, help="node params file (config/segment.yaml format)")
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N (default: params file)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: the params file's "
                   "cpu_threads; 0: automatic, one on machines with two cores or fewer)")
    p.add_argument("--clip-weights", help="CLIP weights: enables --class-names and camera fusion")
    p.add_argument("--class-names", help="comma-separated open vocabulary (needs --clip-weights)")
    p.add_argument("--lidar-topic", help="PointCloud2 input (default: params file, else the only one)")
    p.add_argument("--no-cameras", action="store_true", help="LiDAR only, ignore image topics")
    p.add_argument("--slop", type=float, help="sync: max |t_image - t_sweep| in s")
    p.add_argument("--camera-timeout", type=float, help="sync: camera silence (s, bag time) before skipping it")
    p.add_argument("--tf-tolerance", type=float, default=0.05,
                   help="s a TF lookup may lie outside the buffered range (nearest sample used)")
    p.add_argument("--fixed-frame",
                   help="world frame for motion-compensated LiDAR→camera lookups (camera pose at "
                        "the image stamp, LiDAR pose at the sweep stamp); 'auto': odom/map/world "
                        "when the bag's TF has one; 'none' or '': plain lookup at the image stamp. "
                        "Default: the params file's fixed_frame (the node's parameter, 'auto')")
    p.add_argument("--output-topic", default=OUTPUT_TOPIC)
    p.add_argument("--copy-inputs", action="store_true", help="copy every input topic into the output bag")
    p.add_argument("--overlays", action="store_true",
                   help=f"also write {OUTPUT_NS}/overlay/<camera> images (large)")
    p.add_argument("--storage", choices=("mcap", "sqlite3"), default="mcap")
    p.add_argument("--overwrite", action="store_true",
                   help="replace --out if it is a bag this tool wrote (or an empty folder); "
                        "anything else there is refused, never deleted")
    p.add_argument("--gt-topic", help=f"ground-truth label cloud topic (default {LABELS_TOPIC} when present)")
    p.add_argument("--gt-dir", type=Path, help="ground truth as <stamp_ns>.npy per scan")
    p.add_argument("--gt-classes", help="class names of --gt-dir labels: comma list or a preset "
                                        "(nuscenes16, semantickitti19, ...)")
    p.add_argument("--no-eval", action="store_true", help="skip the evaluation even with ground truth")
    p.add_argument("--report-dir", type=Path, help="report.json and PNGs (default <out>_report)")
    p.add_argument("--render-frames", type=_frames, default=(), help="frame indices to render, e.g. 0,5")
    p.add_argument("--max-frames", type=int, help="process at most this many sweeps (>= 1)")
    p.add_argument("--strict", action="store_true", help="fail on a damaged bag instead of salvaging it")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--quiet", "-q", action="store_true", help="no table on stdout")
    return p


def _gt_classes(text: str | None) -> list[str] | None:
    if not text:
        return None
    from clip2scene_core.datasets.classes import CLASS_NAMES

    if text in CLASS_NAMES:
        return list(CLASS_NAMES[text])
    return [n.strip() for n in text.split(",") if n.strip()]


def options_from_args(args: argparse.Namespace) -> ReplayOptions:
    if not math.isfinite(args.tf_tolerance) or args.tf_tolerance < 0:
        raise ConfigError(f"--tf-tolerance must be a finite number of seconds >= 0, got {args.tf_tolerance}")
    if args.max_frames is not None and args.max_frames < 1:
        raise ConfigError(f"--max-frames must be >= 1, got {args.max_frames}")
    cfg = load_params_file(args.params) if args.params else NodeConfig()
    changes: dict[str, Any] = {}
    if args.checkpoint:
        changes["checkpoint"] = args.checkpoint
    if args.device:
        changes["device"] = args.device
    if args.threads is not None:
        changes["cpu_threads"] = args.threads
    if args.clip_weights:
        changes["clip_weights"] = args.clip_weights
    if args.class_names:
        changes["class_names"] = [n.strip() for n in args.class_names.split(",") if n.strip()]
    if args.slop is not None:
        changes["slop"] = args.slop
    if args.camera_timeout is not None:
        changes["camera_timeout"] = args.camera_timeout
    if args.fixed_frame is not None:
        changes["fixed_frame"] = args.fixed_frame
    if changes:
        cfg = dataclasses.replace(cfg, **changes)   # re-validated by NodeConfig.__post_init__
    cfg.require_checkpoint()
    src, dst = args.bag.resolve(), args.out.resolve()
    if dst == src or dst in src.parents:
        raise ConfigError(f"--out {args.out} would overwrite the input bag {args.bag}")
    if src.is_dir() and src in dst.parents:
        raise ConfigError(f"--out {args.out} is inside the input bag {args.bag}")
    check_output_bag(args.out, args.overwrite)   # refused before any work, nothing deleted
    report_dir = (args.report_dir or args.out.parent / f"{args.out.name}_report").resolve()
    if report_dir == dst or dst in report_dir.parents:
        raise ConfigError(f"--report-dir {report_dir} is inside the output bag {args.out}")
    if report_dir == src or (src.is_dir() and src in report_dir.parents):
        raise ConfigError(f"--report-dir {report_dir} is inside the input bag {args.bag}")
    if report_dir.exists() and not report_dir.is_dir():
        raise ConfigError(f"--report-dir {report_dir} is a file, not a folder")
    if args.gt_dir is not None and not args.gt_dir.is_dir():
        raise ConfigError(f"--gt-dir {args.gt_dir} is not a folder")
    return ReplayOptions(
        bag=args.bag, out=args.out, config=cfg, lidar_topic=args.lidar_topic,
        use_cameras=not args.no_cameras, output_topic=args.output_topic, copy_inputs=args.copy_inputs,
        write_overlays=args.overlays, storage=args.storage, overwrite=args.overwrite,
        gt_topic=args.gt_topic, gt_dir=args.gt_dir, gt_classes=_gt_classes(args.gt_classes),
        evaluate=not args.no_eval, report_dir=args.report_dir, render_frames=args.render_frames,
        max_frames=args.max_frames, tf_tolerance_s=args.tf_tolerance,
        progress=not args.no_progress, salvage=not args.strict)


def main(argv: Sequence[str] | None = None) -> int:
    """Exit status: 0 when at least one labelled frame was written, 1 when none was, 2 on an
    error (bad option, unreadable bag, refused --out, disk full), 3 on an unexpected error
    (a bug), 130 on Ctrl-C. Every run that got to reading the bag leaves its report."""
    prepare_openmp()   # before torch loads: OpenMP workers must not spin on a shared core
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        opts = options_from_args(args)
        replay = Replay(opts)
    except (Clip2SceneError, OSError) as exc:
        print(f"clip2scene-replay: error: {_error_text(exc)}", file=sys.stderr)
        return 2
    import threading

    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        report = replay.run()
    except BaseException as exc:  # noqa: BLE001 - one line; the report holds the details
        where = replay.report_dir / "report.json"
        tail = f" (report: {where})" if where.is_file() else ""
        print(f"clip2scene-replay: error: {_error_text(exc)}{tail}", file=sys.stderr)
        if isinstance(exc, KeyboardInterrupt):
            return 130
        if isinstance(exc, Terminated):
            return 143
        return 2 if isinstance(exc, (Clip2SceneError, OSError)) else 3
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    if not args.quiet:
        print(format_table(report))
        out = Path(report["output_bag"])
        storage = next((p.name for p in out.iterdir() if p.suffix in (".mcap", ".db3")), "")
        print(f"output bag: {out}  (ros2 bag play {out}; a distro older than the bag's "
              f"metadata.yaml version 9 can play the storage file: ros2 bag play {out / storage})")
        print(f"report: {report['report_json']}")
    if report.get("report_error"):
        print(f"clip2scene-replay: error: {report['report_error']}", file=sys.stderr)
        return 2
    if not report["frames"]["written"]:
        f = report["frames"]
        why = ", ".join(f"{k}: {v}" for k, v in report["dropped"].items()) or "no sweep in the bag"
        print(f"clip2scene-replay: error: no labelled frame was written ({f['lidar_messages']} "
              f"sweeps in, {f['processed']} processed; {why}); report: {report['report_json']}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
