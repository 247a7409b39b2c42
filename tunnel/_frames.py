"""Frame types, their fields, and the pure encode / decode of one frame.

Every frame is a 12-byte header followed by ``length`` payload bytes::

    offset  size  field
    0       4     length     payload length in bytes (u32)
    4       1     type       FrameType
    5       1     flags      none defined in version 1, MUST be zero
    6       2     reserved   MUST be zero
    8       4     stream_id  0 for connection-level frames

All integers are unsigned and big-endian.  The frame types and their
fields are defined in :mod:`._frametypes` and re-exported here; this
module is the codec.  It knows nothing about connection state: :func:`decode_payload` turns one complete payload into a
frame object or raises :class:`RemoteProtocolError`; :func:`encode_parts`
turns a frame object into buffers whose bulk payload is the caller's own
buffer, never a copy.

The codec is a table: each frame type has one encoder and one decoder, and
the record frames (PAGES, ZERO_PAGES, DEVICE_STATE, ITERATION, ZSTD_PAGES)
carry the typed records of :mod:`._records` themselves, so a record is
encoded straight from, and decoded straight into, the type the application
uses (:func:`encode_record`, :func:`decode_record`).
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from functools import reduce
from operator import or_
from typing import Any

from ._errors import ErrorCode, LocalProtocolError, RemoteProtocolError
from ._frametypes import (
    CONNECTION_FRAMES,
    DIGEST_SIZES,
    FLOW_CONTROLLED,
    HEADER,
    HEADER_SIZE,
    ITERATION_FINAL,
    MAX_PAGE_SHIFT,
    MAX_WINDOW,
    MIN_PAGE_SHIFT,
    Data,
    DeviceState,
    DigestAlgorithm,
    Frame,
    FrameType,
    Goodbye,
    Iteration,
    Pages,
    Ping,
    Pong,
    RecordFrame,
    RpcCall,
    RpcError,
    RpcReply,
    SettingsFrame,
    StreamAbort,
    StreamEnd,
    StreamKind,
    StreamOpen,
    WindowUpdate,
    ZeroPages,
    ZstdPages,
    header,
)
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
    "FLOW_CONTROLLED",
    "HEADER",
    "HEADER_SIZE",
    "ITERATION_FINAL",
    "MAX_PAGE_SHIFT",
    "MAX_WINDOW",
    "MIN_PAGE_SHIFT",
    "RECORD_FRAMES",
    "RECORD_FRAME_NAMES",
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
    "check_header",
    "decode",
    "decode_payload",
    "decode_record",
    "encode",
    "encode_parts",
    "encode_record",
    "frame_type",
    "header",
    "record_decoder",
    "record_frame_type",
]

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



# ---------------------------------------------------------------------------
# Checks shared by both directions


def _page_size_ok(page_size: int) -> bool:
    return (
        page_size & (page_size - 1) == 0
        and (1 << MIN_PAGE_SHIFT) <= page_size <= (1 << MAX_PAGE_SHIFT)
    )


def _misaligned(addresses: tuple[int, ...], mask: int) -> bool:
    # One pass in C over all addresses instead of a Python loop per page.
    return bool(addresses) and bool(reduce(or_, addresses) & mask)


# ---------------------------------------------------------------------------
# Encoders: one per frame or record type, each returning the payload buffers
# (bulk data passed through uncopied) or raising LocalProtocolError.


def _check_u32(name: str, value: int) -> None:
    if not 0 <= value <= 0xFFFFFFFF:
        raise LocalProtocolError(f"{name} {value} does not fit in 32 bits")


def _utf8(text: str) -> bytes:
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise LocalProtocolError(f"text is not encodable as UTF-8: {exc}") from None


def _pages_head(region: int, page_size: int, addresses: tuple[int, ...]) -> bytes:
    """The 16-byte head and the addresses of a PAGES or ZSTD_PAGES payload, validated."""
    if not _page_size_ok(page_size):
        raise LocalProtocolError(f"page size {page_size} is not a power of two in 512..2 MiB")
    _check_u32("region", region)
    n = len(addresses)
    if not _misaligned(addresses, page_size - 1):
        try:
            return struct.pack(f">IIII{n}Q", region, n, page_size, 0, *addresses)
        except struct.error:
            pass  # an address outside 0..2**64-1: found below
    bad = next(a for a in addresses if a & (page_size - 1) or not 0 <= a < 2**64)
    raise LocalProtocolError(f"page address {bad:#x} is not page aligned")


def _enc_pages(r: PagesRecord) -> list[Buffer]:
    n = len(r.addresses)
    if len(r.data) != n * r.page_size:
        raise LocalProtocolError(f"{n} pages need {n * r.page_size} data bytes, got {len(r.data)}")
    return [_pages_head(r.region, r.page_size, r.addresses), r.data]


def _enc_zstd_pages(r: ZstdPagesRecord) -> list[Buffer]:
    if not len(r.compressed):
        raise LocalProtocolError("ZSTD_PAGES needs a zstd frame, got no compressed bytes")
    return [_pages_head(r.region, r.page_size, r.addresses), r.compressed]


def _enc_zero_pages(r: ZeroPagesRecord) -> list[Buffer]:
    if not _page_size_ok(r.page_size):
        raise LocalProtocolError(f"page size {r.page_size} is not a power of two in 512..2 MiB")
    _check_u32("region", r.region)
    flat: list[int] = []
    mask = r.page_size - 1
    for address, count in r.runs:
        if address & mask or not 0 <= address < 2**64 or not 0 < count < 2**64:
            raise LocalProtocolError(f"bad zero-page run ({address:#x}, {count})")
        flat += (address, count)
    return [struct.pack(f">IIII{len(flat)}Q", r.region, len(r.runs), r.page_size, 0, *flat)]


def _enc_device_state(r: DeviceStateRecord) -> list[Buffer]:
    encoded = _utf8(r.name)
    if len(encoded) > 0xFFFF:
        raise LocalProtocolError("device name longer than 65535 bytes")
    _check_u32("version", r.version)
    return [_DEVICE.pack(r.version, len(encoded)) + encoded, r.data]


def _enc_iteration(r: IterationRecord) -> list[Buffer]:
    _check_u32("iteration", r.iteration)
    return [_ITERATION.pack(r.iteration, ITERATION_FINAL if r.final else 0)]


def _enc_data(f: Data) -> list[Buffer]:
    return [f.data]


def _enc_rpc(f: RpcCall | RpcReply) -> list[Buffer]:
    for name in ("program", "version", "procedure", "serial"):
        _check_u32(name, getattr(f, name))
    return [_RPC.pack(f.program, f.version, f.procedure, f.serial), f.body]


def _enc_rpc_error(f: RpcError) -> list[Buffer]:
    for name in ("program", "version", "procedure", "serial", "error_code"):
        _check_u32(name, getattr(f, name))
    return [_RPC_ERR.pack(f.program, f.version, f.procedure, f.serial, f.error_code) + _utf8(f.message)]


def _enc_stream_open(f: StreamOpen) -> list[Buffer]:
    if len(f.migration_id) != 16:
        raise LocalProtocolError("migration id must be 16 bytes")
    if not 0 <= f.kind <= 0xFF or f.digest not in DIGEST_SIZES:
        raise LocalProtocolError(f"bad stream kind {f.kind} or digest {f.digest}")
    return [_OPEN.pack(f.kind, f.digest, 0, f.migration_id) + _utf8(f.label)]


def _enc_stream_end(f: StreamEnd) -> list[Buffer]:
    if not 0 <= f.total_bytes < 2**64:
        raise LocalProtocolError("total_bytes does not fit in 64 bits")
    if f.digest_algorithm not in DIGEST_SIZES or len(f.digest) != DIGEST_SIZES[DigestAlgorithm(f.digest_algorithm)]:
        raise LocalProtocolError("digest does not match its algorithm")
    return [_END.pack(f.total_bytes, f.digest_algorithm, len(f.digest), 0) + f.digest]


def _enc_stream_abort(f: StreamAbort) -> list[Buffer]:
    _check_u32("error_code", f.error_code)
    return [_ABORT.pack(f.error_code) + _utf8(f.reason)]


def _enc_window(f: WindowUpdate) -> list[Buffer]:
    if not 1 <= f.increment <= MAX_WINDOW:
        raise LocalProtocolError(f"window increment {f.increment} outside 1..2**31-1")
    return [_WINDOW.pack(f.increment)]


def _enc_ping(f: Ping | Pong) -> list[Buffer]:
    if len(f.opaque) != 8:
        raise LocalProtocolError("ping payload must be 8 bytes")
    return [bytes(f.opaque)]


def _enc_goodbye(f: Goodbye) -> list[Buffer]:
    _check_u32("last_stream_id", f.last_stream_id)
    _check_u32("error_code", f.error_code)
    return [_GOODBYE.pack(f.last_stream_id, f.error_code) + _utf8(f.reason)]


def _enc_settings(f: SettingsFrame) -> list[Buffer]:
    out = bytearray()
    for ident, value in f.settings:
        if not 0 <= ident <= 0xFFFF:
            raise LocalProtocolError(f"setting id {ident} does not fit in 16 bits")
        _check_u32("setting value", value)
        out += _SETTING.pack(ident, value)
    return [bytes(out)]


# ---------------------------------------------------------------------------
# Decoders: one per frame type, each taking a payload whose header passed
# check_header and returning a record (record frames) or a frame, or raising
# RemoteProtocolError.  Bulk fields are memoryview slices of the payload.


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


def _pages_fields(payload: memoryview, ftype: FrameType) -> tuple[int, int, int]:
    """region, count and page size of a PAGES, ZERO_PAGES or ZSTD_PAGES payload."""
    _need(payload, _PAGES.size, ftype)
    region, count, page_size, reserved = _PAGES.unpack_from(payload)
    if reserved:
        raise _bad(f"{ftype.name} reserved field is not zero")
    if not _page_size_ok(page_size):
        raise _bad(f"{ftype.name} page size {page_size} is not a power of two in 512..2 MiB")
    return region, count, page_size


def _addresses(payload: memoryview, count: int, page_size: int) -> tuple[int, ...]:
    addresses: tuple[int, ...] = struct.unpack_from(f">{count}Q", payload, _PAGES.size)
    if _misaligned(addresses, page_size - 1):
        bad = next(a for a in addresses if a & (page_size - 1))
        raise _bad(f"page address {bad:#x} is not a multiple of {page_size}")
    return addresses


def _dec_pages(payload: memoryview) -> PagesRecord:
    region, count, page_size = _pages_fields(payload, FrameType.PAGES)
    # count is bounded by the frame length before anything is allocated.
    _exact(payload, _PAGES.size + count * (8 + page_size), FrameType.PAGES)
    addresses = _addresses(payload, count, page_size)
    return PagesRecord(region=region, page_size=page_size, addresses=addresses, data=payload[_PAGES.size + 8 * count :])


def _dec_zstd_pages(payload: memoryview) -> ZstdPagesRecord:
    region, count, page_size = _pages_fields(payload, FrameType.ZSTD_PAGES)
    _need(payload, _PAGES.size + count * 8 + 1, FrameType.ZSTD_PAGES)  # at least one byte of zstd frame
    addresses = _addresses(payload, count, page_size)
    return ZstdPagesRecord(region=region, page_size=page_size, addresses=addresses, compressed=payload[_PAGES.size + 8 * count :])


def _dec_zero_pages(payload: memoryview) -> ZeroPagesRecord:
    region, count, page_size = _pages_fields(payload, FrameType.ZERO_PAGES)
    _exact(payload, _PAGES.size + count * 16, FrameType.ZERO_PAGES)
    flat = struct.unpack_from(f">{2 * count}Q", payload, _PAGES.size)
    runs = tuple(zip(flat[0::2], flat[1::2]))
    mask = page_size - 1
    for address, pages in runs:
        if address & mask or pages == 0:
            raise _bad(f"bad zero-page run ({address:#x}, {pages})")
    return ZeroPagesRecord(region=region, page_size=page_size, runs=runs)


def _dec_device_state(payload: memoryview) -> DeviceStateRecord:
    _need(payload, _DEVICE.size, FrameType.DEVICE_STATE)
    version, name_len = _DEVICE.unpack_from(payload)
    end = _DEVICE.size + name_len
    _need(payload, end, FrameType.DEVICE_STATE)
    return DeviceStateRecord(name=_text(payload[_DEVICE.size : end], "device name"), version=version, data=payload[end:])


def _dec_iteration(payload: memoryview) -> IterationRecord:
    _exact(payload, _ITERATION.size, FrameType.ITERATION)
    iteration, flags = _ITERATION.unpack_from(payload)
    if flags & ~ITERATION_FINAL:
        raise _bad(f"ITERATION flags {flags:#x} has undefined bits set")
    return IterationRecord(iteration=iteration, final=bool(flags))


def _dec_data(stream_id: int, payload: memoryview) -> Data:
    return Data(stream_id=stream_id, data=payload)


def _dec_rpc_call(stream_id: int, payload: memoryview) -> RpcCall:
    _need(payload, _RPC.size, FrameType.RPC_CALL)
    program, version, procedure, serial = _RPC.unpack_from(payload)
    return RpcCall(program=program, version=version, procedure=procedure, serial=serial, body=payload[_RPC.size :])


def _dec_rpc_reply(stream_id: int, payload: memoryview) -> RpcReply:
    _need(payload, _RPC.size, FrameType.RPC_REPLY)
    program, version, procedure, serial = _RPC.unpack_from(payload)
    return RpcReply(program=program, version=version, procedure=procedure, serial=serial, body=payload[_RPC.size :])


def _dec_rpc_error(stream_id: int, payload: memoryview) -> RpcError:
    _need(payload, _RPC_ERR.size, FrameType.RPC_ERROR)
    program, version, procedure, serial, code = _RPC_ERR.unpack_from(payload)
    message = _text(payload[_RPC_ERR.size :], "RPC error message")
    return RpcError(program=program, version=version, procedure=procedure, serial=serial, error_code=code, message=message)


def _dec_stream_open(stream_id: int, payload: memoryview) -> StreamOpen:
    _need(payload, _OPEN.size, FrameType.STREAM_OPEN)
    kind, digest, reserved, migration_id = _OPEN.unpack_from(payload)
    if reserved:
        raise _bad("STREAM_OPEN reserved field is not zero")
    if digest not in DIGEST_SIZES:
        raise _bad(f"unknown digest algorithm {digest}")
    label = _text(payload[_OPEN.size :], "stream label")
    return StreamOpen(stream_id=stream_id, kind=kind, digest=digest, migration_id=migration_id, label=label)


def _dec_stream_end(stream_id: int, payload: memoryview) -> StreamEnd:
    _need(payload, _END.size, FrameType.STREAM_END)
    total, algorithm, digest_len, reserved = _END.unpack_from(payload)
    if reserved:
        raise _bad("STREAM_END reserved field is not zero")
    if algorithm not in DIGEST_SIZES:
        raise _bad(f"unknown digest algorithm {algorithm}")
    if digest_len != DIGEST_SIZES[DigestAlgorithm(algorithm)]:
        raise _bad(f"digest length {digest_len} does not match algorithm {algorithm}")
    _exact(payload, _END.size + digest_len, FrameType.STREAM_END)
    return StreamEnd(stream_id=stream_id, total_bytes=total, digest_algorithm=algorithm, digest=bytes(payload[_END.size :]))


def _dec_stream_abort(stream_id: int, payload: memoryview) -> StreamAbort:
    _need(payload, _ABORT.size, FrameType.STREAM_ABORT)
    (code,) = _ABORT.unpack_from(payload)
    return StreamAbort(stream_id=stream_id, error_code=code, reason=_text(payload[_ABORT.size :], "abort reason"))


def _dec_window(stream_id: int, payload: memoryview) -> WindowUpdate:
    _exact(payload, _WINDOW.size, FrameType.WINDOW_UPDATE)
    (increment,) = _WINDOW.unpack_from(payload)
    if not 1 <= increment <= MAX_WINDOW:
        raise _bad(f"window increment {increment} outside 1..2**31-1", ErrorCode.FLOW_CONTROL_ERROR)
    return WindowUpdate(stream_id=stream_id, increment=increment)


def _dec_ping(stream_id: int, payload: memoryview) -> Ping:
    _exact(payload, 8, FrameType.PING)
    return Ping(opaque=bytes(payload))


def _dec_pong(stream_id: int, payload: memoryview) -> Pong:
    _exact(payload, 8, FrameType.PONG)
    return Pong(opaque=bytes(payload))


def _dec_goodbye(stream_id: int, payload: memoryview) -> Goodbye:
    _need(payload, _GOODBYE.size, FrameType.GOODBYE)
    last, code = _GOODBYE.unpack_from(payload)
    return Goodbye(last_stream_id=last, error_code=code, reason=_text(payload[_GOODBYE.size :], "goodbye reason"))


def _dec_settings(stream_id: int, payload: memoryview) -> SettingsFrame:
    if len(payload) % _SETTING.size:
        raise _bad(f"SETTINGS length {len(payload)} is not a multiple of 6", ErrorCode.FRAME_SIZE_ERROR)
    return SettingsFrame(settings=tuple(_SETTING.iter_unpack(payload)))


# ---------------------------------------------------------------------------
# The tables: what the codec knows about each type, in one place.

_Encoder = Callable[[Any], list[Buffer]]

#: Record type -> (frame type, encoder).
_RECORD_ENCODERS: dict[type[Any], tuple[FrameType, _Encoder]] = {
    PagesRecord: (FrameType.PAGES, _enc_pages),
    ZeroPagesRecord: (FrameType.ZERO_PAGES, _enc_zero_pages),
    DeviceStateRecord: (FrameType.DEVICE_STATE, _enc_device_state),
    IterationRecord: (FrameType.ITERATION, _enc_iteration),
    ZstdPagesRecord: (FrameType.ZSTD_PAGES, _enc_zstd_pages),
}
#: Frame type -> decoder of a record frame's payload.
_RECORD_DECODERS: dict[FrameType, Callable[[memoryview], Record]] = {
    FrameType.PAGES: _dec_pages,
    FrameType.ZERO_PAGES: _dec_zero_pages,
    FrameType.DEVICE_STATE: _dec_device_state,
    FrameType.ITERATION: _dec_iteration,
    FrameType.ZSTD_PAGES: _dec_zstd_pages,
}
#: Frame class (other than RecordFrame) -> (frame type, encoder).
_FRAME_ENCODERS: dict[type[Frame], tuple[FrameType, _Encoder]] = {
    SettingsFrame: (FrameType.SETTINGS, _enc_settings),
    Ping: (FrameType.PING, _enc_ping),
    Pong: (FrameType.PONG, _enc_ping),
    Goodbye: (FrameType.GOODBYE, _enc_goodbye),
    WindowUpdate: (FrameType.WINDOW_UPDATE, _enc_window),
    RpcCall: (FrameType.RPC_CALL, _enc_rpc),
    RpcReply: (FrameType.RPC_REPLY, _enc_rpc),
    RpcError: (FrameType.RPC_ERROR, _enc_rpc_error),
    StreamOpen: (FrameType.STREAM_OPEN, _enc_stream_open),
    Data: (FrameType.DATA, _enc_data),
    StreamEnd: (FrameType.STREAM_END, _enc_stream_end),
    StreamAbort: (FrameType.STREAM_ABORT, _enc_stream_abort),
}
#: Frame type (other than a record's) -> decoder of its payload.
_FRAME_DECODERS: dict[FrameType, Callable[[int, memoryview], Frame]] = {
    FrameType.SETTINGS: _dec_settings,
    FrameType.PING: _dec_ping,
    FrameType.PONG: _dec_pong,
    FrameType.GOODBYE: _dec_goodbye,
    FrameType.WINDOW_UPDATE: _dec_window,
    FrameType.RPC_CALL: _dec_rpc_call,
    FrameType.RPC_REPLY: _dec_rpc_reply,
    FrameType.RPC_ERROR: _dec_rpc_error,
    FrameType.STREAM_OPEN: _dec_stream_open,
    FrameType.DATA: _dec_data,
    FrameType.STREAM_END: _dec_stream_end,
    FrameType.STREAM_ABORT: _dec_stream_abort,
}
#: Frame types that carry a typed record.
RECORD_FRAMES = frozenset(_RECORD_DECODERS)


def record_frame_type(record: Record) -> FrameType:
    """The frame type that carries *record*."""
    return _RECORD_ENCODERS[type(record)][0]


#: Record type -> the name of the frame type that carries it (for messages).
RECORD_FRAME_NAMES: dict[type[Any], str] = {cls: ftype.name for cls, (ftype, _) in _RECORD_ENCODERS.items()}


def record_decoder(ftype: FrameType) -> Callable[[memoryview], Record] | None:
    """The decoder of *ftype*'s payload into a record, None if *ftype* carries none."""
    return _RECORD_DECODERS.get(ftype)


