"""rosbag2 (mcap, sqlite3) and ROS 1 reading / writing, including damaged bags."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from clip2scene_core.types import Scan
from clip2scene_ros.bag import (BagError, BagReader, BagWriter, convert_message, default_typestore,
                                write_ros1_bag)
from clip2scene_ros.image import model_to_camera_info
from clip2scene_ros.msgs import MessageFactory, header_stamp_ns, make_header
from clip2scene_ros.pointcloud2 import read_points, scan_to_cloud
from clip2scene_core.types import CameraModel

SCAN = "nuscenes/mmdet3d_demo_scene-0061/n015-2018-07-24-11-22-45+0800__LIDAR_TOP__1532402927647951.pcd.bin"
T0 = 1_532_402_927_647_951_000
N_FRAMES = 12


@pytest.fixture(scope="module")
def factory() -> MessageFactory:
    return MessageFactory.from_rosbags()


@pytest.fixture(scope="module")
def frames(data_dir) -> list[Scan]:
    """The real scan, its points rolled differently per frame (each ~550 kB: several chunks)."""
    pts = np.fromfile(data_dir / SCAN, dtype=np.float32).reshape(-1, 5)[:, :4]
    return [Scan(np.roll(pts, 997 * i, axis=0), ("x", "y", "z", "intensity"), "lidar_top",
                 T0 + i * 100_000_000) for i in range(N_FRAMES)]


def _info(factory: MessageFactory, stamp: int):
    K = np.array([[1266.4, 0, 816.3], [0, 1266.4, 491.5], [0, 0, 1]])
    return model_to_camera_info(CameraModel(1600, 900, K, [], "none"),
                                make_header(stamp, "cam_front_optical_frame", factory), factory)


def _write(path: Path, frames: list[Scan], factory: MessageFactory, storage: str) -> Path:
    with BagWriter(path, storage=storage, typestore=factory.typestore) as w:
        for s in frames:
            w.write("/cam_front/camera_info", _info(factory, s.stamp_ns - 20_000_000), s.stamp_ns - 20_000_000)
            w.write("/lidar_top/points", scan_to_cloud(s, msg_factory=factory), s.stamp_ns)
    return path


@pytest.fixture(scope="module", params=["mcap", "sqlite3"])
def bag(request, tmp_path_factory, frames, factory) -> Path:
    return _write(tmp_path_factory.mktemp(request.param) / "bag", frames, factory, request.param)


def _storage_file(bag: Path) -> Path:
    return next(p for p in bag.iterdir() if p.suffix in (".mcap", ".db3"))


def test_round_trip_in_time_order(bag, frames):
    with BagReader(bag) as r:
        assert r.topics == {"/cam_front/camera_info": "sensor_msgs/msg/CameraInfo",
                            "/lidar_top/points": "sensor_msgs/msg/PointCloud2"}
        assert r.message_counts["/lidar_top/points"] == N_FRAMES
        assert r.find_topics()["pointcloud"] == ["/lidar_top/points"]
        assert r.topics_of_type("CameraInfo") == ["/cam_front/camera_info"]
        msgs = list(r.messages())
        assert not r.report.damaged and not r.report.salvaged
    assert [m.log_time_ns for m in msgs] == sorted(m.log_time_ns for m in msgs)
    clouds = [m for m in msgs if m.topic == "/lidar_top/points"]
    assert len(clouds) == N_FRAMES
    for m, s in zip(clouds, frames):
        assert header_stamp_ns(m.msg) == s.stamp_ns == m.log_time_ns
        pts = read_points(m.msg)
        np.testing.assert_array_equal(pts["x"], s.points[:, 0])
        np.testing.assert_array_equal(pts["intensity"], s.points[:, 3])
    info = next(m.msg for m in msgs if m.topic == "/cam_front/camera_info")
    assert info.k[0] == pytest.approx(1266.4) and info.header.frame_id == "cam_front_optical_frame"


def test_topic_filter_and_bare_storage_file(bag):
    with BagReader(_storage_file(bag)) as r:   # the .mcap / .db3 without metadata.yaml
        clouds = list(r.messages(["/lidar_top/points"]))
    assert len(clouds) == N_FRAMES and {m.topic for m in clouds} == {"/lidar_top/points"}


@pytest.mark.parametrize("fraction", [0.45, 0.9])
def test_truncated_bag_is_salvaged_and_reported(bag, frames, tmp_path, fraction):
    cut = tmp_path / "cut"
    shutil.copytree(bag, cut)
    f = _storage_file(cut)
    with open(f, "r+b") as fh:
        fh.truncate(int(os.path.getsize(f) * fraction))
    with BagReader(cut) as r:
        clouds = list(r.messages(["/lidar_top/points"]))
        rep = r.report
    assert rep.salvaged and rep.truncated and rep.damaged
    assert rep.expected_messages == 2 * N_FRAMES
    assert 0 < len(clouds) < N_FRAMES
    # what was lost is accounted for: read + missing = what metadata.yaml announced for the
    # topic that was read (the camera_info messages nobody asked for are not "missing")
    assert rep.expected_by_topic == {"/cam_front/camera_info": N_FRAMES, "/lidar_top/points": N_FRAMES}
    assert rep.messages_read + rep.missing_messages + rep.corrupt_messages == N_FRAMES
    assert rep.to_dict()["messages_on_other_topics"] == N_FRAMES
    assert rep.unreadable_chunks + rep.unreadable_rows > 0
    by_stamp = {s.stamp_ns: s for s in frames}
    for m in clouds:    # every message that came back is intact
        np.testing.assert_array_equal(read_points(m.msg)["y"], by_stamp[m.log_time_ns].points[:, 1])
    with pytest.raises(BagError):
        with BagReader(cut, salvage=False) as r:
            list(r.messages())


def test_corrupt_mcap_chunk_is_skipped_later_ones_read(tmp_path, frames, factory):
    bag = _write(tmp_path / "bag", frames, factory, "mcap")
    f = _storage_file(bag)
    data = bytearray(f.read_bytes())
    # chunks are zstd frames: break the magic of the second one
    starts = [i for i in range(len(data) - 4) if data[i:i + 4] == b"\x28\xb5\x2f\xfd"]
    assert len(starts) >= 3
    data[starts[1]:starts[1] + 4] = b"\x00\x00\x00\x00"
    f.write_bytes(bytes(data))
    with BagReader(bag) as r:
        clouds = list(r.messages(["/lidar_top/points"]))
        rep = r.report
    assert rep.unreadable_chunks >= 1 and not rep.truncated
    assert 0 < len(clouds) < N_FRAMES
    assert clouds[-1].log_time_ns == frames[-1].stamp_ns      # chunks after the bad one survive


def test_corrupt_message_payload_counted(tmp_path, frames, factory):
    bag = tmp_path / "bag"
    with BagWriter(bag, storage="sqlite3", typestore=factory.typestore) as w:
        for s in frames[:3]:
            w.write("/lidar_top/points", scan_to_cloud(s, msg_factory=factory), s.stamp_ns)
        w.write_raw("/lidar_top/points", "sensor_msgs/msg/PointCloud2", b"\x00\x01\x00\x00garbage",
                    frames[3].stamp_ns)
    with BagReader(bag) as r:
        clouds = list(r.messages())
        assert r.report.corrupt_messages == 1
        assert r.report.corrupt_by_topic == {"/lidar_top/points": 1}
    assert len(clouds) == 3


def test_ros1_bag_read_and_salvaged(tmp_path, frames, factory):
    msgs = []
    for s in frames[:6]:
        msgs.append(("/cam_front/camera_info", "sensor_msgs/msg/CameraInfo", s.stamp_ns - 1,
                     _info(factory, s.stamp_ns - 1)))
        msgs.append(("/lidar_top/points", "sensor_msgs/msg/PointCloud2", s.stamp_ns,
                     scan_to_cloud(s, msg_factory=factory)))
    path = write_ros1_bag(tmp_path / "in.bag", msgs)
    with BagReader(path) as r:
        assert r.storage == "ros1"
        assert r.topics["/lidar_top/points"] == "sensor_msgs/msg/PointCloud2"
        got = list(r.messages())
    assert len(got) == 12 and not r.report.salvaged
    info = next(m.msg for m in got if m.topic == "/cam_front/camera_info")
    assert info.K[0] == pytest.approx(1266.4)           # ROS 1 field names
    assert info.header.frame_id == "cam_front_optical_frame"
    cloud = next(m.msg for m in got if m.topic == "/lidar_top/points")
    np.testing.assert_array_equal(read_points(cloud)["x"], frames[0].points[:, 0])
    # and back to ROS 2 for writing
    ros2 = convert_message(info, "sensor_msgs/msg/CameraInfo", default_typestore())
    assert ros2.k[4] == pytest.approx(1266.4) and ros2.header.stamp.nanosec == info.header.stamp.nanosec

    cut = tmp_path / "cut.bag"
    cut.write_bytes(path.read_bytes()[: int(path.stat().st_size * 0.6)])
    with BagReader(cut) as r:
        salvaged = list(r.messages(["/lidar_top/points"]))
        assert r.report.salvaged and r.report.truncated
    assert 0 < len(salvaged) < 6
    np.testing.assert_array_equal(read_points(salvaged[0].msg)["z"], frames[0].points[:, 2])


def test_writer_refuses_existing_and_unknown(tmp_path, frames, factory):
    bag = _write(tmp_path / "b", frames[:1], factory, "mcap")
    with pytest.raises(BagError, match="exists"):
        BagWriter(bag)
    with pytest.raises(BagError, match="storage"):
        BagWriter(tmp_path / "c", storage="rosbag3")
    with pytest.raises(BagError, match="no such bag"):
        BagReader(tmp_path / "missing")
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"not a bag at all")
    with pytest.raises(BagError, match="unknown bag format"):
        BagReader(junk)


def test_salvage_streams_the_storage_file(bag, frames, tmp_path, monkeypatch):
    """Salvage reads record by record (rows for sqlite): never a whole storage file at once."""
    cut = tmp_path / "cut"
    shutil.copytree(bag, cut)
    f = _storage_file(cut)
    with open(f, "r+b") as fh:
        fh.truncate(int(os.path.getsize(f) * 0.7))

    def whole_file(self):
        raise AssertionError(f"whole-file read of {self}")

    monkeypatch.setattr(Path, "read_bytes", whole_file)
    with BagReader(cut) as r:
        clouds = list(r.messages(["/lidar_top/points"]))
        assert r.report.salvaged and r.report.truncated
    assert 0 < len(clouds) < N_FRAMES


def _relayout(src: Path, dst: Path, compression: str, chunked: bool) -> Path:
    """The same messages in another mcap layout (compression, one big chunk or none)."""
    from mcap.reader import make_reader
    from mcap.writer import CompressionType, Writer

    kind = {"zstd": CompressionType.ZSTD, "lz4": CompressionType.LZ4, "": CompressionType.NONE}[compression]
    schemas: dict[int, int] = {}
    channels: dict[int, int] = {}
    with src.open("rb") as fi, dst.open("wb") as fo:
        w = Writer(fo, compression=kind, chunk_size=2**30, use_chunking=chunked)
        w.start("ros2", "test")
        for s, c, m in make_reader(fi).iter_messages():
            if s.id not in schemas:
                schemas[s.id] = w.register_schema(s.name, s.encoding, s.data)
            if c.id not in channels:
                channels[c.id] = w.register_channel(c.topic, c.message_encoding, schemas[s.id], c.metadata)
            w.add_message(channels[c.id], m.log_time, m.data, m.publish_time, m.sequence)
        w.finish()
    return dst


@pytest.mark.parametrize("compression,chunked", [("lz4", True), ("", True), ("", False)])
def test_cut_mcap_keeps_the_whole_messages_of_any_layout(tmp_path, frames, factory, compression, chunked):
    """One big chunk cut near its end: its complete messages are decoded from what arrived
    (an lz4 stream, plain); without chunks every whole message record is kept. (zstd: the
    rosbags-written bags of test_robust_bag_replay; here the rolled copies of one scan
    compress to almost nothing, so a cut zstd chunk holds little more than the first.)"""
    bag = _write(tmp_path / "bag", frames[:6], factory, "mcap")
    f = _relayout(_storage_file(bag), tmp_path / "x.mcap", compression, chunked)
    with open(f, "r+b") as fh:
        fh.truncate(int(os.path.getsize(f) * 0.9))
    with BagReader(f) as r:
        clouds = list(r.messages(["/lidar_top/points"]))
        rep = r.report
    assert rep.salvaged and rep.truncated and rep.unreadable_chunks == (1 if chunked else 0)
    assert 0 < len(clouds) < 6
    by_stamp = {s.stamp_ns: s for s in frames}
    for m in clouds:
        np.testing.assert_array_equal(read_points(m.msg)["x"], by_stamp[m.log_time_ns].points[:, 0])


def test_message_defaults_and_conversion_share_one_field_walk(factory):
    """``MessageFactory.new`` and ``convert_message`` fill the same ROS defaults (a bool[] is
    a numpy array, which rosbags can serialize)."""
    from types import SimpleNamespace

    typ = "rcl_interfaces/msg/ParameterValue"
    msg = factory.new(typ)
    assert msg.bool_array_value.dtype == np.bool_ and msg.string_value == ""
    factory.typestore.serialize_cdr(msg, typ)
    copy = convert_message(SimpleNamespace(type=6, BOOL_ARRAY_VALUE=[True, False]), typ, factory.typestore)
    assert copy.bool_array_value.tolist() == [True, False] and copy.type == 6 and copy.integer_value == 0
    factory.typestore.serialize_cdr(copy, typ)
