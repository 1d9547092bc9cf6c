"""Gather → GEMM → reduce plan of one kernel map: the conv forward of the bf16 path.

A plan, built once per kernel map, direction and row multiple:

* gathers the inputs of every non-centre pair with **one** ``index_select`` (offset-major),
* runs one GEMM per offset into consecutive slabs of a product buffer ``Y`` (the centre of a
  submanifold conv is a plain GEMM of all rows into the first slab, bias folded in),
* sums the products of every output row with **one** ``embedding_bag`` over ``Y`` in
  output-major order (each output row written once, accumulated in float32 by the bag
  kernel even for bf16 products). Where every output has exactly one product (2³
  transposed convs) it is one ``index_select``.

``row_multiple`` > 1 pads every slab to a multiple of that many rows: oneDNN re-plans a
bf16 GEMM for every new row count (~0.5 ms each), so bucketed shapes keep its plans warm.
Padded rows gather row 0 and are never read back. Narrow inputs (Cin ≤ ``FEW_CHANNELS``,
the stem) skip the GEMMs: their output is one weighted ``embedding_bag`` over the kernel
rows (weights = input features).

Why not in float32 as well: measured on whole MinkUNets it was 4–18 % slower than the
per-offset loop — building the plan (sorts over all pairs) costs more per frame than the
single bag saves, and the full product buffer falls out of cache.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

FEW_CHANNELS = 4


@dataclass(eq=False)
class ConvPlan:
    """Index tensors of one (kernel map, direction, row multiple)."""

    n_out: int
    gather: torch.Tensor            # (R,) input row of every slab row (pads: 0)
    slabs: list[tuple[int, int, int]]  # (offset k, first slab row, pairs) per non-empty non-centre offset
    centre: int | None              # offset whose slab is rows [0, n_out) of Y (identity map)
    centre_rows: int                # rows reserved for the centre slab (n_out rounded up)
    bag: torch.Tensor               # (P,) Y row of every product, output-major
    bag_offsets: torch.Tensor       # (n_out + 1,) start of every output's products in ``bag``
    single: bool                    # every output has exactly one product: out = Y[bag]
    # narrow-input path: (pair input rows, kernel offset of each pair), output-major
    pair_in: torch.Tensor
    pair_k: torch.Tensor


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def build_plan(ins: list[torch.Tensor], outs: list[torch.Tensor], n_out: int, identity: int | None,
               row_multiple: int = 1) -> ConvPlan:
    """Plan of the pairs (ins[k], outs[k]) per offset k onto ``n_out`` output rows."""
    dev = ins[0].device if ins else torch.device("cpu")
    kvol = len(ins)
    counts = [int(i.numel()) for i in ins]
    ks = [k for k in range(kvol) if k != identity and counts[k] > 0]
    centre_rows = _round_up(n_out, row_multiple) if identity is not None else 0
    slabs, start = [], centre_rows
    for k in ks:
        slabs.append((k, start, counts[k]))
        start += _round_up(counts[k], row_multiple)
    empty = torch.zeros(0, dtype=torch.int64, device=dev)
    # every pair once, offset-major (the centre first, then the slabs in order)
    order_k = ([identity] if identity is not None else []) + ks
    pair_in = torch.cat([ins[k] for k in order_k]) if order_k else empty
    out_all = torch.cat([outs[k] for k in order_k]) if order_k else empty
    sizes = torch.tensor([counts[k] for k in order_k], dtype=torch.int64, device=dev)
    pair_k = torch.repeat_interleave(torch.tensor(order_k, dtype=torch.int64, device=dev), sizes)
    y_all = torch.arange(out_all.numel(), dtype=torch.int64, device=dev)
    if row_multiple > 1 and ks:     # slab starts moved up to the padded positions
        first = torch.tensor([0] * (identity is not None) + [s for _, s, _ in slabs], device=dev)
        packed = torch.cumsum(sizes, 0) - sizes
        y_all += torch.repeat_interleave(first - packed, sizes)
    # (output, offset) is unique per pair: output-major, centre-first-then-offset order is a
    # sort by output · K + rank, rank = position of the offset in ``order_k``
    rank = torch.repeat_interleave(torch.arange(len(order_k), device=dev), sizes)
    order = torch.sort(out_all * max(len(order_k), 1) + rank).indices
    per_out = torch.bincount(out_all, minlength=n_out)
    offsets = torch.zeros(n_out + 1, dtype=torch.int64, device=dev)
    torch.cumsum(per_out, 0, out=offsets[1:])
    single = bool(out_all.numel() == n_out and n_out > 0 and (per_out == 1).all())
    gather = ins[0].new_zeros(start - centre_rows) if row_multiple > 1 else empty
    if ks and row_multiple > 1:
        for k, s, p in slabs:
            gather[s - centre_rows:s - centre_rows + p] = ins[k]
    elif ks:
        gather = torch.cat([ins[k] for k in ks])
    return ConvPlan(n_out, gather, slabs, identity, centre_rows, y_all[order], offsets, single,
                    pair_in[order], pair_k[order])


def run_plan(plan: ConvPlan, feats: torch.Tensor, weight: torch.Tensor,
             bias: torch.Tensor | None = None) -> torch.Tensor:
    """``conv(feats)`` (+ ``bias``) in ``weight``'s dtype, [K, Cin, Cout] weight layout."""
    kvol, cin, cout = weight.shape
    n_out = plan.n_out
    if cin <= FEW_CHANNELS and plan.bag.numel() and not plan.single:
        # out[o] = Σ_pairs Σ_c f[i, c] · W[k, c]: a weighted bag over the (K·Cin, Cout) kernel rows
        idx = (plan.pair_k[:, None] * cin + torch.arange(cin, device=feats.device)).reshape(-1)
        w = feats.index_select(0, plan.pair_in).reshape(-1)
        out = F.embedding_bag(idx, weight.reshape(kvol * cin, cout), plan.bag_offsets * cin, mode="sum",
                              per_sample_weights=w, include_last_offset=True)
        return out + bias if bias is not None else out
    y = feats.new_empty((plan.centre_rows + plan.gather.numel(), cout))
    bias_done = False
    if plan.centre is not None:
        src = feats
        if plan.centre_rows > n_out:          # padded rows for a fixed GEMM shape
            src = torch.cat([feats, feats.new_zeros(plan.centre_rows - n_out, cin)])
        if bias is not None:
            torch.addmm(bias, src, weight[plan.centre], out=y[:plan.centre_rows])
            bias_done = True
        else:
            torch.mm(src, weight[plan.centre], out=y[:plan.centre_rows])
    if plan.slabs:
        g = feats.index_select(0, plan.gather)
        w = weight.unbind(0)
        ends = [start for _, start, _ in plan.slabs[1:]] + [y.shape[0]]
        base = plan.centre_rows
        for (k, start, _), end in zip(plan.slabs, ends):
            torch.mm(g[start - base:end - base], w[k], out=y[start:end])
    if plan.single:
        out = y.index_select(0, plan.bag)
    elif n_out == 0:
        out = feats.new_zeros((0, cout))
    else:
        out = F.embedding_bag(plan.bag, y, plan.bag_offsets, mode="sum", include_last_offset=True)
    if bias is not None and not bias_done:
        out += bias
    return out
