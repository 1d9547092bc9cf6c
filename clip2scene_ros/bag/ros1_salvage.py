"""Salvage of damaged ROS 1 bags: a record scan that needs no index (a cut bag has none).

rosbags' rosbag1 reader starts from the index at the end of the file, which a bag cut by a
crash or a failed copy is missing. This scan walks the records from the front, reading one
record header or one chunk at a time from the file, and keeps every complete message.
"""
from __future__ import annotations

import bz2
import io
import os
import struct
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from ..typestore import normalize_msgtype, typestore_from_defs
from .types import ROS1_MAGIC, BagError, ReadReport, TopicInfo

_OP_MESSAGE, _OP_CHUNK, _OP_CONNECTION = 0x02, 0x05, 0x07
_CACHED_CHUNKS = 4


def _u32(b: bytes, o: int = 0) -> int:
    return struct.unpack_from("<I", b, o)[0]


def _header_fields(buf: bytes) -> dict[str, bytes]:
    """``name=value`` fields of a ROS 1 record header, each prefixed by its u32 length."""
    fields = {}
    o = 0
    while o + 4 <= len(buf):
        ln = _u32(buf, o)
        item = buf[o + 4:o + 4 + ln]
        o += 4 + ln
        key, _, val = item.partition(b"=")
        fields[key.decode("ascii", "replace")] = val
    return fields


def _records(fh: IO[bytes], pos: int, end: int) -> Iterator[tuple[dict[str, bytes], int, int]]:
    """(header fields, data offset, data length) of the records in ``fh[pos:end]``; EOFError
    at a record that runs past ``end``. The caller may seek ``fh`` between items."""
    while pos < end:
        fh.seek(pos)
        head = fh.read(4)
        if len(head) < 4:
            raise EOFError("cut inside a record header length")
        hlen = _u32(head)
        if pos + 4 + hlen + 4 > end:
            raise EOFError(f"record header at byte {pos} is cut")
        header = _header_fields(fh.read(hlen))
        dlen = _u32(fh.read(4))
        dpos = pos + 4 + hlen + 4
        if dpos + dlen > end:
            raise EOFError(f"record data at byte {dpos - 4} is cut")
        yield header, dpos, dlen
        pos = dpos + dlen


def _decompress(data: bytes, compression: str) -> bytes:
    if compression in ("", "none"):
        return data
    if compression == "bz2":
        return bz2.decompress(data)
    if compression == "lz4":
        import lz4.frame

        return lz4.frame.decompress(data)
    raise ValueError(f"unsupported compression {compression!r}")


def _op(header: dict[str, bytes]) -> int:
    return (header.get("op") or b"\x00")[0]


def _stamp_ns(header: dict[str, bytes]) -> int:
    t = header["time"]
    return _u32(t, 0) * 1_000_000_000 + _u32(t, 4)


class Ros1Salvage:
    """Sequential scan of one ROS 1 bag's records; messages come back in time order."""

    ros1 = True

    def __init__(self, path: Path, report: ReadReport) -> None:
        self.path = path
        self.report = report
        self.conns: dict[int, TopicInfo] = {}
        #: (time, seq, chunk no (-1: a message record outside chunks), data offset, connection)
        self.msgs: list[tuple[int, int, int, int, int]] = []
        self.chunks: list[tuple[int, int, str]] = []  # (data offset, size, compression)
        self.custom_data: dict[str, str] = {}
        self._cache: OrderedDict[int, bytes] = OrderedDict()
        self._fh: IO[bytes] = open(path, "rb")   # closed by close()
        try:
            self._size = os.fstat(self._fh.fileno()).st_size
            if self._fh.read(len(ROS1_MAGIC)) != ROS1_MAGIC:
                raise BagError(f"{path}: not a ROS 1 bag (bad magic)")
            self._scan()
        except BaseException:
            self._fh.close()
            raise
        self.topics: dict[str, TopicInfo] = {}
        for c in self.conns.values():
            self.topics.setdefault(c.name, TopicInfo(c.name, c.msgtype, 0, c.encoding, c.definition))
        for *_, cid in self.msgs:
            if cid in self.conns:
                self.topics[self.conns[cid].name].count += 1
        defs = {t.msgtype: ("ros1msg", t.definition) for t in self.topics.values()}
        self.typestore = typestore_from_defs(defs, ros1=True)

    def _read(self, offset: int, length: int) -> bytes:
        self._fh.seek(offset)
        return self._fh.read(length)

    def _conn(self, header: dict[str, bytes], data: bytes) -> None:
        cid = _u32(header["conn"])
        if cid in self.conns:
            return
        fields = _header_fields(data)
        self.conns[cid] = TopicInfo(header.get("topic", b"").decode(),
                                    normalize_msgtype(fields.get("type", b"").decode()), 0, "ros1msg",
                                    fields.get("message_definition", b"").decode("utf8", "replace"))

    def _scan(self) -> None:
        seq = 0
        try:
            for header, o, n in _records(self._fh, len(ROS1_MAGIC), self._size):
                op = _op(header)
                if op == _OP_CONNECTION:
                    self._conn(header, self._read(o, n))
                elif op == _OP_MESSAGE:
                    self.msgs.append((_stamp_ns(header), seq, -1, o, _u32(header["conn"])))
                    seq += 1
                elif op == _OP_CHUNK:
                    seq = self._scan_chunk(header, o, n, seq)
        except EOFError as exc:
            self.report.truncated = True
            self.report.unreadable_chunks += 1
            self.report.note(f"ROS 1 bag is cut: {exc}")
        self.msgs.sort()

    def _scan_chunk(self, header: dict[str, bytes], o: int, n: int, seq: int) -> int:
        comp = header.get("compression", b"none").decode()
        try:
            raw = _decompress(self._read(o, n), comp)
        except Exception as exc:  # noqa: BLE001 - corrupt chunk: skip it, keep going
            self.report.unreadable_chunks += 1
            self.report.note(f"unreadable ROS 1 chunk at byte {o}: {exc}")
            return seq
        no = len(self.chunks)
        self.chunks.append((o, n, comp))
        try:
            for h2, o2, n2 in _records(io.BytesIO(raw), 0, len(raw)):
                op2 = _op(h2)
                if op2 == _OP_CONNECTION:
                    self._conn(h2, raw[o2:o2 + n2])
                elif op2 == _OP_MESSAGE:
                    self.msgs.append((_stamp_ns(h2), seq, no, o2, _u32(h2["conn"])))
                    seq += 1
        except (EOFError, KeyError, struct.error) as exc:
            self.report.unreadable_chunks += 1
            self.report.note(f"ROS 1 chunk at byte {o} is malformed inside: {exc}")
        return seq

    def _chunk(self, no: int) -> bytes:
        if no not in self._cache:
            o, n, comp = self.chunks[no]
            self._cache[no] = _decompress(self._read(o, n), comp)
            if len(self._cache) > _CACHED_CHUNKS:
                self._cache.popitem(last=False)
        return self._cache[no]

    def messages(self, topics: set[str]) -> Iterator[tuple[str, str, int, bytes]]:
        """(topic, type, time, raw ROS 1 bytes) of ``topics`` in time order."""
        for t, _, no, off, cid in self.msgs:
            c = self.conns.get(cid)
            if c is None or c.name not in topics:
                continue
            if no < 0:
                data = self._read(off, _u32(self._read(off - 4, 4)))
            else:
                buf = self._chunk(no)
                data = bytes(buf[off:off + _u32(buf, off - 4)])
            yield c.name, c.msgtype, t, data

    def close(self) -> None:
        self._cache.clear()
        self._fh.close()
