"""Pre-training runs, checkpoints and resumes exactly.

* every shipped pretrain config loads strictly;
* SIGTERM mid-epoch saves a state; ``--resume`` ends bitwise equal to an uninterrupted run;
* the CLI runs from the repo root; SIGKILL after an epoch loses at most that epoch and the
  resumed run still ends bitwise equal;
* TensorBoard event files and the deployable checkpoint are written.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from clip2scene_core.config import to_dict

ROOT = Path(__file__).resolve().parents[1]


def _tiny_cfg(tmp: Path, out: str):
    """The demo config shrunk: 2 nuScenes key frames, front camera, 1500 points, 3 epochs."""
    from training.engine.config import PretrainConfig, load_training_config

    return load_training_config(PretrainConfig, ROOT / "config/pretrain_demo.yaml", [
        f"data.args.root={ROOT / 'test/data/nuscenes/dororo99_v1.0-extract_3samples'}",
        "data.args.cameras=[CAM_FRONT]", "data.indices=[0, 1]", "data.max_points=1500",
        "optim.epochs=3", "optim.batch_size=1",
        "loss.self_training.switch_epoch=1", "loss.self_training.mode=point",
        f"teacher.cache_dir={tmp / 'cache'}", f"run.out_dir={tmp / out}", "run.progress=false",
        # bitwise comparisons across processes need the same CPU reduction order
        "run.num_threads=1",
    ])


@pytest.fixture(autouse=True)
def _restore_threads():
    """The runs below pin torch to one thread; give later tests their thread count back."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _overrides(cfg) -> list[str]:
    d = to_dict(cfg)
    return [f"data.args.root={d['data']['args']['root']}", "data.args.cameras=[CAM_FRONT]", "data.indices=[0, 1]",
            "data.max_points=1500", "optim.epochs=3", "optim.batch_size=1", "loss.self_training.switch_epoch=1",
            "loss.self_training.mode=point", f"teacher.cache_dir={d['teacher']['cache_dir']}",
            f"run.out_dir={d['run']['out_dir']}", "run.progress=false", "run.num_threads=1"]


def _assert_same_state(a: Path, b: Path) -> None:
    from training.engine.state import load_state

    sa, sb = load_state(a), load_state(b)
    assert sa["epoch"] == sb["epoch"] and sa["global_step"] == sb["global_step"]
    for k, v in sa["model"].items():
        assert torch.equal(v, sb["model"][k]), k
    for ga, gb in zip(sa["optimizer"]["state"].values(), sb["optimizer"]["state"].values()):
        assert torch.equal(ga["momentum_buffer"], gb["momentum_buffer"])
    assert [h["loss"] for h in sa["history"]] == [h["loss"] for h in sb["history"]]


@pytest.mark.parametrize("name", ["pretrain_demo", "pretrain_nuscenes", "pretrain_semantickitti", "pretrain_scannet",
                                  "pretrain_rosbag"])
def test_configs_load(name):
    from training.engine.config import PretrainConfig, load_training_config

    cfg = load_training_config(PretrainConfig, ROOT / f"config/{name}.yaml")
    assert cfg.model.in_channels == cfg.model.voxel.num_channels
    if name != "pretrain_demo":   # the paper's recipe
        assert (cfg.optim.lr, cfg.optim.momentum, cfg.optim.epochs, cfg.optim.scheduler) == (0.1, 0.9, 20, "cosine")
        assert cfg.loss.scr.temperature == 0.5 and cfg.loss.ssr.lam == 1.0
        assert cfg.model.embed_dim == 512


def test_unknown_key_is_rejected(tmp_path):
    from clip2scene_core.errors import ConfigError
    from training.engine.config import PretrainConfig, load_training_config

    with pytest.raises(ConfigError, match="optim"):
        load_training_config(PretrainConfig, ROOT / "config/pretrain_demo.yaml", ["optim.learning_rate=0.1"])


