#!/usr/bin/env python3
"""SemanticKITTI → rosbag2 (mcap by default), labels carried as ground truth for replay.

Reads ``ROOT/sequences/<seq>/`` through ``clip2scene_core.datasets.SemanticKittiReader``:
velodyne scans → PointCloud2 (x, y, z, intensity) in frame ``velodyne``; labels (mapped to the
19 benchmark classes) → ``/clip2scene/labels`` + ``/clip2scene/label_classes``; ``image_2``
(when present) → CompressedImage / Image + CameraInfo (P2 intrinsics) in
``image_2_optical_frame``; ``poses.txt`` (when present) → /tf map → base_link; /tf_static
base_link → velodyne (identity: the LiDAR is the vehicle reference here) and
base_link → image_2 → image_2_optical_frame.

KITTI has no absolute time: stamps are ``--start-time`` + ``times.txt`` (when present) or
+ frame number × ``--period``.

Example (3 real labelled scans from test/data, a couple of seconds):
  python training/tools/semantickitti_to_bag.py \\
      --root test/data/semantickitti/squeezesegv3_sample_data --sequence 00 --out out/kitti_00
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from clip2scene_core.cli import start_cli
from clip2scene_core.datasets import SemanticKittiReader
from clip2scene_core.geometry.transforms import invert_transform
from clip2scene_ros.bag import check_output_bag
from training.tools.converter_cli import converter_parser, run_cli, writer_options
from training.tools.sample_bag import SampleBagWriter

NS = 1_000_000_000


def frame_time(table: np.ndarray | None, stem: str, index: int, period: float) -> float:
    """Seconds of a frame: its line of ``times.txt`` (by frame number) or number × period."""
    n = int(stem) if stem.isdigit() else index
    return float(table[n]) if table is not None and n < len(table) else n * period


def convert(root: Path, sequence: str, out: Path, *, storage: str = "mcap",
            compressed_images: bool = True, jpeg_quality: int = 90, overwrite: bool = False,
            max_frames: int | None = None, start_time: float = 1.0, period: float = 0.1,
            progress: bool = True) -> dict[str, Any]:
    reader = SemanticKittiReader(root, sequences=[sequence])
    seq = f"{int(sequence):02d}" if str(sequence).isdigit() else str(sequence)
    n = len(reader) if max_frames is None else min(len(reader), max_frames)
    times_file = root / "sequences" / seq / "times.txt"
    table = np.loadtxt(times_file, ndmin=1) if times_file.is_file() else None
    summary: dict[str, Any] = {"bag": str(out), "frames": 0, "cameras": 0, "labeled_frames": 0,
                               "poses": False}
    t0 = time.perf_counter()
    with SampleBagWriter(out, storage=storage, compressed_images=compressed_images,
                         jpeg_quality=jpeg_quality, overwrite=overwrite, lidar_name="velodyne") as w:
        static_written = False
        for i in range(n):
            sample = reader[i]
            stem = sample.token.rsplit("/", 1)[-1]   # token is "<sequence>/<frame>"
            stamp = int(round((start_time + frame_time(table, stem, i, period)) * NS))
            if not static_written:
                statics = {"velodyne": np.eye(4)}
                for cam in sample.cameras:   # base_link = velodyne: optical frame ← lidar inverted
                    statics[cam.name] = invert_transform(cam.calibration.lidar_to_camera)
                w.write_static(stamp, statics, cameras=[c.name for c in sample.cameras])
                static_written = True
            if sample.labels is not None:
                w.write_label_classes(stamp, sample.vocabulary_name, sample.class_names or ())
            if sample.lidar_to_world is not None:
                w.write_ego_pose(stamp, sample.lidar_to_world)
                summary["poses"] = True
            for cam in sample.cameras:
                w.write_camera(cam, stamp)
                summary["cameras"] += 1
            if sample.labels is not None:
                w.write_labels(sample.labels, stamp)
                summary["labeled_frames"] += 1
            w.write_scan(sample.scan, stamp)
            summary["frames"] += 1
            if progress:
                print(f"  frame {i + 1}/{n}: {sample.token} ({len(sample.scan)} points)", file=sys.stderr)
    summary["seconds"] = round(time.perf_counter() - t0, 2)
    summary["bytes"] = sum(f.stat().st_size for f in Path(out).iterdir())
    return summary


def build_parser() -> argparse.ArgumentParser:
    p = converter_parser(__doc__)
    p.add_argument("--root", required=True, type=Path, help="dataset root holding sequences/")
    p.add_argument("--sequence", default="00")
    p.add_argument("--max-frames", type=int)
    p.add_argument("--start-time", type=float, default=1.0, help="stamp (s) of time 0 of the sequence")
    p.add_argument("--period", type=float, default=0.1, help="s between frames without times.txt")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    start_cli()
    args = build_parser().parse_args(argv)
    return run_cli("semantickitti_to_bag", _run, args)


def _run(args: argparse.Namespace) -> int:
    check_output_bag(args.out, args.overwrite)   # before reading anything; nothing deleted yet
    summary = convert(args.root, args.sequence, args.out, max_frames=args.max_frames,
                      start_time=args.start_time, period=args.period, **writer_options(args))
    print(json.dumps(summary))
    return 0 if summary["frames"] else 1


if __name__ == "__main__":
    sys.exit(main())
