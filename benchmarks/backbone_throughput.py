"""Backbone throughput on a real nuScenes sweep, against the machine's dense-GEMM bound.

For every available sparse backend/device and every backbone it prints points/s of the
forward pass (eval mode, no grad, kernel maps built inside the timed forward as in
deployment; best of ``--repeats`` runs, median too), the useful FLOPs (Σ over conv layers of
pairs × Cin × Cout × 2, plus the SPVCNN point-branch linears), the dense matmul FLOP/s measured in the same run, and
time / (FLOPs / GEMM FLOP/s): 1.0 would mean the network runs at dense-GEMM speed.
On CPU the same ratio is also given in process CPU time, which a shared, oversubscribed
machine inflates much less than wall time. ``--threads 1`` gives the steadiest figures there
(OpenMP barriers stall when another process holds the second core). Figures only; nothing
is asserted.

    python benchmarks/backbone_throughput.py [--threads N] [--repeats R] [--backbones ...]
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import torch

from clip2scene_core.models import BACKBONES, ModelConfig, VoxelBatch, build_model
from clip2scene_core.sparse import Conv3d, backend_name, torchsparse_available
from clip2scene_core.types import Scan
from clip2scene_core.voxelize import VoxelConfig, voxelize

ROOT = Path(__file__).resolve().parents[1]

SCAN = (ROOT / "test/data/nuscenes/mmdet3d_demo_scene-0061"
        / "n015-2018-07-24-11-22-45+0800__LIDAR_TOP__1532402927647951.pcd.bin")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one call; CPU time is what a shared,
    oversubscribed machine cannot inflate by descheduling us."""
    w0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w0, time.process_time() - c0


def gemm_flops(device: torch.device, n: int = 2048, repeats: int = 3) -> tuple[float, float]:
    """Best dense fp32 matmul FLOP/s (per wall second, per CPU second) over n×n×n products."""
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)

    def mm() -> None:
        a @ b
        sync(device)

    mm()
    runs = [timed(mm) for _ in range(repeats)]
    return 2.0 * n ** 3 / min(r[0] for r in runs), 2.0 * n ** 3 / max(min(r[1] for r in runs), 1e-9)


class FlopCounter:
    """Forward hooks adding pairs × Cin × Cout × 2 for every conv / linear that runs."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.flops = 0
        self.handles = []
        for m in model.modules():
            if isinstance(m, Conv3d):
                self.handles.append(m.register_forward_hook(self._conv))
            elif isinstance(m, torch.nn.Linear):
                self.handles.append(m.register_forward_hook(self._linear))

    def _conv(self, m: Conv3d, inputs, out) -> None:
        x = inputs[0]
        if m.kernel_size == 1 and m.stride == 1:
            pairs = x.feats.shape[0]
        else:
            key = ((x.stride // m.stride) if m.transposed else x.stride, m.kernel_size, m.stride, m.dilation)
            kmap = x.cache.kmaps.get(key)
            pairs = kmap.num_pairs if kmap is not None else 0
        self.flops += 2 * pairs * m.in_channels * m.out_channels

    def _linear(self, m: torch.nn.Linear, inputs, out) -> None:
        self.flops += 2 * inputs[0].shape[0] * m.in_features * m.out_features

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def run(backbone: str, batch: VoxelBatch, device: torch.device, repeats: int,
        peak: tuple[float, float]) -> None:
    torch.manual_seed(0)
    model = build_model(ModelConfig(backbone=backbone, in_channels=1)).to(device).eval()
    net = model.backbone
    counter = FlopCounter(net)
    with torch.inference_mode():
        net(batch)                       # warm-up, and count FLOPs once
        counter.remove()
        flops = counter.flops
        sync(device)
        runs = [timed(lambda: (net(batch), sync(device))) for _ in range(repeats)]
    wall_med = float(np.median([r[0] for r in runs]))
    wall, cpu = min(r[0] for r in runs), min(r[1] for r in runs)     # best of N, like the GEMM peak
    bound_wall, bound_cpu = flops / peak[0], flops / peak[1]
    line = (f"  {backbone:12s} {batch.num_points / wall:9,.0f} pts/s  forward best {wall * 1e3:7.1f} ms"
            f" (median {wall_med * 1e3:7.1f})  useful {flops / 1e9:6.2f} GFLOP"
            f"  GEMM-bound {bound_wall * 1e3:6.1f} ms  ratio {wall / bound_wall:5.2f}")
    if device.type == "cpu":
        line += f"  | CPU time {cpu * 1e3:7.1f} ms, ratio {cpu / bound_cpu:5.2f}"
    print(line + f"  ({sum(p.numel() for p in net.parameters()) / 1e6:.1f} M params)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--backbones", nargs="+", default=list(BACKBONES), choices=BACKBONES)
    ap.add_argument("--voxel-size", type=float, default=0.1)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    pts = np.fromfile(SCAN, dtype=np.float32).reshape(-1, 5)
    scan = Scan(pts, ("x", "y", "z", "intensity", "ring"))
    voxels = voxelize([scan], VoxelConfig(voxel_size=args.voxel_size, features=("intensity",)))
    print(f"scan: {SCAN.name}: {len(scan)} points → {len(voxels.coords)} voxels at {args.voxel_size} m")
    print(f"torch {torch.__version__}, CPU threads {torch.get_num_threads()}, "
          f"torchsparse {'available' if torchsparse_available() else 'not installed'}")

    targets: list[tuple[str, torch.device]] = [("torch", torch.device("cpu"))]
    if torch.cuda.is_available():
        targets.append(("torch", torch.device("cuda")))
        if torchsparse_available():
            targets.append(("torchsparse", torch.device("cuda")))
    for name, device in targets:
        os.environ["CLIP2SCENE_SPARSE_BACKEND"] = name
        peak = gemm_flops(device)
        print(f"\nbackend {backend_name(device)} on {device}: dense fp32 matmul {peak[0] / 1e9:.1f} GFLOP/s "
              f"per wall second" + (f", {peak[1] / 1e9:.1f} per CPU second" if device.type == "cpu" else ""))
        batch = VoxelBatch.from_voxels(voxels, device)
        for bb in args.backbones:
            run(bb, batch, device, args.repeats, peak)


if __name__ == "__main__":
    main()
