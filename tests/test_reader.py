"""The incremental FrameReader, and fuzzing of the whole sans-I/O Connection.

The invariants (h11 ``fuzz/``, h2 ``frame_buffer``): any input either parses
or raises RemoteProtocolError; how the input is split into pieces never
changes what comes out; a length field is judged before anything is
allocated; bytes held for an incomplete frame stay bounded.
"""

from __future__ import annotations

import dataclasses
import tracemalloc
from collections.abc import Iterable, Sequence
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tunnel
from tunnel._errors import ErrorCode, RemoteProtocolError
from tunnel._frames import (
    CONNECTION_FRAMES,
    HEADER,
    HEADER_SIZE,
    Data,
    DigestAlgorithm,
    Frame,
    FrameType,
    Goodbye,
    Ping,
    decode,
    encode,
)
from tunnel._reader import DataChunk, DataStart, FrameReader, Preface, RecordItem
from tunnel._settings import MAGIC, PREFACE

try:
    from . import strategies as S
except ImportError:  # tests/ is not a package: pytest put it on sys.path
    import strategies as S  # type: ignore[no-redef]

GOOD_PREFACE = PREFACE.pack(MAGIC, 1, 1)
MAX = 1 << 16

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# ---------------------------------------------------------------------------
# Helpers


def freeze(frame: Any) -> Any:
    """The frame (or record) with memoryview fields turned into bytes, for comparison."""
    if isinstance(frame, tunnel._frames.RecordFrame):
        return dataclasses.replace(frame, record=freeze(frame.record))
    changes = {
        f.name: bytes(getattr(frame, f.name))
        for f in dataclasses.fields(frame)
        if isinstance(getattr(frame, f.name), memoryview | bytearray)
    }
    return dataclasses.replace(frame, **changes) if changes else frame


def normalize(items: Iterable[object]) -> list[object]:
    """Reader items as whole frames: a DataStart and its chunks become one Data.

    Also checks the item stream is well formed: chunks only inside a DATA
    payload, of that payload's stream, never past its length; bulk fields
    are memoryviews.
    """
    out: list[object] = []
    pending: tuple[int, int, bytearray] | None = None
    for item in items:
        if isinstance(item, DataStart):
            assert pending is None, "DATA header inside a DATA payload"
            pending = (item.stream_id, item.length, bytearray())
        elif isinstance(item, DataChunk):
            assert pending is not None, "chunk outside a DATA payload"
            assert item.stream_id == pending[0]
            assert isinstance(item.data, memoryview) and len(item.data) > 0
            pending[2].extend(item.data)
            assert len(pending[2]) <= pending[1]
        else:
            assert pending is None, f"{item!r} inside a DATA payload"
            if isinstance(item, RecordItem):
                assert isinstance(item.payload, memoryview)
                frame = tunnel._frames.RecordFrame(stream_id=item.stream_id, record=item.record)
                assert bytes(item.payload) == encode(frame)[HEADER_SIZE:]
                out.append(freeze(frame))
            elif isinstance(item, Preface):
                out.append(item)
            else:
                assert isinstance(item, Frame)
                assert not isinstance(item, tunnel._frames.RecordFrame | tunnel._frames.Data)
                out.append(freeze(item))
        if pending is not None and len(pending[2]) == pending[1]:
            out.append(Data(stream_id=pending[0], data=bytes(pending[2])))
            pending = None
    if pending is not None:
        out.append(("incomplete DATA", pending[0], pending[1], bytes(pending[2])))
    return out


def feed_all(pieces: Iterable[Any], max_frame_size: int = MAX, reader: FrameReader | None = None) -> tuple[list[object], int]:
    """Feed the pieces; the items and the most bytes the reader ever held."""
    reader = reader or FrameReader(max_frame_size)
    items: list[object] = []
    most = 0
    for piece in pieces:
        items += reader.feed(piece)
        most = max(most, reader.buffered)
    return items, most


def split(blob: bytes, cuts: Sequence[int]) -> list[bytes]:
    points = [0, *sorted(set(cuts)), len(blob)]
    return [blob[a:b] for a, b in zip(points, points[1:])]


def cuts_for(blob: bytes) -> st.SearchStrategy[list[int]]:
    return st.lists(st.integers(0, len(blob)), max_size=30)


