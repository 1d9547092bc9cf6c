"""Named pre-training recipes: ``recipe: project | released | paper`` in a pretrain config.

A recipe supplies the *defaults* of the keys where this project, the released CLIP2Scene code
(github.com/runnanchen/CLIP2Scene) and the paper's printed equations disagree; every key the
user gives (in the YAML file or with ``--set``) wins over it. Each choice is an ordinary
config key of its own, so any mix can be selected by hand.

* ``released``: as the released code trains (SPVCNN with ``Linear(480, 512)`` heads on the
  point branch's multi-scale concatenation and dropout 0 outdoors, MinkUNet14A and 5 cm voxels
  on ScanNet, bare class names, cross-entropy over raw dot products for SCR, SSR on 0.1 m
  voxels of at most 8 points fusing point features only with raw dot products, averaged over
  8 slots per voxel; on ScanNet a per-pair 1 - cos(pixel, point) instead of cells;
  self-training after 11 epochs outdoors; the sweeps, aligned into the key frame, projected
  into the key-frame cameras so that their points join SCR and SSR with pixels).
* ``project`` (default): the released values, except where this project's own value
  measurably won on the oracle-teacher benchmarks (``PROJECT_WINS``; measured by
  ``benchmarks/recipe_ablation.py`` and ``benchmarks/learning_oracle.py``, README "Recipes").
  A row that could not be measured here takes the released value.
* ``paper``: the printed equations (Eq. 1 as one log term per class, Eq. 2-4 fusing pixels
  and points with cosine D, divided by the number of cells, self-training after 10 epochs);
  where the paper is silent (head input, dropout, voxel and cell size, prompts, sweeps) the
  released code's value.

Outdoor and indoor datasets differ (the released code too): ``ScanNetReader`` is indoor,
every other reader outdoor.
"""
from __future__ import annotations

from typing import Any

from clip2scene_core.errors import ConfigError

RECIPES: tuple[str, ...] = ("project", "released", "paper")
INDOOR_READERS = frozenset({"ScanNetReader"})
#: keys that exist only for SPVCNN: left out when the resolved backbone is another one
SPVCNN_KEYS = ("model.head_input", "model.dropout")

_RELEASED: dict[str, Any] = {
    "data.sweeps_to_keyframe_cameras": True,
    "model.backbone": "spvcnn", "model.head_input": "concat", "model.dropout": 0.0,
    "vocabulary.prompts": "bare",
    "loss.scr.variant": "cross_entropy", "loss.scr.form": "per_point", "loss.scr.ce_logits": "dot",
    "loss.ssr.form": "cell", "loss.ssr.features": "points", "loss.ssr.metric": "dot",
    # mean over the packed (cell, 8 slots) table: Σ (1 - sigmoid) / (8 N) plus a constant
    "loss.ssr.similarity": "sigmoid_dot", "loss.ssr.normalize": "slots", "loss.ssr.max_members": 8,
    # `if self.epoch > 10` (0-based): the 12th epoch; its unpaired-point CE is computed and
    # then overwritten (no effect), hence self_train_unpaired false
    "loss.self_training.switch_epoch": 11, "loss.self_train_unpaired": False,
}

#: where the project's own value measurably beat the released one (README "Recipes" table;
#: benchmarks/recipe_ablation.py, paired over seeds, on every seed beyond the 95 % interval)
PROJECT_WINS: dict[str, dict[str, Any]] = {
    # SPVCNN heads on the last 96-d point features instead of the 480-d concatenation:
    # local-head mIoU 42.3 vs 26.0 % (+16.3, every seed of 4) on the oracle proxy
    "common": {"model.head_input": "last"},
    "outdoor": {},
    "indoor": {},
}

