"""CLIP2Scene losses: Eq. 1 and Eq. 2–4 against brute-force references written from the
paper's formulas, SSR fusion properties on a real scan's grid, which points the pre-training
objective hands to SSR, switchable self-training, Lovász-softmax = 1 - IoU on hard
predictions, and the class-imbalance options on the pseudo-labels (class weights, Lovász)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from clip2scene_core.errors import Clip2SceneError
from clip2scene_core.losses import (
    ScrConfig, SelfTrainingConfig, SsrConfig, class_balance_weights, cosine_logits, grid_labels, grid_partition,
    lovasz_softmax, pseudo_label_lovasz, scr_contrastive_loss, scr_cross_entropy_loss, segmentation_loss,
    semantic_consistency_loss, ssr_loss, switchable_targets, text_guided_fusion,
)


def _brute_scr_eq1(feats, text, labels, tau):
    """Eq. 1 as printed, positives also in the denominator:
    -Σ_c log( Σ_{i∈c} exp(D(t_c,p_i)/τ) / (Σ_{i∈c} exp(D(t_c,p_i)/τ) + Σ_{j∉c} exp(D(t_c,p_j)/τ)) )."""
    f = F.normalize(feats, dim=1)
    t = F.normalize(text, dim=1)
    total = torch.zeros((), dtype=feats.dtype)
    for c in sorted({int(x) for x in labels.tolist() if x >= 0}):
        pos = sum(torch.exp(t[c] @ f[i] / tau) for i in range(len(labels)) if int(labels[i]) == c)
        neg = sum((torch.exp(t[c] @ f[j] / tau) for j in range(len(labels))
                   if labels[j] >= 0 and int(labels[j]) != c), torch.zeros((), dtype=feats.dtype))
        total = total - torch.log(pos / (pos + neg))
    return total


def _brute_scr(feats, text, labels, tau):
    """Per-point form (the default): point i against the negatives of its text t_{c_i}."""
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
    got = scr_contrastive_loss(feats, text, labels, temperature=0.5, form="per_class")
    assert torch.allclose(got, _brute_scr_eq1(feats, text, labels, 0.5), atol=1e-9)
    assert torch.allclose(semantic_consistency_loss(feats, text, labels, ScrConfig(form="per_class")), got)
    got = scr_contrastive_loss(feats, text, labels, temperature=0.5)          # default: per point
    want = _brute_scr(feats, text, labels, 0.5)
    assert torch.allclose(got, want, atol=1e-9)
    assert torch.allclose(semantic_consistency_loss(feats, text, labels, ScrConfig()), got)


def test_scr_eq1_per_class_structure():
    """One term per class present (sum, not mean); a class's term only depends on how its text
    ranks the points; all points of one class give 0 - every text picks its own class."""
    g = torch.Generator().manual_seed(11)
    text = F.normalize(torch.randn(4, 8, generator=g, dtype=torch.float64), dim=1)
    labels = torch.tensor([0, 0, 1, 1, 1, 3])
    feats = torch.randn(6, 8, generator=g, dtype=torch.float64)
    loss = scr_contrastive_loss(feats, text, labels, form="per_class")
    one = scr_contrastive_loss(feats, text, torch.zeros(6, dtype=torch.long), form="per_class")
    assert float(one) == pytest.approx(0.0, abs=1e-12)
    f, tau = F.normalize(feats, dim=1), 0.5
    terms = [-torch.log_softmax(f @ text[c] / tau, 0)[labels == c].exp().sum().log() for c in (0, 1, 3)]
    assert torch.allclose(loss, torch.stack(terms).sum())
    # the term of a class is a log-probability: adding a far-away negative only raises it
    far = torch.cat([feats, -text[:1] * 10])
    farther = scr_contrastive_loss(far, text, torch.cat([labels, torch.tensor([2])]), form="per_class")
    assert float(farther) > float(loss)


def test_scr_ce_variant_is_cross_entropy_over_text():
    g = torch.Generator().manual_seed(0)
    feats, text = torch.randn(50, 16, generator=g), torch.randn(5, 16, generator=g)
    labels = torch.randint(0, 5, (50,), generator=g)
    logits = F.normalize(feats, dim=1) @ F.normalize(text, dim=1).t() / 0.07
    assert torch.allclose(scr_cross_entropy_loss(feats, text, labels, 0.07), F.cross_entropy(logits, labels))
    cfg = ScrConfig(variant="cross_entropy", ce_temperature=0.07)
    assert torch.allclose(semantic_consistency_loss(feats, text, labels, cfg), F.cross_entropy(logits, labels))


@pytest.mark.parametrize("variant,form", [("contrastive", "per_class"), ("contrastive", "per_point"),
                                          ("cross_entropy", None)])
def test_scr_gradient_descent_aligns_points_with_their_text(variant, form):
    """Minimising SCR on free point features must make argmax over text = pseudo-label."""
    g = torch.Generator().manual_seed(1)
    text = F.normalize(torch.randn(6, 32, generator=g), dim=1)
    labels = torch.randint(0, 6, (300,), generator=g)
    feats = torch.randn(300, 32, generator=g).requires_grad_(True)
    cfg = ScrConfig(variant=variant) if form is None else ScrConfig(variant=variant, form=form)
    # per-point forms average over 300 points, Eq. 1 sums over the 6 classes
    opt = torch.optim.SGD([feats], lr=20.0 if form == "per_class" else 300.0)
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
    extra = torch.cat([feats, torch.randn(5, 8, generator=g)])
    lab2 = torch.cat([labels, torch.full((5,), -1)])
    for form in ("per_class", "per_point"):
        base = scr_contrastive_loss(feats, text, labels, form=form)
        assert torch.allclose(base, scr_contrastive_loss(extra, text, lab2, form=form))
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


def _brute_ssr(point_feats, cells, pixel_feats, pixel_cells, cell_labels, text, lam, similarity, normalize):
    """Eq. 2–4 cell by cell: a (pixels) and b (points) share one softmax denominator,
    f_n = Σ a x + Σ b p, loss Σ_n Σ_{i∈g_n} (1 - sigmoid(D(p_i, f_n))) / N."""
    unit = lambda v: v / v.norm()  # noqa: E731
    total, n_cells, n_points = torch.zeros((), dtype=point_feats.dtype), 0, 0
    for n in range(len(cell_labels)):
        pts = [i for i in range(len(cells)) if int(cells[i]) == n]
        if int(cell_labels[n]) < 0 or not pts:
            continue
        t = unit(text[int(cell_labels[n])])
        xs = [unit(pixel_feats[m]) for m in range(len(pixel_cells)) if int(pixel_cells[m]) == n]
        ps = [unit(point_feats[i]) for i in pts]
        z = sum(torch.exp(x @ t / lam) for x in xs + ps)
        a = [torch.exp(x @ t / lam) / z for x in xs]
        b = [torch.exp(p @ t / lam) / z for p in ps]
        f = sum(ai * x for ai, x in zip(a, xs)) + sum(bi * p for bi, p in zip(b, ps))
        for p in ps:
            d = p @ f if similarity == "sigmoid_dot" else p @ f / f.norm()
            total = total + (1 - torch.sigmoid(d) if similarity == "sigmoid_dot" else 1 - d)
        n_cells += 1
        n_points += len(ps)
    return total / (n_cells if normalize == "cells" else n_points)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 25), g=st.integers(1, 6), seed=st.integers(0, 10_000),
       similarity=st.sampled_from(["sigmoid_dot", "cosine"]), normalize=st.sampled_from(["cells", "points"]),
       lam=st.sampled_from([0.5, 1.0, 3.0]))
def test_ssr_matches_eq2_to_4_bruteforce(n, g, seed, similarity, normalize, lam):
    gen = torch.Generator().manual_seed(seed)
    k = 4
    text = torch.randn(k, 8, generator=gen, dtype=torch.float64)
    cells = torch.randint(0, g, (n,), generator=gen)
    cells[:g] = torch.arange(min(g, n))                       # cells ids used densely
    paired = torch.rand(n, generator=gen) < 0.6
    pixel_feats = torch.randn(int(paired.sum()), 8, generator=gen, dtype=torch.float64)
    pixel_cells = cells[paired]
    cell_labels = torch.randint(-1, k, (int(cells.max()) + 1,), generator=gen)
    feats = torch.randn(n, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    cfg = SsrConfig(lam=lam, similarity=similarity, normalize=normalize)
    got = ssr_loss(feats, cells, pixel_feats, pixel_cells, cell_labels, text, cfg)
    if not bool((cell_labels[cells] >= 0).any()):
        assert float(got.detach()) == 0.0
        return
    want = _brute_ssr(feats, cells, pixel_feats, pixel_cells, cell_labels, text, lam, similarity, normalize)
    assert torch.allclose(got, want, atol=1e-10)
    g_got, = torch.autograd.grad(got, feats)
    g_want, = torch.autograd.grad(want, feats)
    assert torch.allclose(g_got, g_want, atol=1e-10)            # gradients flow through f_n as well


def test_ssr_loss_real_grid(data_dir):
    """Zero when every cell is feature-consistent; positive otherwise; decreases under SGD."""
    xyz, raw = _kitti_xyz(data_dir, n=4000)
    labels = torch.unique(raw, return_inverse=True)[1]
    k = int(labels.max()) + 1
    text = F.normalize(torch.randn(k, 16, generator=torch.Generator().manual_seed(4)), dim=1)
    cells = grid_partition(xyz, torch.zeros(len(xyz), dtype=torch.long), 2.0)
    clab = grid_labels(labels, cells, k)
    cfg = SsrConfig(grid_size=2.0, similarity="cosine", normalize="points")
    paired = torch.arange(0, len(xyz), 3)
    # consistent: each point carries its cell's text embedding, pixels too
    feats = text[clab[cells]]
    zero = ssr_loss(feats, cells, feats[paired], cells[paired], clab, text, cfg)
    assert float(zero) < 1e-5
    # Eq. 2 (default): 1 - sigmoid(1) per point of a consistent cell, summed, / number of cells
    paper = ssr_loss(feats, cells, feats[paired], cells[paired], clab, text, SsrConfig(grid_size=2.0))
    lab_pts = clab[cells] >= 0
    want = (1 - torch.sigmoid(torch.tensor(1.0))) * lab_pts.sum() / torch.unique(cells[lab_pts]).numel()
    assert torch.allclose(paper, want, atol=1e-5)

    def fit(cfg: SsrConfig) -> list[float]:
        """30 Adam steps on random point features; the loss after each."""
        noisy = torch.randn(len(xyz), 16, generator=torch.Generator().manual_seed(5)).requires_grad_(True)
        opt = torch.optim.Adam([noisy], lr=0.2)
        losses = []
        for _ in range(30):
            loss = ssr_loss(noisy, cells, feats[paired], cells[paired], clab, text, cfg)
            losses.append(float(loss.detach()))
            opt.zero_grad()
            loss.backward()
            opt.step()
        return losses

    losses = fit(cfg)
    assert losses[0] > 0.3 and losses[-1] < 0.5 * losses[0]
    # the paper's loss, per point: bounded below by 1 - sigmoid(1), and SGD goes towards it
    cfg = SsrConfig(grid_size=2.0, normalize="points")
    losses = fit(cfg)
    floor = 1 - float(torch.sigmoid(torch.tensor(1.0)))
    assert all(v > floor - 1e-6 for v in losses)
    assert losses[-1] - floor < 0.5 * (losses[0] - floor)


def test_pretrain_objective_hands_pairs_and_sweeps_to_ssr(monkeypatch):
    """SCR trains the local head on the key-frame points with a pixel; SSR the global head on
    those points plus the sweep points (Eq. 2 runs over pixel-point pairs), not on key-frame
    points outside every image unless ``unpaired_points``."""
    from types import SimpleNamespace

    from training.engine import objectives
    from training.engine.config import PretrainLossConfig
    from training.engine.data import Batch

    g = torch.Generator().manual_seed(0)
    k, d = 3, 8
    text = F.normalize(torch.randn(k, d, generator=g), dim=1)
    # 4 key-frame points with a pixel, 2 key-frame points without, 2 sweep points; one 1 m cell
    is_key = torch.tensor([1, 1, 1, 1, 1, 1, 0, 0], dtype=torch.bool)
    has_pixel = torch.tensor([1, 1, 1, 1, 0, 0, 0, 0], dtype=torch.bool)
    labels = torch.tensor([0, 0, 1, 0, -1, -1, -1, -1])
    xyz = torch.rand(8, 3, generator=g) * 0.9
    batch = Batch(None, torch.zeros(8, dtype=torch.long), is_key, xyz, has_pixel, labels,
                  torch.randn(4, d, generator=g), None, torch.arange(8), [6], [])
    local = torch.randn(8, d, generator=g, requires_grad=True)
    glob = torch.randn(8, d, generator=g, requires_grad=True)
    monkeypatch.setattr(objectives, "forward_net", lambda model, b: SimpleNamespace(local=local, global_=glob))
    for unpaired, moved in ((False, [1, 1, 1, 1, 0, 0, 1, 1]), (True, [1] * 8)):
        cfg = PretrainLossConfig(ssr=SsrConfig(unpaired_points=unpaired),
                                 self_training=SelfTrainingConfig(enabled=False))
        total, scalars = objectives.PretrainObjective(cfg, text)(None, batch, 0, torch.Generator())
        g_local, g_glob = torch.autograd.grad(total, [local, glob])
        assert (g_local.abs().sum(1) > 0).tolist() == has_pixel.tolist()
        assert (g_glob.abs().sum(1) > 0).tolist() == [bool(m) for m in moved]
        # the SSR value is Eq. 2 on exactly those points, the pixels of the paired ones fused in
        use = torch.tensor(moved, dtype=torch.bool)
        want = _brute_ssr(glob[use].detach(), torch.zeros(int(use.sum()), dtype=torch.long), batch.pixel_features,
                          torch.zeros(4, dtype=torch.long), torch.tensor([0]), text, 1.0, "sigmoid_dot", "cells")
        assert scalars["ssr"] == pytest.approx(float(want), abs=1e-5)


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


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 50), c=st.integers(2, 5), seed=st.integers(0, 10_000))
def test_lovasz_hard_predictions_all_classes_and_ignored_points(n, c, seed):
    """1 - IoU per class on one-hot predictions (classes="all": a class absent from both
    prediction and labels has loss 0, one only predicted has 1); ignored points, whatever
    their prediction, change nothing."""
    rng = np.random.default_rng(seed)
    gt = torch.from_numpy(rng.integers(0, c, n))
    pred = torch.from_numpy(rng.integers(0, c, n))
    losses = []
    for k in range(c):
        union = int(((pred == k) | (gt == k)).sum())
        losses.append(0.0 if union == 0 else 1.0 - int(((pred == k) & (gt == k)).sum()) / union)
    probs = F.one_hot(pred, c).double()
    assert float(lovasz_softmax(probs, gt, classes="all")) == pytest.approx(float(np.mean(losses)), abs=1e-12)
    extra = int(rng.integers(1, 10))
    junk = F.softmax(torch.from_numpy(rng.normal(size=(extra, c))), dim=1)
    with_ignored = lovasz_softmax(torch.cat([probs, junk]), torch.cat([gt, torch.full((extra,), -1)]))
    assert float(with_ignored) == pytest.approx(float(lovasz_softmax(probs, gt)), abs=1e-12)


def test_lovasz_gradient_flows_and_descends():
    """Gradients reach every non-ignored logit; ignored points get none; gradient descent on
    the Lovász term alone raises the IoU of the argmax."""
    g = torch.Generator().manual_seed(0)
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2, -1])
    logits = torch.randn(10, 3, generator=g, requires_grad=True)
    loss = lovasz_softmax(F.softmax(logits, dim=1), labels)
    (grad,) = torch.autograd.grad(loss, logits)
    assert torch.isfinite(grad).all()
    assert (grad[:9].abs().sum(1) > 0).all() and float(grad[9].abs().sum()) == 0.0
    x = torch.randn(10, 3, generator=g, requires_grad=True)
    opt = torch.optim.SGD([x], lr=5.0)
    first = float(lovasz_softmax(F.softmax(x.detach(), dim=1), labels))
    for _ in range(100):
        opt.zero_grad()
        lovasz_softmax(F.softmax(x, dim=1), labels).backward()
        opt.step()
    assert float(lovasz_softmax(F.softmax(x.detach(), dim=1), labels)) < 0.5 * first
    assert torch.equal(x.detach().argmax(1)[:9], labels[:9])
    # only ignored points: zero, still in the graph
    z = lovasz_softmax(F.softmax(logits, dim=1), torch.full((10,), -1))
    assert float(z.detach()) == 0.0 and z.requires_grad


def test_pseudo_label_lovasz_is_lovasz_of_the_text_classifier():
    g = torch.Generator().manual_seed(1)
    feats = torch.randn(40, 8, generator=g, requires_grad=True)
    text = F.normalize(torch.randn(4, 8, generator=g), dim=1)
    labels = torch.randint(-1, 4, (40,), generator=g)
    got = pseudo_label_lovasz(feats, text, labels, temperature=0.1)
    want = lovasz_softmax(F.softmax(cosine_logits(feats, text) / 0.1, dim=1), labels)
    assert float(got.detach()) == pytest.approx(float(want.detach()), abs=1e-7)
    (grad,) = torch.autograd.grad(got, feats)
    assert (grad[labels >= 0].abs().sum(1) > 0).all()
    with pytest.raises(Clip2SceneError):
        pseudo_label_lovasz(feats, text, torch.full((40,), 7))


def test_class_balance_weights():
    labels = torch.tensor([0] * 16 + [1] * 4 + [2] * 1 + [-1] * 5)
    assert class_balance_weights(labels, 4, "none") is None
    for mode, power in (("inverse_sqrt_freq", 0.5), ("inverse_freq", 1.0)):
        w = class_balance_weights(labels, 4, mode)
        counts = torch.tensor([16.0, 4.0, 1.0])
        raw = counts.pow(-power)
        assert torch.allclose(w[:3] / w[0], raw / raw[0])
        assert float(w[3]) == 0.0                                   # absent class
        assert float((w[:3] * counts).sum() / counts.sum()) == pytest.approx(1.0)   # mean point weight 1
    with pytest.raises(ValueError):
        class_balance_weights(labels, 4, "median")
    with pytest.raises(ValueError):
        ScrConfig(class_weights="median")
    with pytest.raises(ValueError):
        ScrConfig(lovasz_weight=-1.0)


@pytest.mark.parametrize("variant,form", [("contrastive", "per_point"), ("contrastive", "per_class"),
                                          ("cross_entropy", "per_point")])
def test_class_weighted_scr(variant, form):
    """Weighted SCR = the weighted mean of the per-point terms (per-class form: w_c × its term);
    the defaults leave the loss bit-identical to the unweighted one."""
    g = torch.Generator().manual_seed(2)
    feats = torch.randn(30, 6, generator=g)
    text = F.normalize(torch.randn(3, 6, generator=g), dim=1)
    labels = torch.tensor([0] * 20 + [1] * 6 + [2] * 2 + [-1] * 2)
    plain = ScrConfig(variant=variant, form=form)
    weighted = ScrConfig(variant=variant, form=form, class_weights="inverse_freq")
    base = (scr_contrastive_loss(feats, text, labels, plain.temperature, form=form) if variant == "contrastive"
            else scr_cross_entropy_loss(feats, text, labels, plain.ce_temperature))
    assert torch.equal(semantic_consistency_loss(feats, text, labels, plain), base)
    w = class_balance_weights(labels, 3, "inverse_freq")
    got = semantic_consistency_loss(feats, text, labels, weighted)
    keep = labels >= 0
    if variant == "cross_entropy":
        per = F.cross_entropy(cosine_logits(feats, text) / plain.ce_temperature, labels.clamp_min(0), reduction="none")
        want = (per * w[labels.clamp_min(0)])[keep].sum() / w[labels[keep]].sum()
    elif form == "per_point":
        sim = cosine_logits(feats, text) / plain.temperature
        terms = []
        for i in torch.nonzero(keep).squeeze(1).tolist():      # own positive vs its text's negatives
            c = int(labels[i])
            neg = sim[keep & (labels != c), c]
            terms.append(torch.logsumexp(torch.cat([sim[i:i + 1, c], neg]), 0) - sim[i, c])
        want = (torch.stack(terms) * w[labels[keep]]).sum() / w[labels[keep]].sum()
    else:
        sim = cosine_logits(feats, text) / plain.temperature
        want = sum(w[c] * (torch.logsumexp(sim[keep, c], 0) - torch.logsumexp(sim[labels == c, c], 0))
                   for c in range(3))
    assert float(got) == pytest.approx(float(want), rel=1e-5)
    # rare classes weigh more: their gradient share grows
    f = feats.clone().requires_grad_(True)
    (gp,) = torch.autograd.grad(semantic_consistency_loss(f, text, labels, plain), f)
    f = feats.clone().requires_grad_(True)
    (gw,) = torch.autograd.grad(semantic_consistency_loss(f, text, labels, weighted), f)
    def share(grad: torch.Tensor) -> float:
        return float(grad[labels == 2].norm() / grad[labels == 0].norm())

    assert share(gw) > share(gp)


def test_pretrain_objective_lovasz_term(monkeypatch):
    """``loss.scr.lovasz_weight`` adds the Lovász term of the SCR head on the pseudo-labels of
    the paired points (logged as ``lovasz``); the default adds nothing (bit-identical total)."""
    from types import SimpleNamespace

    from training.engine import objectives
    from training.engine.config import PretrainLossConfig
    from training.engine.data import Batch

    g = torch.Generator().manual_seed(3)
    k, d = 3, 8
    text = F.normalize(torch.randn(k, d, generator=g), dim=1)
    has_pixel = torch.tensor([1, 1, 1, 1, 1, 0], dtype=torch.bool)
    labels = torch.tensor([0, 0, 1, 2, 2, -1])
    batch = Batch(None, torch.zeros(6, dtype=torch.long), torch.ones(6, dtype=torch.bool),
                  torch.rand(6, 3, generator=g), has_pixel, labels, torch.randn(5, d, generator=g), None,
                  torch.arange(6), [6], [])
    local = torch.randn(6, d, generator=g, requires_grad=True)
    glob = torch.randn(6, d, generator=g, requires_grad=True)
    monkeypatch.setattr(objectives, "forward_net", lambda model, b: SimpleNamespace(local=local, global_=glob))
    off = SelfTrainingConfig(enabled=False)
    plain, s0 = objectives.PretrainObjective(PretrainLossConfig(self_training=off), text)(None, batch, 0, g)
    assert "lovasz" not in s0
    cfg = PretrainLossConfig(scr=ScrConfig(lovasz_weight=0.5, lovasz_temperature=0.1), self_training=off)
    total, s1 = objectives.PretrainObjective(cfg, text)(None, batch, 0, g)
    want = pseudo_label_lovasz(local[:5], text, labels[:5], 0.1)
    assert s1["lovasz"] == pytest.approx(float(want.detach()), abs=1e-6)
    assert float(total.detach()) == pytest.approx(float(plain.detach()) + 0.5 * float(want.detach()), abs=1e-5)