def frame_stream(frames: Sequence[Frame], lo: int = 1, hi: int = 1) -> bytes:
    return PREFACE.pack(MAGIC, lo, hi) + b"".join(encode(f) for f in frames)


# ---------------------------------------------------------------------------
# (b) the split does not matter


@FAST
@given(S.u16, S.u16, st.lists(S.frames(), max_size=10), st.data())
def test_any_split_gives_the_same_frames(lo: int, hi: int, frames: list[Frame], data: st.DataObject) -> None:
    blob = frame_stream(frames, lo, hi)
    expected = [Preface(lo, hi), *frames]
    whole, _ = feed_all([blob])
    assert normalize(whole) == expected
    cuts = data.draw(cuts_for(blob), label="cuts")
    pieces = split(blob, cuts)
    # Any buffer type will do; mix them.
    kinds = data.draw(st.lists(st.sampled_from([bytes, bytearray, memoryview]), min_size=len(pieces), max_size=len(pieces)))
    pieces = [k(p) for k, p in zip(kinds, pieces)]
    assert normalize(feed_all(pieces)[0]) == expected


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.lists(S.frames(), max_size=6))
def test_byte_by_byte_gives_the_same_frames(frames: list[Frame]) -> None:
    blob = frame_stream(frames)
    items, _ = feed_all(blob[i : i + 1] for i in range(len(blob)))
    assert normalize(items) == [Preface(1, 1), *frames]
    # Byte by byte, a non-empty DATA payload comes as one chunk per byte.
    chunks = [i for i in items if isinstance(i, DataChunk)]
    assert all(len(c.data) == 1 for c in chunks)
    assert len(chunks) == sum(len(f.data) for f in frames if isinstance(f, Data))


def test_whole_input_is_decoded_in_place() -> None:
    """Frames inside one piece are views of the caller's buffer, DATA included."""
    frames = [
        Data(stream_id=1, data=b"a" * 1000),
        tunnel._frames.Pages(stream_id=1, region=0, page_size=512, addresses=(0,), data=b"p" * 512),
        tunnel._frames.DeviceState(stream_id=3, name="d", data=b"dev"),
        tunnel._frames.RpcCall(program=1, version=1, procedure=1, serial=1, body=b"body"),
    ]
    blob = frame_stream(frames)
    items = FrameReader(MAX).feed(blob)
    chunk = next(i for i in items if isinstance(i, DataChunk))
    assert chunk.data.obj is blob and len(chunk.data) == 1000
    records = [i for i in items if isinstance(i, RecordItem)]
    assert len(records) == 2
    for r in records:
        assert r.payload.obj is blob
        assert r.record.data.obj is blob  # type: ignore[union-attr]
    call = items[-1]
    assert isinstance(call, tunnel._frames.RpcCall) and isinstance(call.body, memoryview) and call.body.obj is blob


def test_whole_data_payload_is_one_chunk() -> None:
    """A DATA payload inside one read is passed on as one view, however large."""
    payload = bytes(range(256)) * 4096  # 1 MiB
    blob = frame_stream([Data(stream_id=1, data=payload)])
    items = FrameReader(1 << 20).feed(blob)
    assert items[1] == DataStart(1, len(payload))
    (chunk,) = items[2:]
    assert isinstance(chunk, DataChunk) and chunk.data.obj is blob and chunk.data == payload


def test_data_split_mid_payload_comes_as_chunks() -> None:
    blob = frame_stream([Data(stream_id=7, data=bytes(range(100))), Ping(opaque=b"p" * 8)])
    cut = len(GOOD_PREFACE) + HEADER_SIZE + 30
    reader = FrameReader(MAX)
    first = reader.feed(blob[:cut])
    assert first == [Preface(1, 1), DataStart(7, 100), DataChunk(7, memoryview(bytes(range(30))))]
    assert reader.data_remaining == 70 and reader.data_stream == 7
    assert reader.buffered == 0
    second = reader.feed(blob[cut:])
    assert bytes(second[0].data) == bytes(range(30, 100))  # type: ignore[union-attr]
    assert second[1] == Ping(opaque=b"p" * 8)
    assert reader.data_remaining == 0