def test_sigterm_then_resume_is_bitwise_equal(tmp_path, monkeypatch):
    from training import pretrain
    from training.engine import objectives
    from training.engine.loop import Interrupted

    ref = pretrain.run(_tiny_cfg(tmp_path, "ref"))
    assert len(ref["history"]) == 3 and all(np.isfinite(h["loss"]) for h in ref["history"])
    assert list((tmp_path / "ref" / "tb").glob("events.out.tfevents.*"))
    from clip2scene_core.segmenter import Segmenter
    assert Segmenter.load(ref["checkpoint"], device="cpu").class_names[0] == "barrier"

    # SIGTERM in the middle of epoch 2 (step 4 of 6)
    real_call = objectives.PretrainObjective.__call__
    calls = {"n": 0}

    def call(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 4:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_call(self, *a, **k)

    monkeypatch.setattr(objectives.PretrainObjective, "__call__", call)
    with pytest.raises(Interrupted):
        pretrain.run(_tiny_cfg(tmp_path, "cut"))
    from training.engine.state import load_state
    st = load_state(tmp_path / "cut" / "last.pt")
    assert (st["epoch"], st["step_in_epoch"]) == (1, 2)
    monkeypatch.setattr(objectives.PretrainObjective, "__call__", real_call)
    pretrain.run(_tiny_cfg(tmp_path, "cut"), resume=True)
    _assert_same_state(tmp_path / "ref" / "last.pt", tmp_path / "cut" / "last.pt")


def test_cli_sigkill_loses_at_most_one_epoch(tmp_path):
    from training import pretrain

    cfg = _tiny_cfg(tmp_path, "killed")
    state = tmp_path / "killed" / "last.pt"
    cmd = [sys.executable, "training/pretrain.py", "--config", "config/pretrain_demo.yaml"]
    for o in _overrides(cfg):
        cmd += ["--set", o]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while not state.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    proc.kill()
    err = proc.communicate()[1].decode()
    assert state.exists(), err[-2000:]
    from training.engine.state import load_state
    st = load_state(state)          # never torn: written atomically
    assert st["epoch"] >= 1 and st["step_in_epoch"] == 0
    pretrain.run(cfg, resume=True)
    ref = pretrain.run(_tiny_cfg(tmp_path, "ref2"))
    _assert_same_state(Path(ref["state"]), state)


@pytest.mark.parametrize("cls_name,name", [("FinetuneConfig", "finetune"), ("FinetuneConfig", "finetune_demo"),
                                           ("EvaluateConfig", "evaluate"), ("EvaluateConfig", "evaluate_demo")])
def test_finetune_and_evaluate_configs_load(cls_name, name):
    from training.engine import config as c

    cfg = c.load_training_config(getattr(c, cls_name), ROOT / f"config/{name}.yaml")
    assert cfg.data.reader


def test_sweeps_are_aligned_augmented_together_and_fused(data_dir):
    """A sweep stored in its own LiDAR frame (real scan moved by a known ego motion) comes
    back in the key frame, augmented with the key frame's transform, as its own batch row;
    SSR puts its points in the key frame's cells and sends gradients through them."""
    from clip2scene_core.datasets import SemanticKittiReader
    from clip2scene_core.datasets.sample import Sample
    from clip2scene_core.models import ModelConfig, build_model
    from clip2scene_core.types import Scan
    from clip2scene_core.config import from_dict
    from training.engine.config import DataConfig, PretrainLossConfig
    from training.engine.data import collate_prepared, prepare_sample
    from training.engine.objectives import PretrainObjective
    from training.engine.teacher_cache import PixelTargets

    key = SemanticKittiReader(data_dir / "semantickitti/squeezesegv3_sample_data")[0]
    sel = np.random.default_rng(0).choice(len(key.scan), 3000, replace=False)
    scan = key.scan.select(np.sort(sel))
    a = 0.3
    T = np.eye(4)                                   # sweep lidar → key lidar (ego moved 2 m, turned)
    T[:3, :3] = [[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]]
    T[:3, 3] = [2.0, -0.5, 0.1]
    pts = scan.points.copy()
    pts[:, :3] = (np.c_[scan.xyz, np.ones(len(scan))] @ np.linalg.inv(T).T)[:, :3]
    sample = Sample(scan=scan, sweeps=[(Scan(pts, scan.fields), T)], token="k")
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 5, len(scan))
    emb = torch.nn.functional.normalize(torch.randn(5, 16, generator=torch.Generator().manual_seed(0)), dim=1)
    targets = PixelTargets(np.arange(0, len(scan), 2), emb[labels[::2]].numpy(), labels[::2])
    prep = prepare_sample(sample, targets, DataConfig(), rng, augment=True, embed_dim=16)
    assert len(prep.scans) == 2
    assert np.allclose(prep.scans[1].xyz, prep.scans[0].xyz, atol=1e-3)      # aligned + same augmentation
    assert not np.allclose(prep.scans[0].xyz, scan.xyz, atol=1e-2)          # and augmented

    cfg = from_dict(ModelConfig, {"backbone": "minkunet14a", "in_channels": 1, "embed_dim": 16,
                                  "width_multiplier": 0.125,
                                  "voxel": {"voxel_size": 0.5, "point_range": [-60, -60, -5, 60, 60, 5]}})
    batch = collate_prepared([prep], cfg.voxel)
    assert batch.voxels.batch_size == 2                                     # key and sweep rows
    assert int((~batch.is_key).sum()) > 0 and not bool(batch.has_pixel[~batch.is_key].any())
    torch.manual_seed(0)
    net = build_model(cfg)
    loss_cfg = from_dict(PretrainLossConfig, {"scr": {"enabled": False}, "ssr": {"grid_size": 1.0}})
    out_feats = {}
    real_forward = net.forward

    def forward(vb):
        out = real_forward(vb)
        out.global_.retain_grad()
        out_feats["g"] = out.global_
        return out

    net.forward = forward
    loss, scalars = PretrainObjective(loss_cfg, emb)(net, batch, 0, torch.Generator())
    loss.backward()
    assert np.isfinite(scalars["ssr"]) and scalars["ssr"] > 0
    g = out_feats["g"].grad
    assert float(g[~batch.is_key].abs().sum()) > 0                          # sweeps take part in SSR


