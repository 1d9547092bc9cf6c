"""The one class-name matcher: which class of one list a name of another list means.

Names match when their ``class_key`` is equal: case, spaces, ``_``, ``-`` and ``.`` are
ignored ("construction_vehicle" = "construction vehicle", "otherfurniture" = "other
furniture") and the aliases of the label spaces are resolved ("static.manmade" = "manmade").
Evaluation, fine-tuning, the replay tool, the palette and the vocabulary presets all match
names here. An unmatched name is a ConfigError that names it, never a silent ``IGNORE_INDEX``.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..errors import ConfigError
from .base import IGNORE_INDEX, spelling_key
from .registry import ALIASES


def class_key(name: str) -> str:
    """Spelling-free key of a class name, aliases resolved (see the module doc)."""
    key = spelling_key(name)
    return ALIASES.get(key, key)


def match_classes(names: Sequence[str], targets: Sequence[str], *, allow_missing: bool = False,
                  what: str = "class", among: str = "the classes") -> np.ndarray:
    """(len(names),) int64: the index in ``targets`` of each name (``class_key`` equal).

    A name matching no target is a ConfigError naming it (``what`` / ``among`` word the
    message), or ``IGNORE_INDEX`` with ``allow_missing`` (the caller reports those names).
    A name matching two targets is always a ConfigError.
    """
    where: dict[str, int] = {}
    twice: set[str] = set()
    for i, t in enumerate(targets):
        k = class_key(t)
        if k in where:
            twice.add(k)
        where.setdefault(k, i)
    out = np.full(len(names), IGNORE_INDEX, dtype=np.int64)
    missing: list[str] = []
    for i, n in enumerate(names):
        k = class_key(n)
        if k in twice:
            same = [t for t in targets if class_key(t) == k]
            raise ConfigError(f"{what} {n!r} matches several of {among}: {same}")
        if k in where:
            out[i] = where[k]
        else:
            missing.append(n)
    if missing and not allow_missing:
        raise ConfigError(f"{what}(es) {missing} not found among {among} {list(targets)}")
    return out


def class_map(dataset_names: Sequence[str] | None, vocab_names: Sequence[str]) -> np.ndarray | None:
    """Dataset label index → vocabulary index; None when both lists are the same.

    Every dataset class must be in the vocabulary: an unmatched class is a ConfigError naming
    it, never a silent ``IGNORE_INDEX`` that drops its points from evaluation and fine-tuning.
    """
    if dataset_names is None or list(dataset_names) == list(vocab_names):
        return None
    m = match_classes(dataset_names, vocab_names, allow_missing=True)
    missing = [n for n, i in zip(dataset_names, m) if i < 0]
    if missing:
        raise ConfigError(f"dataset class(es) {missing} are not in the vocabulary "
                          f"{list(vocab_names)}: every labelled class needs a vocabulary class")
    return m


def remap_labels(labels: np.ndarray, mapping: np.ndarray | None) -> np.ndarray:
    """int64 labels through ``mapping`` (a ``class_map``); ``IGNORE_INDEX`` stays ignored."""
    labels = np.asarray(labels, dtype=np.int64)
    if mapping is None:
        return labels
    return np.where(labels >= 0, mapping[np.clip(labels, 0, None)], IGNORE_INDEX)