_COMMON: dict[str, dict[str, Any]] = {
    "released": _RELEASED,
    "project": {**_RELEASED, **PROJECT_WINS["common"]},
    "paper": {
        **_RELEASED,
        "loss.scr.variant": "contrastive", "loss.scr.form": "per_class", "loss.scr.ce_logits": "cosine",
        "loss.ssr.features": "fused", "loss.ssr.metric": "cosine",
        "loss.ssr.normalize": "cells", "loss.ssr.max_members": None,
        "loss.self_training.switch_epoch": 10,
    },
}

_OUTDOOR_RELEASED: dict[str, Any] = {"model.voxel.voxel_size": 0.1, "loss.ssr.grid_size": 0.1}
_OUTDOOR: dict[str, dict[str, Any]] = {
    "released": _OUTDOOR_RELEASED,
    "project": {**_OUTDOOR_RELEASED, **PROJECT_WINS["outdoor"]},
    "paper": _OUTDOOR_RELEASED,
}

# scannet_loss: MinkUNet14A, 5 cm voxels, SSR = mean over pairs of 1 - cos(pixel, point),
# self-training from `self.epoch >= 10`
_INDOOR_RELEASED: dict[str, Any] = {"model.backbone": "minkunet14a", "model.voxel.voxel_size": 0.05,
                                    "loss.ssr.form": "pair", "loss.ssr.grid_size": 0.1,
                                    "loss.self_training.switch_epoch": 10}
_INDOOR: dict[str, dict[str, Any]] = {
    "released": _INDOOR_RELEASED,
    "project": {**_INDOOR_RELEASED, **PROJECT_WINS["indoor"]},
    "paper": {**_INDOOR_RELEASED, "loss.ssr.form": "cell"},      # Eq. 2-4 cells, not the pair form
}

#: every dotted key some recipe supplies
RECIPE_KEYS: frozenset[str] = frozenset(k for table in (_COMMON, _OUTDOOR, _INDOOR)
                                        for values in table.values() for k in values)


def check_recipe(name: Any) -> str:
    """``name`` if it is a recipe, else a ConfigError naming it and the known ones."""
    if not isinstance(name, str) or name not in RECIPES:
        raise ConfigError(f"recipe: {name!r} is not one of {list(RECIPES)}")
    return name


def recipe_defaults(name: str, reader: str = "NuScenesReader") -> dict[str, Any]:
    """Dotted key → value that recipe ``name`` supplies for a dataset read by ``reader``."""
    check_recipe(name)
    family = _INDOOR if reader in INDOOR_READERS else _OUTDOOR
    return {**_COMMON[name], **family[name]}


def _lookup(data: dict[str, Any], parts: list[str]) -> tuple[bool, Any]:
    node: Any = data
    for part in parts:
        if not isinstance(node, dict) or part not in node:
            return False, None
        node = node[part]
    return True, node


def apply_recipe(data: dict[str, Any]) -> dict[str, Any]:
    """Fill the keys of ``data`` (a pretrain config mapping, overrides applied) that the user
    left out with the values of its ``recipe`` (default ``project``). Returns ``data``.

    SPVCNN-only keys are filled only when the resolved backbone is ``spvcnn``; a mapping the
    user replaced by something else is left for the config loader to report.
    """
    name = check_recipe(data.get("recipe", "project"))
    reader = data.get("data", {}).get("reader", "NuScenesReader") if isinstance(data.get("data"), dict) \
        else "NuScenesReader"
    values = recipe_defaults(name, reader if isinstance(reader, str) else "NuScenesReader")
    given, backbone = _lookup(data, ["model", "backbone"])
    if not given:
        backbone = values["model.backbone"]
    for key, value in values.items():
        if key in SPVCNN_KEYS and backbone != "spvcnn":
            continue
        parts = key.split(".")
        node: Any = data
        for part in parts[:-1]:
            child = node.get(part) if isinstance(node, dict) else None
            if child is None and isinstance(node, dict) and part not in node:
                child = node[part] = {}
            node = child
        if isinstance(node, dict) and parts[-1] not in node:
            node[parts[-1]] = value
    return data
