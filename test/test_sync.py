"""FrameSync (approximate-time matching) and LatestSlot (newest-frame hand-off).

Stamps come from real nuScenes key frames (sample_data.json of scene-0523 / scene-0916),
whose six cameras fire 2–45 ms before the LiDAR sweep they belong to.
"""
from __future__ import annotations

import json
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clip2scene_core.errors import ConfigError
from clip2scene_ros.sync import (PAIR_LATEST, PAIR_SYNCHRONIZED, SKIP_NEVER, SKIP_NO_MATCH, SKIP_TIMEOUT,
                                 CameraInfoPairing, FrameSync, LatestSlot, SyncConfig)

CAMS = ("CAM_FRONT_LEFT", "CAM_FRONT", "CAM_FRONT_RIGHT", "CAM_BACK_RIGHT", "CAM_BACK", "CAM_BACK_LEFT")
MS = 1_000_000


@pytest.fixture(scope="module")
def records(data_dir):
    """(stamp_ns, channel, sample_token, filename) of the scene-0523 key frames, time-ordered."""
    rows = json.loads((data_dir / "nuscenes/dororo99_v1.0-extract_3samples/v1.0-extract-subset/"
                       "sample_data.json").read_text())
    out = []
    for r in rows:
        if r["filename"].startswith("samples/") and "n008-2018-08-30" in r["filename"]:
            out.append((r["timestamp"] * 1000, r["filename"].split("/")[1], r["sample_token"],
                        r["filename"]))
    out.sort()
    assert len(out) == 14  # two key frames × (LIDAR_TOP + 6 cameras)
    return out


def feed(sync: FrameSync, recs, cams=CAMS):
    frames = []
    for stamp, channel, _, fname in recs:
        if channel == "LIDAR_TOP":
            frames += sync.add_lidar(fname, stamp)
        elif channel in cams:
            frames += sync.add_camera(channel, fname, stamp)
    return frames


def sample_of(records, fname):
    return next(r[2] for r in records if r[3] == fname)


def test_real_key_frames_match_their_own_images(records):
    sync = FrameSync(CAMS, SyncConfig(queue_size=10, slop=0.05, camera_timeout=1.0))
    frames = feed(sync, records)
    # the first sweep completes as soon as every camera delivered an image past its window
    assert len(frames) == 1 and sync.pending == 1
    last = records[-1][0]
    assert sync.poll(last + 500 * MS) == []          # cameras still within their timeout
    frames += sync.poll(last + 1001 * MS)            # they went quiet: match with what is there
    assert len(frames) == 2 and sync.pending == 0
    for frame in frames:
        assert set(frame.cameras) == set(CAMS) and frame.skipped == {}
        lidar_sample = sample_of(records, frame.lidar)
        for fname in frame.cameras.values():
            assert sample_of(records, fname) == lidar_sample
            stamp = next(r[0] for r in records if r[3] == fname)
            assert abs(stamp - frame.stamp_ns) <= 50 * MS


def test_tight_slop_skips_cameras_that_fired_too_early(records):
    sync = FrameSync(CAMS, SyncConfig(slop=0.01))
    frames = feed(sync, records)
    first = frames[0]
    # CAM_BACK_LEFT fires 1.7 ms, CAM_BACK 11.6 ms, CAM_FRONT_LEFT 44 ms before the sweep
    assert "CAM_BACK_LEFT" in first.cameras
    assert first.skipped["CAM_FRONT_LEFT"] == SKIP_NO_MATCH
    assert first.skipped["CAM_BACK"] == SKIP_NO_MATCH
    assert set(first.cameras) | set(first.skipped) == set(CAMS)


def test_lidar_only_without_cameras(records):
    sync = FrameSync((), SyncConfig())
    frames = feed(sync, records, cams=())
    assert [f.lidar for f in frames] == [r[3] for r in records if r[1] == "LIDAR_TOP"]
    assert all(f.cameras == {} and f.skipped == {} for f in frames)


