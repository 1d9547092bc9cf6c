"""Crash-safe file writes: write a temporary file beside the target, fsync, rename over it.

Checkpoints, training state, teacher-cache entries and text-embedding files all go through
here, so a crash or SIGKILL mid-write leaves either the old file or the new one, never a
torn one. A write that fails (disk full, file size limit, no permission, the parent is a
file) is one ``WriteError`` naming the path and saying that the previous file is intact.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable

import torch

from .errors import Clip2SceneError

#: what torch's zip writer says when the underlying write fails (ENOSPC/EFBIG are not passed on)
_TORCH_WRITE_FAILURES = ("unexpected pos", "PytorchStreamWriter", "file write failed", "inline_container")


class WriteError(Clip2SceneError, OSError):
    """A file could not be written (disk full, size limit, permissions); the target is unchanged."""


def _free_space(folder: Path) -> str:
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return ""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if free < 1024 or unit == "TB":
            return f"{free:.0f} {unit}" if unit == "B" else f"{free:.1f} {unit}"
        free /= 1024
    return ""


def _write_error(path: Path, exc: BaseException, existed: bool) -> WriteError:
    if isinstance(exc, OSError):
        reason = exc.strerror or str(exc) or type(exc).__name__
    else:
        reason = "the write failed"
    free = _free_space(path.parent) if path.parent.is_dir() else ""
    hint = f" ({free} free on that file system; disk full?)" if free else ""
    kept = f"the previous {path.name} is intact" if existed else f"no {path.name} was written"
    return WriteError(f"cannot write {path}: {reason}{hint}; {kept}")


def atomic_write(path: str | Path, write: Callable[[BinaryIO], None], mode: int = 0o644) -> Path:
    """Call ``write(fh)`` on a temporary file, then atomically replace ``path`` with it.

    ``mode`` is applied because mkstemp creates 0600 files and caches may be shared.
    """
    path = Path(path)
    existed = path.is_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise _write_error(path, exc, existed) from exc
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            if os.path.exists(tmp):
                os.unlink(tmp)
        except OSError:
            pass
        if isinstance(exc, WriteError):
            raise
        if isinstance(exc, OSError) or (isinstance(exc, RuntimeError)
                                        and any(m in str(exc) for m in _TORCH_WRITE_FAILURES)):
            raise _write_error(path, exc, existed) from exc
        raise
    return path


def atomic_torch_save(obj: Any, path: str | Path) -> Path:
    """``torch.save`` through :func:`atomic_write`."""
    return atomic_write(path, lambda fh: torch.save(obj, fh))
