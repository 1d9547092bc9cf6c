"""Command lines: :func:`start_cli`, the preamble every entry point runs first, and
``clip2scene-segment``, which labels point-cloud files with a checkpoint, outside ROS.

``clip2scene-segment`` reads KITTI/nuScenes-style ``.bin`` (float32 × len(fields)) or ``.npy``
(N, C) files, writes per-point labels (``.labels.npy``, int16, -1 = dropped), scores
(``.scores.npy``) and a bird's-eye-view PNG per file, and prints the class histogram.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .datasets.base import load_points_bin
from .errors import Clip2SceneError, ConfigError, InvalidPointCloudError
from .threads import prepare_openmp
from .types import Scan

#: log line of the tools (segment, replay, demo, dataset → bag): level, logger, message
TOOL_LOG_FORMAT = "%(levelname)s %(name)s: %(message)s"
#: log line of the long-running training commands: with the time
TRAINING_LOG_FORMAT = "%(asctime)s %(name)s %(levelname)s: %(message)s"


def start_cli(level: int = logging.WARNING, log_format: str = TOOL_LOG_FORMAT) -> None:
    """What every command-line entry point does first, before it parses its arguments.

    OpenMP workers wait passively (``threads.prepare_openmp``; effective when torch is not
    loaded yet, so entry-point modules import torch lazily where they can) and log records go
    to stderr as ``log_format`` at ``level``. Torch's thread count is set later, from the
    command's own option or config (``threads.set_cpu_threads``, the training run config).
    """
    prepare_openmp()
    logging.basicConfig(level=level, format=log_format)


def parse_fields(text: str) -> tuple[str, ...]:
    """``x,y,z,intensity`` → field names; ConfigError unless they start with x, y, z and are unique."""
    fields = tuple(f.strip() for f in text.split(",") if f.strip())
    if fields[:3] != ("x", "y", "z"):
        raise ConfigError(f"--fields must start with x,y,z (got {text!r}); e.g. x,y,z,intensity")
    if len(set(fields)) != len(fields):
        raise ConfigError(f"--fields names a column twice: {text!r}")
    return fields


def read_point_file(path: Path, fields: tuple[str, ...]) -> Scan:
    """``.npy`` (N, C) or raw float32 ``.bin`` with ``len(fields)`` values per point.

    ``.npy`` files are read without pickle (an object array is refused, never unpickled).
    """
    if not fields:
        raise ConfigError("no point fields given")
    if path.suffix == ".npy":
        try:
            pts = np.load(path, allow_pickle=False)
        except ValueError as exc:   # object arrays (pickled) or a damaged header
            raise InvalidPointCloudError(f"{path}: not a plain numeric .npy array ({exc})") from None
        except EOFError:
            raise InvalidPointCloudError(f"{path}: empty or cut .npy file") from None
        if not isinstance(pts, np.ndarray) or pts.dtype.kind not in "iuf" or pts.dtype.names:
            raise InvalidPointCloudError(f"{path}: expected a numeric (N, C) array, got "
                                         f"{getattr(pts, 'dtype', type(pts).__name__)}")
        if pts.ndim != 2 or pts.shape[1] < 3:
            raise InvalidPointCloudError(f"{path}: expected an (N, C>=3) array, got {pts.shape}")
        return Scan(pts[:, :len(fields)].astype(np.float32), fields[:min(len(fields), pts.shape[1])])
    return Scan(load_points_bin(path, len(fields)), fields)


def output_stems(paths: list[Path]) -> list[str]:
    """One distinct output name per input: the file's stem, or — when two inputs share it
    (``a/000000.bin``, ``b/000000.bin``) — its path below the inputs' common folder with the
    separators as ``__`` (``a__000000``); a name still taken gets ``-2``, ``-3``... (the same
    file given twice). No result of a run ever overwrites another of the same run."""
    stems = [p.name.split(".")[0] or p.name for p in paths]
    clash = {s.lower() for s in stems if sum(t.lower() == s.lower() for t in stems) > 1}
    resolved = [p.resolve() for p in paths]
    try:
        common = Path(os.path.commonpath([str(r.parent) for r in resolved]))
    except ValueError:
        common = Path("/")
    out, taken = [], set()
    for r, stem in zip(resolved, stems):
        name = stem
        if stem.lower() in clash:
            rel = r.parent.relative_to(common) if r.parent.is_relative_to(common) else r.parent
            parts = [c for c in rel.parts if c not in ("/", "\\")] + [stem]
            name = "__".join(parts)
        name = name.replace("/", "_").replace("\\", "_").lstrip(".") or "scan"   # one component
        base, k = name, 1
        while name.lower() in taken:
            k += 1
            name = f"{base}-{k}"
        taken.add(name.lower())
        out.append(name)
    return out


def main(argv: list[str] | None = None) -> int:
    start_cli()
    ap = argparse.ArgumentParser(prog="clip2scene-segment", description=__doc__.split("\n\n", 1)[1])
    ap.add_argument("inputs", nargs="+", type=Path, help="point files (.bin / .npy)")
    ap.add_argument("--checkpoint", required=True, type=Path)
    ap.add_argument("--fields", default="x,y,z,intensity",
                    help="column names of the files, starting with x,y,z "
                         "(nuScenes .pcd.bin: x,y,z,intensity,ring)")
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

    try:
        fields = parse_fields(args.fields)
        if args.out.exists() and not args.out.is_dir():
            raise ConfigError(f"--out {args.out} is a file, not a folder")
        for parent in args.out.parents:
            if parent.exists():
                if not parent.is_dir():
                    raise ConfigError(f"--out {args.out}: {parent} is a file, not a folder")
                break
        set_cpu_threads(args.threads)
        seg = Segmenter.load(args.checkpoint, device=args.device)
        if args.text_embeddings:
            seg.load_vocabulary_file(args.text_embeddings)
        elif args.classes:
            seg.set_vocabulary([c for c in args.classes.split(",") if c.strip()])
        args.out.mkdir(parents=True, exist_ok=True)
    except Clip2SceneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"error: {args.out}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    summary = {}
    failures = 0
    names = output_stems(list(args.inputs))
    for path, stem in zip(tqdm(args.inputs, desc="segment", unit="scan"), names):
        try:
            scan = read_point_file(path, fields)
            res = seg.segment(scan)
            np.save(args.out / f"{stem}.labels.npy", res.labels.astype(np.int16))
            np.save(args.out / f"{stem}.scores.npy", res.scores)
            if not args.no_render:
                render_bev(scan.xyz, res.labels, res.class_names, args.out / f"{stem}_bev.png",
                           title=f"{path.name}: {len(scan)} points")
        except (Clip2SceneError, OSError) as exc:
            print(f"skipped {path}: {exc}", file=sys.stderr)
            failures += 1
            continue
        hist = np.bincount(res.labels[res.labels >= 0], minlength=len(res.class_names))
        key = path.name if stem == path.name.split(".")[0] else stem   # unique within the run
        summary[key] = {
            "input": str(path), "output": stem,
            "points": len(scan), "dropped": int(res.info.get("points_dropped", 0)),
            "timings_s": res.timings,
            "classes": {n: int(c) for n, c in zip(res.class_names, hist) if c},
        }
    try:
        (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    except OSError as exc:
        print(f"error: cannot write {args.out / 'summary.json'}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2))
    return 1 if failures and not summary else 0


if __name__ == "__main__":
    sys.exit(main())