def test_training_length_in_steps_resumes_bitwise_and_returns_the_start(tmp_path, monkeypatch):
    """``optim.steps``: exactly that many optimizer steps (5 over 2 samples = 3 data passes,
    the last cut short), a record every ``save_every_steps``; SIGTERM + resume ends bitwise
    equal; ``initial_checkpoint`` holds the untrained weights training started from."""
    from clip2scene_core.checkpoint import load_checkpoint
    from clip2scene_core.models import build_model
    from training import pretrain
    from training.engine import objectives
    from training.engine.loop import Interrupted
    from training.engine.state import load_state

    def cfg(out):
        c = _tiny_cfg(tmp_path, out)
        c.optim.steps, c.run.save_every_steps = 5, 2
        return c

    ref = pretrain.run(cfg("ref"))
    assert ref["steps"] == 5 and [h["step"] for h in ref["history"]] == [2.0, 4.0, 5.0]
    assert [h["epoch"] for h in ref["history"]] == [0.0, 1.0, 2.0]
    st = load_state(ref["state"])
    assert (st["global_step"], st["epoch"], st["step_in_epoch"]) == (5, 2, 1)
    assert ref["teacher_agreement"] is None                        # these key frames carry no labels

    init = load_checkpoint(ref["initial_checkpoint"])
    torch.manual_seed(cfg("x").run.seed)
    fresh = build_model(cfg("x").model).state_dict()
    trained = load_checkpoint(ref["checkpoint"]).state_dict
    assert all(torch.equal(v, fresh[k]) for k, v in init.state_dict.items())
    assert any(not torch.equal(v, trained[k]) for k, v in init.state_dict.items() if v.is_floating_point())

    real_call = objectives.PretrainObjective.__call__
    calls = {"n": 0}

    def call(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_call(self, *a, **k)

    monkeypatch.setattr(objectives.PretrainObjective, "__call__", call)
    with pytest.raises(Interrupted):
        pretrain.run(cfg("cut"))
    assert load_state(tmp_path / "cut" / "last.pt")["global_step"] == 3
    monkeypatch.setattr(objectives.PretrainObjective, "__call__", real_call)
    pretrain.run(cfg("cut"), resume=True)
    _assert_same_state(tmp_path / "ref" / "last.pt", tmp_path / "cut" / "last.pt")
