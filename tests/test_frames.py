"""Frame encode / decode: every type, hand-checked layouts, every malformed case."""

from __future__ import annotations

import struct
from dataclasses import fields
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tunnel._errors import ErrorCode, LocalProtocolError, RemoteProtocolError
from tunnel._frames import (
    CONNECTION_FRAMES,
    FLOW_CONTROLLED,
    HEADER,
    HEADER_SIZE,
    MAX_WINDOW,
    RECORD_FRAME_NAMES,
    RECORD_FRAMES,
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
    decode,
    decode_record,
    encode,
    encode_parts,
    encode_record,
    frame_type,
    header,
    record_frame_type,
)
from tunnel._reader import FrameReader, RecordItem
from tunnel._records import (
    RECORD_TYPES,
    PagesRecord,
    ZeroPagesRecord,
    bulk_of,
    payload_size,
    record_units,
    split_record,
    with_bulk,
)
from tunnel._settings import MAGIC, PREFACE

try:
    from . import strategies as S
except ImportError:  # tests/ is not a package: pytest put it on sys.path
    import strategies as S  # type: ignore[no-redef]

PE = ErrorCode.PROTOCOL_ERROR
FSE = ErrorCode.FRAME_SIZE_ERROR
FCE = ErrorCode.FLOW_CONTROL_ERROR

STREAM_FRAMES = frozenset(FrameType) - CONNECTION_FRAMES - {FrameType.WINDOW_UPDATE}


def raw(ftype: int, payload: bytes = b"", stream_id: int | None = None, *, flags: int = 0, reserved: int = 0, length: int | None = None) -> bytes:
    """A frame built by hand, header fields as given (valid stream id by default)."""
    if stream_id is None:
        stream_id = 0 if ftype in CONNECTION_FRAMES or ftype == FrameType.WINDOW_UPDATE else 1
    if length is None:
        length = len(payload)
    return HEADER.pack(length, ftype, flags, reserved, stream_id) + payload


def remote_error(buf: bytes, max_frame_size: int = 2**32 - 1) -> RemoteProtocolError:
    with pytest.raises(RemoteProtocolError) as info:
        decode(buf, max_frame_size)
    return info.value


def reader_error(buf: bytes, max_frame_size: int = 16 * 1024 * 1024) -> RemoteProtocolError:
    """The same bytes through the incremental reader, after a valid preface."""
    reader = FrameReader(max_frame_size)
    reader.feed(PREFACE.pack(MAGIC, 1, 1))
    with pytest.raises(RemoteProtocolError) as info:
        reader.feed(buf)
    return info.value


def assert_malformed(buf: bytes, code: int) -> None:
    exc = remote_error(buf)
    assert exc.error_code == code, exc
    assert reader_error(buf).error_code == code


# ---------------------------------------------------------------------------
# One example of every frame type

EXAMPLES: dict[FrameType, Frame] = {
    FrameType.SETTINGS: SettingsFrame(settings=((1, 1 << 20), (2, 4 << 20), (0xFFFF, 0xFFFFFFFF))),
    FrameType.PING: Ping(opaque=b"\x01\x02\x03\x04\x05\x06\x07\x08"),
    FrameType.PONG: Pong(opaque=b"pongpong"),
    FrameType.GOODBYE: Goodbye(last_stream_id=6, error_code=ErrorCode.CANCEL, reason="bye \u00e9"),
    FrameType.WINDOW_UPDATE: WindowUpdate(stream_id=3, increment=MAX_WINDOW),
    FrameType.RPC_CALL: RpcCall(program=0x20008086, version=1, procedure=42, serial=7, body=b"args"),
    FrameType.RPC_REPLY: RpcReply(program=0x20008086, version=1, procedure=42, serial=7, body=b"ret"),
    FrameType.RPC_ERROR: RpcError(program=1, version=2, procedure=3, serial=4, error_code=ErrorCode.BUSY, message="busy \u2603"),
    FrameType.STREAM_OPEN: StreamOpen(
        stream_id=1, kind=StreamKind.MEMORY, digest=DigestAlgorithm.SHA256, migration_id=bytes(range(16)), label="ram"
    ),
    FrameType.DATA: Data(stream_id=1, data=b"QEVM\x00\x00\x00\x03"),
    FrameType.PAGES: Pages(stream_id=1, region=2, page_size=4096, addresses=(0, 0x7000), data=bytes(range(256)) * 32),
    FrameType.ZERO_PAGES: ZeroPages(stream_id=1, region=2, page_size=4096, runs=((0x1000, 5), (2**64 - 4096, 1))),
    FrameType.DEVICE_STATE: DeviceState(stream_id=5, name="0000:00:02.0/virtio-net", version=3, data=b"\xff" * 100),
    FrameType.STREAM_END: StreamEnd(stream_id=1, total_bytes=2**64 - 1, digest_algorithm=DigestAlgorithm.CRC32, digest=b"\x12\x34\x56\x78"),
    FrameType.STREAM_ABORT: StreamAbort(stream_id=1, error_code=ErrorCode.DIGEST_MISMATCH, reason="crc"),
    FrameType.ITERATION: Iteration(stream_id=1, iteration=3, final=True),
    FrameType.ZSTD_PAGES: ZstdPages(stream_id=1, region=2, page_size=4096, addresses=(0, 0x7000), compressed=b"\x28\xb5\x2f\xfd" + b"z" * 40),
}


def test_examples_cover_every_frame_type() -> None:
    assert set(EXAMPLES) == set(FrameType)
    for ftype, frame in EXAMPLES.items():
        assert frame_type(frame) is ftype


@pytest.mark.parametrize("ftype", list(FrameType), ids=lambda t: t.name)
def test_example_round_trip(ftype: FrameType) -> None:
    frame = EXAMPLES[ftype]
    buf = encode(frame)
    length, t, flags, reserved, sid = HEADER.unpack_from(buf)
    assert (t, flags, reserved, sid) == (ftype, 0, 0, frame.stream_id)
    assert length == len(buf) - HEADER_SIZE
    back = decode(buf)
    assert type(back) is type(frame)
    assert back == frame
    for f in fields(frame):
        assert _plain(getattr(back, f.name)) == _plain(getattr(frame, f.name)), f.name