def test_camera_that_stops_is_skipped_after_timeout(records):
    sync = FrameSync(("CAM_FRONT", "CAM_REAR_NEVER"), SyncConfig(slop=0.05, camera_timeout=0.2))
    t0 = records[6][0]  # first sweep
    cam_front = next(r for r in records if r[1] == "CAM_FRONT")
    assert sync.add_camera("CAM_FRONT", cam_front[3], cam_front[0]) == []
    assert sync.add_lidar("sweep0", t0) == []                     # rear camera may still come
    frames = sync.poll(t0 + 201 * MS)
    assert len(frames) == 1
    assert frames[0].cameras == {"CAM_FRONT": cam_front[3]}
    assert frames[0].skipped == {"CAM_REAR_NEVER": SKIP_NEVER}
    # front camera now silent for > timeout: a sweep 2 s later goes out LiDAR-only at once
    later = sync.add_lidar("sweep1", t0 + 2000 * MS)
    assert len(later) == 1 and later[0].cameras == {}
    assert later[0].skipped == {"CAM_FRONT": SKIP_TIMEOUT, "CAM_REAR_NEVER": SKIP_NEVER}


def test_waiting_sweeps_are_bounded_and_drops_counted():
    sync = FrameSync(("front",), SyncConfig(queue_size=3, slop=0.05, camera_timeout=100.0))
    for i in range(10):
        assert sync.add_lidar(i, i * 100 * MS, now_ns=i * 100 * MS) == []
    assert sync.pending == 3
    assert sync.counters.lidar_overflow == 7
    # the newest three are the ones still waiting: an image for sweep 9 releases 7 and 8 unmatched
    frames = sync.add_camera("front", "img9", 9 * 100 * MS + 10 * MS)
    assert [f.lidar for f in frames] == [7, 8]
    assert all(f.skipped == {"front": SKIP_NO_MATCH} for f in frames)
    assert sync.pending == 1


def test_unknown_camera_is_ignored_and_counted():
    sync = FrameSync(("front",))
    assert sync.add_camera("rear", "x", 0) == []
    assert sync.counters.unknown_camera == 1 and sync.counters.camera_in == 0


@pytest.mark.parametrize("kwargs", [dict(queue_size=0), dict(slop=-0.1), dict(camera_timeout=0.0)])
def test_invalid_sync_config(kwargs):
    with pytest.raises(ConfigError):
        SyncConfig(**kwargs)


def test_duplicate_camera_names_rejected():
    with pytest.raises(ConfigError):
        FrameSync(("a", "a"))


events = st.lists(
    st.tuples(st.sampled_from(["lidar", "a", "b"]), st.integers(0, 400), st.integers(0, 60)),
    min_size=1, max_size=60)


@settings(max_examples=150, deadline=None)
@given(events=events, slop_ms=st.integers(0, 60), queue=st.integers(1, 6))
def test_sync_invariants(events, slop_ms, queue):
    """Any arrival order: matches lie within slop, sweeps leave once and in order, queues stay bounded."""
    cfg = SyncConfig(queue_size=queue, slop=slop_ms / 1000, camera_timeout=0.1)
    sync = FrameSync(("a", "b"), cfg)
    now, k, out = 0, 0, []
    stamps = {}
    for stream, stamp_ms, delay_ms in events:
        now += delay_ms * MS
        stamp = stamp_ms * MS
        if stream == "lidar":
            stamps[k] = stamp
            out += sync.add_lidar(k, stamp, now)
            k += 1
        else:
            out += sync.add_camera(stream, (stream, stamp), stamp, now)
        assert sync.pending <= queue
        assert all(len(q) <= queue for q in sync._cams.values())
    out += sync.poll(now + 10_000 * MS)
    ids = [f.lidar for f in out]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    assert sync.pending == 0
    assert len(out) + sync.counters.lidar_overflow == k
    for f in out:
        assert f.stamp_ns == stamps[f.lidar]
        assert set(f.cameras) | set(f.skipped) == {"a", "b"}
        assert not set(f.cameras) & set(f.skipped)
        for name, (cam, stamp) in f.cameras.items():
            assert cam == name and abs(stamp - f.stamp_ns) <= cfg.slop_ns


