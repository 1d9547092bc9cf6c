"""MaskCLIP's key smoothing and prompt denoising (clip2scene_core.clip.refine) and their
ClipTeacher wiring: keys from the same forward, checked against open_clip's own forward;
option off = today's features and cache identity.

Maps are built from RELLIS-3D's real 2D annotation (a piecewise-constant class image) and a
real nuScenes camera image; models are tiny random open_clip towers (no weights here).
"""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from clip2scene_core.clip import ClipTeacher, KeySmoothing, kept_classes, key_smoothing, prompt_denoise
from clip2scene_core.clip.maskclip import dense_forward, dense_forward_with_keys
from clip2scene_core.clip.refine import class_confidence, smooth_features
from clip2scene_core.errors import ConfigError

TEXT_CFG = {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}
VIT_CFG = {"embed_dim": 24, "vision_cfg": {"image_size": 64, "layers": 2, "width": 48, "patch_size": 16,
                                           "head_width": 16}, "text_cfg": TEXT_CFG}
RN_CFG = {"embed_dim": 24, "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 8,
                                          "head_width": 16}, "text_cfg": TEXT_CFG}
NUM_RELLIS = 19


@pytest.fixture(scope="module")
def rellis_grid(data_dir: Path) -> np.ndarray:
    """(30, 48) class indices: RELLIS-3D frame 104's 2D labels, nearest-downsampled."""
    from clip2scene_core.datasets.classes import rellis3d_to_index
    from clip2scene_core.teachers import read_label_image

    raw = read_label_image(data_dir / "rellis3d/utils_example/frame000104-1581624663_149.png")
    small = cv2.resize(raw, (48, 30), interpolation=cv2.INTER_NEAREST)
    labels = rellis3d_to_index(small.astype(np.int64))
    assert (labels >= 0).all() and len(np.unique(labels)) >= 6
    return labels


@pytest.fixture(scope="module")
def cam_front(data_dir: Path) -> np.ndarray:
    path = next((data_dir / "nuscenes" / "mmdet3d_demo_scene-0061").glob("*__CAM_FRONT__*.jpg"))
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    return np.ascontiguousarray(bgr[:, :, ::-1])


@pytest.fixture(scope="module")
def vit() -> ClipTeacher:
    return ClipTeacher.from_config(VIT_CFG, seed=0)


def _unit(n: int, d: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=1)


def _class_map(labels: np.ndarray, vectors: torch.Tensor, noise: float, seed: int) -> torch.Tensor:
    """(D, h, w): each cell its class vector plus isotropic Gaussian noise of norm ≈ ``noise``."""
    clean = vectors[torch.from_numpy(labels)].permute(2, 0, 1)
    g = torch.Generator().manual_seed(seed)
    return clean + noise * torch.randn(clean.shape, generator=g) / clean.shape[0] ** 0.5


# --- key smoothing ---------------------------------------------------------------------------
def test_key_smoothing_equals_explicit_weighted_mean(rellis_grid):
    """The batched matrix form equals the definition, patch by patch."""
    labels = rellis_grid[::3, ::4]                                   # 10 x 12
    values = _class_map(labels, _unit(NUM_RELLIS, 8, 0), 1.0, 1)
    keys = _class_map(labels, _unit(NUM_RELLIS, 6, 2), 0.8, 3)
    for thr, top_k, temp in [(0.5, None, None), (0.0, 7, None), (-1.0, None, 0.2)]:
        got = key_smoothing(values, keys, thr, top_k, temp)
        k = F.normalize(keys.flatten(1), dim=0)
        v = values.flatten(1)
        want = torch.empty_like(v)
        for i in range(k.shape[1]):
            sim = k[:, i] @ k
            sim[i] = 1.0
            keep = sim >= thr
            if top_k is not None:
                keep &= sim >= torch.sort(sim, descending=True).values[top_k - 1]
            w = (sim.clamp_min(0) if temp is None else torch.exp((sim - 1) / temp)) * keep
            want[:, i] = (v * w).sum(1) / w.sum()
        torch.testing.assert_close(got, want.reshape(values.shape), rtol=1e-5, atol=1e-6)


def test_key_smoothing_keeps_a_constant_map(vit, cam_front):
    """Rows of weights sum to one: a constant map is unchanged, whatever the keys (real ones)."""
    x, _ = vit.prepare(cam_front)
    _, _, keys = dense_forward_with_keys(vit.model.visual, x)
    values = torch.randn(5, 1, 1).expand(5, *keys.shape[2:]).contiguous()
    for thr, top_k, temp in [(0.5, None, None), (-1.0, None, None), (0.0, 3, 0.1)]:
        torch.testing.assert_close(key_smoothing(values, keys[0], thr, top_k, temp), values)


