"""2D teachers on the real RELLIS-3D frame (LiDAR + camera + 2D label image + 3D labels):
the interface, the label-image and stored-prediction teachers, cache identity by content."""
from __future__ import annotations

import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from clip2scene_core.datasets import RELLIS3D_CLASSES, Rellis3DReader
from clip2scene_core.geometry import project_points
from clip2scene_core.teachers import (LabelImageTeacher, LegacyTeacher, StoredPredictionTeacher, Teacher2D,
                                      TeacherError, TeacherView, as_teacher, rellis3d_label_teacher)

RELLIS = "rellis3d/utils_example"
LABEL_PNG = "frame000104-1581624663_149.png"


@pytest.fixture(scope="module")
def sample(data_dir):
    return Rellis3DReader(data_dir / RELLIS, drop_no_return=True)[0]


@pytest.fixture()
def rellis_copy(data_dir, tmp_path) -> Path:
    """A writable copy of the frame's folder (the test may edit the label image)."""
    root = tmp_path / "rellis"
    shutil.copytree(data_dir / RELLIS, root)
    return root


def _visible(sample):
    cam = sample.cameras[0]
    proj = project_points(sample.scan.xyz, cam.calibration, min_depth=1.0)
    idx = np.flatnonzero(proj.valid)
    H, W = cam.image.shape[:2]
    return cam, idx, np.clip(proj.uv[idx], 0, [W - 1, H - 1])


def _cache(tmp_path, teacher):
    from training.engine.teacher_cache import open_cache
    return open_cache(teacher, tmp_path / "cache", 1.0)


def _vocab():
    from clip2scene_core.clip import Vocabulary
    return Vocabulary.from_names(list(RELLIS3D_CLASSES))


# ---------------------------------------------------------------- interface
def test_shipped_teachers_implement_the_interface(data_dir, tmp_path):
    from clip2scene_core.clip import ClipTeacher

    vit = {"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 1, "width": 16, "patch_size": 16,
                                            "head_width": 16},
           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 16, "heads": 1, "layers": 1}}
    np.save(tmp_path / "000104.npy", np.zeros((19, 4, 4), np.float32))
    teachers = [ClipTeacher.from_config(vit, device="cpu", seed=0), rellis3d_label_teacher(data_dir / RELLIS),
                StoredPredictionTeacher(RELLIS3D_CLASSES, "{token}.npy", tmp_path)]
    for t in teachers:
        assert isinstance(t, Teacher2D), type(t).__name__
        assert as_teacher(t) is t                                   # used as is, no adapter
        assert isinstance(t.identity(), dict)


def test_old_style_teacher_is_adapted_or_refused(sample):
    class OnlyPixels:
        def pixel_features(self, image, uv):
            return torch.ones(len(uv), 3)

    with pytest.raises(TeacherError, match="text_embeddings"):
        as_teacher(OnlyPixels())

    class Old(OnlyPixels):
        def text_embeddings(self, vocab, templates=None, cache_dir=None):
            return torch.eye(3)

    wrapped = as_teacher(Old())
    assert isinstance(wrapped, LegacyTeacher) and wrapped.source_digest(TeacherView("t", "c")) == ""
    cam, idx, uv = _visible(sample)
    assert wrapped.pixel_features(cam.image, uv[:5], TeacherView("t", "c")).shape == (5, 3)


# ---------------------------------------------------------------- label-image teacher
def test_label_teacher_gives_the_label_image_classes(data_dir, sample):
    teacher = rellis3d_label_teacher(data_dir / RELLIS)
    cam, idx, uv = _visible(sample)
    view = TeacherView(sample.token, cam.name, sample.scene)
    feats = teacher.pixel_features(cam.image, uv, view)
    raw = cv2.imread(str(data_dir / RELLIS / LABEL_PNG), cv2.IMREAD_UNCHANGED)
    px = np.floor(uv + 0.5).astype(int)
    from clip2scene_core.datasets import rellis3d_to_index
    want = rellis3d_to_index(raw[px[:, 1], px[:, 0]])
    emb = teacher.text_embeddings(_vocab())
    assert emb.shape == (19, 19)
    known = feats.abs().sum(1) > 0
    assert np.array_equal(known.numpy(), want >= 0)                 # void pixels: no opinion
    assert np.array_equal((feats[known] @ emb.t()).argmax(1).numpy(), want[want >= 0])
    # the teacher's agreement with the 3D labels (README of test/data: 77.3 %)
    gt = sample.labels[idx]
    assert np.mean(want[gt >= 0] == gt[gt >= 0]) == pytest.approx(0.773, abs=0.002)
    with pytest.raises(Exception, match="no class"):
        teacher.text_embeddings(["grass", "spaceship"])
    with pytest.raises(TeacherError, match="not found"):
        teacher.pixel_features(cam.image, uv, TeacherView("999999", cam.name))


