"""LiDAR-path latency with cameras and a CLIP teacher: asynchronous teacher vs inline.

Drives the node's `PipelineRunner` (callbacks → sync → step) on the real nuScenes sweep
(34,688 points) with N cameras (the scene's CAM_FRONT JPEG and calibration under N names),
a demo-with-CLIP sized network (MinkUNet14A ×0.5, 0.1 m voxels, D 512) and a CLIP teacher
with random weights (open_clip's ViT-B-16 architecture by default; ``--teacher tiny`` for a
tiny tower). Sweeps come at ``--rate`` Hz of wall time, each with its N images 35 ms older.
Three runners, one after the other:

* ``lidar-only``: no cameras (the reference);
* ``async``: cameras + teacher on its `TeacherWorker` thread (the node's default);
* ``inline``: cameras + teacher run in the sweep (``teacher_async: false``).

Per sweep it times `PipelineRunner.step` (what a sweep waits for between arriving and being
published): the inference thread's **CPU time** (`time.thread_time`; stable on a shared
machine) and wall time, medians, and prints their ratios to LiDAR-only. The async runner
also reports how many sweeps fused a prediction (within ``teacher_max_age``) and the
teacher's own time per image. Figures only; nothing asserted.

    python benchmarks/teacher_latency.py [--cameras 6] [--sweeps 8] [--teacher vit-b-16|tiny]
"""
from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from clip2scene_core.checkpoint import Checkpoint
from clip2scene_core.clip import ClipTeacher
from clip2scene_core.clip.vocabulary import Vocabulary
from clip2scene_core.device import cpu_has_fast_bf16
from clip2scene_core.models import ModelConfig, build_model
from clip2scene_core.segmenter import Segmenter, SegmenterConfig
from clip2scene_core.threads import set_cpu_threads
from clip2scene_core.voxelize import VoxelConfig
from clip2scene_ros.msgs import MessageFactory
from clip2scene_ros.pipeline import PipelineConfig, SegmentationPipeline
from clip2scene_ros.runner import PipelineRunner
from clip2scene_ros.sync import SyncConfig

ROOT = Path(__file__).resolve().parents[1]


