"""Which sparse-conv implementation runs: the pure-PyTorch one or torchsparse.

``CLIP2SCENE_SPARSE_BACKEND=torch|torchsparse`` forces one; unset, torchsparse is used when
``import torchsparse`` works. torchsparse only ever runs CUDA tensors: CPU tensors always
take the pure backend (torchsparse's CPU kernels do not cover every conv type).

The torchsparse adapter is deliberately thin: both backends share the same ``Conv3d``
module and parameter layout (``kernel`` [K³, Cin, Cout] / [Cin, Cout], same offset order),
so one state_dict serves both. It targets torchsparse ≥ 2.1 (batch-first coordinates,
``floor(c / s)`` coarse coordinates) and cannot be exercised on machines without it;
tests skip it there.
"""
from __future__ import annotations

import os
from functools import lru_cache

import torch

from ..errors import ConfigError
from .tensor import SparseTensor

ENV_VAR = "CLIP2SCENE_SPARSE_BACKEND"
BACKENDS = ("torch", "torchsparse")


@lru_cache(maxsize=1)
def torchsparse_available() -> bool:
    try:
        import torchsparse.nn.functional  # noqa: F401 - importable, CUDA extension included
    except Exception:  # noqa: BLE001 - ImportError, or a broken CUDA extension build
        return False
    return True


def backend_name(device: torch.device | str | None = None) -> str:
    """Backend used for tensors on ``device`` (None: the configured one for CUDA tensors)."""
    forced = os.environ.get(ENV_VAR, "").strip().lower()
    if forced and forced not in BACKENDS:
        raise ConfigError(f"{ENV_VAR}={forced!r}; expected one of {BACKENDS}")
    if forced == "torchsparse" and not torchsparse_available():
        raise ConfigError(f"{ENV_VAR}=torchsparse but torchsparse cannot be imported")
    name = forced or ("torchsparse" if torchsparse_available() else "torch")
    if device is not None and torch.device(device).type != "cuda":
        return "torch"
    return name


def torchsparse_conv3d(x: SparseTensor, weight: torch.Tensor, kernel_size: int,
                       bias: torch.Tensor | None, stride: int, dilation: int, transposed: bool,
                       training: bool) -> SparseTensor:
    """Run one conv through torchsparse, keeping its cache on our tensor's shared cache."""
    import torchsparse
    import torchsparse.nn.functional as TF

    if hasattr(torchsparse.tensor, "set_allow_negative_coordinates"):
        torchsparse.tensor.set_allow_negative_coordinates(True)   # our coords are signed
    ts = torchsparse.SparseTensor(feats=x.feats, coords=x.coords, stride=x.stride)
    ts_cache = x.cache.extra.get("torchsparse")
    if ts_cache is None:
        x.cache.extra["torchsparse"] = ts._caches
    else:
        ts._caches = ts_cache
    # torchsparse.nn.Conv3d pads odd submanifold kernels by (k - 1) / 2; mirror that here
    padding = (kernel_size - 1) // 2 if kernel_size % 2 == 1 and stride == 1 else 0
    y = TF.conv3d(ts, weight, kernel_size, bias=bias, stride=stride, padding=padding,
                  dilation=dilation, transposed=transposed, training=training)
    return SparseTensor(y.feats, y.coords, y.stride, x.cache)
