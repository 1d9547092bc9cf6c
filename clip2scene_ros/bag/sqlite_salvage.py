"""Salvage of damaged rosbag2 sqlite3 files: every row that can still be read.

sqlite refuses a cut file outright ("malformed") and stops a table scan at the first bad
page; here a cut file is opened through a zero-padded copy and rows are probed one by one
when the scan fails, so only the rows on damaged pages are lost (and counted).
"""
from __future__ import annotations

import shutil
import sqlite3
import struct
import tempfile
from collections.abc import Iterator
from pathlib import Path

from ..typestore import normalize_msgtype, typestore_from_defs
from .types import SQLITE_MAGIC, BagError, ReadReport, TopicInfo


class SqliteSalvage:
    """Row-by-row read of a rosbag2 sqlite3 file; a row on a damaged page is counted, skipped."""

    def __init__(self, path: Path, report: ReadReport) -> None:
        self.path = path
        self.report = report
        self._tmp: tempfile.TemporaryDirectory | None = None
        path = self._padded(path)
        try:
            self.db = sqlite3.connect(f"file:{path}?immutable=1&mode=ro", uri=True)
            rows = self.db.execute("SELECT id, name, type FROM topics").fetchall()
        except sqlite3.Error as exc:
            raise BagError(f"{path}: sqlite file unreadable: {exc}") from exc
        self.topic_by_id = {int(i): (name, normalize_msgtype(typ)) for i, name, typ in rows}
        defs: dict[str, tuple[str, str]] = {}
        try:
            for typ, enc, text in self.db.execute(
                    "SELECT topic_type, encoding, encoded_message_definition FROM message_definitions"):
                defs[normalize_msgtype(typ)] = (enc, text)
        except sqlite3.Error:
            pass
        self.typestore = typestore_from_defs(defs, ros1=False)
        self.index = self._index()
        self.topics: dict[str, TopicInfo] = {}
        for name, typ in self.topic_by_id.values():
            self.topics.setdefault(name, TopicInfo(name, typ))
        for _, _, tid in self.index:
            if tid in self.topic_by_id:
                self.topics[self.topic_by_id[tid][0]].count += 1
        self.custom_data: dict[str, str] = {}

    def _padded(self, path: Path) -> Path:
        """A cut sqlite file is refused outright ("malformed"); a zero-padded copy to the
        page count its header announces opens, and only rows on the missing pages fail."""
        with path.open("rb") as fh:
            head = fh.read(100)
        if len(head) < 100 or not head.startswith(SQLITE_MAGIC):
            raise BagError(f"{path}: not an sqlite3 file")
        page = struct.unpack(">H", head[16:18])[0]
        page = 65536 if page == 1 else page
        want = page * struct.unpack(">I", head[28:32])[0]
        size = path.stat().st_size
        if size >= want and size % page == 0:
            return path
        self.report.truncated = True
        self.report.note(f"sqlite file is cut: {size} of {want} bytes")
        self._tmp = tempfile.TemporaryDirectory(prefix="clip2scene_bag_")
        copy = Path(self._tmp.name) / path.name
        shutil.copyfile(path, copy)
        with copy.open("r+b") as fh:
            fh.truncate(max(want, (size // page + 1) * page))
        return copy

    def _index(self) -> list[tuple[int, int, int]]:
        """(timestamp, row id, topic id) of every row whose header can be read."""
        try:
            rows = self.db.execute("SELECT timestamp, id, topic_id FROM messages").fetchall()
            return sorted((int(t), int(i), int(tid)) for t, i, tid in rows)
        except sqlite3.Error as exc:
            self.report.note(f"sqlite table scan failed ({exc}); probing rows one by one")
        bound = 0
        for q in ("SELECT max(id) FROM messages", "SELECT count(*) FROM messages"):
            try:
                bound = int(self.db.execute(q).fetchone()[0] or 0)
                break
            except sqlite3.Error:
                continue
        out: list[tuple[int, int, int]] = []
        failed: list[int] = []
        misses = 0
        i = 0
        while (i < bound) if bound else (misses <= 1000):
            i += 1
            try:
                row = self.db.execute("SELECT timestamp, topic_id FROM messages WHERE id=?", (i,)).fetchone()
            except sqlite3.Error:
                failed.append(i)
                misses += 1
                continue
            if row is None:
                misses += 1
                continue
            misses = 0
            out.append((int(row[0]), i, int(row[1])))
        if not bound:  # without a bound, failures after the last good row may be past the end
            last = out[-1][1] if out else 0
            failed = [f for f in failed if f < last]
        self.report.unreadable_rows += len(failed)
        return sorted(out)

    def messages(self, topics: set[str]) -> Iterator[tuple[str, str, int, bytes]]:
        for t, rowid, tid in self.index:
            name, typ = self.topic_by_id.get(tid, ("", ""))
            if name not in topics:
                continue
            try:
                row = self.db.execute("SELECT data FROM messages WHERE id=?", (rowid,)).fetchone()
            except sqlite3.Error as exc:
                self.report.unreadable_rows += 1
                self.report.note(f"sqlite row {rowid} ({name}) unreadable: {exc}")
                continue
            if row is None:
                continue
            yield name, typ, t, bytes(row[0])

    def close(self) -> None:
        self.db.close()
        if self._tmp is not None:
            self._tmp.cleanup()
