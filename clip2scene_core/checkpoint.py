"""Deployable checkpoints: backbone weights + model config + vocabulary + text embeddings.

One versioned file is everything the node, the replay tool and evaluation need, written and
read through `clip2scene_core.versioned` (atomic writes, ``weights_only`` reads, a content
digest verified on load, the same errors as every other versioned file). Weights, text
embeddings and the logit scale must be finite, when saving and when loading.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .config import from_dict, to_dict
from .errors import CheckpointError, ConfigError
# the digest and finiteness helpers keep their historical home here too
from .versioned import (DIGEST_KEY, FileKind, check_finite, load_versioned, nonfinite_tensors,
                        payload_digest, save_versioned, seal, verify_digest)

__all__ = ["CHECKPOINT_FORMAT", "CHECKPOINT_VERSION", "CHECKPOINT_KIND", "Checkpoint",
           "save_checkpoint", "load_checkpoint", "checkpoint_from_data", "DIGEST_KEY", "payload_digest", "seal",
           "verify_digest", "nonfinite_tensors", "check_finite"]

CHECKPOINT_FORMAT = "clip2scene-checkpoint"
CHECKPOINT_VERSION = 1
CHECKPOINT_KIND = FileKind(CHECKPOINT_FORMAT, CHECKPOINT_VERSION, "checkpoint",
                           required=("model_config", "state_dict", "vocabulary",
                                     "text_embeddings", "clip_model"))


def _check_logit_scale(extra: dict[str, Any], where: str, action: str) -> None:
    if "logit_scale" in extra and extra["logit_scale"] is not None:
        v = extra["logit_scale"]
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0
        if not ok:
            raise CheckpointError(f"{where}: logit_scale {v!r} is not a finite positive number; {action}")


@dataclass
class Checkpoint:
    model_config: Any                     # clip2scene_core.models.ModelConfig
    state_dict: dict[str, torch.Tensor]
    vocabulary: Any                       # clip2scene_core.clip.vocabulary.Vocabulary
    text_embeddings: torch.Tensor         # (K, D), L2-normalised, K = len(vocabulary.class_names)
    clip_model: str                       # open_clip model name that produced the embeddings
    extra: dict[str, Any] = field(default_factory=dict)  # plain data: provenance, metrics


def save_checkpoint(path: str | Path, ckpt: Checkpoint) -> None:
    emb = ckpt.text_embeddings.detach().float().cpu()
    names = list(ckpt.vocabulary.class_names)
    if emb.ndim != 2 or emb.shape[0] != len(names):
        raise CheckpointError(
            f"text embeddings {tuple(emb.shape)} do not match the {len(names)} vocabulary classes")
    where = f"{path}"
    check_finite({"weights": ckpt.state_dict, "text_embeddings": emb}, where,
                 "not written (training diverged?)")
    _check_logit_scale(dict(ckpt.extra or {}), where, "not written")
    payload = {
        "model_config": to_dict(ckpt.model_config),
        "state_dict": {k: v.detach().cpu() for k, v in ckpt.state_dict.items()},
        "vocabulary": ckpt.vocabulary.to_dict(),
        "text_embeddings": emb,
        "clip_model": str(ckpt.clip_model),
        "extra": to_dict(ckpt.extra),
    }
    save_versioned(path, CHECKPOINT_KIND, payload)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> Checkpoint:
    """Read and validate a checkpoint; any problem is a CheckpointError naming the file."""
    data, _ = load_versioned(path, CHECKPOINT_KIND, map_location)
    return checkpoint_from_data(data, path)


def checkpoint_from_data(data: dict[str, Any], path: str | Path) -> Checkpoint:
    """Validate a checkpoint's header-checked dict (`load_versioned` / `check_versioned`)."""
    from .clip.vocabulary import Vocabulary
    from .models import ModelConfig

    path = Path(path)
    try:
        model_config = from_dict(ModelConfig, data["model_config"], "model_config")
        vocabulary = Vocabulary.from_dict(data["vocabulary"])
    except (ConfigError, TypeError, KeyError, ValueError) as exc:
        raise CheckpointError(f"{path}: invalid model config or vocabulary: {exc}") from exc
    emb = data["text_embeddings"]
    if not isinstance(emb, torch.Tensor) or emb.ndim != 2 or emb.shape[0] != len(vocabulary.class_names):
        raise CheckpointError(f"{path}: text embeddings do not match the vocabulary")
    if emb.shape[1] != model_config.embed_dim:
        raise CheckpointError(
            f"{path}: text embeddings have dimension {emb.shape[1]} but the model's heads output "
            f"{model_config.embed_dim}")
    state = data["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: state_dict is not a mapping of tensors")
    extra = data.get("extra") or {}
    if not isinstance(extra, dict):
        raise CheckpointError(f"{path}: 'extra' is not a mapping")
    check_finite({"weights": state, "text_embeddings": emb}, str(path), "refused")
    _check_logit_scale(extra, str(path), "refused")
    return Checkpoint(model_config=model_config, state_dict=data["state_dict"], vocabulary=vocabulary,
                      text_embeddings=emb.float(), clip_model=data["clip_model"],
                      extra=dict(extra))
