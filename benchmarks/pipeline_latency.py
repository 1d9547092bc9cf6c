"""What a robot gets per sweep: the node's pipeline stages on real scans, in CPU time.

For each shipped model shape (the demo default, the demo with a CLIP-sized 512-d head,
MinkUNet34 and SPVCNN at 512-d) and each real scan (nuScenes 34,688 points, SemanticKITTI
000000 124,668, RELLIS-3D 000104 131,072), it runs `SegmentationPipeline.process` on a
PointCloud2 exactly as the node does and splits every frame into convert (PointCloud2 →
Scan) → voxelize (→ VoxelBatch) → backbone → classify (heads / folded classifier, labels
back to points) → publish (output cloud). The split points are read from outside the
pipeline (a wrapper on the segmenter's ``segment`` and forward hooks on the backbone), so
each stage is timed in **process CPU time** (a shared machine inflates wall time, not CPU
time) and wall time alike; medians over the repetitions. Classification is run both ways,
interleaved in the same process: per voxel with the heads folded into the text embeddings
(the default) and the reference path that embeds every point with the 512-d head; the
speed-up of the default is given as a CPU-time ratio next to the wall-time ratio. Figures
only; nothing asserted.

    python benchmarks/pipeline_latency.py [--threads 1] [--quick | --repeats 3] [--configs ...]
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from clip2scene_core.checkpoint import Checkpoint
from clip2scene_core.clip.vocabulary import Vocabulary
from clip2scene_core.datasets.base import load_points_bin
from clip2scene_core.threads import set_cpu_threads
from clip2scene_core.models import ModelConfig, build_model
from clip2scene_core.segmenter import Segmenter, SegmenterConfig
from clip2scene_core.voxelize import VoxelConfig
from clip2scene_ros.msgs import MessageFactory, make_header
from clip2scene_ros.pipeline import PipelineConfig, SegmentationPipeline
from clip2scene_ros.pointcloud2 import FLOAT32, create_cloud, make_point_field

ROOT = Path(__file__).resolve().parents[1]

DATA = ROOT / "test" / "data"
SCANS = {
    "nuScenes": (next((DATA / "nuscenes/mmdet3d_demo_scene-0061").glob("*LIDAR_TOP*.pcd.bin")), 5),
    "SemanticKITTI": (DATA / "semantickitti/squeezesegv3_sample_data/sequences/00/velodyne/000000.bin", 4),
    "RELLIS-3D": (DATA / "rellis3d/utils_example/000104.bin", 4),
}
RANGE = (-60.0, -60.0, -5.0, 60.0, 60.0, 5.0)
CONFIGS = {   # name: (backbone, width, voxel size, embed dim)
    "demo": ("minkunet14a", 0.125, 0.25, 24),
    "demo-clip": ("minkunet14a", 0.5, 0.1, 512),
    "minkunet34": ("minkunet34", 1.0, 0.1, 512),
    "spvcnn": ("spvcnn", 1.0, 0.1, 512),
}
STAGES = ("convert", "voxelize", "backbone", "classify", "publish")


class StageClock:
    """(CPU, wall) marks at the end of each stage of one ``process`` call."""

    def __init__(self) -> None:
        self.marks: list[tuple[str, float, float]] = []

    def mark(self, name: str) -> None:
        self.marks.append((name, time.process_time(), time.perf_counter()))

    def stages(self) -> dict[str, tuple[float, float]]:
        """stage → (CPU s, wall s) since the previous mark; the first mark is the start."""
        out: dict[str, tuple[float, float]] = {}
        for (_, c0, w0), (name, c1, w1) in zip(self.marks, self.marks[1:]):
            c, w = out.get(name, (0.0, 0.0))
            out[name] = (c + c1 - c0, w + w1 - w0)
        return out


def instrument(pipe: SegmentationPipeline, clock: StageClock) -> None:
    """Marks on ``pipe``: segment() entered (convert done), backbone entered (voxelize done)
    and left, segment() returned (classify done). Only this pipeline's own objects change."""
    seg = pipe.segmenter
    inner = seg.segment

    def segment(*args, **kwargs):
        clock.mark("convert")
        try:
            return inner(*args, **kwargs)
        finally:
            clock.mark("classify")

    seg.segment = segment
    seg.model.backbone.register_forward_pre_hook(lambda m, i: clock.mark("voxelize"))
    seg.model.backbone.register_forward_hook(lambda m, i, o: clock.mark("backbone"))


def cloud_of(points: np.ndarray, factory: MessageFactory):
    fields = [make_point_field(n, 4 * i, FLOAT32, 1, factory)
              for i, n in enumerate(("x", "y", "z", "intensity"))]
    return create_cloud(make_header(0, "lidar", factory), fields,
                        np.ascontiguousarray(points[:, :4], dtype=np.float32), msg_factory=factory)