def test_empty_data_frame_and_empty_feeds() -> None:
    reader = FrameReader(MAX)
    assert reader.feed(b"") == []
    blob = frame_stream([Data(stream_id=1, data=b""), Data(stream_id=3, data=b"x")])
    items = reader.feed(blob)
    assert items[:2] == [Preface(1, 1), DataStart(1, 0)]
    assert reader.feed(b"") == []
    assert normalize(items) == [Preface(1, 1), Data(stream_id=1, data=b""), Data(stream_id=3, data=b"x")]


def test_non_byte_memoryview_is_accepted() -> None:
    import array

    blob = frame_stream([Ping(opaque=b"12345678")])
    blob += b"\0" * (-len(blob) % 4)  # pad: the reader sees a trailing partial header
    words = array.array("I")
    words.frombytes(blob)
    reader = FrameReader(MAX)
    items = reader.feed(memoryview(words))
    assert items == [Preface(1, 1), Ping(opaque=b"12345678")]
    assert reader.buffered == len(blob) - len(GOOD_PREFACE) - HEADER_SIZE - 8


# ---------------------------------------------------------------------------
# (c) length fields are judged before allocation; buffering is bounded


@pytest.mark.parametrize("ftype", list(FrameType), ids=lambda t: t.name)
def test_oversized_length_fails_on_the_header_alone(ftype: FrameType) -> None:
    sid = 0 if ftype in CONNECTION_FRAMES or ftype == FrameType.WINDOW_UPDATE else 1
    for length in (MAX + 1, 2**32 - 1):
        hdr = HEADER.pack(length, ftype, 0, 0, sid)
        reader = FrameReader(MAX)
        reader.feed(GOOD_PREFACE)
        with pytest.raises(RemoteProtocolError) as info:
            reader.feed(hdr)
        assert info.value.error_code == ErrorCode.FRAME_SIZE_ERROR
        # Byte by byte: nothing happens until the 12th byte, which fails.
        reader = FrameReader(MAX)
        reader.feed(GOOD_PREFACE)
        for b in hdr[:-1]:
            assert reader.feed(bytes([b])) == []
        with pytest.raises(RemoteProtocolError) as info:
            reader.feed(hdr[-1:])
        assert info.value.error_code == ErrorCode.FRAME_SIZE_ERROR
    # Exactly the maximum is fine, and a non-DATA frame waits for its payload.
    reader = FrameReader(MAX)
    reader.feed(GOOD_PREFACE)
    items = reader.feed(HEADER.pack(MAX, ftype, 0, 0, sid))
    assert items == ([DataStart(sid, MAX)] if ftype is FrameType.DATA else [])


def test_oversized_length_allocates_nothing() -> None:
    big = 16 * 1024 * 1024
    reader = FrameReader(big)
    reader.feed(GOOD_PREFACE)
    tracemalloc.start()
    try:
        with pytest.raises(RemoteProtocolError):
            reader.feed(HEADER.pack(big + 1, FrameType.RPC_CALL, 0, 0, 0))
        _, peak_refused = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        # Control: an acceptable header of that size does allocate its buffer,
        # so the measurement above would have seen an allocation.
        reader = FrameReader(big)
        reader.feed(GOOD_PREFACE)
        reader.feed(HEADER.pack(big, FrameType.RPC_CALL, 0, 0, 0))
        _, peak_accepted = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak_refused < 64 * 1024
    assert peak_accepted >= big


@FAST
@given(st.lists(S.frames(), min_size=1, max_size=8), st.integers(0, 64), st.data())
def test_buffered_is_bounded(frames: list[Frame], slack: int, data: st.DataObject) -> None:
    payloads = [len(encode(f)) - HEADER_SIZE for f in frames]
    max_frame_size = max(payloads) + slack
    blob = frame_stream(frames)
    pieces = split(blob, data.draw(cuts_for(blob)))
    items, most = feed_all(pieces, max_frame_size)
    assert normalize(items) == [Preface(1, 1), *frames]
    assert most <= HEADER_SIZE + max_frame_size
    # Tighter: only a header, the preface or one non-DATA payload is ever held.
    held = [n for f, n in zip(frames, payloads) if not isinstance(f, Data)]
    assert most <= max([HEADER_SIZE, *held])


