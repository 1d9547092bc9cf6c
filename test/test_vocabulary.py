"""Vocabularies, prompt templates and the text-embedding bank (cache + standalone files)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from clip2scene_core.clip import (ClipTeacher, TextEmbeddingBank, Vocabulary, load_text_embeddings,
                                  resolve_templates, save_text_embeddings)
from clip2scene_core.clip.prompts import IMAGENET_TEMPLATES, TEMPLATE_SETS
from clip2scene_core.clip.text_bank import default_cache_dir, embed_vocabulary
from clip2scene_core.errors import CheckpointError, ConfigError

TEXT_CFG = {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}
CFG = {"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16,
                                       "head_width": 16}, "text_cfg": TEXT_CFG}
TWO = ["a photo of a {}.", "there is a {} in the scene."]


@pytest.fixture(scope="module")
def teacher() -> ClipTeacher:
    return ClipTeacher.from_config(CFG, seed=0)


class CountingEncoder:
    """Wraps a real text encoder and counts the texts it was asked to encode."""

    def __init__(self, teacher: ClipTeacher) -> None:
        self.teacher = teacher
        self.calls = 0
        self.texts = 0

    def __call__(self, texts: list[str]) -> torch.Tensor:
        self.calls += 1
        self.texts += len(texts)
        return self.teacher.encode_text(texts)


# --- presets and construction -------------------------------------------------------------
@pytest.mark.parametrize("name,count,members", [
    ("nuscenes16", 16, {"driveable surface", "construction vehicle", "traffic cone", "manmade"}),
    ("semantickitti19", 19, {"other vehicle", "bicyclist", "traffic sign", "trunk"}),
    ("scannet20", 20, {"shower curtain", "bookshelf", "other furniture", "wall"}),
])
def test_presets_have_benchmark_classes(name: str, count: int, members: set[str]) -> None:
    v = Vocabulary.preset(name)
    assert len(v) == count and len(set(v.class_names)) == count
    assert members <= set(v.class_names)
    for c in v.class_names:
        names = v.prompt_names(c)
        assert names and len(set(names)) == len(names)


@pytest.mark.parametrize("name", ["nuscenes16", "semantickitti19", "scannet20", "rellis3d"])
def test_presets_follow_dataset_label_order(name: str) -> None:
    """Label i of a dataset reader is class i of the preset (names differ only in spelling)."""
    from clip2scene_core.datasets.classes import CLASS_NAMES

    def canon(s: str) -> str:
        return s.replace("_", "").replace("-", "").replace(" ", "").lower()

    assert [canon(c) for c in Vocabulary.preset(name).class_names] == [canon(c) for c in CLASS_NAMES[name]]


def test_preset_order_and_synonyms() -> None:
    nus = Vocabulary.preset("nuscenes16")
    assert nus.class_names[0] == "barrier" and nus.class_names[-1] == "vegetation"
    assert nus.index("driveable surface") == 10
    assert {"road", "street"} <= set(nus.prompt_names("driveable surface"))
    assert "building" in nus.prompt_names("manmade")
    kitti = Vocabulary.preset("semantickitti19")
    assert kitti.class_names[:4] == ["car", "bicycle", "motorcycle", "truck"]
    assert kitti.class_names[-1] == "traffic sign"
    assert Vocabulary.preset("nuScenes-16").class_names == nus.class_names
    with pytest.raises(ConfigError, match="known"):
        Vocabulary.preset("cityscapes")


def test_from_names_and_validation() -> None:
    v = Vocabulary.from_names(["car", "  traffic   light ", "tree"])
    assert v.class_names == ["car", "traffic light", "tree"] and v.name == "custom"
    assert v.prompt_names("traffic light") == ["traffic light"]
    with pytest.raises(ConfigError, match="duplicate"):
        Vocabulary.from_names(["car", "tree", "car"])
    with pytest.raises(ConfigError, match="empty"):
        Vocabulary.from_names([])
    with pytest.raises(ConfigError):
        Vocabulary.from_names("car")
    with pytest.raises(ConfigError, match="unknown class"):
        Vocabulary("v", ["car"], {"road": ["street"]})
    with pytest.raises(ConfigError):
        Vocabulary("v", ["car"], {"car": []})


def test_dict_roundtrip_and_yaml(tmp_path: Path) -> None:
    v = Vocabulary.preset("scannet20")
    again = Vocabulary.from_dict(v.to_dict())
    assert again == v and again.content_hash() == v.content_hash()

    good = tmp_path / "farm.yaml"
    good.write_text("name: farm\nclass_names: [tractor, field, barn]\n"
                    "synonyms:\n  field: [field, meadow, crop field]\n")
    farm = Vocabulary.from_yaml(good)
    assert farm.class_names == ["tractor", "field", "barn"]
    assert farm.prompt_names("field") == ["field", "meadow", "crop field"]
    assert farm.prompt_names("barn") == ["barn"]

    typo = tmp_path / "typo.yaml"
    typo.write_text("name: farm\nclass_names: [tractor]\nsynonym:\n  tractor: [tractor]\n")
    with pytest.raises(ConfigError, match="synonym"):
        Vocabulary.from_yaml(typo)
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("name: farm\nclass_names: [tractor, 3]\n")
    with pytest.raises(ConfigError, match="class_names"):
        Vocabulary.from_yaml(wrong)
    with pytest.raises(ConfigError, match="not found"):
        Vocabulary.from_yaml(tmp_path / "missing.yaml")


# --- templates ----------------------------------------------------------------------------
def test_imagenet_templates_are_clips_80() -> None:
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

    assert len(IMAGENET_TEMPLATES) == 80 == len(set(IMAGENET_TEMPLATES))
    assert [t.format("dog") for t in IMAGENET_TEMPLATES] == [f("dog") for f in OPENAI_IMAGENET_TEMPLATES]


def test_resolve_templates() -> None:
    assert len(resolve_templates("maskclip")) == 85
    assert resolve_templates("a {} on the road.") == ("a {} on the road.",)
    combo = resolve_templates(["single", "driving", "a photo of a {}."])
    assert combo[0] == "a photo of a {}." and len(combo) == len(set(combo))
    assert set(TEMPLATE_SETS["driving"]) <= set(combo)
    with pytest.raises(ConfigError, match="known sets"):
        resolve_templates("no_such_set")
    with pytest.raises(ConfigError, match="placeholder"):
        resolve_templates(["a {} and a {}"])


# --- embeddings ---------------------------------------------------------------------------
def test_class_embedding_is_mean_over_templates_and_synonyms(teacher: ClipTeacher) -> None:
    vocab = Vocabulary("roads", ["road", "car"], {"road": ["road", "street"]})
    emb = embed_vocabulary(teacher.encode_text, vocab, TWO)
    assert emb.shape == (2, 16)
    prompts = ["a photo of a road.", "there is a road in the scene.",
               "a photo of a street.", "there is a street in the scene."]
    expected_road = F.normalize(teacher.encode_text(prompts).mean(0), dim=0)
    expected_car = F.normalize(teacher.encode_text([t.format("car") for t in TWO]).mean(0), dim=0)
    torch.testing.assert_close(emb[0], expected_road.cpu(), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(emb[1], expected_car.cpu(), atol=1e-6, rtol=1e-5)
    # the synonym really contributes: "road" alone gives another embedding
    alone = embed_vocabulary(teacher.encode_text, Vocabulary.from_names(["road"]), TWO)
    assert not torch.allclose(alone[0], emb[0], atol=1e-4)


def test_cache_hit_returns_same_tensor_without_encoding(teacher: ClipTeacher, tmp_path: Path) -> None:
    enc = CountingEncoder(teacher)
    bank = TextEmbeddingBank(enc, "tiny", teacher.weights_id, cache_dir=tmp_path)
    vocab = Vocabulary.preset("nuscenes16")
    first = bank.get(vocab, TWO)
    n_prompts = sum(len(vocab.prompt_names(c)) for c in vocab.class_names) * len(TWO)
    assert enc.texts == n_prompts and first.shape == (16, 16)
    assert bank.path_for(vocab, TWO).is_file()

    calls = enc.calls
    again = TextEmbeddingBank(enc, "tiny", teacher.weights_id, cache_dir=tmp_path).get(vocab, TWO)
    assert enc.calls == calls
    assert torch.equal(first, again)

    other_templates = bank.get(vocab, ["a photo of a {}."])
    assert enc.calls > calls and not torch.equal(other_templates, first)


def test_cache_key_depends_on_content(teacher: ClipTeacher, tmp_path: Path) -> None:
    bank = TextEmbeddingBank(teacher.encode_text, "tiny", teacher.weights_id, cache_dir=tmp_path)
    base = Vocabulary.preset("nuscenes16")
    d = base.to_dict()
    d["synonyms"]["car"] = ["car", "taxi"]
    changed = Vocabulary.from_dict(d)
    renamed = Vocabulary.from_dict({**base.to_dict(), "name": "other"})
    reordered = Vocabulary.from_dict({**base.to_dict(), "class_names": base.class_names[::-1]})
    key = bank.key(base, TWO)
    assert bank.key(changed, TWO) != key
    assert bank.key(reordered, TWO) != key
    assert bank.key(base, TWO[:1]) != key
    assert bank.key(renamed, TWO) == key            # the display name does not change embeddings
    other_weights = ClipTeacher.from_config(CFG, seed=1)
    other_bank = TextEmbeddingBank(other_weights.encode_text, "tiny", other_weights.weights_id)
    assert other_bank.key(base, TWO) != key
    assert TextEmbeddingBank(teacher.encode_text, "ViT-B-16", teacher.weights_id).key(base, TWO) != key


def test_teacher_text_embeddings_use_env_cache_dir(teacher: ClipTeacher, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLIP2SCENE_CACHE", str(tmp_path / "cache"))
    assert default_cache_dir() == tmp_path / "cache" / "text_embeddings"
    emb = teacher.text_embeddings(["car", "tree"], templates="single")
    assert emb.shape == (2, 16)
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(2))
    files = list((tmp_path / "cache" / "text_embeddings").glob("*.pt"))
    assert len(files) == 1
    loaded = load_text_embeddings(files[0], model_name="custom",
                                  vocabulary=Vocabulary.from_names(["car", "tree"]))
    assert torch.equal(loaded.embeddings, emb.cpu())


def test_standalone_embedding_file_roundtrip_and_refusals(teacher: ClipTeacher, tmp_path: Path) -> None:
    vocab = Vocabulary.preset("semantickitti19")
    emb = embed_vocabulary(teacher.encode_text, vocab, TWO)
    path = tmp_path / "kitti_text.pt"
    save_text_embeddings(path, vocab, emb, "tiny", teacher.weights_id, TWO)
    te = load_text_embeddings(path)
    assert te.vocabulary == vocab and te.model_name == "tiny" and te.templates == tuple(TWO)
    assert torch.equal(te.embeddings, emb) and te.embed_dim == 16
    load_text_embeddings(path, model_name="tiny", vocabulary=vocab, embed_dim=16)

    with pytest.raises(CheckpointError, match="ViT-B-16"):
        load_text_embeddings(path, model_name="ViT-B-16")
    with pytest.raises(CheckpointError, match="vocabulary"):
        load_text_embeddings(path, vocabulary=Vocabulary.preset("nuscenes16"))
    with pytest.raises(CheckpointError, match="dimension"):
        load_text_embeddings(path, embed_dim=512)
    with pytest.raises(CheckpointError, match="other weights"):
        load_text_embeddings(path, weights_id="0" * 32)
    with pytest.raises(CheckpointError):
        save_text_embeddings(tmp_path / "bad.pt", vocab, emb[:5], "tiny")
    broken = tmp_path / "broken.pt"
    broken.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="broken.pt"):
        load_text_embeddings(broken)
    with pytest.raises(CheckpointError, match="not found"):
        load_text_embeddings(tmp_path / "absent.pt")
    torch.save({"format": "something-else"}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="not a clip2scene-text-embeddings"):
        load_text_embeddings(tmp_path / "foreign.pt")


def test_every_dataset_class_matches_its_vocabulary_preset():
    """ScanNet's ``otherfurniture`` once mapped to -1 against the preset's ``other furniture``
    (642 of 81,369 points of the bundled scene silently left out). No class may be unmatched."""
    from clip2scene_core.datasets.classes import CLASS_NAMES
    from clip2scene_core.label_spaces import class_map

    for dataset, names in CLASS_NAMES.items():       # each label space has a preset of its name
        vocab = Vocabulary.preset(dataset).class_names
        m = class_map(names, vocab)
        assert m is None or sorted(m.tolist()) == list(range(len(vocab))), dataset
    with pytest.raises(ConfigError, match="unicorn"):
        class_map(["car", "unicorn"], ["car", "road"])
