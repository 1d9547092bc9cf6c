"""Inference-only weight transforms of the sparse convs: BatchNorm folding and bf16 GEMMs.

Folding: an eval-mode BatchNorm after a conv is an affine map per output channel, so
``bn(conv(x, W) + b) = conv(x, W·s) + (b − μ)·s + β`` with ``s = γ / √(σ² + ε)``. The folded
conv writes its output once (bias fused into the first GEMM) instead of conv + an affine
pass. Exact up to float rounding; used only where no gradient is recorded and the norm uses
its running statistics (eval mode).

Precision: ``modules.set_precision(model, "bf16")`` makes every ``Conv3d`` of ``model`` run its
GEMMs in bfloat16 at inference (weights cast once per weight version; features in and out
stay float32). ``"auto"`` picks bf16 only on CPUs with native bf16 (AVX512-BF16 / AMX):
elsewhere oneDNN emulates it and it is slower than fp32.

Derived weights are cached on the conv, keyed by the tensors' version counters and storage,
so ``load_state_dict``, optimiser steps and BN statistic updates invalidate them.
"""
from __future__ import annotations

import torch
from torch import nn

from ..device import SPARSE_PRECISIONS
from ..errors import ConfigError


def _stamp(*tensors: torch.Tensor | None) -> tuple:
    return tuple((t.data_ptr(), t._version, t.dtype, t.device) if t is not None else None for t in tensors)


def inference_only(*tensors: torch.Tensor) -> bool:
    """No autograd graph is being recorded through ``tensors`` and no autocast is active."""
    if torch.is_grad_enabled():
        return False
    return not any(torch.is_autocast_enabled(t.device.type) for t in tensors)


def foldable(norm: nn.Module, feats: torch.Tensor) -> bool:
    """Whether ``norm`` (after a conv producing ``feats``' dtype) may be folded into it now."""
    return (isinstance(norm, nn.BatchNorm1d) and not norm.training and norm.running_mean is not None
            and norm.running_var is not None and norm.running_mean.dtype == feats.dtype
            and inference_only(feats))


def folded_weights(conv: nn.Module, norm: nn.BatchNorm1d, bf16: bool = False
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(kernel, bias)`` of ``conv`` with eval-mode ``norm`` folded in (kernel in bf16 if
    asked; bias float32), cached on ``conv`` until any of the tensors changes."""
    key = ("fold", bf16, id(norm), norm.eps) + _stamp(conv.kernel, conv.bias, norm.weight, norm.bias,
                                                      norm.running_mean, norm.running_var)
    hit = conv.__dict__.get("_derived")
    if hit is not None and hit[0] == key:
        return hit[1]
    with torch.no_grad():
        scale = torch.rsqrt(norm.running_var + norm.eps)
        if norm.affine:
            scale = scale * norm.weight
        shift = -norm.running_mean * scale
        if norm.affine:
            shift = shift + norm.bias
        if conv.bias is not None:
            shift = shift + conv.bias * scale
        kernel = conv.kernel * scale          # Cout is the last axis in both kernel layouts
        if bf16:
            kernel = kernel.to(torch.bfloat16)
        value = (kernel.detach().clone(), shift.detach().clone())
    conv.__dict__["_derived"] = (key, value)
    return value


def bf16_kernel(conv: nn.Module) -> torch.Tensor:
    """``conv.kernel`` in bfloat16, cast once per weight version."""
    key = ("bf16",) + _stamp(conv.kernel)
    hit = conv.__dict__.get("_derived")
    if hit is not None and hit[0] == key:
        return hit[1]
    with torch.no_grad():
        value = conv.kernel.detach().to(torch.bfloat16).clone()
    conv.__dict__["_derived"] = (key, value)
    return value


def resolve_sparse_precision(precision: str, device: torch.device | str = "cpu") -> str:
    """``auto`` → bf16 on a CPU with native bf16, else fp32 (CUDA convs: fp32 here; use
    autocast there)."""
    if precision not in SPARSE_PRECISIONS:
        raise ConfigError(f"sparse precision must be one of {SPARSE_PRECISIONS}, got {precision!r}")
    if precision != "auto":
        return precision
    from ..device import cpu_has_fast_bf16

    return "bf16" if torch.device(device).type == "cpu" and cpu_has_fast_bf16() else "fp32"
