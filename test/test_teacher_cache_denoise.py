"""MaskCLIP prompt denoising of the teacher cache's pseudo-labels, and the teacher config keys of
both MaskCLIP refinements, on a real nuScenes key frame (two cameras) with a tiny random CLIP.

The threshold is picked from the image's own class confidences (their median peak), so that
some classes are removed and some points' plain labels use a removed class: the tests can fail.
"""
from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from clip2scene_core.config import from_dict
from clip2scene_core.errors import Clip2SceneError, ConfigError

# the tiny random ViT teacher and the real nuScenes key frame of the plain cache's tests
from test_teacher_cache import VIT_CFG, sample, teacher, text_emb  # noqa: F401 (shared module fixtures)

PLAIN_ARRAYS = {"point_index", "features", "labels", "text_digest", "digest"}


def _kept(teacher, image, text_emb, threshold):
    """The kept classes straight from the teacher's own dense scores (``ClipTeacher.dense_scores``)."""
    from clip2scene_core.clip import kept_classes

    scores = teacher.dense_scores(image, text_emb)[0]
    return kept_classes(scores, threshold, float(teacher.model.logit_scale.exp()))


@pytest.fixture(scope="module")
def threshold(teacher, sample, text_emb):
    """The median over classes of the first camera's peak confidence."""
    from clip2scene_core.clip.refine import class_confidence

    scores = teacher.dense_scores(sample.cameras[0].image, text_emb)[0]
    peak = class_confidence(scores, float(teacher.model.logit_scale.exp())).flatten(1).amax(1)
    return float(peak.median())


def _cache(tmp_path, teacher, denoise, name="cache"):
    from training.engine.teacher_cache import open_cache

    return open_cache(teacher, tmp_path / name, 1.0, denoise)


def _entries(cache, sample):
    return [cache.read_entry(k) for k in cache.keys_for(sample.scan, sample.cameras)]


# --- config ------------------------------------------------------------------------------------
def test_teacher_config_keys_parse_and_reject_unknown_keys(teacher):
    from training.engine import common
    from training.engine.config import TeacherConfig

    cfg = from_dict(TeacherConfig, {"random_init": True, "model_cfg": VIT_CFG, "prompt_denoising": 0.5,
                                    "key_smoothing": {"enabled": True, "top_k": 8}}, "teacher")
    assert cfg.prompt_denoising == 0.5 and cfg.key_smoothing == {"enabled": True, "top_k": 8}
    built = common.build_teacher(cfg)
    assert built.key_smoothing.enabled and built.key_smoothing.top_k == 8
    assert built.identity()["key_smoothing"]["top_k"] == 8                 # its own cache entries
    assert common.make_cache(built, cfg).preprocess.prompt_denoising == 0.5
    default = from_dict(TeacherConfig, {}, "teacher")
    assert default.prompt_denoising is None and default.key_smoothing == {}
    with pytest.raises(ConfigError, match=r"teacher\.key_smoothing.*bogus"):
        from_dict(TeacherConfig, {"key_smoothing": {"enabled": True, "bogus": 1}}, "teacher")
    with pytest.raises(ConfigError, match="key_smoothing.top_k"):
        from_dict(TeacherConfig, {"key_smoothing": {"top_k": 0}}, "teacher")
    with pytest.raises(ConfigError, match="prompt_denoising"):
        from_dict(TeacherConfig, {"prompt_denoising": 1.5}, "teacher")
    with pytest.raises(ConfigError, match="prompt_denoising"):
        from_dict(TeacherConfig, {"prompt_denoising": "high"}, "teacher")


# --- keys and entries --------------------------------------------------------------------------
def test_option_off_keeps_todays_keys_and_entries(tmp_path, teacher, sample, text_emb, threshold):
    from training.engine.teacher_cache import Preprocess

    # the key's preprocessing part is exactly the dict it was before the option existed
    assert Preprocess({"a": 1}, 2.0).as_dict() == {"teacher": {"a": 1}, "min_depth": 2.0}
    off = _cache(tmp_path, teacher, None)
    keys = {d: _cache(tmp_path, teacher, d).keys_for(sample.scan, sample.cameras)
            for d in (None, 0.0, threshold, 0.5)}
    assert keys[None] == off.keys_for(sample.scan, sample.cameras)
    flat = [k for ks in keys.values() for k in ks]
    assert len(set(flat)) == len(flat)                    # each threshold its own entries
    off.build([sample], teacher, text_emb, progress=False)
    for entry in _entries(off, sample):
        assert set(entry) | {"digest"} == PLAIN_ARRAYS    # no "keep": the entry format of today
        f = torch.from_numpy(entry["features"].astype(np.float32))
        want = (f @ F.normalize(text_emb, dim=1).t()).argmax(1).numpy()
        assert np.mean(entry["labels"] == want) > 0.99     # plain argmax (fp16 storage)
    assert "prompt_denoising" not in off.write_manifest(teacher.identity()).read_text()
    on = _cache(tmp_path, teacher, threshold, "cache_on")
    assert '"prompt_denoising"' in on.write_manifest(teacher.identity()).read_text()   # recorded


