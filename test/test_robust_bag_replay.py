"""Issue 9, part A: nothing a bag, a data set or a flag does destroys data outside --out or
stops the tools without a report. Each test re-runs one attack on real data (test/data)."""
from __future__ import annotations

import errno
import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest

from clip2scene_core.errors import Clip2SceneError, ConfigError
from clip2scene_ros import replay
from clip2scene_ros.bag import (LABEL_CLASSES_TOPIC, LABELS_TOPIC, WRITER_MARK_KEY, BagError,
                                BagReader, BagWriter, ReadReport)
from clip2scene_ros.bag.mcap_salvage import McapSalvage
from clip2scene_ros.msgs import MessageFactory
from clip2scene_ros.pointcloud2 import FLOAT32, UINT16, create_cloud, make_point_field, read_points
from training.tools import nuscenes_to_bag, semantickitti_to_bag
from training.tools.converter_cli import safe_child

from test_replay import _checkpoint
from test_replay import kitti_bag, nus_bag, nus_ckpt, work  # noqa: F401 (shared module fixtures)

NUS3 = "nuscenes/dororo99_v1.0-extract_3samples"
TABLES = "v1.0-extract-subset"
KITTI = "semantickitti/mmdet3d_tests"
LIDARSEG = "nuscenes/mmdet3d_tests_lidarseg"
OUT_TOPIC = "/clip2scene_segmenter/labeled_points"


@pytest.fixture(scope="module")
def kitti_ckpt(work) -> Path:
    return _checkpoint(work / "kitti.pt", "semantickitti19")


def _run(bag: Path, out: Path, ckpt: Path, *extra: str) -> int:
    return replay.main([str(bag), "--out", str(out), "--checkpoint", str(ckpt), "--device", "cpu",
                        "--no-progress", "--quiet", *extra])


def _report(out: Path) -> dict:
    return json.loads((out.parent / f"{out.name}_report" / "report.json").read_text())


def _victim(folder: Path) -> dict[str, bytes]:
    folder.mkdir(parents=True)
    files = {"thesis.tex": b"years of work", "data.csv": b"1,2,3\n"}
    for name, data in files.items():
        (folder / name).write_bytes(data)
    (folder / "sub").mkdir()
    (folder / "sub" / "keep.txt").write_bytes(b"keep")
    return files


def _intact(folder: Path, files: dict[str, bytes]) -> bool:
    return all((folder / n).read_bytes() == d for n, d in files.items()) and \
        (folder / "sub" / "keep.txt").read_bytes() == b"keep"


def _copy_bag(src: Path, dst: Path, change=None, extra=()) -> Path:
    """Rewrite a bag message by message; ``change(m)`` returns a replacement (topic, msg,
    msgtype) or None to drop the message; ``extra`` are (topic, msg, msgtype, t) to add."""
    factory = MessageFactory.from_rosbags()
    with BagReader(src) as r, BagWriter(dst, typestore=factory.typestore) as w:
        for m in r.messages():
            item = change(m) if change else (m.topic, m.msg, m.msgtype)
            if item is not None:
                w.write(item[0], item[1], m.log_time_ns, item[2])
        for topic, msg, typ, t in extra:
            w.write(topic, msg, t, typ)
    return dst


# ----------------------------------------------------------------------------- data loss

