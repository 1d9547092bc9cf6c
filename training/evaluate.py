#!/usr/bin/env python3
"""mIoU of a pre-trained (annotation-free) or fine-tuned CLIP2Scene network, and the
deployable checkpoint the node and the replay tool load.

    python training/evaluate.py --config config/evaluate_demo.yaml
    python training/evaluate.py --config config/evaluate.yaml --set checkpoint=runs/finetune/last.pt

Annotation-free: the classifier is the CLIP text embeddings on the local / global head (no
label was used in training). Fine-tuned: the checkpoint's fine-tuned class embeddings. The
evaluation runs the exact inference path of the node (``clip2scene_core.segmenter``) on every
point of every scan (points the voxeliser drops count as wrong). Writes
``metrics.json``, ``iou_<head>.txt``, ``confusion_<head>.png`` and ``model.pt``.
"""
from __future__ import annotations

import sys
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:          # runnable from the repo root without installing
    sys.path.insert(0, str(_ROOT))

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
from typing import Any, Sequence  # noqa: E402

import numpy as np  # noqa: E402

from clip2scene_core.errors import Clip2SceneError, ConfigError  # noqa: E402
from training.engine.config import EvaluateConfig, load_training_config  # noqa: E402

log = logging.getLogger("clip2scene.evaluate")


def class_key(name: str) -> str:
    """Spelling-free key of a class name: ``other-vehicle``, ``other_vehicle`` and ``Other
    Vehicle`` are one class, and so are ScanNet's ``otherfurniture`` and the vocabulary's
    ``other furniture``."""
    return "".join(ch for ch in name.lower() if ch.isalnum())


def label_map(dataset_names: Sequence[str] | None, vocab_names: Sequence[str]) -> np.ndarray | None:
    """Dataset label index → vocabulary index; None when both lists are the same.

    Every dataset class must be in the vocabulary (matched by `class_key`): an unmatched class
    is a ConfigError naming it, never a silent -1 that drops its points from evaluation and
    fine-tuning.
    """
    if dataset_names is None or list(dataset_names) == list(vocab_names):
        return None
    where = {class_key(n): i for i, n in enumerate(vocab_names)}
    m = np.array([where.get(class_key(n), -1) for n in dataset_names], dtype=np.int64)
    missing = [n for n, i in zip(dataset_names, m) if i < 0]
    if missing:
        raise ConfigError(f"dataset class(es) {missing} are not in the vocabulary "
                          f"{list(vocab_names)}: every labelled class needs a vocabulary class")
    return m


def evaluate_segmenter(segmenter, samples: Sequence[Any], heads: Sequence[str] = ("local", "global"),
                       progress: bool = False) -> dict[str, Any]:
    """Confusion matrices of ``segmenter`` on labelled ``samples`` for each head."""
    from tqdm import tqdm

    from clip2scene_core.metrics import ConfusionMatrix

    names = list(segmenter.class_names)
    cms = {h: ConfusionMatrix(len(names)) for h in heads}
    used = 0
    for i in tqdm(range(len(samples)), desc="evaluate", disable=not progress):
        sample = samples[i]
        if sample.labels is None:
            continue
        gt = np.asarray(sample.labels, dtype=np.int64)
        m = label_map(getattr(sample, "class_names", None), names)
        if m is not None:
            gt = np.where(gt >= 0, m[np.clip(gt, 0, None)], -1)
        for h in heads:
            segmenter.head = h
            res = segmenter.segment(sample.scan)
            cms[h].update(res.labels, gt)
        used += 1
    if used == 0:
        raise ConfigError("no labelled sample to evaluate")
    return {"class_names": names, "samples": used, "confusion": cms}


def summarise(result: dict[str, Any]) -> dict[str, Any]:
    names = result["class_names"]
    out: dict[str, Any] = {"samples": result["samples"], "class_names": names, "heads": {}}
    for h, cm in result["confusion"].items():
        iou = cm.iou()
        out["heads"][h] = {"miou": cm.miou(), "accuracy": cm.accuracy(),
                           "iou": {n: (None if np.isnan(v) else float(v)) for n, v in zip(names, iou)}}
    return out


def run(cfg: EvaluateConfig, *, reader=None, write_checkpoint: bool = True) -> dict[str, Any]:
    from clip2scene_core.models import build_model
    from clip2scene_core.render import render_confusion_matrix
    from clip2scene_core.segmenter import Segmenter, SegmenterConfig
    from training.engine import common
    from training.engine.config import validate_config
    from training.engine.data import Subset, build_reader

    validate_config(cfg)
    pieces = common.read_any_checkpoint(cfg.checkpoint)
    net = build_model(pieces["model_config"])
    common.load_net_state(net, pieces["net_state"], cfg.checkpoint)
    vocab, emb = pieces["vocabulary"], pieces["text_embeddings"]
    if cfg.vocabulary is not None:      # open vocabulary: re-embed new class names
        vocab = common.build_vocabulary(cfg.vocabulary)
        teacher = common.build_teacher(cfg.teacher, "cpu")
        emb = common.text_embeddings(teacher, vocab, cfg.teacher)
    segmenter = Segmenter(net, pieces["model_config"], vocab, emb, pieces["clip_model"],
                          config=SegmenterConfig(device=cfg.device, camera_fusion=False))
    reader = reader if reader is not None else build_reader(cfg.data, Path.cwd())
    if cfg.data.indices is not None:
        reader = Subset(reader, cfg.data.indices)
    result = evaluate_segmenter(segmenter, reader, cfg.heads, progress=True)
    summary = summarise(result)
    summary["checkpoint"] = str(cfg.checkpoint)
    summary["checkpoint_kind"] = pieces["kind"]
    summary["annotation_free"] = pieces["kind"] != "finetune" and not pieces["extra"].get("finetuned", False)

    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for h, cm in result["confusion"].items():
        (out / f"iou_{h}.txt").write_text(cm.table(result["class_names"]) + "\n")
        render_confusion_matrix(cm.matrix, result["class_names"], out / f"confusion_{h}.png",
                                iou=cm.iou(), title=f"{Path(cfg.checkpoint).name} ({h} head)")
    (out / "metrics.json").write_text(json.dumps(summary, indent=2))
    if write_checkpoint:
        head = cfg.deploy_head
        extra = {**{k: v for k, v in pieces["extra"].items() if k != "history"},
                 "kind": pieces["kind"], "head": head,
                 "metrics": {h: {"miou": v["miou"]} for h, v in summary["heads"].items()}}
        common.write_deployable(out / "model.pt", pieces["model_config"], net.state_dict(), vocab, emb,
                                pieces["clip_model"], extra)
        summary["deployable"] = str(out / "model.pt")
    return summary


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args(argv)
    try:
        cfg = load_training_config(EvaluateConfig, args.config, args.overrides)
        summary = run(cfg)
    except (Clip2SceneError, FileNotFoundError) as exc:
        log.error("%s", exc)
        return 2
    for h, v in summary["heads"].items():
        log.info("%s head: mIoU %.2f  accuracy %.2f", h, 100 * v["miou"], 100 * v["accuracy"])
    if "deployable" in summary:
        log.info("deployable checkpoint: %s", summary["deployable"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