def test_latest_slot_keeps_newest_and_counts_drops():
    slot: LatestSlot[int] = LatestSlot()
    assert slot.put(1) is False
    assert slot.put(2) is True
    assert slot.put(3) is True
    assert slot.dropped == 2
    assert slot.take(timeout=0) == 3
    assert slot.take(timeout=0) is None


def test_latest_slot_slow_consumer_never_queues():
    """A producer that outpaces the consumer: everything is either consumed or counted as dropped."""
    slot: LatestSlot[int] = LatestSlot()
    consumed: list[int] = []
    gate = threading.Event()

    def consumer():
        while True:
            item = slot.take(timeout=5.0)
            if item is None:
                return
            consumed.append(item)
            gate.wait(5.0)  # "inference" that is slower than the sensor
            gate.clear()

    t = threading.Thread(target=consumer)
    t.start()
    for i in range(200):
        slot.put(i)
        if i % 50 == 49:
            gate.set()
    slot.close()
    gate.set()
    t.join(10.0)
    assert not t.is_alive()
    assert consumed == sorted(consumed) and len(set(consumed)) == len(consumed)
    assert len(consumed) + slot.dropped + (1 if slot.take(0) is not None else 0) == 200
    assert slot.dropped > 0


def test_latest_slot_close_wakes_blocked_consumer():
    slot: LatestSlot[int] = LatestSlot()
    result = []
    t = threading.Thread(target=lambda: result.append(slot.take(timeout=30.0)))
    t.start()
    slot.close()
    t.join(10.0)
    assert not t.is_alive() and result == [None]


# ---- image ↔ CameraInfo --------------------------------------------------------------------
def test_latest_camera_info_is_attached_to_every_image():
    """A latched or 1 Hz CameraInfo must not starve a 10 Hz camera."""
    pairing = CameraInfoPairing(PAIR_LATEST)
    assert pairing.on_image("img0", 0, 0) == []               # no CameraInfo yet: dropped, counted
    assert pairing.counters.no_info == 1
    assert pairing.on_info("info@0", 0, 0) == []
    got = [pairing.on_image(f"img{i}", i * 100 * MS, i * 100 * MS) for i in range(1, 11)]
    assert got == [[(f"img{i}", "info@0")] for i in range(1, 11)]
    pairing.on_info("info@1s", 1000 * MS, 1000 * MS)          # new intrinsics win from now on
    assert pairing.on_image("img11", 1100 * MS, 1100 * MS) == [("img11", "info@1s")]
    assert pairing.counters.paired == 11 and pairing.latest_info == "info@1s"


def test_synchronized_camera_info_pairs_by_stamp_within_slop():
    pairing = CameraInfoPairing(PAIR_SYNCHRONIZED, SyncConfig(queue_size=5, slop=0.01,
                                                              camera_timeout=0.5))
    assert pairing.on_image("img@0", 0, 0) == []               # waits for its CameraInfo
    assert pairing.on_info("info@0", 0, 1 * MS) == [("img@0", "info@0")]
    assert pairing.on_info("info@100", 100 * MS, 100 * MS) == []
    # 3 ms off: a closer CameraInfo may still come, so the pair goes out with the next one
    assert pairing.on_image("img@103", 103 * MS, 104 * MS) == []
    assert pairing.on_info("info@200", 200 * MS, 200 * MS) == [("img@103", "info@100")]
    # an image whose CameraInfo never comes is released by poll and counted, never paired
    # with a CameraInfo of another stamp
    assert pairing.on_image("img@300", 300 * MS, 300 * MS) == []
    assert pairing.poll(900 * MS) == []
    assert pairing.counters.unmatched == 1 and pairing.counters.paired == 2
    with pytest.raises(ConfigError, match="camera_info_policy"):
        CameraInfoPairing("newest")
