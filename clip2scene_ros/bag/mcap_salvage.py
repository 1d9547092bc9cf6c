"""Salvage of damaged mcap files: what survived a missing footer, bad chunks or a cut file.

Records are parsed by the ``mcap`` library's StreamReader (through ``mcap_records``), one
record range at a time from the open file, never the whole file in memory. The policy is
here: trust the summary's chunk index when the footer and summary are sound (a chunk whose
header is damaged then costs that chunk only), otherwise walk the records front to back,
skip what does not parse, and keep the complete messages of a chunk the file is cut in.

First pass: decode every readable chunk once to learn schemas, channels and the
(log time, chunk, position) of every message. Second pass (:meth:`McapSalvage.messages`):
yield in time order, re-reading chunks on demand through a small cache.
"""
from __future__ import annotations

import os
from collections import OrderedDict, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from mcap.data_stream import ReadDataStream
from mcap.opcode import Opcode
from mcap.records import Channel, Chunk, ChunkIndex, DataEnd, Footer, McapRecord, Message, Schema, Statistics

from ..typestore import normalize_msgtype, typestore_from_defs
from .mcap_records import (FOOTER_LEN, PARSE_ERRORS, RECORD_HEAD, Unparsed, chunk_records, decompress,
                           decompress_prefix, read_records, walk, why)
from .types import MCAP_MAGIC, BagError, ReadReport, TopicInfo

_CACHED_CHUNKS = 4


@dataclass
class ChunkRef:
    """Where a readable chunk record lies in the file (``length`` -1: the cut last chunk)."""

    at: int
    length: int


