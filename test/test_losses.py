"""CLIP2Scene losses: Eq. 1 against a brute-force reference, SSR fusion properties on a real
scan's grid, switchable self-training, and Lovász-softmax = 1 - IoU on hard predictions."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from clip2scene_core.errors import Clip2SceneError
from clip2scene_core.losses import (
    ScrConfig, SelfTrainingConfig, SsrConfig, grid_labels, grid_partition, lovasz_softmax,
    scr_contrastive_loss, scr_cross_entropy_loss, segmentation_loss, semantic_consistency_loss,
    ssr_loss, switchable_targets, text_guided_fusion,
)


def _brute_scr(feats, text, labels, tau):
    f = F.normalize(feats, dim=1)
    t = F.normalize(text, dim=1)
    terms = []
    for i in range(len(labels)):
        c = int(labels[i])
        if c < 0:
            continue
        pos = torch.exp(f[i] @ t[c] / tau)
        neg = sum(torch.exp(f[j] @ t[c] / tau) for j in range(len(labels))
                  if labels[j] >= 0 and int(labels[j]) != c)
        terms.append(-torch.log(pos / (pos + neg)))
    return torch.stack(terms).mean()


@settings(max_examples=25, deadline=None)
@given(n=st.integers(2, 30), k=st.integers(2, 6), seed=st.integers(0, 10_000))
def test_scr_matches_eq1_bruteforce(n, k, seed):
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(n, 8, generator=g, dtype=torch.float64)
    text = torch.randn(k, 8, generator=g, dtype=torch.float64)
    labels = torch.randint(-1, k, (n,), generator=g)
    if not bool((labels >= 0).any()):
        labels[0] = 0
    got = scr_contrastive_loss(feats, text, labels, temperature=0.5)
    want = _brute_scr(feats, text, labels, 0.5)
    assert torch.allclose(got, want, atol=1e-9)


def test_scr_ce_variant_is_cross_entropy_over_text():
    g = torch.Generator().manual_seed(0)
    feats, text = torch.randn(50, 16, generator=g), torch.randn(5, 16, generator=g)
    labels = torch.randint(0, 5, (50,), generator=g)
    logits = F.normalize(feats, dim=1) @ F.normalize(text, dim=1).t() / 0.07
    assert torch.allclose(scr_cross_entropy_loss(feats, text, labels, 0.07), F.cross_entropy(logits, labels))
    cfg = ScrConfig(variant="cross_entropy", ce_temperature=0.07)
    assert torch.allclose(semantic_consistency_loss(feats, text, labels, cfg), F.cross_entropy(logits, labels))


@pytest.mark.parametrize("variant", ["contrastive", "cross_entropy"])
def test_scr_gradient_descent_aligns_points_with_their_text(variant):
    """Minimising SCR on free point features must make argmax over text = pseudo-label."""
    g = torch.Generator().manual_seed(1)
    text = F.normalize(torch.randn(6, 32, generator=g), dim=1)
    labels = torch.randint(0, 6, (300,), generator=g)
    feats = torch.randn(300, 32, generator=g).requires_grad_(True)
    opt = torch.optim.SGD([feats], lr=300.0)  # mean over 300 points
    cfg = ScrConfig(variant=variant)
    first = None
    for _ in range(150):
        loss = semantic_consistency_loss(feats, text, labels, cfg)
        first = float(loss.detach()) if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    acc = float(((feats.detach() @ text.t()).argmax(1) == labels).float().mean())
    assert float(loss.detach()) < first
    assert acc > 0.98, acc


def test_scr_ignores_unlabelled_points_and_rejects_bad_labels():
    g = torch.Generator().manual_seed(2)
    feats, text = torch.randn(20, 8, generator=g), torch.randn(3, 8, generator=g)
    labels = torch.randint(0, 3, (20,), generator=g)
    base = scr_contrastive_loss(feats, text, labels)
    extra = torch.cat([feats, torch.randn(5, 8, generator=g)])
    lab2 = torch.cat([labels, torch.full((5,), -1)])
    assert torch.allclose(base, scr_contrastive_loss(extra, text, lab2))
    none = scr_contrastive_loss(feats.requires_grad_(True), text, torch.full((20,), -1))
    assert float(none.detach()) == 0.0 and none.requires_grad
    with pytest.raises(Clip2SceneError):
        scr_contrastive_loss(feats, text, torch.full((20,), 3))


def _kitti_xyz(data_dir, frame="000000", n=20000):
    pts = np.fromfile(data_dir / f"semantickitti/squeezesegv3_sample_data/sequences/00/velodyne/{frame}.bin",
                      dtype=np.float32).reshape(-1, 4)
    lab = np.fromfile(data_dir / f"semantickitti/squeezesegv3_sample_data/sequences/00/labels/{frame}.label",
                      dtype=np.uint32) & 0xFFFF
    idx = np.random.default_rng(0).choice(len(pts), n, replace=False)
    return torch.from_numpy(pts[idx, :3].copy()), torch.from_numpy(lab[idx].astype(np.int64))


def test_grid_partition_on_real_scan(data_dir):
    xyz, _ = _kitti_xyz(data_dir)
    batch = torch.zeros(len(xyz), dtype=torch.long)
    batch[len(xyz) // 2:] = 1
    cells = grid_partition(xyz, batch, 2.0)
    key = np.concatenate([batch.numpy()[:, None], np.floor(xyz.numpy() / 2.0).astype(np.int64)], 1)
    uniq, inv = np.unique(key, axis=0, return_inverse=True)
    assert int(cells.max()) + 1 == len(uniq)
    # same cell ⇔ same (batch, floor(xyz / size))
    assert np.array_equal(np.unique(np.stack([cells.numpy(), inv.reshape(-1)], 1), axis=0)[:, 0],
                          np.arange(len(uniq)))
    # the two halves of the batch never share a cell
    assert not set(cells[batch == 0].tolist()) & set(cells[batch == 1].tolist())


def test_grid_labels_majority_vote(data_dir):
    xyz, raw = _kitti_xyz(data_dir)
    labels = torch.unique(raw, return_inverse=True)[1]
    k = int(labels.max()) + 1
    cells = grid_partition(xyz, torch.zeros(len(xyz), dtype=torch.long), 1.0)
    labels[::7] = -1
    got = grid_labels(labels, cells, k)
    for c in torch.unique(cells)[:200].tolist():
        lab = labels[cells == c]
        lab = lab[lab >= 0]
        if len(lab) == 0:
            assert int(got[c]) == -1
        else:
            counts = torch.bincount(lab, minlength=k)
            assert counts[int(got[c])] == counts.max()


def test_text_guided_fusion_weights():
    g = torch.Generator().manual_seed(3)
    members = F.normalize(torch.randn(7, 4, generator=g), dim=1)
    group = torch.tensor([0, 0, 0, 1, 1, 2, 2])
    text = F.normalize(torch.randn(3, 4, generator=g), dim=1)
    fused = text_guided_fusion(members, group, text, lam=1.0)
    for n in range(3):
        m = members[group == n]
        w = torch.softmax(m @ text[n], 0)
        assert torch.allclose(fused[n], (w[:, None] * m).sum(0), atol=1e-6)
    # λ → ∞: plain mean; λ → 0: the member most similar to the text
    assert torch.allclose(text_guided_fusion(members, group, text, lam=1e6)[0], members[:3].mean(0), atol=1e-5)
    best = members[:3][(members[:3] @ text[0]).argmax()]
    assert torch.allclose(text_guided_fusion(members, group, text, lam=1e-4)[0], best, atol=1e-4)


def test_ssr_loss_real_grid(data_dir):
    """Zero when every cell is feature-consistent; positive otherwise; decreases under SGD."""
    xyz, raw = _kitti_xyz(data_dir, n=4000)
    labels = torch.unique(raw, return_inverse=True)[1]
    k = int(labels.max()) + 1
    text = F.normalize(torch.randn(k, 16, generator=torch.Generator().manual_seed(4)), dim=1)
    cells = grid_partition(xyz, torch.zeros(len(xyz), dtype=torch.long), 2.0)
    clab = grid_labels(labels, cells, k)
    cfg = SsrConfig(grid_size=2.0)
    paired = torch.arange(0, len(xyz), 3)
    # consistent: each point carries its cell's text embedding, pixels too
    feats = text[clab[cells]]
    zero = ssr_loss(feats, cells, feats[paired], cells[paired], clab, text, cfg)
    assert float(zero) < 1e-5
    noisy = torch.randn(len(xyz), 16, generator=torch.Generator().manual_seed(5)).requires_grad_(True)
    opt = torch.optim.Adam([noisy], lr=0.2)
    losses = []
    for _ in range(30):
        loss = ssr_loss(noisy, cells, feats[paired], cells[paired], clab, text, cfg)
        losses.append(float(loss.detach()))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert losses[0] > 0.3 and losses[-1] < 0.5 * losses[0]
    sig = ssr_loss(feats, cells, feats[paired], cells[paired], clab, text, SsrConfig(similarity="sigmoid_dot"))
    assert 0.0 < float(sig) < 1.0


def test_switchable_targets():
    pix = torch.tensor([0, 1, 2, -1, 1])
    logits = torch.eye(3)[[2, 2, 2, 2, 2]]
    cfg = SelfTrainingConfig(switch_epoch=3, probability=1.0)
    assert torch.equal(switchable_targets(pix, logits, 2, cfg), pix)
    assert torch.equal(switchable_targets(pix, logits, 3, cfg), torch.tensor([2, 2, 2, -1, 2]))
    cfg = SelfTrainingConfig(switch_epoch=0, probability=0.5, mode="batch")
    g = torch.Generator().manual_seed(0)
    outs = {tuple(switchable_targets(pix, logits, 5, cfg, g).tolist()) for _ in range(40)}
    assert outs == {tuple(pix.tolist()), (2, 2, 2, -1, 2)}
    a = switchable_targets(pix, logits, 5, SelfTrainingConfig(switch_epoch=0, mode="point"),
                           torch.Generator().manual_seed(7))
    b = switchable_targets(pix, logits, 5, SelfTrainingConfig(switch_epoch=0, mode="point"),
                           torch.Generator().manual_seed(7))
    assert torch.equal(a, b)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 60), c=st.integers(2, 5), seed=st.integers(0, 10_000))
def test_lovasz_equals_one_minus_iou_on_hard_predictions(n, c, seed):
    rng = np.random.default_rng(seed)
    gt = torch.from_numpy(rng.integers(0, c, n))
    pred = torch.from_numpy(rng.integers(0, c, n))
    probs = F.one_hot(pred, c).double()
    ious = []
    for k in torch.unique(gt).tolist():
        inter = int(((pred == k) & (gt == k)).sum())
        union = int(((pred == k) | (gt == k)).sum())
        ious.append(inter / union)
    want = 1.0 - float(np.mean(ious))
    assert abs(float(lovasz_softmax(probs, gt)) - want) < 1e-9


def test_segmentation_loss_perfect_is_small_and_ignores():
    labels = torch.tensor([0, 1, 2, 1, -1])
    good = F.one_hot(labels.clamp_min(0), 3).float() * 20
    bad = -good
    assert float(segmentation_loss(good, labels)) < 1e-3
    assert float(segmentation_loss(bad, labels)) > 1.0
