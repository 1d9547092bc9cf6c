"""Per-voxel classification with the heads folded into the text embeddings gives the labels and
scores of the straightforward path (every point embedded by the D-wide head), on real scans,
for voxel (MinkUNet) and point-wise (SPVCNN) backbones and every head role."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from clip2scene_core.checkpoint import Checkpoint
from clip2scene_core.classify import FoldedClassifier
from clip2scene_core.clip.vocabulary import Vocabulary
from clip2scene_core.datasets.base import load_points_bin
from clip2scene_core.models import ModelConfig, build_model
from clip2scene_core.segmenter import Segmenter, SegmenterConfig
from clip2scene_core.types import Scan
from clip2scene_core.voxelize import VoxelConfig

NUSC = "nuscenes/mmdet3d_demo_scene-0061"
KITTI = "semantickitti/squeezesegv3_sample_data/sequences/00/velodyne/000000.bin"


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_torch_thread):
    yield


def _scans(data_dir: Path) -> dict[str, Scan]:
    nusc = np.fromfile(next((data_dir / NUSC).glob("*LIDAR_TOP*.pcd.bin")), np.float32).reshape(-1, 5)
    kitti = load_points_bin(data_dir / KITTI, 4)
    return {"nuscenes": Scan(nusc[:, :4], ("x", "y", "z", "intensity")),
            "semantickitti": Scan(kitti[::3], ("x", "y", "z", "intensity"))}


def _segmenters(backbone: str, head: str, embed: int = 64, seed: int = 0):
    torch.manual_seed(seed)
    cfg = ModelConfig(backbone=backbone, in_channels=1, embed_dim=embed, width_multiplier=0.25,
                      voxel=VoxelConfig(voxel_size=0.2, point_range=(-60, -60, -6, 60, 60, 6),
                                        features=("intensity",)))
    model = build_model(cfg)
    for head_layer in (model.local_head, model.global_head):   # biases as trained heads have
        torch.nn.init.normal_(head_layer.bias, std=0.02)
    vocab = Vocabulary.preset("semantickitti19")
    emb = F.normalize(torch.randn(len(vocab.class_names), embed), dim=1)
    ckpt = Checkpoint(cfg, model.state_dict(), vocab, emb, "tiny-random", {"head": head})
    return (Segmenter.from_checkpoint(ckpt, config=SegmenterConfig(device="cpu")),
            Segmenter.from_checkpoint(ckpt, config=SegmenterConfig(device="cpu", folded_heads=False)))


@pytest.mark.parametrize("backbone, head", [("minkunet14a", "local"), ("minkunet14a", "both"),
                                            ("spvcnn", "global")])
def test_folded_per_voxel_labels_equal_the_per_point_path(data_dir, backbone, head):
    fast, reference = _segmenters(backbone, head)
    seen: set[int] = set()
    for name, scan in _scans(data_dir).items():
        a, b = fast.segment(scan), reference.segment(scan)
        np.testing.assert_array_equal(a.valid, b.valid)
        agree = float((a.labels == b.labels).mean())
        # float32 rounding may flip an exact near-tie; anything more is a bug
        assert agree >= 0.9999, (name, agree)
        np.testing.assert_allclose(a.scores, b.scores, rtol=1e-4, atol=1e-5)
        seen |= set(np.unique(a.labels[a.valid]).tolist())
    assert len(seen) > 3          # a random network, but not a constant one


def test_folded_logits_are_the_cosine_logits(data_dir):
    """The algebra on its own: random rows and heads, every head role, float64."""
    torch.manual_seed(1)
    local, glob = torch.nn.Linear(24, 48).double(), torch.nn.Linear(24, 48).double()
    emb = F.normalize(torch.randn(7, 48, dtype=torch.float64), dim=1)
    f = torch.randn(500, 24, dtype=torch.float64)
    zl, zg = F.normalize(local(f), dim=1), F.normalize(glob(f), dim=1)
    expected = {"local": zl @ emb.t(), "global": zg @ emb.t(),
                "both": F.normalize(zl + zg, dim=1) @ emb.t()}
    for head, cos in expected.items():
        got = FoldedClassifier(local, glob, emb, head, 100.0, dtype=torch.float64).logits(f)
        torch.testing.assert_close(got, 100.0 * cos, rtol=1e-10, atol=1e-10)


def test_vocabulary_change_refolds(data_dir):
    fast, reference = _segmenters("minkunet14a", "local")
    scan = _scans(data_dir)["nuscenes"]
    fast.segment(scan)
    names = ["car", "road", "vegetation"]
    emb = F.normalize(torch.randn(3, 64), dim=1)
    fast.set_vocabulary(names, emb)
    reference.set_vocabulary(names, emb)
    a, b = fast.segment(scan), reference.segment(scan)
    assert a.class_names == names and a.labels.max() <= 2
    assert float((a.labels == b.labels).mean()) >= 0.9999