def _plain(value: Any) -> Any:
    return bytes(value) if isinstance(value, memoryview | bytearray) else value


# ---------------------------------------------------------------------------
# Byte layouts checked by hand

LAYOUTS: list[tuple[Frame, str]] = [
    (Ping(opaque=b"12345678"), "00000008 02 00 0000 00000000 3132333435363738"),
    (Pong(opaque=b"\0" * 8), "00000008 03 00 0000 00000000 0000000000000000"),
    (WindowUpdate(stream_id=5, increment=0x1000), "00000004 05 00 0000 00000005 00001000"),
    (WindowUpdate(stream_id=0, increment=MAX_WINDOW), "00000004 05 00 0000 00000000 7fffffff"),
    (
        SettingsFrame(settings=((1, 0x100000), (2, 0x400000))),
        "0000000c 01 00 0000 00000000 0001 00100000 0002 00400000",
    ),
    (SettingsFrame(), "00000000 01 00 0000 00000000"),
    (Data(stream_id=1, data=b"abc"), "00000003 21 00 0000 00000001 616263"),
    (Data(stream_id=0xFFFFFFFF, data=b""), "00000000 21 00 0000 ffffffff"),
    (
        Pages(stream_id=3, region=7, page_size=512, addresses=(0x400,), data=b"\xaa" * 512),
        "00000218 22 00 0000 00000003 00000007 00000001 00000200 00000000 0000000000000400" + "aa" * 512,
    ),
    (
        ZeroPages(stream_id=3, region=1, page_size=4096, runs=((0x1000, 3),)),
        "00000020 23 00 0000 00000003 00000001 00000001 00001000 00000000 0000000000001000 0000000000000003",
    ),
    (
        DeviceState(stream_id=9, name="rtc", version=2, data=b"\x01\x02"),
        "0000000b 24 00 0000 00000009 00000002 0003 727463 0102",
    ),
    (
        StreamOpen(stream_id=1, kind=StreamKind.MEMORY, digest=DigestAlgorithm.CRC32, migration_id=bytes(range(16)), label="ram"),
        "00000017 20 00 0000 00000001 01 01 0000 000102030405060708090a0b0c0d0e0f 72616d",
    ),
    (
        StreamEnd(stream_id=1, total_bytes=0x0102030405060708, digest_algorithm=DigestAlgorithm.CRC32, digest=b"\xde\xad\xbe\xef"),
        "00000010 25 00 0000 00000001 0102030405060708 01 04 0000 deadbeef",
    ),
    (StreamEnd(stream_id=2, total_bytes=0), "0000000c 25 00 0000 00000002 0000000000000000 00 00 0000"),
    (StreamAbort(stream_id=1, error_code=9, reason="x"), "00000005 26 00 0000 00000001 00000009 78"),
    (Iteration(stream_id=1, iteration=0), "00000008 27 00 0000 00000001 00000000 00000000"),
    (Iteration(stream_id=3, iteration=0x0102, final=True), "00000008 27 00 0000 00000003 00000102 00000001"),
    (
        ZstdPages(stream_id=3, region=7, page_size=512, addresses=(0x400, 0x800), compressed=b"\x01\x02\x03"),
        "00000023 28 00 0000 00000003 00000007 00000002 00000200 00000000 0000000000000400 0000000000000800 010203",
    ),
    (Goodbye(last_stream_id=7, error_code=1, reason="\u00e9"), "0000000a 04 00 0000 00000000 00000007 00000001 c3a9"),
    (
        RpcCall(program=0x20008086, version=1, procedure=42, serial=5, body=b"hi"),
        "00000012 10 00 0000 00000000 20008086 00000001 0000002a 00000005 6869",
    ),
    (
        RpcReply(program=0x20008086, version=1, procedure=42, serial=5),
        "00000010 11 00 0000 00000000 20008086 00000001 0000002a 00000005",
    ),
    (
        RpcError(program=1, version=2, procedure=3, serial=4, error_code=14, message="no"),
        "00000016 12 00 0000 00000000 00000001 00000002 00000003 00000004 0000000e 6e6f",
    ),
]


@pytest.mark.parametrize(("frame", "layout"), LAYOUTS, ids=lambda x: type(x).__name__ if isinstance(x, Frame) else "")
def test_layout(frame: Frame, layout: str) -> None:
    expected = bytes.fromhex(layout.replace(" ", ""))
    assert encode(frame) == expected
    assert decode(expected) == frame


def test_header_helper_matches_encoder() -> None:
    assert header(FrameType.DATA, 5, 10) == encode_parts(Data(stream_id=5, data=b"x" * 10))[0]
    assert header(FrameType.DATA, 5, 10) == bytes.fromhex("0000000a 21 00 0000 00000005".replace(" ", ""))


def test_empty_parts_are_dropped() -> None:
    parts = encode_parts(Data(stream_id=1, data=b""))
    assert len(parts) == 1 and len(parts[0]) == HEADER_SIZE
    parts = encode_parts(RpcCall(program=1, version=1, procedure=1, serial=1))
    assert [len(p) for p in parts] == [HEADER_SIZE, 16]


# ---------------------------------------------------------------------------
# Zero copy, both ways


@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview])
def test_encode_parts_passes_bulk_through(kind: type) -> None:
    blob = kind(b"\x5a" * 8192)
    cases: list[tuple[Frame, int]] = [
        (Data(stream_id=1, data=blob), 1),
        (Pages(stream_id=1, region=0, page_size=4096, addresses=(0, 4096), data=blob), 2),
        (ZstdPages(stream_id=1, region=0, page_size=4096, addresses=(0, 4096), compressed=blob), 2),
        (DeviceState(stream_id=1, name="dev", data=blob), 2),
        (RpcCall(program=1, version=1, procedure=1, serial=1, body=blob), 2),
        (RpcReply(program=1, version=1, procedure=1, serial=1, body=blob), 2),
    ]
    for frame, index in cases:
        parts = encode_parts(frame)
        assert parts[index] is blob, type(frame).__name__
        assert len(parts) == index + 1
        assert sum(len(p) for p in parts) - HEADER_SIZE == HEADER.unpack_from(parts[0])[0]


