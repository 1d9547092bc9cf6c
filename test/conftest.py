"""Shared fixtures: paths to the real sample data copied into test/data (see its README)."""
from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(__file__).resolve().parent / "data"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
# Text-embedding caches of the tests go to a throw-away folder, never the user's cache.
os.environ["CLIP2SCENE_CACHE"] = tempfile.mkdtemp(prefix="clip2scene-test-cache-")


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return DATA


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return ROOT