def test_key_smoothing_reduces_noise_on_a_piecewise_constant_map(rellis_grid):
    """Keys that group cells by region (class vectors + independent noise) average the noise
    of each region away: the error to the clean map and the label error both drop."""
    vectors = _unit(NUM_RELLIS, 32, 0)
    clean = vectors[torch.from_numpy(rellis_grid)].permute(2, 0, 1)
    noisy = _class_map(rellis_grid, vectors, 2.0, 1)
    keys = _class_map(rellis_grid, _unit(NUM_RELLIS, 16, 2), 0.5, 3)
    smoothed = key_smoothing(noisy, keys, threshold=0.5)
    err_before = float(((noisy - clean) ** 2).sum(0).mean())
    err_after = float(((smoothed - clean) ** 2).sum(0).mean())
    assert err_after < 0.2 * err_before
    truth = torch.from_numpy(rellis_grid)
    wrong = [float((torch.einsum("dhw,kd->khw", m, vectors).argmax(0) != truth).float().mean())
             for m in (noisy, smoothed)]
    assert wrong[0] > 0.1 and wrong[1] < 0.5 * wrong[0]


def test_key_smoothing_edge_cases_and_errors(rellis_grid):
    values = _class_map(rellis_grid, _unit(NUM_RELLIS, 8, 0), 1.0, 1)
    keys = _class_map(rellis_grid, _unit(NUM_RELLIS, 6, 2), 1.0, 3)
    # only the patch itself counts: nothing changes
    torch.testing.assert_close(key_smoothing(values, keys, top_k=1), values)
    torch.testing.assert_close(key_smoothing(values, keys, threshold=1.0), values)
    # a batch equals its images one by one
    both = key_smoothing(torch.stack([values, values.flip(1)]), torch.stack([keys, keys.flip(1)]))
    torch.testing.assert_close(both[1], key_smoothing(values.flip(1), keys.flip(1)))
    with pytest.raises(ConfigError):
        key_smoothing(values, keys[:, :-1])
    with pytest.raises(ConfigError):
        key_smoothing(values.flatten(1), keys)
    for bad in ({"threshold": 1.5}, {"top_k": 0}, {"temperature": 0.0}, {"enabled": "yes"}):
        with pytest.raises(ConfigError):
            KeySmoothing(**bad)


# --- keys from the dense path ----------------------------------------------------------------
def test_vit_keys_come_from_the_same_forward_and_match_open_clip(vit, cam_front):
    """One pass through the trunk; the keys equal k_proj(ln_1(x)) of the last block's input
    captured from open_clip's own, unmodified forward at the native grid."""
    visual = vit.model.visual
    x = torch.from_numpy(cv2.resize(cam_front, (64, 64))).permute(2, 0, 1)[None].float() / 255
    calls = []
    hook = visual.transformer.resblocks[0].register_forward_hook(lambda *a: calls.append(1))
    try:
        dense, pooled, keys = dense_forward_with_keys(visual, x)
    finally:
        hook.remove()
    assert len(calls) == 1                      # the first block ran once: no second pass
    d0, p0 = dense_forward(visual, x)
    assert torch.equal(dense, d0) and torch.equal(pooled, p0)

    last = visual.transformer.resblocks[-1]
    seen = {}
    hook = last.register_forward_pre_hook(lambda m, inp: seen.setdefault("x", inp[0].detach()))
    try:
        with torch.no_grad():
            visual(x)
    finally:
        hook.remove()
    t = seen["x"] if getattr(visual.transformer, "batch_first", True) else seen["x"].transpose(0, 1)
    c = last.attn.embed_dim
    k = F.layer_norm(t, (c,), last.ln_1.weight, last.ln_1.bias, last.ln_1.eps)
    k = k @ last.attn.in_proj_weight[c:2 * c].T + last.attn.in_proj_bias[c:2 * c]
    want = k[:, 1:].reshape(1, 4, 4, c).permute(0, 3, 1, 2)
    torch.testing.assert_close(keys, want, rtol=1e-4, atol=1e-5)


def test_resnet_keys_match_the_attention_pool():
    """ResNet: the keys are the pool's k_proj of each cell plus its positional embedding."""
    rn = ClipTeacher.from_config(RN_CFG, seed=0)
    visual = rn.model.visual
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    seen = {}
    hook = visual.attnpool.register_forward_pre_hook(lambda m, inp: seen.setdefault("f", inp[0].detach()))
    try:
        dense, _, keys = dense_forward_with_keys(visual, x)
    finally:
        hook.remove()
    assert torch.equal(dense, dense_forward(visual, x)[0])
    pool = visual.attnpool
    f = seen["f"]                              # 64 px = the pool's native 2x2 grid: it ran
    tokens = f.flatten(2).transpose(1, 2) + pool.positional_embedding[1:]
    want = (tokens @ pool.k_proj.weight.T + pool.k_proj.bias).transpose(1, 2).reshape(keys.shape)
    torch.testing.assert_close(keys, want, rtol=1e-4, atol=1e-5)


