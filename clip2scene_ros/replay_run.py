"""One replay run: a bag's frames → the node's pipeline → output bag, evaluation and report.

`Replay` consumes the frames of a `clip2scene_ros.frames.FrameSource` (bag reading, topics,
TF, image/CameraInfo pairing, sync and ground truth live there) and only does what follows:
each frame through the shared `SegmentationPipeline`, the labelled cloud (and overlays) into
the output bag, predictions against ground truth (`clip2scene_ros.evaluation`), and the
report (`clip2scene_ros.replay_report`). The CLI is `clip2scene_ros.replay`.
"""
from __future__ import annotations

import dataclasses
import sys
import time
import traceback
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from clip2scene_core.errors import Clip2SceneError

from .bag import BagError, BagReader, BagWriter, check_output_bag, convert_message, os_error_text
from .evaluation import Evaluator, load_gt_file, parse_label_classes
from .frames import Frame, FrameSource, FrameSourceOptions
from .msgs import MessageFactory
from .node_config import NodeConfig
from .pipeline import PipelineOutput, build_pipeline
from .pointcloud2 import read_points
from .replay_report import latency_table, render_frame, write_report
from .topics import OUTPUT_NS, OUTPUT_TOPIC, InputTopics


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

    def source_options(self) -> FrameSourceOptions:
        """What the frame source reads for this run."""
        return FrameSourceOptions(
            bag=self.bag, config=self.config, lidar_topic=self.lidar_topic,
            use_cameras=self.use_cameras, gt_topic=self.gt_topic,
            read_gt=self.evaluate and self.gt_dir is None,   # --gt-dir replaces the bag's labels
            all_topics=self.copy_inputs, max_frames=self.max_frames,
            tf_tolerance_s=self.tf_tolerance_s, salvage=self.salvage)


@dataclass
class _EvaluatorInput:
    """The bag's ground truth into the evaluator (a `frames.GroundTruthSink`)."""

    evaluator: Evaluator
    class_text: Callable[[Any, str], None]

    def add_gt(self, stamp: int, labels: np.ndarray) -> None:
        self.evaluator.add_gt(stamp, labels)

    def skip(self, reason: str, example: str = "") -> None:
        self.evaluator.skip(reason, example)

    def set_class_text(self, text: Any, where: str) -> None:
        self.class_text(text, where)

    def gt_for(self, stamp: int) -> np.ndarray | None:
        return self.evaluator.gt_for(stamp)


class Replay:
    """One replay run (see `clip2scene_ros.replay`); ``run()`` returns the report dict."""

    def __init__(self, opts: ReplayOptions, segmenter: Any = None) -> None:
        self.opts = opts
        self.evaluator = Evaluator(opts.gt_classes)
        # raises ConfigError for a bad TF tolerance before the model is loaded
        self.source = FrameSource(opts.source_options(),
                                  _EvaluatorInput(self.evaluator, self._set_gt_classes))
        self.tf, self.tf_lookup = self.source.tf, self.source.tf_lookup
        self.factory = MessageFactory.from_rosbags()
        # overlays cost a full-image draw per camera: only made when they are written
        cfg = dataclasses.replace(opts.config, publish_overlays=opts.write_overlays)
        self.pipeline = build_pipeline(cfg, segmenter, self.factory, self.tf_lookup)
        self.records: list[dict[str, Any]] = []
        # shared with the source: one count per reason, in the order they first happened
        self.dropped: Counter[str] = self.source.counters.dropped
        self.camera_skips = self.source.counters.camera_skips
        self.written = 0
        self.renders: list[str] = []
        #: pipeline warnings (e.g. a missing intensity field), counted per text, as the node logs them
        self.warnings: Counter[str] = Counter()
        self.report_dir = opts.report_dir or opts.out.parent / f"{opts.out.name}_report"
        self.bag_report: dict[str, Any] | None = None
        self._writer: BagWriter | None = None

    @property
    def topics(self) -> InputTopics | None:
        return self.source.topics

    @property
    def lidar_messages(self) -> int:
        return self.source.counters.lidar_messages

    # -- TF -------------------------------------------------------------------------------
    def fixed_frame(self) -> str:
        """The world-fixed frame of motion-compensated lookups now ('' = plain lookups)."""
        return self.tf_lookup.active_fixed_frame()

    @property
    def tf_fallbacks(self) -> int:
        """Time-travel lookups that failed and used the plain lookup instead."""
        return self.tf_lookup.fallbacks

    def _add_tf(self, msg: Any, static: bool) -> None:
        self.source.add_tf(msg, static)

    # -- the run --------------------------------------------------------------------------
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
        source = self.source.open()
        self._writer = BagWriter(opts.out, storage=opts.storage, typestore=self.factory.typestore,
                                 overwrite=opts.overwrite).open()
        bar = _progress(source.total_messages, opts.progress)

        def on_message(topic: str, typ: str, t: int, raw: bytes, src: Any) -> None:
            bar.update(1)
            if opts.copy_inputs:
                self._copy(source.reader, topic, typ, t, raw, src)

        frames = source.frames(on_message)
        try:
            for frame in frames:
                self._process(frame)
        finally:
            frames.close()   # the source counts what its sync still held
            bar.close()

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
        reader = self.source.reader
        if reader is not None:
            self.bag_report = reader.report.to_dict()
            try:
                reader.close()
            except Exception as exc:  # noqa: BLE001
                problems.append(f"closing the input bag: {exc}")
        report = self._report(wall)
        if failure is not None:
            report["status"] = "error"
            report["error"] = error_text(failure)
            if not isinstance(failure, (Clip2SceneError, OSError, KeyboardInterrupt, Terminated)):
                report["traceback"] = "".join(traceback.format_exception(failure))
        else:
            report["status"] = "ok" if self.written else "nothing written"
        report["problems"] = problems
        report["output_bag_complete"] = self._writer is not None and self._writer.complete
        write_report(report, self.report_dir, self.evaluator)
        return failure, report

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

    # -- outputs --------------------------------------------------------------------------
    def _process(self, frame: Frame) -> None:
        index = len(self.records)
        out: PipelineOutput = self.pipeline.process_frame(frame.synced, self.tf_lookup)
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
                    load_gt_file(self.opts.gt_dir, out.stamp_ns, self.evaluator)
                gt = self.evaluator.gt_for(out.stamp_ns)
                if self.topics.gt is not None or self.opts.gt_dir is not None:
                    self.evaluator.add_pred(out.stamp_ns, self._pred_for_gt(frame, out),
                                            out.class_names)
            write_s = time.perf_counter() - t0
            if index in self.opts.render_frames:   # not part of the latency figures
                try:
                    render_frame(index, frame, out, gt, self.evaluator.gt_class_names,
                                 self.pipeline, self.tf_lookup, self.report_dir, self.renders)
                except (Clip2SceneError, ValueError, OSError) as exc:
                    self.warnings[f"render of frame {index} failed: {type(exc).__name__}"] += 1
        timings = dict(out.timings)
        # the node's "publish" is building the messages and handing them over; here the
        # hand-over is the bag write (evaluation bookkeeping is included, renders are not)
        timings["publish"] = timings.get("publish", 0.0) + write_s
        timings["total"] = sum(timings.get(s, 0.0) for s in ("convert", "voxelize", "infer", "publish"))
        rec["timings"] = timings
        self.records.append(rec)

    def _pred_for_gt(self, frame: Frame, out: PipelineOutput) -> np.ndarray:
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


def on_sigterm(signum: int, frame: Any) -> None:
    raise Terminated()


def error_text(exc: BaseException) -> str:
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
