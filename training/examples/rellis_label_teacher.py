#!/usr/bin/env python3
"""Worked example: a dataset's 2D annotations as the teacher of CLIP2Scene pre-training.

Pre-trains a small 3D network on a RELLIS-3D drive with its 2D label images as the teacher
(``rellis3d_label_teacher``: each pixel's feature is its class's fixed unit vector), then
scores it annotation-free (argmax over the class vectors, through the deployable checkpoint
and the ``Segmenter``) against the 3D labels, which never enter training:

* inside the camera's view, against the teacher itself (its pseudo-labels vs the 3D labels:
  the ceiling of distillation) and the untrained network;
* outside the camera's view (points the teacher never labels), against copying the
  pseudo-label of the nearest point the camera sees (an annotation-free baseline) and the
  untrained network.

    python training/examples/rellis_label_teacher.py                      # bundled frame 000104
    python training/examples/rellis_label_teacher.py --root /data/Rellis-3D/00000 --steps 2000

With the bundled single frame the network is scored on the frame it was pre-trained on (its
3D labels unused): the figures show the transfer, not generalisation to new scans.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from clip2scene_core.cli import TRAINING_LOG_FORMAT, start_cli
from clip2scene_core.errors import Clip2SceneError

_ROOT = Path(__file__).resolve().parents[2]
log = logging.getLogger("clip2scene.example")
BUNDLED = _ROOT / "test/data/rellis3d/utils_example"


def example_config(out_dir: str | Path, steps: int = 300, max_points: int | None = 30000, embed_dim: int = 19,
                   width: float = 0.25, lr: float = 0.2, seed: int = 0, progress: bool = True):
    """The pre-training config of the example (small network, CPU, paper losses)."""
    from clip2scene_core.config import from_dict
    from clip2scene_core.datasets import RELLIS3D_CLASSES
    from training.engine.config import PretrainConfig

    out = Path(out_dir)
    return from_dict(PretrainConfig, {
        "data": {"reader": "Rellis3DReader", "max_points": max_points, "use_sweeps": False,
                 "augment": {"rotate_z": 180.0, "scale": [0.95, 1.05]}},
        "model": {"backbone": "minkunet14a", "in_channels": 2, "embed_dim": embed_dim, "width_multiplier": width,
                  "voxel": {"voxel_size": 0.25, "point_range": [-100, -100, -8, 100, 100, 12],
                            "features": ["z", "ones"]}},
        "teacher": {"model_name": "rellis3d-2d-labels", "cache_dir": str(out / "teacher_cache"), "min_depth": 1.0},
        "vocabulary": {"preset": None, "names": list(RELLIS3D_CLASSES)},
        "loss": {"scr": {"variant": "contrastive", "temperature": 0.5},
                 "ssr": {"enabled": True, "grid_size": 1.0, "lam": 1.0},
                 "self_training": {"enabled": False}},
        "optim": {"lr": lr, "momentum": 0.9, "dampening": 0.1, "steps": steps, "batch_size": 1,
                  "scheduler": "cosine"},
        "run": {"out_dir": str(out / "run"), "seed": seed, "device": "cpu", "progress": progress,
                "log_every": 0, "num_threads": None},
    })


def nearest_copy(src_xyz: np.ndarray, src_labels: np.ndarray, dst_xyz: np.ndarray, chunk: int = 4096) -> np.ndarray:
    """Label of the nearest source point for every destination point (exact, chunked)."""
    src = torch.from_numpy(np.ascontiguousarray(src_xyz, dtype=np.float32))
    out = np.empty(len(dst_xyz), np.int64)
    for i in range(0, len(dst_xyz), chunk):
        d = torch.cdist(torch.from_numpy(np.ascontiguousarray(dst_xyz[i:i + chunk], dtype=np.float32)), src)
        out[i:i + chunk] = src_labels[d.argmin(1).numpy()]
    return out


def score_views(samples: Sequence[Any], cache, text_emb: torch.Tensor, checkpoints: dict[str, str | Path],
                min_depth: float = 1.0) -> dict[str, Any]:
    """Accuracy and mIoU of each checkpoint and of the baselines, inside / outside the camera.

    Inside = points some camera sees (projection valid at ``min_depth``), outside = the rest;
    void points (label -1) are not scored. Baselines: ``teacher`` (its pseudo-labels, inside)
    and ``nearest_visible`` (the pseudo-label of the nearest seen point, outside)."""
    from clip2scene_core.geometry import project_points
    from clip2scene_core.metrics import ConfusionMatrix
    from clip2scene_core.segmenter import Segmenter
    from clip2scene_core.label_spaces import class_map, remap_labels

    segs = {name: Segmenter.load(path, device="cpu") for name, path in checkpoints.items()}
    names = list(next(iter(segs.values())).class_names)
    k = len(names)
    cms = {(m, region): ConfusionMatrix(k) for m in [*segs, "teacher", "nearest_visible"]
           for region in ("inside", "outside")}
    for sample in samples:
        gt = remap_labels(sample.labels, class_map(getattr(sample, "class_names", None), names))
        inside = np.zeros(len(sample.scan), bool)
        for cam in sample.cameras:
            inside |= project_points(sample.scan.xyz, cam.calibration, min_depth=min_depth).valid
        pseudo = cache.pseudo_labels(sample, text_emb)
        cms["teacher", "inside"].update(pseudo[inside], gt[inside])
        seen = pseudo >= 0
        if seen.any():
            copy = nearest_copy(sample.scan.xyz[seen], pseudo[seen], sample.scan.xyz[~inside])
            cms["nearest_visible", "outside"].update(copy, gt[~inside])
        for name, seg in segs.items():
            pred = seg.segment(sample.scan).labels
            cms[name, "inside"].update(pred[inside], gt[inside])
            cms[name, "outside"].update(pred[~inside], gt[~inside])
    figures: dict[str, Any] = {}
    for (m, region), cm in cms.items():
        if cm.matrix.sum() + cm.missed.sum() == 0:
            continue
        figures.setdefault(region, {})[m] = {"accuracy": cm.accuracy(), "miou": cm.miou(),
                                             "points": int(cm.matrix.sum() + cm.missed.sum())}
    figures["class_names"] = names
    figures["confusion"] = {f"{m}/{r}": cm for (m, r), cm in cms.items()}
    return figures


def run_example(root: str | Path = BUNDLED, out_dir: str | Path = "runs/rellis_label_teacher", steps: int = 300,
                max_points: int | None = 30000, width: float = 0.25, lr: float = 0.2, seed: int = 0,
                progress: bool = True) -> dict[str, Any]:
    """Pre-train with the 2D-label teacher and score inside / outside the camera (see module doc)."""
    from clip2scene_core.datasets import Rellis3DReader
    from clip2scene_core.teachers import rellis3d_label_teacher
    from training import pretrain

    t0 = time.perf_counter()
    cfg = example_config(out_dir, steps=steps, max_points=max_points, width=width, lr=lr, seed=seed,
                         progress=progress)
    reader = Rellis3DReader(root, drop_no_return=True)
    if len(reader) == 0:
        raise Clip2SceneError(f"no RELLIS-3D scan (<frame>.bin) in {root}")
    teacher = rellis3d_label_teacher(root, embed_dim=cfg.model.embed_dim, seed=seed)
    out = pretrain.run(cfg, reader=reader, teacher=teacher)
    train_s = time.perf_counter() - t0
    figures = score_views(reader, out["teacher_cache"], out["text_embeddings"],
                          {"untrained": out["initial_checkpoint"], "pretrained": out["checkpoint"]},
                          cfg.teacher.min_depth)
    figures["teacher_agreement"] = out["teacher_agreement"]
    figures["steps"] = out["steps"]
    figures["loss_first"] = out["history"][0]["loss"]
    figures["loss_last"] = out["history"][-1]["loss"]
    figures["seconds"] = {"pretrain": train_s, "total": time.perf_counter() - t0}
    figures["checkpoint"] = out["checkpoint"]
    return figures


def format_figures(f: dict[str, Any]) -> str:
    rows = [("inside the camera view", "inside", ["teacher", "untrained", "pretrained"]),
            ("outside the camera view", "outside", ["nearest_visible", "untrained", "pretrained"])]
    lines = [f"{'region':<26}{'model':<34}{'points':>8}{'accuracy':>10}{'mIoU':>8}"]
    label = {"teacher": "2D labels (teacher, the ceiling)", "nearest_visible": "copy nearest seen point's label",
             "untrained": "untrained network", "pretrained": "pre-trained network"}
    for title, region, models in rows:
        for m in models:
            v = f.get(region, {}).get(m)
            if v is not None:
                lines.append(f"{title:<26}{label[m]:<34}{v['points']:>8}{v['accuracy']:>10.3f}{v['miou']:>8.3f}")
    lines.append(f"steps {f['steps']}, loss {f['loss_first']:.3f} -> {f['loss_last']:.3f}, "
                 f"{f['seconds']['total']:.0f} s")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    start_cli(logging.WARNING, TRAINING_LOG_FORMAT)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", default=str(BUNDLED), help="RELLIS-3D sequence folder (default: the bundled frame)")
    p.add_argument("--out", default="runs/rellis_label_teacher", help="output folder (cache, checkpoints)")
    p.add_argument("--steps", type=int, default=300, help="optimizer steps")
    p.add_argument("--max-points", type=int, default=30000, help="points per scan per step (0: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print the figures as JSON as well")
    args = p.parse_args(argv)
    try:
        f = run_example(args.root, args.out, steps=args.steps, max_points=args.max_points or None, seed=args.seed)
    except (Clip2SceneError, FileNotFoundError) as exc:
        log.error("%s", exc)
        return 2
    print(format_figures(f))
    if args.json:
        print(json.dumps({k: v for k, v in f.items() if k not in ("confusion", "class_names")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
