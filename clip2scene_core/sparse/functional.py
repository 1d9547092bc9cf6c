"""Sparse 3D convolution, pure PyTorch: gather → GEMM → scatter-add per kernel offset.

Runs on any device torch runs on; autograd differentiates it (index_select / mm /
index_add_). Within one offset every output row receives at most one input row, so the
accumulation order is fixed and results are deterministic.
"""
from __future__ import annotations

import torch

from .kernel_map import KernelMap, build_kernel_map, table_for
from .tensor import SparseTensor


def get_kernel_map(x: SparseTensor, kernel_size: int, stride: int, dilation: int) -> KernelMap:
    """Kernel map of a conv applied to ``x``, built once and cached on ``x.cache``."""
    key = (x.stride, kernel_size, stride, dilation)
    kmap = x.cache.kmaps.get(key)
    if kmap is None:
        table = table_for(x.cache, x.stride, x.coords)
        kmap = build_kernel_map(x.coords, kernel_size, stride, dilation, table)
        x.cache.kmaps[key] = kmap
        prev = x.cache.coords.get(x.stride * stride)
        if prev is not None and prev.shape == kmap.out_coords.shape and torch.equal(prev, kmap.out_coords):
            kmap.out_coords = prev          # one coords tensor per stride: cat() can check identity
        else:
            x.cache.coords[x.stride * stride] = kmap.out_coords
    return kmap


IM2COL_MAX_CIN = 4   # convs with at most this many input channels run as one dense GEMM


