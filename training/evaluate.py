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

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from clip2scene_core.cli import TRAINING_LOG_FORMAT, start_cli
from clip2scene_core.errors import Clip2SceneError, ConfigError
from training.engine.config import EvaluateConfig, load_training_config

log = logging.getLogger("clip2scene.evaluate")


def evaluate_segmenter(segmenter, samples: Sequence[Any], heads: Sequence[str] = ("local", "global"),
                       progress: bool = False) -> dict[str, Any]:
    """Confusion matrices of ``segmenter`` on labelled ``samples`` for each head."""
    from tqdm import tqdm

    from clip2scene_core.label_spaces import class_map, remap_labels
    from clip2scene_core.metrics import ConfusionMatrix

    names = list(segmenter.class_names)
    cms = {h: ConfusionMatrix(len(names)) for h in heads}
    used = 0
    for i in tqdm(range(len(samples)), desc="evaluate", disable=not progress):
        sample = samples[i]
        if sample.labels is None:
            continue
        gt = np.asarray(sample.labels, dtype=np.int64)
        gt = remap_labels(gt, class_map(getattr(sample, "class_names", None), names))
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
    start_cli(logging.INFO, TRAINING_LOG_FORMAT)
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