@FAST
@given(st.lists(S.data_frames(max_size=5000), min_size=1, max_size=5), st.data())
def test_data_payloads_are_never_buffered(frames: list[Frame], data: st.DataObject) -> None:
    blob = frame_stream(frames)
    pieces = split(blob, data.draw(cuts_for(blob)))
    items, most = feed_all(pieces)
    assert normalize(items) == [Preface(1, 1), *frames]
    assert most < HEADER_SIZE


# ---------------------------------------------------------------------------
# (d) the preface


@pytest.mark.parametrize("first", [b"X", b"\0", b"t", b"GET / HTTP/1.1\r\n", b"\x16\x03\x01"])
def test_bad_magic_fails_on_the_first_wrong_byte(first: bytes) -> None:
    with pytest.raises(RemoteProtocolError) as info:
        FrameReader(MAX).feed(first)
    assert info.value.error_code == ErrorCode.PROTOCOL_ERROR


@pytest.mark.parametrize("good", range(len(MAGIC)))
def test_bad_magic_after_a_good_prefix(good: int) -> None:
    reader = FrameReader(MAX)
    for b in MAGIC[:good]:
        assert reader.feed(bytes([b])) == []
    with pytest.raises(RemoteProtocolError):
        reader.feed(b"?")


@given(st.binary(min_size=1, max_size=8))
@settings(max_examples=200, deadline=None)
def test_preface_prefixes(prefix: bytes) -> None:
    reader = FrameReader(MAX)
    head = prefix[: len(MAGIC)]
    if head != MAGIC[: len(head)]:
        with pytest.raises(RemoteProtocolError):
            reader.feed(prefix)
        return
    items = reader.feed(prefix)
    if len(prefix) < PREFACE.size:
        assert items == [] and reader.buffered == len(prefix)
    else:
        assert items == [Preface(*PREFACE.unpack(prefix)[1:])] and reader.buffered == 0


def test_preface_is_not_a_frame() -> None:
    """After the preface the same magic bytes are read as a frame header."""
    reader = FrameReader(MAX)
    reader.feed(GOOD_PREFACE)
    with pytest.raises(RemoteProtocolError):
        reader.feed(GOOD_PREFACE + b"\0" * 4)  # length "TUNL", type 0: unknown type


# ---------------------------------------------------------------------------
# (e) DATA moved outside the reader (spliced)


def test_skip_data() -> None:
    payload = bytes(range(256)) * 4
    blob = frame_stream([Data(stream_id=5, data=payload), Ping(opaque=b"after..."), Data(stream_id=5, data=b"tail")])
    reader = FrameReader(MAX)
    cut = len(GOOD_PREFACE) + HEADER_SIZE + 24
    items = reader.feed(blob[:cut])
    assert items[1:] == [DataStart(5, 1024), DataChunk(5, memoryview(payload[:24]))]
    assert reader.data_remaining == 1000
    with pytest.raises(ValueError):
        reader.skip_data(0)
    with pytest.raises(ValueError):
        reader.skip_data(1001)
    with pytest.raises(ValueError):
        reader.skip_data(-1)
    reader.skip_data(600)  # the driver spliced 600 bytes past the reader
    assert reader.data_remaining == 400
    rest = blob[cut + 600 :]
    items = reader.feed(rest[:100])
    assert items == [DataChunk(5, memoryview(payload[624:724]))]
    reader.skip_data(300)
    assert reader.data_remaining == 0
    with pytest.raises(ValueError):
        reader.skip_data(1)
    items = reader.feed(rest[400:])
    assert normalize(items) == [Ping(opaque=b"after..."), Data(stream_id=5, data=b"tail")]


def test_skip_data_needs_a_pending_payload() -> None:
    reader = FrameReader(MAX)
    reader.feed(GOOD_PREFACE)
    with pytest.raises(ValueError):
        reader.skip_data(1)


def _pair(**kw: Any) -> tuple[tunnel.Connection, tunnel.Connection]:
    a = tunnel.Connection(client=True, **kw)
    b = tunnel.Connection(client=False, **kw)
    b.receive_data(a.bytes_to_send())
    a.receive_data(b.bytes_to_send())
    return a, b


