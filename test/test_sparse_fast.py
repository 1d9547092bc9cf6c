"""Inference fast paths of the sparse backend against the straightforward computation.

* BatchNorm folded into the conv kernels (eval-mode inference) gives the unfolded output,
  on a real nuScenes sweep through every backbone, and is never used where it must not be;
* the NumPy sort / nonzero helpers of the kernel-map builders equal torch's;
* the gather–GEMM–reduce plan (bf16 path) equals the per-offset loop for every conv kind,
  and bf16 inference stays close to float32 on the real sweep.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from clip2scene_core.errors import ConfigError
from clip2scene_core.models import BACKBONES, ModelConfig, VoxelBatch, build_model
from clip2scene_core.sparse import Conv3d, SparseTensor, functional, set_precision
from clip2scene_core.sparse import fold as fold_mod
from clip2scene_core.sparse.plan import build_plan, run_plan
from clip2scene_core.sparse.sorting import nonzero_1d, sort_keys, unique_keys
from clip2scene_core.types import Scan
from clip2scene_core.voxelize import VoxelConfig, voxelize

NUSC = "nuscenes/mmdet3d_demo_scene-0061/n015-2018-07-24-11-22-45+0800__LIDAR_TOP__1532402927647951.pcd.bin"

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def sweep(data_dir: Path) -> Scan:
    """The real sweep within 20 m (about 15k points): every layer sees real neighbourhoods."""
    pts = np.fromfile(data_dir / NUSC, dtype=np.float32).reshape(-1, 5)
    return Scan(pts[np.hypot(pts[:, 0], pts[:, 1]) < 20][:, :4].copy())


def _model(backbone: str, seed: int = 0) -> torch.nn.Module:
    """Eval-mode model whose BatchNorms have non-trivial statistics (fresh ones are 0 / 1)."""
    torch.manual_seed(seed)
    cfg = ModelConfig(backbone=backbone, in_channels=1, embed_dim=16, width_multiplier=0.25,
                      voxel=VoxelConfig(voxel_size=0.1, features=("intensity",)))
    model = build_model(cfg).eval()
    g = torch.Generator().manual_seed(seed + 1)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm1d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.2)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            with torch.no_grad():
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.2)
    return model


def _batch(model: torch.nn.Module, scan: Scan) -> VoxelBatch:
    return VoxelBatch.from_voxels(voxelize(scan, model.config.voxel))


def _unfolded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Conv3d, "forward_folded", lambda self, x, norm: None)


@pytest.mark.parametrize("backbone", BACKBONES)
def test_folded_batchnorm_equals_unfolded_on_real_sweep(backbone: str, sweep: Scan,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    model = _model(backbone)
    batch = _batch(model, sweep)
    calls = []
    real = fold_mod.folded_weights
    monkeypatch.setattr("clip2scene_core.sparse.modules.folded_weights",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    with torch.inference_mode():
        folded = model.backbone(batch)
    assert calls, "eval-mode inference folds the BatchNorms"
    with monkeypatch.context() as mp:
        _unfolded(mp)
        with torch.inference_mode():
            ref = model.backbone(batch)
    torch.testing.assert_close(folded, ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()))
    assert (folded.argmax(1) == ref.argmax(1)).float().mean() > 0.999


def test_folding_follows_weight_changes_and_skips_training(sweep: Scan, monkeypatch: pytest.MonkeyPatch) -> None:
    model = _model("minkunet14a")
    batch = _batch(model, sweep)
    with torch.inference_mode():
        first = model.backbone(batch)
    # new weights (load_state_dict copies in place) must invalidate the cached folded kernels
    other = _model("minkunet14a", seed=5)
    model.load_state_dict(other.state_dict())
    with torch.inference_mode():
        after = model.backbone(batch)
        expect = other.backbone(batch)
    assert not torch.allclose(after, first)
    torch.testing.assert_close(after, expect)
    # training mode and recorded autograd never fold (batch statistics / gradients needed)
    calls = []
    real = fold_mod.folded_weights
    monkeypatch.setattr("clip2scene_core.sparse.modules.folded_weights",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    model.backbone(batch).sum().backward()           # eval mode, autograd on
    model.train()
    model.backbone(batch)
    assert not calls
    assert model.backbone.conv0p1s1.kernel.grad is not None


def test_sort_helpers_equal_torch() -> None:
    g = torch.Generator().manual_seed(0)
    for n, hi in ((0, 10), (1, 10), (1000, 50), (5000, 1 << 40)):
        keys = torch.randint(0, hi, (n,), generator=g)
        for bound in (hi, 1 << 62):          # packed NumPy path, and the torch fallback
            s, p = sort_keys(keys, bound)
            ts, tp = torch.sort(keys, stable=True)
            assert torch.equal(s, ts) and torch.equal(p, tp)
            u, inv = unique_keys(keys, bound)
            tu, tinv = torch.unique(keys, return_inverse=True)
            assert torch.equal(u, tu) and torch.equal(inv, tinv)
        mask = keys % 3 == 0
        assert torch.equal(nonzero_1d(mask), torch.nonzero(mask).squeeze(1))


def _random_sparse(seed: int, n: int = 300, cin: int = 5):
    g = torch.Generator().manual_seed(seed)
    xyz = torch.unique(torch.randint(-6, 6, (n, 3), generator=g), dim=0)
    coords = torch.cat([torch.zeros(len(xyz), 1, dtype=torch.int64), xyz], 1).to(torch.int32)
    return coords, torch.randn(len(coords), cin, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("cin", [1, 3, 7])
@pytest.mark.parametrize("row_multiple", [1, 256])
@pytest.mark.parametrize("k,s,transposed", [(3, 1, False), (5, 1, False), (2, 2, False), (3, 2, False),
                                            (2, 2, True), (3, 2, True)])
def test_plan_equals_per_offset_loop(k: int, s: int, transposed: bool, cin: int, row_multiple: int) -> None:
    coords, feats = _random_sparse(k * 10 + s, cin=cin)
    x = SparseTensor(feats, coords)
    kmap = functional.get_kernel_map(x, k, s, 1)
    if transposed:
        ins, outs, n_out = kmap.out_rows, kmap.in_rows, kmap.in_coords.shape[0]
        feats = torch.randn(kmap.out_coords.shape[0], cin, dtype=torch.float64)
    else:
        ins, outs, n_out = kmap.in_rows, kmap.out_rows, kmap.out_coords.shape[0]
    weight = torch.randn(k ** 3, cin, 6, dtype=torch.float64)
    bias = torch.randn(6, dtype=torch.float64)
    ref = functional._forward(feats, weight, ins, outs, n_out, kmap.identity) + bias
    plan = build_plan(ins, outs, n_out, kmap.identity, row_multiple)
    torch.testing.assert_close(run_plan(plan, feats, weight, bias), ref, rtol=1e-12, atol=1e-12)


def test_bf16_precision_close_to_fp32_on_real_sweep(sweep: Scan, monkeypatch: pytest.MonkeyPatch) -> None:
    model = _model("minkunet14a")
    batch = _batch(model, sweep)
    with torch.inference_mode():
        assert set_precision(model, "fp32") == "fp32"
        ref = model.backbone(batch)
        assert set_precision(model, "bf16") == "bf16"
        low = model.backbone(batch)
    assert low.dtype == torch.float32 and not torch.equal(low, ref), "bf16 GEMMs ran"
    assert F.cosine_similarity(low, ref, dim=1).min() > 0.99
    assert (low.argmax(1) == ref.argmax(1)).float().mean() > 0.95
    # autograd (training) ignores the inference precision
    out = model.backbone(batch)
    with torch.no_grad():
        set_precision(model, "fp32")
    torch.testing.assert_close(out.detach(), model.backbone(batch).detach())
    # auto: bf16 only where the CPU has native bf16
    monkeypatch.setattr("clip2scene_core.device.cpu_has_fast_bf16", lambda: False)
    assert set_precision(model, "auto") == "fp32"
    monkeypatch.setattr("clip2scene_core.device.cpu_has_fast_bf16", lambda: True)
    assert fold_mod.resolve_sparse_precision("auto", "cpu") == "bf16"
    with pytest.raises(ConfigError):
        set_precision(model, "fp16")


@pytest.mark.parametrize("max_rows", [1, 300, 8192])
def test_chunked_loop_equals_per_offset_loop_on_real_sweep(sweep: Scan, max_rows: int) -> None:
    model = _model("minkunet14a")
    batch = _batch(model, sweep)
    x = SparseTensor(batch.features, batch.coords)
    g = torch.Generator().manual_seed(0)
    for k, s in ((3, 1), (2, 2)):
        kmap = functional.get_kernel_map(x, k, s, 1)
        n_in, n_out = kmap.in_coords.shape[0], kmap.out_coords.shape[0]
        weight = torch.randn(k ** 3, 8, 5, generator=g)
        for ins, outs, rows_in, rows_out in ((kmap.in_rows, kmap.out_rows, n_in, n_out),
                                             (kmap.out_rows, kmap.in_rows, n_out, n_in)):   # transposed
            feats = torch.randn(rows_in, 8, generator=g)
            chunks = functional._chunks(ins, outs, kmap.identity, max_rows)
            assert sum(c.ins.numel() for c in chunks) == sum(
                i.numel() for j, i in enumerate(ins) if j != kmap.identity)
            ref = functional._forward(feats, weight, ins, outs, rows_out, kmap.identity)
            got = functional._forward(feats, weight, ins, outs, rows_out, kmap.identity, chunks=chunks)
            torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)


def test_segmenter_sparse_precision_labels_the_real_sweep_like_fp32(sweep: Scan) -> None:
    """``SegmenterConfig.sparse_precision`` (node / replay parameter ``sparse_precision``)
    reaches every conv; bf16 labels the real sweep like fp32; a bad value is a ConfigError."""
    from clip2scene_core.segmenter import Segmenter, SegmenterConfig
    from clip2scene_ros.node_config import from_parameters

    model = _model("minkunet14a")
    emb = F.normalize(torch.randn(6, 16, generator=torch.Generator().manual_seed(3)), dim=1)
    from clip2scene_core.clip.vocabulary import Vocabulary

    names = Vocabulary("test", [f"class{i}" for i in range(6)])
    segs = {p: Segmenter(model, model.config, names, emb, config=SegmenterConfig(device="cpu", sparse_precision=p))
            for p in ("fp32", "bf16")}
    assert {p: s.sparse_precision for p, s in segs.items()} == {"fp32": "fp32", "bf16": "bf16"}
    convs = [m for m in segs["bf16"].model.modules() if isinstance(m, Conv3d)]
    assert convs and all(m.precision == "bf16" for m in convs)
    for m in convs:           # one shared model: back to fp32 for the reference
        m.precision = "fp32"
    ref = segs["fp32"].segment(sweep)
    for m in convs:
        m.precision = "bf16"
    low = segs["bf16"].segment(sweep)
    assert np.array_equal(ref.valid, low.valid)
    assert (ref.labels == low.labels).mean() > 0.97
    with pytest.raises(ConfigError, match="sparse precision"):
        Segmenter(model, model.config, names, emb, config=SegmenterConfig(device="cpu", sparse_precision="fp16"))
    with pytest.raises(ConfigError, match="sparse_precision"):
        from_parameters({"sparse_precision": "fp16"})
    assert from_parameters({"sparse_precision": "bf16"}).sparse_precision == "bf16"
