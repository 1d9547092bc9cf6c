"""Device choice shared by the segmenter, the CLIP teacher and training."""
from __future__ import annotations

import functools
import os
from typing import TYPE_CHECKING

from .errors import ConfigError

if TYPE_CHECKING:      # torch loads lazily: entry points set OpenMP's wait policy before it loads
    import torch


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """"auto" → CUDA when available, else CPU; "cuda" without a GPU is a ConfigError.

    Failing early with a clear message beats a CUDA error deep inside the first forward pass.
    """
    import torch

    if isinstance(device, torch.device):
        dev = device
    elif device in ("auto", "", None):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            dev = torch.device(device)
        except (RuntimeError, TypeError) as exc:
            raise ConfigError(f"invalid device {device!r}: {exc}") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device '{device}' asked for but CUDA is not available")
    return dev


#: precisions of the CLIP teacher's image forward (``teacher_precision``)
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
# the sparse backbone's convolutions (`clip2scene_core.sparse.set_precision`): no fp16 on CPU
SPARSE_PRECISIONS = ("auto", "fp32", "bf16")


@functools.lru_cache(maxsize=1)
def cpu_has_fast_bf16() -> bool:
    """Whether this CPU runs bf16 matmuls natively (AVX512-BF16 or AMX-BF16); read once per
    process (the teacher asks for every image).

    Without them oneDNN emulates bf16 and autocast is *slower* than fp32 (about 10× measured
    on an AVX2 AMD EPYC), so "auto" must not choose it there. torch's dispatch level
    (``torch.backends.cpu.get_cpu_capability()``) only says AVX2 / AVX512, not whether bf16
    is native, hence the CPU flags (Linux); elsewhere False. ``CLIP2SCENE_CPU_BF16=0`` (or
    ``1``) overrides the answer: fp32 everywhere for bit-exact comparisons across machines.
    """
    import torch

    forced = os.environ.get("CLIP2SCENE_CPU_BF16", "").strip()
    if forced in ("0", "1"):
        return forced == "1"
    try:
        if torch.backends.cpu.get_cpu_capability() not in ("AVX512", "AVX512_BF16", "AMX"):
            return False
    except Exception:  # noqa: BLE001 - older torch: decide from the flags alone
        pass
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool({"avx512_bf16", "amx_bf16"} & flags)
    except OSError:
        pass
    return False


def resolve_precision(precision: str, device: torch.device) -> str:
    """``"auto"`` → fp16 on CUDA, bf16 on a CPU with native bf16, else fp32; others checked."""
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision != "auto":
        if precision == "fp16" and device.type != "cuda":
            raise ConfigError("precision fp16 needs a CUDA device (use bf16 or fp32 on a CPU)")
        return precision
    if device.type == "cuda":
        return "fp16"
    return "bf16" if device.type == "cpu" and cpu_has_fast_bf16() else "fp32"


def autocast_for(precision: str, device: torch.device):
    """A context manager running a forward pass at ``precision`` (fp32: no autocast)."""
    import contextlib

    import torch

    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)