def test_external_data_through_connections() -> None:
    a, b = _pair()
    sid = a.open_stream()
    a.send_data(sid, b"before")
    hdr = a.prepare_external_data(sid, 1000)
    events = b.receive_data(a.bytes_to_send() + hdr)
    assert [type(e).__name__ for e in events] == ["StreamOpened", "DataReceived"]
    assert b.pending_data_payload == (sid, 1000)
    (spliced,) = b.receive_external_data(600)
    assert spliced == tunnel.DataReceived(stream_id=sid, data=None, flow_controlled_length=600)
    assert b.pending_data_payload == (sid, 400)
    with pytest.raises(tunnel.LocalProtocolError):
        b.receive_external_data(401)
    (tail,) = b.receive_data(b"z" * 400)
    assert isinstance(tail, tunnel.DataReceived) and bytes(tail.data) == b"z" * 400  # type: ignore[arg-type]
    assert b.pending_data_payload is None
    a.end_stream(sid)
    (ended,) = b.receive_data(a.bytes_to_send())
    assert ended == tunnel.StreamEnded(stream_id=sid, total_bytes=6 + 1000, digest=b"")


def test_external_data_for_a_dropped_stream_gives_credit_back() -> None:
    """Spliced bytes of a stream this side already aborted produce no event,
    so the core itself must return their connection credit (as it does for
    in-band chunks of a dropped stream)."""
    for spliced in (True, False):
        a, b = _pair()
        sid = a.open_stream()
        b.receive_data(a.bytes_to_send())
        b.abort_stream(sid)  # crosses a's DATA on the wire
        hdr = a.prepare_external_data(sid, 1000)
        if spliced:
            assert b.receive_data(hdr) == []
            assert b.receive_external_data(1000) == []
        else:
            assert b.receive_data(hdr + b"x" * 1000) == []
        assert b.pending_data_payload is None
        assert b.buffered_received == 0, spliced


def test_external_data_refused_with_a_digest() -> None:
    a, b = _pair()
    sid = a.open_stream(digest=DigestAlgorithm.CRC32)
    with pytest.raises(tunnel.LocalProtocolError):
        a.prepare_external_data(sid, 10)
    # A peer may still send plain DATA on it; the receiving driver cannot splice it.
    a.send_data(sid, b"0123456789")
    parts = a.data_to_send()
    b.receive_data(b"".join(parts)[:-5])
    assert b.pending_data_payload == (sid, 5)
    with pytest.raises(tunnel.LocalProtocolError):
        b.receive_external_data(5)


# ---------------------------------------------------------------------------
# (a) fuzz: parse it or raise RemoteProtocolError


def _feed_expecting_only_remote_errors(pieces: Iterable[bytes], preface: bool) -> None:
    reader = FrameReader(MAX)
    if preface:
        reader.feed(GOOD_PREFACE)
    try:
        for piece in pieces:
            reader.feed(piece)
            assert reader.buffered <= HEADER_SIZE + MAX
    except RemoteProtocolError as exc:
        assert exc.error_code in (ErrorCode.PROTOCOL_ERROR, ErrorCode.FRAME_SIZE_ERROR, ErrorCode.FLOW_CONTROL_ERROR)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400), st.booleans(), st.data())
def test_fuzz_reader_arbitrary_bytes(blob: bytes, preface: bool, data: st.DataObject) -> None:
    _feed_expecting_only_remote_errors([blob], preface)
    _feed_expecting_only_remote_errors(split(blob, data.draw(cuts_for(blob))), preface)