def _bulk_of(frame: Frame) -> Any:
    if isinstance(frame, RecordFrame):
        return bulk_of(frame.record)
    if isinstance(frame, Data):
        return frame.data
    if isinstance(frame, RpcCall | RpcReply):
        return frame.body
    return None


@settings(max_examples=300, deadline=None)
@given(S.frames())
def test_encode_parts_never_copies_bulk(frame: Frame) -> None:
    bulk = _bulk_of(frame)
    parts = encode_parts(frame)
    if bulk is not None and len(bulk):
        assert any(p is bulk for p in parts)
        assert parts[-1] is bulk
    assert b"".join(parts) == encode(frame)


def test_decode_gives_views_of_the_buffer() -> None:
    for ftype in (FrameType.DATA, FrameType.PAGES, FrameType.ZSTD_PAGES, FrameType.DEVICE_STATE, FrameType.RPC_CALL, FrameType.RPC_REPLY):
        buf = bytearray(encode(EXAMPLES[ftype]))
        frame = decode(buf)
        bulk = _bulk_of(frame)
        assert isinstance(bulk, memoryview), ftype
        assert bulk.obj is buf, ftype
        assert len(bulk) > 0
        # Writing to the buffer shows through: the field is not a copy.
        offset = len(buf) - len(bulk)
        assert bulk.tobytes() == bytes(buf[offset:])
        buf[-1] ^= 0xFF
        assert bulk[-1] == buf[-1]


def test_decode_small_fields_are_immutable_copies() -> None:
    # Short fixed fields are bytes, so a frame stays valid after the buffer is reused.
    for ftype in (FrameType.PING, FrameType.PONG, FrameType.STREAM_OPEN, FrameType.STREAM_END, FrameType.ITERATION, FrameType.ZERO_PAGES):
        frame = decode(bytearray(encode(EXAMPLES[ftype])))
        holder = frame.record if isinstance(frame, RecordFrame) else frame
        for f in fields(holder):
            assert not isinstance(getattr(holder, f.name), memoryview | bytearray), (ftype, f.name)


# ---------------------------------------------------------------------------
# Hypothesis round trips


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(S.frames())
def test_round_trip_any_frame(frame: Frame) -> None:
    buf = encode(frame)
    back = decode(buf)
    assert type(back) is type(frame)
    assert back == frame
    length = len(buf) - HEADER_SIZE
    assert decode(buf, max_frame_size=length) == frame
    if length:
        assert remote_error(buf, max_frame_size=length - 1).error_code == FSE


PER_TYPE: dict[str, st.SearchStrategy[Any]] = {
    "settings": S.settings_frames(),
    "ping": S.pings(),
    "pong": S.pongs(),
    "goodbye": S.goodbyes(),
    "window_update": S.window_updates(),
    "rpc_call": S.rpc_calls(),
    "rpc_reply": S.rpc_replies(),
    "rpc_error": S.rpc_errors(),
    "stream_open": S.stream_opens(),
    "data": S.data_frames(),
    "pages": S.pages(),
    "pages_huge": S.pages(max_page_shift=21, max_pages=2, cheap_data=True),
    "zero_pages": S.zero_pages(),
    "device_state": S.device_states(),
    "stream_end": S.stream_ends(),
    "stream_abort": S.stream_aborts(),
    "iteration": S.iterations(),
    "zstd_pages": S.zstd_pages(),
}


@pytest.mark.parametrize("name", list(PER_TYPE))
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_round_trip_per_type(name: str, data: st.DataObject) -> None:
    frame = data.draw(PER_TYPE[name])
    back = decode(encode(frame))
    assert back == frame
    assert {f.name: _plain(getattr(back, f.name)) for f in fields(back)} == {
        f.name: _plain(getattr(frame, f.name)) for f in fields(frame)
    }


@settings(max_examples=400, deadline=None)
@given(st.sampled_from(FrameType), st.binary(max_size=200), st.data())
def test_decode_arbitrary_payload(ftype: FrameType, payload: bytes, data: st.DataObject) -> None:
    """A well-formed header with any payload: a frame that re-encodes to the
    same bytes (the encoding is canonical and encode accepts whatever decode
    does), or RemoteProtocolError."""
    if ftype in CONNECTION_FRAMES:
        sid = 0
    elif ftype == FrameType.WINDOW_UPDATE:
        sid = data.draw(S.u32)
    else:
        sid = data.draw(S.stream_ids)
    buf = raw(ftype, payload, sid)
    try:
        frame = decode(buf)
    except RemoteProtocolError as exc:
        assert exc.error_code in (PE, FSE, FCE)
        return
    assert frame_type(frame) is ftype
    assert encode(frame) == buf


# ---------------------------------------------------------------------------
# Malformed input: RemoteProtocolError with the right code


def test_shorter_than_header() -> None:
    for n in range(HEADER_SIZE):
        assert remote_error(b"\0" * n).error_code == FSE


def test_length_field_disagrees_with_bytes() -> None:
    good = encode(EXAMPLES[FrameType.PING])
    assert remote_error(good[:-1]).error_code == FSE
    assert remote_error(good + b"\0").error_code == FSE


@pytest.mark.parametrize("ftype_raw", [0x00, 0x06, 0x0F, 0x13, 0x1F, 0x29, 0x2F, 0x80, 0xFF])
def test_unknown_frame_type(ftype_raw: int) -> None:
    assert_malformed(raw(ftype_raw, b"", 0), PE)
    assert_malformed(raw(ftype_raw, b"xx", 1), PE)


@pytest.mark.parametrize("ftype", list(FrameType), ids=lambda t: t.name)
def test_flags_and_reserved_must_be_zero(ftype: FrameType) -> None:
    payload = encode(EXAMPLES[ftype])[HEADER_SIZE:]
    sid = EXAMPLES[ftype].stream_id
    for flags in (0x01, 0x80, 0xFF):
        assert_malformed(raw(ftype, payload, sid, flags=flags), PE)
    for reserved in (0x0001, 0x8000, 0xFFFF):
        assert_malformed(raw(ftype, payload, sid, reserved=reserved), PE)