def pipelines(name: str, factory: MessageFactory) -> dict[str, SegmentationPipeline]:
    backbone, width, voxel, embed = CONFIGS[name]
    torch.manual_seed(0)
    cfg = ModelConfig(backbone=backbone, in_channels=1, embed_dim=embed, width_multiplier=width,
                      voxel=VoxelConfig(voxel_size=voxel, point_range=RANGE, features=("intensity",)))
    vocab = Vocabulary.preset("nuscenes16")
    ckpt = Checkpoint(cfg, build_model(cfg).state_dict(), vocab,
                      F.normalize(torch.randn(len(vocab.class_names), embed), dim=1), "bench", {})
    out = {}
    for label, folded in (("folded", True), ("per-point", False)):
        seg = Segmenter.from_checkpoint(ckpt, config=SegmenterConfig(device="cpu", folded_heads=folded))
        out[label] = SegmentationPipeline(seg, PipelineConfig(publish_overlays=False), factory)
    return out


def run_once(pipe: SegmentationPipeline, clock: StageClock, cloud
             ) -> tuple[dict[str, tuple[float, float]], np.ndarray]:
    """stage → (CPU s, wall s) of one frame (``frame`` for the whole call), and its labels."""
    clock.marks.clear()
    clock.mark("start")
    out = pipe.process(cloud)
    clock.mark("publish")
    if out.status != "ok":
        raise SystemExit(f"pipeline failed: {out.error}")
    stages = clock.stages()
    (_, c0, w0), (_, c1, w1) = clock.marks[0], clock.marks[-1]
    stages["frame"] = (c1 - c0, w1 - w0)
    return stages, out.labels


def ms(cpu: float, wall: float) -> str:
    return f"{cpu * 1e3:7.1f}/{wall * 1e3:<7.1f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=None, help="timed frames per path (default 3)")
    ap.add_argument("--quick", action="store_true", help="one timed frame per path")
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    args = ap.parse_args(argv)
    repeats = args.repeats or (1 if args.quick else 3)
    set_cpu_threads(args.threads)
    factory = MessageFactory.from_rosbags()
    clouds = {name: cloud_of(load_points_bin(path, dims), factory) for name, (path, dims) in SCANS.items()}
    print(f"torch {torch.__version__}, CPU threads {torch.get_num_threads()}, repeats {repeats} (interleaved)")
    print("each cell: process CPU ms / wall ms, median over the repetitions; frame = the whole "
          "process() call; speed-up = per-point path / folded path (frame CPU, frame wall, "
          "classify stage CPU; the backbone is the same work on both paths)")
    print(f"{'config':<10} {'scan':<13} {'path':<9} {'frame':>15} "
          + " ".join(f"{s:>15}" for s in STAGES) + "  agree  speed-up cpu/wall  classify cpu")
    summary: dict[tuple[str, str], tuple[float, float, float]] = {}
    for name in args.configs:
        clock = StageClock()
        pipes = pipelines(name, factory)
        for pipe in pipes.values():
            instrument(pipe, clock)
        for scan_name, cloud in clouds.items():
            for pipe in pipes.values():      # warm-up (allocator, folded classifier)
                run_once(pipe, clock, cloud)
            res: dict[str, list] = {k: [] for k in pipes}
            for _ in range(repeats):         # interleaved: both paths see the same load
                for key, pipe in pipes.items():
                    res[key].append(run_once(pipe, clock, cloud))
            med = {k: {s: (statistics.median(r[0].get(s, (0.0, 0.0))[0] for r in runs),
                           statistics.median(r[0].get(s, (0.0, 0.0))[1] for r in runs))
                       for s in ("frame", *STAGES)} for k, runs in res.items()}
            agree = float((res["folded"][0][1] == res["per-point"][0][1]).mean())
            cpu_x = med["per-point"]["frame"][0] / med["folded"]["frame"][0]
            wall_x = med["per-point"]["frame"][1] / med["folded"]["frame"][1]
            cls_x = med["per-point"]["classify"][0] / med["folded"]["classify"][0]
            summary[name, scan_name] = (med["folded"]["frame"][0], cpu_x, wall_x)
            for key in pipes:
                extra = (f"  {agree:.4f}  {cpu_x:.2f}× / {wall_x:.2f}×  {cls_x:5.1f}×"
                         if key == "folded" else "")
                print(f"{name:<10} {scan_name:<13} {key:<9} {ms(*med[key]['frame'])} "
                      + " ".join(ms(*med[key][s]) for s in STAGES) + extra, flush=True)
    print("\nfolded (default) path, frame CPU ms (speed-up over per-point: CPU× / wall×)")
    print(f"{'config':<10} " + " ".join(f"{s:>24}" for s in SCANS))
    for name in args.configs:
        print(f"{name:<10} " + " ".join(
            f"{summary[name, s][0] * 1e3:9.0f} ({summary[name, s][1]:.2f}× / {summary[name, s][2]:.2f}×)"
            for s in SCANS))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
