#!/usr/bin/env python3
"""nuScenes → rosbag2 (mcap by default), for replay and ``ros2 bag play`` into RViz.

Two input layouts, both through ``clip2scene_core.datasets``:
  devkit JSON   --root DATAROOT [--version-dir v1.0-mini]     (NuScenesReader)
  mmdet3d info  --info infos.pkl --trust-pickle --root DATAROOT  (NuScenesInfoReader)

An mmdet3d info file is a Python pickle: reading it runs whatever code the file names, like
running a script. ``--trust-pickle`` says that you trust the file (you made it, or it comes
from a source you would run code from); without it ``--info`` is refused.

Per key frame: LIDAR_TOP (+ ``--sweeps`` earlier sweeps when their files exist) as
PointCloud2 (x, y, z, intensity, ring), the cameras as CompressedImage (JPEG; ``--raw-images``
for rgb8 Image) + CameraInfo, /tf map → base_link at every sensor stamp (ego_pose),
/tf_static base_link → lidar_top / cam_* (calibrated_sensor) and cam_* → cam_*_optical_frame,
lidarseg ground truth on /clip2scene/labels when the dataset has it. Stamps are the
dataset's sensor timestamps, so camera and LiDAR keep their real (up to ~40 ms) offsets.

Example (the 3 real key frames in test/data, a few seconds, ~4 MB):
  python training/tools/nuscenes_to_bag.py \\
      --root test/data/nuscenes/dororo99_v1.0-extract_3samples \\
      --version-dir v1.0-extract-subset --out out/nuscenes_3samples
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from clip2scene_core.cli import start_cli
from clip2scene_core.datasets import NUSCENES_CAMERAS, NuScenesInfoReader, NuScenesReader
from clip2scene_core.datasets.sample import Sample
from clip2scene_core.errors import Clip2SceneError
from clip2scene_core.geometry.transforms import invert_transform, transform_from_quat_wxyz
from clip2scene_ros.bag import BagError, check_output_bag
from training.tools.converter_cli import converter_parser, run_cli, safe_child, writer_options
from training.tools.sample_bag import SampleBagWriter

LIDAR = "LIDAR_TOP"


class _DevkitPoses:
    """calibrated_sensor / ego_pose of every key-frame sample_data, read from the JSON tables.

    The reader gives composed lidar → camera calibrations; TF needs the pieces (sensor → ego
    and ego → map at each sensor's own stamp), which live in these two small tables.
    """

    def __init__(self, folder: Path) -> None:
        def table(name: str) -> list[dict[str, Any]]:
            return json.loads((folder / f"{name}.json").read_text())

        calib = {r["token"]: r for r in table("calibrated_sensor")}
        ego = {r["token"]: r for r in table("ego_pose")}
        channel = {r["token"]: r["channel"] for r in table("sensor")}
        self.records: dict[tuple[str, str], dict[str, Any]] = {}
        for sd in table("sample_data"):
            if not sd.get("is_key_frame", False):
                continue
            c = calib[sd["calibrated_sensor_token"]]
            e = ego[sd["ego_pose_token"]]
            self.records[(sd["sample_token"], channel[c["sensor_token"]])] = {
                "stamp_ns": int(sd["timestamp"]) * 1000,
                "sensor_to_ego": transform_from_quat_wxyz(c["translation"], c["rotation"]),
                "ego_to_map": transform_from_quat_wxyz(e["translation"], e["rotation"]),
            }

    def get(self, sample_token: str, channel: str) -> dict[str, Any] | None:
        return self.records.get((sample_token, channel))


def _plan_devkit(sample: Sample, poses: _DevkitPoses, cameras: Sequence[str]
                 ) -> tuple[dict[str, np.ndarray], list[tuple[int, np.ndarray]]]:
    """(base → sensor statics, [(stamp, map → base)]) of one devkit key frame."""
    lidar = poses.get(sample.token, LIDAR)
    if lidar is None:
        raise Clip2SceneError(f"sample {sample.token}: no LIDAR_TOP record in the tables")
    statics = {LIDAR: lidar["sensor_to_ego"]}
    egos = [(lidar["stamp_ns"], lidar["ego_to_map"])]
    for cam in sample.cameras:
        rec = poses.get(sample.token, cam.name)
        if rec is None:
            continue
        statics[cam.name] = rec["sensor_to_ego"]
        egos.append((rec["stamp_ns"], rec["ego_to_map"]))
    # the TF chain must reproduce the reader's own LiDAR pose
    if sample.lidar_to_world is not None and not np.allclose(
            lidar["ego_to_map"] @ lidar["sensor_to_ego"], sample.lidar_to_world, atol=1e-6):
        raise Clip2SceneError(f"sample {sample.token}: ego_pose · calibrated_sensor disagrees with the reader")
    return statics, egos


def _plan_info(sample: Sample, info: dict[str, Any], cameras: Sequence[str]
               ) -> tuple[dict[str, np.ndarray], list[tuple[int, np.ndarray]]]:
    """Same for an mmdet3d info entry: lidar2ego, ego2global and per camera cam2ego.

    Without ``cam2ego`` the camera is placed through ``lidar2cam`` (lidar2ego · lidar2cam⁻¹).
    The info file holds one ego pose, which is published at every sensor stamp of the frame.
    """
    lidar2ego = np.asarray(info["lidar_points"]["lidar2ego"], dtype=np.float64)
    ego2global = np.asarray(info["ego2global"], dtype=np.float64)
    statics = {LIDAR: lidar2ego}
    stamps = [sample.scan.stamp_ns]
    images = info.get("images", {}) or {}
    for cam in sample.cameras:
        rec = images.get(cam.name, {})
        if rec.get("cam2ego") is not None:
            statics[cam.name] = np.asarray(rec["cam2ego"], dtype=np.float64)
        else:
            statics[cam.name] = lidar2ego @ invert_transform(cam.calibration.lidar_to_camera)
        stamps.append(cam.stamp_ns)
    return statics, [(s, ego2global) for s in sorted(set(stamps))]


def convert(reader: Any, out: Path, plan: Callable[[int, Sample], tuple[dict, list]], *,
            storage: str = "mcap", compressed_images: bool = True, jpeg_quality: int = 90,
            overwrite: bool = False, max_samples: int | None = None,
            progress: bool = True, indices: Sequence[int] | None = None) -> dict[str, Any]:
    """Write the samples of ``reader`` (or only those at ``indices``) and return a summary.

    Within a sample, messages are written in stamp order (static TF and label classes first),
    so a player that does not sort still sees TF before the data that needs it.
    """
    order = list(range(len(reader))) if indices is None else list(indices)
    n = len(order) if max_samples is None else min(len(order), max_samples)
    summary: dict[str, Any] = {"bag": str(out), "frames": 0, "sweeps": 0, "cameras": 0,
                               "labeled_frames": 0}
    last_static: dict[str, np.ndarray] | None = None
    written_sweeps: set[int] = set()
    t0 = time.perf_counter()
    with SampleBagWriter(out, storage=storage, compressed_images=compressed_images,
                         jpeg_quality=jpeg_quality, overwrite=overwrite,
                         lidar_name="lidar_top") as w:
        for i in order[:n]:   # readers list frames by scene, then time
            sample = reader[i]
            statics, egos = plan(i, sample)
            events: list[tuple[int, int, Callable[[], None]]] = []
            stamp0 = min([sample.scan.stamp_ns] + [s for s, _ in egos])
            if last_static is None or set(statics) != set(last_static) or any(
                    not np.allclose(statics[k], last_static[k]) for k in statics):
                events.append((stamp0, 0, lambda st=statics, t=stamp0, s=sample: w.write_static(
                    t, st, cameras=[c.name for c in s.cameras])))
                last_static = statics
            if sample.class_names is not None and sample.labels is not None:
                events.append((stamp0, 1, lambda t=stamp0, s=sample: w.write_label_classes(
                    t, s.vocabulary_name, s.class_names)))
            lidar_to_world = sample.lidar_to_world
            for t, T in egos:
                events.append((t, 2, lambda t=t, T=T: w.write_ego_pose(t, T)))
            for sweep, T_key_sweep in sample.sweeps:
                if sweep.stamp_ns in written_sweeps:   # neighbouring key frames share sweeps
                    continue
                written_sweeps.add(sweep.stamp_ns)
                if lidar_to_world is not None:
                    base_pose = lidar_to_world @ T_key_sweep @ invert_transform(statics[LIDAR])
                    events.append((sweep.stamp_ns, 2, lambda t=sweep.stamp_ns, T=base_pose:
                                   w.write_ego_pose(t, T)))
                events.append((sweep.stamp_ns, 3, lambda s=sweep: w.write_scan(s)))
                summary["sweeps"] += 1
            for cam in sample.cameras:
                events.append((cam.stamp_ns, 3, lambda c=cam: w.write_camera(c, c.stamp_ns)))
                summary["cameras"] += 1
            if sample.labels is not None:
                events.append((sample.scan.stamp_ns, 3, lambda s=sample: w.write_labels(
                    s.labels, s.scan.stamp_ns)))
                summary["labeled_frames"] += 1
            events.append((sample.scan.stamp_ns, 4, lambda s=sample: w.write_scan(s.scan)))
            for _, _, write in sorted(events, key=lambda e: (e[0], e[1])):
                write()
            summary["frames"] += 1
            if progress:
                print(f"  frame {summary['frames']}/{n}: {sample.token} "
                      f"({len(sample.scan)} points, {len(sample.cameras)} cameras)", file=sys.stderr)
    summary["seconds"] = round(time.perf_counter() - t0, 2)
    summary["bytes"] = sum(f.stat().st_size for f in Path(out).iterdir())
    return summary


def build_parser() -> argparse.ArgumentParser:
    p = converter_parser(__doc__)
    p.add_argument("--root", required=True, type=Path, help="nuScenes data root (samples/, sweeps/, tables)")
    p.add_argument("--version-dir", default="v1.0-mini", help="folder of the JSON tables under --root")
    p.add_argument("--info", type=Path, help="mmdet3d info .pkl instead of the JSON tables "
                   "(a pickle runs code when read: needs --trust-pickle)")
    p.add_argument("--trust-pickle", action="store_true",
                   help="read the --info pickle, trusting it like a program you run: "
                        "unpickling executes the code a crafted file names")
    p.add_argument("--cameras", nargs="*", default=list(NUSCENES_CAMERAS),
                   help="camera channels to include (none: LiDAR only)")
    p.add_argument("--sweeps", type=int, default=0, help="earlier LIDAR_TOP sweeps per key frame, when present")
    p.add_argument("--max-samples", type=int, help="convert only the first N key frames (per bag)")
    p.add_argument("--scene", action="append", default=[],
                   help="convert only this scene (repeatable; default: all)")
    p.add_argument("--split-scenes", action="store_true",
                   help="one bag per scene, written to --out/<scene>; recommended whenever the "
                        "frames come from several scenes (different logs mean other sensor "
                        "extrinsics and jumps of days in time, which TF cannot bridge)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    start_cli()
    args = build_parser().parse_args(argv)
    return run_cli("nuscenes_to_bag", _run, args)


def _run(args: argparse.Namespace) -> int:
    if args.info:
        reader = NuScenesInfoReader(args.info, args.root, cameras=args.cameras, num_sweeps=args.sweeps,
                                    skip_missing_images=True, trust_pickle=args.trust_pickle)
        infos = reader.infos   # the entries the reader already read (the file is read once)

        def plan(i: int, sample: Sample) -> tuple[dict, list]:
            return _plan_info(sample, infos[i], args.cameras)
    else:
        reader = NuScenesReader(args.root, args.version_dir, cameras=args.cameras,
                                num_sweeps=args.sweeps)
        poses = _DevkitPoses(args.root / args.version_dir)

        def plan(i: int, sample: Sample) -> tuple[dict, list]:
            return _plan_devkit(sample, poses, args.cameras)
    if len(reader) == 0:
        print("no key frames found", file=sys.stderr)
        return 1
    scenes = list(reader.sample_scenes())
    wanted = set(args.scene) or set(scenes)
    unknown = wanted - set(scenes)
    if unknown:
        print(f"unknown scene(s) {sorted(unknown)}; the data has {sorted(set(scenes))}", file=sys.stderr)
        return 1
    groups: dict[str, list[int]] = {}
    for i, scene in enumerate(scenes):
        if scene in wanted:
            groups.setdefault(scene, []).append(i)
    if args.split_scenes:
        # scene names come from the data: each becomes one folder inside --out, never more
        if args.out.exists() and not args.out.is_dir():
            raise BagError(f"--out {args.out} is a file, not a folder for the scene bags")
        taken: set[str] = set()
        jobs = [(safe_child(args.out, scene, taken, default="scene"), idx)
                for scene, idx in groups.items()]
    else:
        if len(groups) > 1:
            print(f"warning: {len(groups)} scenes {sorted(groups)} go into one bag; use "
                  "--split-scenes for one bag per scene", file=sys.stderr)
        jobs = [(args.out, [i for idx in groups.values() for i in idx])]
    for out, _ in jobs:   # every output is checked before anything is written or replaced
        check_output_bag(out, args.overwrite)
    for out, idx in jobs:
        summary = convert(reader, out, plan, max_samples=args.max_samples, indices=idx,
                          **writer_options(args))
        print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
