"""MaskCLIP dense features from an open_clip vision tower (Zhou et al., ECCV 2022).

CLIP's image embedding comes from one pooled token; MaskCLIP observes that the *value*
path of the final attention maps every location into the same joint image-text space, so
skipping the query-key mixing of that last attention gives one CLIP embedding per patch.

ViT (``VisionTransformer``): blocks 0..L-2 run unchanged. In the last block each token ``x``
becomes ``x + out_proj(v_proj(ln_1(x)))`` followed by the block's MLP with its residual,
``z + mlp(ln_2(z))`` — exactly what MaskCLIP's reference implementation does (it keeps the
residual and the FFN; only the attention weights are replaced by the identity). Then
``ln_post`` and ``proj`` are applied to every patch token. ``last_block="value_only"`` drops
the residual and FFN (``out_proj(v_proj(ln_1(x)))`` only), a variant later work found less
noisy; it is not the default. The positional embedding is resized (bicubic) to the input's
patch grid so non-square images keep their aspect ratio.

ResNet (``ModifiedResNet``): the attention pool's ``v_proj`` and ``c_proj`` become 1×1
convolutions on the last feature map. MaskCLIP adds no positional embedding on this path
(the pool's embedding was learnt for its 7×7 grid); ``resnet_pos_embed=True`` adds the
resized spatial embedding instead.

``dense_forward_with_keys`` also returns the keys the last attention computes for each
patch in that same forward (ViT: ``k_proj(ln_1(x))`` of the last block; ResNet: the pool's
``k_proj`` of each cell plus its positional embedding), for MaskCLIP's key smoothing
(``refine.py``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError


@dataclass
class MaskClipOptions:
    """Variants of the dense path (defaults = MaskCLIP's reference implementation)."""

    last_block: Literal["maskclip", "value_only"] = "maskclip"
    resnet_pos_embed: bool = False

    def __post_init__(self) -> None:
        if self.last_block not in ("maskclip", "value_only"):
            raise ConfigError(f"last_block must be 'maskclip' or 'value_only', got {self.last_block!r}")


def vision_kind(visual: nn.Module) -> Literal["vit", "resnet"]:
    """Which dense path applies; ConfigError for towers MaskCLIP does not cover."""
    from open_clip.modified_resnet import ModifiedResNet
    from open_clip.transformer import ResidualAttentionBlock, VisionTransformer

    if isinstance(visual, ModifiedResNet):
        return "resnet"
    if isinstance(visual, VisionTransformer):
        if visual.attn_pool is not None:
            raise ConfigError("MaskCLIP dense features need a class-token ViT; "
                              "this one has an attentional pooler")
        if not all(isinstance(b, ResidualAttentionBlock) for b in visual.transformer.resblocks):
            raise ConfigError("MaskCLIP dense features need standard ViT blocks (nn.MultiheadAttention), "
                              "this model uses custom attention blocks")
        return "vit"
    raise ConfigError(f"MaskCLIP dense features support open_clip VisionTransformer and ModifiedResNet "
                      f"towers, not {type(visual).__name__}")


def vision_stride(visual: nn.Module) -> int:
    """Input pixels per feature cell: the ViT patch size, or 32 for a ResNet."""
    if vision_kind(visual) == "resnet":
        return 32
    ph, pw = visual.patch_size
    if ph != pw:
        raise ConfigError(f"non-square patches {visual.patch_size} are not supported")
    return int(ph)


def native_grid(visual: nn.Module) -> tuple[int, int]:
    """Patch grid the positional embedding was learnt for."""
    if vision_kind(visual) == "resnet":
        n = visual.attnpool.positional_embedding.shape[0] - 1
        side = round(n ** 0.5)
        return side, side
    return tuple(int(g) for g in visual.grid_size)  # type: ignore[return-value]


def resize_pos_embed(pos: Tensor, old_grid: tuple[int, int], new_grid: tuple[int, int]) -> Tensor:
    """(1 + gh*gw, C) embedding with a leading class row, resized bicubically to ``new_grid``."""
    if tuple(old_grid) == tuple(new_grid):
        return pos
    cls, grid = pos[:1], pos[1:]
    if grid.shape[0] != old_grid[0] * old_grid[1]:
        raise ConfigError(f"positional embedding has {grid.shape[0]} cells, not {old_grid[0]}x{old_grid[1]}")
    g = grid.reshape(1, old_grid[0], old_grid[1], -1).permute(0, 3, 1, 2).float()
    g = F.interpolate(g, size=tuple(new_grid), mode="bicubic", align_corners=False)
    g = g.permute(0, 2, 3, 1).reshape(new_grid[0] * new_grid[1], -1).to(pos.dtype)
    return torch.cat([cls, g], dim=0)


def _projection_weights(attn: nn.MultiheadAttention, which: Literal["k", "v"]
                        ) -> tuple[Tensor, Tensor | None]:
    """The key or value projection of an ``nn.MultiheadAttention`` (packed or separate weights)."""
    c = attn.embed_dim
    i = 1 if which == "k" else 2
    if attn.in_proj_weight is not None:
        w = attn.in_proj_weight[i * c:(i + 1) * c]
    else:
        w = attn.k_proj_weight if which == "k" else attn.v_proj_weight
    b = attn.in_proj_bias[i * c:(i + 1) * c] if attn.in_proj_bias is not None else None
    return w, b


def vit_forward(visual: nn.Module, x: Tensor, opts: MaskClipOptions | None = None
                ) -> tuple[Tensor, Tensor]:
    """Dense (B, D, gh, gw) MaskCLIP features and the pooled (B, D) image embedding (unnormalised)."""
    dense, pooled, _ = _vit(visual, x, opts or MaskClipOptions(), with_keys=False)
    return dense, pooled


def _vit(visual: nn.Module, x: Tensor, opts: MaskClipOptions, with_keys: bool
         ) -> tuple[Tensor, Tensor, Tensor | None]:
    b, _, hp, wp = x.shape
    p = vision_stride(visual)
    if hp % p or wp % p:
        raise ConfigError(f"input {hp}x{wp} is not a multiple of the patch size {p}")
    grid = (hp // p, wp // p)
    t = visual.conv1(x).flatten(2).transpose(1, 2)                   # (B, gh*gw, C)
    cls = visual.class_embedding.to(t.dtype).view(1, 1, -1).expand(b, -1, -1)
    t = torch.cat([cls, t], dim=1)
    t = t + resize_pos_embed(visual.positional_embedding, native_grid(visual), grid).to(t.dtype)
    t = visual.patch_dropout(t)
    t = visual.ln_pre(t)

    blocks = visual.transformer.resblocks
    batch_first = getattr(visual.transformer, "batch_first", True)
    if not batch_first:
        t = t.transpose(0, 1)
    for blk in blocks[:-1]:
        t = blk(t)
    last = blocks[-1]
    full = last(t)
    normed = last.ln_1(t)
    w_v, b_v = _projection_weights(last.attn, "v")
    v = F.linear(normed, w_v, b_v)
    v = last.attn.out_proj(v)
    if opts.last_block == "maskclip":
        v = t + last.ls_1(v)
        v = v + last.ls_2(last.mlp(last.ln_2(v)))
    keys = F.linear(normed, *_projection_weights(last.attn, "k")) if with_keys else None
    if not batch_first:
        full, v = full.transpose(0, 1), v.transpose(0, 1)
        keys = keys.transpose(0, 1) if keys is not None else None

    pooled, _ = visual._pool(full)
    dense = visual.ln_post(v[:, 1:])
    if visual.proj is not None:
        pooled = pooled @ visual.proj
        dense = dense @ visual.proj
    dense = dense.reshape(b, grid[0], grid[1], -1).permute(0, 3, 1, 2)
    if keys is not None:
        keys = keys[:, 1:].reshape(b, grid[0], grid[1], -1).permute(0, 3, 1, 2).contiguous()
    return dense.contiguous(), pooled, keys


def resnet_forward(visual: nn.Module, x: Tensor, opts: MaskClipOptions | None = None
                   ) -> tuple[Tensor, Tensor]:
    """Dense (B, D, h, w) MaskCLIP features and the attention-pooled (B, D) embedding."""
    dense, pooled, _ = _resnet(visual, x, opts or MaskClipOptions(), with_keys=False)
    return dense, pooled


def _resnet(visual: nn.Module, x: Tensor, opts: MaskClipOptions, with_keys: bool
            ) -> tuple[Tensor, Tensor, Tensor | None]:
    f = visual.stem(x)
    f = visual.layer4(visual.layer3(visual.layer2(visual.layer1(f))))   # (B, C, h, w)
    pool = visual.attnpool
    grid = (f.shape[2], f.shape[3])
    pos = resize_pos_embed(pool.positional_embedding, native_grid(visual), grid).to(f.dtype)

    d = f
    if opts.resnet_pos_embed:
        d = d + pos[1:].T.reshape(1, -1, grid[0], grid[1])
    d = F.conv2d(d, pool.v_proj.weight[:, :, None, None], pool.v_proj.bias)
    d = F.conv2d(d, pool.c_proj.weight[:, :, None, None], pool.c_proj.bias)
    keys = None
    if with_keys:   # what the pool's attention uses as the key of each cell
        keys = F.conv2d(f + pos[1:].T.reshape(1, -1, grid[0], grid[1]),
                        pool.k_proj.weight[:, :, None, None], pool.k_proj.bias)

    if grid == native_grid(visual):
        pooled = pool(f)
    else:
        t = f.flatten(2).permute(2, 0, 1)                                 # (HW, B, C)
        t = torch.cat([t.mean(dim=0, keepdim=True), t], dim=0) + pos[:, None, :]
        pooled, _ = F.multi_head_attention_forward(
            query=t[:1], key=t, value=t, embed_dim_to_check=t.shape[-1], num_heads=pool.num_heads,
            q_proj_weight=pool.q_proj.weight, k_proj_weight=pool.k_proj.weight,
            v_proj_weight=pool.v_proj.weight, in_proj_weight=None,
            in_proj_bias=torch.cat([pool.q_proj.bias, pool.k_proj.bias, pool.v_proj.bias]),
            bias_k=None, bias_v=None, add_zero_attn=False, dropout_p=0.0,
            out_proj_weight=pool.c_proj.weight, out_proj_bias=pool.c_proj.bias,
            use_separate_proj_weight=True, training=False, need_weights=False)
        pooled = pooled[0]
    return d.contiguous(), pooled, keys


def dense_forward(visual: nn.Module, x: Tensor, opts: MaskClipOptions | None = None
                  ) -> tuple[Tensor, Tensor]:
    """Dispatch on the tower type; returns (dense (B, D, h, w), pooled (B, D)), unnormalised."""
    if vision_kind(visual) == "resnet":
        return resnet_forward(visual, x, opts)
    return vit_forward(visual, x, opts)


def dense_forward_with_keys(visual: nn.Module, x: Tensor, opts: MaskClipOptions | None = None
                            ) -> tuple[Tensor, Tensor, Tensor]:
    """``dense_forward`` plus the last attention's (B, Ck, h, w) keys of the same forward."""
    run = _resnet if vision_kind(visual) == "resnet" else _vit
    dense, pooled, keys = run(visual, x, opts or MaskClipOptions(), with_keys=True)
    assert keys is not None
    return dense, pooled, keys
