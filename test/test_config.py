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


# ---- hostile files (issue 9) ----------------------------------------------------------------
from clip2scene_core.config import MAX_YAML_BYTES, MAX_YAML_DEPTH, load_yaml  # noqa: E402


def alias_bomb(levels: int = 9, width: int = 9) -> str:
    """~1 KB of YAML that expands to width**levels strings (a "billion laughs")."""
    lines = ['l0: &l0 ["lol"]']
    for i in range(1, levels):
        lines.append(f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * width)}]")
    lines.append(f"class_names: [{', '.join([f'*l{levels - 1}'] * width)}]")
    return "\n".join(lines) + "\n"


def test_alias_bomb_is_refused_before_it_is_expanded(tmp_path):
    """A 1 KB alias bomb took 100 s and 5.9 GB when an error message printed it."""
    p = tmp_path / "bomb.yaml"
    p.write_text(alias_bomb())
    assert p.stat().st_size < 1100
    with pytest.raises(ConfigError, match="more than 200000 values once its aliases are expanded"):
        load_yaml(p)
    p.write_text("x: &a [1, *a]\n")
    with pytest.raises(ConfigError, match="loop"):
        load_yaml(p)
    p.write_text("base: &b {size: 0.5}\nsection:\n  inner: *b\n")   # plain aliases still work
    assert load_config(Outer, p, "section").inner.size == 0.5
    with pytest.raises(ConfigError, match="aliases"):
        load_yaml(p, aliases=False)


@pytest.mark.parametrize("content, match", [
    (bytes(range(256)) * 4, "not a YAML text file"),
    (b"\x89PNG\r\n\x1a\n" + b"\x00" * 64, "not a YAML text file"),
    (b"a: 2020-99-99\n", "invalid YAML value"),
    (b"a: !!python/object/apply:os.system [echo hi]\n", "invalid YAML"),
    (b"a: [1, 2\n", "invalid YAML"),
    (b"? [1, 2]\n: x\n", "invalid YAML"),
    (("[" * (MAX_YAML_DEPTH + 1) + "]" * (MAX_YAML_DEPTH + 1)).encode(), "nested deeper"),
    (b"[" * 5000 + b"]" * 5000, "invalid YAML"),
    (b"a: 1\x00\n", "invalid YAML"),
])
def test_bad_files_are_one_config_error(tmp_path, content, match):
    p = tmp_path / "c.yaml"
    p.write_bytes(content)
    with pytest.raises(ConfigError, match=match):
        load_yaml(p)


def test_oversized_and_special_files(tmp_path):
    p = tmp_path / "big.yaml"
    p.write_bytes(b"# " + b"x" * MAX_YAML_BYTES + b"\n")
    with pytest.raises(ConfigError, match="larger than"):
        load_yaml(p)
    with pytest.raises(ConfigError, match="not a regular file"):
        load_yaml(tmp_path)