def test_denoised_labels_never_use_a_removed_class(tmp_path, teacher, sample, text_emb, threshold):
    plain = _cache(tmp_path, teacher, None, "plain")
    plain.build([sample], teacher, text_emb, progress=False)
    den = _cache(tmp_path, teacher, threshold, "den")
    assert den.build([sample], teacher, text_emb, progress=False)["computed"] == 2
    changed = 0
    for cam, p, d in zip(sample.cameras, _entries(plain, sample), _entries(den, sample)):
        keep = _kept(teacher, cam.image, text_emb, threshold).numpy()
        assert np.array_equal(d["keep"], keep)
        assert 0 < keep.sum() < len(keep)                               # some removed, some kept
        assert np.array_equal(d["point_index"], p["point_index"])      # same dense forward
        assert np.array_equal(d["features"], p["features"])
        assert keep[d["labels"]].all()                                  # never a removed class
        same = keep[p["labels"]]
        assert np.array_equal(d["labels"][same], p["labels"][same])     # the argmax over kept ones
        changed += int((~same).sum())
    assert changed > 0                                                  # denoising did something
    # the reload path (training data, pseudo_labels) gives the stored, denoised labels
    targets = den.load_sample(sample, text_emb)
    pseudo = den.pseudo_labels(sample, text_emb)
    assert np.array_equal(pseudo[targets.point_index], targets.labels)
    first = _entries(den, sample)[0]
    assert np.array_equal(targets.labels[:len(first["labels"])], first["labels"])


def test_threshold_zero_equals_plain_labels(tmp_path, teacher, sample, text_emb):
    plain = _cache(tmp_path, teacher, None, "plain")
    plain.build([sample], teacher, text_emb, progress=False)
    zero = _cache(tmp_path, teacher, 0.0, "zero")
    zero.build([sample], teacher, text_emb, progress=False)
    for p, z in zip(_entries(plain, sample), _entries(zero, sample)):
        assert z["keep"].all()
        for name in ("point_index", "features", "labels", "text_digest"):
            assert np.array_equal(z[name], p[name])
    assert np.array_equal(zero.pseudo_labels(sample, text_emb), plain.pseudo_labels(sample, text_emb))


def test_denoised_entries_follow_their_class_embeddings(tmp_path, teacher, sample, text_emb, threshold):
    """Kept classes belong to one set of class embeddings: another vocabulary recomputes the
    entries in the teacher pass, and reading them with it before is an error naming the fix."""
    den = _cache(tmp_path, teacher, threshold)
    den.build([sample], teacher, text_emb, progress=False)
    other = text_emb.flip(0)
    with pytest.raises(Clip2SceneError, match="prompt-denoised for other class embeddings"):
        den.load_sample(sample, other)
    stats = den.build([sample], teacher, other, progress=False)
    assert stats["computed"] == 2 and stats["cached"] == 0
    assert den.build([sample], teacher, other, progress=False)["cached"] == 2
    for cam, entry in zip(sample.cameras, _entries(den, sample)):
        keep = _kept(teacher, cam.image, other, threshold).numpy()
        assert np.array_equal(entry["keep"], keep) and keep[entry["labels"]].all()


def test_an_entry_labelled_outside_its_kept_classes_is_corrupt(tmp_path, teacher, sample, text_emb, threshold):
    from training.engine.teacher_cache import CorruptEntryError

    den = _cache(tmp_path, teacher, threshold)
    den.build([sample], teacher, text_emb, progress=False)
    key = den.keys_for(sample.scan, sample.cameras)[0]
    arrays = den.read_entry(key)
    removed = int(np.flatnonzero(~arrays["keep"])[0])
    arrays["labels"] = arrays["labels"].copy()
    arrays["labels"][0] = removed
    den._write(key, arrays)                              # a consistent digest, inconsistent labels
    with pytest.raises(CorruptEntryError, match="kept classes"):
        den.read_entry(key)
    assert den.build([sample], teacher, text_emb, progress=False)["repaired"] == 1


class PixelsOnly:
    """A teacher with pixel features but no dense class map (like the label-image teachers)."""

    model_name = "pixels-only"
    reads_sources = False

    def __init__(self, clip) -> None:
        self.clip = clip

    def identity(self):
        return {"kind": "pixels-only", "inner": self.clip.identity()}

    def source_digest(self, view) -> str:
        return ""

    def text_embeddings(self, vocab, templates="single", cache_dir=None):
        return self.clip.text_embeddings(vocab, templates, cache_dir)

    def pixel_features(self, image, uv, view=None):
        return self.clip.pixel_features(image, uv)


def test_teachers_without_a_dense_map_skip_denoising_with_a_note(tmp_path, teacher, sample, text_emb,
                                                                 threshold, caplog):
    t = PixelsOnly(teacher)
    plain = _cache(tmp_path, t, None, "plain")
    plain.build([sample], t, text_emb, progress=False)
    den = _cache(tmp_path, t, threshold, "den")
    with caplog.at_level(logging.INFO, logger="clip2scene.training"):
        den.build([sample], t, text_emb, progress=False)
    notes = [r for r in caplog.records if "prompt denoising skipped" in r.getMessage()]
    assert len(notes) == 1 and "pixels-only" in notes[0].getMessage()
    for p, d in zip(_entries(plain, sample), _entries(den, sample)):
        assert "keep" not in d and np.array_equal(d["labels"], p["labels"])
