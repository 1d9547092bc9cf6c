"""What the node runs around `SegmentationPipeline`, without rclpy: `PipelineRunner` and the
asynchronous CLIP teacher (`TeacherWorker`).

`PipelineRunner` holds the approximate-time `FrameSync`, the image ↔ CameraInfo pairings, the
size-1 newest-frame slot between callbacks and the inference thread, statistics for
/diagnostics and throttled warnings; node.py only wires rclpy callbacks to its methods.

With a teacher loaded and camera fusion on, ``teacher_async`` (default) runs it on a
`TeacherWorker` thread of its own: every image that arrives goes to a size-1 slot per camera,
the worker predicts the newest one, and each sweep fuses, per camera, the latest finished
prediction stamped within ``teacher_max_age`` of the sweep (with the LiDAR→camera transform
looked up for this sweep and that image stamp). A sweep never waits for the teacher: a camera
without a fitting prediction is LiDAR-only in that sweep.
"""
from __future__ import annotations

import threading
import time
from collections import Counter
from typing import Any, Callable, Collection, Sequence

from clip2scene_core.errors import Clip2SceneError
from clip2scene_core.types import Calibration, CameraFrame

from .diagnostics import DiagnosticReport, PipelineStats, StageTimes, WarnThrottle, reason_kind
from .msgs import header_stamp_ns
from .pipeline import (CameraInput, PipelineOutput, SegmentationPipeline, TeacherPrediction,
                       TfLookup, clip_reason)
from .sync import PAIR_LATEST, CameraInfoPairing, FrameSync, LatestSlot, SyncConfig, SyncedFrame

__all__ = ["PipelineRunner", "TeacherWorker"]


class TeacherWorker:
    """Runs the CLIP teacher on camera images at its own rate, on a thread of its own.

    `submit` (any thread, cheap) puts an image into its camera's size-1 slot, replacing one
    the worker has not started yet; the worker takes the camera that has waited longest,
    decodes the image, runs `Segmenter.predict_camera` (which also folds the features into
    the vocabulary in effect, `clip2scene_core.fusion`, so a sweep reads K numbers per seen
    point instead of D) and keeps the latest prediction per camera (`latest`). The thread
    starts with the first image; `close` stops it (a prediction in progress finishes first),
    `reopen` allows a new start with no old predictions.
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
            return None, {}, f"{type(exc).__name__}: {clip_reason(str(exc))}"
        except Exception as exc:  # noqa: BLE001 - a bug must not kill the worker
            return None, {}, f"unexpected {type(exc).__name__}: {clip_reason(str(exc))}"
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
        except Exception as exc:  # noqa: BLE001 - a bug must not kill the inference thread: report it
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