@pytest.mark.parametrize("ftype", sorted(CONNECTION_FRAMES), ids=lambda t: t.name)
def test_connection_frames_need_stream_zero(ftype: FrameType) -> None:
    payload = encode(EXAMPLES[ftype])[HEADER_SIZE:]
    decode(raw(ftype, payload, 0))
    for sid in (1, 2, 0xFFFFFFFF):
        assert_malformed(raw(ftype, payload, sid), PE)


@pytest.mark.parametrize("ftype", sorted(STREAM_FRAMES), ids=lambda t: t.name)
def test_stream_frames_need_a_stream(ftype: FrameType) -> None:
    payload = encode(EXAMPLES[ftype])[HEADER_SIZE:]
    decode(raw(ftype, payload, 1))
    assert_malformed(raw(ftype, payload, 0), PE)


def test_window_update_on_any_stream() -> None:
    for sid in (0, 1, 2, 0xFFFFFFFF):
        assert decode(raw(FrameType.WINDOW_UPDATE, struct.pack(">I", 1), sid)) == WindowUpdate(stream_id=sid, increment=1)


@pytest.mark.parametrize("ftype", list(FrameType), ids=lambda t: t.name)
def test_length_above_max_frame_size(ftype: FrameType) -> None:
    buf = encode(EXAMPLES[ftype])
    n = len(buf) - HEADER_SIZE
    decode(buf, max_frame_size=n)
    if n:
        assert remote_error(buf, max_frame_size=n - 1).error_code == FSE


# Minimum payload sizes of the variable-length frames.
MINIMUM = {
    FrameType.PAGES: 16,
    FrameType.ZERO_PAGES: 16,
    FrameType.RPC_CALL: 16,
    FrameType.RPC_REPLY: 16,
    FrameType.RPC_ERROR: 20,
    FrameType.DEVICE_STATE: 6,
    FrameType.STREAM_OPEN: 20,
    FrameType.STREAM_END: 12,
    FrameType.STREAM_ABORT: 4,
    FrameType.GOODBYE: 8,
    FrameType.ZSTD_PAGES: 17,  # the head, no addresses, and at least one byte of zstd frame
}
EXACT = {FrameType.WINDOW_UPDATE: 4, FrameType.PING: 8, FrameType.PONG: 8, FrameType.ITERATION: 8}


@pytest.mark.parametrize("ftype", list(MINIMUM), ids=lambda t: t.name)
def test_short_payloads(ftype: FrameType) -> None:
    payload = encode(EXAMPLES[ftype])[HEADER_SIZE:]
    assert len(payload) >= MINIMUM[ftype]
    for n in range(MINIMUM[ftype]):
        assert_malformed(raw(ftype, payload[:n]), FSE)


@pytest.mark.parametrize("ftype", list(EXACT), ids=lambda t: t.name)
def test_exact_lengths(ftype: FrameType) -> None:
    payload = encode(EXAMPLES[ftype])[HEADER_SIZE:]
    assert len(payload) == EXACT[ftype]
    for n in range(EXACT[ftype]):
        assert_malformed(raw(ftype, payload[:n]), FSE)
    assert_malformed(raw(ftype, payload + b"\0"), FSE)
    assert_malformed(raw(ftype, payload + b"\0" * 100), FSE)


def _pages_payload(region: int = 0, count: int = 1, page_size: int = 4096, reserved: int = 0, addresses: tuple[int, ...] = (0,)) -> bytes:
    data = b"\x11" * (len(addresses) * page_size)
    return struct.pack(">IIII", region, count, page_size, reserved) + struct.pack(f">{len(addresses)}Q", *addresses) + data


def _zero_payload(region: int = 0, count: int = 1, page_size: int = 4096, reserved: int = 0, runs: tuple[tuple[int, int], ...] = ((0, 1),)) -> bytes:
    flat = [x for run in runs for x in run]
    return struct.pack(">IIII", region, count, page_size, reserved) + struct.pack(f">{len(flat)}Q", *flat)


def test_pages_helpers_are_valid() -> None:
    assert decode(raw(FrameType.PAGES, _pages_payload())) == Pages(
        stream_id=1, region=0, page_size=4096, addresses=(0,), data=b"\x11" * 4096
    )
    assert decode(raw(FrameType.ZERO_PAGES, _zero_payload())) == ZeroPages(stream_id=1, region=0, page_size=4096, runs=((0, 1),))


def test_pages_count_disagrees_with_length() -> None:
    good = _pages_payload(count=2, addresses=(0, 4096))
    assert_malformed(raw(FrameType.PAGES, good[:-1]), FSE)
    assert_malformed(raw(FrameType.PAGES, good + b"\0"), FSE)
    assert_malformed(raw(FrameType.PAGES, _pages_payload(count=3, addresses=(0, 4096))), FSE)
    assert_malformed(raw(FrameType.PAGES, _pages_payload(count=1, addresses=(0, 4096))), FSE)
    # A huge count is refused by arithmetic, before anything is unpacked.
    assert_malformed(raw(FrameType.PAGES, _pages_payload(count=0xFFFFFFFF)), FSE)
    assert_malformed(raw(FrameType.PAGES, _pages_payload(count=1, addresses=())), FSE)


def test_zero_pages_count_disagrees_with_length() -> None:
    good = _zero_payload(count=2, runs=((0, 1), (8192, 2)))
    assert decode(raw(FrameType.ZERO_PAGES, good)).record.runs == ((0, 1), (8192, 2))  # type: ignore[attr-defined]
    assert_malformed(raw(FrameType.ZERO_PAGES, good[:-1]), FSE)
    assert_malformed(raw(FrameType.ZERO_PAGES, good + b"\0"), FSE)
    assert_malformed(raw(FrameType.ZERO_PAGES, good[:-8]), FSE)
    assert_malformed(raw(FrameType.ZERO_PAGES, _zero_payload(count=0xFFFFFFFF)), FSE)


def test_pages_reserved_field() -> None:
    assert_malformed(raw(FrameType.PAGES, _pages_payload(reserved=1)), PE)
    assert_malformed(raw(FrameType.ZERO_PAGES, _zero_payload(reserved=0x80000000)), PE)


