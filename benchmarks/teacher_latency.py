"""LiDAR-path latency with cameras and a CLIP teacher: fused predictions, async and inline teacher.

Real inputs: the nuScenes scene-0061 sweep (34,688 points) as a PointCloud2, a demo-with-CLIP
sized network (MinkUNet14A ×0.5, 0.1 m voxels, D 512) and a CLIP teacher with random weights
(open_clip's ViT-B-16 architecture by default; ``--teacher tiny`` for a tiny tower).

**Fusion** (default): the scene's six real camera images are predicted once (what the node's
`TeacherWorker` does off the sweep's critical path, folding included), then, interleaved
sweep by sweep in one process, `SegmentationPipeline.process` runs

* ``lidar-only``: no predictions (the reference);
* ``reference``: the six predictions fused by sampling D features per point
  (``SegmenterConfig.folded_fusion = False``);
* ``folded``: the same predictions fused from their folded maps (`clip2scene_core.fusion`).

It prints the median **CPU time** (`time.thread_time`; stable on a shared machine) of a sweep,
its ratio to LiDAR-only, the fusion step's ms per camera (``timings["cameras"]``), and how
many labels the two fusions disagree on (0 expected).

**Runners** (``--runners``): drives the node's `PipelineRunner` (callbacks → sync → step) with
N cameras (the scene's CAM_FRONT JPEG and calibration under N names), sweeps at ``--rate`` Hz
of wall time, each with its N images 35 ms older; three runners one after the other:
``lidar-only``, ``async`` (teacher on its `TeacherWorker` thread, the node's default) and
``inline`` (``teacher_async: false``); medians of `PipelineRunner.step`'s CPU and wall time.

Figures only; nothing asserted.

    python benchmarks/teacher_latency.py [--sweeps 8] [--teacher vit-b-16|tiny] [--runners]
"""
from __future__ import annotations

import argparse
import importlib.util
import pickle
import statistics
import sys
import time
from pathlib import Path

import numpy as np
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
from clip2scene_ros.pipeline import TeacherPrediction
from clip2scene_ros.runner import PipelineRunner
from clip2scene_ros.sync import SyncConfig
from clip2scene_ros.tf import TfResolver, TransformBuffer, matrix_to_transform

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
SCENE = ROOT / "test" / "data" / _helpers.NUSC

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


def six_cameras() -> list:
    """The scene's six camera images and their LiDAR→camera calibrations (mmdet3d info file)."""
    import cv2

    from clip2scene_core.types import Calibration, CameraFrame, CameraModel

    images = pickle.loads(next(SCENE.glob("*.pkl")).read_bytes())["data_list"][0]["images"]
    frames = []
    for name, cam in images.items():
        path = next(SCENE.glob(f"*__{name}__*.jpg"))
        rgb = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
        model = CameraModel(rgb.shape[1], rgb.shape[0], np.asarray(cam["cam2img"])[:3, :3])
        frames.append(CameraFrame(name, rgb, Calibration(model, np.asarray(cam["lidar2cam"])),
                                  _helpers.FRONT_STAMP))
    return frames


def run_fusion(seg: Segmenter, nusc, factory, sweeps: int) -> None:
    """Interleaved lidar-only / reference / folded sweeps through `SegmentationPipeline`."""
    frames = six_cameras()
    buf = TransformBuffer()
    for f in frames:
        buf.add(matrix_to_transform(f.calibration.lidar_to_camera, factory, f.name, "LIDAR_TOP",
                                    _helpers.LIDAR_STAMP), static=True)
    lookup = TfResolver(buf, "auto")
    pipe = SegmentationPipeline(seg, PipelineConfig(publish_overlays=False), factory, lookup)
    t0 = time.thread_time()
    preds = [TeacherPrediction(seg.predict_camera(f), f.name) for f in frames]
    teacher_s = (time.thread_time() - t0) / len(frames)
    cloud = make_cloud(nusc.points, factory, _helpers.LIDAR_STAMP)
    variants = {"lidar-only": (True, None), "reference": (False, preds), "folded": (True, preds)}
    cpu = {k: [] for k in variants}
    cams = {k: [] for k in variants}
    labels: dict[str, np.ndarray] = {}
    differ = 0
    for i in range(sweeps + 1):                  # one warm-up round
        for name, (folded, given) in variants.items():
            seg.config.folded_fusion = folded
            c0 = time.thread_time()
            out = pipe.process(cloud, tf_lookup=lookup, predictions=given)
            c1 = time.thread_time()
            assert out.status == "ok", out.error
            labels[name] = out.labels
            if i:
                cpu[name].append(c1 - c0)
                cams[name].append(out.timings.get("cameras", 0.0))
        differ += int((labels["reference"] != labels["folded"]).sum())
    seg.config.folded_fusion = True
    changed = int((labels["folded"] != labels["lidar-only"]).sum())
    ref = statistics.median(cpu["lidar-only"])
    print(f"fused sweep through SegmentationPipeline.process, {len(frames)} real cameras, "
          f"{sweeps} interleaved rounds (teacher {teacher_s:.2f} s CPU per image, off the path)")
    print(f"{'variant':<11} {'sweep cpu ms':>13} {'vs lidar-only':>14} {'fusion ms/camera':>17}")
    for name in variants:
        med = statistics.median(cpu[name])
        per_cam = statistics.median(cams[name]) * 1e3 / len(frames) if name != "lidar-only" else 0.0
        print(f"{name:<11} {med * 1e3:13.1f} {med / ref:14.3f} {per_cam:17.2f}", flush=True)
    print(f"labels that differ between reference and folded fusion: {differ} over {sweeps + 1} "
          f"sweeps; labels the cameras change: {changed}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cameras", type=int, default=6)
    ap.add_argument("--sweeps", type=int, default=8)
    ap.add_argument("--rate", type=float, default=10.0, help="sweeps per second (wall)")
    ap.add_argument("--teacher", choices=("vit-b-16", "tiny"), default="vit-b-16")
    ap.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"))
    ap.add_argument("--max-age", type=float, default=0.5, help="teacher_max_age (s)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--runners", action="store_true",
                    help="also the PipelineRunner comparison (lidar-only / async / inline)")
    args = ap.parse_args(argv)
    set_cpu_threads(args.threads)
    factory = MessageFactory.from_rosbags()
    nusc = load_nuscenes(ROOT / "test" / "data")
    teacher = teacher_of(args.teacher)
    seg_cam = segmenter(teacher, args.precision)
    print(f"torch {torch.__version__}, CPU threads {torch.get_num_threads()}, cpu capability "
          f"{torch.backends.cpu.get_cpu_capability()}, native bf16 {cpu_has_fast_bf16()}; "
          f"teacher {args.teacher} at {args.precision}; {len(nusc.points)} points")
    run_fusion(seg_cam, nusc, factory, args.sweeps)
    if not args.runners:
        return 0
    seg_lidar = segmenter(None, args.precision)
    print(f"runners: {args.cameras} cameras 1600x900 JPEG; {args.sweeps} sweeps at {args.rate} Hz")
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
