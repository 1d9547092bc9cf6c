"""Deployable checkpoints: backbone weights + model config + vocabulary + text embeddings.

One versioned file is everything the node, the replay tool and evaluation need. Files are
written atomically (temporary file + rename) so a crash never leaves a half-written
checkpoint, and read with ``weights_only=True`` so loading never executes pickled code.

Integrity: every file carries a SHA-256 of its whole content (tensor bytes, dtypes, shapes
and all metadata; key ``sha256``), verified on load, because torch does not check the zip
CRC: one flipped byte would otherwise change a weight silently. Files written before the
digest existed load with a warning (no integrity check). Weights, text embeddings and the
logit scale must be finite, when saving and when loading. Training state files
(``training/engine/state.py``) and text-embedding files (``clip/text_bank.py``) use the same
digest.
"""
from __future__ import annotations

import hashlib
import logging
import math
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
#: key of the content digest inside checkpoints, training states and text-embedding files
DIGEST_KEY = "sha256"

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- content digest
def _feed(h: "hashlib._Hash", obj: Any) -> None:
    """Feed one value into ``h`` in a canonical, type-tagged, length-prefixed form."""
    def put(tag: bytes, data: bytes | memoryview) -> None:
        h.update(tag)
        h.update(memoryview(data).nbytes.to_bytes(8, "little"))
        h.update(data)

    if isinstance(obj, torch.Tensor):
        t = obj.detach()
        if t.layout != torch.strided:
            t = t.to_dense()
        t = t.cpu().contiguous()
        put(b"T", f"{t.dtype}|{tuple(t.shape)}".encode())
        put(b"t", memoryview(t.reshape(-1).view(torch.uint8).numpy()) if t.numel() else b"")
    elif isinstance(obj, dict):
        items = sorted(obj.items(), key=lambda kv: (type(kv[0]).__name__, repr(kv[0])))
        put(b"D", str(len(items)).encode())
        for k, v in items:
            _feed(h, k)
            _feed(h, v)
    elif isinstance(obj, (list, tuple)):
        put(b"L", str(len(obj)).encode())
        for v in obj:
            _feed(h, v)
    elif obj is None:
        put(b"N", b"")
    elif isinstance(obj, bool):
        put(b"b", b"1" if obj else b"0")
    elif isinstance(obj, int):
        put(b"I", str(int(obj)).encode())
    elif isinstance(obj, float):
        put(b"F", float(obj).hex().encode())
    elif isinstance(obj, str):
        put(b"S", obj.encode("utf-8", "surrogatepass"))
    elif isinstance(obj, (bytes, bytearray)):
        put(b"B", bytes(obj))
    else:                                   # torch.dtype, torch.device, ...: their repr is stable
        put(b"O", f"{type(obj).__module__}.{type(obj).__qualname__}:{obj!r}".encode())


def payload_digest(payload: dict[str, Any]) -> str:
    """SHA-256 (hex) of everything in ``payload`` except its own ``DIGEST_KEY`` entry."""
    h = hashlib.sha256()
    _feed(h, {k: v for k, v in payload.items() if k != DIGEST_KEY})
    return h.hexdigest()


def seal(payload: dict[str, Any]) -> dict[str, Any]:
    """``payload`` plus its content digest (what is written to disk)."""
    return {**{k: v for k, v in payload.items() if k != DIGEST_KEY}, DIGEST_KEY: payload_digest(payload)}


_warned_legacy: set[str] = set()


def verify_digest(data: dict[str, Any], path: str | Path, what: str = "checkpoint") -> bool:
    """Check the stored content digest; CheckpointError naming ``path`` on a mismatch.

    Returns False (after one warning per file) for files written before digests existed."""
    stored = data.get(DIGEST_KEY)
    if stored is None:
        key = str(path)
        if key not in _warned_legacy:
            _warned_legacy.add(key)
            log.warning("%s: %s has no content digest (written by an older version): loaded without "
                        "an integrity check; save it again to add one", path, what)
        return False
    actual = payload_digest(data)
    if not isinstance(stored, str) or stored != actual:
        raise CheckpointError(
            f"{path}: {what} is damaged or was modified after it was written: its content digest "
            f"does not match (stored sha256 {str(stored)[:16]}..., content {actual[:16]}...)")
    return True


# ----------------------------------------------------------------------------- finiteness
def nonfinite_tensors(tensors: dict[str, Any], prefix: str = "") -> list[str]:
    """Names (``prefix`` + key, with the count of bad values) of floating tensors holding
    NaN or inf; nested dicts are walked."""
    bad: list[str] = []
    for k, v in tensors.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict):
            bad.extend(nonfinite_tensors(v, f"{name}."))
        elif isinstance(v, torch.Tensor) and (v.is_floating_point() or v.is_complex()):
            n = int((~torch.isfinite(v.detach())).sum())
            if n:
                bad.append(f"{name} ({n} of {v.numel()} values)")
    return bad


def _describe(bad: list[str], limit: int = 5) -> str:
    more = f" and {len(bad) - limit} more" if len(bad) > limit else ""
    return ", ".join(bad[:limit]) + more


def check_finite(tensors: dict[str, Any], where: str, action: str = "refused") -> None:
    """CheckpointError naming every tensor of ``tensors`` that holds NaN or inf."""
    bad = nonfinite_tensors(tensors)
    if bad:
        raise CheckpointError(f"{where}: non-finite values (NaN/inf) in {_describe(bad)}; {action}")


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
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "model_config": to_dict(ckpt.model_config),
        "state_dict": {k: v.detach().cpu() for k, v in ckpt.state_dict.items()},
        "vocabulary": ckpt.vocabulary.to_dict(),
        "text_embeddings": emb,
        "clip_model": str(ckpt.clip_model),
        "extra": to_dict(ckpt.extra),
    }
    atomic_torch_save(seal(payload), path)


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
    verify_digest(data, path, "checkpoint")
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
