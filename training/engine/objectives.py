"""What one optimisation step computes: the CLIP2Scene pre-training objective and the
fine-tuning objective (CE + Lovász on a cosine/text classifier)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from clip2scene_core.losses import (cosine_logits, first_in_cell, grid_labels, grid_partition, pseudo_label_lovasz,
                                    segmentation_loss, semantic_consistency_loss, ssr_loss, ssr_pair_loss,
                                    switchable_targets)
from clip2scene_core.models import VoxelBatch

from .config import FinetuneLossConfig, PretrainLossConfig
from .data import Batch


def forward_net(model: nn.Module, batch: Batch):
    """Run the 3D network on a batch already on the model's device."""
    device = batch.xyz.device
    return model(VoxelBatch.from_voxels(batch.voxels, device))


class PretrainObjective:
    """SCR (local head, Eq. 1) + SSR (global head, Eq. 2–4) with switchable self-training.

    As in the paper (Sec. 3.2.3: the two losses need different linear heads) and the released
    code, SCR trains the head that classifies against the text at inference (ours ``local``,
    the released SPVCNN's ``point_mapping_global``) and SSR the other head. SCR sees the
    key-frame points with a pixel, with the (possibly switched) pseudo-labels; SSR sees the
    pixel-point pairs of the key frame plus the sweep points (aligned into the key frame); with
    ``data.sweeps_to_keyframe_cameras`` the sweep points a key-frame camera sees have pixels
    and count as pairs in SCR and SSR like key-frame points, the others (and all of them when
    off) enter SSR as point members. Grid cells are labelled by the pixel pseudo-labels (never
    the switched ones, as in the released code).

    ``loss.ssr.form = "pair"`` (released ScanNet) replaces the cells by 1 - cos(pixel, point)
    over the pairs; ``loss.ssr.max_members`` keeps the first k SSR points of each cell (and
    their pixels), as the released code packs at most 8 pairs per voxel.

    Class imbalance (``loss.scr.class_weights``, ``loss.scr.lovasz_weight``, both off by
    default): the SCR terms weighted by pseudo-label frequency, and a Lovász-softmax term on
    the SCR head against the same targets (logged as ``lovasz``).
    """

    def __init__(self, cfg: PretrainLossConfig, text_emb: torch.Tensor) -> None:
        self.cfg = cfg
        self.text = F.normalize(text_emb.float(), dim=1)

    def __call__(self, model: nn.Module, batch: Batch, epoch: int, gen: torch.Generator):
        out = forward_net(model, batch)
        text = self.text.to(out.local.device)
        k = text.shape[0]
        paired = batch.has_pixel
        pix_lab = batch.pixel_labels[paired]
        zero = (out.local.sum() + out.global_.sum()) * 0.0       # every head in the graph (DDP)
        total = zero
        scalars: dict[str, float] = {"paired_points": float(paired.sum())}
        local_p = out.local[paired]
        if self.cfg.scr.enabled and local_p.shape[0] > 0:
            logits = cosine_logits(local_p, text)
            targets = switchable_targets(pix_lab, logits, epoch, self.cfg.self_training, gen)
            scr = semantic_consistency_loss(local_p, text, targets, self.cfg.scr)
            total = total + self.cfg.scr.weight * scr
            scalars["scr"] = float(scr.detach())
            if self.cfg.scr.lovasz_weight > 0:
                lov = pseudo_label_lovasz(local_p, text, targets, self.cfg.scr.lovasz_temperature)
                total = total + self.cfg.scr.lovasz_weight * lov
                scalars["lovasz"] = float(lov.detach())
            scalars["agreement"] = float((logits.detach().argmax(1) == pix_lab).float().mean())
            if self.cfg.self_train_unpaired and epoch >= self.cfg.self_training.switch_epoch:
                rest = batch.is_key & ~paired
                if bool(rest.any()):
                    lr = cosine_logits(out.local[rest], text) / self.cfg.scr.ce_temperature
                    st = F.cross_entropy(lr, lr.detach().argmax(1))
                    total = total + self.cfg.scr.weight * st
                    scalars["self_train"] = float(st.detach())
        ssr_cfg = self.cfg.ssr
        if ssr_cfg.enabled and local_p.shape[0] > 0 and ssr_cfg.form == "pair":
            ssr = ssr_pair_loss(out.global_[paired], batch.pixel_features)
            total = total + ssr_cfg.weight * ssr
            scalars["ssr"] = float(ssr.detach())
        elif ssr_cfg.enabled and local_p.shape[0] > 0:
            cells = grid_partition(batch.xyz, batch.sample, ssr_cfg.grid_size)
            point_lab = torch.full_like(batch.pixel_labels, -1)
            point_lab[paired] = pix_lab
            clab = grid_labels(point_lab, cells, k)
            # Eq. 2 runs over pixel-point pairs: key-frame points without a pixel stay out
            use = torch.ones_like(paired) if ssr_cfg.unpaired_points else (paired | ~batch.is_key)
            pixels = batch.pixel_features
            if ssr_cfg.max_members is not None:    # the first k members of each cell (released: 8)
                cap = torch.zeros_like(use)
                cap[use] = first_in_cell(cells[use], ssr_cfg.max_members)
                use, pixels = cap, pixels[cap[paired]]
                paired = paired & cap
            ssr = ssr_loss(out.global_[use], cells[use], pixels, cells[paired], clab, text, ssr_cfg)
            total = total + ssr_cfg.weight * ssr
            scalars["ssr"] = float(ssr.detach())
        return total, scalars


class SegmentationModel(nn.Module):
    """3D network + text classifier: logits = scale · cos(local feature, class embedding).

    The same rule the deployable ``Segmenter`` applies, so the fine-tuned class embeddings
    go straight into the checkpoint's ``text_embeddings``.
    """

    def __init__(self, net: nn.Module, text_emb: torch.Tensor, logit_scale: float, learn_text: bool) -> None:
        super().__init__()
        self.net = net
        self.logit_scale = float(logit_scale)
        t = F.normalize(text_emb.detach().float().clone(), dim=1)
        if learn_text:
            self.text = nn.Parameter(t)
        else:
            self.register_buffer("text", t)

    def forward(self, vb: VoxelBatch):
        out = self.net(vb)
        return self.logit_scale * cosine_logits(out.local, self.text), out

    def class_embeddings(self) -> torch.Tensor:
        return F.normalize(self.text.detach().float(), dim=1).cpu()


class FinetuneObjective:
    """Cross-entropy + Lovász-softmax on the labelled key-frame points."""

    def __init__(self, cfg: FinetuneLossConfig) -> None:
        self.cfg = cfg

    def __call__(self, model: nn.Module, batch: Batch, epoch: int, gen: torch.Generator):
        logits, out = model(VoxelBatch.from_voxels(batch.voxels, batch.xyz.device))
        if batch.gt is None:
            raise ValueError("fine-tuning needs labelled samples")
        gt = torch.where(batch.is_key, batch.gt, torch.full_like(batch.gt, -1))
        loss = segmentation_loss(logits, gt, self.cfg.lovasz_weight)
        loss = loss + (out.global_.sum() * 0.0)   # keep the unused head in the graph (DDP)
        keep = gt >= 0
        acc = float((logits.detach().argmax(1)[keep] == gt[keep]).float().mean()) if bool(keep.any()) else 0.0
        return loss, {"accuracy": acc}