def test_label_teacher_resolution_and_embedding_size(data_dir, sample, tmp_path):
    """A class image at half resolution (a segmenter's output size) and D > K class vectors."""
    raw = cv2.imread(str(data_dir / RELLIS / LABEL_PNG), cv2.IMREAD_UNCHANGED)
    half = cv2.resize(raw, (raw.shape[1] // 2, raw.shape[0] // 2), interpolation=cv2.INTER_NEAREST)
    cv2.imwrite(str(tmp_path / "000104_pylon.png"), half)
    full = rellis3d_label_teacher(data_dir / RELLIS, embed_dim=32)
    small = LabelImageTeacher(RELLIS3D_CLASSES, "{token}_pylon.png", tmp_path, value_to_class=full.lut,
                              embed_dim=32)
    emb = full.text_embeddings(_vocab())
    assert torch.allclose(emb @ emb.t(), torch.eye(19), atol=1e-5)  # orthonormal class vectors
    cam, idx, uv = _visible(sample)
    view = TeacherView(sample.token, cam.name)
    a = full.pixel_classes(cam.image, uv, view)
    b = small.pixel_classes(cam.image, uv, view)
    assert np.mean(a == b) > 0.97                                    # only class borders move


# ---------------------------------------------------------------- stored-prediction teacher
def test_stored_logits_and_features(data_dir, sample, tmp_path):
    """Logits written from the label image (as a 2D network would save them) give the same
    pseudo-labels; stored features need their class embeddings; bad files are clear errors."""
    labels = rellis3d_label_teacher(data_dir / RELLIS)
    raw = cv2.imread(str(data_dir / RELLIS / LABEL_PNG), cv2.IMREAD_UNCHANGED)
    cls = labels.lut[np.clip(raw, 0, len(labels.lut) - 1)]
    small = cls[::4, ::4]                                          # a network's output stride
    logits = np.where(np.arange(19)[:, None, None] == small[None], 6.0, 0.0).astype(np.float32)
    logits[:, small < 0] = np.nan                                   # void: no opinion
    (tmp_path / "pred").mkdir()
    np.save(tmp_path / "pred" / f"{sample.token}_{sample.cameras[0].name}.npy", logits)
    stored = StoredPredictionTeacher(RELLIS3D_CLASSES, "{token}_{camera}.npy", tmp_path / "pred",
                                     content="logits", layout="chw")
    cam, idx, uv = _visible(sample)
    view = TeacherView(sample.token, cam.name)
    f = stored.pixel_features(cam.image, uv, view)
    emb = stored.text_embeddings(_vocab())
    ok = torch.isfinite(f).all(1).numpy()
    want = labels.pixel_classes(cam.image, uv, view)
    assert ok.mean() > 0.9
    assert np.mean((f[ok] @ emb.t()).argmax(1).numpy() == want[ok]) > 0.95

    feats = np.transpose(logits, (1, 2, 0)) @ np.eye(19, 8, dtype=np.float32)    # HWC features, D = 8
    np.save(tmp_path / "pred" / "feat.npy", feats)
    with pytest.raises(Exception, match="class_embeddings"):
        StoredPredictionTeacher(RELLIS3D_CLASSES, "feat.npy", tmp_path / "pred", content="features")
    emb8 = np.eye(19, 8, dtype=np.float32) + 1e-3
    st = StoredPredictionTeacher(RELLIS3D_CLASSES, "feat.npy", tmp_path / "pred", content="features",
                                 layout="hwc", class_embeddings=emb8)
    assert st.pixel_features(cam.image, uv, view).shape == (len(uv), 8)
    bad = StoredPredictionTeacher(RELLIS3D_CLASSES, "feat.npy", tmp_path / "pred", content="logits", layout="hwc")
    with pytest.raises(TeacherError, match="8 channels, expected 19"):
        bad.pixel_features(cam.image, uv, view)


# ---------------------------------------------------------------- cache identity by content
def test_two_unnamed_teachers_never_share_entries(tmp_path, sample):
    """The issue's case: teachers with no cache_id and no .model, same class and name,
    different features. The second must be computed, and its own features read back."""
    class Const:
        model_name = "my-teacher"

        def __init__(self, k):
            self.k = k

        def text_embeddings(self, vocab, templates=None, cache_dir=None):
            return torch.eye(19)

        def pixel_features(self, image, uv):
            return torch.nn.functional.one_hot(torch.full((len(uv),), self.k), 19).float()

    emb = torch.eye(19)
    a, b = as_teacher(Const(1)), as_teacher(Const(2))
    ca, cb = _cache(tmp_path, a), _cache(tmp_path, b)
    assert ca.teacher_id != cb.teacher_id
    assert ca.build([sample], a, emb, progress=False)["computed"] == 1
    assert cb.build([sample], b, emb, progress=False) == {"computed": 1, "cached": 0, "samples": 1}
    assert set(ca.pseudo_labels(sample, emb)[ca.pseudo_labels(sample, emb) >= 0]) == {1}
    assert set(cb.pseudo_labels(sample, emb)[cb.pseudo_labels(sample, emb) >= 0]) == {2}
    # same content → same id (a rerun finds its entries)
    assert _cache(tmp_path, as_teacher(Const(2))).build([sample], b, emb, progress=False)["cached"] == 1


def test_label_teacher_identity_covers_parameters(data_dir):
    from training.engine.teacher_cache import teacher_identity

    base = teacher_identity(rellis3d_label_teacher(data_dir / RELLIS))[0]
    assert teacher_identity(rellis3d_label_teacher(data_dir / RELLIS))[0] == base
    assert teacher_identity(rellis3d_label_teacher(data_dir / RELLIS, embed_dim=24))[0] != base
    other_map = LabelImageTeacher(RELLIS3D_CLASSES, "frame{token}-*.png", data_dir / RELLIS)   # raw ids
    assert teacher_identity(other_map)[0] != base


def test_editing_the_label_image_invalidates_its_entries(rellis_copy):
    reader = Rellis3DReader(rellis_copy, drop_no_return=True)
    s = reader[0]
    teacher = rellis3d_label_teacher(rellis_copy)
    emb = teacher.text_embeddings(_vocab())
    cache = _cache(rellis_copy.parent, teacher)
    assert cache.build([s], teacher, emb, progress=False)["computed"] == 1
    before = cache.pseudo_labels(s, emb)
    png = rellis_copy / LABEL_PNG
    original = png.read_bytes()
    img = cv2.imread(str(png), cv2.IMREAD_UNCHANGED)
    img[img == 3] = 4                                             # relabel grass as tree
    cv2.imwrite(str(png), img)
    assert cache.build([s], teacher, emb, progress=False) == {"computed": 1, "cached": 0, "samples": 1}
    after = cache.pseudo_labels(s, emb)
    grass, tree = RELLIS3D_CLASSES.index("grass"), RELLIS3D_CLASSES.index("tree")
    assert (before == grass).sum() > 1000 and (after == grass).sum() == 0
    assert (after == tree).sum() == (before == tree).sum() + (before == grass).sum()
    png.write_bytes(original)                                     # back to the old content: old entry
    assert cache.build([s], teacher, emb, progress=False)["cached"] == 1
    assert np.array_equal(cache.pseudo_labels(s, emb), before)
    # a cache that needs the sample says so instead of guessing
    with pytest.raises(Exception, match="load_sample"):
        cache.load(s.scan, s.cameras, emb)