def test_teacher_option_off_is_todays_features_and_on_smooths(vit, cam_front):
    off = ClipTeacher(vit.model, "custom", vit.tokenizer, key_smoothing=KeySmoothing())
    assert torch.equal(off.dense_features(cam_front), vit.dense_features(cam_front))
    assert off.identity() == vit.identity() and "key_smoothing" not in vit.identity()

    cfg = KeySmoothing(enabled=True, threshold=0.3)
    on = ClipTeacher(vit.model, "custom", vit.tokenizer, key_smoothing=cfg)
    x, _ = vit.prepare(cam_front)
    d, _, k = dense_forward_with_keys(vit.model.visual, x)
    got = on.dense_features(cam_front)
    torch.testing.assert_close(got, smooth_features(d, k, cfg))
    assert not torch.allclose(got, vit.dense_features(cam_front), atol=1e-3)
    torch.testing.assert_close(got.norm(dim=1), torch.ones(got.shape[0], *got.shape[2:]))
    assert on.identity()["key_smoothing"]["threshold"] == 0.3            # a separate cache key
    # smoothing the features = smoothing the cosine scores, up to one positive factor per cell
    text = _unit(7, vit.embed_dim, 5)
    s_feat = torch.einsum("bdhw,kd->bkhw", got, text)
    s_score = key_smoothing(torch.einsum("bdhw,kd->bkhw", F.normalize(d, dim=1), text), k,
                            cfg.threshold)
    ratio = s_feat / s_score
    torch.testing.assert_close(ratio, ratio[:, :1].expand_as(ratio), rtol=1e-3, atol=1e-4)
    assert (ratio > 0).all()


# --- prompt denoising ------------------------------------------------------------------------
def _scores(labels: np.ndarray, noise: float, seed: int, k: int = NUM_RELLIS) -> torch.Tensor:
    text = _unit(k, 64, 0)
    feats = F.normalize(_class_map(labels, text, noise, seed), dim=0)
    return torch.einsum("dhw,kd->khw", feats, text)


@pytest.mark.parametrize("threshold", [0.3, 0.5, 0.9, 0.999])
def test_prompt_denoise_removes_exactly_the_classes_below_threshold(rellis_grid, threshold):
    scores = _scores(rellis_grid, 3.0, 1)
    conf = torch.softmax(100.0 * scores, dim=0)
    out = prompt_denoise(scores, threshold)
    top = int(conf.flatten(1).max(1).values.argmax())
    for c in range(scores.shape[0]):
        removed = bool(torch.isinf(out[c]).all())
        below = bool((conf[c] < threshold).all())
        assert removed == (below and c != top), (c, removed, below)
        if not removed:
            assert torch.equal(out[c], scores[c])
    assert not torch.isinf(out[top]).any()
    if threshold == 0.5:   # with little noise exactly the classes absent from the image go
        absent = set(range(NUM_RELLIS)) - set(np.unique(rellis_grid).tolist())
        removed = ~kept_classes(_scores(rellis_grid, 1.0, 1), threshold)
        assert set(torch.nonzero(removed).flatten().tolist()) == absent


def test_prompt_denoise_keeps_the_top_class_when_all_are_below(rellis_grid):
    scores = _scores(rellis_grid, 3.0, 1)
    keep = kept_classes(scores, threshold=1.0, logit_scale=1.0)   # nobody reaches 1.0
    top = int(class_confidence(scores, 1.0).flatten(1).max(1).values.argmax())
    assert keep.sum() == 1 and keep[top]
    assert (prompt_denoise(scores, 1.0, 1.0).argmax(0) == top).all()
    batch = kept_classes(torch.stack([scores, scores.flip(2)]), 0.5)
    assert torch.equal(batch[0], kept_classes(scores, 0.5)) and torch.equal(batch[1], batch[0])
    with pytest.raises(ConfigError):
        kept_classes(scores, 1.5)


def test_prompt_denoising_fixes_low_confidence_wins_of_absent_classes(rellis_grid):
    """The case MaskCLIP targets: absent prompts win scattered cells, always by a small margin
    shared with another absent prompt (confidence < 0.5). Denoising gives those cells back to
    the true class and changes no other cell."""
    scores = _scores(rellis_grid, 1.0, 1)
    truth = torch.from_numpy(rellis_grid)
    absent = sorted(set(range(NUM_RELLIS)) - set(np.unique(rellis_grid).tolist()))
    hit = torch.rand(truth.shape, generator=torch.Generator().manual_seed(0)) < 0.1
    own = scores.gather(0, truth[None])[0]
    for c in absent[:2]:                     # two near-tied intruders: each ~0.35 confident
        scores[c][hit] = own[hit] + 0.002
    before = scores.argmax(0)
    assert bool((before[hit] != truth[hit]).all()) and torch.equal(before[~hit], truth[~hit])
    assert float(class_confidence(scores)[absent[0]].max()) < 0.5
    after = prompt_denoise(scores, 0.5).argmax(0)
    assert torch.equal(after, truth)


def test_teacher_dense_scores(vit, cam_front):
    text = _unit(6, vit.embed_dim, 3)
    plain = vit.dense_scores(cam_front, text)
    want = torch.einsum("bdhw,kd->bkhw", vit.dense_features(cam_front), text)
    torch.testing.assert_close(plain, want)
    scale = float(vit.model.logit_scale.exp())
    torch.testing.assert_close(vit.dense_scores(cam_front, text, denoise_threshold=0.5),
                               prompt_denoise(want, 0.5, scale))
    with pytest.raises(ConfigError):
        vit.dense_scores(cam_front, text[:, :-1])
