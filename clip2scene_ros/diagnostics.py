"""Running statistics for /diagnostics, and throttling of repeated warnings.

Pure Python so the numbers the node publishes (latency, input rate, drops, camera skips) are
computed by tested code; node.py only copies `DiagnosticReport` into a DiagnosticArray.
"""
from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

NS_PER_S = 1_000_000_000

# levels, numerically equal to diagnostic_msgs/DiagnosticStatus OK / WARN / ERROR / STALE
OK, WARN, ERROR, STALE = 0, 1, 2, 3


def reason_kind(reason: str) -> str:
    """Stable category of a skip reason or error ("TransformError: ... at t=..." → "TransformError"),
    so counters and warning throttles do not grow with every distinct timestamp."""
    return reason.split(":", 1)[0].strip()


class RateMeter:
    """Messages per second over the last `window_s` seconds of arrival times."""

    def __init__(self, window_s: float = 5.0) -> None:
        self.window_ns = int(window_s * NS_PER_S)
        self._times: deque[int] = deque()
        self.count = 0

    def tick(self, now_ns: int) -> None:
        self._times.append(int(now_ns))
        self.count += 1
        self._trim(int(now_ns))

    def _trim(self, now_ns: int) -> None:
        while self._times and now_ns - self._times[0] > self.window_ns:
            self._times.popleft()

    def rate(self, now_ns: int) -> float:
        """Hz; 0 with fewer than two arrivals in the window."""
        self._trim(int(now_ns))
        if len(self._times) < 2:
            return 0.0
        span = self._times[-1] - self._times[0]
        return (len(self._times) - 1) * NS_PER_S / span if span > 0 else 0.0


class StageTimes:
    """Mean and max of per-stage durations (seconds) over the last `window` frames."""

    def __init__(self, window: int = 50) -> None:
        self.window = window
        self._values: dict[str, deque[float]] = {}

    def add(self, timings: dict[str, float]) -> None:
        for stage, seconds in timings.items():
            self._values.setdefault(stage, deque(maxlen=self.window)).append(float(seconds))

    def mean(self, stage: str) -> float:
        v = self._values.get(stage)
        return sum(v) / len(v) if v else 0.0

    def max(self, stage: str) -> float:
        v = self._values.get(stage)
        return max(v) if v else 0.0

    @property
    def stages(self) -> list[str]:
        return list(self._values)


@dataclass
class DiagnosticReport:
    """What one DiagnosticStatus carries: level, one-line message, key/value strings."""

    level: int
    message: str
    values: dict[str, str] = field(default_factory=dict)


