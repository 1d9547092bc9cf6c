"""Deployable checkpoints: backbone weights + model config + vocabulary + text embeddings.

One versioned file is everything the node, the replay tool and evaluation need. Files are
written atomically (temporary file + rename) so a crash never leaves a half-written
checkpoint, and read with ``weights_only=True`` so loading never executes pickled code.
"""
from __future__ import annotations

import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .atomic import atomic_torch_save
from .config import from_dict, to_dict
from .errors import CheckpointError, ConfigError

CHECKPOINT_FORMAT = "clip2scene-checkpoint"
CHECKPOINT_VERSION = 1


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
    payload = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "model_config": to_dict(ckpt.model_config),
        "state_dict": {k: v.detach().cpu() for k, v in ckpt.state_dict.items()},
        "vocabulary": ckpt.vocabulary.to_dict(),
        "text_embeddings": emb,
        "clip_model": str(ckpt.clip_model),
        "extra": to_dict(ckpt.extra),
    }
    atomic_torch_save(payload, path)


def _read(path: Path, map_location: str | torch.device) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        data = torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError, KeyError) as exc:
        raise CheckpointError(f"checkpoint {path} is corrupt or not a torch file: {exc}") from exc
    except Exception as exc:  # the unpickler raises many types on hostile/garbled input
        raise CheckpointError(f"checkpoint {path} cannot be read safely: {exc}") from exc
    if not isinstance(data, dict) or data.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a clip2scene checkpoint (no '{CHECKPOINT_FORMAT}' header)")
    version = data.get("version")
    if version != CHECKPOINT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format version {version} is not supported (this build reads "
            f"version {CHECKPOINT_VERSION})")
    missing = [k for k in ("model_config", "state_dict", "vocabulary", "text_embeddings", "clip_model")
               if k not in data]
    if missing:
        raise CheckpointError(f"{path}: checkpoint lacks {missing}")
    return data


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> Checkpoint:
    """Read and validate a checkpoint; any problem is a CheckpointError naming the file."""
    from .clip.vocabulary import Vocabulary
    from .models import ModelConfig

    path = Path(path)
    data = _read(path, map_location)
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
    return Checkpoint(model_config=model_config, state_dict=data["state_dict"], vocabulary=vocabulary,
                      text_embeddings=emb.float(), clip_model=data["clip_model"],
                      extra=dict(data.get("extra") or {}))
