"""Training resume state: seeding, RNG capture/restore, atomic state files, SIGTERM.

The state file (``<out_dir>/last.pt``) is training's own (optimizer, epoch, step, RNG); the
deployable checkpoint for the node is written separately with
``clip2scene_core.checkpoint.save_checkpoint``. Everything is stored as tensors and plain
Python so it loads with ``weights_only=True``. A state file carries a SHA-256 of its content
(verified on load, as checkpoints do) and is never written with non-finite weights.
"""
from __future__ import annotations

import os
import random
import signal
from pathlib import Path
from typing import Any

import numpy as np
import torch

from clip2scene_core.versioned import (FileKind, check_finite, check_header, load_versioned,
                                       save_versioned, verify_digest)

STATE_FORMAT = "clip2scene-train-state"
STATE_VERSION = 1
STATE_KIND = FileKind(STATE_FORMAT, STATE_VERSION, "training state")


def seed_everything(seed: int, deterministic: bool = True) -> None:
    """Seed python, numpy and torch; ask for deterministic kernels (bitwise resume on CPU)."""
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True


def restore_determinism(previous: tuple[bool, bool]) -> None:
    """Undo ``seed_everything``'s global switch (``run`` may be called inside a larger program)."""
    torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])


def determinism_state() -> tuple[bool, bool]:
    return (torch.are_deterministic_algorithms_enabled(),
            torch.is_deterministic_algorithms_warn_only_enabled())


def capture_rng(generators: dict[str, torch.Generator] | None = None) -> dict[str, Any]:
    py = random.getstate()
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], torch.from_numpy(np.asarray(np_state[1]).astype(np.int64)),
                  int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "generators": {k: g.get_state() for k, g in (generators or {}).items()},
    }
    return state


def restore_rng(state: dict[str, Any], generators: dict[str, torch.Generator] | None = None) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and state.get("cuda"):
        cuda = state["cuda"]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
    for k, g in (generators or {}).items():
        if k in state.get("generators", {}):
            g.set_state(state["generators"][k])


def _finite_parts(data: dict[str, Any]) -> dict[str, Any]:
    parts: dict[str, Any] = {}
    if isinstance(data.get("model"), dict):
        parts["model"] = data["model"]
    if isinstance(data.get("text_embeddings"), torch.Tensor):
        parts["text_embeddings"] = data["text_embeddings"]
    return parts


def save_state(path: str | Path, payload: dict[str, Any]) -> None:
    """Atomic write (temporary file + fsync + rename): a kill never leaves a torn state file.

    Refused (CheckpointError, the file on disk unchanged) when the weights hold NaN or inf."""
    check_finite(_finite_parts(payload), str(path),
                 "not written: the previous state file (if any) is kept for --resume")
    save_versioned(path, STATE_KIND, payload)


def load_state(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a training state: CheckpointError naming the file when it is missing, corrupt,
    modified after it was written (content digest), of another version or non-finite."""
    data, _ = load_versioned(path, STATE_KIND, map_location)
    check_finite(_finite_parts(data), str(path), "refused")
    return data


def check_state(data: Any, path: str | Path) -> dict[str, Any]:
    """Validate what ``torch.load`` returned for the state file ``path``."""
    check_header(data, path, STATE_KIND)
    verify_digest(data, path, STATE_KIND.what)
    check_finite(_finite_parts(data), str(path), "refused")
    return data


class StopFlag:
    """Set by SIGTERM (and SIGINT when asked): the loop checkpoints and leaves at the next step."""

    def __init__(self, catch_sigint: bool = False) -> None:
        self.requested = False
        self.signum: int | None = None
        self._old: dict[int, Any] = {}
        sigs = [signal.SIGTERM] + ([signal.SIGINT] if catch_sigint else [])
        for s in sigs:
            try:
                self._old[s] = signal.signal(s, self._handle)
            except ValueError:      # not the main thread (e.g. inside some test runners)
                pass

    def _handle(self, signum, frame) -> None:
        self.requested = True
        self.signum = signum

    def restore(self) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)
        self._old.clear()