class PipelineStats:
    """Everything the node reports about itself, fed by callbacks and pipeline outputs."""

    def __init__(self, device: str = "", window_s: float = 5.0, stale_after_s: float = 5.0) -> None:
        self.device = device
        self.input_rate = RateMeter(window_s)
        self.output_rate = RateMeter(window_s)
        self.times = StageTimes()
        self.latency = StageTimes()
        self.frames_in = 0
        self.frames_ok = 0
        self.frames_empty = 0
        self.frames_failed = 0
        self.dropped_busy = 0        # replaced in the latest-frame slot (inference too slow)
        self.dropped_sync = 0        # overflowed the synchroniser queues
        self.nan_points = 0
        self.camera_used: Counter[str] = Counter()
        self.camera_skipped: Counter[tuple[str, str]] = Counter()
        self.camera_idle: Counter[str] = Counter()   # not decoded: nothing consumed the image
        self.last_error = ""
        self.last_status = ""
        self.last_output_ns: int | None = None
        self.stale_after_ns = int(stale_after_s * NS_PER_S)
        self._drops_reported = 0

    def on_input(self, now_ns: int) -> None:
        """A LiDAR sweep arrived."""
        self.frames_in += 1
        self.input_rate.tick(now_ns)

    def on_output(self, output: Any, now_ns: int) -> None:
        """Record a `PipelineOutput` (duck-typed to keep this module free of pipeline imports)."""
        self.output_rate.tick(now_ns)
        self.last_output_ns = int(now_ns)
        self.times.add(output.timings)
        # latency: arrival of the sweep → its output (sync wait + slot wait + processing);
        # age: sensor stamp → output (adds driver/transport delay; meaningless for old bags)
        received = getattr(output, "received_ns", 0) or output.stamp_ns
        self.latency.add({"latency": max(0.0, (now_ns - received) / NS_PER_S),
                          "age": max(0.0, (now_ns - output.stamp_ns) / NS_PER_S)})
        self.last_status = output.status
        self.nan_points += int(output.dropped_nan)
        for name in output.cameras_used:
            self.camera_used[name] += 1
        for name, reason in output.cameras_skipped.items():
            self.camera_skipped[(name, reason_kind(reason))] += 1
        for name in getattr(output, "cameras_idle", ()):
            self.camera_idle[name] += 1
        if output.status == "ok":
            self.frames_ok += 1
        elif output.status == "empty":
            self.frames_empty += 1
        else:
            self.frames_failed += 1
            self.last_error = output.error

    def report(self, now_ns: int) -> DiagnosticReport:
        """Summarise: ERROR if the last frame failed, WARN on drops/skips/no output, else OK."""
        values = {
            "device": self.device,
            "input_rate_hz": f"{self.input_rate.rate(now_ns):.2f}",
            "output_rate_hz": f"{self.output_rate.rate(now_ns):.2f}",
            "frames_in": str(self.frames_in),
            "frames_ok": str(self.frames_ok),
            "frames_empty": str(self.frames_empty),
            "frames_failed": str(self.frames_failed),
            "dropped_busy": str(self.dropped_busy),
            "dropped_sync": str(self.dropped_sync),
            "nan_points_dropped": str(self.nan_points),
            "latency_mean_s": f"{self.latency.mean('latency'):.4f}",
            "latency_max_s": f"{self.latency.max('latency'):.4f}",
            "stamp_age_mean_s": f"{self.latency.mean('age'):.4f}",
        }
        for stage in self.times.stages:
            values[f"{stage}_mean_s"] = f"{self.times.mean(stage):.4f}"
        for name, n in sorted(self.camera_used.items()):
            values[f"camera.{name}.used"] = str(n)
        for (name, reason), n in sorted(self.camera_skipped.items()):
            values[f"camera.{name}.skipped[{reason}]"] = str(n)
        for name, n in sorted(self.camera_idle.items()):
            values[f"camera.{name}.idle"] = str(n)
        if self.last_error:
            values["last_error"] = self.last_error
        if self.last_status == "error":
            return DiagnosticReport(ERROR, f"inference failing: {self.last_error}", values)
        if not self.frames_in:
            return DiagnosticReport(WARN, "no LiDAR input yet", values)
        if self.last_output_ns is None:
            return DiagnosticReport(WARN, "no frame processed yet", values)
        if now_ns - self.last_output_ns > self.stale_after_ns:
            return DiagnosticReport(STALE, "no output recently", values)
        drops = self.dropped_busy + self.dropped_sync
        new_drops, self._drops_reported = drops - self._drops_reported, drops
        if new_drops:
            return DiagnosticReport(
                WARN, f"dropped {new_drops} frame(s) since the last report (total: busy "
                      f"{self.dropped_busy}, sync {self.dropped_sync})", values)
        return DiagnosticReport(OK, "running", values)


class WarnThrottle:
    """Say each (key) warning at most once per `period_s`, counting how many were held back."""

    def __init__(self, period_s: float = 5.0) -> None:
        self.period_ns = int(period_s * NS_PER_S)
        self._last: dict[Any, int] = {}
        self.suppressed: Counter[Any] = Counter()

    def should_log(self, key: Any, now_ns: int) -> bool:
        last = self._last.get(key)
        if last is not None and now_ns - last < self.period_ns:
            self.suppressed[key] += 1
            return False
        self._last[key] = int(now_ns)
        return True
