"""The CLIP teacher off the sweep's critical path (`TeacherWorker` in `PipelineRunner`), and
images decoded only when something consumes them.

Real inputs: the nuScenes scene-0061 sweep and CAM_FRONT JPEG as rosbags messages, a tiny
random checkpoint and a tiny random CLIP teacher (see test_pipeline.py).
"""
from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from clip2scene_core.segmenter import Segmenter
from clip2scene_ros import pipeline as pipeline_mod
from clip2scene_ros.pipeline import PipelineConfig, SegmentationPipeline
from clip2scene_ros.runner import PipelineRunner
from clip2scene_ros.sync import SyncConfig

from test_node_logic import FakeClock, checkpoint, factory, nusc  # noqa: F401 (shared fixtures)
from test_pipeline import (FRONT_STAMP, LIDAR_STAMP, make_camera, make_cloud, make_lookup,
                           subsample, tiny_teacher)

MS = 1_000_000
AGE = (LIDAR_STAMP - FRONT_STAMP) / 1e9      # the front image is 35.5 ms older than the sweep




@pytest.fixture
def decodes(monkeypatch):
    """Counts JPEG decodes (the pipeline's and the teacher worker's) per thread name."""
    calls: list[str] = []
    real = pipeline_mod.compressed_to_rgb

    def counting(*args, **kwargs):
        calls.append(threading.current_thread().name)
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline_mod, "compressed_to_rgb", counting)
    return calls


def make_pipeline(checkpoint, nusc, factory, teacher=True, overlays=False):
    torch.set_num_threads(1)
    seg = Segmenter.load(checkpoint, device="cpu", teacher=tiny_teacher() if teacher else None)
    return SegmentationPipeline(seg, PipelineConfig(publish_overlays=overlays), factory,
                                make_lookup(nusc, factory))


def make_runner(pipe, clock, **kwargs):
    return PipelineRunner(pipe, ["front"], SyncConfig(slop=0.05, camera_timeout=0.5), clock=clock,
                          tf_lookup=pipe.tf_lookup, device="cpu", **kwargs)


def feed(runner, clock, nusc, factory, shift_ns=0):
    """One sweep and its front image (35 ms before it), `shift_ns` later than the originals."""
    clock.now = max(clock.now, LIDAR_STAMP + shift_ns + 40 * MS)
    cam = make_camera(nusc, factory, stamp_ns=FRONT_STAMP + shift_ns)
    runner.on_camera("front", cam.image, cam.info)
    runner.on_cloud(make_cloud(subsample(nusc.points), factory, LIDAR_STAMP + shift_ns))
    clock.now += 600 * MS         # the camera went quiet: the sweep goes with that image
    runner.on_timer()


def test_async_fusion_gives_the_inline_labels_once_the_prediction_is_ready(checkpoint, nusc, factory,
                                                                           decodes):
    pipe = make_pipeline(checkpoint, nusc, factory)
    cloud = make_cloud(subsample(nusc.points), factory)
    inline = pipe.process(cloud, [make_camera(nusc, factory)])
    assert inline.cameras_used == ["front"] and inline.fusion_skipped == {}
    lidar_only = pipe.process(cloud)
    assert (inline.labels != lidar_only.labels).any()        # the camera changes labels

    clock = FakeClock(LIDAR_STAMP)
    runner = make_runner(pipe, clock)
    assert runner.teacher is not None
    decodes.clear()
    try:
        feed(runner, clock, nusc, factory)
        assert runner.teacher.wait_idle(60)
        out = runner.step(timeout=0)
        assert out is not None and out.status == "ok"
        np.testing.assert_array_equal(out.labels, inline.labels)
        np.testing.assert_allclose(out.scores, inline.scores, rtol=1e-5, atol=1e-6)
        assert out.teacher_used == {"front": pytest.approx(AGE)}
        assert out.teacher_stale == {}
        # no overlay wanted: the sweep itself decoded nothing; the worker decoded the image once
        assert out.cameras_idle == ["front"] and out.cameras_used == [] and out.cameras_skipped == {}
        assert decodes == ["clip2scene_teacher"]
        values = runner.diagnostics().values
        assert values["teacher.mode"] == "async" and values["teacher.predictions"] == "1"
        assert values["camera.front.teacher_used"] == "1" and values["camera.front.idle"] == "1"
        assert float(values["teacher.latency_mean_s"]) > 0
    finally:
        runner.close()


