"""Frame types and their fields: the constants, enums and frozen dataclasses of protocol.md.

The wire encoding of each is in :mod:`._frames`, which re-exports everything here.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum

from ._errors import ErrorCode
from ._records import (
    Buffer,
    DeviceStateRecord,
    IterationRecord,
    PagesRecord,
    Record,
    ZeroPagesRecord,
    ZstdPagesRecord,
)

__all__ = [
    "CONNECTION_FRAMES",
    "DIGEST_SIZES",
    "FLOW_CONTROLLED",
    "HEADER",
    "HEADER_SIZE",
    "ITERATION_FINAL",
    "MAX_PAGE_SHIFT",
    "MAX_WINDOW",
    "MIN_PAGE_SHIFT",
    "Data",
    "DeviceState",
    "DigestAlgorithm",
    "Frame",
    "FrameType",
    "Goodbye",
    "Iteration",
    "Pages",
    "Ping",
    "Pong",
    "RecordFrame",
    "RpcCall",
    "RpcError",
    "RpcReply",
    "SettingsFrame",
    "StreamAbort",
    "StreamEnd",
    "StreamKind",
    "StreamOpen",
    "WindowUpdate",
    "ZeroPages",
    "ZstdPages",
    "header",
]

HEADER = struct.Struct(">IBBHI")
HEADER_SIZE = HEADER.size  # 12

MAX_WINDOW = 2**31 - 1
MIN_PAGE_SHIFT = 9
MAX_PAGE_SHIFT = 21
#: ITERATION flag: the last pass (stop-and-copy).  Every other bit MUST be zero.
ITERATION_FINAL = 0x1


class FrameType(IntEnum):
    SETTINGS = 0x01
    PING = 0x02
    PONG = 0x03
    GOODBYE = 0x04
    WINDOW_UPDATE = 0x05
    RPC_CALL = 0x10
    RPC_REPLY = 0x11
    RPC_ERROR = 0x12
    STREAM_OPEN = 0x20
    DATA = 0x21
    PAGES = 0x22
    ZERO_PAGES = 0x23
    DEVICE_STATE = 0x24
    STREAM_END = 0x25
    STREAM_ABORT = 0x26
    ITERATION = 0x27
    ZSTD_PAGES = 0x28


#: Frame types whose whole payload length counts against flow-control windows.
FLOW_CONTROLLED = frozenset(
    {
        FrameType.DATA,
        FrameType.PAGES,
        FrameType.ZERO_PAGES,
        FrameType.DEVICE_STATE,
        FrameType.ITERATION,
        FrameType.ZSTD_PAGES,
    }
)
#: Frame types that MUST carry stream id 0.
CONNECTION_FRAMES = frozenset(
    {
        FrameType.SETTINGS,
        FrameType.PING,
        FrameType.PONG,
        FrameType.GOODBYE,
        FrameType.RPC_CALL,
        FrameType.RPC_REPLY,
        FrameType.RPC_ERROR,
    }
)


class StreamKind(IntEnum):
    """What a stream carries; informative for the application."""

    BYTES = 0  # an opaque hypervisor byte stream (QEMU's migration stream)
    MEMORY = 1  # guest memory as page records
    DEVICE = 2  # device state blobs
    FILE = 3  # a saved guest image
    CONTROL = 4  # application messages alongside a migration


class DigestAlgorithm(IntEnum):
    """End-of-stream digest, chosen per stream by the opener."""

    NONE = 0
    CRC32 = 1  # zlib.crc32, 4 bytes big-endian
    SHA256 = 2  # 32 bytes

    @property
    def digest_size(self) -> int:
        return DIGEST_SIZES[self]


DIGEST_SIZES = {DigestAlgorithm.NONE: 0, DigestAlgorithm.CRC32: 4, DigestAlgorithm.SHA256: 32}


@dataclass(frozen=True, slots=True, kw_only=True)
class Frame:
    """Base class of all frames."""

    stream_id: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class SettingsFrame(Frame):
    #: ``(identifier, value)`` pairs in wire order.
    settings: tuple[tuple[int, int], ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class Ping(Frame):
    opaque: bytes = b"\0" * 8


@dataclass(frozen=True, slots=True, kw_only=True)
class Pong(Frame):
    opaque: bytes = b"\0" * 8


@dataclass(frozen=True, slots=True, kw_only=True)
class Goodbye(Frame):
    last_stream_id: int = 0
    error_code: int = ErrorCode.NO_ERROR
    reason: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class WindowUpdate(Frame):
    increment: int


@dataclass(frozen=True, slots=True, kw_only=True)
class RpcCall(Frame):
    program: int
    version: int
    procedure: int
    serial: int
    body: Buffer = b""


@dataclass(frozen=True, slots=True, kw_only=True)
class RpcReply(Frame):
    program: int
    version: int
    procedure: int
    serial: int
    body: Buffer = b""


@dataclass(frozen=True, slots=True, kw_only=True)
class RpcError(Frame):
    program: int
    version: int
    procedure: int
    serial: int
    error_code: int
    message: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class StreamOpen(Frame):
    kind: int = StreamKind.BYTES
    digest: int = DigestAlgorithm.NONE
    migration_id: bytes = b"\0" * 16
    label: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class Data(Frame):
    data: Buffer


@dataclass(frozen=True, slots=True, kw_only=True)
class RecordFrame(Frame):
    """A flow-controlled frame that carries one typed record (PAGES, ZERO_PAGES,
    DEVICE_STATE, ITERATION, ZSTD_PAGES); its frame type follows from the record's."""

    record: Record


# Constructors of the RecordFrame for each record kind, named after the frame
# types: hand-built frames (tests, protocol.md's vectors) read as the wire does.


def Pages(*, stream_id: int = 0, region: int, page_size: int, addresses: tuple[int, ...], data: Buffer) -> RecordFrame:
    return RecordFrame(stream_id=stream_id, record=PagesRecord(region=region, page_size=page_size, addresses=addresses, data=data))


def ZeroPages(*, stream_id: int = 0, region: int, page_size: int, runs: tuple[tuple[int, int], ...]) -> RecordFrame:
    return RecordFrame(stream_id=stream_id, record=ZeroPagesRecord(region=region, page_size=page_size, runs=runs))


def DeviceState(*, stream_id: int = 0, name: str, version: int = 0, data: Buffer = b"") -> RecordFrame:
    return RecordFrame(stream_id=stream_id, record=DeviceStateRecord(name=name, version=version, data=data))


def Iteration(*, stream_id: int = 0, iteration: int, final: bool = False) -> RecordFrame:
    return RecordFrame(stream_id=stream_id, record=IterationRecord(iteration=iteration, final=final))


def ZstdPages(
    *, stream_id: int = 0, region: int, page_size: int, addresses: tuple[int, ...], compressed: Buffer
) -> RecordFrame:
    return RecordFrame(
        stream_id=stream_id, record=ZstdPagesRecord(region=region, page_size=page_size, addresses=addresses, compressed=compressed)
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class StreamEnd(Frame):
    #: Flow-controlled payload bytes sent in this direction of the stream.
    total_bytes: int
    digest_algorithm: int = DigestAlgorithm.NONE
    digest: bytes = b""


@dataclass(frozen=True, slots=True, kw_only=True)
class StreamAbort(Frame):
    error_code: int
    reason: str = ""


def header(ftype: int, stream_id: int, length: int) -> bytes:
    """The 12-byte header of a frame whose payload the caller sends itself."""
    return HEADER.pack(length, ftype, 0, 0, stream_id)
