"""Pieces the three CLIs share: vocabulary, teacher + text embeddings, the teacher pass,
loading a pre-trained network, writing the deployable checkpoint."""
from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from clip2scene_core.checkpoint import CHECKPOINT_KIND, Checkpoint, checkpoint_from_data, save_checkpoint
from clip2scene_core.config import from_dict, to_dict
from clip2scene_core.errors import CheckpointError, ConfigError
from clip2scene_core.versioned import check_versioned, read_torch_file

from .config import RunConfig, TeacherConfig, VocabConfig
from .data import Subset
from .distributed import DistInfo, all_reduce_sum, barrier, cleanup, init_distributed
from .state import STATE_FORMAT, check_state, determinism_state, restore_determinism
from .teacher_cache import TeacherAgreement, TeacherCache, open_cache, teacher_identity

log = logging.getLogger("clip2scene.training")


@contextmanager
def training_run(run: RunConfig) -> Iterator[DistInfo]:
    """CPU threads, the process group (torchrun) and torch's determinism flags for one run;
    the flags are restored and the group left however the run ends."""
    if run.num_threads:
        torch.set_num_threads(run.num_threads)
    dist = init_distributed(run.device)
    previous = determinism_state()
    try:
        yield dist
    finally:
        restore_determinism(previous)
        cleanup(dist)


def build_vocabulary(cfg: VocabConfig):
    from clip2scene_core.clip.vocabulary import Vocabulary

    if cfg.names:
        return Vocabulary.from_names(cfg.names)
    if cfg.preset:   # `vocabulary.prompts`: the preset's synonym lists, or bare class names
        return Vocabulary.preset(cfg.preset).with_prompts(cfg.prompts)
    raise ConfigError("vocabulary: give a preset or a list of names")


def build_teacher(cfg: TeacherConfig, device: torch.device | str = "cpu"):
    """The frozen CLIP teacher: real weights, or a small random tower for demos/tests."""
    from clip2scene_core.clip import ClipTeacher, KeySmoothing, PreprocessConfig

    pre = from_dict(PreprocessConfig, dict(cfg.preprocess), "teacher.preprocess")
    smooth = from_dict(KeySmoothing, dict(cfg.key_smoothing), "teacher.key_smoothing")
    if cfg.random_init:
        return ClipTeacher.from_config(dict(cfg.model_cfg), device=device, model_name=cfg.model_name,
                                       seed=cfg.seed, preprocess=pre, key_smoothing=smooth)
    return ClipTeacher.from_pretrained(cfg.model_name, cfg.weights, device=device, preprocess=pre,
                                       key_smoothing=smooth)


def text_embeddings(teacher, vocab, cfg: TeacherConfig) -> torch.Tensor:
    """(K, D) normalised class embeddings of ``vocab`` from any teacher (``Teacher2D``)."""
    from clip2scene_core.teachers import TeacherError

    emb = teacher.text_embeddings(vocab, cfg.templates, cache_dir=cfg.text_cache_dir)
    emb = torch.as_tensor(emb)
    if emb.ndim != 2 or emb.shape[0] != len(vocab.class_names):
        raise TeacherError(f"teacher {getattr(teacher, 'model_name', type(teacher).__name__)}: text_embeddings "
                           f"gave shape {tuple(emb.shape)} for {len(vocab.class_names)} classes; expected (K, D)")
    return F.normalize(emb.detach().float().cpu(), dim=1)


def clip_model_name(teacher: Any, cfg: TeacherConfig) -> str:
    return str(getattr(teacher, "model_name", cfg.model_name))


def make_cache(teacher: Any, cfg: TeacherConfig) -> TeacherCache:
    """The content-addressed cache of ``teacher`` (identity by content, see teacher_cache);
    ``cfg.prompt_denoising`` denoises its pseudo-labels (and is part of its keys when set)."""
    return open_cache(teacher, cfg.cache_dir, cfg.min_depth, cfg.prompt_denoising)


