"""``clip2scene-segment``: label point-cloud files with a checkpoint, outside ROS.

Reads KITTI/nuScenes-style ``.bin`` (float32 × len(fields)) or ``.npy`` (N, C) files, writes
per-point labels (``.labels.npy``, int16, -1 = dropped), scores (``.scores.npy``) and a
bird's-eye-view PNG per file, and prints the class histogram.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .datasets.base import load_points_bin
from .errors import Clip2SceneError, InvalidPointCloudError
from .threads import prepare_openmp
from .types import Scan


def read_point_file(path: Path, fields: tuple[str, ...]) -> Scan:
    """``.npy`` (N, C) or raw float32 ``.bin`` with ``len(fields)`` values per point."""
    if path.suffix == ".npy":
        pts = np.load(path)
        if pts.ndim != 2 or pts.shape[1] < 3:
            raise InvalidPointCloudError(f"{path}: expected an (N, C>=3) array, got {pts.shape}")
        return Scan(pts[:, :len(fields)].astype(np.float32), fields[:min(len(fields), pts.shape[1])])
    return Scan(load_points_bin(path, len(fields)), fields)


def main(argv: list[str] | None = None) -> int:
    prepare_openmp()   # before torch loads: OpenMP workers must not spin on a shared core
    ap = argparse.ArgumentParser(prog="clip2scene-segment", description=__doc__)
    ap.add_argument("inputs", nargs="+", type=Path, help="point files (.bin / .npy)")
    ap.add_argument("--checkpoint", required=True, type=Path)
    ap.add_argument("--fields", default="x,y,z,intensity",
                    help="column names of the files (nuScenes .pcd.bin: x,y,z,intensity,ring)")
    ap.add_argument("--out", type=Path, default=Path("out/segment"))
    ap.add_argument("--device", default="auto")
    ap.add_argument("--classes", default=None,
                    help="comma-separated class names to use instead of the checkpoint's "
                         "(needs --text-embeddings or a CLIP teacher)")
    ap.add_argument("--text-embeddings", type=Path, default=None,
                    help="embedding file saved by clip2scene_core.clip.save_text_embeddings")
    ap.add_argument("--no-render", action="store_true")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch CPU threads (default 0: automatic, one on machines with two cores "
                         "or fewer)")
    args = ap.parse_args(argv)

    from .threads import set_cpu_threads
    from .render import render_bev
    from .segmenter import Segmenter

    fields = tuple(f.strip() for f in args.fields.split(",") if f.strip())
    try:
        set_cpu_threads(args.threads)
        seg = Segmenter.load(args.checkpoint, device=args.device)
        if args.text_embeddings:
            seg.load_vocabulary_file(args.text_embeddings)
        elif args.classes:
            seg.set_vocabulary([c for c in args.classes.split(",") if c.strip()])
    except Clip2SceneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    summary = {}
    failures = 0
    for path in tqdm(args.inputs, desc="segment", unit="scan"):
        try:
            scan = read_point_file(path, fields)
            res = seg.segment(scan)
        except (Clip2SceneError, OSError) as exc:
            print(f"skipped {path}: {exc}", file=sys.stderr)
            failures += 1
            continue
        stem = path.name.split(".")[0]
        np.save(args.out / f"{stem}.labels.npy", res.labels.astype(np.int16))
        np.save(args.out / f"{stem}.scores.npy", res.scores)
        if not args.no_render:
            render_bev(scan.xyz, res.labels, res.class_names, args.out / f"{stem}_bev.png",
                       title=f"{path.name}: {len(scan)} points")
        hist = np.bincount(res.labels[res.labels >= 0], minlength=len(res.class_names))
        summary[path.name] = {
            "points": len(scan), "dropped": int(res.info.get("points_dropped", 0)),
            "timings_s": res.timings,
            "classes": {n: int(c) for n, c in zip(res.class_names, hist) if c},
        }
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))
    return 1 if failures and not summary else 0


if __name__ == "__main__":
    sys.exit(main())