def test_overwrite_never_deletes_a_folder_it_did_not_write(work, nus_bag, nus_ckpt, data_dir, capsys):
    victim = work / "victim"
    files = _victim(victim)
    # replay, both converters and the writer itself refuse, naming the path and why
    assert _run(nus_bag, victim, nus_ckpt, "--overwrite", "--no-cameras") == 2
    err = capsys.readouterr().err
    assert str(victim) in err and "refusing" in err and "not a rosbag2 directory" in err
    assert len(err.strip().splitlines()) == 1
    assert semantickitti_to_bag.main(["--root", str(data_dir / KITTI), "--out", str(victim),
                                      "--overwrite", "--quiet"]) == 2
    assert "refusing" in capsys.readouterr().err
    assert nuscenes_to_bag.main(["--root", str(data_dir / NUS3), "--version-dir", TABLES,
                                 "--out", str(victim), "--overwrite", "--quiet"]) == 2
    with pytest.raises(BagError, match="refusing"):
        BagWriter(victim, overwrite=True)
    assert _intact(victim, files)
    assert not (work / "victim_report").exists()   # refused before any work

    # a bag recorded by someone else (no writer mark) is not replaced either
    foreign = work / "foreign"
    shutil.copytree(nus_bag, foreign)
    meta = foreign / "metadata.yaml"
    meta.write_text(meta.read_text().replace(WRITER_MARK_KEY, "recorded.by"))
    with pytest.raises(BagError, match="did not write"):
        BagWriter(foreign, overwrite=True)
    # nor our own bag once someone put a file into it
    own = work / "own"
    assert _run(nus_bag, own, nus_ckpt, "--no-cameras") == 0
    (own / "notes.txt").write_text("mine")
    assert _run(nus_bag, own, nus_ckpt, "--no-cameras", "--overwrite") == 2
    assert "notes.txt" in capsys.readouterr().err and (own / "notes.txt").read_text() == "mine"
    (own / "notes.txt").unlink()
    # our own bag and an empty folder are replaced
    assert _run(nus_bag, own, nus_ckpt, "--no-cameras", "--overwrite") == 0
    empty = work / "empty_out"
    empty.mkdir()
    assert _run(nus_bag, empty, nus_ckpt, "--no-cameras") == 0
    with BagReader(own) as r:
        assert r.message_counts == {OUT_TOPIC: 2}
        assert r.custom_data[WRITER_MARK_KEY]


def test_out_that_is_a_file_is_one_clear_line(work, nus_bag, kitti_bag, nus_ckpt, data_dir, capsys):
    f = work / "a_file"
    f.write_text("precious")
    for extra in ((), ("--overwrite",)):
        assert _run(kitti_bag, f, nus_ckpt, *extra) == 2
        err = capsys.readouterr().err
        assert str(f) in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
        assert semantickitti_to_bag.main(["--root", str(data_dir / KITTI), "--out", str(f),
                                          "--quiet", *extra]) == 2
        err = capsys.readouterr().err
        assert "file" in err and len(err.strip().splitlines()) == 1
        assert nuscenes_to_bag.main(["--root", str(data_dir / NUS3), "--version-dir", TABLES,
                                     "--out", str(f), "--split-scenes", "--quiet", *extra]) == 2
        assert "is a file" in capsys.readouterr().err
    # below a file
    assert _run(kitti_bag, f / "sub", nus_ckpt) == 2
    assert "is a file" in capsys.readouterr().err
    assert f.read_text() == "precious"


def _dataset_with_scene_names(src: Path, dst: Path, names: dict[str, str]) -> Path:
    dst.mkdir(parents=True)
    (dst / "samples").symlink_to(src / "samples")
    shutil.copytree(src / TABLES, dst / TABLES)
    table = dst / TABLES / "scene.json"
    scenes = json.loads(table.read_text())
    for s in scenes:
        s["name"] = names[s["name"]]
    table.write_text(json.dumps(scenes))
    return dst


@pytest.mark.parametrize("names", [{"scene-0523": "..", "scene-0916": "."},
                                   {"scene-0523": "../../etc", "scene-0916": "/tmp/x"},
                                   {"scene-0523": "a/b", "scene-0916": "a_b"}])
