"""The pure-PyTorch sparse conv against dense torch conv3d / conv_transpose3d.

Sparse random grids are embedded in a dense grid with a zero margin, so every voxel the
sparse conv produces lies inside the dense output and every dense output the sparse conv
skips must be zero.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from clip2scene_core.errors import ConfigError, InvalidPointCloudError
from clip2scene_core.sparse import (BatchNorm, Conv3d, ReLU, SparseTensor, backend_name, cat,
                                    kernel_offsets, torchsparse_available)
from clip2scene_core.sparse import kernel_map as kmap_mod

G = 12          # dense grid edge
MARGIN = 3      # empty border so strided / transposed outputs stay inside the dense grid
CIN, COUT = 3, 4


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(autouse=True, params=["gather-scatter", "im2col"])
def conv_path(request, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run every test through both forward paths: the per-offset gather–matmul–scatter used
    for wide layers, and the single dense GEMM used for narrow (stem) layers."""
    import clip2scene_core.sparse.functional as functional

    monkeypatch.setattr(functional, "IM2COL_MAX_CIN", 0 if request.param == "gather-scatter" else 1 << 30)
    return request.param


def random_sparse(seed: int, n: int = 120, batch: int = 2, lo: int = -5):
    """Random unique voxels with signed coords in [lo + MARGIN, lo + G - MARGIN)."""
    g = torch.Generator().manual_seed(seed)
    coords = []
    for b in range(batch):
        xyz = torch.randint(lo + MARGIN, lo + G - MARGIN, (n, 3), generator=g)
        xyz = torch.unique(xyz, dim=0)
        coords.append(torch.cat([torch.full((len(xyz), 1), b), xyz], 1))
    coords = torch.cat(coords).to(torch.int32)
    coords = coords[torch.randperm(len(coords), generator=g)]   # unsorted on purpose
    feats = torch.randn(len(coords), CIN, generator=g, dtype=torch.float64)
    return coords, feats


def to_dense(coords: torch.Tensor, feats: torch.Tensor, lo: int, size: int, batch: int = 2):
    c = coords.long()
    dense = feats.new_zeros(batch, feats.shape[1], size, size, size)
    dense[c[:, 0], :, c[:, 1] - lo, c[:, 2] - lo, c[:, 3] - lo] = feats
    return dense


def dense_at(dense: torch.Tensor, coords: torch.Tensor, lo: int) -> torch.Tensor:
    c = coords.long()
    return dense[c[:, 0], :, c[:, 1] - lo, c[:, 2] - lo, c[:, 3] - lo]


def dense_weight(kernel: torch.Tensor, k: int, dilation: int) -> torch.Tensor:
    """torchsparse [K³, Cin, Cout] → torch (Cout, Cin, k, k, k) via the documented offsets."""
    kern = kernel if kernel.dim() == 3 else kernel[None]
    off = kernel_offsets(k, dilation) // dilation + (k - 1) // 2
    w = kern.new_zeros(kern.shape[2], kern.shape[1], k, k, k)
    w[:, :, off[:, 0], off[:, 1], off[:, 2]] = kern.permute(2, 1, 0)
    return w


def sparse_weight_grad(dense_grad: torch.Tensor, k: int, dilation: int, transposed: bool) -> torch.Tensor:
    off = kernel_offsets(k, dilation) // dilation + (k - 1) // 2
    g = dense_grad[:, :, off[:, 0], off[:, 1], off[:, 2]]        # (A, B, K)
    return g.permute(2, 0, 1) if transposed else g.permute(2, 1, 0)


def make_conv(k: int, s: int = 1, d: int = 1, transposed: bool = False, bias: bool = True,
              cin: int = CIN, cout: int = COUT) -> Conv3d:
    torch.manual_seed(k * 100 + s * 10 + d)
    return Conv3d(cin, cout, kernel_size=k, stride=s, dilation=d, bias=bias, transposed=transposed).double()


