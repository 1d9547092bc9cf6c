"""Device choice shared by the segmenter, the CLIP teacher and training."""
from __future__ import annotations

import torch

from .errors import ConfigError


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """"auto" → CUDA when available, else CPU; "cuda" without a GPU is a ConfigError.

    Failing early with a clear message beats a CUDA error deep inside the first forward pass.
    """
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

