"""Frame types, their fields, and the pure encode / decode of one frame.

Every frame is a 12-byte header followed by ``length`` payload bytes::

    offset  size  field
    0       4     length     payload length in bytes (u32)
    4       1     type       FrameType
    5       1     flags      none defined in version 1, MUST be zero
    6       2     reserved   MUST be zero
    8       4     stream_id  0 for connection-level frames

All integers are unsigned and big-endian.  This module knows nothing about
connection state: :func:`decode_payload` turns one complete payload into a
frame object or raises :class:`RemoteProtocolError`; :func:`encode_parts`
turns a frame object into buffers whose bulk payload is the caller's own
buffer, never a copy.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import Union

from ._errors import ErrorCode, LocalProtocolError, RemoteProtocolError

__all__ = [
    "HEADER",
    "HEADER_SIZE",
    "ITERATION_FINAL",
    "Buffer",
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
    "check_header",
    "decode",
    "decode_payload",
    "encode",
    "encode_parts",
    "header",
]

Buffer = Union[bytes, bytearray, memoryview]

HEADER = struct.Struct(">IBBHI")
HEADER_SIZE = HEADER.size  # 12

_U32 = struct.Struct(">I")
_RPC = struct.Struct(">IIII")  # program, version, procedure, serial
_RPC_ERR = struct.Struct(">IIIII")  # ... + error code
_PAGES = struct.Struct(">IIII")  # region, count, page_size, reserved
_ITERATION = struct.Struct(">II")  # iteration, flags
_OPEN = struct.Struct(">BBH16s")  # kind, digest, reserved, migration id
_DEVICE = struct.Struct(">IH")  # version, name length
_END = struct.Struct(">QBBH")  # total bytes, digest algorithm, digest length, reserved
_ABORT = struct.Struct(">I")
_GOODBYE = struct.Struct(">II")  # last stream id, error code
_WINDOW = struct.Struct(">I")
_SETTING = struct.Struct(">HI")

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
        return _DIGEST_SIZES[self]


_DIGEST_SIZES = {DigestAlgorithm.NONE: 0, DigestAlgorithm.CRC32: 4, DigestAlgorithm.SHA256: 32}


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
class Pages(Frame):
    region: int
    page_size: int
    #: Byte offset of each page within the region, each a multiple of page_size.
    addresses: tuple[int, ...]
    #: ``len(addresses) * page_size`` bytes, page i at ``i * page_size``.
    data: Buffer


@dataclass(frozen=True, slots=True, kw_only=True)
class ZeroPages(Frame):
    region: int
    page_size: int
    #: ``(address, page_count)`` runs of all-zero pages.
    runs: tuple[tuple[int, int], ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class DeviceState(Frame):
    name: str
    version: int = 0
    data: Buffer = b""


@dataclass(frozen=True, slots=True, kw_only=True)
class Iteration(Frame):
    """A pre-copy iteration boundary: the records that follow belong to pass *iteration*."""

    #: 0 for the first pass.
    iteration: int
    #: The last pass: the guest is stopped and this is the stop-and-copy phase.
    final: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class ZstdPages(Frame):
    """PAGES whose page contents are one zstd frame.

    The core neither compresses nor decompresses (it must not need
    ``zstandard``): *compressed* is carried as is, and must decompress to
    ``len(addresses) * page_size`` bytes, page i at ``i * page_size``.
    """

    region: int
    page_size: int
    addresses: tuple[int, ...]
    compressed: Buffer


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


_TYPE_OF: dict[type[Frame], FrameType] = {
    SettingsFrame: FrameType.SETTINGS,
    Ping: FrameType.PING,
    Pong: FrameType.PONG,
    Goodbye: FrameType.GOODBYE,
    WindowUpdate: FrameType.WINDOW_UPDATE,
    RpcCall: FrameType.RPC_CALL,
    RpcReply: FrameType.RPC_REPLY,
    RpcError: FrameType.RPC_ERROR,
    StreamOpen: FrameType.STREAM_OPEN,
    Data: FrameType.DATA,
    Pages: FrameType.PAGES,
    ZeroPages: FrameType.ZERO_PAGES,
    DeviceState: FrameType.DEVICE_STATE,
    StreamEnd: FrameType.STREAM_END,
    StreamAbort: FrameType.STREAM_ABORT,
    Iteration: FrameType.ITERATION,
    ZstdPages: FrameType.ZSTD_PAGES,
}


def frame_type(frame: Frame) -> FrameType:
    return _TYPE_OF[type(frame)]


def header(ftype: int, stream_id: int, length: int) -> bytes:
    """The 12-byte header of a frame whose payload the caller sends itself."""
    return HEADER.pack(length, ftype, 0, 0, stream_id)


# ---------------------------------------------------------------------------
# Encoding


def _check_u32(name: str, value: int) -> None:
    if not 0 <= value <= 0xFFFFFFFF:
        raise LocalProtocolError(f"{name} {value} does not fit in 32 bits")


def _utf8(text: str) -> bytes:
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise LocalProtocolError(f"text is not encodable as UTF-8: {exc}") from None


def _page_size_ok(page_size: int) -> bool:
    return (
        page_size & (page_size - 1) == 0
        and (1 << MIN_PAGE_SHIFT) <= page_size <= (1 << MAX_PAGE_SHIFT)
    )


def _pages_head(frame: Pages | ZstdPages) -> bytes:
    """The 16-byte head and the addresses of a PAGES or ZSTD_PAGES frame, validated."""
    n = len(frame.addresses)
    if not _page_size_ok(frame.page_size):
        raise LocalProtocolError(f"page size {frame.page_size} is not a power of two in 512..2 MiB")
    mask = frame.page_size - 1
    for address in frame.addresses:
        if address & mask or not 0 <= address < 2**64:
            raise LocalProtocolError(f"page address {address:#x} is not page aligned")
    _check_u32("region", frame.region)
    return _PAGES.pack(frame.region, n, frame.page_size, 0) + struct.pack(f">{n}Q", *frame.addresses)


def _fields(frame: Frame) -> list[Buffer]:
    """Payload buffers of *frame*; bulk data is passed through uncopied."""
    if isinstance(frame, Data):
        return [frame.data]
    if isinstance(frame, Pages):
        n = len(frame.addresses)
        if len(frame.data) != n * frame.page_size:
            raise LocalProtocolError(f"{n} pages need {n * frame.page_size} data bytes, got {len(frame.data)}")
        return [_pages_head(frame), frame.data]
    if isinstance(frame, ZstdPages):
        if not len(frame.compressed):
            raise LocalProtocolError("ZSTD_PAGES needs a zstd frame, got no compressed bytes")
        return [_pages_head(frame), frame.compressed]
    if isinstance(frame, Iteration):
        _check_u32("iteration", frame.iteration)
        return [_ITERATION.pack(frame.iteration, ITERATION_FINAL if frame.final else 0)]
    if isinstance(frame, ZeroPages):
        if not _page_size_ok(frame.page_size):
            raise LocalProtocolError(f"page size {frame.page_size} is not a power of two in 512..2 MiB")
        _check_u32("region", frame.region)
        flat: list[int] = []
        mask = frame.page_size - 1
        for address, count in frame.runs:
            if address & mask or not 0 <= address < 2**64 or not 0 < count < 2**64:
                raise LocalProtocolError(f"bad zero-page run ({address:#x}, {count})")
            flat += (address, count)
        return [_PAGES.pack(frame.region, len(frame.runs), frame.page_size, 0) + struct.pack(f">{len(flat)}Q", *flat)]
    if isinstance(frame, RpcCall | RpcReply):
        for name in ("program", "version", "procedure", "serial"):
            _check_u32(name, getattr(frame, name))
        return [_RPC.pack(frame.program, frame.version, frame.procedure, frame.serial), frame.body]
    if isinstance(frame, RpcError):
        for name in ("program", "version", "procedure", "serial", "error_code"):
            _check_u32(name, getattr(frame, name))
        return [
            _RPC_ERR.pack(frame.program, frame.version, frame.procedure, frame.serial, frame.error_code)
            + _utf8(frame.message)
        ]
    if isinstance(frame, DeviceState):
        encoded = _utf8(frame.name)
        if len(encoded) > 0xFFFF:
            raise LocalProtocolError("device name longer than 65535 bytes")
        _check_u32("version", frame.version)
        return [_DEVICE.pack(frame.version, len(encoded)) + encoded, frame.data]
    if isinstance(frame, StreamOpen):
        if len(frame.migration_id) != 16:
            raise LocalProtocolError("migration id must be 16 bytes")
        if not 0 <= frame.kind <= 0xFF or frame.digest not in _DIGEST_SIZES:
            raise LocalProtocolError(f"bad stream kind {frame.kind} or digest {frame.digest}")
        return [_OPEN.pack(frame.kind, frame.digest, 0, frame.migration_id) + _utf8(frame.label)]
    if isinstance(frame, StreamEnd):
        if not 0 <= frame.total_bytes < 2**64:
            raise LocalProtocolError("total_bytes does not fit in 64 bits")
        if frame.digest_algorithm not in _DIGEST_SIZES or len(frame.digest) != _DIGEST_SIZES[
            DigestAlgorithm(frame.digest_algorithm)
        ]:
            raise LocalProtocolError("digest does not match its algorithm")
        return [_END.pack(frame.total_bytes, frame.digest_algorithm, len(frame.digest), 0) + frame.digest]
    if isinstance(frame, StreamAbort):
        _check_u32("error_code", frame.error_code)
        return [_ABORT.pack(frame.error_code) + _utf8(frame.reason)]
    if isinstance(frame, WindowUpdate):
        if not 1 <= frame.increment <= MAX_WINDOW:
            raise LocalProtocolError(f"window increment {frame.increment} outside 1..2**31-1")
        return [_WINDOW.pack(frame.increment)]
    if isinstance(frame, Ping | Pong):
        if len(frame.opaque) != 8:
            raise LocalProtocolError("ping payload must be 8 bytes")
        return [bytes(frame.opaque)]
    if isinstance(frame, Goodbye):
        _check_u32("last_stream_id", frame.last_stream_id)
        _check_u32("error_code", frame.error_code)
        return [_GOODBYE.pack(frame.last_stream_id, frame.error_code) + _utf8(frame.reason)]
    if isinstance(frame, SettingsFrame):
        out = bytearray()
        for ident, value in frame.settings:
            if not 0 <= ident <= 0xFFFF:
                raise LocalProtocolError(f"setting id {ident} does not fit in 16 bits")
            _check_u32("setting value", value)
            out += _SETTING.pack(ident, value)
        return [bytes(out)]
    raise TypeError(f"not a frame: {frame!r}")  # pragma: no cover - programming error


def encode_parts(frame: Frame) -> list[Buffer]:
    """Header and payload buffers of *frame*, ready for ``sendmsg``/writev.

    Bulk payloads (data, page contents, device blobs, RPC bodies) appear as
    the very objects the frame holds: nothing is copied.
    """
    ftype = _TYPE_OF[type(frame)]
    if ftype in CONNECTION_FRAMES:
        if frame.stream_id != 0:
            raise LocalProtocolError(f"{ftype.name} frames belong to stream 0")
    elif ftype is not FrameType.WINDOW_UPDATE and frame.stream_id == 0:
        raise LocalProtocolError(f"{ftype.name} frames need a stream id")
    _check_u32("stream id", frame.stream_id)
    parts = [p for p in _fields(frame) if len(p)]
    length = sum(len(p) for p in parts)
    return [HEADER.pack(length, ftype, 0, 0, frame.stream_id), *parts]


def encode(frame: Frame) -> bytes:
    """The whole frame as one bytes object (copies; for small frames and tests)."""
    return b"".join(encode_parts(frame))


# ---------------------------------------------------------------------------
# Decoding


def _bad(message: str, code: int = ErrorCode.PROTOCOL_ERROR) -> RemoteProtocolError:
    return RemoteProtocolError(message, code)


def _text(raw: Buffer, what: str) -> str:
    try:
        return str(raw, "utf-8")
    except UnicodeDecodeError:
        raise _bad(f"{what} is not valid UTF-8") from None


def _need(payload: memoryview, size: int, ftype: FrameType) -> None:
    if len(payload) < size:
        raise _bad(f"{ftype.name} frame too short: {len(payload)} bytes, need {size}", ErrorCode.FRAME_SIZE_ERROR)


def _exact(payload: memoryview, size: int, ftype: FrameType) -> None:
    if len(payload) != size:
        raise _bad(f"{ftype.name} frame must be {size} bytes, got {len(payload)}", ErrorCode.FRAME_SIZE_ERROR)


def check_header(ftype_raw: int, flags: int, reserved: int, stream_id: int, length: int, max_frame_size: int) -> FrameType:
    """Validate a frame header before any payload is read or allocated."""
    try:
        ftype = FrameType(ftype_raw)
    except ValueError:
        raise _bad(f"unknown frame type {ftype_raw:#04x}") from None
    if length > max_frame_size:
        raise _bad(
            f"{ftype.name} frame of {length} bytes exceeds the maximum frame size {max_frame_size}",
            ErrorCode.FRAME_SIZE_ERROR,
        )
    if flags or reserved:
        raise _bad(f"{ftype.name} frame has reserved bits set (flags {flags:#04x}, reserved {reserved:#06x})")
    if ftype in CONNECTION_FRAMES:
        if stream_id != 0:
            raise _bad(f"{ftype.name} frame on stream {stream_id}, must be stream 0")
    elif ftype is not FrameType.WINDOW_UPDATE and stream_id == 0:
        raise _bad(f"{ftype.name} frame on stream 0")
    return ftype


def decode(frame_bytes: Buffer, max_frame_size: int = 2**32 - 1) -> Frame:
    """Decode exactly one whole frame (header and payload)."""
    view = memoryview(frame_bytes)
    if len(view) < HEADER_SIZE:
        raise _bad(f"frame shorter than its {HEADER_SIZE}-byte header", ErrorCode.FRAME_SIZE_ERROR)
    length, ftype_raw, flags, reserved, stream_id = HEADER.unpack_from(view)
    ftype = check_header(ftype_raw, flags, reserved, stream_id, length, max_frame_size)
    if len(view) != HEADER_SIZE + length:
        raise _bad(f"frame length field says {length}, got {len(view) - HEADER_SIZE} bytes", ErrorCode.FRAME_SIZE_ERROR)
    return decode_payload(ftype, stream_id, view[HEADER_SIZE:])


def decode_payload(ftype: FrameType, stream_id: int, payload: memoryview) -> Frame:
    """Decode one complete payload whose header passed :func:`check_header`.

    Bulk fields are memoryview slices of *payload* (no copy).  Anything
    malformed raises :class:`RemoteProtocolError` with the matching code.
    """
    n = len(payload)

    if ftype is FrameType.DATA:
        return Data(stream_id=stream_id, data=payload)
    if ftype is FrameType.PAGES or ftype is FrameType.ZERO_PAGES or ftype is FrameType.ZSTD_PAGES:
        _need(payload, _PAGES.size, ftype)
        region, count, page_size, reserved2 = _PAGES.unpack_from(payload)
        if reserved2:
            raise _bad(f"{ftype.name} reserved field is not zero")
        if not _page_size_ok(page_size):
            raise _bad(f"{ftype.name} page size {page_size} is not a power of two in 512..2 MiB")
        mask = page_size - 1
        if ftype is FrameType.PAGES or ftype is FrameType.ZSTD_PAGES:
            # count is bounded by the frame length before anything is allocated.
            if ftype is FrameType.PAGES:
                _exact(payload, _PAGES.size + count * (8 + page_size), ftype)
            else:
                _need(payload, _PAGES.size + count * 8 + 1, ftype)  # at least one byte of zstd frame
            addresses = struct.unpack_from(f">{count}Q", payload, _PAGES.size)
            for address in addresses:
                if address & mask:
                    raise _bad(f"page address {address:#x} is not a multiple of {page_size}")
            rest = payload[_PAGES.size + 8 * count :]
            if ftype is FrameType.ZSTD_PAGES:
                return ZstdPages(stream_id=stream_id, region=region, page_size=page_size, addresses=addresses, compressed=rest)
            return Pages(stream_id=stream_id, region=region, page_size=page_size, addresses=addresses, data=rest)
        _exact(payload, _PAGES.size + count * 16, ftype)
        flat = struct.unpack_from(f">{2 * count}Q", payload, _PAGES.size)
        runs = tuple(zip(flat[0::2], flat[1::2]))
        for address, pages in runs:
            if address & mask or pages == 0:
                raise _bad(f"bad zero-page run ({address:#x}, {pages})")
        return ZeroPages(stream_id=stream_id, region=region, page_size=page_size, runs=runs)
    if ftype is FrameType.RPC_CALL or ftype is FrameType.RPC_REPLY:
        _need(payload, _RPC.size, ftype)
        program, version, procedure, serial = _RPC.unpack_from(payload)
        cls = RpcCall if ftype is FrameType.RPC_CALL else RpcReply
        return cls(program=program, version=version, procedure=procedure, serial=serial, body=payload[_RPC.size :])
    if ftype is FrameType.RPC_ERROR:
        _need(payload, _RPC_ERR.size, ftype)
        program, version, procedure, serial, code = _RPC_ERR.unpack_from(payload)
        return RpcError(
            program=program,
            version=version,
            procedure=procedure,
            serial=serial,
            error_code=code,
            message=_text(payload[_RPC_ERR.size :], "RPC error message"),
        )
    if ftype is FrameType.DEVICE_STATE:
        _need(payload, _DEVICE.size, ftype)
        version, name_len = _DEVICE.unpack_from(payload)
        _need(payload, _DEVICE.size + name_len, ftype)
        end = _DEVICE.size + name_len
        return DeviceState(
            stream_id=stream_id,
            name=_text(payload[_DEVICE.size : end], "device name"),
            version=version,
            data=payload[end:],
        )
    if ftype is FrameType.STREAM_OPEN:
        _need(payload, _OPEN.size, ftype)
        kind, digest, reserved2, migration_id = _OPEN.unpack_from(payload)
        if reserved2:
            raise _bad("STREAM_OPEN reserved field is not zero")
        if digest not in _DIGEST_SIZES:
            raise _bad(f"unknown digest algorithm {digest}")
        return StreamOpen(
            stream_id=stream_id,
            kind=kind,
            digest=digest,
            migration_id=migration_id,
            label=_text(payload[_OPEN.size :], "stream label"),
        )
    if ftype is FrameType.ITERATION:
        _exact(payload, _ITERATION.size, ftype)
        iteration, flags = _ITERATION.unpack_from(payload)
        if flags & ~ITERATION_FINAL:
            raise _bad(f"ITERATION flags {flags:#x} has undefined bits set")
        return Iteration(stream_id=stream_id, iteration=iteration, final=bool(flags))
    if ftype is FrameType.STREAM_END:
        _need(payload, _END.size, ftype)
        total, algorithm, digest_len, reserved2 = _END.unpack_from(payload)
        if reserved2:
            raise _bad("STREAM_END reserved field is not zero")
        if algorithm not in _DIGEST_SIZES:
            raise _bad(f"unknown digest algorithm {algorithm}")
        if digest_len != _DIGEST_SIZES[DigestAlgorithm(algorithm)]:
            raise _bad(f"digest length {digest_len} does not match algorithm {algorithm}")
        _exact(payload, _END.size + digest_len, ftype)
        return StreamEnd(
            stream_id=stream_id,
            total_bytes=total,
            digest_algorithm=algorithm,
            digest=bytes(payload[_END.size :]),
        )
    if ftype is FrameType.STREAM_ABORT:
        _need(payload, _ABORT.size, ftype)
        (code,) = _ABORT.unpack_from(payload)
        return StreamAbort(stream_id=stream_id, error_code=code, reason=_text(payload[_ABORT.size :], "abort reason"))
    if ftype is FrameType.WINDOW_UPDATE:
        _exact(payload, _WINDOW.size, ftype)
        (increment,) = _WINDOW.unpack_from(payload)
        if not 1 <= increment <= MAX_WINDOW:
            raise _bad(f"window increment {increment} outside 1..2**31-1", ErrorCode.FLOW_CONTROL_ERROR)
        return WindowUpdate(stream_id=stream_id, increment=increment)
    if ftype is FrameType.PING or ftype is FrameType.PONG:
        _exact(payload, 8, ftype)
        cls2 = Ping if ftype is FrameType.PING else Pong
        return cls2(opaque=bytes(payload))
    if ftype is FrameType.GOODBYE:
        _need(payload, _GOODBYE.size, ftype)
        last, code = _GOODBYE.unpack_from(payload)
        return Goodbye(last_stream_id=last, error_code=code, reason=_text(payload[_GOODBYE.size :], "goodbye reason"))
    if ftype is FrameType.SETTINGS:
        if n % _SETTING.size:
            raise _bad(f"SETTINGS length {n} is not a multiple of 6", ErrorCode.FRAME_SIZE_ERROR)
        return SettingsFrame(settings=tuple(_SETTING.iter_unpack(payload)))
    raise AssertionError(ftype)  # pragma: no cover - every FrameType is handled above