@pytest.mark.parametrize("k,d", [(3, 1), (3, 2), (5, 1), (1, 1), (2, 1)])
def test_submanifold_matches_dense(k: int, d: int) -> None:
    lo = -5
    coords, feats = random_sparse(1 + k + d)
    feats.requires_grad_(True)
    conv = make_conv(k, 1, d)
    y = conv(SparseTensor(feats, coords))
    assert torch.equal(y.coords, coords) and y.stride == 1

    dense_in = to_dense(coords, feats.detach(), lo, G).requires_grad_(True)
    w = dense_weight(conv.kernel.detach(), k, d).requires_grad_(True)
    if k % 2:
        ref = F.conv3d(dense_in, w, conv.bias.detach(), padding=(k - 1) // 2 * d, dilation=d)
    else:   # even kernels look forward only (offsets 0..k-1)
        ref = F.conv3d(F.pad(dense_in, (0, k - 1) * 3), w, conv.bias.detach(), dilation=d)
    ref_at = dense_at(ref, coords, lo)
    torch.testing.assert_close(y.feats, ref_at, rtol=1e-10, atol=1e-10)

    g = torch.randn_like(y.feats)
    (y.feats * g).sum().backward()
    (ref_at * g).sum().backward()
    torch.testing.assert_close(feats.grad, dense_at(dense_in.grad, coords, lo), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(conv.kernel.grad.reshape(-1, CIN, COUT),
                               sparse_weight_grad(w.grad, k, d, False), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(conv.bias.grad, g.sum(0))


@pytest.mark.parametrize("k", [2, 3, 1])
def test_strided_conv_matches_dense(k: int) -> None:
    lo = -6   # even, so floor(c / 2) lands on the dense stride-2 grid
    coords, feats = random_sparse(10 + k, lo=lo)
    feats.requires_grad_(True)
    conv = make_conv(k, 2)
    y = conv(SparseTensor(feats, coords))
    assert y.stride == 2
    oc = y.coords.long()
    assert torch.equal(torch.unique(oc, dim=0), oc), "output coords sorted and unique"
    if k == 2 or k == 1:
        down = torch.div(coords[:, 1:].long(), 2, rounding_mode="floor")
        expect = torch.unique(torch.cat([coords[:, :1].long(), down], 1), dim=0)
        assert torch.equal(oc, expect)

    dense_in = to_dense(coords, feats.detach(), lo, G).requires_grad_(True)
    w = dense_weight(conv.kernel.detach(), k, 1).requires_grad_(True)
    ref = F.conv3d(dense_in, w, None, stride=2, padding=(k - 1) // 2 if k % 2 else 0)
    ref_at = dense_at(ref, y.coords, lo // 2)
    torch.testing.assert_close(y.feats - conv.bias.detach(), ref_at, rtol=1e-10, atol=1e-10)
    # no dense output is non-zero where the sparse conv produced no voxel
    mask = torch.ones(ref.shape[0], *ref.shape[2:], dtype=torch.bool)
    mask[oc[:, 0], oc[:, 1] - lo // 2, oc[:, 2] - lo // 2, oc[:, 3] - lo // 2] = False
    assert ref.detach().permute(0, 2, 3, 4, 1)[mask].abs().max() == 0

    g = torch.randn_like(y.feats)
    (y.feats * g).sum().backward()
    (ref_at * g).sum().backward()
    torch.testing.assert_close(feats.grad, dense_at(dense_in.grad, coords, lo), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(conv.kernel.grad.reshape(-1, CIN, COUT),
                               sparse_weight_grad(w.grad, k, 1, False), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("k", [2, 3])
def test_transposed_conv_matches_dense(k: int) -> None:
    lo = -6
    coords, feats = random_sparse(20 + k, lo=lo)
    down = make_conv(k, 2, cin=CIN, cout=CIN)
    x = SparseTensor(feats, coords)
    coarse = down(x)
    cf = coarse.feats.detach().clone().requires_grad_(True)
    up = make_conv(k, 2, transposed=True)
    y = up(SparseTensor(cf, coarse.coords, coarse.stride, coarse.cache))
    assert y.stride == 1 and torch.equal(y.coords, coords), "upsampled onto the cached finer voxels"

    dense_c = to_dense(coarse.coords, cf.detach(), lo // 2, G // 2).requires_grad_(True)
    wk = up.kernel.detach()
    w = dense_weight(wk, k, 1).transpose(0, 1).contiguous().requires_grad_(True)  # (Cin, Cout, k,k,k)
    pad = (k - 1) // 2
    ref = F.conv_transpose3d(dense_c, w, None, stride=2, padding=pad, output_padding=1 if k % 2 else 0)
    ref_at = dense_at(ref, coords, lo)
    torch.testing.assert_close(y.feats - up.bias.detach(), ref_at, rtol=1e-10, atol=1e-10)

    g = torch.randn_like(y.feats)
    (y.feats * g).sum().backward()
    (ref_at * g).sum().backward()
    torch.testing.assert_close(cf.grad, dense_at(dense_c.grad, coarse.coords, lo // 2), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(up.kernel.grad, sparse_weight_grad(w.grad, k, 1, True), rtol=1e-10, atol=1e-10)


def test_kernel_offset_order_is_torchsparse_layout() -> None:
    o3 = kernel_offsets(3)
    assert o3.shape == (27, 3)
    assert o3[0].tolist() == [-1, -1, -1] and o3[1].tolist() == [0, -1, -1]   # x fastest
    assert o3[3].tolist() == [-1, 0, -1] and o3[9].tolist() == [-1, -1, 0]
    assert o3[13].tolist() == [0, 0, 0]
    o2 = kernel_offsets(2)
    assert o2[1].tolist() == [0, 0, 1] and o2[4].tolist() == [1, 0, 0]      # z fastest
    assert (kernel_offsets(3, 2) == 2 * o3).all()


def test_parameter_shapes_follow_torchsparse() -> None:
    assert Conv3d(4, 8, 3).kernel.shape == (27, 4, 8)
    assert Conv3d(4, 8, 2, stride=2).kernel.shape == (8, 4, 8)
    assert Conv3d(4, 8, 1).kernel.shape == (4, 8)
    assert Conv3d(4, 8, 1, stride=2).kernel.shape == (1, 4, 8)
    assert Conv3d(4, 8, 3, bias=True).bias.shape == (8,)
    assert set(Conv3d(4, 8, 3).state_dict()) == {"kernel"}
    bn = BatchNorm(8)
    assert set(bn.state_dict()) == {"weight", "bias", "running_mean", "running_var", "num_batches_tracked"}


def test_kernel_maps_are_cached_and_reused(monkeypatch: pytest.MonkeyPatch) -> None:
    coords, feats = random_sparse(5)
    calls = []
    real = kmap_mod.build_kernel_map

    def counting(*args, **kw):
        calls.append(args[1:4])
        return real(*args, **kw)

    from clip2scene_core.sparse import functional
    monkeypatch.setattr(functional, "build_kernel_map", counting)
    c1, c2 = make_conv(3, cin=CIN, cout=CIN), make_conv(3, cin=CIN, cout=CIN)
    x = SparseTensor(feats, coords)
    y = ReLU()(c2(ReLU()(c1(x))))
    assert len(calls) == 1, "second submanifold conv reuses the first one's map"
    assert y.cache is x.cache and (1, 3, 1, 1) in x.cache.kmaps
    down = make_conv(2, 2, cin=CIN, cout=CIN)
    z = down(y)
    z2 = make_conv(2, 2, cin=CIN, cout=CIN)(y)
    assert len(calls) == 2 and z2.coords is z.coords
    up = make_conv(2, 2, transposed=True, cin=CIN, cout=CIN)(z)
    assert len(calls) == 2, "transposed conv reads the downsampling map"
    assert cat([up, y]).feats.shape == (len(coords), 2 * CIN)


def test_deterministic() -> None:
    coords, feats = random_sparse(7)
    outs = []
    for _ in range(2):
        f = feats.clone().float().requires_grad_(True)
        conv = make_conv(3).float()
        down = make_conv(2, 2, cin=COUT, cout=COUT).float()
        y = down(conv(SparseTensor(f, coords)))
        y.feats.square().sum().backward()
        outs.append((y.feats.detach(), f.grad, conv.kernel.grad))
    for a, b in zip(*outs):
        assert torch.equal(a, b)


def test_bad_inputs_raise() -> None:
    coords, feats = random_sparse(3)
    with pytest.raises(InvalidPointCloudError):
        SparseTensor(feats, coords[:, :3])
    with pytest.raises(InvalidPointCloudError):
        SparseTensor(feats[:-1], coords)
    dup = torch.cat([coords, coords[:1]])
    with pytest.raises(InvalidPointCloudError, match="duplicate"):
        make_conv(3)(SparseTensor(torch.cat([feats, feats[:1]]), dup))
    with pytest.raises(ValueError, match="channels"):
        make_conv(3, cin=5)(SparseTensor(feats, coords))
    with pytest.raises(ValueError, match="kernel map"):
        make_conv(2, 2, transposed=True)(SparseTensor(feats, coords, stride=2))


def test_backend_selection(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLIP2SCENE_SPARSE_BACKEND", "torch")
    assert backend_name() == "torch"
    assert backend_name("cpu") == "torch"
    monkeypatch.setenv("CLIP2SCENE_SPARSE_BACKEND", "bogus")
    with pytest.raises(ConfigError):
        backend_name()
    monkeypatch.setenv("CLIP2SCENE_SPARSE_BACKEND", "torchsparse")
    if torchsparse_available():
        assert backend_name() == "torchsparse"
    else:
        with pytest.raises(ConfigError, match="torchsparse"):
            backend_name()


@pytest.mark.skipif(not (torchsparse_available() and torch.cuda.is_available()),
                    reason="torchsparse and CUDA not available")
def test_torchsparse_backend_matches_pure(monkeypatch: pytest.MonkeyPatch) -> None:
    coords, feats = random_sparse(9)
    conv = make_conv(3).float().cuda()
    down = make_conv(2, 2, cin=COUT, cout=COUT).float().cuda()
    outs = {}
    for name in ("torch", "torchsparse"):
        monkeypatch.setenv("CLIP2SCENE_SPARSE_BACKEND", name)
        x = SparseTensor(feats.float().cuda(), coords.cuda())
        y = down(conv(x))
        order = np.lexsort(y.coords.cpu().numpy().T[::-1])
        outs[name] = (y.coords.cpu()[order], y.feats.detach().cpu()[order])
    assert torch.equal(outs["torch"][0], outs["torchsparse"][0])
    torch.testing.assert_close(outs["torch"][1], outs["torchsparse"][1], rtol=1e-3, atol=1e-3)


NUSC = "nuscenes/mmdet3d_demo_scene-0061/n015-2018-07-24-11-22-45+0800__LIDAR_TOP__1532402927647951.pcd.bin"


def test_point_voxel_transfers_on_real_scan(data_dir) -> None:
    """point_to_voxel reproduces voxelize's means; voxel_to_point interpolates a linear field
    exactly wherever all 8 neighbouring voxels exist; the backward is Sᵀ·grad."""
    from clip2scene_core.models import VoxelBatch
    from clip2scene_core.sparse.points import PointTensor, point_to_voxel, voxel_to_point
    from clip2scene_core.types import Scan
    from clip2scene_core.voxelize import VoxelConfig, voxelize

    pts = np.fromfile(data_dir / NUSC, dtype=np.float32).reshape(-1, 5)
    v = voxelize(Scan(pts, ("x", "y", "z", "intensity", "ring")), VoxelConfig(0.5, features=("intensity", "xyz")))
    b = VoxelBatch.from_voxels(v)
    x = SparseTensor(b.features, b.coords)
    z = PointTensor(b.point_features, b.point_coords)
    torch.testing.assert_close(point_to_voxel(x, z).feats, b.features, rtol=1e-5, atol=1e-4)

    for stride_conv in (None, make_conv(2, 2, cin=4, cout=4).float()):
        xs = x if stride_conv is None else stride_conv(x)
        centres = (xs.coords[:, 1:].double() + 0.5) * xs.stride            # in finest-voxel units
        field = torch.cat([centres, centres.sum(1, keepdim=True) * 0.5], 1).float().requires_grad_(True)
        out = voxel_to_point(xs.replace(field), z).feats
        q = z.coords[:, 1:].double() / xs.stride - 0.5
        base = torch.floor(q).long()
        def pack(c: np.ndarray) -> np.ndarray:   # independent of the library's lookup tables
            c = c.astype(np.int64) + 4096
            return ((c[:, 0] * 8192 + c[:, 1]) * 8192 + c[:, 2]) * 8192 + c[:, 3]

        keys = pack(xs.coords.numpy())
        full = np.ones(len(q), dtype=bool)
        for corner in range(8):
            bits = np.array([(corner >> 2) & 1, (corner >> 1) & 1, corner & 1])
            nb = np.concatenate([z.coords[:, :1].numpy(), base.numpy() + bits], 1)
            full &= np.isin(pack(nb), keys)
        full = torch.from_numpy(full)
        assert full.sum() > 100
        expect = torch.cat([z.coords[:, 1:].double(), z.coords[:, 1:].double().sum(1, keepdim=True) * 0.5], 1)
        torch.testing.assert_close(out[full].double(), expect[full], rtol=1e-5, atol=1e-3)
        g = torch.randn_like(out)
        (out * g).sum().backward()
        xs2 = SparseTensor(field.detach().double(), xs.coords, xs.stride)
        dense = torch.zeros(len(out), len(field), dtype=torch.float64)
        for j in range(len(field)):                         # columns of S, one unit vector at a time
            if j >= 40:
                break
            e = torch.zeros(len(field), 1, dtype=torch.float64)
            e[j] = 1
            dense[:, j] = voxel_to_point(xs2.replace(e), z).feats[:, 0].double()
        torch.testing.assert_close(field.grad[:40].double(), dense[:, :40].t() @ g.double(), rtol=1e-4, atol=1e-4)
