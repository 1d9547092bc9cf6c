"""What a robot gets per sweep: the node's pipeline stages on real scans, in CPU time.

For each shipped model shape (the demo default, the demo with a CLIP-sized 512-d head,
MinkUNet34 and SPVCNN at 512-d) and each real scan (nuScenes 34,688 points, SemanticKITTI
000000 124,668, RELLIS-3D 000104 131,072), it runs `SegmentationPipeline.process` on a
PointCloud2 exactly as the node does (convert → voxelize → backbone + classify → output
cloud) and reports the median per-stage **process CPU time** (a shared machine inflates wall
time, not CPU time) and wall time. Classification is run both ways, interleaved in the same
process: per voxel with the heads folded into the text embeddings (the default) and the
reference path that embeds every point with the 512-d head. Figures only; nothing asserted.

    python benchmarks/pipeline_latency.py [--threads 1] [--repeats 3] [--configs ...]
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
STAGES = ("convert", "voxelize", "infer", "publish")


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


def run_once(pipe: SegmentationPipeline, cloud) -> tuple[dict[str, float], float, float, np.ndarray]:
    w0, c0 = time.perf_counter(), time.process_time()
    out = pipe.process(cloud)
    wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    return out.timings, wall, cpu, out.labels


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    args = ap.parse_args(argv)
    set_cpu_threads(args.threads)
    factory = MessageFactory.from_rosbags()
    clouds = {name: cloud_of(load_points_bin(path, dims), factory) for name, (path, dims) in SCANS.items()}
    print(f"torch {torch.__version__}, CPU threads {torch.get_num_threads()}, repeats {args.repeats}")
    print("frame = whole process() call; stages from the pipeline's own timings (wall); "
          "cpu = process CPU time of the frame")
    header = (f"{'config':<11} {'scan':<14} {'path':<10} {'cpu ms':>8} {'wall ms':>8} "
              + " ".join(f"{s + ' ms':>11}" for s in STAGES) + "  agree  speed-up(cpu)")
    print(header)
    for name in args.configs:
        pipes = pipelines(name, factory)
        for scan_name, cloud in clouds.items():
            for pipe in pipes.values():      # warm-up (kernel maps, allocator)
                pipe.process(cloud)
            res: dict[str, list] = {k: [] for k in pipes}
            for _ in range(args.repeats):    # interleaved: both paths see the same load
                for key, pipe in pipes.items():
                    res[key].append(run_once(pipe, cloud))
            cpu_med = {k: statistics.median(r[2] for r in v) for k, v in res.items()}
            agree = float((res["folded"][0][3] == res["per-point"][0][3]).mean())
            for key, runs in res.items():
                stage = {s: statistics.median(r[0].get(s, 0.0) for r in runs) * 1e3 for s in STAGES}
                wall = statistics.median(r[1] for r in runs) * 1e3
                extra = f"  {agree:.4f}  {cpu_med['per-point'] / cpu_med['folded']:.2f}x" \
                    if key == "folded" else ""
                print(f"{name:<11} {scan_name:<14} {key:<10} {cpu_med[key] * 1e3:8.1f} {wall:8.1f} "
                      + " ".join(f"{stage[s]:11.1f}" for s in STAGES) + extra, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