BAD_PAGE_SIZES = [0, 1, 256, 511, 513, 1000, 3000, 4095, 4097, 6144, 1 << 22, (1 << 21) + 1, 1 << 31, 0xFFFFFFFF]


@pytest.mark.parametrize("page_size", BAD_PAGE_SIZES)
def test_bad_page_size(page_size: int) -> None:
    # Lengths consistent with the page size, so only the size itself is wrong.
    header16 = struct.pack(">IIII", 0, 0, page_size, 0)
    assert_malformed(raw(FrameType.PAGES, header16), PE)
    assert_malformed(raw(FrameType.ZERO_PAGES, header16), PE)


@pytest.mark.parametrize("shift", range(9, 22))
def test_every_power_of_two_page_size(shift: int) -> None:
    page_size = 1 << shift
    assert decode(raw(FrameType.PAGES, struct.pack(">IIII", 0, 0, page_size, 0))) == Pages(
        stream_id=1, region=0, page_size=page_size, addresses=(), data=b""
    )
    zp = decode(raw(FrameType.ZERO_PAGES, _zero_payload(page_size=page_size, runs=((page_size * 3, 2),))))
    assert zp == ZeroPages(stream_id=1, region=0, page_size=page_size, runs=((page_size * 3, 2),))


@pytest.mark.parametrize("address", [1, 512, 2048, 4095, 4097, 2**64 - 1, 2**63 + 8])
def test_misaligned_page_address(address: int) -> None:
    assert_malformed(raw(FrameType.PAGES, _pages_payload(count=2, addresses=(4096, address))), PE)
    assert_malformed(raw(FrameType.ZERO_PAGES, _zero_payload(count=2, runs=((0, 1), (address, 1)))), PE)


def test_zero_length_zero_page_run() -> None:
    assert_malformed(raw(FrameType.ZERO_PAGES, _zero_payload(runs=((4096, 0),))), PE)
    assert_malformed(raw(FrameType.ZERO_PAGES, _zero_payload(count=2, runs=((0, 1), (4096, 0)))), PE)


# ---------------------------------------------------------------------------
# ITERATION and ZSTD_PAGES


@pytest.mark.parametrize("flags", [0x2, 0x3, 0x80, 0x8000_0000, 0xFFFF_FFFE, 0xFFFF_FFFF])
def test_iteration_undefined_flags(flags: int) -> None:
    assert_malformed(raw(FrameType.ITERATION, struct.pack(">II", 5, flags)), PE)


@pytest.mark.parametrize(("flags", "final"), [(0, False), (1, True)])
def test_iteration_flags(flags: int, final: bool) -> None:
    assert decode(raw(FrameType.ITERATION, struct.pack(">II", 0xFFFFFFFF, flags))) == Iteration(
        stream_id=1, iteration=0xFFFFFFFF, final=final
    )


def _zstd_payload(count: int = 1, page_size: int = 4096, reserved: int = 0, addresses: tuple[int, ...] = (0,), compressed: bytes = b"z") -> bytes:
    return struct.pack(">IIII", 7, count, page_size, reserved) + struct.pack(f">{len(addresses)}Q", *addresses) + compressed


def test_zstd_pages_lengths() -> None:
    # Any compressed length of at least one byte: the core does not look inside.
    for compressed in (b"z", b"\0" * 1000):
        frame = decode(raw(FrameType.ZSTD_PAGES, _zstd_payload(count=2, addresses=(0, 8192), compressed=compressed)))
        assert frame == ZstdPages(stream_id=1, region=7, page_size=4096, addresses=(0, 8192), compressed=compressed)
    # No compressed byte at all, or fewer addresses than count says.
    assert_malformed(raw(FrameType.ZSTD_PAGES, _zstd_payload(compressed=b"")), FSE)
    assert_malformed(raw(FrameType.ZSTD_PAGES, _zstd_payload(count=2, addresses=(0,), compressed=b"1234567")), FSE)
    # A huge count is refused by arithmetic, before anything is unpacked.
    assert_malformed(raw(FrameType.ZSTD_PAGES, _zstd_payload(count=0xFFFFFFFF)), FSE)
    # count 0 with a (compressed empty) frame is legal.
    assert decode(raw(FrameType.ZSTD_PAGES, _zstd_payload(count=0, addresses=()))) == ZstdPages(
        stream_id=1, region=7, page_size=4096, addresses=(), compressed=b"z"
    )


def test_zstd_pages_fields() -> None:
    assert_malformed(raw(FrameType.ZSTD_PAGES, _zstd_payload(reserved=1)), PE)
    for page_size in BAD_PAGE_SIZES:
        assert_malformed(raw(FrameType.ZSTD_PAGES, _zstd_payload(count=0, addresses=(), page_size=page_size)), PE)
    for address in (1, 2048, 4095, 2**64 - 1):
        assert_malformed(raw(FrameType.ZSTD_PAGES, _zstd_payload(count=2, addresses=(0, address))), PE)


