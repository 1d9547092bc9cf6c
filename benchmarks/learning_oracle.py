"""Learning benchmark: how much of a perfect (oracle) teacher the 3D network learns.

Oracle-teacher distillation on the real SemanticKITTI frames bundled in test/data
(``training/examples/oracle_teacher.py``: four virtual cameras from the real KITTI
calibration, pixels painted by ground-truth class, the teacher returns the class's text
embedding). Pre-training sees only images and points of frames 000000 + 000001 (no 3D
label enters a loss); frame 000002, never seen, is scored annotation-free (argmax over the
text embeddings, through the deployable checkpoint and the Segmenter) at the training point
density (``--max-points``: every frame is predicted in random chunks of that many points).

Printed per variant (without / with the class-imbalance option) and head, mean ± standard
deviation [min, max] over ``--seeds``: full-frame, visible-only (points a camera sees) and
invisible-only mIoU next to the two oracle bounds (the teacher's label on visible points,
invisible counted wrong; invisible points copying the nearest visible point's label), the
SCR head's agreement with its own training pseudo-labels, and per-class IoU (full frame).
Figures only, nothing is asserted; the fast version with thresholds is
test/test_learning_proof.py.

    python -m benchmarks.learning_oracle --seeds 0 1 2                # ≈ 15 min per seed and variant
    python -m benchmarks.learning_oracle --seeds 0 --steps 30         # a quick look
    python -m benchmarks.learning_oracle --variants imbalance --json runs/oracle.json
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import tempfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from training.examples.oracle_teacher import OracleRecipe, run_oracle

DATA = Path(__file__).resolve().parents[1] / "test/data"
BOUNDS = ("visible_only", "nearest_visible")
REGIONS = ("full", "visible", "invisible")


def variants(base: OracleRecipe, args: argparse.Namespace) -> dict[str, OracleRecipe]:
    """``plain``: no class-imbalance handling; ``imbalance``: the configured option."""
    plain = dataclasses.replace(base, lovasz_weight=0.0, class_weights="none")
    imb = dataclasses.replace(base, lovasz_weight=args.lovasz_weight, class_weights=args.class_weights)
    table = {"plain": plain, "imbalance": imb}
    return {name: table[name] for name in args.variants}


def _stat(values: Sequence[float]) -> str:
    v = 100 * np.asarray(values, dtype=np.float64)
    if len(v) == 1:
        return f"{v[0]:6.1f}"
    return f"{v.mean():5.1f} ± {v.std(ddof=1):4.1f} [{v.min():.1f}, {v.max():.1f}]"


def summarise(runs: dict[str, list[dict[str, Any]]], heads: Sequence[str]) -> str:
    """The benchmark's tables (runs: variant → one result of ``run_oracle`` per seed)."""
    first = next(iter(runs.values()))[0]
    names = first["class_names"]
    lines = [f"{'model':<34}" + "".join(f"{r + ' mIoU':>30}" for r in REGIONS)]

    def row(label: str, results: list[dict[str, Any]], key: str) -> None:
        lines.append(f"{label:<34}" + "".join(f"{_stat([x['scores'][key][r].miou() for x in results]):>30}"
                                              for r in REGIONS))

    row("oracle: visible only", [first], "visible_only")
    row("oracle: invisible ← nearest visible", [first], "nearest_visible")
    for variant, results in runs.items():
        row(f"{variant}: untrained", results, "untrained")
        for h in heads:
            row(f"{variant}: {h} head", results, f"pretrained_{h}")
    lines.append("")
    for variant, results in runs.items():
        agree = [x["train_agreement"]["accuracy"] for x in results]
        miou = [x["train_agreement"]["miou"] for x in results]
        secs = [x["seconds"]["train"] for x in results]
        cpu = [x["seconds"]["total_cpu"] for x in results]
        lines.append(f"{variant}: training pseudo-label agreement ({results[0]['train_agreement']['head']} head) "
                     f"accuracy {_stat(agree)} %, mIoU {_stat(miou)} %; training {np.mean(secs):.0f} s wall, "
                     f"{np.mean(cpu):.0f} s CPU per seed with evaluation")
    lines.append("")
    # per-class IoU, full frame: the oracle and every variant's first head
    cols = [("oracle", [first], "visible_only")] + [(f"{v}:{heads[0]}", r, f"pretrained_{heads[0]}")
                                                     for v, r in runs.items()]
    support = first["scores"]["visible_only"]["full"]
    points = support.matrix.sum(axis=1) + support.missed
    lines.append(f"{'class':<16}{'points':>8}" + "".join(f"{c:>30}" for c, _, _ in cols))
    for k, name in enumerate(names):
        cells = []
        for _, results, key in cols:
            vals = [x["scores"][key]["full"].iou()[k] for x in results]
            cells.append("n/a" if np.isnan(vals).all() else _stat([v for v in vals if not np.isnan(v)]))
        lines.append(f"{name:<16}{int(points[k]):>8}" + "".join(f"{c:>30}" for c in cells))
    zero = {}
    for variant, results in runs.items():
        for h in heads:
            bad = sorted({names[k] for x in results for k, v in enumerate(x["scores"][f"pretrained_{h}"]["full"].iou())
                          if v == 0 and points[k] > 1000})
            zero[f"{variant}:{h}"] = bad
    lines.append("")
    lines.append("classes with > 1,000 points at 0 IoU in some seed: "
                 + "; ".join(f"{k}: {', '.join(v) or 'none'}" for k, v in zero.items()))
    return "\n".join(lines)


