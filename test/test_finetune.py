"""Fine-tuning on real labelled SemanticKITTI scans: scene-level label fractions, the loss
falls, mIoU on an unseen scan rises, and evaluation writes the tables, the confusion PNG and a
deployable checkpoint the Segmenter loads."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from clip2scene_core.config import from_dict
from clip2scene_core.datasets import NuScenesReader, SemanticKittiReader
from clip2scene_core.datasets.sample import Sample
from clip2scene_core.errors import ConfigError

KITTI = "semantickitti/squeezesegv3_sample_data"


def test_scene_subsample_takes_whole_scenes():
    from training.engine.data import scene_subsample

    scenes = ["a"] * 5 + ["b"] * 3 + ["c"] * 4 + ["d"] * 2
    for frac in (0.01, 0.25, 0.5, 1.0):
        idx = scene_subsample(scenes, frac, seed=3)
        chosen = {scenes[i] for i in idx}
        assert len(chosen) == max(1, int(np.ceil(frac * 4)))
        assert idx == [i for i, s in enumerate(scenes) if s in chosen]     # all frames of a scene
        assert idx == scene_subsample(scenes, frac, seed=3)                 # reproducible
    assert scene_subsample(scenes, 1.0) == list(range(len(scenes)))
    with pytest.raises(ConfigError):
        scene_subsample(scenes, 0.0)


def test_scene_ids_of_real_readers(data_dir):
    from training.engine.data import sample_scenes, scene_subsample

    nus = NuScenesReader(data_dir / "nuscenes/dororo99_v1.0-extract_3samples", version_dir="v1.0-extract-subset")
    scenes = sample_scenes(nus)
    assert scenes == [nus[i].scene for i in range(len(nus))]
    assert len(set(scenes)) == 2
    half = scene_subsample(scenes, 0.5, seed=0)
    assert len({scenes[i] for i in half}) == 1
    kitti = SemanticKittiReader(data_dir / KITTI)
    assert sample_scenes(kitti) == ["00"] * 3


def _subsampled(sample: Sample, n: int, seed: int = 0) -> Sample:
    sel = np.random.default_rng(seed).choice(len(sample.scan), n, replace=False)
    return Sample(scan=sample.scan.select(sel), labels=sample.labels[sel], vocabulary_name=sample.vocabulary_name,
                  token=sample.token, scene=sample.scene)


def test_finetune_loss_falls_and_miou_rises(data_dir, tmp_path):
    from clip2scene_core.clip import Vocabulary
    from clip2scene_core.models import ModelConfig, build_model
    from clip2scene_core.segmenter import Segmenter
    from training import evaluate, finetune
    from training.engine import common
    from training.engine.config import EvaluateConfig, FinetuneConfig

    # the "pre-trained" input: a deployable checkpoint (random weights, random class embeddings)
    model_cfg = from_dict(ModelConfig, {"backbone": "minkunet14a", "in_channels": 2, "embed_dim": 32,
                                        "width_multiplier": 0.125,
                                        "voxel": {"voxel_size": 0.5, "point_range": [-50, -50, -4, 50, 50, 4],
                                                  "features": ["intensity", "z"]}})
    torch.manual_seed(0)
    vocab = Vocabulary.preset("semantickitti19")
    emb = F.normalize(torch.randn(19, 32, generator=torch.Generator().manual_seed(0)), dim=1)
    start = common.write_deployable(tmp_path / "start.pt", model_cfg, build_model(model_cfg).state_dict(), vocab,
                                    emb, "random", {"kind": "pretrain"})

    reader = SemanticKittiReader(data_dir / KITTI)
    cfg = from_dict(FinetuneConfig, {
        "pretrained": str(start), "label_fraction": 1.0,
        "data": {"reader": "SemanticKittiReader", "indices": [0, 1], "max_points": 6000,
                 "augment": {"rotate_z": 180.0}},
        "loss": {"lovasz_weight": 1.0},
        "optim": {"lr": 0.1, "epochs": 8, "batch_size": 2, "dampening": 0.0},
        "run": {"out_dir": str(tmp_path / "ft"), "device": "cpu", "progress": False, "log_every": 1},
    })
    out = finetune.run(cfg, reader=reader)
    losses = [h["loss"] for h in out["history"]]
    assert out["samples_used"] == 2
    assert losses[-1] < 0.8 * losses[0], losses

    test = [_subsampled(reader[2], 15000)]       # a scan fine-tuning never saw
    ev = lambda ck, d: evaluate.run(from_dict(EvaluateConfig, {  # noqa: E731
        "checkpoint": str(ck), "out_dir": str(tmp_path / d), "heads": ["local"], "device": "cpu"}), reader=test)
    before = ev(start, "ev0")
    after = ev(out["checkpoint"], "ev1")
    print("fine-tune:", json.dumps({"loss": [round(v, 3) for v in losses],
                                    "miou_before": before["heads"]["local"]["miou"],
                                    "miou_after": after["heads"]["local"]["miou"]}))
    assert after["heads"]["local"]["miou"] > before["heads"]["local"]["miou"] + 0.05
    assert after["annotation_free"] is False and before["annotation_free"] is True
    from_state = ev(out["state"], "ev2")      # the resume state evaluates the same as model.pt
    assert from_state["heads"]["local"]["miou"] == pytest.approx(after["heads"]["local"]["miou"])

    ev1 = tmp_path / "ev1"
    assert (ev1 / "confusion_local.png").stat().st_size > 1000
    assert "mIoU" in (ev1 / "iou_local.txt").read_text()
    metrics = json.loads((ev1 / "metrics.json").read_text())
    assert metrics["heads"]["local"]["miou"] == pytest.approx(after["heads"]["local"]["miou"])
    # the deployable checkpoint reproduces the evaluated predictions through the node's path
    seg = Segmenter.load(ev1 / "model.pt", device="cpu")
    direct = Segmenter.load(out["checkpoint"], device="cpu")
    assert np.array_equal(seg.segment(test[0].scan).labels, direct.segment(test[0].scan).labels)
    assert seg.class_names == list(vocab.class_names)


def test_finetune_resume_state_is_a_finetune_state(data_dir, tmp_path):
    """A pre-training state cannot be resumed as fine-tuning (kind mismatch is refused)."""
    from clip2scene_core.errors import CheckpointError
    from training.engine.state import load_state, save_state

    save_state(tmp_path / "last.pt", {"kind": "pretrain"})
    assert load_state(tmp_path / "last.pt")["kind"] == "pretrain"
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError):
        load_state(tmp_path / "bad.pt")