def frame_type(frame: Frame) -> FrameType:
    if type(frame) is RecordFrame:
        return _RECORD_ENCODERS[type(frame.record)][0]
    return _FRAME_ENCODERS[type(frame)][0]


# ---------------------------------------------------------------------------
# Encoding


def encode_record(record: Record) -> tuple[FrameType, list[Buffer]]:
    """The frame type and the non-empty payload buffers of *record*, validated.

    Bulk data (page contents, device blobs) is the record's own buffer: nothing is copied.
    """
    try:
        ftype, encoder = _RECORD_ENCODERS[type(record)]
    except KeyError:
        raise TypeError(f"not a record: {record!r}") from None
    return ftype, [p for p in encoder(record) if len(p)]


def encode_parts(frame: Frame) -> list[Buffer]:
    """Header and payload buffers of *frame*, ready for ``sendmsg``/writev.

    Bulk payloads (data, page contents, device blobs, RPC bodies) appear as
    the very objects the frame holds: nothing is copied.
    """
    if type(frame) is RecordFrame:
        ftype, parts = encode_record(frame.record)
    else:
        try:
            ftype, encoder = _FRAME_ENCODERS[type(frame)]
        except KeyError:
            raise TypeError(f"not a frame: {frame!r}") from None
        parts = [p for p in encoder(frame) if len(p)]
    if ftype in CONNECTION_FRAMES:
        if frame.stream_id != 0:
            raise LocalProtocolError(f"{ftype.name} frames belong to stream 0")
    elif ftype is not FrameType.WINDOW_UPDATE and frame.stream_id == 0:
        raise LocalProtocolError(f"{ftype.name} frames need a stream id")
    _check_u32("stream id", frame.stream_id)
    length = sum(len(p) for p in parts)
    return [HEADER.pack(length, ftype, 0, 0, frame.stream_id), *parts]


def encode(frame: Frame) -> bytes:
    """The whole frame as one bytes object (copies; for small frames and tests)."""
    return b"".join(encode_parts(frame))


# ---------------------------------------------------------------------------
# Decoding


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


def decode_record(ftype: FrameType, payload: memoryview) -> Record:
    """The record in a record frame's payload (*ftype* in :data:`RECORD_FRAMES`)."""
    return _RECORD_DECODERS[ftype](payload)


def decode_payload(ftype: FrameType, stream_id: int, payload: memoryview) -> Frame:
    """Decode one complete payload whose header passed :func:`check_header`.

    Bulk fields are memoryview slices of *payload* (no copy).  Anything
    malformed raises :class:`RemoteProtocolError` with the matching code.
    """
    record_decoder = _RECORD_DECODERS.get(ftype)
    if record_decoder is not None:
        return RecordFrame(stream_id=stream_id, record=record_decoder(payload))
    return _FRAME_DECODERS[ftype](stream_id, payload)