def run_teacher_pass(reader: Sequence[Any], teacher: Any, cache: TeacherCache, text_emb: torch.Tensor,
                     dist: DistInfo, num_workers: int = 0, progress: bool = True,
                     agreement: TeacherAgreement | None = None) -> dict[str, int]:
    """Fill the cache (each rank a shard of the samples), then wait for all ranks. With
    ``agreement`` the pseudo-labels are scored against the 3D labels (summed over ranks)."""
    mine = list(range(dist.rank, len(reader), dist.world_size))
    sub = Subset(reader, mine)
    loader = torch.utils.data.DataLoader(sub, batch_size=None, shuffle=False, num_workers=num_workers,
                                         collate_fn=lambda s: s)
    if dist.is_main:
        cache.write_manifest(teacher_identity(teacher)[1])
    stats = cache.build(loader, teacher, text_emb, total=len(sub), progress=progress and dist.is_main,
                        agreement=agreement)
    if agreement is not None and dist.distributed:
        cm = agreement.confusion
        both = torch.from_numpy(np.concatenate([cm.matrix.reshape(-1), cm.missed])).to(dist.device)
        both = all_reduce_sum(both, dist).cpu().numpy()          # NCCL reduces device tensors only
        k = cm.num_classes
        cm.matrix[...] = both[:k * k].reshape(k, k)
        cm.missed[...] = both[k * k:]
    barrier(dist)
    return stats


# ----------------------------------------------------------------------------- loading
def read_any_checkpoint(path: str | Path) -> dict[str, Any]:
    """A training state (``last.pt``) or a deployable checkpoint → plain pieces:
    ``model_config`` (ModelConfig), ``net_state`` (backbone+heads), ``vocabulary``,
    ``text_embeddings`` (K, D), ``clip_model``, ``kind``, ``extra``."""
    from clip2scene_core.clip.vocabulary import Vocabulary
    from clip2scene_core.models import ModelConfig

    path = Path(path)
    raw = read_torch_file(path, "checkpoint")
    if isinstance(raw, dict) and raw.get("format") == STATE_FORMAT:
        st = check_state(raw, path)            # digest, version, finite weights
        try:
            model_state = st["model"]
            emb = st["text_embeddings"]
            if st.get("kind") == "finetune":
                net_state = {k[4:]: v for k, v in model_state.items() if k.startswith("net.")}
                if "text" in model_state:
                    emb = model_state["text"]
            else:
                net_state = model_state
            return {"model_config": from_dict(ModelConfig, st["model_config"], "model_config"),
                    "net_state": net_state, "vocabulary": Vocabulary.from_dict(st["vocabulary"]),
                    "text_embeddings": F.normalize(emb.float(), dim=1), "clip_model": st.get("clip_model", ""),
                    "kind": st.get("kind"), "extra": {"epoch": st.get("epoch"), "history": st.get("history", [])}}
        except (KeyError, TypeError, AttributeError, ValueError) as exc:
            raise CheckpointError(f"{path}: training state lacks or garbles {exc}") from exc
    ck = checkpoint_from_data(check_versioned(raw, path, CHECKPOINT_KIND)[0], path)   # read once
    return {"model_config": ck.model_config, "net_state": ck.state_dict, "vocabulary": ck.vocabulary,
            "text_embeddings": ck.text_embeddings, "clip_model": ck.clip_model,
            "kind": ck.extra.get("kind", "deployable"), "extra": dict(ck.extra)}


def load_net_state(net: torch.nn.Module, state: dict[str, torch.Tensor], path: str | Path) -> None:
    """``net.load_state_dict(state)``; a CheckpointError naming ``path`` when it does not fit."""
    try:
        net.load_state_dict(state, strict=True)
    except (RuntimeError, TypeError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path}: the saved weights do not fit its model config: {first}") from exc


def write_deployable(path: str | Path, model_config, net_state: dict[str, torch.Tensor], vocabulary,
                     text_emb: torch.Tensor, clip_model: str, extra: dict[str, Any]) -> Path:
    """The one-file checkpoint the node, the replay tool and evaluation load."""
    ck = Checkpoint(model_config=model_config, state_dict={k: v.detach().cpu() for k, v in net_state.items()},
                    vocabulary=vocabulary, text_embeddings=F.normalize(text_emb.detach().float().cpu(), dim=1),
                    clip_model=clip_model, extra=to_dict(extra))
    save_checkpoint(path, ck)
    return Path(path)


def repo_root() -> Path:
    return Path(__file__).resolve().parents[2]
