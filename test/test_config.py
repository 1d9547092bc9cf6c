"""Strict YAML → dataclass loading: unknown keys and wrong types are refused."""
from dataclasses import dataclass, field
from typing import Literal, Optional

import pytest

from clip2scene_core.config import from_dict, load_config, to_dict
from clip2scene_core.errors import ConfigError


@dataclass
class Inner:
    size: float = 0.1
    names: tuple[str, ...] = ("a",)


@dataclass
class Outer:
    mode: Literal["x", "y"] = "x"
    inner: Inner = field(default_factory=Inner)
    limit: Optional[int] = None


def test_round_trip_and_nested():
    cfg = from_dict(Outer, {"mode": "y", "inner": {"size": 2, "names": ["p", "q"]}, "limit": 3})
    assert cfg.inner.size == 2.0 and cfg.inner.names == ("p", "q") and cfg.limit == 3
    assert from_dict(Outer, to_dict(cfg)) == cfg


@pytest.mark.parametrize("data, where", [
    ({"mdoe": "x"}, "mdoe"),
    ({"inner": {"szie": 1}}, "inner"),
    ({"mode": "z"}, "mode"),
    ({"inner": {"size": "big"}}, "inner.size"),
    ({"limit": True}, "limit"),
])
def test_rejects_bad_keys_and_types(data, where):
    with pytest.raises(ConfigError, match=where):
        from_dict(Outer, data)


def test_load_yaml_file(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("section:\n  mode: y\n  inner: {size: 0.5}\n")
    assert load_config(Outer, p, "section").inner.size == 0.5
    with pytest.raises(ConfigError, match="not found"):
        load_config(Outer, tmp_path / "missing.yaml")
    p.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(Outer, p)
