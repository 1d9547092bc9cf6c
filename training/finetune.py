#!/usr/bin/env python3
"""Fine-tune a pre-trained CLIP2Scene network with a fraction of the labelled scenes.

    python training/finetune.py --config config/finetune_demo.yaml
    python training/finetune.py --config config/finetune.yaml --set label_fraction=0.01 \\
        --set pretrained=runs/pretrain/model.pt
    torchrun --nproc_per_node=8 training/finetune.py --config config/finetune.yaml

Labels of a random ``label_fraction`` of the *scenes* are used (CLIP2Scene's 1 %, 5 %, …
protocol). Loss: cross-entropy + Lovász-softmax on logits = scale · cos(local head, class
embedding); the class embeddings start from the CLIP text embeddings and are fine-tuned too,
so the result is a deployable checkpoint the node runs unchanged (``<out_dir>/model.pt``).
Resume state, SIGTERM handling and TensorBoard as in pre-training.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from clip2scene_core.cli import TRAINING_LOG_FORMAT, start_cli
from clip2scene_core.config import to_dict
from clip2scene_core.errors import Clip2SceneError, ConfigError
from training.engine.config import FinetuneConfig, load_training_config

log = logging.getLogger("clip2scene.finetune")


@torch.no_grad()
def evaluate_model(model: torch.nn.Module, dataset, voxel_cfg, num_classes: int, device) -> "Any":
    """Confusion matrix of a SegmentationModel on a labelled (un-augmented) dataset."""
    from clip2scene_core.metrics import ConfusionMatrix
    from clip2scene_core.models import VoxelBatch
    from training.engine.data import collate_prepared

    cm = ConfusionMatrix(num_classes)
    was = model.training
    model.eval()
    for i in range(len(dataset)):
        prep = dataset[i]
        batch = collate_prepared([prep], voxel_cfg).to(device)
        logits, _ = model(VoxelBatch.from_voxels(batch.voxels, device))
        key = batch.is_key
        pred = np.full(batch.num_original[0], -1, np.int64)
        gt = np.full(batch.num_original[0], -1, np.int64)
        gt[prep.point_index] = prep.gt
        pred[batch.point_index[key].cpu().numpy()] = logits[key].argmax(1).cpu().numpy()
        sel = np.zeros(batch.num_original[0], bool)
        sel[prep.point_index] = True
        cm.update(pred[sel], gt[sel])
    model.train(was)
    return cm


def run(cfg: FinetuneConfig, resume: bool = False, *, reader=None, val_reader=None,
        force_resume: bool = False) -> dict[str, Any]:
    """Fine-tune (see the module doc). Settings are validated first; ``resume`` refuses a state
    of another model or other settings (``force_resume``: accept other settings); a NaN/inf
    loss stops training with ``NonFiniteLossError``, leaving the last good state in place."""
    from clip2scene_core.label_spaces import class_map
    from clip2scene_core.models import build_model
    from training.engine import common
    from training.engine.data import Subset, TrainDataset, build_reader, sample_scenes, scene_subsample
    from training.engine.distributed import unwrap, wrap_ddp
    from training.engine.loop import Trainer, build_sgd
    from training.engine.objectives import FinetuneObjective, SegmentationModel
    from training.engine.state import seed_everything
    from training.engine.config import validate_config

    validate_config(cfg)
    resume = resume or force_resume
    with common.training_run(cfg.run) as dist:
        seed_everything(cfg.run.seed, cfg.run.deterministic)
        # --- the network and its classifier
        if cfg.pretrained:
            pieces = common.read_any_checkpoint(cfg.pretrained)
            model_cfg = pieces["model_config"]
            net = build_model(model_cfg)
            common.load_net_state(net, pieces["net_state"], cfg.pretrained)
            vocab, text_emb, clip_model = pieces["vocabulary"], pieces["text_embeddings"], pieces["clip_model"]
        else:
            model_cfg = cfg.model
            net = build_model(model_cfg)
            vocab, text_emb, clip_model = common.build_vocabulary(cfg.vocabulary), None, cfg.teacher.model_name
        teacher_configured = cfg.teacher.random_init or cfg.teacher.weights is not None
        if cfg.text_init == "teacher" or (text_emb is None and cfg.text_init == "checkpoint" and teacher_configured):
            vocab = common.build_vocabulary(cfg.vocabulary)
            teacher = common.build_teacher(cfg.teacher, "cpu")
            text_emb = common.text_embeddings(teacher, vocab, cfg.teacher)
            clip_model = common.clip_model_name(teacher, cfg.teacher)
            del teacher
        if text_emb is None or cfg.text_init == "random":   # supervised baseline without CLIP
            g = torch.Generator().manual_seed(cfg.run.seed)
            text_emb = F.normalize(torch.randn(len(vocab.class_names), model_cfg.embed_dim, generator=g), dim=1)
        if text_emb.shape != (len(vocab.class_names), model_cfg.embed_dim):
            raise ConfigError(f"class embeddings {tuple(text_emb.shape)} do not fit {len(vocab.class_names)} "
                              f"classes × embed_dim {model_cfg.embed_dim}")
        model = SegmentationModel(net, text_emb, cfg.loss.logit_scale, cfg.loss.learn_text).to(dist.device)

        # --- labelled scenes
        reader = reader if reader is not None else build_reader(cfg.data, Path.cwd())
        if cfg.data.indices is not None:
            reader = Subset(reader, cfg.data.indices)
        scenes = sample_scenes(reader)
        keep = scene_subsample(scenes, cfg.label_fraction, cfg.split_seed)
        reader = Subset(reader, keep)
        scenes_used = sorted({scenes[i] for i in keep})
        first = reader[0]
        lmap = class_map(getattr(first, "class_names", None), vocab.class_names)
        dataset = TrainDataset(reader, cfg.data, cfg.run.seed, model_cfg.embed_dim, None, None,
                               augment=True, need_labels=True, label_map=lmap)
        val = None
        if cfg.val_data is not None or val_reader is not None:
            vr = val_reader if val_reader is not None else build_reader(cfg.val_data, Path.cwd())
            vcfg = cfg.val_data or cfg.data
            if vcfg.indices is not None and val_reader is None:
                vr = Subset(vr, vcfg.indices)
            val = TrainDataset(vr, vcfg, cfg.run.seed, model_cfg.embed_dim, None, None, augment=False,
                               need_labels=True, label_map=lmap)

        ddp_model = wrap_ddp(model, dist)
        optimizer = build_sgd(ddp_model.parameters(), cfg.optim)

        def epoch_end(epoch: int) -> dict[str, float]:
            if val is None or not dist.is_main:
                return {}
            cm = evaluate_model(unwrap(ddp_model), val, model_cfg.voxel, len(vocab.class_names), dist.device)
            return {"val_miou": cm.miou(), "val_accuracy": cm.accuracy()}

        payload = lambda: {"config": to_dict(cfg), "model_config": to_dict(model_cfg),  # noqa: E731
                           "vocabulary": vocab.to_dict(), "text_embeddings": text_emb, "clip_model": clip_model,
                           "label_fraction": cfg.label_fraction, "scenes_used": scenes_used,
                           "num_samples": len(dataset)}
        trainer = Trainer(model=ddp_model, optimizer=optimizer, step_fn=FinetuneObjective(cfg.loss),
                          dataset=dataset, voxel_cfg=model_cfg.voxel, optim=cfg.optim, run=cfg.run, dist=dist,
                          kind="finetune", payload=payload, epoch_end=epoch_end)
        if resume and trainer.resume(force=force_resume):
            log.info("resumed at epoch %d step %d", trainer.epoch, trainer.step_in_epoch)
        result = trainer.fit()
        deploy = Path(cfg.run.out_dir) / "model.pt"
        if dist.is_main:
            m = unwrap(ddp_model)
            common.write_deployable(deploy, model_cfg, m.net.state_dict(), vocab, m.class_embeddings(), clip_model,
                                    {"kind": "finetune", "finetuned": True, "label_fraction": cfg.label_fraction,
                                     "samples_used": len(reader), "scenes_used": scenes_used,
                                     "history": result.history, "head": "local",
                                     "logit_scale": cfg.loss.logit_scale})
        return {"history": result.history, "state": str(trainer.state_path), "checkpoint": str(deploy),
                "samples_used": len(reader), "scenes_used": scenes_used}


def main(argv=None) -> int:
    start_cli(logging.INFO, TRAINING_LOG_FORMAT)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True)
    p.add_argument("--resume", action="store_true",
                   help="continue from <out_dir>/last.pt (refused when the model or settings differ; "
                        "starts from scratch, with a warning, when there is no state yet)")
    p.add_argument("--force-resume", action="store_true",
                   help="--resume even though optimiser/loss/data settings changed (same model only)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args(argv)
    try:
        cfg = load_training_config(FinetuneConfig, args.config, args.overrides)
        out = run(cfg, resume=args.resume, force_resume=args.force_resume)
    except (Clip2SceneError, FileNotFoundError) as exc:
        log.error("%s", exc)
        return 2
    if out["history"]:
        log.info("done: %s", {k: round(v, 4) for k, v in out["history"][-1].items()})
    log.info("deployable checkpoint: %s", out["checkpoint"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
