"""Backbone forward on real scans: our sparse backend against spconv's CPU backend, same network.

For each MinkUNet backbone (14A, 18, 34 at full width, random weights with non-trivial
BatchNorm statistics) and each real scan (voxelised at ``--voxel-size``), it builds the
spconv twin of the very same network (`benchmarks/spconv_stack.py`: spconv's SubMConv3d /
SparseConv3d / SparseInverseConv3d with our weights copied into spconv's layout), checks
that both give the same features (max abs difference printed; a mismatch stops the run),
then times, in one process and interleaved (the order rotates every repetition, so all
variants see the same machine load):

* ``ours``          — our backbone as the node runs it (eval, inference mode: BN folded);
* ``spconv``        — the spconv twin written the usual way: conv → BatchNorm1d → ReLU;
* ``spconv-folded`` — the spconv twin with BN folded into its kernels (as ours does).

Every forward builds its kernel maps inside the timed call, as in deployment. Figures are
**process CPU time** (what a shared, oversubscribed machine cannot inflate by descheduling
us), medians over the repetitions, with wall time next to them; the ratio ours / spconv is
the median of the per-repetition ratios (its min–max spread shows how steady it was; the
ratio of the best-of-N CPU times is printed too), and "vs best spconv" compares with the
faster of the two spconv variants. Without spconv
(optional peer: ``pip install --no-deps --require-hashes -r requirements-bench.txt``, which
`make bench` does) it says so and times ours alone. Figures only; nothing is asserted.

    python benchmarks/backbone_throughput.py [--threads 1] [--quick] [--repeats R] [--scans ...]
"""
from __future__ import annotations

import argparse
import importlib.util
import statistics
import time
from pathlib import Path

import torch

from clip2scene_core.datasets.base import load_points_bin
from clip2scene_core.models import ModelConfig, VoxelBatch, build_model
from clip2scene_core.types import Scan
from clip2scene_core.voxelize import VoxelConfig, voxelize

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "test" / "data"
SCANS = {   # name: (file, float32 columns)
    "nuScenes": (next((DATA / "nuscenes/mmdet3d_demo_scene-0061").glob("*LIDAR_TOP*.pcd.bin")), 5),
    "SemanticKITTI": (DATA / "semantickitti/squeezesegv3_sample_data/sequences/00/velodyne/000000.bin", 4),
    "RELLIS-3D": (DATA / "rellis3d/utils_example/000104.bin", 4),
}
RANGE = (-60.0, -60.0, -5.0, 60.0, 60.0, 5.0)      # as benchmarks/pipeline_latency.py
BACKBONES = ("minkunet14a", "minkunet18", "minkunet34")
TOLERANCE = 1e-4    # max |ours − spconv| relative to max |ours|: float32 summation order only


