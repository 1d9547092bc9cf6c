"""Recipe ablation: which of the project's former defaults measurably beat the released code's.

Issue 11 asks that the ``project`` recipe keep its own values only where they measurably win
over the released CLIP2Scene code. This benchmark measures every outdoor recipe row that the
oracle teacher can measure (``training/examples/oracle_teacher.py``: SemanticKITTI frames
0 + 1 → held-out frame 2, pixels painted from the ground truth, no 3D label in any loss), one
key changed at a time, paired by seed (same seed = same initial weights and batches):

* base: the project's former outdoor defaults (MinkUNet34; SSR 0.5 m cells of all members,
  fusing pixels and points, cosine D, ÷ cells; the released SCR, which already won);
* each row: base with one key set to the released code's value (SPVCNN rows start from
  SPVCNN with the project's former head input and dropout);
* ``all released``: every outdoor row at the released value at once.

Printed per row and head: mean ± s.d. over seeds of the full-frame mIoU for both values, the
paired difference (former − released) and the verdict: a value *measurably wins* when it wins
on every seed and the mean paired difference lies outside its 95 % confidence interval
(Student's t over the seeds); otherwise "no measurable difference". Rows this proxy cannot
measure (prompt wording: its text embeddings are random; ScanNet rows: no painted indoor
scene; sweeps: the SemanticKITTI frames here have none; the self-training switch: the proxy
trains no self-training, and the two values are one epoch apart at epoch 10) are not run.
The project recipe takes the released value wherever its former value did not win.

    python -m benchmarks.recipe_ablation --seeds 0 1 2 3                 # ≈ 75 s CPU per run, 10 runs per seed
    python -m benchmarks.recipe_ablation --seeds 0 1 --json a.json       # split over processes ...
    python -m benchmarks.recipe_ablation --summarise a.json b.json       # ... and report together
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from training.engine.recipes import SPVCNN_KEYS
from training.examples.oracle_teacher import OracleRecipe, PaintedKitti, run_oracle

DATA = Path(__file__).resolve().parents[1] / "test/data"
HEADS = ("local", "both")

#: the project's outdoor defaults before this benchmark decided them (SCR: the released form)
BASE: dict[str, Any] = {
    "model.backbone": "minkunet34",
    "loss.scr.variant": "cross_entropy", "loss.scr.ce_logits": "dot",
    "loss.ssr.grid_size": 0.5, "loss.ssr.max_members": None, "loss.ssr.features": "fused",
    "loss.ssr.metric": "cosine", "loss.ssr.normalize": "cells", "loss.ssr.similarity": "sigmoid_dot",
}
SPVCNN_FORMER: dict[str, Any] = {"model.backbone": "spvcnn", "model.head_input": "last", "model.dropout": 0.3}


@dataclasses.dataclass(frozen=True)
class Row:
    """One recipe row: ``key`` at the project's former value against the released one."""

    title: str
    key: str
    former: Any
    released: Any
    start: tuple[tuple[str, Any], ...] = ()     # keys set before the row's own (SPVCNN rows)

    def configs(self) -> tuple[dict[str, Any], dict[str, Any]]:
        base = {**BASE, **dict(self.start)}
        return _only_valid({**base, self.key: self.former}), _only_valid({**base, self.key: self.released})


def _only_valid(config: dict[str, Any]) -> dict[str, Any]:
    """Without the SPVCNN-only keys when the backbone is another one (as the recipes do)."""
    if config["model.backbone"] == "spvcnn":
        return config
    return {k: v for k, v in config.items() if k not in SPVCNN_KEYS}


_SPV = tuple(SPVCNN_FORMER.items())
ROWS: tuple[Row, ...] = (
    Row("3D network, outdoor", "model.backbone", "minkunet34", "spvcnn", start=_SPV),
    Row("SPVCNN head input", "model.head_input", "last", "concat", start=_SPV),
    Row("SPVCNN dropout", "model.dropout", 0.3, 0.0, start=_SPV),
    Row("SSR cell", "loss.ssr.grid_size", 0.5, 0.1),
    Row("SSR members per cell", "loss.ssr.max_members", None, 8),
    Row("SSR fused members", "loss.ssr.features", "fused", "points"),
    Row("SSR D", "loss.ssr.metric", "cosine", "dot"),
    # slots (the released mean over 8 slots per cell) needs the released 8 members per cell
    Row("SSR normalisation", "loss.ssr.normalize", "cells", "slots", start=(("loss.ssr.max_members", 8),)),
)
ALL_RELEASED: dict[str, Any] = {**BASE, **{row.key: row.released for row in ROWS}}


def _key(config: dict[str, Any]) -> str:
    return json.dumps(sorted(config.items()), default=str)


def all_configs() -> dict[str, dict[str, Any]]:
    """Every distinct configuration the rows need, by a stable key (shared ones run once)."""
    out = {}
    for row in ROWS:
        for c in row.configs():
            out[_key(c)] = c
    out[_key(ALL_RELEASED)] = ALL_RELEASED
    return out