def _test_helpers():
    """test/test_pipeline.py (its real-frame loaders and message builders), loaded by path:
    the tests are not a package."""
    spec = importlib.util.spec_from_file_location("test_pipeline", ROOT / "test" / "test_pipeline.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module   # its dataclasses look their module up while being built
    spec.loader.exec_module(module)
    return module


_helpers = _test_helpers()
TEXT_CFG, load_nuscenes, make_camera, make_cloud, make_lookup = (
    _helpers.TEXT_CFG, _helpers.load_nuscenes, _helpers.make_camera, _helpers.make_cloud, _helpers.make_lookup)

MS = 1_000_000
RANGE = (-60.0, -60.0, -5.0, 60.0, 60.0, 5.0)


def teacher_of(kind: str) -> ClipTeacher:
    if kind == "tiny":
        cfg = {"embed_dim": 512, "text_cfg": TEXT_CFG,
               "vision_cfg": {"image_size": 64, "layers": 1, "width": 32, "patch_size": 16,
                              "head_width": 16}}
    else:
        import open_clip

        cfg = open_clip.get_model_config("ViT-B-16")
    return ClipTeacher.from_config(cfg, device="cpu", model_name=kind, seed=0)


def segmenter(teacher: ClipTeacher | None, precision: str) -> Segmenter:
    torch.manual_seed(0)
    cfg = ModelConfig(backbone="minkunet14a", in_channels=1, embed_dim=512, width_multiplier=0.5,
                      voxel=VoxelConfig(voxel_size=0.1, point_range=RANGE, features=("intensity",)))
    vocab = Vocabulary.preset("nuscenes16")
    ckpt = Checkpoint(cfg, build_model(cfg).state_dict(), vocab,
                      F.normalize(torch.randn(len(vocab.class_names), 512), dim=1), "bench", {})
    return Segmenter.from_checkpoint(ckpt, teacher, SegmenterConfig(device="cpu",
                                                                    teacher_precision=precision))


def run(mode: str, seg: Segmenter, nusc, factory, n_cams: int, sweeps: int, rate: float,
        max_age: float) -> dict:
    pipe = SegmentationPipeline(seg, PipelineConfig(publish_overlays=False), factory,
                                make_lookup(nusc, factory))
    names = [] if mode == "lidar-only" else [f"cam{i}" for i in range(n_cams)]
    runner = PipelineRunner(pipe, names, SyncConfig(slop=0.05, camera_timeout=0.001),
                            tf_lookup=pipe.tf_lookup, teacher_async=(mode == "async"),
                            teacher_max_age=max_age)
    cpu, wall, used = [], [], 0
    period = 1.0 / rate
    try:
        for i in range(sweeps + 2):              # two warm-up sweeps
            t_start = time.perf_counter()
            stamp = time.time_ns()
            for name in names:
                cam = make_camera(nusc, factory, name, stamp_ns=stamp - 35 * MS)
                runner.on_camera(name, cam.image, cam.info)
            runner.on_cloud(make_cloud(nusc.points, factory, stamp))
            time.sleep(0.002)                    # past camera_timeout: the sweep is released
            runner.on_timer()
            c0, w0 = time.thread_time(), time.perf_counter()
            out = runner.step(timeout=1.0)
            c1, w1 = time.thread_time(), time.perf_counter()
            assert out is not None and out.status == "ok", out and out.error
            if i >= 2:
                cpu.append(c1 - c0)
                wall.append(w1 - w0)
                used += bool(out.teacher_used)
            time.sleep(max(0.0, period - (time.perf_counter() - t_start)))
        diag = runner.diagnostics().values
    finally:
        runner.close()
    return {"cpu": statistics.median(cpu), "wall": statistics.median(wall), "used": used,
            "teacher_s": diag.get("teacher.latency_mean_s"),
            "predictions": diag.get("teacher.predictions")}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cameras", type=int, default=6)
    ap.add_argument("--sweeps", type=int, default=8)
    ap.add_argument("--rate", type=float, default=10.0, help="sweeps per second (wall)")
    ap.add_argument("--teacher", choices=("vit-b-16", "tiny"), default="vit-b-16")
    ap.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"))
    ap.add_argument("--max-age", type=float, default=0.5, help="teacher_max_age (s)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    set_cpu_threads(args.threads)
    factory = MessageFactory.from_rosbags()
    nusc = load_nuscenes(ROOT / "test" / "data")
    teacher = teacher_of(args.teacher)
    seg_cam = segmenter(teacher, args.precision)
    seg_lidar = segmenter(None, args.precision)
    print(f"torch {torch.__version__}, CPU threads {torch.get_num_threads()}, cpu capability "
          f"{torch.backends.cpu.get_cpu_capability()}, native bf16 {cpu_has_fast_bf16()}; "
          f"teacher {args.teacher} at {args.precision}; {args.cameras} cameras 1600x900 JPEG; "
          f"{len(nusc.points)} points; {args.sweeps} sweeps at {args.rate} Hz")
    res = {mode: run(mode, seg_lidar if mode == "lidar-only" else seg_cam, nusc, factory,
                     args.cameras, args.sweeps, args.rate, args.max_age)
           for mode in ("lidar-only", "async", "inline")}
    ref = res["lidar-only"]
    print(f"{'mode':<11} {'step cpu ms':>12} {'step wall ms':>13} {'cpu ratio':>10} "
          f"{'wall ratio':>11}  fused sweeps / teacher")
    for mode, r in res.items():
        extra = ""
        if mode == "async":
            extra = (f"  {r['used']}/{args.sweeps} fused; {r['predictions']} predictions, "
                     f"{float(r['teacher_s']) * 1e3:.0f} ms per image")
        print(f"{mode:<11} {r['cpu'] * 1e3:12.1f} {r['wall'] * 1e3:13.1f} "
              f"{r['cpu'] / ref['cpu']:10.2f} {r['wall'] / ref['wall']:11.2f}{extra}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