def load_stack():
    """benchmarks/spconv_stack.py as a module (benchmarks/ is not an installed package)."""
    spec = importlib.util.spec_from_file_location("spconv_stack", Path(__file__).with_name("spconv_stack.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def scan_batch(name: str, voxel_size: float) -> tuple[VoxelBatch, int]:
    path, dims = SCANS[name]
    pts = load_points_bin(path, dims)
    fields = ("x", "y", "z", "intensity", "ring")[:dims]
    voxels = voxelize([Scan(pts, fields)], VoxelConfig(voxel_size=voxel_size, point_range=RANGE,
                                                        features=("intensity",)))
    return VoxelBatch.from_voxels(voxels, "cpu"), len(pts)


def timed(fn) -> tuple[float, float]:
    """(process CPU seconds, wall seconds) of one call."""
    c0, w0 = time.process_time(), time.perf_counter()
    fn()
    return time.process_time() - c0, time.perf_counter() - w0


def compare(backbone: str, batch: VoxelBatch, stack, repeats: int) -> dict[str, float]:
    """Check agreement, time the variants interleaved, print one block; returns the
    median CPU ratios ours / spconv variant."""
    torch.manual_seed(0)
    net = build_model(ModelConfig(backbone=backbone, in_channels=1)).backbone.eval()
    variants = {"ours": lambda: net(batch)}
    if stack is not None:
        stack.randomize_norms(net)
        for name, fold in (("spconv", False), ("spconv-folded", True)):
            twin = stack.build_spconv_minkunet(net, fold)
            variants[name] = (lambda t: lambda: t(batch.features, batch.coords, batch.batch_size))(twin)
    with torch.inference_mode():
        outs = {k: fn() for k, fn in variants.items()}          # warm-up, and the check
        ref = outs["ours"]
        for k, out in outs.items():
            if k == "ours":
                continue
            diff = float((out - ref).abs().max())
            rel = diff / max(float(ref.abs().max()), 1e-12)
            print(f"  {backbone:12s} {k:14s} vs ours: max |diff| {diff:.2e} (relative {rel:.1e}) "
                  f"on {ref.shape[0]:,} voxels × {ref.shape[1]} channels")
            if not rel <= TOLERANCE:
                raise SystemExit(f"{k} disagrees with ours on {backbone}: kernel layout or offsets differ")
        del outs, ref
        names = list(variants)
        runs: dict[str, list[tuple[float, float]]] = {k: [] for k in names}
        for r in range(repeats):
            order = names[r % len(names):] + names[:r % len(names)]    # rotate: no fixed slot
            for k in order:
                runs[k].append(timed(variants[k]))
    cpu = {k: statistics.median(c for c, _ in v) for k, v in runs.items()}
    wall = {k: statistics.median(w for _, w in v) for k, v in runs.items()}
    ratios: dict[str, float] = {}
    for k in names:
        line = f"  {backbone:12s} {k:14s} cpu {cpu[k] * 1e3:8.1f} ms  wall {wall[k] * 1e3:8.1f} ms"
        if k != "ours":
            per_rep = [o[0] / s[0] for o, s in zip(runs["ours"], runs[k])]
            ratios[k] = statistics.median(per_rep)
            best_of = min(c for c, _ in runs["ours"]) / min(c for c, _ in runs[k])
            line += (f"  ours/{k}: cpu {ratios[k]:.2f}× (reps {min(per_rep):.2f}–{max(per_rep):.2f},"
                     f" best-of {best_of:.2f}×), wall {wall['ours'] / wall[k]:.2f}×")
        print(line, flush=True)
    if ratios:
        best = min((k for k in names if k != "ours"), key=lambda k: cpu[k])
        print(f"  {backbone:12s} vs best spconv ({best}): ours/spconv cpu {ratios[best]:.2f}× "
              f"(target ≤ 0.90×: {'met' if ratios[best] <= 0.9 else 'not met'})", flush=True)
    return ratios


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: steadiest)")
    ap.add_argument("--repeats", type=int, default=None, help="timed repetitions per variant (default 5)")
    ap.add_argument("--quick", action="store_true", help="nuScenes only (unless --scans)")
    ap.add_argument("--scans", nargs="+", choices=list(SCANS), default=None)
    ap.add_argument("--backbones", nargs="+", default=list(BACKBONES), choices=BACKBONES)
    ap.add_argument("--voxel-size", type=float, default=0.1)
    args = ap.parse_args(argv)
    repeats = args.repeats or 5
    scans = args.scans or (["nuScenes"] if args.quick else list(SCANS))
    torch.set_num_threads(args.threads)
    stack = load_stack()
    peer = "spconv not installed (optional peer: pip install --no-deps --require-hashes -r requirements-bench.txt)"
    if stack.spconv_available():
        import spconv
        peer = f"spconv {spconv.__version__} (CPU)"
    else:
        stack = None
    print(f"torch {torch.__version__}, CPU threads {torch.get_num_threads()}, {peer}; "
          f"{repeats} interleaved repetitions; times are medians")
    summary: list[tuple[str, str, dict[str, float]]] = []
    for scan in scans:
        batch, n_points = scan_batch(scan, args.voxel_size)
        print(f"\n{scan}: {n_points:,} points → {batch.coords.shape[0]:,} voxels at {args.voxel_size} m")
        for bb in args.backbones:
            summary.append((scan, bb, compare(bb, batch, stack, repeats)))
    if stack is not None:
        print("\nours / spconv CPU time (median of per-repetition ratios; target ≤ 0.90×)")
        print(f"{'scan':<14} {'backbone':<12} {'vs spconv':>10} {'vs folded':>10}")
        for scan, bb, r in summary:
            print(f"{scan:<14} {bb:<12} {r['spconv']:9.2f}× {r['spconv-folded']:9.2f}×")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
