"""The label-space registry, the one class-name matcher and the one ignore label."""
from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest

from clip2scene_core.clip.vocabulary import Vocabulary
from clip2scene_core.datasets import CLASS_NAMES, IGNORE_INDEX as DATASET_IGNORE
from clip2scene_core.errors import ConfigError
from clip2scene_core.label_spaces import (IGNORE_INDEX, LABEL_SPACES, NUSCENES16, SCANNET20,
                                          SEMANTICKITTI19, UNLABELED, LabelClass, LabelSpace,
                                          class_key, class_map, label_space, match_classes,
                                          remap_labels)
from clip2scene_core.palette import palette_for

# Vocabulary.content_hash of each preset when the prompts lived in clip/presets.py: the text
# embeddings (and their cache keys) must stay bit-identical.
PRESET_HASHES = {
    "nuscenes16": "9c6b9664b0f2d51a112a7b6ea03d8cdc49fb05759d9b00f70f7e124e7bd455c4",
    "semantickitti19": "46ca2afb303efd90e3fbb47082a31f94133fbf2b45d26cf6c6681da2976841ad",
    "scannet20": "7918c589993a8f55f4e45ae5ba4a17c9d6b101c2e1468c11cd703a48aa8a6b5b",
    "rellis3d": "2ba64bba842a749da26035bbcd9e7ffe7b6ec9215848c991d4db596c77c9dfc6",
}


@pytest.mark.parametrize("name", sorted(PRESET_HASHES))
def test_each_label_space_is_one_record_read_by_datasets_presets_and_palette(name: str) -> None:
    space = LABEL_SPACES[name]
    assert CLASS_NAMES[name] == space.class_names
    vocab = Vocabulary.preset(name)
    assert vocab.name == name and vocab.class_names == list(space.vocab_names)
    assert vocab.content_hash() == PRESET_HASHES[name]
    assert match_classes(space.class_names, vocab.class_names).tolist() == list(range(len(space)))
    colors = palette_for(space.class_names)
    for i, c in enumerate(space.classes):
        if c.color is not None:
            assert tuple(colors[i]) == c.color
    np.testing.assert_array_equal(palette_for(space.vocab_names), colors)


def test_raw_ids_map_through_the_record() -> None:
    kitti = SEMANTICKITTI19
    raw = np.array([10, 252, 0, 1, 99, 259, (7 << 16) | 40], dtype=np.uint32)  # upper 16 bits: instance
    want = [0, 0, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, kitti.class_names.index("other-vehicle"),
            kitti.class_names.index("road")]
    assert kitti.to_index(raw).tolist() == want
    assert NUSCENES16.to_index(np.array([15, 16, 0, 31, 256 + 17])).tolist() == [2, 2, -1, -1, 3]
    assert NUSCENES16.raw_names[17] == "vehicle.car" and len(NUSCENES16.raw_names) == 32
    assert SCANNET20.to_index(np.array([39, 13, 0])).tolist() == [19, -1, -1]
    assert not NUSCENES16.lut.flags.writeable
    assert IGNORE_INDEX == DATASET_IGNORE == -1


def test_a_new_label_space_is_one_record() -> None:
    space = LabelSpace("orchard3", raw_bits=8, classes=(
        LabelClass("ground", "ground", ("ground", "soil"), raw=(1, 2)),
        LabelClass("fruit_tree", "fruit tree", ("apple tree", "pear tree"), (0, 160, 0), raw=(5,)),
        LabelClass("person", "person", ("person",), raw=(9,)),
    ))
    assert space.to_index(np.array([2, 5, 9, 3, 256 + 1])).tolist() == [0, 1, 2, -1, 0]
    assert space.prompts()["fruit tree"] == ["apple tree", "pear tree"]
    assert space.colors() == {"fruit_tree": (0, 160, 0)}
    with pytest.raises(ConfigError, match="raw id 1"):
        LabelSpace("x", classes=(LabelClass("a", "a", ("a",), raw=(1,)), LabelClass("b", "b", ("b",), raw=(1,))))
    with pytest.raises(ConfigError, match="does not match"):
        LabelSpace("x", classes=(LabelClass("a_b", "a c", ("a",)),))
    with pytest.raises(ConfigError, match="same name"):
        LabelSpace("x", classes=(LabelClass("a-b", "a b", ("a",)), LabelClass("a_b", "a b", ("a",))))
    with pytest.raises(ConfigError, match="bits"):
        LabelSpace("x", raw_bits=8, classes=(LabelClass("a", "a", ("a",), raw=(300,)),))


