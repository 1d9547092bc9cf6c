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
score, rgb; + relevance with ``--query``) on ``/clip2scene_segmenter/labeled_points``, at the
input cloud's bag time, so ``ros2 bag play`` of the result drives RViz like the live node.
``--copy-inputs`` copies the input topics alongside.

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
import math
import signal
import sys
from pathlib import Path
from typing import Any, Sequence

from clip2scene_core.errors import Clip2SceneError, ConfigError
from clip2scene_core.cli import start_cli

from .bag import LABELS_TOPIC, check_output_bag
from .evaluation import Evaluator, parse_label_classes
from .frames import labels_from_cloud
from .node_config import NodeConfig, load_params_file
from .replay_report import format_table, latency_table
from .replay_run import Replay, ReplayOptions, Terminated, error_text, on_sigterm
from .topics import OUTPUT_NS, OUTPUT_TOPIC, discover_topics

# the replay tool's parts, importable from here as before the split
__all__ = ["Evaluator", "NodeConfig", "Replay", "ReplayOptions", "build_parser", "discover_topics",
           "format_table", "labels_from_cloud", "latency_table", "main", "options_from_args",
           "parse_label_classes"]


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
    p.add_argument("--query", help="open-vocabulary query: the output clouds get a per-point "
                                   "'relevance' field (0..1); needs --clip-weights or "
                                   "--query-embeddings")
    p.add_argument("--query-embeddings", type=Path,
                   help="embedding file whose class names are the query texts "
                        "(clip2scene_core.clip.save_text_embeddings); default: the CLIP text encoder")
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
    from clip2scene_core.label_spaces import LABEL_SPACES

    if text in LABEL_SPACES:
        return list(LABEL_SPACES[text].class_names)
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
    if args.query is not None:
        changes["query"] = args.query
    if args.query_embeddings is not None:
        changes["query_embeddings"] = str(args.query_embeddings)
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
    start_cli()   # before torch loads: OpenMP workers must not spin on a shared core
    args = build_parser().parse_args(argv)
    try:
        opts = options_from_args(args)
        replay = Replay(opts)
    except (Clip2SceneError, OSError) as exc:
        print(f"clip2scene-replay: error: {error_text(exc)}", file=sys.stderr)
        return 2
    import threading

    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        report = replay.run()
    except BaseException as exc:  # noqa: BLE001 - one line; the report holds the details
        where = replay.report_dir / "report.json"
        tail = f" (report: {where})" if where.is_file() else ""
        print(f"clip2scene-replay: error: {error_text(exc)}{tail}", file=sys.stderr)
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
