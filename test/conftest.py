"""Shared fixtures: paths to the real sample data copied into test/data (see its README)."""
from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(__file__).resolve().parent / "data"
# Text-embedding caches of the tests go to a throw-away folder, never the user's cache.
os.environ["CLIP2SCENE_CACHE"] = tempfile.mkdtemp(prefix="clip2scene-test-cache-")
# DDS: each test run gets its own domain and discovers only on this machine, so parallel
# runs (and anything else on the network) never see each other's topics. Set before any
# rclpy.init and inherited by the node processes the tests start. (ROS_DOMAIN_ID 1-101 is
# valid on every OS; ROS_AUTOMATIC_DISCOVERY_RANGE is Iron+, ROS_LOCALHOST_ONLY older distros.)
os.environ["ROS_DOMAIN_ID"] = os.environ.get("CLIP2SCENE_TEST_DOMAIN_ID") or str(random.randint(1, 101))
os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
os.environ.setdefault("RMW_IMPLEMENTATION", "rmw_fastrtps_cpp")
# One torch thread, passive OpenMP waiting: on a shared 2-core machine torch's default two
# threads spin against a busy core (a 30 s training test took over an hour beside two other
# jobs). Set before torch loads (OpenMP reads the policy once); the suite's results do not
# depend on the thread count. Tests of thread settings set and restore their own.
# "auto" precisions mean fp32 in the suite on every CPU (inherited by the processes it starts):
# the reference comparisons are fp32 and some machines have native bf16 (AVX512-BF16), which
# "auto" would pick; the bf16 paths are tested where tests ask for bf16 explicitly.
os.environ.setdefault("CLIP2SCENE_CPU_BF16", "0")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread_for_the_session():
    import torch

    torch.set_num_threads(1)
    yield


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return DATA


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return ROOT


@pytest.fixture(scope="module")
def one_torch_thread():
    """Small sparse ops on a shared 2-core box stall on OpenMP barriers; one thread is
    several times faster there and results do not depend on it. Restored afterwards."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def load_module_file():
    """Load a Python file that is not an importable module (a launch file, a benchmark script)."""
    import importlib.util

    def load(name: str, path: Path):
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load