def _im2col_index(ins: list[torch.Tensor], outs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(input rows, output row · K + offset) of every pair, offset after offset."""
    kvol = len(ins)
    dev = ins[0].device
    cols = (torch.cat([o * kvol + k for k, o in enumerate(outs)]) if kvol
            else torch.zeros(0, dtype=torch.int64, device=dev))
    return torch.cat(list(ins)), cols


def _forward(feats: torch.Tensor, weight: torch.Tensor, ins: list[torch.Tensor],
             outs: list[torch.Tensor], n_out: int, identity: int | None,
             im2col: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    kvol, cin, cout = weight.shape
    if im2col is not None:
        # few input channels: scatter the inputs into a zero-padded (n_out, K·Cin) matrix and
        # run one GEMM; far cheaper than K scatters of Cout-wide rows
        rows, slots = im2col
        cols = feats.new_zeros((n_out * kvol, cin))
        cols.index_copy_(0, slots, feats.index_select(0, rows))
        return torch.mm(cols.view(n_out, kvol * cin), weight.reshape(kvol * cin, cout))
    out = torch.mm(feats, weight[identity]) if identity is not None else feats.new_zeros((n_out, cout))
    pmax = max((i.numel() for k, i in enumerate(ins) if k != identity), default=0)
    if pmax == 0:
        return out
    # one gather buffer and one product buffer for all offsets (not two fresh tensors each)
    gbuf = feats.new_empty(pmax * cin)
    ybuf = feats.new_empty(pmax * cout)
    for k, (i, o) in enumerate(zip(ins, outs)):
        p = i.numel()
        if k == identity or p == 0:
            continue
        g = gbuf[:p * cin].view(p, cin)
        torch.index_select(feats, 0, i, out=g)
        y = ybuf[:p * cout].view(p, cout)
        torch.mm(g, weight[k], out=y)
        out.index_add_(0, o, y)
    return out


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    dev = t.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return t.dtype


class _SparseConv(torch.autograd.Function):
    """Gather–GEMM–scatter with a hand-written backward: one gradient buffer for the input
    instead of autograd's zero-filled full-size tensor per kernel offset, and no saved
    gathered copies (inputs are re-gathered in the backward)."""

    @staticmethod
    def forward(ctx, feats: torch.Tensor, weight: torch.Tensor, ins: list[torch.Tensor],  # type: ignore[override]
                outs: list[torch.Tensor], n_out: int, identity: int | None,
                im2col: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        dtype = _compute_dtype(feats)      # what autocast would run the matmuls in
        ctx.dtypes = (feats.dtype, weight.dtype)
        f, w = feats.to(dtype), weight.to(dtype)
        with torch.autocast(feats.device.type, enabled=False):
            out = _forward(f, w, ins, outs, n_out, identity, im2col)
        ctx.save_for_backward(f, w)
        ctx.maps = (ins, outs, identity)
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):  # type: ignore[override]
        f, w = ctx.saved_tensors
        ins, outs, identity = ctx.maps
        need_f, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        g = grad_out.to(f.dtype)
        grad_f = grad_w = None
        with torch.autocast(g.device.type, enabled=False):
            if need_f:
                grad_f = g @ w[identity].t() if identity is not None else f.new_zeros(f.shape)
            if need_w:
                grad_w = torch.zeros_like(w)
                if identity is not None:
                    grad_w[identity] = f.t() @ g
            for k, (i, o) in enumerate(zip(ins, outs)):
                if k == identity or i.numel() == 0:
                    continue
                go = g.index_select(0, o)
                if need_w:
                    grad_w[k] = f.index_select(0, i).t() @ go
                if need_f:
                    grad_f.index_add_(0, i, go @ w[k].t())
        if grad_f is not None:
            grad_f = grad_f.to(ctx.dtypes[0])
        if grad_w is not None:
            grad_w = grad_w.to(ctx.dtypes[1])
        return grad_f, grad_w, None, None, None, None, None


def _apply(feats: torch.Tensor, weight: torch.Tensor, kmap: KernelMap, transposed: bool) -> torch.Tensor:
    if transposed:
        ins, outs, n_out = kmap.out_rows, kmap.in_rows, kmap.in_coords.shape[0]
    else:
        ins, outs, n_out = kmap.in_rows, kmap.out_rows, kmap.out_coords.shape[0]
    identity = kmap.identity
    im2col = None
    if weight.shape[1] <= IM2COL_MAX_CIN and weight.shape[0] > 1:
        im2col = kmap.derived.get(("im2col", transposed))
        if im2col is None:
            im2col = kmap.derived[("im2col", transposed)] = _im2col_index(ins, outs)
    if torch.is_grad_enabled() and (feats.requires_grad or weight.requires_grad):
        return _SparseConv.apply(feats, weight, ins, outs, n_out, identity, im2col)
    dtype = _compute_dtype(feats)
    with torch.autocast(feats.device.type, enabled=False):
        return _forward(feats.to(dtype), weight.to(dtype), ins, outs, n_out, identity, im2col)


def conv3d(x: SparseTensor, weight: torch.Tensor, kernel_size: int, bias: torch.Tensor | None = None,
           stride: int = 1, dilation: int = 1, transposed: bool = False) -> SparseTensor:
    """Sparse conv with a torchsparse-layout ``weight`` ([K³, Cin, Cout] or [Cin, Cout]).

    Stride 1: output voxels = input voxels (submanifold). Stride s: output voxels are the
    coarse voxels reached by the kernel (``floor(c / s)`` when kernel == stride).
    Transposed: back to the finer voxels of the matching strided conv (same kernel
    size/stride/dilation), whose kernel map is read from the shared cache.
    """
    if kernel_size == 1 and stride == 1:
        w = weight if weight.dim() == 2 else weight[0]
        feats = x.feats @ w
        if bias is not None:
            feats = feats + bias
        return x.replace(feats)
    w = weight if weight.dim() == 3 else weight[None]
    if not transposed:
        kmap = get_kernel_map(x, kernel_size, stride, dilation)
        feats = _apply(x.feats, w, kmap, transposed=False)
        out_coords, out_stride = kmap.out_coords, x.stride * stride
    else:
        if x.stride % stride:
            raise ValueError(f"transposed conv with stride {stride} on a tensor of stride {x.stride}")
        fine = x.stride // stride
        kmap = x.cache.kmaps.get((fine, kernel_size, stride, dilation))
        if kmap is None:
            raise ValueError(
                f"transposed conv (k={kernel_size}, s={stride}) needs the kernel map of the matching "
                f"strided conv from stride {fine}; none is cached on this tensor")
        out_coords, out_stride = kmap.in_coords, fine
        feats = _apply(x.feats, w, kmap, transposed=True)
    if bias is not None:
        feats = feats + bias
    return SparseTensor(feats, out_coords, out_stride, x.cache)
