#!/usr/bin/env python3
"""CLIP2Scene pre-training: 2D teacher pass (cached), then SCR + SSR on the 3D network.

    python training/pretrain.py --config config/pretrain_demo.yaml
    python training/pretrain.py --config config/pretrain_nuscenes.yaml --resume
    torchrun --nproc_per_node=8 training/pretrain.py --config config/pretrain_nuscenes.yaml
    torchrun --nnodes=2 --node_rank=0 --master_addr=host0 --nproc_per_node=8 training/pretrain.py ...

Writes ``<out_dir>/last.pt`` (resume state, every epoch and on SIGTERM), ``<out_dir>/tb``
(TensorBoard), ``<out_dir>/initial.pt`` (the untrained starting weights, deployable, for
baselines) and ``<out_dir>/model.pt`` (deployable checkpoint for the node / replay).
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch

from clip2scene_core.cli import TRAINING_LOG_FORMAT, start_cli
from clip2scene_core.config import to_dict
from clip2scene_core.errors import Clip2SceneError, ConfigError
from training.engine.config import PretrainConfig, load_training_config

log = logging.getLogger("clip2scene.pretrain")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="YAML file (config/pretrain_*.yaml)")
    p.add_argument("--resume", action="store_true",
                   help="continue from <out_dir>/last.pt (refused when the model or settings differ; "
                        "starts from scratch, with a warning, when there is no state yet)")
    p.add_argument("--force-resume", action="store_true",
                   help="--resume even though optimiser/loss/data settings changed (same model only)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set optim.epochs=2 (repeatable)")
    p.add_argument("--teacher-only", action="store_true", help="fill the teacher cache and stop")
    return p.parse_args(argv)


def run(cfg: PretrainConfig, resume: bool = False, teacher_only: bool = False, *, reader=None,
        teacher=None, force_resume: bool = False) -> dict:
    """Teacher pass + training; returns what a caller needs to evaluate.

    ``reader`` (a ``Sequence[Sample]``) and ``teacher`` (any ``clip2scene_core.teachers.Teacher2D``:
    ``ClipTeacher``, ``LabelImageTeacher``, ``StoredPredictionTeacher``, your own; an older
    object with only ``pixel_features(image, uv)`` + ``text_embeddings`` is wrapped by
    ``as_teacher``) replace the configured ones when given.

    Returns ``teacher`` (pass counts), ``teacher_agreement`` (``{"points", "accuracy", "miou"}``
    of the pseudo-labels against the 3D labels on the training points the cameras see, None
    without labels), ``teacher_cache`` (a ``TeacherCache``: ``pseudo_labels(sample, text_emb)``,
    ``load_sample``), ``text_embeddings``, and after training ``history``, ``steps``, ``state``
    (resume file), ``checkpoint`` (deployable, trained) and ``initial_checkpoint`` (deployable,
    the untrained starting weights: the baseline of any evaluation).
    """
    from clip2scene_core.models import build_model
    from clip2scene_core.teachers import as_teacher
    from training.engine import common
    from training.engine.data import Subset, TrainDataset, build_reader, with_sweeps_in_cameras
    from training.engine.distributed import unwrap, wrap_ddp
    from training.engine.loop import Trainer, build_sgd
    from training.engine.objectives import PretrainObjective
    from training.engine.state import seed_everything
    from training.engine.config import validate_config
    from training.engine.teacher_cache import TeacherAgreement

    validate_config(cfg)
    resume = resume or force_resume
    with common.training_run(cfg.run) as dist:
        seed_everything(cfg.run.seed, cfg.run.deterministic)
        vocab = common.build_vocabulary(cfg.vocabulary)
        reader = reader if reader is not None else build_reader(cfg.data, Path.cwd())
        # a reader given by the caller gets the same sweep marking build_reader applies
        reader = with_sweeps_in_cameras(reader, cfg.data)
        if cfg.data.indices is not None:
            reader = Subset(reader, cfg.data.indices)

        # 1. teacher pass (the 2D teacher once per image), then the teacher leaves the GPU
        tdev = dist.device if cfg.teacher.device == "auto" else cfg.teacher.device
        teacher = as_teacher(teacher if teacher is not None else common.build_teacher(cfg.teacher, tdev))
        text_emb = common.text_embeddings(teacher, vocab, cfg.teacher)
        if text_emb.shape[1] != cfg.model.embed_dim:
            raise ConfigError(f"model.embed_dim={cfg.model.embed_dim} but the teacher's embeddings have "
                              f"{text_emb.shape[1]} dimensions")
        cache = common.make_cache(teacher, cfg.teacher)
        agreement = TeacherAgreement(vocab.class_names)
        stats = common.run_teacher_pass(reader, teacher, cache, text_emb, dist, cfg.run.num_workers,
                                        cfg.run.progress, agreement)
        clip_model = common.clip_model_name(teacher, cfg.teacher)
        del teacher
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        agree = agreement.summary()
        if dist.is_main:
            log.info("teacher pass: %s; pseudo-labels vs 3D labels: %s", stats, agree)
        teacher_out = {"teacher": stats, "teacher_agreement": agree, "teacher_cache": cache,
                       "text_embeddings": text_emb}
        if teacher_only:
            return teacher_out

        # 2. 3D network
        seed_everything(cfg.run.seed, cfg.run.deterministic)   # same init whatever the teacher drew
        net = build_model(cfg.model).to(dist.device)
        initial = Path(cfg.run.out_dir) / "initial.pt"
        if dist.is_main and not (resume and initial.is_file()):
            common.write_deployable(initial, cfg.model, net.state_dict(), vocab, text_emb, clip_model,
                                    {"kind": "pretrain", "epochs": 0, "steps": 0, "head": "local",
                                     "untrained": True})
        model = wrap_ddp(net, dist)
        optimizer = build_sgd(model.parameters(), cfg.optim)
        dataset = TrainDataset(reader, cfg.data, cfg.run.seed, cfg.model.embed_dim, cache, text_emb, augment=True)
        payload = lambda: {"config": to_dict(cfg), "model_config": to_dict(cfg.model),  # noqa: E731
                           "vocabulary": vocab.to_dict(), "text_embeddings": text_emb,
                           "clip_model": clip_model, "teacher_id": cache.teacher_id,
                           "num_samples": len(dataset)}
        trainer = Trainer(model=model, optimizer=optimizer, step_fn=PretrainObjective(cfg.loss, text_emb),
                          dataset=dataset, voxel_cfg=cfg.model.voxel, optim=cfg.optim, run=cfg.run, dist=dist,
                          kind="pretrain", payload=payload)
        if resume and trainer.resume(force=force_resume):
            log.info("resumed at epoch %d step %d", trainer.epoch, trainer.step_in_epoch)
        result = trainer.fit()
        deploy = Path(cfg.run.out_dir) / "model.pt"
        if dist.is_main:
            common.write_deployable(deploy, cfg.model, unwrap(model).state_dict(), vocab, text_emb, clip_model,
                                    {"kind": "pretrain", "epochs": cfg.optim.epochs, "steps": trainer.global_step,
                                     "history": result.history, "head": "local",
                                     "teacher_agreement": agree or {}})
        return {**teacher_out, "history": result.history, "steps": trainer.global_step,
                "state": str(trainer.state_path), "checkpoint": str(deploy), "initial_checkpoint": str(initial)}


def main(argv=None) -> int:
    start_cli(logging.INFO, TRAINING_LOG_FORMAT)
    args = parse_args(argv)
    try:
        cfg = load_training_config(PretrainConfig, args.config, args.overrides)
        out = run(cfg, resume=args.resume, teacher_only=args.teacher_only, force_resume=args.force_resume)
    except (Clip2SceneError, FileNotFoundError) as exc:
        log.error("%s", exc)
        return 2
    if out.get("history"):
        last = out["history"][-1]
        log.info("done: %s", {k: round(v, 4) for k, v in last.items()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
