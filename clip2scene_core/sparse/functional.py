"""Sparse 3D convolution, pure PyTorch: gather → GEMM → scatter-add per kernel offset.

Runs on any device torch runs on; autograd differentiates it (index_select / mm /
index_add_). Within one offset every output row receives at most one input row, so the
accumulation order is fixed and results are deterministic.

Inference extras: a ``bias`` (a folded BatchNorm, ``fold.py``) is fused into the centre GEMM
or the output's initial fill; small offsets share gathers and scatters (``Chunk``); the
opt-in bf16 precision runs through ``plan.py``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .kernel_map import KernelMap, build_kernel_map, table_for
from .plan import ConvPlan, build_plan, run_plan
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


# floats of gathered inputs + products per chunk in the chunked loop (0: one offset at a time):
# small enough for both buffers to stay in a core's L2 cache between GEMM and scatter
CHUNK_FLOATS = 1 << 18


@dataclass(eq=False)
class Chunk:
    """Consecutive kernel offsets processed with one gather and one scatter-add."""

    slabs: list[tuple[int, int, int]]   # (offset k, first row, pairs) within the chunk
    ins: torch.Tensor                   # input row of every chunk row
    outs: torch.Tensor                  # output row of every chunk row


def _chunks(ins: list[torch.Tensor], outs: list[torch.Tensor], identity: int | None,
            max_rows: int) -> list[Chunk]:
    """Non-centre offsets grouped in order into chunks of at most ``max_rows`` pairs (an
    offset with more pairs is a chunk of its own)."""
    chunks: list[Chunk] = []
    cur: list[int] = []
    rows = 0

    def flush() -> None:
        if len(cur) == 1:      # a large offset on its own: its index tensors as they are
            k = cur[0]
            chunks.append(Chunk([(k, 0, int(ins[k].numel()))], ins[k], outs[k]))
            return
        slabs, start = [], 0
        for k in cur:
            slabs.append((k, start, int(ins[k].numel())))
            start += int(ins[k].numel())
        chunks.append(Chunk(slabs, torch.cat([ins[k] for k in cur]), torch.cat([outs[k] for k in cur])))

    for k, i in enumerate(ins):
        p = int(i.numel())
        if k == identity or p == 0:
            continue
        if cur and (rows + p > max_rows or 2 * p > max_rows):
            flush()
            cur, rows = [], 0
        cur.append(k)
        rows += p
    if cur:
        flush()
    return chunks


def _forward(feats: torch.Tensor, weight: torch.Tensor, ins: list[torch.Tensor],
             outs: list[torch.Tensor], n_out: int, identity: int | None,
             im2col: tuple[torch.Tensor, torch.Tensor] | None = None,
             bias: torch.Tensor | None = None, chunks: list[Chunk] | None = None) -> torch.Tensor:
    """Conv features (+ ``bias``, fused into the first GEMM or the output's initial fill).

    With ``chunks`` (inference) the offsets of a chunk share one gather and one
    ``index_add_``: each op costs ~2–8 µs of dispatch whatever its size, and at 0.1 m voxels
    most offsets hold only a few hundred pairs. Products are added in the same order
    either way (by offset, in order); results agree up to the GEMMs' rounding.
    """
    kvol, cin, cout = weight.shape
    if im2col is not None:
        # few input channels: scatter the inputs into a zero-padded (n_out, K·Cin) matrix and
        # run one GEMM; far cheaper than K scatters of Cout-wide rows
        rows, slots = im2col
        cols = feats.new_zeros((n_out * kvol, cin))
        cols.index_copy_(0, slots, feats.index_select(0, rows))
        if bias is not None:
            return torch.addmm(bias, cols.view(n_out, kvol * cin), weight.reshape(kvol * cin, cout))
        return torch.mm(cols.view(n_out, kvol * cin), weight.reshape(kvol * cin, cout))
    if identity is not None:
        out = torch.mm(feats, weight[identity]) if bias is None else torch.addmm(bias, feats, weight[identity])
    elif bias is not None:
        out = bias.expand(n_out, cout).clone()
    else:
        out = feats.new_zeros((n_out, cout))
    if chunks is not None:
        rmax = max((c.ins.numel() for c in chunks), default=0)
        if rmax == 0:
            return out
        gbuf, ybuf = feats.new_empty((rmax, cin)), feats.new_empty((rmax, cout))
        w = weight.unbind(0)
        for c in chunks:
            r = c.ins.numel()
            g, y = gbuf[:r], ybuf[:r]
            torch.index_select(feats, 0, c.ins, out=g)
            for k, start, p in c.slabs:
                torch.mm(g[start:start + p], w[k], out=y[start:start + p])
            out.index_add_(0, c.outs, y)
        return out
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


def _apply(feats: torch.Tensor, weight: torch.Tensor, kmap: KernelMap, transposed: bool,
           bias: torch.Tensor | None = None, bf16: bool = False) -> torch.Tensor:
    """Conv features (+ ``bias``). ``bf16``: inference with ``weight`` already bfloat16."""
    if bf16:
        # bf16 GEMMs on row counts padded to BF16_ROWS (one oneDNN plan per shape), products
        # summed per output in one embedding_bag, result back in float32
        with torch.autocast(feats.device.type, enabled=False):
            out = run_plan(plan_for(kmap, transposed, BF16_ROWS), feats.to(torch.bfloat16), weight)
            out = out.float()
        return out.add_(bias) if bias is not None else out
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
        out = _SparseConv.apply(feats, weight, ins, outs, n_out, identity, im2col)
        return out + bias if bias is not None else out
    dtype = _compute_dtype(feats)
    chunks = None
    max_rows = CHUNK_FLOATS // (weight.shape[1] + weight.shape[2])
    if im2col is None and max_rows > 1:
        chunks = kmap.derived.get(("chunks", transposed, max_rows))
        if chunks is None:
            chunks = kmap.derived[("chunks", transposed, max_rows)] = _chunks(ins, outs, identity, max_rows)
    with torch.autocast(feats.device.type, enabled=False):
        return _forward(feats.to(dtype), weight.to(dtype), ins, outs, n_out, identity, im2col,
                        bias.to(dtype) if bias is not None else None, chunks)


BF16_ROWS = 256   # GEMM row counts of the bf16 path are rounded up to a multiple of this


def plan_for(kmap: KernelMap, transposed: bool, row_multiple: int = 1) -> ConvPlan:
    """The gather–GEMM–reduce plan of ``kmap`` in one direction, built once and cached on it."""
    key = ("plan", transposed, row_multiple)
    plan = kmap.derived.get(key)
    if plan is None:
        if transposed:
            ins, outs, n_out = kmap.out_rows, kmap.in_rows, kmap.in_coords.shape[0]
        else:
            ins, outs, n_out = kmap.in_rows, kmap.out_rows, kmap.out_coords.shape[0]
        plan = kmap.derived[key] = build_plan(ins, outs, n_out, kmap.identity, row_multiple)
    return plan


def conv3d(x: SparseTensor, weight: torch.Tensor, kernel_size: int, bias: torch.Tensor | None = None,
           stride: int = 1, dilation: int = 1, transposed: bool = False, bf16: bool = False) -> SparseTensor:
    """Sparse conv with a torchsparse-layout ``weight`` ([K³, Cin, Cout] or [Cin, Cout]).

    Stride 1: output voxels = input voxels (submanifold). Stride s: output voxels are the
    coarse voxels reached by the kernel (``floor(c / s)`` when kernel == stride).
    Transposed: back to the finer voxels of the matching strided conv (same kernel
    size/stride/dilation), whose kernel map is read from the shared cache.
    ``bf16``: inference only, ``weight`` cast to bfloat16 by the caller; outputs float32.
    """
    if kernel_size == 1 and stride == 1:
        w = weight if weight.dim() == 2 else weight[0]
        if bf16:        # 1×1 layers are a small share of the work: kept in float32
            w = w.float()
        feats = x.feats @ w if bias is None else torch.addmm(bias, x.feats, w)
        return x.replace(feats)
    w = weight if weight.dim() == 3 else weight[None]
    if not transposed:
        kmap = get_kernel_map(x, kernel_size, stride, dilation)
        feats = _apply(x.feats, w, kmap, False, bias, bf16)
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
        feats = _apply(x.feats, w, kmap, True, bias, bf16)
    return SparseTensor(feats, out_coords, out_stride, x.cache)
