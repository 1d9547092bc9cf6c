"""Training recipes (``recipe: project | released | paper``) and the options they select.

* each recipe resolves to the documented values (README "Recipes" table), outdoors and on ScanNet;
* a key given in the YAML or with ``--set`` wins over the recipe; an unknown recipe is refused;
* ``project`` is ``released`` except the measured wins (``PROJECT_WINS``);
* SPVCNN ``concat`` heads read 480 channels at full width (scaled by the width multiplier),
  save and load through deployable checkpoints; checkpoints without the new keys still load;
* the SSR / SCR options of the released code compute what they claim;
* a short pre-training run works with ``released`` and with ``paper`` on real nuScenes frames.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from clip2scene_core.config import to_dict
from clip2scene_core.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
NUSC = "nuscenes/mmdet3d_demo_scene-0061/n015-2018-07-24-11-22-45+0800__LIDAR_TOP__1532402927647951.pcd.bin"

pytestmark = pytest.mark.usefixtures("one_torch_thread")

#: the README table, outdoors (nuScenes, SemanticKITTI, rosbag) — (project, released, paper);
#: project = released except the measured win (SPVCNN heads on the last features)
OUTDOOR = {
    "data.sweeps_to_keyframe_cameras": (True, True, True),
    "model.backbone": ("spvcnn", "spvcnn", "spvcnn"),
    "model.head_input": ("last", "concat", "concat"),
    "model.dropout": (0.0, 0.0, 0.0),
    "model.voxel.voxel_size": (0.1, 0.1, 0.1),
    "vocabulary.prompts": ("bare", "bare", "bare"),
    "loss.scr.variant": ("cross_entropy", "cross_entropy", "contrastive"),
    "loss.scr.form": ("per_point", "per_point", "per_class"),
    "loss.scr.ce_logits": ("dot", "dot", "cosine"),
    "loss.ssr.form": ("cell", "cell", "cell"),
    "loss.ssr.grid_size": (0.1, 0.1, 0.1),
    "loss.ssr.max_members": (8, 8, None),
    "loss.ssr.features": ("points", "points", "fused"),
    "loss.ssr.metric": ("dot", "dot", "cosine"),
    "loss.ssr.normalize": ("slots", "slots", "cells"),
    "loss.self_training.switch_epoch": (11, 11, 10),
    "loss.self_train_unpaired": (False, False, False),
}
#: ScanNet, where it differs from OUTDOOR (the heads/dropout keys are SPVCNN's: not set)
INDOOR = {
    "model.backbone": ("minkunet14a", "minkunet14a", "minkunet14a"),
    "model.head_input": ("last", "last", "last"),
    "model.dropout": (None, None, None),
    "model.voxel.voxel_size": (0.05, 0.05, 0.05),
    "loss.ssr.form": ("pair", "pair", "cell"),
    "loss.ssr.grid_size": (0.1, 0.1, 0.1),
    "loss.self_training.switch_epoch": (10, 10, 10),
}


def _get(cfg, dotted: str):
    obj = cfg
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def _load(name: str, overrides: list[str] | None = None):
    from training.engine.config import PretrainConfig, load_training_config

    return load_training_config(PretrainConfig, ROOT / f"config/{name}.yaml", overrides)


@pytest.mark.parametrize("i, recipe", list(enumerate(["project", "released", "paper"])))
@pytest.mark.parametrize("config", ["pretrain_nuscenes", "pretrain_semantickitti", "pretrain_rosbag",
                                    "pretrain_scannet"])
def test_recipes_resolve_to_the_documented_values(config: str, i: int, recipe: str) -> None:
    cfg = _load(config, [f"recipe={recipe}"])
    expected = {k: v[i] for k, v in OUTDOOR.items()}
    if config == "pretrain_scannet":
        expected.update({k: v[i] for k, v in INDOOR.items()})
    got = {k: _get(cfg, k) for k in expected}
    assert got == expected
    assert cfg.recipe == recipe
    # what no recipe touches stays the config's own
    assert (cfg.optim.lr, cfg.loss.scr.temperature, cfg.loss.ssr.lam) == (0.1, 0.5, 1.0)


def test_project_recipe_is_the_released_one_but_its_measured_wins() -> None:
    """The shipped configs leave the recipe keys out: under ``project`` they resolve to the
    released values except the rows the project measurably won (``PROJECT_WINS``)."""
    from training.engine.recipes import PROJECT_WINS, recipe_defaults

    assert PROJECT_WINS["common"] == {"model.head_input": "last"}
    assert not PROJECT_WINS["outdoor"] and not PROJECT_WINS["indoor"]
    for name, reader in (("pretrain_nuscenes", "NuScenesReader"), ("pretrain_semantickitti", "SemanticKittiReader"),
                         ("pretrain_scannet", "ScanNetReader"), ("pretrain_rosbag", "rosbag")):
        cfg, rel = _load(name), _load(name, ["recipe=released"])
        assert cfg.recipe == "project"
        assert _load(name, ["recipe=project"]) == cfg
        project = recipe_defaults("project", reader)
        for key, value in recipe_defaults("released", reader).items():
            if key in ("model.head_input", "model.dropout") and cfg.model.backbone != "spvcnn":
                continue
            assert _get(cfg, key) == project[key], (name, key)
            if key not in PROJECT_WINS["common"]:
                assert _get(cfg, key) == _get(rel, key) == value, (name, key)
    demo = _load("pretrain_demo", ["recipe=released"])     # the demo pins its own small choices
    assert (demo.model.backbone, demo.model.voxel.voxel_size, demo.loss.ssr.grid_size) == ("minkunet14a", 0.25, 1.0)
    assert demo.model.head_input == "last" and demo.loss.ssr.features == "points"


def test_explicit_keys_win_over_the_recipe(tmp_path: Path) -> None:
    cfg = _load("pretrain_nuscenes", ["recipe=released", "loss.ssr.grid_size=0.5", "model.dropout=0.3",
                                      "vocabulary.prompts=synonyms", "loss.ssr.max_members=null",
                                      "loss.ssr.normalize=cells"])
    assert (cfg.loss.ssr.grid_size, cfg.model.dropout, cfg.vocabulary.prompts) == (0.5, 0.3, "synonyms")
    assert cfg.loss.ssr.max_members is None                 # an explicit null is a value too
    assert cfg.model.backbone == "spvcnn" and cfg.loss.ssr.metric == "dot"   # the rest: the recipe's
    with pytest.raises(ConfigError, match="loss.ssr: normalize 'slots' needs max_members"):
        _load("pretrain_nuscenes", ["recipe=released", "loss.ssr.max_members=null"])   # a clash is reported
    # in the YAML file as well
    data = yaml.safe_load((ROOT / "config/pretrain_nuscenes.yaml").read_text())
    data["recipe"] = "paper"
    data["loss"]["scr"]["form"] = "per_point"
    data["model"]["backbone"] = "minkunet34"
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump(data))
    from training.engine.config import PretrainConfig, load_training_config

    cfg = load_training_config(PretrainConfig, path)
    assert (cfg.recipe, cfg.loss.scr.form, cfg.loss.scr.variant) == ("paper", "per_point", "contrastive")
    # SPVCNN-only keys are not forced onto another backbone by the recipe ...
    assert cfg.model.backbone == "minkunet34" and (cfg.model.head_input, cfg.model.dropout) == ("last", None)
    # ... but asked for explicitly they are refused when the network is built
    from clip2scene_core.models import build_model

    bad = load_training_config(PretrainConfig, path, ["model.head_input=concat", "model.width_multiplier=0.125"])
    with pytest.raises(ConfigError, match="head_input"):
        build_model(bad.model)


def test_unknown_recipe_is_a_config_error_naming_it(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="recipe: 'releasd' is not one of"):
        _load("pretrain_nuscenes", ["recipe=releasd"])
    path = tmp_path / "bad.yaml"
    path.write_text("recipe: [released]\n")
    from training.engine.config import PretrainConfig, load_training_config

    with pytest.raises(ConfigError, match="recipe"):
        load_training_config(PretrainConfig, path)


def test_bare_prompts_keep_classes_and_change_the_prompted_names() -> None:
    from clip2scene_core.clip.vocabulary import Vocabulary

    syn = Vocabulary.preset("nuscenes16")
    bare = syn.with_prompts("bare")
    assert bare.class_names == syn.class_names and syn.with_prompts("synonyms") is syn
    assert all(bare.prompt_names(c) == [c] for c in bare.class_names)
    assert syn.prompt_names("manmade") != ["manmade"]                   # the synonyms list
    assert not bare.same_classes(syn)                                    # different text embeddings
    with pytest.raises(ConfigError, match="prompts"):
        syn.with_prompts("fancy")
    # what training builds from `vocabulary.prompts` (the released / paper recipes: bare)
    from training.engine.common import build_vocabulary
    from training.engine.config import VocabConfig

    built = build_vocabulary(VocabConfig(preset="nuscenes16", prompts="bare"))
    assert built.class_names == syn.class_names and built.prompt_names("manmade") == ["manmade"]
    assert build_vocabulary(VocabConfig(preset="nuscenes16")).prompt_names("manmade") == syn.prompt_names("manmade")


# ----------------------------------------------------------------------------- SPVCNN concat heads
@pytest.fixture(scope="module")
def scan(data_dir: Path):
    from clip2scene_core.types import Scan

    pts = np.fromfile(data_dir / NUSC, dtype=np.float32).reshape(-1, 5)
    sel = pts[np.hypot(pts[:, 0], pts[:, 1]) < 25]
    sel = sel[np.random.default_rng(0).permutation(len(sel))[:3000]]
    return Scan(np.ascontiguousarray(sel), ("x", "y", "z", "intensity", "ring"))


def _spvcnn(width: float, head_input: str = "concat", dropout: float | None = 0.0, embed: int = 512):
    from clip2scene_core.models import ModelConfig, build_model
    from clip2scene_core.voxelize import VoxelConfig

    cfg = ModelConfig(backbone="spvcnn", in_channels=1, embed_dim=embed, width_multiplier=width,
                      voxel=VoxelConfig(voxel_size=0.2), head_input=head_input, dropout=dropout)
    torch.manual_seed(0)
    return build_model(cfg)


def test_concat_heads_read_480_channels_at_full_width_scaled_by_width() -> None:
    full = _spvcnn(1.0)
    assert full.local_head.in_features == full.global_head.in_features == 480
    assert full.local_head.out_features == 512 and full.backbone.dropout.p == 0.0
    assert _spvcnn(1.0, "last", None).local_head.in_features == 96
    assert _spvcnn(1.0, "last", None).backbone.dropout.p == 0.3           # SPVNAS's own default
    assert _spvcnn(0.5).local_head.in_features == 128 + 64 + 48
    assert _spvcnn(0.125).local_head.in_features == 32 + 16 + 12


def test_concat_features_are_the_point_branch_stages(scan) -> None:
    """The concat rows are [z1 | z2 | last]: their last columns equal the "last" network's
    output with the same weights, on a real sweep."""
    from clip2scene_core.models import VoxelBatch
    from clip2scene_core.voxelize import voxelize

    cat, last = _spvcnn(0.25, embed=16).eval(), _spvcnn(0.25, "last", 0.0, embed=16).eval()
    last.backbone.load_state_dict(cat.backbone.state_dict())
    batch = VoxelBatch.from_voxels(voxelize([scan], cat.config.voxel), "cpu")
    with torch.no_grad():
        fc, fl = cat.backbone_features(batch), last.backbone_features(batch)
        out = cat(batch)
    assert fc.shape == (batch.num_points, 64 + 32 + 24) and fl.shape == (batch.num_points, 24)
    assert torch.allclose(fc[:, -24:], fl, atol=1e-5)
    assert out.local.shape == (batch.num_points, 16) and out.features.shape == fc.shape


def test_concat_heads_round_trip_through_checkpoints_and_old_ones_still_load(tmp_path: Path, scan) -> None:
    from clip2scene_core.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
    from clip2scene_core.clip.vocabulary import Vocabulary
    from clip2scene_core.models import VoxelBatch, build_model
    from clip2scene_core.voxelize import voxelize

    vocab = Vocabulary.preset("nuscenes16")
    text = F.normalize(torch.randn(16, 16, generator=torch.Generator().manual_seed(0)), dim=1)
    net = _spvcnn(0.25, embed=16)
    net.train()
    batch = VoxelBatch.from_voxels(voxelize([scan], net.config.voxel), "cpu")
    net(batch)                                                            # non-trivial BN statistics
    net.eval()
    save_checkpoint(tmp_path / "new.pt", Checkpoint(net.config, net.state_dict(), vocab, text, "test"))
    ck = load_checkpoint(tmp_path / "new.pt")
    assert (ck.model_config.head_input, ck.model_config.dropout) == ("concat", 0.0)
    again = build_model(ck.model_config)
    again.load_state_dict(ck.state_dict)
    again.eval()
    with torch.no_grad():
        assert torch.equal(again(batch).local, net(batch).local)
    # a checkpoint written before head_input / dropout existed: the defaults, the same network
    old = _spvcnn(0.25, "last", None, embed=16).eval()
    old_cfg = to_dict(old.config)
    del old_cfg["head_input"], old_cfg["dropout"]
    save_checkpoint(tmp_path / "old.pt", Checkpoint(old_cfg, old.state_dict(), vocab, text, "test"))
    ck = load_checkpoint(tmp_path / "old.pt")
    assert (ck.model_config.head_input, ck.model_config.dropout) == ("last", None)
    rebuilt = build_model(ck.model_config)
    rebuilt.load_state_dict(ck.state_dict)
    rebuilt.eval()
    with torch.no_grad():
        assert torch.equal(rebuilt(batch).local, old(batch).local)
    assert rebuilt.local_head.in_features == 24


# ----------------------------------------------------------------------------- released SSR / SCR forms
def test_first_in_cell_keeps_the_first_k_rows_of_each_cell() -> None:
    from clip2scene_core.losses import first_in_cell

    cells = torch.from_numpy(np.random.default_rng(0).integers(0, 40, 2000))
    for k in (1, 3, 8):
        seen: dict[int, int] = {}
        ref = []
        for c in cells.tolist():
            ref.append(seen.get(c, 0) < k)
            seen[c] = seen.get(c, 0) + 1
        assert first_in_cell(cells, k).tolist() == ref
    assert bool(first_in_cell(cells, None).all())


def _ssr_inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    pts = torch.randn(60, 8, generator=g)
    cells = torch.randint(0, 6, (60,), generator=g)
    pix_rows = torch.arange(0, 60, 2)
    pix = torch.randn(len(pix_rows), 8, generator=g)
    text = F.normalize(torch.randn(3, 8, generator=g), dim=1)
    clab = torch.tensor([0, 1, 2, 0, -1, 1])
    return pts, cells, pix, cells[pix_rows], clab, text


def test_ssr_released_options_compute_the_released_formula() -> None:
    """features=points, metric=dot, normalize=points: softmax over the cell's points of
    raw p·t, f = Σ a p, loss = mean over the labelled points of 1 - sigmoid(p·f) — written
    out per cell here; the pixels do not enter. normalize=slots: the released mean over a
    (cell, max_members) table, whose empty slots hold sigmoid(0) — minus that constant."""
    from clip2scene_core.losses import SsrConfig, ssr_loss

    pts, cells, pix, pcells, clab, text = _ssr_inputs()
    cfg = SsrConfig(features="points", metric="dot", normalize="points")
    got = ssr_loss(pts, cells, pix, pcells, clab, text, cfg)
    terms = []
    for c in range(6):
        if clab[c] < 0:
            continue
        p = pts[cells == c]
        a = torch.softmax(p @ text[clab[c]], dim=0)
        f = (a[:, None] * p).sum(0)
        terms.append(1 - torch.sigmoid(p @ f))
    assert torch.allclose(got, torch.cat(terms).mean(), atol=1e-6)
    k = max(len(t) for t in terms) + 3                  # slots per cell (the caller caps the members)
    table = torch.full((len(terms), k), 0.5)            # labelled cells × slots, empty: 1 - sigmoid(0)
    for row, t in enumerate(terms):
        table[row, :len(t)] = t
    slots = ssr_loss(pts, cells, pix, pcells, clab, text,
                     SsrConfig(features="points", metric="dot", normalize="slots", max_members=k))
    empty = sum(k - len(t) for t in terms) * 0.5 / table.numel()
    assert torch.allclose(slots, table.mean() - empty, atol=1e-6)
    assert torch.equal(got, ssr_loss(pts, cells, pix * 5 + 1, pcells, clab, text, cfg))   # pixels unused
    fused = ssr_loss(pts, cells, pix, pcells, clab, text, SsrConfig())
    assert not torch.allclose(fused, ssr_loss(pts, cells, pix * 5 + 1, pcells, clab, text, SsrConfig()))


def test_ssr_pair_form_and_dot_cross_entropy() -> None:
    from clip2scene_core.losses import ScrConfig, semantic_consistency_loss, ssr_pair_loss

    pts, _, pix, *_ = _ssr_inputs(1)
    ref = np.mean([1 - np.dot(a, b) / np.linalg.norm(a) / np.linalg.norm(b)
                   for a, b in zip(pts[:30].double().numpy(), pix.double().numpy())])
    assert abs(float(ssr_pair_loss(pts[:30], pix)) - ref) < 1e-5
    text = F.normalize(torch.randn(3, 8, generator=torch.Generator().manual_seed(2)), dim=1)
    labels = torch.randint(0, 3, (60,), generator=torch.Generator().manual_seed(3))
    ce = semantic_consistency_loss(pts, text, labels, ScrConfig(variant="cross_entropy", ce_logits="dot"))
    assert torch.allclose(ce, F.cross_entropy(pts @ text.t(), labels), atol=1e-6)


# ----------------------------------------------------------------------------- short runs
def _run_cfg(tmp: Path, recipe: str, cache: Path):
    """The demo config with the keys its recipe should decide left out: 2 real nuScenes key
    frames, the front camera, 1500 points, 2 epochs with self-training in the second."""
    from training.engine.config import PretrainConfig, load_training_config

    data = yaml.safe_load((ROOT / "config/pretrain_demo.yaml").read_text())
    del data["model"]["backbone"], data["model"]["voxel"]["voxel_size"]
    data["loss"] = {"self_training": {"switch_epoch": 1}}
    path = tmp / f"{recipe}.yaml"
    path.write_text(yaml.safe_dump(data))
    return load_training_config(PretrainConfig, path, [
        f"recipe={recipe}", f"data.args.root={ROOT / 'test/data/nuscenes/dororo99_v1.0-extract_3samples'}",
        "data.args.cameras=[CAM_FRONT]", "data.indices=[0, 1]", "data.max_points=1500",
        "optim.epochs=2", "optim.batch_size=1", "model.voxel.point_range=[-60, -60, -5, 60, 60, 5]",
        f"teacher.cache_dir={cache}", f"run.out_dir={tmp / recipe}", "run.progress=false", "run.num_threads=1"])


@pytest.mark.parametrize("recipe", ["released", "paper"])
def test_a_short_pretraining_run_works_with_the_recipe(recipe: str, tmp_path_factory) -> None:
    from clip2scene_core.checkpoint import load_checkpoint
    from training import pretrain

    cache = tmp_path_factory.getbasetemp() / "recipe_teacher_cache"
    tmp = tmp_path_factory.mktemp(recipe)
    cfg = _run_cfg(tmp, recipe, cache)
    assert cfg.model.backbone == "spvcnn" and cfg.model.head_input == "concat"
    assert cfg.loss.self_training.switch_epoch == 1                           # explicit beats recipe
    out = pretrain.run(cfg)
    hist = out["history"]
    assert len(hist) == 2 and all(np.isfinite(h["loss"]) for h in hist)
    assert all(h.get("ssr", 0) > 0 and h.get("scr", 0) > 0 for h in hist)
    ck = load_checkpoint(out["checkpoint"])
    assert ck.model_config.head_input == "concat" and ck.model_config.dropout == 0.0
    assert ck.state_dict["local_head.weight"].shape == (24, 60)              # width 0.125: 32 + 16 + 12
    from training.engine.state import load_state

    assert load_state(out["state"])["config"]["recipe"] == recipe
    # the deployable checkpoint segments a real scan (heads folded on the 60-d concat rows)
    from clip2scene_core.datasets import NuScenesReader
    from clip2scene_core.segmenter import Segmenter

    sample = NuScenesReader(ROOT / "test/data/nuscenes/dororo99_v1.0-extract_3samples",
                            version_dir="v1.0-extract-subset")[2]
    res = Segmenter.load(out["checkpoint"], device="cpu").segment(sample.scan)
    assert res.labels.shape == (len(sample.scan),) and int(res.labels.max()) < 16
    assert float((res.labels >= 0).mean()) > 0.9


def test_states_written_before_the_recipe_keys_still_resume() -> None:
    """A saved config without the keys recipes added compares equal when the current values
    are the ones that reproduce it; another value is reported."""
    from training.engine.loop import config_differences

    # a run from before the recipes (the SCR default then was contrastive, Eq. 1), pinned here
    # with --set because today's project recipe is the released code's
    before = ["loss.scr.variant=contrastive", "loss.scr.ce_logits=cosine", "vocabulary.prompts=synonyms",
              "loss.ssr.features=fused", "loss.ssr.metric=cosine", "loss.ssr.max_members=null",
              "loss.ssr.normalize=cells", "data.sweeps_to_keyframe_cameras=false", "model.backbone=minkunet34"]
    cur = to_dict(_load("pretrain_nuscenes", before))
    old = to_dict(_load("pretrain_nuscenes", before))
    del old["recipe"], old["model"]["head_input"], old["model"]["dropout"], old["vocabulary"]["prompts"]
    for key in ("form", "features", "metric", "max_members"):
        del old["loss"]["ssr"][key]
    del old["loss"]["scr"]["ce_logits"], old["data"]["sweeps_to_keyframe_cameras"]
    assert config_differences(old, cur) == []
    assert config_differences(old["model"], cur["model"], ignore=False) == []
    # resumed under today's project default (the released SCR), the change is reported
    now = config_differences(old, to_dict(_load("pretrain_nuscenes")))
    assert any(d.startswith("loss.scr.variant") for d in now) and any(d.startswith("loss.scr.ce_logits") for d in now)
    rel = to_dict(_load("pretrain_nuscenes", ["recipe=released"]))
    diff = config_differences(old, rel)
    assert "recipe: '<absent>' -> 'released'" in diff and any(d.startswith("loss.ssr.metric") for d in diff)
