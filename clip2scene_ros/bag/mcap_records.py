"""Record access for mcap salvage, on the ``mcap`` library's StreamReader.

The library parses records; what it cannot do for a damaged file is here: read an exact
byte range (so a cut record ends the walk instead of coming back short), go on after a
record that does not parse, and decode the part of a cut-off chunk that arrived.
"""
from __future__ import annotations

import io
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO

from mcap.exceptions import EndOfFile, McapError
from mcap.records import Chunk, McapRecord
from mcap.stream_reader import StreamReader

FOOTER_LEN = 9 + 20          # opcode, length, summary start, summary offset start, crc
RECORD_HEAD = 9              # opcode u8 + length u64
#: what the library raises on bytes that are not a valid record (EndOfFile at a cut is an McapError)
PARSE_ERRORS: tuple[type[Exception], ...] = (McapError, ValueError, struct.error)


class ExactReader:
    """``read(n)`` that gives exactly ``n`` bytes before ``end`` or none at all, so a record cut
    short (or a negative / oversized length) ends in mcap's ``EndOfFile`` instead of a short
    record the library would hand back as if it were whole."""

    def __init__(self, fh: IO[bytes], end: int) -> None:
        self._fh = fh
        self._end = end

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0 or self._fh.tell() + n > self._end:
            return b""
        data = self._fh.read(n)
        return data if len(data) == n else b""


def read_records(fh: IO[bytes], end: int, *, chunks: bool = False
                 ) -> Iterator[tuple[int, McapRecord]]:
    """(start offset, record) of the whole records from ``fh``'s position up to ``end``.

    Raises mcap's ``EndOfFile`` at ``end`` (also when the range ends cleanly: callers compare
    ``fh.tell()`` with ``end``) and the library's parse errors on a malformed record. With
    ``chunks`` a Chunk record comes back as it is, undecoded.
    """
    start = fh.tell()
    reader = StreamReader(ExactReader(fh, end), skip_magic=True, emit_chunks=chunks,
                          record_size_limit=max(end - start, 0))
    for record in reader.records:
        yield start, record
        start = fh.tell()


@dataclass
class Unparsed:
    """A record whose bytes are all there but do not parse, or (``cut``) one that runs past
    the end of the range (``op`` -1: fewer bytes left than a record header)."""

    op: int
    length: int
    why: str
    cut: bool


def walk(fh: IO[bytes], pos: int, end: int, *, chunks: bool = False
         ) -> Iterator[tuple[int, McapRecord | Unparsed]]:
    """(start offset, record) of every record in ``fh[pos:end]``, in file order.

    The library stops at the first record it cannot parse; the walk reports that record as
    :class:`Unparsed` and goes on after it (its length field still says where the next one
    starts), until the range ends or a record is cut. The caller must not move ``fh``
    between items.
    """
    while pos < end:
        fh.seek(pos)
        try:
            for at, record in read_records(fh, end, chunks=chunks):
                pos = fh.tell()
                yield at, record
            return
        except PARSE_ERRORS as exc:
            fh.seek(pos)
            head = fh.read(min(RECORD_HEAD, end - pos))
            if len(head) < RECORD_HEAD:
                if head:
                    yield pos, Unparsed(-1, len(head), "a cut record header", cut=True)
                return
            op, length = head[0], int.from_bytes(head[1:], "little")
            if length > end - pos - RECORD_HEAD:
                yield pos, Unparsed(op, length, f"{end - pos - RECORD_HEAD} of {length} bytes", cut=True)
                return
            yield pos, Unparsed(op, length, why(exc), cut=False)
            pos += RECORD_HEAD + length


def chunk_records(raw: bytes) -> tuple[list[McapRecord], str]:
    """The records of a decompressed chunk up to the first one that is cut or malformed, and
    what stopped the walk ("" when the chunk was read to its end)."""
    buf = io.BytesIO(raw)
    out: list[McapRecord] = []
    end = 0
    try:
        for _, record in read_records(buf, len(raw)):
            out.append(record)
            end = buf.tell()
    except EndOfFile:
        if end != len(raw):
            return out, f"record at byte {end} is cut ({len(raw) - end} bytes left)"
    except PARSE_ERRORS as exc:
        return out, f"record at byte {end} does not parse: {why(exc)}"
    return out, ""


def decompress(chunk: Chunk) -> bytes:
    """A whole chunk's records, checked against the size its header announces."""
    if chunk.compression in ("", "none"):
        raw = chunk.data
    elif chunk.compression == "zstd":
        import zstandard

        raw = zstandard.ZstdDecompressor().decompress(chunk.data, max_output_size=chunk.uncompressed_size)
    elif chunk.compression == "lz4":
        import lz4.frame

        raw = lz4.frame.decompress(chunk.data)
    else:
        raise ValueError(f"unsupported compression {chunk.compression!r}")
    if len(raw) != chunk.uncompressed_size:
        raise ValueError(f"chunk decompressed to {len(raw)} bytes, header says {chunk.uncompressed_size}")
    return raw


def decompress_prefix(chunk: Chunk) -> bytes | None:
    """As much of a cut chunk's records as its arrived bytes decode to (None: not decodable)."""
    if chunk.compression in ("", "none"):
        return chunk.data
    if chunk.compression == "zstd":
        import zstandard

        return zstandard.ZstdDecompressor().decompressobj().decompress(chunk.data)
    if chunk.compression == "lz4":
        import lz4.frame

        return lz4.frame.LZ4FrameDecompressor().decompress(chunk.data)
    return None


def why(exc: BaseException) -> str:
    """An exception in words for a report line (some of the library's have no message)."""
    return str(exc) or type(exc).__name__