def as_json(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for variant, results in runs.items():
        out[variant] = []
        for x in results:
            out[variant].append({
                "seed": x["seed"], "recipe": x["recipe"], "seconds": x["seconds"],
                "train_agreement": x["train_agreement"], "teacher_agreement": x["teacher_agreement"],
                "miou": {m: {r: cm.miou() for r, cm in regions.items()} for m, regions in x["scores"].items()},
                "iou_full": {m: dict(zip(x["class_names"], [None if np.isnan(v) else float(v)
                                                            for v in regions["full"].iou()]))
                             for m, regions in x["scores"].items()},
                "loss_first": x["history"][0]["loss"], "loss_last": x["history"][-1]["loss"]})
    return out


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    d = OracleRecipe()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--variants", nargs="+", choices=["plain", "imbalance"], default=["plain", "imbalance"])
    p.add_argument("--heads", nargs="+", choices=["local", "global", "both"], default=["local", "both"])
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--max-points", type=int, default=d.max_points, help="training and evaluation density (0: all)")
    p.add_argument("--backbone", default=d.backbone)
    p.add_argument("--width", type=float, default=d.width)
    p.add_argument("--voxel-size", type=float, default=d.voxel_size)
    p.add_argument("--embed-dim", type=int, default=d.embed_dim)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--scr-variant", choices=["contrastive", "cross_entropy"], default=d.scr_variant)
    p.add_argument("--ce-logits", choices=["cosine", "dot"], default=d.ce_logits,
                   help="cross_entropy over cosines x 1/temperature or raw dot products (released code)")
    p.add_argument("--no-ssr", action="store_true", help="SCR only")
    p.add_argument("--lovasz-weight", type=float, default=1.0, help="loss.scr.lovasz_weight of the imbalance variant")
    p.add_argument("--class-weights", default="none", help="loss.scr.class_weights of the imbalance variant")
    p.add_argument("--noise", type=float, default=0.0, help="teacher noise (0: the oracle)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 on a shared machine)")
    p.add_argument("--out", default=None, help="work folder (default: a temporary one)")
    p.add_argument("--json", default=None, help="write the figures to this JSON file")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    base = OracleRecipe(steps=args.steps, max_points=args.max_points or None, backbone=args.backbone,
                        width=args.width, voxel_size=args.voxel_size, embed_dim=args.embed_dim, lr=args.lr,
                        batch_size=args.batch_size, scr_variant=args.scr_variant, ce_logits=args.ce_logits,
                        ssr=not args.no_ssr, noise=args.noise)
    with tempfile.TemporaryDirectory(prefix="learning-oracle-") as tmp:
        work = Path(args.out or tmp)
        runs: dict[str, list[dict[str, Any]]] = {}
        for name, recipe in variants(base, args).items():
            for seed in args.seeds:
                x = run_oracle(DATA, recipe, work / f"{name}_seed{seed}", seed=seed, cache_dir=work / "teacher_cache",
                               heads=args.heads)
                x["seed"], x["recipe"] = seed, dataclasses.asdict(recipe)
                runs.setdefault(name, []).append(x)
                full = {h: 100 * x["scores"][f"pretrained_{h}"]["full"].miou() for h in args.heads}
                print(f"[{name} seed {seed}] full-frame mIoU {full}, training {x['seconds']['train']:.0f} s wall, "
                      f"{x['seconds']['total_cpu']:.0f} s CPU with evaluation", flush=True)
        print(f"recipe: {dataclasses.asdict(base)}; imbalance variant: lovasz_weight {args.lovasz_weight}, "
              f"class_weights {args.class_weights}; seeds {args.seeds}")
        print(summarise(runs, args.heads))
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(as_json(runs), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
