"""Issue 9, part C: training never ships a broken model, files prove their integrity, clear errors.

Each test re-runs one attack of the issue against the real tools (tiny nuScenes runs as in
test_pretrain.py, real checkpoints, real cache entries) and checks that it now ends in a clear
error or a counted repair:

* non-finite / out-of-range optimiser settings are refused at config load, naming the key;
* a NaN loss stops training with an error naming epoch and step; the last good state stays
  and ``--resume`` continues bitwise as if nothing had happened; nothing non-finite is saved;
* NaN weights, text embeddings or logit scale in a checkpoint are refused on load;
* one flipped byte in a checkpoint, a training state or a text-embedding file is a
  CheckpointError naming the file (content digest); files without a digest load with a warning;
* one flipped byte (or NaN features) in a teacher-cache entry: named, discarded, recomputed;
* ``--resume`` refuses another model or other settings (naming the keys), says when there is
  nothing to resume;
* disk full while saving is one line naming the path, and the previous file is intact.
"""
from __future__ import annotations

import logging
import os
import resource
import signal
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from clip2scene_core.errors import CheckpointError, Clip2SceneError, ConfigError

ROOT = Path(__file__).resolve().parents[1]
NUSCENES = ROOT / "test/data/nuscenes/dororo99_v1.0-extract_3samples"


@pytest.fixture(autouse=True)
def _restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _overrides(tmp: Path, out: str, epochs: int = 2) -> list[str]:
    """The demo config shrunk: 2 nuScenes key frames, front camera, 1000 points, batch 1."""
    return [f"data.args.root={NUSCENES}", "data.args.cameras=[CAM_FRONT]", "data.indices=[0, 1]",
            "data.max_points=1000", f"optim.epochs={epochs}", "optim.batch_size=1",
            "loss.self_training.switch_epoch=1", "loss.self_training.mode=point",
            f"teacher.cache_dir={tmp / 'cache'}", f"run.out_dir={tmp / out}", "run.progress=false",
            "run.num_threads=1"]


def _cfg(tmp: Path, out: str, *extra: str, epochs: int = 2):
    from training.engine.config import PretrainConfig, load_training_config

    return load_training_config(PretrainConfig, ROOT / "config/pretrain_demo.yaml",
                                _overrides(tmp, out, epochs) + list(extra))