def test_label_space_lookup_ignores_spelling_and_names_the_known_ones() -> None:
    assert label_space("nuScenes-16") is NUSCENES16 and label_space("semantic_kitti_19") is SEMANTICKITTI19
    with pytest.raises(ConfigError, match="cityscapes.*known.*nuscenes16"):
        label_space("cityscapes")
    with pytest.raises(ConfigError, match="known"):
        Vocabulary.preset("cityscapes")


@pytest.mark.parametrize("a,b", [
    ("other-vehicle", "Other Vehicle"), ("other_vehicle", "othervehicle"),
    ("otherfurniture", "other furniture"), ("construction_vehicle", "Construction-Vehicle"),
    ("traffic.cone", "traffic_cone"), ("flat.driveable_surface", "driveable surface"),
    ("drivable_surface", "driveable_surface"), ("static.manmade", "manmade"),
    ("static.vegetation", "vegetation"),
])
def test_one_key_for_every_spelling_and_alias(a: str, b: str) -> None:
    assert class_key(a) == class_key(b)


def test_different_classes_keep_different_keys() -> None:
    assert class_key("person") != class_key("pedestrian")
    assert class_key("other ground") != class_key("other flat")
    assert class_key("+") != class_key("-")          # no letters: the name itself


def test_an_unmatched_class_is_an_error_that_names_it() -> None:
    with pytest.raises(ConfigError, match="unicorn"):
        match_classes(["car", "unicorn"], ["car", "road"])
    with pytest.raises(ConfigError, match="unicorn"):
        class_map(["car", "unicorn"], ["car", "road"])
    got = match_classes(["Road", "unicorn"], ["car", "road"], allow_missing=True)
    assert got.tolist() == [1, IGNORE_INDEX]
    with pytest.raises(ConfigError, match="several"):     # never a silent pick of one spelling
        match_classes(["other vehicle"], ["other-vehicle", "other_vehicle"])


def test_class_map_and_remap_keep_ignored_points_ignored() -> None:
    assert class_map(["a", "b"], ["a", "b"]) is None and class_map(None, ["a"]) is None
    m = class_map(["road", "other-vehicle", "car"], ["car", "other vehicle", "Road"])
    assert m.tolist() == [2, 1, 0]
    out = remap_labels(np.array([0, -1, 2, 1]), m)
    assert out.tolist() == [2, -1, 0, 1] and out.dtype == np.int64
    assert remap_labels(np.array([3, -1]), None).tolist() == [3, -1]


def test_one_ignore_label_on_the_wire() -> None:
    from clip2scene_ros import label_info, pointcloud2

    assert pointcloud2.UNLABELED is UNLABELED == 65535
    assert label_info.parse_label_classes(label_info.label_classes_json(["a"]))["unlabeled"] == UNLABELED


def test_replay_evaluator_matches_spellings_and_names_unmatched_predictions() -> None:
    """ScanNet's ``otherfurniture`` once failed to match the preset's ``other furniture`` in
    the replay tool's own normaliser: its points were counted as misses."""
    from clip2scene_ros.evaluation import Evaluator

    ev = Evaluator(list(SCANNET20.class_names))
    pred_names = [*SCANNET20.vocab_names, "unicorn"]
    gt = np.array([19, 19, 0, -1])
    ev.add_gt(1, gt)
    ev.add_pred(1, np.array([19, 19, 20, 0]), pred_names)
    res = ev.result()
    assert res["iou"]["otherfurniture"] == 1.0
    assert res["unmatched_pred_classes"] == ["unicorn"]
    assert res["iou"]["wall"] == 0.0                     # its one point was predicted "unicorn"


def test_vocabulary_does_not_import_the_text_bank() -> None:
    """vocabulary.py ↔ text_bank.py was an import cycle (through a back-compat __getattr__)."""
    import clip2scene_core.clip.vocabulary as vocabulary

    tree = ast.parse(Path(vocabulary.__file__).read_text())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names}
    imported |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert not any("text_bank" in m for m in imported)
    assert not hasattr(vocabulary, "__getattr__")