@st.composite
def mutated(draw: st.DrawFn, frames: st.SearchStrategy[Frame]) -> bytes:
    """Valid frames, then a few byte-level mutations: flips, cuts, insertions.

    Arbitrary bytes mostly die on the first header; this reaches the payload
    decoders with almost-valid input.
    """
    blob = bytearray(b"".join(encode(f) for f in draw(st.lists(frames, max_size=6))))
    for _ in range(draw(st.integers(0, 4))):
        op = draw(st.sampled_from(["set", "cut", "insert", "header"]))
        pos = draw(st.integers(0, len(blob)))
        if op == "set" and pos < len(blob):
            blob[pos] = draw(st.integers(0, 255))
        elif op == "cut":
            del blob[pos : pos + draw(st.integers(1, 16))]
        elif op == "insert":
            blob[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        else:
            blob[pos:pos] = HEADER.pack(
                draw(st.integers(0, 64)), draw(st.sampled_from([*FrameType, 0x7F])), 0, 0, draw(st.integers(0, 8))
            )
    return bytes(blob)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(mutated(S.frames()), st.data())
def test_fuzz_reader_mutated_frames(blob: bytes, data: st.DataObject) -> None:
    _feed_expecting_only_remote_errors([blob], True)
    _feed_expecting_only_remote_errors(split(blob, data.draw(cuts_for(blob))), True)


# ---------------------------------------------------------------------------
# Fuzz of the whole Connection


PEER_SETTINGS = tunnel.Settings(max_frame_size=16 * 1024, initial_stream_window=65536, connection_window=100000)


def _client_after_handshake(digest: int, zstd: bool = False) -> tunnel.Connection:
    """A client that completed its handshake and opened streams 1 and 3.

    With *zstd* both sides set the ZSTD feature, so ZSTD_PAGES is accepted.
    """
    features = tunnel.Feature.DIGEST_SHA256 | (tunnel.Feature.ZSTD if zstd else 0)
    server = tunnel.Connection(client=False, settings=dataclasses.replace(PEER_SETTINGS, features=features))
    client = tunnel.Connection(
        client=True,
        settings=tunnel.Settings(max_frame_size=16 * 1024, initial_stream_window=8192, connection_window=20000, features=features),
    )
    events = client.receive_data(server.bytes_to_send())
    assert isinstance(events[0], tunnel.HandshakeComplete)
    client.open_stream(digest=digest)
    client.open_stream()
    client.send_data(1, b"hello")
    client.data_to_send()
    return client


def _check_output(out: list[Any]) -> list[object]:
    """Everything the connection sends is well-formed."""
    reader = FrameReader(2**32 - 1)
    reader.feed(GOOD_PREFACE)
    items, _ = feed_all([b"".join(out)], reader=reader)
    frames = normalize(items)
    assert not any(isinstance(f, tuple) for f in frames), "output ends inside a frame"
    return frames


def _fuzz_connection(pieces: Iterable[bytes], digest: int, zstd: bool = False) -> None:
    conn = _client_after_handshake(digest, zstd)
    try:
        for piece in pieces:
            conn.receive_data(piece)
            # Keep the windows moving, as a driver would.
            for sid in conn.open_streams:
                conn.acknowledge_received(sid, 0)
    except RemoteProtocolError as exc:
        out = conn.data_to_send()
        assert len(out) >= 2
        goodbye = decode(b"".join(out[-2:]))
        assert isinstance(goodbye, Goodbye)
        assert goodbye.error_code == exc.error_code
        assert goodbye.reason == exc.reason[: len(goodbye.reason)]
        assert _check_output(out)[-1] == goodbye
        assert conn.state is tunnel.ConnectionState.CLOSED
        assert conn.receive_data(b"\xff" * 64) == []  # later input is ignored
        assert conn.data_to_send() == []
        return
    _check_output(conn.data_to_send())


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300), st.sampled_from(DigestAlgorithm), st.data())
def test_fuzz_connection_arbitrary_bytes(blob: bytes, digest: int, data: st.DataObject) -> None:
    _fuzz_connection([blob], digest)
    _fuzz_connection(split(blob, data.draw(cuts_for(blob))), digest)


# Stream ids a client knows: its own 1 and 3, the peer's 2 and 4, and a few it does not.
_SMALL_IDS = st.integers(1, 8)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(mutated(S.frames(_SMALL_IDS)), st.sampled_from([DigestAlgorithm.NONE, DigestAlgorithm.CRC32]), st.data())
def test_fuzz_connection_frames(blob: bytes, digest: int, data: st.DataObject) -> None:
    zstd = data.draw(st.booleans(), "zstd")
    _fuzz_connection([blob], digest, zstd)
    _fuzz_connection(split(blob, data.draw(cuts_for(blob))), digest, zstd)


