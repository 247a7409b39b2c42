"""The typed records a stream carries, one representation from end to end.

A page batch is a :class:`PagesRecord` when a source reader yields it, when
the trio stream sends it, when the core encodes it as a PAGES frame, when
the peer's core decodes it into a :class:`~tunnel.RecordReceived` event,
and when the destination writer applies it.  Nothing converts it on the way
(a ZSTD_PAGES record, which the trio layer makes and undoes, is the one
transformation, and it is a record of its own).

Opaque stream bytes are not records here: they travel as DATA frames that
the core splits and joins at will (and the trio layer may splice), so they
stay plain buffers.  The wire encoding of each record lives in
:mod:`._frames`; the tables below hold what the rest of the code needs to
know about a record kind without an ``isinstance`` chain: its
flow-controlled size, which field holds its bulk bytes, and how it splits
when the peer cannot take it whole.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any, cast

Buffer = bytes | bytearray | memoryview

__all__ = [
    "RECORD_TYPES",
    "DeviceStateRecord",
    "IterationRecord",
    "PagesRecord",
    "Record",
    "ZeroPagesRecord",
    "ZstdPagesRecord",
    "bulk_of",
    "payload_size",
    "record_units",
    "split_record",
    "with_bulk",
]

#: Bytes before the addresses of a PAGES, ZERO_PAGES or ZSTD_PAGES payload.
PAGES_HEAD = 16
#: Bytes before the name of a DEVICE_STATE payload.
DEVICE_HEAD = 6
#: Bytes of an ITERATION payload.
ITERATION_SIZE = 8


@dataclass(frozen=True, slots=True, kw_only=True)
class PagesRecord:
    """Guest pages of one size: page i of *data* is at ``addresses[i]`` in *region*."""

    region: int
    page_size: int
    #: Byte offset of each page within the region, each a multiple of page_size.
    addresses: tuple[int, ...]
    #: ``len(addresses) * page_size`` bytes, page i at ``i * page_size``.
    data: Buffer


@dataclass(frozen=True, slots=True, kw_only=True)
class ZeroPagesRecord:
    """Runs of all-zero pages: no page data on the wire."""

    region: int
    page_size: int
    #: ``(address, page_count)`` runs.
    runs: tuple[tuple[int, int], ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class DeviceStateRecord:
    """One named device-state blob."""

    name: str
    version: int = 0
    data: Buffer = b""


@dataclass(frozen=True, slots=True, kw_only=True)
class IterationRecord:
    """A pre-copy pass boundary: the records that follow belong to pass *iteration* (0 first)."""

    iteration: int
    #: The last pass (stop-and-copy).
    final: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class ZstdPagesRecord:
    """A page batch whose contents are one zstd frame (ZSTD_PAGES).

    The core neither compresses nor decompresses (it must not need
    ``zstandard``): *compressed* must decompress to ``len(addresses) *
    page_size`` bytes, page i at ``i * page_size``.  The trio layer makes
    these from :class:`PagesRecord` on streams opened with ``compress=True``
    and turns them back into one on receipt.
    """

    region: int
    page_size: int
    addresses: tuple[int, ...]
    compressed: Buffer

    @property
    def raw_size(self) -> int:
        """Page bytes once decompressed."""
        return len(self.addresses) * self.page_size


#: A typed record (everything a stream carries except opaque bytes).
Record = PagesRecord | ZeroPagesRecord | DeviceStateRecord | IterationRecord | ZstdPagesRecord
RECORD_TYPES: tuple[type[Any], ...] = (PagesRecord, ZeroPagesRecord, DeviceStateRecord, IterationRecord, ZstdPagesRecord)


def _device_size(r: DeviceStateRecord) -> int:
    try:
        name = len(r.name.encode("utf-8"))
    except UnicodeEncodeError:
        name = 0  # the encoder refuses it with a proper message
    return DEVICE_HEAD + name + len(r.data)


_SIZE: dict[type[Any], Callable[[Any], int]] = {
    PagesRecord: lambda r: PAGES_HEAD + 8 * len(r.addresses) + len(r.data),
    ZeroPagesRecord: lambda r: PAGES_HEAD + 16 * len(r.runs),
    DeviceStateRecord: _device_size,
    IterationRecord: lambda r: ITERATION_SIZE,
    ZstdPagesRecord: lambda r: PAGES_HEAD + 8 * len(r.addresses) + len(r.compressed),
}

#: The field holding a record's bulk bytes, which the receiver may get as a
#: view of its read buffer (absent: the record has none).
_BULK: dict[type[Any], str] = {PagesRecord: "data", DeviceStateRecord: "data", ZstdPagesRecord: "compressed"}


def payload_size(record: Record) -> int:
    """Flow-controlled bytes of *record*'s frame payload, as the encoder will make it."""
    return _SIZE[type(record)](record)


def bulk_of(record: Record) -> Buffer | None:
    """*record*'s bulk bytes (page data, device blob, compressed pages), or None."""
    name = _BULK.get(type(record))
    return None if name is None else getattr(record, name)


def with_bulk(record: Record, bulk: Buffer) -> Record:
    """*record* with its bulk bytes replaced by *bulk* (e.g. a copy of a received view)."""
    changed: Record = replace(cast(Any, record), **{_BULK[type(record)]: bulk})
    return changed


# Splitting: a record too large for the peer's frame or window is sent in
# pieces of whole pages (or whole runs); other kinds cannot be split.


def _split_pages(r: PagesRecord, size: int) -> Iterator[PagesRecord]:
    data = memoryview(r.data)
    page = r.page_size
    for i in range(0, len(r.addresses), size):
        part = r.addresses[i : i + size]
        yield PagesRecord(region=r.region, page_size=page, addresses=part, data=data[i * page : (i + len(part)) * page])


def _split_zero(r: ZeroPagesRecord, size: int) -> Iterator[ZeroPagesRecord]:
    for i in range(0, len(r.runs), size):
        yield ZeroPagesRecord(region=r.region, page_size=r.page_size, runs=r.runs[i : i + size])


_UNITS: dict[type[Any], Callable[[Any], int]] = {
    PagesRecord: lambda r: len(r.addresses),
    ZeroPagesRecord: lambda r: len(r.runs),
}
_SPLIT: dict[type[Any], Callable[[Any, int], Iterator[Any]]] = {PagesRecord: _split_pages, ZeroPagesRecord: _split_zero}


def record_units(record: Record) -> int:
    """How many pieces *record* can be split into: pages, zero runs, or 1 (indivisible)."""
    count = _UNITS.get(type(record))
    return 1 if count is None else count(record)


def split_record(record: Record, size: int) -> Iterator[Record]:
    """*record* in order, as records of at most *size* units each (see :func:`record_units`)."""
    if size < 1:
        raise ValueError("size must be >= 1")
    splitter = _SPLIT.get(type(record))
    if splitter is None or record_units(record) <= size:
        yield record
        return
    yield from splitter(record, size)