BAD_UTF8 = [b"\xff", b"\xc3", b"abc\x80", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80", b"\xc0\xaf"]


@pytest.mark.parametrize("bad", BAD_UTF8, ids=lambda b: b.hex())
def test_bad_utf8_in_text_fields(bad: bytes) -> None:
    cases = [
        (FrameType.RPC_ERROR, struct.pack(">IIIII", 1, 1, 1, 1, 1) + bad),
        (FrameType.DEVICE_STATE, struct.pack(">IH", 0, len(bad)) + bad + b"blob"),
        (FrameType.STREAM_OPEN, struct.pack(">BBH16s", 0, 0, 0, b"\0" * 16) + bad),
        (FrameType.STREAM_ABORT, struct.pack(">I", 9) + bad),
        (FrameType.GOODBYE, struct.pack(">II", 0, 0) + bad),
    ]
    for ftype, payload in cases:
        assert_malformed(raw(ftype, payload), PE)


def test_device_name_longer_than_payload() -> None:
    assert_malformed(raw(FrameType.DEVICE_STATE, struct.pack(">IH", 0, 4) + b"abc"), FSE)
    assert_malformed(raw(FrameType.DEVICE_STATE, struct.pack(">IH", 0, 0xFFFF)), FSE)
    # A name taking the whole rest of the payload leaves empty data: fine.
    assert decode(raw(FrameType.DEVICE_STATE, struct.pack(">IH", 7, 3) + b"abc")) == DeviceState(
        stream_id=1, name="abc", version=7, data=b""
    )


def test_stream_open_reserved_and_digest() -> None:
    assert_malformed(raw(FrameType.STREAM_OPEN, struct.pack(">BBH16s", 0, 0, 1, b"\0" * 16)), PE)
    for digest in (3, 4, 0x80, 0xFF):
        assert_malformed(raw(FrameType.STREAM_OPEN, struct.pack(">BBH16s", 0, digest, 0, b"\0" * 16)), PE)
    # Kind is informative: any byte is accepted.
    assert decode(raw(FrameType.STREAM_OPEN, struct.pack(">BBH16s", 0xFF, 2, 0, b"\1" * 16))) == StreamOpen(
        stream_id=1, kind=0xFF, digest=DigestAlgorithm.SHA256, migration_id=b"\1" * 16
    )


def _end(total: int = 0, algorithm: int = 0, digest_len: int = 0, reserved: int = 0, digest: bytes = b"") -> bytes:
    return struct.pack(">QBBH", total, algorithm, digest_len, reserved) + digest


def test_stream_end_malformed() -> None:
    assert_malformed(raw(FrameType.STREAM_END, _end(reserved=1)), PE)
    # Unknown algorithm.
    for algorithm in (3, 0x7F, 0xFF):
        assert_malformed(raw(FrameType.STREAM_END, _end(algorithm=algorithm)), PE)
    # Digest length field disagrees with the algorithm.
    assert_malformed(raw(FrameType.STREAM_END, _end(algorithm=1, digest_len=32, digest=b"\0" * 32)), PE)
    assert_malformed(raw(FrameType.STREAM_END, _end(algorithm=2, digest_len=4, digest=b"\0" * 4)), PE)
    assert_malformed(raw(FrameType.STREAM_END, _end(algorithm=0, digest_len=4, digest=b"\0" * 4)), PE)
    # Digest bytes disagree with the (correct) length field.
    assert_malformed(raw(FrameType.STREAM_END, _end(algorithm=1, digest_len=4, digest=b"\0" * 3)), FSE)
    assert_malformed(raw(FrameType.STREAM_END, _end(algorithm=1, digest_len=4, digest=b"\0" * 5)), FSE)
    assert_malformed(raw(FrameType.STREAM_END, _end(algorithm=0, digest=b"\0")), FSE)
    assert_malformed(raw(FrameType.STREAM_END, _end(algorithm=2, digest_len=32, digest=b"\0" * 31)), FSE)
    assert decode(raw(FrameType.STREAM_END, _end(total=5, algorithm=2, digest_len=32, digest=b"\7" * 32))) == StreamEnd(
        stream_id=1, total_bytes=5, digest_algorithm=DigestAlgorithm.SHA256, digest=b"\7" * 32
    )


@pytest.mark.parametrize("increment", [0, 2**31, 2**31 + 1, 0xFFFFFFFF])
def test_window_increment_out_of_range(increment: int) -> None:
    for sid in (0, 1):
        assert_malformed(raw(FrameType.WINDOW_UPDATE, struct.pack(">I", increment), sid), FCE)


def test_window_increment_bounds_accepted() -> None:
    for increment in (1, MAX_WINDOW):
        assert decode(raw(FrameType.WINDOW_UPDATE, struct.pack(">I", increment))).increment == increment  # type: ignore[attr-defined]


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 7, 11, 13, 601])
def test_settings_length_not_multiple_of_six(n: int) -> None:
    assert_malformed(raw(FrameType.SETTINGS, b"\0" * n), FSE)


def test_settings_keeps_unknown_and_duplicate_ids_for_the_connection_to_judge() -> None:
    payload = struct.pack(">HIHIHI", 0xFFFF, 1, 1, 2, 1, 3)
    assert decode(raw(FrameType.SETTINGS, payload)) == SettingsFrame(settings=((0xFFFF, 1), (1, 2), (1, 3)))


def test_reader_wraps_decoded_flow_controlled_frames() -> None:
    reader = FrameReader(1 << 20)
    items = reader.feed(PREFACE.pack(MAGIC, 1, 1) + encode(EXAMPLES[FrameType.PAGES]) + encode(EXAMPLES[FrameType.PING]))
    pages = EXAMPLES[FrameType.PAGES]
    assert isinstance(pages, RecordFrame)
    assert isinstance(items[1], RecordItem)
    assert (items[1].stream_id, items[1].record) == (pages.stream_id, pages.record)
    assert bytes(items[1].payload) == encode(pages)[HEADER_SIZE:]
    assert items[2] == EXAMPLES[FrameType.PING]


# ---------------------------------------------------------------------------
# Encode side: the local application's mistakes