def test_a_sweep_never_waits_for_the_teacher_and_stale_predictions_are_not_used(checkpoint, nusc,
                                                                                factory):
    pipe = make_pipeline(checkpoint, nusc, factory)
    seg = pipe.segmenter
    lidar_only = pipe.process(make_cloud(subsample(nusc.points), factory))
    inline = pipe.process(make_cloud(subsample(nusc.points), factory), [make_camera(nusc, factory)])
    release = threading.Event()
    started = threading.Event()
    real_predict = seg.predict_camera

    def slow_predict(frame, precision=None):      # a teacher that takes as long as we say
        started.set()
        assert release.wait(60)
        return real_predict(frame, precision)

    seg.predict_camera = slow_predict
    clock = FakeClock(LIDAR_STAMP)
    runner = make_runner(pipe, clock, teacher_max_age=0.5)
    try:
        feed(runner, clock, nusc, factory)
        assert started.wait(60)                  # the worker is inside the teacher ...
        out = runner.step(timeout=0)             # ... and the sweep comes out all the same
        assert not release.is_set()
        assert out is not None and out.status == "ok"
        np.testing.assert_array_equal(out.labels, lidar_only.labels)   # LiDAR-only for now
        assert out.teacher_used == {} and out.cameras_idle == ["front"]

        release.set()
        assert runner.teacher.wait_idle(60)
        # the next sweep (100 ms later) fuses the prediction of the first image (135 ms old)
        release.clear()
        started.clear()
        feed(runner, clock, nusc, factory, 100 * MS)
        assert started.wait(60)                  # its own image is still in the teacher
        out2 = runner.step(timeout=0)
        assert out2.teacher_used == {"front": pytest.approx(0.1 + AGE)}
        # same image content and a static transform: the inline fusion's labels
        np.testing.assert_array_equal(out2.labels, inline.labels)

        # a sweep 2 s later: the latest finished prediction is 2.035 s old: stale, not fused
        feed(runner, clock, nusc, factory, 2000 * MS)
        out3 = runner.step(timeout=0)
        assert out3.teacher_used == {} and out3.teacher_stale == {"front": pytest.approx(2 + AGE)}
        np.testing.assert_array_equal(out3.labels, lidar_only.labels)
        values = runner.diagnostics().values
        assert values["camera.front.teacher_used"] == "1"
        assert values["camera.front.teacher_stale"] == "1"
    finally:
        release.set()
        runner.close()
    assert runner.teacher._thread is None        # closed: the worker thread ended


def test_inline_teacher_when_asked(checkpoint, nusc, factory, decodes):
    pipe = make_pipeline(checkpoint, nusc, factory)
    clock = FakeClock(LIDAR_STAMP)
    runner = make_runner(pipe, clock, teacher_async=False)
    assert runner.teacher is None
    decodes.clear()
    feed(runner, clock, nusc, factory)
    out = runner.step(timeout=0)
    inline = pipe.process(make_cloud(subsample(nusc.points), factory), [make_camera(nusc, factory)])
    np.testing.assert_array_equal(out.labels, inline.labels)
    assert out.cameras_used == ["front"] and out.cameras_idle == [] and out.fusion_skipped == {}
    assert decodes == ["MainThread", "MainThread"]     # the step's and the reference's
    assert runner.diagnostics().values["teacher.mode"] == "inline"


def test_images_are_decoded_only_when_something_consumes_them(checkpoint, nusc, factory, decodes):
    pipe = make_pipeline(checkpoint, nusc, factory, teacher=False, overlays=True)
    cloud = make_cloud(subsample(nusc.points), factory)
    cams = [make_camera(nusc, factory)]
    decodes.clear()
    out = pipe.process(cloud, cams, overlay_cameras=set())        # nobody subscribes
    assert decodes == [] and out.cameras_idle == ["front"] and out.cameras_used == []
    assert out.cameras_skipped == {} and out.overlays == {} and out.fusion_skipped == {}
    out = pipe.process(cloud, cams, overlay_cameras={"front"})    # an overlay subscriber
    assert len(decodes) == 1 and out.cameras_used == ["front"] and set(out.overlays) == {"front"}
    pipe.config.publish_overlays = False
    out = pipe.process(cloud, cams)
    assert len(decodes) == 1 and out.cameras_idle == ["front"]
    # a runner without a teacher starts no worker and decodes nothing either
    clock = FakeClock(LIDAR_STAMP)
    runner = make_runner(pipe, clock)
    assert runner.teacher is None
    feed(runner, clock, nusc, factory)
    out = runner.step(timeout=0)
    assert len(decodes) == 1 and out.cameras_idle == ["front"]
    assert runner.diagnostics().values["camera.front.idle"] == "1"
    # a bad image is not even looked at when nothing consumes it (no skip, no warning)
    bad = make_camera(nusc, factory)
    bad.image.data = bad.image.data[:100]
    out = pipe.process(cloud, [bad])
    assert out.cameras_skipped == {} and out.cameras_idle == ["front"]


def test_teacher_failures_are_counted_and_warned(checkpoint, nusc, factory):
    pipe = make_pipeline(checkpoint, nusc, factory)
    warnings: list[str] = []
    clock = FakeClock(LIDAR_STAMP)
    runner = make_runner(pipe, clock, warn=warnings.append)
    bad = make_camera(nusc, factory)
    bad.image.data = bad.image.data[:100]            # a truncated JPEG
    try:
        runner.on_camera("front", bad.image, bad.info)
        assert runner.teacher.wait_idle(60)
        runner.on_cloud(make_cloud(subsample(nusc.points), factory))
        clock.now += 600 * MS
        runner.on_timer()
        out = runner.step(timeout=0)
        assert out.status == "ok" and out.teacher_used == {}
        values = runner.diagnostics().values
        assert any(k.startswith("camera.front.teacher_failed[") for k in values)
        assert any("teacher prediction failed" in w for w in warnings)
    finally:
        runner.close()


def test_close_and_reopen_like_a_managed_node(checkpoint, nusc, factory):
    pipe = make_pipeline(checkpoint, nusc, factory)
    clock = FakeClock(LIDAR_STAMP)
    runner = make_runner(pipe, clock)
    worker = runner.teacher
    cam = make_camera(nusc, factory)
    try:
        runner.on_camera("front", cam.image, cam.info)
        assert worker.wait_idle(60) and set(worker.latest()) == {"front"}
        runner.close()                                   # deactivate
        assert worker._thread is None
        runner.on_camera("front", cam.image, cam.info)   # ignored while closed
        assert worker._thread is None and worker.wait_idle(1)
        runner.reopen()                                  # activate: no old predictions
        assert worker.latest() == {}
        runner.on_camera("front", cam.image, cam.info)
        assert worker.wait_idle(60) and set(worker.latest()) == {"front"} and worker.done == 2
    finally:
        runner.close()