def test_scene_names_from_data_never_leave_out(tmp_path, data_dir, names):
    root = _dataset_with_scene_names(data_dir / NUS3, tmp_path / "ds", names)
    parent = tmp_path / "parent"
    files = _victim(parent)
    out = parent / "bags"
    args = ["--root", str(root), "--version-dir", TABLES, "--out", str(out), "--split-scenes",
            "--cameras", "--quiet", "--overwrite"]
    for _ in range(2):   # the second run replaces the bags it wrote, nothing else
        assert nuscenes_to_bag.main(args) == 0
        assert _intact(parent, files)
        bags = sorted(p.parent for p in out.glob("*/metadata.yaml"))
        assert len(bags) == 2 and all(b.parent == out for b in bags)    # one per scene, inside --out
        assert sorted(p.name for p in parent.iterdir()) == ["bags", "data.csv", "sub", "thesis.tex"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds", "parent"]


def test_safe_child_names():
    taken: set[str] = set()
    root = Path("/data/out")
    assert safe_child(root, "..", taken, "scene") == root / "scene"
    assert safe_child(root, ".", taken, "scene") == root / "scene-2"
    assert safe_child(root, "../../etc/passwd", taken).name == "_.._etc_passwd"
    assert safe_child(root, "", taken, "scene") == root / "scene-3"
    assert safe_child(root, "scene-0061", taken) == root / "scene-0061"
    assert safe_child(root, "SCENE-0061", taken) == root / "SCENE-0061-2"   # case-insensitive FS


def test_segment_cli_same_file_name_in_two_folders(tmp_path, data_dir, nus_ckpt, capsys):
    from clip2scene_core import cli

    scan = next((data_dir / "nuscenes/mmdet3d_demo_scene-0061").glob("*LIDAR_TOP*.pcd.bin"))
    pts = np.fromfile(scan, dtype=np.float32).reshape(-1, 5)[:, :4]
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    pts[:20000].tofile(tmp_path / "a" / "000000.bin")
    pts[20000:].tofile(tmp_path / "b" / "000000.bin")
    out = tmp_path / "out"
    inputs = [str(tmp_path / "a" / "000000.bin"), str(tmp_path / "b" / "000000.bin"),
              str(tmp_path / "a" / "000000.bin")]   # and one given twice
    assert cli.main([*inputs, "--checkpoint", str(nus_ckpt), "--device", "cpu", "--out", str(out),
                     "--no-render"]) == 0
    sizes = {p.name: np.load(p).shape[0] for p in out.glob("*.labels.npy")}
    assert sizes == {"a__000000.labels.npy": 20000, "b__000000.labels.npy": len(pts) - 20000,
                     "a__000000-2.labels.npy": 20000}
    summary = json.loads((out / "summary.json").read_text())
    assert sorted(v["input"] for v in summary.values()) == sorted(inputs)


def _chunks_of(path: Path) -> tuple[list[int], dict[int, int]]:
    """Start of each zstd frame (mcap chunk payload) and messages per chunk number."""
    data = path.read_bytes()
    starts = [i for i in range(len(data) - 4) if data[i:i + 4] == b"\x28\xb5\x2f\xfd"]
    sal = McapSalvage(path, ReadReport())
    sal.close()
    per_chunk: dict[int, int] = {}
    for _, no, _, _ in sal.index:
        per_chunk[no] = per_chunk.get(no, 0) + 1
    return starts, per_chunk


def test_mcap_salvage_reads_the_summary_when_the_first_chunk_is_lost(work, nus_bag, nus_ckpt):
    bag = work / "first_chunk_lost"
    shutil.copytree(nus_bag, bag)
    f = next(bag.glob("*.mcap"))
    starts, per_chunk = _chunks_of(f)
    assert len(per_chunk) >= 2 and sum(per_chunk.values()) == 41
    data = bytearray(f.read_bytes())
    data[starts[0]:starts[0] + 4] = b"\0\0\0\0"    # the chunk holding every channel record
    f.write_bytes(bytes(data))
    with BagReader(bag) as r:
        msgs = list(r.messages())
        rep = r.report
    intact = 41 - per_chunk[0]
    assert len(msgs) == intact > 0
    assert rep.summary_used and rep.unreadable_chunks == 1 and not rep.truncated
    assert rep.missing_messages == per_chunk[0] and rep.corrupt_messages == 0
    assert "1 unreadable chunk" in rep.summary_line()
    # the replay labels every sweep that survived
    out = work / "first_chunk_lost_out"
    rc = _run(bag, out, nus_ckpt, "--no-cameras")
    report = _report(out)
    clouds = sum(1 for m in msgs if m.topic == "/lidar_top/points")
    assert report["frames"]["written"] == clouds and rc == (0 if clouds else 1)
    assert report["bag"]["unreadable_chunks"] == 1 and report["bag"]["summary_used"]


def test_mcap_salvage_damaged_chunk_header_keeps_its_place(work, nus_bag):
    """The first chunk's record length and payload destroyed: the summary's chunk index still
    finds the chunks after it (a front-to-back scan would take the file for cut there)."""
    bag = work / "chunk_header"
    shutil.copytree(nus_bag, bag)
    f = next(bag.glob("*.mcap"))
    starts, per_chunk = _chunks_of(f)
    data = bytearray(f.read_bytes())
    sal = McapSalvage(f, ReadReport())
    sal.close()
    op_at = sal.chunks[0].at
    # record: opcode, length u64, start/end/size u64 ×3, crc u32, "zstd" (u32 + 4), size u64
    payload = op_at + 1 + 8 + 24 + 4 + 8 + 8
    assert data[op_at] == 0x06 and payload == starts[0]
    data[op_at + 1:op_at + 9] = (2**40).to_bytes(8, "little")
    data[payload:payload + 4] = b"\0\0\0\0"
    f.write_bytes(bytes(data))
    with BagReader(bag) as r:
        n = len(list(r.messages()))
        assert r.report.salvaged and r.report.summary_used
        assert r.report.unreadable_chunks == 1 and not r.report.truncated
    assert n == 41 - per_chunk[0] > 0


# --------------------------------------------------------------- one message stops the tool

def _kitti_variant(kitti_bag: Path, dst: Path, *, labels=None, classes=None) -> Path:
    factory = MessageFactory.from_rosbags()

    def change(m):
        if m.topic == LABELS_TOPIC and labels is not None:
            return m.topic, labels(m.msg, factory), m.msgtype
        if m.topic == LABEL_CLASSES_TOPIC and classes is not None:
            return m.topic, factory.typestore.types["std_msgs/msg/String"](data=classes), m.msgtype
        return m.topic, m.msg, m.msgtype
    return _copy_bag(kitti_bag, dst, change)


def test_malformed_ground_truth_is_skipped_counted_and_reported(work, kitti_bag, kitti_ckpt):
    def cut_data(msg, factory):       # 50 labels announced, 3 bytes of data
        msg.data = np.asarray(msg.data)[:3]
        return msg

    def wrong_length(msg, factory):   # a valid cloud of 7 labels for a 50-point scan
        return create_cloud(msg.header, [make_point_field("label", 0, UINT16, 1, factory)],
                            np.zeros((7, 1), np.uint16), msg_factory=factory)

    cases = {"cut": dict(labels=cut_data), "notjson": dict(classes="{not json"),
             "wrong_length": dict(labels=wrong_length)}
    for name, kw in cases.items():
        bag = _kitti_variant(kitti_bag, work / f"gt_{name}", **kw)
        out = work / f"gt_{name}_out"
        assert _run(bag, out, kitti_ckpt) == 0, name         # the frame is still labelled
        report = _report(out)
        assert report["frames"]["written"] == 1 and report["status"] == "ok"
        ev = report["evaluation"]
        assert ev is not None, name                           # never a silent empty evaluation
        if name == "cut":
            assert ev["skipped"] == {"unreadable ground-truth cloud": 1} and ev["frames"] == 0
        elif name == "notjson":
            # no other copy of the class list (the rewritten bag has no custom_data): the
            # labels cannot be named, so the frame is not scored against the model's classes
            assert ev["skipped"] == {"unreadable ground-truth class list": 1,
                                     "no readable class list for the ground truth": 1}
            assert ev["frames"] == 0
        else:
            assert ev["frames"] == 0 and ev["miou"] is None
            (reason, n), = ev["skipped"].items()
            assert reason.startswith("wrong length") and n == 1
            assert "7 labels for 50 points" in ev["skipped_examples"][0]
        assert "ground truth skipped" in replay.format_table(report)


def test_no_frame_written_exits_non_zero_with_a_report(work, kitti_bag, kitti_ckpt, capsys):
    factory = MessageFactory.from_rosbags()

    def no_xyz(m):   # a cloud whose fields are not x, y, z: the pipeline cannot label it
        if m.topic != "/velodyne/points":
            return m.topic, m.msg, m.msgtype
        fields = [make_point_field(n, 4 * i, FLOAT32, 1, factory) for i, n in enumerate("abcd")]
        pts = np.zeros((10, 4), np.float32)
        return m.topic, create_cloud(m.msg.header, fields, pts, msg_factory=factory), m.msgtype

    bag = _copy_bag(kitti_bag, work / "no_xyz", no_xyz)
    out = work / "no_xyz_out"
    assert _run(bag, out, kitti_ckpt) == 1
    err = capsys.readouterr().err
    assert "no labelled frame was written" in err and "Traceback" not in err
    report = _report(out)
    assert report["frames"]["written"] == 0 and report["status"] == "nothing written"
    assert (out / "metadata.yaml").is_file()


def test_disk_full_and_crash_close_the_bag_and_write_the_report(work, nus_bag, nus_ckpt, capsys,
                                                                monkeypatch):
    real_write = BagWriter._write

    def full_after_first(self, conn, stamp, data):
        if sum(self.counts.values()) >= 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(self, conn, stamp, data)

    monkeypatch.setattr(BagWriter, "_write", full_after_first)
    out = work / "full_out"
    assert _run(nus_bag, out, nus_ckpt, "--no-cameras") == 2
    err = capsys.readouterr().err
    assert "disk full" in err and len(err.strip().splitlines()) == 1 and "report:" in err
    report = _report(out)
    assert report["status"] == "error" and "disk full" in report["error"]
    assert report["frames"]["written"] == 1
    with BagReader(out) as r:   # closed properly: metadata.yaml, readable, the frame inside
        assert r.message_counts == {OUT_TOPIC: 1} and not r.report.salvaged
    monkeypatch.undo()

    # the close itself fails (the summary cannot be written): said in one line, report kept
    from rosbags.rosbag2 import Writer

    def close_fails(self):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Writer, "close", close_fails)
    out = work / "full_close_out"
    assert _run(nus_bag, out, nus_ckpt, "--no-cameras") == 2
    err = capsys.readouterr().err
    assert "could not be finished" in err and "disk full" in err
    assert _report(out)["output_bag_complete"] is False
    monkeypatch.undo()

    # a bug in the middle of the run: exit 3, one line, traceback in the report, bag closed
    from clip2scene_ros.pipeline import SegmentationPipeline

    calls = {"n": 0}
    real = SegmentationPipeline.process_frame

    def boom(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("simulated bug")
        return real(self, *a, **k)

    monkeypatch.setattr(SegmentationPipeline, "process_frame", boom)
    out = work / "crash_out"
    assert _run(nus_bag, out, nus_ckpt, "--no-cameras") == 3
    err = capsys.readouterr().err
    assert "simulated bug" in err and len(err.strip().splitlines()) == 1
    report = _report(out)
    assert "RuntimeError" in report["traceback"] and report["frames"]["written"] == 1
    with BagReader(out) as r:
        assert r.message_counts == {OUT_TOPIC: 1} and not r.report.damaged


def test_sigterm_mid_run_closes_the_bag_and_writes_the_report(work, nus_bag, nus_ckpt, capsys,
                                                                monkeypatch):
    import os
    import signal

    from clip2scene_ros.pipeline import SegmentationPipeline

    calls = {"n": 0}
    real = SegmentationPipeline.process_frame

    def terminate_on_second(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(self, *a, **k)

    monkeypatch.setattr(SegmentationPipeline, "process_frame", terminate_on_second)
    before = signal.getsignal(signal.SIGTERM)
    out = work / "term_out"
    assert _run(nus_bag, out, nus_ckpt, "--no-cameras") == 143
    assert "terminated (SIGTERM)" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM) is before
    assert _report(out)["status"] == "error"
    with BagReader(out) as r:
        assert not r.report.salvaged and r.message_counts.get(OUT_TOPIC, 0) <= 2


# ------------------------------------------------------------- unclear errors, false alarms

def test_healthy_bag_without_cameras_or_with_extra_topics_is_not_damaged(work, nus_bag, nus_ckpt,
                                                                        capsys):
    out = work / "nocam_out"
    assert replay.main([str(nus_bag), "--out", str(out), "--checkpoint", str(nus_ckpt),
                        "--device", "cpu", "--no-progress", "--no-cameras"]) == 0
    text = capsys.readouterr().out
    assert "bag damage" not in text
    b = _report(out)["bag"]
    assert not b["damaged"] and b["missing_messages"] == 0
    assert b["messages_on_other_topics"] == 24          # 12 images + 12 CameraInfo, not read
    factory = MessageFactory.from_rosbags()
    chatter = [("/chatter", factory.typestore.types["std_msgs/msg/String"](data=f"{i}"),
                "std_msgs/msg/String", 1_535_639_716_654_799_000 + i) for i in range(5)]
    extra = _copy_bag(nus_bag, work / "extra_topics", extra=chatter)
    out = work / "extra_out"
    assert replay.main([str(extra), "--out", str(out), "--checkpoint", str(nus_ckpt), "--device",
                        "cpu", "--no-progress"]) == 0
    assert "bag damage" not in capsys.readouterr().out
    assert not _report(out)["bag"]["damaged"]


def test_bag_cut_at_ten_percent_says_damaged_and_writes_the_report(work, nus_bag, nus_ckpt, capsys):
    cut = work / "cut10"
    shutil.copytree(nus_bag, cut)
    f = next(cut.glob("*.mcap"))
    with open(f, "r+b") as fh:
        fh.truncate(int(f.stat().st_size * 0.10))
    out = work / "cut10_out"
    assert _run(cut, out, nus_ckpt) == 2
    err = capsys.readouterr().err
    assert "damaged" in err and "truncated" in err and "/lidar_top/points" in err
    assert "pass --lidar-topic" not in err and len(err.strip().splitlines()) == 1
    report = _report(out)
    assert report["status"] == "error" and report["bag"]["truncated"]
    assert report["bag"]["lost_topics"]["/lidar_top/points"] == 2


def test_discovery_error_on_a_healthy_bag_still_writes_the_report(work, nus_bag, nus_ckpt, capsys):
    out = work / "wrong_topic_out"
    assert _run(nus_bag, out, nus_ckpt, "--lidar-topic", "/nope") == 2
    assert "/nope" in capsys.readouterr().err
    assert _report(out)["status"] == "error"


def test_bad_numbers_and_files_are_one_line(work, kitti_bag, nus_ckpt, tmp_path, capsys):
    for flag, bad in (("--tf-tolerance", "nan"), ("--tf-tolerance", "inf"), ("--tf-tolerance", "-1"),
                      ("--max-frames", "0")):
        assert _run(kitti_bag, work / "tol", nus_ckpt, flag, bad) == 2
        err = capsys.readouterr().err
        assert flag in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (work / "tol").exists() and not (work / "tol_report").exists()
    with pytest.raises(ConfigError):
        replay.Replay(replay.ReplayOptions(bag=kitti_bag, out=work / "tol", tf_tolerance_s=float("nan"),
                                           config=replay.NodeConfig(checkpoint=str(nus_ckpt))))

    from clip2scene_core import cli

    scan = tmp_path / "s.bin"
    np.zeros((10, 4), np.float32).tofile(scan)
    for fields in ("", ",", "intensity,x,y,z", "x,y,z,x"):
        assert cli.main([str(scan), "--checkpoint", str(nus_ckpt), "--fields", fields,
                         "--out", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err
        assert "--fields" in err and "Traceback" not in err
    obj = tmp_path / "obj.npy"
    np.save(obj, np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    assert cli.main([str(obj), "--checkpoint", str(nus_ckpt), "--device", "cpu",
                     "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert "not a plain numeric .npy array" in err and "Traceback" not in err
    a_file = tmp_path / "file_out"
    a_file.write_text("x")
    assert cli.main([str(scan), "--checkpoint", str(nus_ckpt), "--out", str(a_file)]) == 2
    assert "is a file" in capsys.readouterr().err and a_file.read_text() == "x"


def test_pipeline_warnings_reach_the_report(work, nus_bag, nus_ckpt):
    factory = MessageFactory.from_rosbags()

    def xyz_only(m):
        if m.topic != "/lidar_top/points":
            return m.topic, m.msg, m.msgtype
        pts = read_points(m.msg, ["x", "y", "z"])
        arr = np.stack([pts["x"], pts["y"], pts["z"]], axis=1).astype(np.float32)
        fields = [make_point_field(n, 4 * i, FLOAT32, 1, factory) for i, n in enumerate("xyz")]
        return m.topic, create_cloud(m.msg.header, fields, arr, msg_factory=factory), m.msgtype

    bag = _copy_bag(nus_bag, work / "no_intensity", xyz_only)
    out = work / "no_intensity_out"
    assert _run(bag, out, nus_ckpt, "--no-cameras") == 0
    report = _report(out)
    hits = {k: v for k, v in report["warnings"].items() if "intensity" in k}
    assert list(hits.values()) == [2]
    assert "warning ×2" in replay.format_table(report)


def test_info_pickles_are_opt_in(tmp_path, data_dir, capsys):
    from clip2scene_core.datasets import NuScenesInfoReader, ScanNetReader

    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    crafted = tmp_path / "infos.pkl"
    crafted.write_bytes(pickle.dumps({"data_list": [Payload()]}))
    root = data_dir / LIDARSEG
    assert nuscenes_to_bag.main(["--info", str(crafted), "--root", str(root),
                                 "--out", str(tmp_path / "o"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "--trust-pickle" in err and "runs the code" in err and len(err.strip().splitlines()) == 1
    with pytest.raises(ConfigError, match="trust_pickle=True"):
        NuScenesInfoReader(crafted, root)
    with pytest.raises(ConfigError, match="trust_pickle=True"):
        ScanNetReader(data_dir / "scannet/mmdet3d_pr748_multiview", posed_images=crafted)
    assert not marker.exists() and not (tmp_path / "o").exists()
    # the flag is what makes it read: the real info file then converts
    assert nuscenes_to_bag.main(["--info", str(root / "nus_info.pkl"), "--trust-pickle",
                                 "--root", str(root), "--out", str(tmp_path / "ok"), "--quiet"]) == 0
    assert isinstance(ConfigError("x"), Clip2SceneError)
