"""The label spaces this package knows, by name: adding a labelled dataset's classes is one
module next to this one and one entry in ``_SPACES``."""
from __future__ import annotations

from ..errors import ConfigError
from .base import LabelSpace, spelling_key
from .nuscenes16 import NUSCENES16
from .rellis3d import RELLIS3D
from .scannet20 import SCANNET20
from .semantickitti19 import SEMANTICKITTI19

_SPACES: tuple[LabelSpace, ...] = (NUSCENES16, SEMANTICKITTI19, SCANNET20, RELLIS3D)

#: name → label space, in the order above (the palette prefers earlier spaces on a tie)
LABEL_SPACES: dict[str, LabelSpace] = {s.name: s for s in _SPACES}


def label_space(name: str) -> LabelSpace:
    """The label space called ``name``, spelling ignored ("nuScenes-16" = "nuscenes16");
    ConfigError listing the known names otherwise."""
    key = spelling_key(name) if isinstance(name, str) else None
    for space in _SPACES:
        if spelling_key(space.name) == key:
            return space
    raise ConfigError(f"unknown label space {name!r}; known: {sorted(LABEL_SPACES)}")


def _alias_table() -> dict[str, str]:
    """Spelling key of every alias → spelling key of its class, checked against all spaces."""
    classes = {spelling_key(c.name) for s in _SPACES for c in s.classes}
    table: dict[str, str] = {}
    for space in _SPACES:
        for c in space.classes:
            for alias in c.aliases:
                key, target = spelling_key(alias), spelling_key(c.name)
                if key in classes or table.get(key, target) != target:
                    raise ConfigError(f"label space '{space.name}': alias {alias!r} of {c.name!r} "
                                      f"is already the name or alias of another class")
                table[key] = target
    return table


#: spelling key of an alias → spelling key of the class it names ("flatdriveablesurface" → ...)
ALIASES: dict[str, str] = _alias_table()