SURROGATE = "bad \ud800 text"
BAD_ENCODES: list[tuple[str, Frame]] = [
    # stream id rules
    ("ping-stream-1", Ping(stream_id=1)),
    ("goodbye-stream-3", Goodbye(stream_id=3)),
    ("settings-stream-1", SettingsFrame(stream_id=1)),
    ("rpc-call-stream-1", RpcCall(stream_id=1, program=1, version=1, procedure=1, serial=1)),
    ("data-stream-0", Data(stream_id=0, data=b"x")),
    ("pages-stream-0", Pages(stream_id=0, region=0, page_size=4096, addresses=(), data=b"")),
    ("open-stream-0", StreamOpen(stream_id=0)),
    ("end-stream-0", StreamEnd(stream_id=0, total_bytes=0)),
    ("abort-stream-0", StreamAbort(stream_id=0, error_code=0)),
    ("device-stream-0", DeviceState(stream_id=0, name="x")),
    ("zero-stream-0", ZeroPages(stream_id=0, region=0, page_size=4096, runs=())),
    ("data-stream-negative", Data(stream_id=-1, data=b"x")),
    ("data-stream-2**32", Data(stream_id=2**32, data=b"x")),
    ("window-stream-2**32", WindowUpdate(stream_id=2**32, increment=1)),
    # pages
    *[
        (f"pages-size-{ps}", Pages(stream_id=1, region=0, page_size=ps, addresses=(0,), data=b"\0" * max(ps, 0)))
        for ps in (0, 256, 1000, 4097, 1 << 22, -4096)
    ],
    ("pages-data-short", Pages(stream_id=1, region=0, page_size=4096, addresses=(0, 4096), data=b"\0" * 8191)),
    ("pages-data-long", Pages(stream_id=1, region=0, page_size=4096, addresses=(0,), data=b"\0" * 4097)),
    ("pages-misaligned", Pages(stream_id=1, region=0, page_size=4096, addresses=(100,), data=b"\0" * 4096)),
    ("pages-negative-address", Pages(stream_id=1, region=0, page_size=4096, addresses=(-4096,), data=b"\0" * 4096)),
    ("pages-address-2**64", Pages(stream_id=1, region=0, page_size=4096, addresses=(2**64,), data=b"\0" * 4096)),
    ("pages-region", Pages(stream_id=1, region=2**32, page_size=4096, addresses=(), data=b"")),
    # zero pages
    ("zero-size", ZeroPages(stream_id=1, region=0, page_size=3000, runs=())),
    ("zero-count-0", ZeroPages(stream_id=1, region=0, page_size=4096, runs=((0, 0),))),
    ("zero-count-2**64", ZeroPages(stream_id=1, region=0, page_size=4096, runs=((0, 2**64),))),
    ("zero-count-negative", ZeroPages(stream_id=1, region=0, page_size=4096, runs=((0, -1),))),
    ("zero-misaligned", ZeroPages(stream_id=1, region=0, page_size=4096, runs=((512, 1),))),
    ("zero-negative-address", ZeroPages(stream_id=1, region=0, page_size=4096, runs=((-4096, 1),))),
    ("zero-address-2**64", ZeroPages(stream_id=1, region=0, page_size=4096, runs=((2**64, 1),))),
    ("zero-region", ZeroPages(stream_id=1, region=-1, page_size=4096, runs=())),
    # rpc
    ("call-program", RpcCall(program=2**32, version=1, procedure=1, serial=1)),
    ("call-serial", RpcCall(program=1, version=1, procedure=1, serial=-1)),
    ("reply-procedure", RpcReply(program=1, version=1, procedure=2**32, serial=1)),
    ("error-code", RpcError(program=1, version=1, procedure=1, serial=1, error_code=2**32)),
    ("error-message", RpcError(program=1, version=1, procedure=1, serial=1, error_code=1, message=SURROGATE)),
    # device state
    ("device-name-long", DeviceState(stream_id=1, name="x" * 0x10000)),
    ("device-name-long-utf8", DeviceState(stream_id=1, name="\u00e9" * 0x8000)),
    ("device-name-surrogate", DeviceState(stream_id=1, name=SURROGATE)),
    ("device-version", DeviceState(stream_id=1, name="x", version=2**32)),
    # stream open / end / abort
    ("open-id-short", StreamOpen(stream_id=1, migration_id=b"\0" * 15)),
    ("open-id-long", StreamOpen(stream_id=1, migration_id=b"\0" * 17)),
    ("open-kind-256", StreamOpen(stream_id=1, kind=256)),
    ("open-kind-negative", StreamOpen(stream_id=1, kind=-1)),
    ("open-digest", StreamOpen(stream_id=1, digest=3)),
    ("open-label", StreamOpen(stream_id=1, label=SURROGATE)),
    ("end-total-2**64", StreamEnd(stream_id=1, total_bytes=2**64)),
    ("end-total-negative", StreamEnd(stream_id=1, total_bytes=-1)),
    ("end-algorithm", StreamEnd(stream_id=1, total_bytes=0, digest_algorithm=3)),
    ("end-digest-short", StreamEnd(stream_id=1, total_bytes=0, digest_algorithm=DigestAlgorithm.CRC32, digest=b"\0" * 3)),
    ("end-digest-none", StreamEnd(stream_id=1, total_bytes=0, digest_algorithm=DigestAlgorithm.NONE, digest=b"\0")),
    ("end-digest-sha", StreamEnd(stream_id=1, total_bytes=0, digest_algorithm=DigestAlgorithm.SHA256, digest=b"\0" * 4)),
    ("abort-code", StreamAbort(stream_id=1, error_code=2**32)),
    # iteration
    ("iteration-stream-0", Iteration(stream_id=0, iteration=1)),
    ("iteration-2**32", Iteration(stream_id=1, iteration=2**32)),
    ("iteration-negative", Iteration(stream_id=1, iteration=-1)),
    # zstd pages
    ("zstd-stream-0", ZstdPages(stream_id=0, region=0, page_size=4096, addresses=(), compressed=b"z")),
    ("zstd-empty", ZstdPages(stream_id=1, region=0, page_size=4096, addresses=(0,), compressed=b"")),
    ("zstd-size", ZstdPages(stream_id=1, region=0, page_size=1000, addresses=(), compressed=b"z")),
    ("zstd-misaligned", ZstdPages(stream_id=1, region=0, page_size=4096, addresses=(100,), compressed=b"z")),
    ("zstd-address-2**64", ZstdPages(stream_id=1, region=0, page_size=4096, addresses=(2**64,), compressed=b"z")),
    ("zstd-region", ZstdPages(stream_id=1, region=2**32, page_size=4096, addresses=(), compressed=b"z")),
    ("abort-reason", StreamAbort(stream_id=1, error_code=1, reason=SURROGATE)),
    # connection frames
    ("window-0", WindowUpdate(stream_id=0, increment=0)),
    ("window-2**31", WindowUpdate(stream_id=1, increment=2**31)),
    ("window-negative", WindowUpdate(stream_id=1, increment=-1)),
    ("ping-7", Ping(opaque=b"\0" * 7)),
    ("ping-9", Ping(opaque=b"\0" * 9)),
    ("pong-0", Pong(opaque=b"")),
    ("goodbye-last", Goodbye(last_stream_id=2**32)),
    ("goodbye-code", Goodbye(error_code=-1)),
    ("goodbye-reason", Goodbye(reason=SURROGATE)),
    ("settings-id", SettingsFrame(settings=((0x10000, 1),))),
    ("settings-id-negative", SettingsFrame(settings=((-1, 1),))),
    ("settings-value", SettingsFrame(settings=((1, 2**32),))),
]


