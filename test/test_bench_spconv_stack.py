"""The spconv twin used by benchmarks/backbone_throughput.py computes our network.

Without spconv: the weight-layout conversion (`krsc_weight`, spconv's [Cout, kx, ky, kz,
Cin]) is checked through torch's dense conv3d / conv_transpose3d, which index kernels by
offset the way spconv does, on real voxels (a block of the nuScenes sweep embedded in a
dense grid; empty voxels are zeros there), and the coordinate shift onto spconv's grid is
checked to keep every stride-2 level aligned. With spconv installed (optional peer,
requirements-bench.txt): the twins of MinkUNet14A and MinkUNet18, plain and BN-folded, give
our backbone's features on the real sweep to float32 rounding.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from clip2scene_core.datasets.base import load_points_bin
from clip2scene_core.models import ModelConfig, VoxelBatch, build_model
from clip2scene_core.sparse import Conv3d, SparseTensor
from clip2scene_core.types import Scan
from clip2scene_core.voxelize import VoxelConfig, voxelize

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ROOT = Path(__file__).resolve().parents[1]
BOX = 16        # edge (voxels) of the real block used for the dense reference


@pytest.fixture(scope="module")
def stack(load_module_file):
    return load_module_file("spconv_stack", ROOT / "benchmarks" / "spconv_stack.py")


@pytest.fixture(scope="module")
def nuscenes_batch(data_dir: Path) -> VoxelBatch:
    path = next((data_dir / "nuscenes/mmdet3d_demo_scene-0061").glob("*LIDAR_TOP*.pcd.bin"))
    pts = load_points_bin(path, 5)
    voxels = voxelize([Scan(pts, ("x", "y", "z", "intensity", "ring"))],
                      VoxelConfig(voxel_size=0.1, point_range=(-60.0, -60.0, -5.0, 60.0, 60.0, 5.0),
                                  features=("intensity",)))
    return VoxelBatch.from_voxels(voxels)


@pytest.fixture(scope="module")
def block(nuscenes_batch: VoxelBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """The real voxels of the most occupied BOX³ block (even origin), 3 feature channels
    (intensity and two fixed random ones), coordinates relative to the block."""
    c = nuscenes_batch.coords[:, 1:].to(torch.int64)
    cells, counts = torch.unique(torch.div(c, BOX, rounding_mode="floor"), dim=0, return_counts=True)
    origin = cells[counts.argmax()] * BOX
    inside = ((c >= origin) & (c < origin + BOX)).all(dim=1)
    rel = (c[inside] - origin).to(torch.int32)
    coords = torch.cat([torch.zeros(len(rel), 1, dtype=torch.int32), rel], dim=1)
    g = torch.Generator().manual_seed(0)
    feats = torch.cat([nuscenes_batch.features[inside], torch.randn(len(rel), 2, generator=g)], dim=1)
    assert len(rel) > 100       # a real, reasonably populated block
    return feats, coords


def dense(feats: torch.Tensor, coords: torch.Tensor, size: int) -> torch.Tensor:
    grid = feats.new_zeros(1, feats.shape[1], size, size, size)
    x, y, z = coords[:, 1].long(), coords[:, 2].long(), coords[:, 3].long()
    grid[0, :, x, y, z] = feats.t()
    return grid


def at(grid: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    x, y, z = coords[:, 1].long(), coords[:, 2].long(), coords[:, 3].long()
    return grid[0, :, x, y, z].t()


@pytest.mark.parametrize("kernel_size", [1, 3, 5])
def test_krsc_layout_matches_a_dense_submanifold_conv(stack, block, kernel_size):
    feats, coords = block
    torch.manual_seed(kernel_size)
    conv = Conv3d(3, 4, kernel_size)
    ours = conv(SparseTensor(feats, coords)).feats
    ref = F.conv3d(dense(feats, coords, BOX), stack.dense_weight(conv), padding=kernel_size // 2)
    torch.testing.assert_close(ours, at(ref, coords), rtol=1e-5, atol=1e-5)


def test_krsc_layout_matches_dense_strided_and_transposed_convs(stack, block):
    feats, coords = block
    torch.manual_seed(0)
    down = Conv3d(3, 4, 2, stride=2)
    up = Conv3d(4, 5, 2, stride=2, transposed=True)
    x = SparseTensor(feats, coords)
    y = down(x)
    z = up(y)
    ref_y = F.conv3d(dense(feats, coords, BOX), stack.dense_weight(down), stride=2)
    torch.testing.assert_close(y.feats, at(ref_y, y.coords), rtol=1e-5, atol=1e-5)
    ref_z = F.conv_transpose3d(dense(y.feats, y.coords, BOX // 2), stack.dense_transposed_weight(up), stride=2)
    torch.testing.assert_close(z.feats, at(ref_z, coords), rtol=1e-5, atol=1e-5)


def test_a_wrong_offset_order_is_caught(stack, block):
    """The dense check has teeth: odd kernels read with even kernels' axis order differ."""
    feats, coords = block
    torch.manual_seed(1)
    conv = Conv3d(3, 4, 3)
    wrong = conv.kernel.detach().reshape(3, 3, 3, 3, 4).permute(4, 3, 0, 1, 2)   # (x, y, z) read
    ref = F.conv3d(dense(feats, coords, BOX), wrong.contiguous(), padding=1)
    assert (conv(SparseTensor(feats, coords)).feats - at(ref, coords)).abs().max() > 1e-2


def test_spconv_indices_keep_every_stride_level_aligned(stack, nuscenes_batch):
    coords = nuscenes_batch.coords
    assert int(coords[:, 1:].min()) < 0          # the real sweep has negative coordinates
    idx, shape = stack.spconv_indices(coords)
    assert int(idx[:, 1:].min()) >= 0
    assert all(s % stack.GRID_ALIGN == 0 and s > m for s, m in zip(shape, idx[:, 1:].max(dim=0).values.tolist()))
    shift = idx[:, 1:].long() - coords[:, 1:].long()
    assert bool((shift == shift[0]).all()) and bool((shift % stack.GRID_ALIGN == 0).all())
    for level in (2, 4, 8, 16):
        ours = torch.div(coords[:, 1:].long(), level, rounding_mode="floor")
        theirs = torch.div(idx[:, 1:].long(), level, rounding_mode="floor")
        assert bool((theirs - ours == shift[0] // level).all())
    assert torch.equal(idx[:, 0], coords[:, 0])


@pytest.mark.parametrize("backbone", ["minkunet14a", "minkunet18"])
@pytest.mark.parametrize("fold", [False, True], ids=["bn", "folded"])
def test_spconv_twin_gives_our_features_on_a_real_scan(stack, nuscenes_batch, backbone, fold):
    pytest.importorskip("spconv.pytorch")
    torch.manual_seed(0)
    net = build_model(ModelConfig(backbone=backbone, in_channels=1, width_multiplier=0.5)).backbone.eval()
    stack.randomize_norms(net)
    twin = stack.build_spconv_minkunet(net, fold)
    b = nuscenes_batch
    with torch.inference_mode():
        ours = net(b)
        theirs = twin(b.features, b.coords, b.batch_size)
    assert theirs.shape == ours.shape
    scale = float(ours.abs().max())
    assert scale > 0
    np.testing.assert_allclose(theirs.numpy(), ours.numpy(), rtol=0, atol=1e-5 * scale)