class McapSalvage:
    """Record scan of one mcap file; survives a missing footer, bad chunks and a cut file."""

    def __init__(self, path: Path, report: ReadReport) -> None:
        self.path = path
        self.report = report
        self.schemas: dict[int, tuple[str, str, str]] = {}   # id → (type, encoding, text)
        self.channels: dict[int, tuple[str, int]] = {}       # id → (topic, schema id)
        self.chunks: list[ChunkRef] = []
        #: (log time, chunk no (-1: a message record outside chunks), position, channel id);
        #: position: the message's number within its chunk, or its record's file offset
        self.index: list[tuple[int, int, int, int]] = []
        self.expected_by_topic: dict[str, int] | None = None
        self.custom_data: dict[str, str] = {}
        self._cache: OrderedDict[int, list[Message]] = OrderedDict()
        self._partial: dict[int, list[Message]] = {}
        self._fh: IO[bytes] = open(path, "rb")   # closed by close()
        try:
            self._size = os.fstat(self._fh.fileno()).st_size
            if self._fh.read(len(MCAP_MAGIC)) != MCAP_MAGIC:
                raise BagError(f"{path}: not an mcap file (bad magic)")
            self._scan()
        except BaseException:
            self._fh.close()
            raise
        self.topics: dict[str, TopicInfo] = {}
        for topic, sid in self.channels.values():
            name, enc, text = self.schemas.get(sid, ("", "", ""))
            self.topics.setdefault(topic, TopicInfo(topic, name, 0, enc, text))
        for _, _, _, cid in self.index:
            if cid in self.channels:
                self.topics[self.channels[cid][0]].count += 1
        defs = {t.msgtype: (t.encoding, t.definition) for t in self.topics.values()}
        self.typestore = typestore_from_defs(defs, ros1=False)

    # -- first pass -------------------------------------------------------------------------
    def _scan(self) -> None:
        chunk_index = self._read_summary()
        if chunk_index:
            # the summary says where every chunk starts: a chunk whose record header is
            # damaged costs that chunk only, the scan never loses its place
            for at, length in chunk_index:
                self._scan_indexed_chunk(at, length)
        else:
            self._linear_scan()
        self.index.sort()
        orphans = sum(1 for *_, cid in self.index if cid not in self.channels)
        if orphans:
            self.report.orphan_messages += orphans
            self.report.note(f"{orphans} message(s) belong to channels whose definition was in an "
                             "unreadable part of the file")

    def _meta(self, record: McapRecord) -> None:
        if isinstance(record, Schema):
            self.schemas[record.id] = (normalize_msgtype(record.name), record.encoding,
                                       record.data.decode("utf8", "replace"))
        elif isinstance(record, Channel):
            self.channels[record.id] = (record.topic, record.schema_id)

    def _read_summary(self) -> list[tuple[int, int]]:
        """Schemas, channels, per-channel message counts and the chunk index from the summary
        section at the end of the file (present when the recording was closed properly).

        Returns the (offset, record length) of every chunk the summary lists; empty without
        a usable summary (cut file, damaged footer): the records are then scanned in order.
        """
        size, fh = self._size, self._fh
        footer_at = size - len(MCAP_MAGIC) - FOOTER_LEN
        if footer_at < len(MCAP_MAGIC):
            return []
        fh.seek(size - len(MCAP_MAGIC))
        if fh.read(len(MCAP_MAGIC)) != MCAP_MAGIC:
            return []
        try:
            fh.seek(footer_at)
            _, footer = next(read_records(fh, size - len(MCAP_MAGIC)))
            if not isinstance(footer, Footer):
                raise ValueError("not a footer record")
        except (*PARSE_ERRORS, StopIteration):   # the footer is unusable
            self.report.note("mcap footer is damaged: summary not used")
            return []
        start = footer.summary_start
        if not start:
            return []
        if not len(MCAP_MAGIC) <= start <= footer_at:
            self.report.note("mcap footer points outside the file: summary not used")
            return []
        chunks: list[tuple[int, int]] = []
        counts: dict[int, int] = {}
        for at, record in walk(fh, start, footer_at):
            if isinstance(record, Unparsed):
                # a lost chunk index entry would hide its chunk: scan the records instead;
                # a bad schema / channel / statistics record costs only itself
                if record.cut or record.op == Opcode.CHUNK_INDEX:
                    self.schemas, self.channels = {}, {}
                    self.report.note(f"mcap summary section is damaged (record 0x{record.op & 0xFF:02x} "
                                     f"at byte {at}: {record.why}): scanning the records instead")
                    return []
                self.report.note(f"unreadable mcap summary record 0x{record.op:02x} at byte {at}: {record.why}")
            elif isinstance(record, ChunkIndex):
                chunks.append((record.chunk_start_offset, record.chunk_length))
            elif isinstance(record, Statistics):
                counts = dict(record.channel_message_counts)
            else:
                self._meta(record)
        self.report.summary_used = True
        if counts:
            self.expected_by_topic = defaultdict(int)
            for cid, count in counts.items():
                if cid in self.channels:
                    self.expected_by_topic[self.channels[cid][0]] += count
        return sorted(chunks)

    def _scan_indexed_chunk(self, at: int, length: int) -> None:
        """The chunk the summary's chunk index places at ``at``: its record must be exactly there."""
        chunk: McapRecord | None = None
        if length > RECORD_HEAD and at + length <= self._size:
            try:
                self._fh.seek(at)
                _, chunk = next(read_records(self._fh, at + length, chunks=True))
                if self._fh.tell() != at + length:
                    chunk = None
            except (*PARSE_ERRORS, StopIteration):   # the record header is damaged
                chunk = None
        if not isinstance(chunk, Chunk):
            self.report.unreadable_chunks += 1
            self.report.note(f"mcap chunk at byte {at} (from the summary's chunk index) "
                             "has a damaged record header")
            return
        self._add_chunk(at, length, chunk)

    def _linear_scan(self) -> None:
        """Every record front to back; a malformed one is skipped, a cut one ends the scan."""
        for at, record in walk(self._fh, len(MCAP_MAGIC), self._size, chunks=True):
            if isinstance(record, Chunk):
                self._add_chunk(at, self._fh.tell() - at, record)
            elif isinstance(record, Message):
                self.index.append((record.log_time, -1, at, record.channel_id))
            elif isinstance(record, (DataEnd, Footer)):
                return
            elif isinstance(record, Unparsed):
                self._unparsed(at, record)
            else:
                self._meta(record)

    def _unparsed(self, at: int, record: Unparsed) -> None:
        if record.op < 0:
            self.report.truncated = True
            self.report.note(f"mcap file is cut: {record.length} stray bytes at the end")
        elif record.cut:
            self.report.truncated = True
            self.report.note(f"mcap file is cut inside record 0x{record.op:02x} at byte {at} ({record.why})")
            if record.op == Opcode.CHUNK:
                self._scan_cut_chunk(at)
        elif record.op == Opcode.CHUNK:
            self.report.unreadable_chunks += 1
            self.report.note(f"unreadable mcap chunk at byte {at + RECORD_HEAD}: {record.why}")
        else:
            self.report.note(f"unreadable mcap record 0x{record.op:02x} at byte {at}: {record.why}")

    def _add_chunk(self, at: int, length: int, chunk: Chunk) -> None:
        try:
            raw = decompress(chunk)
        except Exception as exc:  # noqa: BLE001 - corrupt chunk: skip it, keep going
            self.report.unreadable_chunks += 1
            self.report.note(f"unreadable mcap chunk at byte {at + RECORD_HEAD}: {why(exc)}")
            return
        records, stopped = chunk_records(raw)
        self._index_chunk(ChunkRef(at, length), records)
        if stopped:
            self.report.unreadable_chunks += 1
            self.report.note(f"mcap chunk at byte {at + RECORD_HEAD} is malformed inside: {stopped}")

    def _scan_cut_chunk(self, at: int) -> None:
        """The chunk the file ends in: decode what arrived (zstd / lz4 stream, or plain) and
        keep its complete messages; the rest of it counts as one unreadable chunk."""
        self.report.unreadable_chunks += 1
        try:
            self._fh.seek(at + RECORD_HEAD)
            # a plain (not exact) stream: the chunk's data field comes back as far as it arrived
            raw = decompress_prefix(Chunk.read(ReadDataStream(self._fh)))
        except Exception as exc:  # noqa: BLE001 - nothing to salvage from this chunk
            self.report.note(f"cut mcap chunk at byte {at + RECORD_HEAD} not decodable: {why(exc)}")
            return
        if raw is None:
            return
        records, _ = chunk_records(raw)
        no = self._index_chunk(ChunkRef(at, -1), records)
        self._partial[no] = [r for r in records if isinstance(r, Message)]
        self.report.note(f"recovered {len(self._partial[no])} messages from the cut chunk")

    def _index_chunk(self, ref: ChunkRef, records: list[McapRecord]) -> int:
        no = len(self.chunks)
        self.chunks.append(ref)
        k = 0
        for record in records:
            if isinstance(record, Message):
                self.index.append((record.log_time, no, k, record.channel_id))
                k += 1
            else:
                self._meta(record)
        return no

    # -- second pass ------------------------------------------------------------------------
    def _chunk_messages(self, no: int) -> list[Message]:
        if no in self._partial:
            return self._partial[no]
        if no in self._cache:
            self._cache.move_to_end(no)
            return self._cache[no]
        ref = self.chunks[no]
        self._fh.seek(ref.at)
        _, chunk = next(read_records(self._fh, ref.at + ref.length, chunks=True))
        if not isinstance(chunk, Chunk):
            raise BagError(f"{self.path}: the chunk at byte {ref.at} changed while reading")
        records, _ = chunk_records(decompress(chunk))
        messages = [r for r in records if isinstance(r, Message)]
        self._cache[no] = messages
        if len(self._cache) > _CACHED_CHUNKS:
            self._cache.popitem(last=False)
        return messages

    def _message(self, no: int, position: int) -> Message:
        if no >= 0:
            return self._chunk_messages(no)[position]
        self._fh.seek(position)
        _, record = next(read_records(self._fh, self._size))
        if not isinstance(record, Message):
            raise BagError(f"{self.path}: the message at byte {position} changed while reading")
        return record

    def messages(self, topics: set[str]) -> Iterator[tuple[str, str, int, bytes]]:
        """(topic, type, log time, raw bytes) of ``topics`` in log-time order."""
        for t, no, position, cid in self.index:
            if cid not in self.channels:
                continue
            topic, _ = self.channels[cid]
            if topic not in topics:
                continue
            yield topic, self.topics[topic].msgtype, t, bytes(self._message(no, position).data)

    def close(self) -> None:
        self._cache.clear()
        self._partial.clear()
        self._fh.close()

