"""benchmarks/pipeline_latency.py splits a real frame into its five stages.

The split is read from outside the pipeline (a wrapper on the segmenter's ``segment``,
hooks on the backbone); if the pipeline stopped going through either, a stage would vanish
or swallow another. Checked on the real nuScenes sweep with the demo model: every stage
is marked once per frame, in pipeline order, the stages add up to the frame, and the
instrumented pipeline still labels the sweep like an untouched one.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench(load_module_file):
    return load_module_file("pipeline_latency", ROOT / "benchmarks" / "pipeline_latency.py")


def test_stage_split_covers_the_frame_in_order(bench):
    factory = bench.MessageFactory.from_rosbags()
    path, dims = bench.SCANS["nuScenes"]
    cloud = bench.cloud_of(bench.load_points_bin(path, dims), factory)
    pipes = bench.pipelines("demo", factory)
    plain = pipes["folded"].process(cloud).labels
    clock = bench.StageClock()
    bench.instrument(pipes["folded"], clock)
    stages, labels = bench.run_once(pipes["folded"], clock, cloud)
    assert [m[0] for m in clock.marks] == ["start", *bench.STAGES]
    assert set(stages) == {*bench.STAGES, "frame"}
    for i in (0, 1):        # CPU, wall
        assert all(stages[s][i] >= 0 for s in bench.STAGES)
        assert sum(stages[s][i] for s in bench.STAGES) == pytest.approx(stages["frame"][i], rel=1e-6, abs=1e-9)
    assert stages["backbone"][0] > 0
    np.testing.assert_array_equal(labels, plain)
    assert (labels >= 0).mean() > 0.9