@pytest.mark.parametrize(("name", "frame"), BAD_ENCODES, ids=[name for name, _ in BAD_ENCODES])
def test_encode_rejects(name: str, frame: Frame) -> None:
    with pytest.raises(LocalProtocolError):
        encode_parts(frame)


def test_encode_accepts_boundaries() -> None:
    ok: list[Frame] = [
        Data(stream_id=0xFFFFFFFF, data=b""),
        WindowUpdate(stream_id=0xFFFFFFFF, increment=1),
        DeviceState(stream_id=1, name="x" * 0xFFFF),
        ZeroPages(stream_id=1, region=0xFFFFFFFF, page_size=1 << 21, runs=((2**64 - (1 << 21), 2**64 - 1),)),
        Pages(stream_id=1, region=0, page_size=512, addresses=(2**64 - 512,), data=bytearray(512)),
        StreamEnd(stream_id=1, total_bytes=2**64 - 1),
        SettingsFrame(settings=((0, 0), (0xFFFF, 0xFFFFFFFF))),
        Iteration(stream_id=1, iteration=0xFFFFFFFF, final=True),
        ZstdPages(stream_id=1, region=0xFFFFFFFF, page_size=1 << 21, addresses=(2**64 - (1 << 21),), compressed=b"z"),
    ]
    for frame in ok:
        assert decode(encode(frame)) == frame


# ---------------------------------------------------------------------------
# Records and the codec tables: one encoder and one decoder per type, and a
# record comes out of the codec as the very type that went in.

RECORD_KINDS: dict[str, st.SearchStrategy[Any]] = {
    "pages": S.pages().map(lambda f: f.record),
    "pages_huge": S.pages(max_page_shift=21, max_pages=2, cheap_data=True).map(lambda f: f.record),
    "zero_pages": S.zero_pages().map(lambda f: f.record),
    "device_state": S.device_states().map(lambda f: f.record),
    "iteration": S.iterations().map(lambda f: f.record),
    "zstd_pages": S.zstd_pages().map(lambda f: f.record),
}


def test_codec_tables_cover_every_type_once() -> None:
    from tunnel import _frames

    record_types = set(_frames._RECORD_ENCODERS)
    assert record_types == set(RECORD_TYPES)
    encoded = [ftype for ftype, _ in _frames._RECORD_ENCODERS.values()] + [ftype for ftype, _ in _frames._FRAME_ENCODERS.values()]
    # Ping and Pong share an encoder, not a frame type.
    assert sorted(encoded) == sorted(FrameType)
    assert set(_frames._RECORD_DECODERS).isdisjoint(_frames._FRAME_DECODERS)
    assert set(_frames._RECORD_DECODERS) | set(_frames._FRAME_DECODERS) == set(FrameType)
    assert RECORD_FRAMES == set(_frames._RECORD_DECODERS) == FLOW_CONTROLLED - {FrameType.DATA}
    for cls in RECORD_TYPES:
        assert RECORD_FRAME_NAMES[cls] == _frames._RECORD_ENCODERS[cls][0].name


def test_record_kinds_cover_every_record_type() -> None:
    assert {ftype.name.lower() for ftype in RECORD_FRAMES} <= set(RECORD_KINDS)


@pytest.mark.parametrize("kind", list(RECORD_KINDS))
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_record_round_trip(kind: str, data: st.DataObject) -> None:
    record = data.draw(RECORD_KINDS[kind])
    ftype, parts = encode_record(record)
    assert ftype is record_frame_type(record)
    assert all(len(p) for p in parts)
    payload = bytearray(b"".join(parts))
    assert payload_size(record) == len(payload)
    back = decode_record(ftype, memoryview(payload))
    assert type(back) is type(record)
    assert back == record
    bulk = bulk_of(record)
    if bulk is not None and len(bulk):
        assert parts[-1] is bulk  # passed through, not copied
        got = bulk_of(back)
        assert isinstance(got, memoryview) and got.obj is payload  # a view of the input
    # The same record in a frame, through the generic entry points and the reader.
    frame = RecordFrame(stream_id=7, record=record)
    wire = encode(frame)
    assert wire == header(ftype, 7, len(payload)) + payload
    assert decode(wire) == frame
    items = FrameReader(len(payload)).feed(PREFACE.pack(MAGIC, 1, 1) + wire)
    assert len(items) == 2 and isinstance(items[1], RecordItem)
    assert (items[1].stream_id, items[1].record, bytes(items[1].payload)) == (7, record, bytes(payload))


@settings(max_examples=100, deadline=None)
@given(S.records(), st.integers(1, 5))
def test_split_keeps_every_unit_in_order(record: Any, size: int) -> None:
    pieces = list(split_record(record, size))
    if type(record) not in (PagesRecord, ZeroPagesRecord):
        assert pieces == [record] and record_units(record) == 1
        return
    assert all(type(p) is type(record) and record_units(p) <= size for p in pieces)
    assert sum(record_units(p) for p in pieces) == record_units(record)
    if isinstance(record, PagesRecord):
        assert sum((p.addresses for p in pieces), ()) == record.addresses
        assert b"".join(bytes(p.data) for p in pieces) == bytes(record.data)
    else:
        assert sum((p.runs for p in pieces), ()) == record.runs
    for p in pieces:
        encode_record(p)  # each piece is a valid record on its own


def test_with_bulk_replaces_only_the_bulk_field() -> None:
    record = PagesRecord(region=1, page_size=512, addresses=(0,), data=memoryview(bytearray(512)))
    copy = with_bulk(record, bytes(512))
    assert copy == record and isinstance(copy.data, bytes)  # type: ignore[union-attr]
    assert bulk_of(ZeroPagesRecord(region=0, page_size=512, runs=())) is None


def test_encode_record_refuses_what_is_not_a_record() -> None:
    with pytest.raises(TypeError):
        encode_record(b"data")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        encode_parts(object())  # type: ignore[arg-type]
