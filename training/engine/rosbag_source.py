"""The user's own recordings as training samples: rosbag2 (mcap / sqlite3) or ROS 1 bags with
PointCloud2 + Image/CompressedImage + CameraInfo + TF, no labels.

Frames come from `clip2scene_ros.frames.FrameSource` — the bag reader, image/CameraInfo
pairing, approximate-time sync and the node's TF policy the replay tool reads bags with — and
are converted as the node's pipeline converts them (PointCloud2 → Scan, image + CameraInfo +
TF → calibrated CameraFrame), so pre-training sees the same scans and calibrations the
deployed node will.
"""
from __future__ import annotations

import dataclasses
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Sequence

from clip2scene_core.datasets.sample import Sample
from clip2scene_core.errors import Clip2SceneError, ConfigError
from clip2scene_core.types import CameraFrame, Scan


class _FrameConverter:
    """A frame as the node's pipeline converts it before segmentation: the Scan (x, y, z,
    intensity and the model's voxel features) and every camera that decodes and calibrates."""

    def __init__(self, fields: Sequence[str]) -> None:
        from clip2scene_ros.msgs import header_stamp_ns
        from clip2scene_ros.pipeline import PipelineConfig, SegmentationPipeline
        from clip2scene_ros.pointcloud2 import cloud_to_scan

        self._stamp, self._to_scan = header_stamp_ns, cloud_to_scan
        # the fields the pipeline reads for a model with these voxel features
        self.fields = tuple(dict.fromkeys(["intensity", *(f for f in fields if f not in ("xyz", "ones"))]))
        # the pipeline's camera decoding and calibration only: no segmenter runs
        self.pipeline = SegmentationPipeline(None, PipelineConfig(publish_overlays=False))
        self.dropped: Counter[str] = Counter()
        self.camera_skips: defaultdict[str, Counter[str]] = defaultdict(Counter)

    def __call__(self, frame: Any) -> tuple[Scan, list[CameraFrame]] | None:
        """(scan, calibrated cameras) of a `clip2scene_ros.frames.Frame`; None when the sweep
        is unreadable or has no finite point. Call it before the source reads on: the
        cameras are calibrated with the TF read so far, as the node does."""
        for name, reason in frame.skipped.items():
            self.camera_skips[name][reason] += 1
        try:
            stamp, frame_id = self._stamp(frame.lidar), str(frame.lidar.header.frame_id)
            scan, _ = self._to_scan(frame.lidar, self.fields)
        except (Clip2SceneError, AttributeError, TypeError) as exc:
            self.dropped[f"unreadable PointCloud2 ({type(exc).__name__})"] += 1
            return None
        if len(scan) == 0:
            self.dropped["no finite point"] += 1
            return None
        cameras = []
        for cam in frame.cameras.values():
            try:
                cameras.append(self.pipeline.camera_frame(cam, frame_id, stamp, frame.tf))
            except Exception as exc:  # noqa: BLE001 - as in the pipeline: any failure skips only this camera
                self.camera_skips[cam.name][type(exc).__name__] += 1
        return scan, cameras


class RosbagSampleReader:
    """``Sequence[Sample]`` of a bag: one sample per synchronised LiDAR sweep (``every``-th).

    ``params``: a node params file (``config/segment.yaml``) for topics, cameras, sync and the
    TF fixed frame; without it the single PointCloud2 topic and every camera with a
    CameraInfo are used. Frames are kept in memory (use ``max_frames`` / ``every`` or split
    long recordings). ``report``: what was read and left out, and why.
    """

    def __init__(self, bag: str | Path, params: str | Path | None = None, lidar_topic: str | None = None,
                 fields: Sequence[str] = ("intensity",), max_frames: int | None = None, every: int = 1,
                 fixed_frame: str | None = None, require_cameras: bool = True) -> None:
        from clip2scene_ros.frames import FrameSource, FrameSourceOptions
        from clip2scene_ros.node_config import NodeConfig, load_params_file

        self.bag = Path(bag)
        cfg = load_params_file(params) if params else NodeConfig()
        if fixed_frame is not None:
            cfg = dataclasses.replace(cfg, fixed_frame=fixed_frame)
        every = max(int(every), 1)
        convert = _FrameConverter(fields)
        source = FrameSource(FrameSourceOptions(bag=self.bag, config=cfg, lidar_topic=lidar_topic,
                                                read_gt=False, max_frames=max_frames))
        frames: list[tuple[Scan, list[CameraFrame]]] = []
        converted = 0
        with source:
            for frame in source:
                parts = convert(frame)
                if parts is None:
                    continue
                if converted % every == 0:
                    frames.append(parts)
                converted += 1
            bag_report = source.reader.report.to_dict() if source.reader is not None else None
        counters = source.counters
        skips: defaultdict[str, Counter[str]] = defaultdict(Counter)
        for per_camera in (counters.camera_skips, convert.camera_skips):
            for name, reasons in per_camera.items():
                skips[name].update(reasons)
        self.report: dict[str, Any] = {
            "frames": {"lidar_messages": counters.lidar_messages, "synchronised": counters.frames,
                       "converted": converted, "kept": len(frames)},
            "dropped": {k: v for k, v in (counters.dropped + convert.dropped).items() if v},
            "cameras_skipped": {name: dict(reasons) for name, reasons in skips.items()},
            "bag": bag_report,
        }
        frames = [f for f in frames if f[1] or not require_cameras]
        if not frames:
            raise ConfigError(f"{self.bag}: no LiDAR sweep with a synchronised, calibrated camera "
                              f"(report: {self.report.get('dropped', {})})")
        scene = self.bag.stem if self.bag.is_file() else self.bag.name
        self._samples = [Sample(scan=s, cameras=c, token=f"{scene}/{int(s.stamp_ns)}", scene=scene,
                                vocabulary_name=None) for s, c in frames]

    def __len__(self) -> int:
        return len(self._samples)

    def __getitem__(self, i: int) -> Sample:
        return self._samples[i]

    def sample_scenes(self) -> list[str]:
        return [s.scene for s in self._samples]
