"""The backbones ``ModelConfig.backbone`` can name: one entry each.

A new backbone is one file in this package (a module honouring ``backbone.Backbone``) plus
one entry here; nothing else dispatches on the name. Tests and plugins may add entries at run
time (``BACKBONES["toy"] = ToyBackbone``); a name saved in a checkpoint must stay registered
for that checkpoint to load.
"""
from __future__ import annotations

from functools import partial

from .backbone import BackboneFactory
from .minkunet import MINKUNET_VARIANTS, MinkUNet
from .spvcnn import SPVCNN

__all__ = ["BACKBONES"]

#: name (``model.backbone`` in configs and checkpoints) → factory
BACKBONES: dict[str, BackboneFactory] = {
    **{variant: partial(MinkUNet, variant=variant) for variant in MINKUNET_VARIANTS},
    "spvcnn": SPVCNN,
}
