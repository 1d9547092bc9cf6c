"""``Vocabulary``: the classes a segmenter predicts and the words CLIP reads for each.

Open-vocabulary means the class list is data, not code: presets for the benchmarks, a list
of names from the user, or a YAML file. ``synonyms[c]`` lists the names prompted for class
``c`` and *replaces* the class name (so "manmade" can be described as building, wall, pole…);
a class without an entry is prompted with its own name.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import from_dict, load_yaml
from ..errors import ConfigError
from ..label_spaces import LABEL_SPACES, label_space


@dataclass
class Vocabulary:
    """Class names (index = label id) and, per class, the names used in prompts."""

    name: str
    class_names: list[str]
    synonyms: dict[str, list[str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise ConfigError(f"vocabulary name must be a non-empty string, got {self.name!r}")
        if isinstance(self.class_names, str) or not isinstance(self.class_names, Sequence):
            raise ConfigError(f"vocabulary '{self.name}': class_names must be a list of strings")
        names = [self._clean(n, "class name") for n in self.class_names]
        if not names:
            raise ConfigError(f"vocabulary '{self.name}': class_names is empty")
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ConfigError(f"vocabulary '{self.name}': duplicate class names {dupes}")
        if not isinstance(self.synonyms, dict):
            raise ConfigError(f"vocabulary '{self.name}': synonyms must be a mapping class -> names")
        syn: dict[str, list[str]] = {}
        for cls, words in self.synonyms.items():
            if cls not in names:
                raise ConfigError(
                    f"vocabulary '{self.name}': synonyms given for unknown class {cls!r}; "
                    f"classes: {names}")
            if isinstance(words, str) or not isinstance(words, Sequence) or len(words) == 0:
                raise ConfigError(f"vocabulary '{self.name}': synonyms of {cls!r} must be a non-empty list")
            cleaned: list[str] = []
            for w in words:
                w = self._clean(w, f"synonym of {cls!r}")
                if w not in cleaned:
                    cleaned.append(w)
            syn[cls] = cleaned
        self.class_names = names
        self.synonyms = syn

    def _clean(self, value: Any, what: str) -> str:
        if not isinstance(value, str) or not value.strip():
            raise ConfigError(f"vocabulary '{self.name}': {what} must be a non-empty string, got {value!r}")
        return " ".join(value.split())

    def __len__(self) -> int:
        return len(self.class_names)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def prompt_names(self, class_name: str) -> list[str]:
        """Names whose prompts are averaged into the embedding of ``class_name``."""
        if class_name not in self.class_names:
            raise ConfigError(f"vocabulary '{self.name}' has no class {class_name!r}")
        return list(self.synonyms.get(class_name, [class_name]))

    def with_prompts(self, prompts: str) -> "Vocabulary":
        """This vocabulary prompted with its ``"synonyms"`` (itself), or ``"bare"``: every class
        by its own name only, as the released CLIP2Scene code prompts (one name per class; the
        templates still apply). Same classes and order, so labels keep their meaning."""
        if prompts == "synonyms":
            return self
        if prompts == "bare":
            return Vocabulary(self.name, list(self.class_names), {})
        raise ConfigError(f"vocabulary prompts must be 'synonyms' or 'bare', got {prompts!r}")

    def index(self, class_name: str) -> int:
        try:
            return self.class_names.index(class_name)
        except ValueError:
            raise ConfigError(f"vocabulary '{self.name}' has no class {class_name!r}") from None

    # --- construction -------------------------------------------------------------------
    @classmethod
    def preset(cls, name: str) -> "Vocabulary":
        """A benchmark vocabulary: "nuscenes16" | "semantickitti19" | "scannet20" | "rellis3d"
        (spelling ignored): the label space's classes, by their readable names, and prompts."""
        try:
            space = label_space(name)
        except ConfigError:
            raise ConfigError(f"unknown vocabulary preset {name!r}; known: {sorted(LABEL_SPACES)}") from None
        return cls(space.name, list(space.vocab_names), space.prompts())

    @classmethod
    def from_names(cls, names: Sequence[str], name: str = "custom") -> "Vocabulary":
        """A vocabulary whose classes are prompted by their own names."""
        if isinstance(names, str):
            raise ConfigError("Vocabulary.from_names expects a list of names, not one string")
        return cls(name, list(names), {})

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Vocabulary":
        """Inverse of ``to_dict``; unknown keys are a ConfigError."""
        spec = from_dict(_VocabularySpec, data, "vocabulary")
        return cls(spec.name, list(spec.class_names), {k: list(v) for k, v in spec.synonyms.items()})

    @classmethod
    def from_yaml(cls, path: str | Path) -> "Vocabulary":
        """Read ``name``, ``class_names`` and optional ``synonyms`` from a YAML file."""
        data = load_yaml(path)
        if "name" not in data:
            data = {**data, "name": Path(path).stem}
        try:
            return cls.from_dict(data)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from exc

    def to_dict(self) -> dict[str, Any]:
        """Plain data (checkpoint / YAML / JSON safe)."""
        return {"name": self.name, "class_names": list(self.class_names),
                "synonyms": {k: list(v) for k, v in self.synonyms.items()}}

    def content_hash(self) -> str:
        """Hash of everything that changes the text embeddings (not the display name)."""
        payload = [[c, self.prompt_names(c)] for c in self.class_names]
        return hashlib.sha256(json.dumps(payload, ensure_ascii=False).encode()).hexdigest()

    def same_classes(self, other: "Vocabulary") -> bool:
        """True when ``other`` gives the same embeddings (same classes, order and prompt names)."""
        return self.content_hash() == other.content_hash()


@dataclass
class _VocabularySpec:
    """Strict schema of a vocabulary file (unknown keys rejected by ``config.from_dict``)."""

    name: str
    class_names: list[str]
    synonyms: dict[str, list[str]] = field(default_factory=dict)