def test_fuzz_connection_helper_sees_errors() -> None:
    """The fuzz helper's error path is exercised (the invariant can fail)."""
    conn = _client_after_handshake(DigestAlgorithm.NONE)
    with pytest.raises(RemoteProtocolError) as info:
        conn.receive_data(HEADER.pack(0, 0x7F, 0, 0, 0))
    out = conn.data_to_send()
    goodbye = decode(b"".join(out[-2:]))
    assert isinstance(goodbye, Goodbye) and goodbye.error_code == info.value.error_code == ErrorCode.PROTOCOL_ERROR
    # A window overflow is a FLOW_CONTROL_ERROR on the wire too.
    conn = _client_after_handshake(DigestAlgorithm.NONE)
    with pytest.raises(RemoteProtocolError) as info:
        conn.receive_data(encode(tunnel._frames.WindowUpdate(stream_id=0, increment=2**31 - 1)))
    assert info.value.error_code == ErrorCode.FLOW_CONTROL_ERROR
    goodbye = decode(b"".join(conn.data_to_send()[-2:]))
    assert isinstance(goodbye, Goodbye) and goodbye.error_code == ErrorCode.FLOW_CONTROL_ERROR


def test_bad_magic_through_connection() -> None:
    conn = tunnel.Connection(client=True)
    conn.data_to_send()
    with pytest.raises(RemoteProtocolError):
        conn.receive_data(b"HTTP/1.1 400 Bad Request\r\n")
    goodbye = decode(b"".join(conn.data_to_send()))
    assert isinstance(goodbye, Goodbye) and goodbye.error_code == ErrorCode.PROTOCOL_ERROR


def _freeze_events(events: list[tunnel.Event]) -> list[object]:
    """Events with bulk fields as bytes and DataReceived runs of one stream merged."""
    out: list[object] = []
    for e in events:
        if isinstance(e, tunnel.DataReceived) and out and isinstance(out[-1], tunnel.DataReceived) and out[-1].stream_id == e.stream_id:
            prev = out[-1]
            assert prev.data is not None and e.data is not None
            out[-1] = tunnel.DataReceived(
                stream_id=e.stream_id,
                data=bytes(prev.data) + bytes(e.data),
                flow_controlled_length=prev.flow_controlled_length + e.flow_controlled_length,
            )
            continue
        changes = {
            f.name: bytes(getattr(e, f.name))
            for f in dataclasses.fields(e)
            if isinstance(getattr(e, f.name), memoryview | bytearray)
        }
        out.append(dataclasses.replace(e, **changes))
    return out


def _run_connection(pieces: Iterable[bytes], digest: int, zstd: bool = False) -> tuple[list[object] | None, int | None, list[object]]:
    """Events, the error code raised (or None), and the non-WINDOW_UPDATE frames sent.

    After an error the events are left out: those of the failing read are lost
    with the exception, and which read fails depends on the split.
    """
    conn = _client_after_handshake(digest, zstd)
    events: list[tunnel.Event] = []
    code = None
    try:
        for piece in pieces:
            events += conn.receive_data(piece)
    except RemoteProtocolError as exc:
        code = exc.error_code
    sent = [f for f in _check_output(conn.data_to_send()) if not isinstance(f, tunnel._frames.WindowUpdate)]
    return (_freeze_events(events) if code is None else None), code, sent


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(mutated(S.frames(_SMALL_IDS)), st.sampled_from([DigestAlgorithm.NONE, DigestAlgorithm.CRC32]), st.data())
def test_connection_outcome_does_not_depend_on_the_split(blob: bytes, digest: int, data: st.DataObject) -> None:
    """Same events, same error, same frames back, however the bytes arrive.

    (WINDOW_UPDATEs are left out: credit given back for dropped DATA is
    batched per chunk, so its increments legitimately follow the split.)
    """
    zstd = data.draw(st.booleans(), "zstd")
    whole = _run_connection([blob], digest, zstd)
    assert _run_connection(split(blob, data.draw(cuts_for(blob))), digest, zstd) == whole


def test_goodbye_then_garbage_in_one_read() -> None:
    """Bytes after the peer's GOODBYE are ignored even when they arrive in the
    same read, and the frames before a malformed one are still processed."""
    blob = encode(Ping(opaque=b"12345678")) + encode(Goodbye(error_code=0, reason="done")) + HEADER.pack(0, 0x7F, 0, 0, 0)
    for pieces in ([blob], [blob[:-12], blob[-12:]]):
        conn = _client_after_handshake(DigestAlgorithm.NONE)
        events = []
        for piece in pieces:
            events += conn.receive_data(piece)
        assert events == [tunnel.ConnectionTerminated(error_code=0, last_stream_id=0, reason="done")]
        assert _check_output(conn.data_to_send()) == [tunnel._frames.Pong(opaque=b"12345678")]
