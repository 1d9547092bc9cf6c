"""Versioned torch files: one way to write, read and check every ``.pt`` file we persist.

Deployable checkpoints (``checkpoint.py``), training states (``training/engine/state.py``) and
text-embedding files (``clip/text_bank.py``) are dicts with a ``format`` name, a ``version``
and a content digest. `save_versioned` writes one atomically (temporary file + rename) with
its header and digest; `load_versioned` reads one with ``weights_only=True`` (loading never
executes pickled code) and checks, in this order: the file exists, torch can read it, the
header names the expected format and version, the required keys are there, the digest
matches. Every failure is a ``CheckpointError`` naming the file, worded the same for every
kind of file (`FileKind.what` says which kind).

Integrity: the digest is a SHA-256 of the whole content (tensor bytes, dtypes, shapes and all
metadata; key ``sha256``), because torch does not check the zip CRC: one flipped byte would
otherwise change a weight silently. Files written before the digest existed load with a
warning (no integrity check). `check_finite` refuses NaN / inf weights when saving and loading.
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .atomic import atomic_torch_save
from .errors import CheckpointError

__all__ = ["DIGEST_KEY", "FileKind", "payload_digest", "seal", "verify_digest",
           "nonfinite_tensors", "check_finite", "save_versioned", "read_torch_file",
           "check_header", "check_versioned", "load_versioned"]

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


# ----------------------------------------------------------------------------- versioned files
@dataclass(frozen=True)
class FileKind:
    """One kind of versioned file: its header and how error messages name it."""

    format: str                         # value of the "format" key
    version: int                        # the one "version" this build reads and writes
    what: str                           # "checkpoint", "training state", ...: names it in errors
    required: tuple[str, ...] = ()      # keys a valid file holds besides format and version


def save_versioned(path: str | Path, kind: FileKind, payload: dict[str, Any]) -> None:
    """Write ``payload`` with ``kind``'s header and a content digest, atomically."""
    atomic_torch_save(seal({"format": kind.format, "version": kind.version, **payload}), path)


def read_torch_file(path: str | Path, what: str, map_location: Any = "cpu") -> Any:
    """``torch.load(path, weights_only=True)``; CheckpointError naming ``path`` when it is
    missing or unreadable (truncated, not a torch file, hostile pickle)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what} not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # the unpickler raises many types on damaged or hostile input
        raise CheckpointError(f"{path}: {what} is corrupt or not a torch file "
                              f"({type(exc).__name__}: {exc})") from exc


def check_header(data: Any, path: str | Path, kind: FileKind) -> dict[str, Any]:
    """``data`` when it is a dict with ``kind``'s format, version and required keys."""
    if not isinstance(data, dict) or data.get("format") != kind.format:
        raise CheckpointError(f"{path}: not a {kind.format} file (a clip2scene {kind.what} "
                              f"starts with format '{kind.format}')")
    version = data.get("version")
    if version != kind.version:
        raise CheckpointError(f"{path}: {kind.what} format version {version!r} is not supported "
                              f"(this build reads version {kind.version})")
    missing = [k for k in kind.required if k not in data]
    if missing:
        raise CheckpointError(f"{path}: {kind.what} lacks {missing}")
    return data


def check_versioned(raw: Any, path: str | Path, kind: FileKind) -> tuple[dict[str, Any], bool]:
    """Check what `read_torch_file` returned as a ``kind`` file (for callers that read once and
    decide the kind from the content): (its dict, whether a content digest was verified)."""
    data = check_header(raw, path, kind)
    return data, verify_digest(data, path, kind.what)


def load_versioned(path: str | Path, kind: FileKind,
                   map_location: Any = "cpu") -> tuple[dict[str, Any], bool]:
    """Read and check a ``kind`` file: (its dict, whether a content digest was verified —
    False for files written before digests existed)."""
    return check_versioned(read_torch_file(path, kind.what, map_location), path, kind)
