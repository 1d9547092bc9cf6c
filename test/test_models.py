"""Backbones and Clip2SceneNet on a real (cropped) nuScenes sweep, at small width."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch

from clip2scene_core.config import from_dict, to_dict
from clip2scene_core.errors import ConfigError
from clip2scene_core.models import BACKBONES, Backbone, ModelConfig, NetOutput, VoxelBatch, build_model
from clip2scene_core.types import Scan
from clip2scene_core.voxelize import VoxelConfig, voxelize

NUSC = "nuscenes/mmdet3d_demo_scene-0061/n015-2018-07-24-11-22-45+0800__LIDAR_TOP__1532402927647951.pcd.bin"
WIDTH = 0.25
EMBED = 16


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def scans(data_dir: Path) -> list[Scan]:
    """Two real crops of the sweep (~3000 points each), coordinates on a 1/64 m lattice so
    that whole-voxel shifts are exact in float32."""
    pts = np.fromfile(data_dir / NUSC, dtype=np.float32).reshape(-1, 5)
    out = []
    for sign in (1, -1):
        sel = pts[(np.hypot(pts[:, 0], pts[:, 1]) < 25) & (sign * pts[:, 0] > 0)]
        sel = sel[np.random.default_rng(0).permutation(len(sel))[:3000]].copy()
        sel[:, :3] = np.round(sel[:, :3] * 64) / 64
        out.append(Scan(sel, ("x", "y", "z", "intensity", "ring")))
    return out


def config(backbone: str, voxel_size: float = 0.125) -> ModelConfig:
    return ModelConfig(backbone=backbone, in_channels=2, embed_dim=EMBED, width_multiplier=WIDTH,
                       voxel=VoxelConfig(voxel_size=voxel_size, features=("intensity", "ones")))


def make(backbone: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(config(backbone))


def run(model: torch.nn.Module, scans: list[Scan]) -> tuple[NetOutput, VoxelBatch]:
    v = voxelize(scans, model.config.voxel)
    batch = VoxelBatch.from_voxels(v, "cpu")
    return model(batch), batch


@pytest.mark.parametrize("backbone", BACKBONES)
def test_forward_backward_shapes(backbone: str, scans: list[Scan]) -> None:
    model = make(backbone).train()
    out, batch = run(model, scans[:1])
    n = batch.num_points
    assert n == len(scans[0])
    assert out.local.shape == (n, EMBED) and out.global_.shape == (n, EMBED)
    assert out.features.shape == (n, model.feature_dim)
    assert torch.isfinite(out.local).all() and torch.isfinite(out.features).all()
    if not model.backbone.point_wise:     # voxel-wise backbones: points of one voxel share outputs
        same = batch.inverse[:, None] == batch.inverse[None, :50]
        i, j = torch.nonzero(same, as_tuple=True)
        assert torch.equal(out.local[i], out.local[j])
    (out.local.square().mean() + out.global_.mean() + out.features.mean()).backward()
    grads = [p.grad for name, p in model.named_parameters() if name.endswith("kernel")]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(bool(g.abs().sum() > 0) for g in grads) >= 0.9 * len(grads), "gradients reach the convs"


@pytest.mark.parametrize("backbone", ["minkunet14a", "spvcnn"])
def test_state_dict_round_trip(backbone: str, scans: list[Scan]) -> None:
    a = make(backbone, seed=0)
    a.train()
    run(a, scans[:1])                    # update BN running stats so they are non-trivial
    a.eval()
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    b = make(backbone, seed=1).eval()
    with torch.no_grad():
        before = run(b, scans[:1])[0].local
        b.load_state_dict(torch.load(io.BytesIO(buf.getvalue()), weights_only=True))
        oa, ob = run(a, scans[:1])[0], run(b, scans[:1])[0]
    assert not torch.allclose(before, oa.local)
    assert torch.equal(oa.local, ob.local) and torch.equal(oa.global_, ob.global_)


@pytest.mark.parametrize("backbone", BACKBONES)
def test_translation_by_whole_coarsest_voxels(backbone: str, scans: list[Scan]) -> None:
    """Shifting by 16 voxels (the coarsest stride) must leave every output unchanged."""
    model = make(backbone).eval()
    shifted_pts = scans[0].points.copy()
    shifted_pts[:, :3] += np.array([16, -32, 16], np.float32) * 0.125
    shifted = Scan(shifted_pts, scans[0].fields)
    with torch.no_grad():
        a, ba = run(model, scans[:1])
        b, bb = run(model, [shifted])
    assert torch.equal(bb.coords[:, 1:] - ba.coords[:, 1:],
                       torch.tensor([16, -32, 16], dtype=torch.int32).expand_as(ba.coords[:, 1:]))
    torch.testing.assert_close(a.local, b.local, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(a.features, b.features, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backbone", ["minkunet18", "spvcnn"])
def test_batch_equals_single_runs(backbone: str, scans: list[Scan]) -> None:
    model = make(backbone).eval()
    with torch.no_grad():
        both, batch = run(model, scans)
        first = run(model, scans[:1])[0]
        second = run(model, scans[1:])[0]
    n0 = len(scans[0])
    assert batch.batch_size == 2
    torch.testing.assert_close(both.local[:n0], first.local, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(both.local[n0:], second.local, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(both.global_[n0:], second.global_, rtol=1e-4, atol=1e-5)


def test_full_width_sizes_match_published_networks() -> None:
    counts = {}
    for bb in ("minkunet34", "spvcnn"):
        m = build_model(ModelConfig(backbone=bb))
        counts[bb] = sum(p.numel() for p in m.backbone.parameters()) / 1e6
    assert 37.0 < counts["minkunet34"] < 38.5      # MinkUNet34C: ~37.8 M
    assert 21.0 < counts["spvcnn"] < 22.5          # SPVCNN (cr = 1.0): ~21.8 M


def test_model_config_validation() -> None:
    with pytest.raises(ConfigError, match="in_channels"):
        ModelConfig(in_channels=3)                 # default features give 1 channel
    cfg = from_dict(ModelConfig, {"backbone": "spvcnn", "in_channels": 4, "embed_dim": 1024,
                                  "voxel": {"voxel_size": 0.05, "features": ["xyz", "ones"]}})
    assert cfg.voxel.num_channels == 4 and cfg.embed_dim == 1024
    assert from_dict(ModelConfig, to_dict(cfg)) == cfg
    with pytest.raises(ConfigError):
        from_dict(ModelConfig, {"backbone": "pointnet"})
    model = build_model(config("minkunet14a"))
    v = voxelize([Scan(np.ones((5, 4), np.float32))], VoxelConfig(features=("intensity",)))
    with pytest.raises(ConfigError, match="feature channels"):
        model(VoxelBatch.from_voxels(v))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu(scans: list[Scan]) -> None:
    model = make("spvcnn").eval()
    v = voxelize(scans[:1], model.config.voxel)
    with torch.no_grad():
        cpu = model(VoxelBatch.from_voxels(v, "cpu")).local
        gpu = model.to("cuda")(VoxelBatch.from_voxels(v, "cuda")).local.cpu()
    torch.testing.assert_close(cpu, gpu, rtol=1e-3, atol=1e-3)


# ---------------------------------------------------------------- the backbone registry
class ToyBackbone(torch.nn.Module):
    """The smallest backbone honouring the contract (``models.backbone``): a point-wise MLP."""

    point_wise = True

    def __init__(self, *, in_channels: int, width_multiplier: float) -> None:
        super().__init__()
        self.out_channels = max(1, round(32 * width_multiplier))
        self.mlp = torch.nn.Linear(in_channels, self.out_channels)

    def forward(self, batch: VoxelBatch) -> torch.Tensor:
        return self.mlp(batch.point_features)


def test_a_new_backbone_is_one_registry_line(monkeypatch, scans: list[Scan], tmp_path: Path) -> None:
    """Registered by name, a backbone is built from a config, trained, saved in a deployable
    checkpoint and run by the segmenter: nothing else dispatches on the name."""
    from clip2scene_core.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
    from clip2scene_core.clip.vocabulary import Vocabulary
    from clip2scene_core.segmenter import Segmenter

    monkeypatch.setitem(BACKBONES, "toy", ToyBackbone)
    cfg = from_dict(ModelConfig, {**to_dict(config("minkunet14a")), "backbone": "toy"})
    model = build_model(cfg)
    assert isinstance(model.backbone, ToyBackbone) and isinstance(model.backbone, Backbone)
    out, batch = run(model, scans)
    assert out.local.shape == (batch.num_points, EMBED) and out.features.shape == (batch.num_points, 8)
    out.local.square().mean().backward()
    assert model.backbone.mlp.weight.grad is not None

    vocab = Vocabulary.preset("nuscenes16")
    emb = torch.nn.functional.normalize(torch.randn(len(vocab.class_names), EMBED), dim=1)
    path = tmp_path / "toy.pt"
    save_checkpoint(path, Checkpoint(cfg, model.state_dict(), vocab, emb, "test", {}))
    assert load_checkpoint(path).model_config.backbone == "toy"
    result = Segmenter.load(path, device="cpu").segment(scans[0])
    assert result.labels.shape == (len(scans[0]),) and (result.labels[result.valid] >= 0).all()

    monkeypatch.delitem(BACKBONES, "toy")   # a checkpoint naming an unregistered backbone: a clear error
    with pytest.raises(ConfigError, match="'toy' is not one of"):
        from_dict(ModelConfig, to_dict(cfg))


def test_a_backbone_breaking_the_contract_is_refused(monkeypatch) -> None:
    class NoWidth(torch.nn.Module):
        point_wise = False

        def forward(self, batch: VoxelBatch) -> torch.Tensor:
            return batch.features

    monkeypatch.setitem(BACKBONES, "no_width", lambda **kwargs: NoWidth())
    with pytest.raises(ConfigError, match="out_channels must be an int"):
        build_model(ModelConfig(backbone="no_width"))
    monkeypatch.setitem(BACKBONES, "not_a_module", lambda **kwargs: object())
    with pytest.raises(ConfigError, match="not a torch nn.Module"):
        build_model(ModelConfig(backbone="not_a_module"))