def run(args: argparse.Namespace) -> dict[str, dict[str, dict[str, float]]]:
    """config key → seed → head → full-frame mIoU (and ``cpu_s``)."""
    base = OracleRecipe(steps=args.steps, max_points=args.max_points or None, width=args.width,
                        voxel_size=args.voxel_size, lovasz_weight=0.0)
    data = PaintedKitti(DATA)
    results: dict[str, dict[str, dict[str, float]]] = {}
    configs = all_configs()
    with tempfile.TemporaryDirectory(prefix="recipe-ablation-") as tmp:
        work = Path(args.out or tmp)
        for seed in args.seeds:
            for n, (key, config) in enumerate(configs.items()):
                recipe = dataclasses.replace(base, backbone=config["model.backbone"], config=tuple(config.items()))
                c0 = time.process_time()
                x = run_oracle(DATA, recipe, work / f"seed{seed}_{n}", seed=seed, cache_dir=work / "teacher_cache",
                               heads=HEADS, data=data)
                got = {h: x["scores"][f"pretrained_{h}"]["full"].miou() for h in HEADS}
                results.setdefault(key, {})[str(seed)] = {**got, "cpu_s": time.process_time() - c0}
                print(f"[seed {seed} run {n + 1}/{len(configs)}] "
                      + ", ".join(f"{h} {100 * v:.1f} %" for h, v in got.items())
                      + f" ({time.process_time() - c0:.0f} s CPU) {dict(config)}", flush=True)
    return results


#: two-sided 95 % quantiles of Student's t by degrees of freedom (seeds - 1)
T95 = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31, 9: 2.26}


def verdict(former: Sequence[float], released: Sequence[float]) -> str:
    """Paired by seed: a value measurably wins when it wins on every seed and the mean paired
    difference lies outside its 95 % confidence interval around zero (Student's t)."""
    d = np.asarray(former, np.float64) - np.asarray(released, np.float64)
    if len(d) < 2:
        return "one seed: no verdict"
    margin = T95.get(len(d) - 1, 2.0) * d.std(ddof=1) / math.sqrt(len(d))
    if (d > 0).all() and d.mean() > margin:
        return "former project value wins"
    if (d < 0).all() and -d.mean() > margin:
        return "released value wins"
    return "no measurable difference"


def _stat(values: Sequence[float]) -> str:
    v = 100 * np.asarray(values, np.float64)
    return f"{v.mean():5.1f} ± {v.std(ddof=1) if len(v) > 1 else 0.0:3.1f}"


def summarise(results: dict[str, dict[str, dict[str, float]]]) -> str:
    """The table: one line per row and head (seeds present for both values only)."""
    lines = [f"{'row':<22}{'key':<22}{'head':<7}{'former':<26}{'released':<26}{'former − released':>18}  verdict"]
    pairs = [(row.title, row.key, f"{row.former}", f"{row.released}", *row.configs()) for row in ROWS]
    pairs.append(("all released", "(every row)", "former", "released", BASE, ALL_RELEASED))
    seeds_seen: set[str] = set()
    for title, key, former_txt, released_txt, fc, rc in pairs:
        a, b = results.get(_key(fc), {}), results.get(_key(rc), {})
        seeds = sorted(set(a) & set(b), key=int)
        seeds_seen.update(seeds)
        if not seeds:
            lines.append(f"{title:<22}(not run)")
            continue
        for h in HEADS:
            fa, rb = [a[s][h] for s in seeds], [b[s][h] for s in seeds]
            diff = 100 * (np.asarray(fa) - np.asarray(rb))
            lines.append(f"{title:<22}{key:<22}{h:<7}{former_txt[:12]:<12}{_stat(fa):>12}  {released_txt[:12]:<12}"
                         f"{_stat(rb):>12}  {diff.mean():+9.1f} ± {diff.std(ddof=1) if len(diff) > 1 else 0:3.1f}"
                         f"  {verdict(fa, rb)}")
    cpu = [v["cpu_s"] for r in results.values() for v in r.values()]
    lines.append(f"seeds {sorted(seeds_seen, key=int)}; full-frame mIoU %, mean ± s.d.; "
                 f"{np.mean(cpu):.0f} s CPU per run on average")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--max-points", type=int, default=20000, help="training and evaluation density")
    p.add_argument("--width", type=float, default=0.25)
    p.add_argument("--voxel-size", type=float, default=0.25)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 on a shared machine)")
    p.add_argument("--out", default=None, help="work folder (default: a temporary one)")
    p.add_argument("--json", default=None, help="write the figures to this JSON file")
    p.add_argument("--summarise", nargs="+", default=None, metavar="JSON",
                   help="do not train: report the figures of these --json files together")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.summarise:
        results: dict[str, dict[str, dict[str, float]]] = {}
        for f in args.summarise:
            for key, by_seed in json.loads(Path(f).read_text())["results"].items():
                results.setdefault(key, {}).update(by_seed)
    else:
        results = run(args)
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps({"args": {k: v for k, v in vars(args).items() if k != "summarise"},
                                                   "results": results}, indent=1))
    print(summarise(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