def _flip_inside(path: Path, needle: bytes) -> None:
    """Flip one bit in the middle of ``needle`` (tensor bytes) where it occurs in ``path``."""
    raw = bytearray(path.read_bytes())
    at = raw.find(needle)
    assert at >= 0, "tensor bytes not found in the file"
    raw[at + len(needle) // 2] ^= 0x10
    path.write_bytes(bytes(raw))


@contextmanager
def _file_size_limit(nbytes: int):
    """Writes beyond ``nbytes`` fail (EFBIG), as on a full disk."""
    old_sig = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    old = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, old[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old)
        signal.signal(signal.SIGXFSZ, old_sig)


# ----------------------------------------------------------------------------- settings
@pytest.mark.parametrize("override,key", [
    ("optim.lr=.nan", "optim.lr"), ("optim.lr=.inf", "optim.lr"), ("optim.lr=-0.1", "optim.lr"),
    ("optim.epochs=-1", "optim.epochs"), ("optim.epochs=0", "optim.epochs"),
    ("optim.batch_size=0", "optim.batch_size"), ("optim.momentum=1.5", "optim.momentum"),
    ("optim.weight_decay=-1", "optim.weight_decay"), ("optim.grad_clip=.nan", "optim.grad_clip"),
    ("optim.nesterov=true", "optim.nesterov"), ("loss.scr.temperature=.nan", "loss.scr.temperature"),
    ("optim.lr.x=1", "optim.lr is a value"), ("optim.lr=[", "not valid YAML"),
    ("run.num_threads=0", "run.num_threads"),
])
def test_bad_settings_are_refused_naming_the_key(override, key):
    from training.engine.config import PretrainConfig, load_training_config

    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_training_config(PretrainConfig, ROOT / "config/pretrain_demo.yaml", [override])


def test_finetune_settings_are_checked_too():
    from training.engine.config import FinetuneConfig, load_training_config

    for override, key in [("label_fraction=0", "label_fraction"), ("loss.logit_scale=.nan", "loss.logit_scale"),
                          ("optim.batch_size=0", "optim.batch_size")]:
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_training_config(FinetuneConfig, ROOT / "config/finetune_demo.yaml", [override])


def test_cli_prints_one_line_for_bad_settings(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    for bad in ("optim.lr.x=1", "optim.batch_size=0", "optim.lr=.nan"):
        r = subprocess.run([sys.executable, "training/pretrain.py", "--config", "config/pretrain_demo.yaml",
                            "--set", f"run.out_dir={tmp_path / 'out'}", "--set", bad],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
        assert r.returncode == 2, r.stderr[-2000:]
        assert "Traceback" not in r.stderr and bad.split("=")[0].split(".x")[0] in r.stderr, r.stderr
        assert len([ln for ln in r.stderr.splitlines() if "ERROR" in ln]) == 1
    assert not (tmp_path / "out" / "model.pt").exists()


# ----------------------------------------------------------------------------- divergence
def test_nan_loss_stops_with_the_last_good_state_and_resume_is_bitwise(tmp_path, monkeypatch):
    from training import pretrain
    from training.engine import objectives
    from training.engine.loop import NonFiniteLossError
    from training.engine.state import load_state

    ref = pretrain.run(_cfg(tmp_path, "ref"))
    real_call = objectives.PretrainObjective.__call__
    calls = {"n": 0}

    def call(self, *a, **k):          # epoch 2, step 1: the loss becomes NaN
        calls["n"] += 1
        loss, scalars = real_call(self, *a, **k)
        return (loss * float("nan") if calls["n"] == 3 else loss), scalars

    monkeypatch.setattr(objectives.PretrainObjective, "__call__", call)
    with pytest.raises(NonFiniteLossError, match=r"epoch 2, step 1") as err:
        pretrain.run(_cfg(tmp_path, "cut"))
    assert "end of epoch 1" in str(err.value) and "--resume" in str(err.value)
    assert not (tmp_path / "cut" / "model.pt").exists()            # nothing deployable was written
    st = load_state(tmp_path / "cut" / "last.pt")
    assert (st["epoch"], st["step_in_epoch"]) == (1, 0)            # the last good state
    monkeypatch.setattr(objectives.PretrainObjective, "__call__", real_call)
    pretrain.run(_cfg(tmp_path, "cut"), resume=True)
    a, b = load_state(ref["state"]), load_state(tmp_path / "cut" / "last.pt")
    assert a["global_step"] == b["global_step"] == 4
    assert all(torch.equal(v, b["model"][k]) for k, v in a["model"].items())


def test_diverging_learning_rate_stops_without_a_model(tmp_path):
    """A finite but absurd learning rate: the weights blow up, training stops with one line."""
    from training import pretrain

    code = pretrain.main(["--config", "config/pretrain_demo.yaml", *sum(
        (["--set", o] for o in _overrides(tmp_path, "lr") + ["optim.lr=1e30"]), [])])
    assert code == 2
    assert not (tmp_path / "lr" / "model.pt").exists()


def test_non_finite_weights_are_never_written(tmp_path):
    from clip2scene_core.checkpoint import Checkpoint, save_checkpoint
    from clip2scene_core.clip import Vocabulary
    from training.engine.state import save_state

    vocab = Vocabulary.from_names(["road", "car"])
    state = {"w": torch.tensor([1.0, float("nan")]), "b": torch.zeros(2)}
    with pytest.raises(CheckpointError, match=r"model\.w \(1 of 2"):
        save_state(tmp_path / "last.pt", {"kind": "pretrain", "model": state})
    from clip2scene_core.models import ModelConfig
    ck = Checkpoint(ModelConfig(embed_dim=4), state, vocab, F.normalize(torch.ones(2, 4), dim=1), "m")
    with pytest.raises(CheckpointError, match=r"weights\.w .*not written"):
        save_checkpoint(tmp_path / "model.pt", ck)
    assert not (tmp_path / "last.pt").exists() and not (tmp_path / "model.pt").exists()


# ----------------------------------------------------------------------------- checkpoints
@pytest.fixture(scope="module")
def deployable(tmp_path_factory):
    """A real deployable checkpoint of the tiny demo network."""
    from clip2scene_core.clip import Vocabulary
    from clip2scene_core.models import build_model
    from training.engine import common
    from training.engine.config import PretrainConfig, load_training_config

    cfg = load_training_config(PretrainConfig, ROOT / "config/pretrain_demo.yaml")
    torch.manual_seed(0)
    net = build_model(cfg.model)
    vocab = Vocabulary.preset("nuscenes16")
    emb = F.normalize(torch.randn(16, cfg.model.embed_dim, generator=torch.Generator().manual_seed(0)), dim=1)
    path = tmp_path_factory.mktemp("ckpt") / "model.pt"
    common.write_deployable(path, cfg.model, net.state_dict(), vocab, emb, "demo", {"logit_scale": 50.0})
    return path


def _resealed(data: dict, path: Path) -> Path:
    """A crafted file with a *valid* digest (the attacker recomputed it)."""
    from clip2scene_core.checkpoint import seal

    torch.save(seal(data), path)
    return path


@pytest.mark.parametrize("what", ["weight", "text_embeddings", "logit_scale"])
def test_non_finite_checkpoints_are_refused(deployable, tmp_path, what):
    from clip2scene_core.checkpoint import load_checkpoint
    from clip2scene_core.segmenter import Segmenter

    data = torch.load(deployable, weights_only=True)
    if what == "weight":
        key = next(k for k, v in data["state_dict"].items() if v.is_floating_point() and v.numel() > 4)
        data["state_dict"][key].view(-1)[3] = float("nan")
        pattern = rf"weights\.{key.replace('.', r'[.]')} \(1 of"
    elif what == "text_embeddings":
        data["text_embeddings"][2, 0] = float("inf")
        pattern = r"text_embeddings \(1 of"
    else:
        data["extra"]["logit_scale"] = float("nan")
        pattern = "logit_scale nan"
    path = _resealed(data, tmp_path / f"{what}.pt")
    with pytest.raises(CheckpointError, match=pattern):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match=str(path.name)):
        Segmenter.load(path, device="cpu")


def test_segmenter_refuses_non_finite_vocabulary_and_scale(deployable):
    from clip2scene_core.segmenter import Segmenter, SegmenterConfig

    seg = Segmenter.load(deployable, device="cpu")
    emb = torch.ones(2, seg.model_config.embed_dim)
    emb[1, 0] = float("nan")
    with pytest.raises(ConfigError, match="car"):
        seg.set_vocabulary(["road", "car"], emb)
    with pytest.raises(ConfigError, match="logit_scale"):
        Segmenter.load(deployable, device="cpu", config=SegmenterConfig(logit_scale=float("nan")))


def test_one_flipped_byte_in_a_checkpoint_is_detected(deployable, tmp_path):
    from clip2scene_core.checkpoint import load_checkpoint

    path = tmp_path / "flipped.pt"
    path.write_bytes(deployable.read_bytes())
    data = torch.load(deployable, weights_only=True)
    key, weight = max(data["state_dict"].items(), key=lambda kv: kv[1].numel())
    _flip_inside(path, weight.contiguous().numpy().tobytes()[:64])
    silently = torch.load(path, weights_only=True)                    # torch does not notice
    assert not torch.equal(silently["state_dict"][key], weight)
    with pytest.raises(CheckpointError, match=r"flipped\.pt.*digest"):
        load_checkpoint(path)


def test_checkpoint_without_digest_loads_with_a_warning(deployable, tmp_path, caplog):
    from clip2scene_core.checkpoint import DIGEST_KEY, load_checkpoint

    data = torch.load(deployable, weights_only=True)
    assert DIGEST_KEY in data
    del data[DIGEST_KEY]
    torch.save(data, tmp_path / "old.pt")                               # as written before digests
    with caplog.at_level(logging.WARNING):
        ck = load_checkpoint(tmp_path / "old.pt")
    assert ck.text_embeddings.shape == (16, 24)
    assert "no content digest" in caplog.text and "old.pt" in caplog.text


def test_flipped_byte_in_state_and_embedding_files(tmp_path):
    from clip2scene_core.clip import Vocabulary
    from clip2scene_core.clip.text_bank import load_text_embeddings, save_text_embeddings
    from training.engine.state import load_state, save_state

    w = torch.linspace(0.1, 3.0, 256)
    save_state(tmp_path / "last.pt", {"kind": "pretrain", "model": {"w": w}})
    assert torch.equal(load_state(tmp_path / "last.pt")["model"]["w"], w)
    _flip_inside(tmp_path / "last.pt", w.numpy().tobytes()[:64])
    with pytest.raises(CheckpointError, match=r"last\.pt.*digest"):
        load_state(tmp_path / "last.pt")

    vocab = Vocabulary.from_names(["road", "car", "tree"])
    emb = F.normalize(torch.randn(3, 64, generator=torch.Generator().manual_seed(0)), dim=1)
    save_text_embeddings(tmp_path / "text.pt", vocab, emb, "m")
    _flip_inside(tmp_path / "text.pt", emb.numpy().tobytes()[:64])
    with pytest.raises(CheckpointError, match=r"text\.pt.*digest"):
        load_text_embeddings(tmp_path / "text.pt")


# ----------------------------------------------------------------------------- teacher cache
TEXT_CFG = {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}
VIT_CFG = {"embed_dim": 24, "vision_cfg": {"image_size": 64, "layers": 1, "width": 32, "patch_size": 16,
                                           "head_width": 16}, "text_cfg": TEXT_CFG}


@pytest.fixture(scope="module")
def cache_parts(data_dir):
    from clip2scene_core.clip import ClipTeacher, PreprocessConfig, Vocabulary
    from clip2scene_core.datasets import NuScenesReader

    teacher = ClipTeacher.from_config(VIT_CFG, device="cpu", seed=0, preprocess=PreprocessConfig(short_side=96))
    sample = NuScenesReader(data_dir / "nuscenes/dororo99_v1.0-extract_3samples", version_dir="v1.0-extract-subset",
                            cameras=("CAM_FRONT", "CAM_FRONT_LEFT"))[0]
    emb = teacher.text_embeddings(Vocabulary.preset("nuscenes16"), "single", use_cache=False).float().cpu()
    return teacher, sample, emb


@pytest.mark.parametrize("damage", ["flip_features", "flip_header", "nan_features", "truncate"])
def test_corrupt_cache_entry_is_named_discarded_and_recomputed(tmp_path, cache_parts, caplog, damage):
    from training.engine.teacher_cache import CorruptEntryError, open_cache

    teacher, sample, emb = cache_parts
    cache = open_cache(teacher, tmp_path / "cache")
    assert cache.build([sample], teacher, emb, progress=False)["computed"] == 2
    good = cache.load_sample(sample, emb)
    key = cache.keys_for_sample(sample)[0]
    path = cache.path(key)
    with np.load(path) as z:
        arrays = {n: z[n] for n in z.files}
    if damage == "flip_features":
        _flip_inside(path, arrays["features"].tobytes()[:64])
    elif damage == "flip_header":
        raw = bytearray(path.read_bytes())
        raw[30] ^= 0x01                         # member name in the first local zip header
        path.write_bytes(bytes(raw))
    elif damage == "nan_features":                                   # crafted, with a valid digest
        from training.engine.teacher_cache import entry_digest

        arrays.pop("digest")
        arrays["features"][0, 0] = np.nan
        arrays["digest"] = np.array(entry_digest(key, arrays))
        np.savez(path, **arrays)
    else:
        path.write_bytes(path.read_bytes()[:200])

    damaged = path.read_bytes()
    # training reads it: an error naming the file, which is deleted
    with pytest.raises(CorruptEntryError, match=path.name):
        cache.load_sample(sample, emb)
    assert not path.exists()
    # the damaged entry again: the next teacher pass names it, discards it and recomputes it
    path.write_bytes(damaged)
    with caplog.at_level(logging.WARNING):
        stats = cache.build([sample], teacher, emb, progress=False)
    assert stats == {"computed": 1, "cached": 1, "samples": 1, "repaired": 1}
    assert str(path) in caplog.text and "discarded" in caplog.text
    again = cache.load_sample(sample, emb)
    assert np.array_equal(again.point_index, good.point_index) and np.array_equal(again.features, good.features)


def test_pretraining_recovers_from_a_corrupt_cache_entry(tmp_path):
    """Issue 9: one flipped byte in an entry used to crash every later pre-training run."""
    from training import pretrain

    first = pretrain.run(_cfg(tmp_path, "a", epochs=1))
    entries = sorted((tmp_path / "cache").glob("??/*.npz"))
    assert len(entries) == 2
    raw = bytearray(entries[0].read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    entries[0].write_bytes(bytes(raw))
    second = pretrain.run(_cfg(tmp_path, "b", epochs=1))
    assert second["teacher"] == {"computed": 1, "cached": 1, "samples": 2, "repaired": 1}
    assert first["history"][-1]["loss"] == second["history"][-1]["loss"]


# ----------------------------------------------------------------------------- resume
def test_resume_refuses_other_models_and_settings(tmp_path, caplog):
    from training import pretrain

    with caplog.at_level(logging.WARNING):
        pretrain.run(_cfg(tmp_path, "r", epochs=1), resume=True)     # nothing to resume: says so
    assert "no training state" in caplog.text and "starting from scratch" in caplog.text

    with pytest.raises(CheckpointError, match=r"different model.*width_multiplier: 0\.125 -> 0\.25"):
        pretrain.run(_cfg(tmp_path, "r", "model.width_multiplier=0.25", epochs=1), resume=True)
    with pytest.raises(CheckpointError, match=r"optim\.lr: 0\.1 -> 0\.05.*--force-resume") as info:
        pretrain.run(_cfg(tmp_path, "r", "optim.lr=0.05", epochs=1), resume=True)
    assert "recipe" not in str(info.value)                            # lr is no recipe key: no hint
    # a key recipes supply (whose defaults may change between versions): the refusal says how
    # to resume as the state was written
    with pytest.raises(CheckpointError, match=r"loss\.ssr\.grid_size: 1\.0 -> 0\.5.*"
                                              r"pass --set loss\.ssr\.grid_size=1\.0\."):
        pretrain.run(_cfg(tmp_path, "r", "loss.ssr.grid_size=0.5", epochs=1), resume=True)
    with pytest.raises(CheckpointError, match=r"different model.*pass --set model\.backbone=\"minkunet14a\""):
        pretrain.run(_cfg(tmp_path, "r", "model.backbone=minkunet18", epochs=1), resume=True)
    with pytest.raises(CheckpointError, match=r"run\.seed: 0 -> 1"):
        pretrain.run(_cfg(tmp_path, "r", "run.seed=1", epochs=1), resume=True)
    with pytest.raises(CheckpointError, match=r"optim\.epochs: 1 -> 2"):
        pretrain.run(_cfg(tmp_path, "r", epochs=2), resume=True)
    # where files go and how fast do not matter
    same = pretrain.run(_cfg(tmp_path, "r", "run.log_every=5", "run.num_workers=0", epochs=1), resume=True)
    assert same["steps"] == 2
    # forced: continues with the new settings (one more epoch at another learning rate)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        more = pretrain.run(_cfg(tmp_path, "r", "optim.lr=0.05", epochs=2), force_resume=True)
    assert more["steps"] == 4 and "optim.lr: 0.1 -> 0.05" in caplog.text


# ----------------------------------------------------------------------------- disk full
def test_disk_full_while_saving_keeps_the_previous_file(deployable, tmp_path):
    from clip2scene_core.atomic import WriteError
    from clip2scene_core.checkpoint import load_checkpoint, save_checkpoint
    from training.engine.state import load_state, save_state

    path = tmp_path / "model.pt"
    path.write_bytes(deployable.read_bytes())
    ck = load_checkpoint(path)
    save_state(tmp_path / "last.pt", {"kind": "pretrain", "model": ck.state_dict})
    before = (path.read_bytes(), (tmp_path / "last.pt").read_bytes())
    with _file_size_limit(4096):
        with pytest.raises(WriteError, match=r"cannot write .*model\.pt.*the previous model\.pt is intact"):
            save_checkpoint(path, ck)
        with pytest.raises(WriteError, match=r"last\.pt.*the previous last\.pt is intact"):
            save_state(tmp_path / "last.pt", {"kind": "pretrain", "model": ck.state_dict})
    assert (path.read_bytes(), (tmp_path / "last.pt").read_bytes()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt", "model.pt"]   # no temporary left
    load_checkpoint(path)
    load_state(tmp_path / "last.pt")


def test_cli_disk_full_is_one_line(tmp_path):
    from training import pretrain

    pretrain.run(_cfg(tmp_path, "warm", epochs=1), teacher_only=True)   # the cache exists: no write there
    cmd = [sys.executable, "training/pretrain.py", "--config", "config/pretrain_demo.yaml"]
    for o in _overrides(tmp_path, "full", epochs=1):
        cmd += ["--set", o]

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (8192, resource.RLIM_INFINITY))

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240, preexec_fn=limit)
    assert r.returncode == 2, r.stderr[-3000:]
    assert "Traceback" not in r.stderr and "unexpected pos" not in r.stderr
    errors = [ln for ln in r.stderr.splitlines() if "ERROR" in ln]
    assert len(errors) == 1 and "cannot write" in errors[0] and str(tmp_path / "full") in errors[0], r.stderr


def test_write_errors_are_project_errors():
    from clip2scene_core.atomic import WriteError

    assert issubclass(WriteError, Clip2SceneError) and issubclass(WriteError, OSError)


def test_old_text_embedding_cache_files_are_upgraded(tmp_path, caplog):
    """A cache file from before digests loads (one warning) and is rewritten with a digest."""
    from clip2scene_core.checkpoint import DIGEST_KEY
    from clip2scene_core.clip import Vocabulary
    from clip2scene_core.clip.text_bank import TextEmbeddingBank

    def encode(texts):
        g = torch.Generator().manual_seed(len(texts))
        return torch.randn(len(texts), 8, generator=g)

    bank = TextEmbeddingBank(encode, "m", "w", cache_dir=tmp_path)
    vocab = Vocabulary.from_names(["road", "car"])
    emb = bank.get(vocab, ["a {}."])
    path = bank.path_for(vocab, ["a {}."])
    data = torch.load(path, weights_only=True)
    del data[DIGEST_KEY]
    torch.save(data, path)
    with caplog.at_level(logging.WARNING):
        assert torch.equal(bank.get(vocab, ["a {}."]), emb)
    assert "no content digest" in caplog.text
    assert DIGEST_KEY in torch.load(path, weights_only=True)
