"""The user's own recordings as training samples: rosbag2 (mcap / sqlite3) or ROS 1 bags with
PointCloud2 + Image/CompressedImage + CameraInfo + TF, no labels.

Frames are assembled by exactly what the node runs (``clip2scene_ros.replay``: bag reader,
approximate-time sync, the node's TF policy, PointCloud2 / image conversion), so pre-training
sees the same scans and calibrations the deployed node will. The segmenter of that pipeline is
replaced by a recorder that keeps each (scan, calibrated cameras) pair.
"""
from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Sequence

import numpy as np

from clip2scene_core.datasets.sample import Sample
from clip2scene_core.errors import ConfigError


class _Recorder:
    """Stands in for the Segmenter inside the replay pipeline; records what it is given."""

    def __init__(self, fields: Sequence[str], every: int) -> None:
        self.model_config = SimpleNamespace(voxel=SimpleNamespace(features=tuple(fields)))
        self.class_names = ["unlabelled"]
        self.every = max(int(every), 1)
        self.seen = 0
        self.frames: list[tuple[Any, list[Any], int]] = []
        # the replay pipeline decodes and calibrates camera images only for a consumer
        self.consumes_cameras = True

    def segment(self, scan, cameras=()):
        if self.seen % self.every == 0:
            self.frames.append((scan, list(cameras), int(scan.stamp_ns)))
        self.seen += 1
        n = len(scan)
        return SimpleNamespace(labels=np.full(n, -1, np.int64), scores=np.zeros(n, np.float32),
                               class_names=self.class_names, timings={}, info={})


class RosbagSampleReader:
    """``Sequence[Sample]`` of a bag: one sample per synchronised LiDAR sweep (``every``-th).

    ``params``: a node params file (``config/segment.yaml``) for topics, cameras, sync and the
    TF fixed frame; without it the single PointCloud2 topic and every camera with a
    CameraInfo are used. Frames are kept in memory (use ``max_frames`` / ``every`` or split
    long recordings).
    """

    def __init__(self, bag: str | Path, params: str | Path | None = None, lidar_topic: str | None = None,
                 fields: Sequence[str] = ("intensity",), max_frames: int | None = None, every: int = 1,
                 fixed_frame: str | None = None, require_cameras: bool = True) -> None:
        from clip2scene_ros.node_config import NodeConfig, load_params_file
        from clip2scene_ros.replay import Replay, ReplayOptions

        self.bag = Path(bag)
        cfg = load_params_file(params) if params else NodeConfig()
        if fixed_frame is not None:
            cfg = dataclasses.replace(cfg, fixed_frame=fixed_frame)
        rec = _Recorder(fields, every)
        with tempfile.TemporaryDirectory(prefix="clip2scene_bag_") as tmp:
            opts = ReplayOptions(bag=self.bag, out=Path(tmp) / "out", config=cfg, lidar_topic=lidar_topic,
                                 evaluate=False, progress=False, max_frames=max_frames,
                                 report_dir=Path(tmp) / "report")
            self.report = Replay(opts, segmenter=rec).run()
        frames = [f for f in rec.frames if f[1] or not require_cameras]
        if not frames:
            raise ConfigError(f"{self.bag}: no LiDAR sweep with a synchronised, calibrated camera "
                              f"(report: {self.report.get('dropped', {})})")
        scene = self.bag.stem if self.bag.is_file() else self.bag.name
        self._samples = [Sample(scan=s, cameras=c, token=f"{scene}/{stamp}", scene=scene, vocabulary_name=None)
                         for s, c, stamp in frames]

    def __len__(self) -> int:
        return len(self._samples)

    def __getitem__(self, i: int) -> Sample:
        return self._samples[i]

    def sample_scenes(self) -> list[str]:
        return [s.scene for s in self._samples]
