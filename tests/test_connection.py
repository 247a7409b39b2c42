"""The sans-I/O Connection, driven directly: two cores passing bytes, no trio.

Conventions: ``a`` is the client, ``b`` the server.  ``pump(x, y)`` moves
everything *x* has queued into *y* and returns *y*'s events.  Input the
core's own API cannot produce (illegal frames, overruns, tampering) is
crafted with :func:`tunnel._frames.encode` and fed to one side directly.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import zlib
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tunnel import (
    PROTOCOL_VERSION,
    CallFailed,
    CallReceived,
    Connection,
    ConnectionState,
    ConnectionTerminated,
    DataReceived,
    DigestAlgorithm,
    ErrorCode,
    Event,
    Feature,
    FlowControlError,
    FrameTooLargeError,
    HandshakeComplete,
    IterationRecord,
    LocalProtocolError,
    PagesRecord,
    PongReceived,
    RecordReceived,
    RemoteProtocolError,
    ReplyReceived,
    Settings,
    StreamEnded,
    StreamOpened,
    StreamReset,
    StreamState,
    WindowUpdated,
    ZstdPagesRecord,
)
from tunnel._frames import (
    HEADER,
    HEADER_SIZE,
    Data,
    DeviceState,
    Frame,
    Goodbye,
    Iteration,
    Pages,
    Ping,
    Pong,
    RecordFrame,
    RpcCall,
    RpcError,
    RpcReply,
    StreamAbort,
    StreamEnd,
    StreamOpen,
    WindowUpdate,
    ZeroPages,
    ZstdPages,
    decode,
    encode,
)
from tunnel._records import payload_size
from tunnel._settings import MAGIC, PREFACE, ZSTD_MAX_EXPANSION
from tunnel._state import TRANSITIONS, StreamInput

try:
    from . import strategies as S
except ImportError:  # tests/ is not a package: pytest put it on sys.path
    import strategies as S  # type: ignore[no-redef]

#: Small windows so that flow control is reached with a few KiB; ZSTD on, so every record type is legal.
SMALL = Settings(
    max_frame_size=16 * 1024, initial_stream_window=8192, connection_window=65536, features=Feature.DIGEST_SHA256 | Feature.ZSTD
)
ZSTD = Settings(features=Feature.DIGEST_SHA256 | Feature.ZSTD)
HALF = SMALL.initial_stream_window // 2


# ----------------------------------------------------------------------
# Helpers


def make_pair(client: Settings | None = None, server: Settings | None = None, **kw: Any) -> tuple[Connection, Connection]:
    """A client and a server that have completed their handshake."""
    a = Connection(client=True, settings=client, **kw)
    b = Connection(client=False, settings=server, **kw)
    ev_b = b.receive_data(a.bytes_to_send())
    ev_a = a.receive_data(b.bytes_to_send())
    assert [type(e) for e in ev_a] == [HandshakeComplete]
    assert [type(e) for e in ev_b] == [HandshakeComplete]
    assert a.pending_output == b.pending_output == 0
    return a, b


def pump(src: Connection, dst: Connection) -> list[Event]:
    """Everything *src* has queued, fed to *dst*; *dst*'s events."""
    return dst.receive_data(src.bytes_to_send())


def exchange(a: Connection, b: Connection) -> tuple[list[Event], list[Event]]:
    """Pump both ways until both are quiet; (a's events, b's events)."""
    ev_a: list[Event] = []
    ev_b: list[Event] = []
    while a.pending_output or b.pending_output:
        ev_b += pump(a, b)
        ev_a += pump(b, a)
    return ev_a, ev_b


def parse(blob: bytes) -> list[Frame]:
    """Split a run of whole frames (no preface) and decode each."""
    frames: list[Frame] = []
    pos = 0
    while pos < len(blob):
        (length,) = HEADER.unpack_from(blob, pos)[:1]
        frames.append(decode(blob[pos : pos + HEADER_SIZE + length]))
        pos += HEADER_SIZE + length
    return frames


def sent(conn: Connection) -> list[Frame]:
    """Drain *conn*'s output and decode it (the bytes go nowhere)."""
    return parse(conn.bytes_to_send())


def ack_all(conn: Connection, events: list[Event]) -> None:
    for e in events:
        n = getattr(e, "flow_controlled_length", 0)
        if n:
            conn.acknowledge_received(e.stream_id, n)  # type: ignore[attr-defined]


def received_bytes(events: list[Event], stream_id: int) -> bytes:
    return b"".join(
        bytes(e.data) for e in events if isinstance(e, DataReceived) and e.stream_id == stream_id and e.data is not None
    )


def assert_connection_error(conn: Connection, blob: bytes, code: int = ErrorCode.PROTOCOL_ERROR) -> RemoteProtocolError:
    """Feeding *blob* is a connection error: raises, GOODBYE queued, connection closed."""
    with pytest.raises(RemoteProtocolError) as info:
        conn.receive_data(blob)
    assert info.value.error_code == code
    assert conn.state is ConnectionState.CLOSED
    goodbyes = [f for f in sent(conn) if isinstance(f, Goodbye)]
    assert len(goodbyes) == 1 and goodbyes[0].error_code == code
    # A dead connection ignores everything, even garbage.
    assert conn.receive_data(b"\xff" * 64) == []
    assert conn.pending_output == 0
    return info.value


def page_frame(stream_id: int) -> Pages:
    return Pages(stream_id=stream_id, region=1, page_size=512, addresses=(0, 4096), data=bytes(range(256)) * 4)


def zstd_frame(stream_id: int) -> ZstdPages:
    # The core never looks inside the compressed bytes: any will do here.
    return ZstdPages(stream_id=stream_id, region=1, page_size=4096, addresses=(0, 8192), compressed=b"not really zstd")


# ----------------------------------------------------------------------
# Handshake and version negotiation


def test_handshake_exchanges_settings() -> None:
    cs = Settings(max_frame_size=32768, initial_stream_window=1000, connection_window=5000, max_concurrent_streams=3)
    ss = Settings(max_concurrent_calls=7, max_call_size=999, features=Feature.NONE)
    a = Connection(client=True, settings=cs)
    b = Connection(client=False, settings=ss)
    assert {a.state, b.state} == {ConnectionState.HANDSHAKE}
    # Byte by byte: the handshake completes on the very last byte, not before.
    wire = a.bytes_to_send()
    for i in range(len(wire) - 1):
        assert b.receive_data(wire[i : i + 1]) == []
        assert b.state is ConnectionState.HANDSHAKE
    [done_b] = b.receive_data(wire[-1:])
    [done_a] = a.receive_data(b.bytes_to_send())
    assert isinstance(done_a, HandshakeComplete) and isinstance(done_b, HandshakeComplete)
    assert done_a.peer_settings == ss and a.peer_settings == ss
    assert done_b.peer_settings == cs and b.peer_settings == cs
    assert done_a.version == done_b.version == PROTOCOL_VERSION
    assert a.state is b.state is ConnectionState.OPEN
    # The peer's limits bind the sender; the local ones the receiver.
    assert a.max_send_frame == ss.max_frame_size and b.max_send_frame == 32768
    assert a.connection_credit == ss.connection_window and b.connection_credit == 5000
    assert a.connection_window == 5000 and b.connection_window == ss.connection_window


@pytest.mark.parametrize(
    ("client_range", "server_range", "expected"),
    [((1, 3), (2, 5), 3), ((1, 1), (1, 4), 1), ((2, 7), (1, 9), 7), ((4, 4), (1, 4), 4), ((1, 9), (5, 6), 6)],
)
def test_version_negotiation_picks_the_highest_common(
    client_range: tuple[int, int], server_range: tuple[int, int], expected: int
) -> None:
    a = Connection(client=True, min_version=client_range[0], max_version=client_range[1])
    b = Connection(client=False, min_version=server_range[0], max_version=server_range[1])
    [hb] = pump(a, b)
    [ha] = pump(b, a)
    assert isinstance(ha, HandshakeComplete) and isinstance(hb, HandshakeComplete)
    assert ha.version == hb.version == a.version == b.version == expected


def test_no_common_version() -> None:
    a = Connection(client=True, min_version=1, max_version=1)
    b = Connection(client=False, min_version=2, max_version=3)
    wire_a = a.bytes_to_send()
    with pytest.raises(RemoteProtocolError) as info:
        b.receive_data(wire_a)
    assert info.value.error_code == ErrorCode.UNSUPPORTED_VERSION
    assert b.state is ConnectionState.CLOSED and b.peer_settings is None
    wire_b = b.bytes_to_send()
    # b's preface and SETTINGS were queued at construction, then the GOODBYE.
    assert PREFACE.unpack_from(wire_b) == (MAGIC, 2, 3)
    frames = parse(wire_b[PREFACE.size :])
    assert isinstance(frames[-1], Goodbye) and frames[-1].error_code == ErrorCode.UNSUPPORTED_VERSION
    assert "1..1" in frames[-1].reason and "2..3" in frames[-1].reason  # names both ranges
    # Negotiation is symmetric, so the client finds the mismatch in b's
    # preface itself, before it reaches b's GOODBYE: it fails the same way.
    with pytest.raises(RemoteProtocolError) as info_a:
        a.receive_data(wire_b)
    assert info_a.value.error_code == ErrorCode.UNSUPPORTED_VERSION
    assert a.state is ConnectionState.CLOSED
    [goodbye] = [f for f in parse(a.bytes_to_send()) if isinstance(f, Goodbye)]
    assert goodbye.error_code == ErrorCode.UNSUPPORTED_VERSION
    with pytest.raises(LocalProtocolError):
        a.open_stream()


def test_peer_refusing_before_settings_terminates() -> None:
    """A peer that says GOODBYE instead of SETTINGS (e.g. it refused our version)."""
    a = Connection(client=True)
    a.bytes_to_send()
    refusal = PREFACE.pack(MAGIC, 1, 1) + encode(Goodbye(error_code=ErrorCode.UNSUPPORTED_VERSION, reason="too old"))
    [ev] = a.receive_data(refusal)
    assert ev == ConnectionTerminated(error_code=ErrorCode.UNSUPPORTED_VERSION, last_stream_id=0, reason="too old")
    assert a.state is ConnectionState.CLOSED
    assert a.close_reason is not None and "UNSUPPORTED_VERSION" in a.close_reason
    assert a.receive_data(encode(Ping())) == []
    assert a.pending_output == 0


@pytest.mark.parametrize("blob", [b"XUNL\x00\x01\x00\x01", b"TUNX", b"HTTP/1.1 200 OK\r\n", b"\x00" * 8])
def test_bad_magic(blob: bytes) -> None:
    b = Connection(client=False)
    b.bytes_to_send()
    assert_connection_error(b, blob)


def test_bad_magic_split_after_a_good_prefix() -> None:
    b = Connection(client=False)
    b.bytes_to_send()
    assert b.receive_data(b"TU") == []
    assert b.state is ConnectionState.HANDSHAKE
    assert_connection_error(b, b"NE")


@pytest.mark.parametrize(
    "first",
    [
        Ping(),
        WindowUpdate(increment=5),
        StreamOpen(stream_id=1),
        Data(stream_id=1, data=b"x"),
        RpcCall(program=1, version=1, procedure=1, serial=1),
    ],
)
def test_first_frame_must_be_settings(first: Frame) -> None:
    b = Connection(client=False)
    b.bytes_to_send()
    assert_connection_error(b, PREFACE.pack(MAGIC, 1, 1) + encode(first))
    assert b.peer_settings is None


def test_settings_twice() -> None:
    _a, b = make_pair()
    assert_connection_error(b, encode(Settings().to_frame()))


def test_local_sends_before_handshake_raise() -> None:
    a = Connection(client=True)
    attempts: list[Callable[[], object]] = [
        lambda: a.open_stream(),
        lambda: a.send_data(1, b"x"),
        lambda: a.send_device_state(1, name="x"),
        lambda: a.end_stream(1),
        lambda: a.send_call(1, 1, 1),
        lambda: a.send_reply(1),
        lambda: a.ping(b"12345678"),
        lambda: a.prepare_external_data(1, 10),
    ]
    queued = a.pending_output
    for attempt in attempts:
        with pytest.raises(LocalProtocolError):
            attempt()
    # Still refused after the peer's preface, until its SETTINGS arrive.
    assert a.receive_data(PREFACE.pack(MAGIC, 1, 1)) == []
    for attempt in attempts:
        with pytest.raises(LocalProtocolError):
            attempt()
    assert a.pending_output == queued
    assert a.state is ConnectionState.HANDSHAKE


# ----------------------------------------------------------------------
# Stream ids


def test_stream_ids_by_parity_and_increasing() -> None:
    a, b = make_pair()
    assert [a.open_stream() for _ in range(3)] == [1, 3, 5]
    assert [b.open_stream() for _ in range(3)] == [2, 4, 6]
    ev_b = pump(a, b)
    ev_a = pump(b, a)
    assert [e.stream_id for e in ev_b if isinstance(e, StreamOpened)] == [1, 3, 5]
    assert [e.stream_id for e in ev_a if isinstance(e, StreamOpened)] == [2, 4, 6]
    assert a.open_streams == b.open_streams == [1, 2, 3, 4, 5, 6]
    assert a.stream_state(7) is StreamState.IDLE and b.stream_state(8) is StreamState.IDLE


def test_peer_opening_an_id_of_ours() -> None:
    _a, b = make_pair()
    assert_connection_error(b, encode(StreamOpen(stream_id=2)))


def test_peer_opening_odd_id_on_client() -> None:
    a, _b = make_pair()
    assert_connection_error(a, encode(StreamOpen(stream_id=1)))


@pytest.mark.parametrize("again", [1, 3])
def test_peer_stream_ids_must_increase(again: int) -> None:
    _a, b = make_pair()
    assert [type(e) for e in b.receive_data(encode(StreamOpen(stream_id=3)))] == [StreamOpened]
    err = assert_connection_error(b, encode(StreamOpen(stream_id=again)))
    assert "not above" in err.reason


def test_skipped_peer_ids_count_as_closed() -> None:
    _a, b = make_pair(server=SMALL)
    b.receive_data(encode(StreamOpen(stream_id=5)))
    assert b.stream_state(1) is b.stream_state(3) is StreamState.CLOSED
    assert b.stream_state(7) is StreamState.IDLE
    # Frames on a skipped id are late frames of a closed stream: ignored.
    assert b.receive_data(encode(Data(stream_id=3, data=b"late")) + encode(StreamEnd(stream_id=1, total_bytes=0))) == []
    assert b.buffered_received == 0 and b.state is ConnectionState.OPEN


@pytest.mark.parametrize(
    "frame",
    [
        Data(stream_id=9, data=b"x"),
        page_frame(9),
        Iteration(stream_id=9, iteration=0),
        StreamEnd(stream_id=9, total_bytes=0),
        StreamAbort(stream_id=9, error_code=ErrorCode.CANCEL),
        WindowUpdate(stream_id=9, increment=1),
    ],
)
@pytest.mark.parametrize("whose", ["mine", "peers"])
def test_frames_on_idle_streams_are_connection_errors(frame: Frame, whose: str) -> None:
    a, b = make_pair()
    b.open_stream()  # 2: b's next own id is 4
    a.open_stream()  # 1: the highest peer stream b knows is 1
    pump(a, b)
    sid = 4 if whose == "mine" else 3
    blob = encode(dataclasses.replace(frame, stream_id=sid))
    err = assert_connection_error(b, blob)
    assert "never opened" in err.reason


def test_goodbye_carries_the_highest_peer_stream() -> None:
    a, b = make_pair()
    a.open_stream()
    a.open_stream()
    pump(a, b)
    with pytest.raises(RemoteProtocolError):
        b.receive_data(encode(RpcReply(program=1, version=1, procedure=1, serial=42)))
    [goodbye] = sent(b)
    assert isinstance(goodbye, Goodbye) and goodbye.last_stream_id == 3


# ----------------------------------------------------------------------
# The state table, walked pair by pair


LOCAL_INPUTS = {
    StreamInput.SEND_OPEN,
    StreamInput.SEND_RECORD,
    StreamInput.SEND_END,
    StreamInput.SEND_ABORT,
    StreamInput.SEND_WINDOW,
}


def stream_in_state(state: StreamState, opener: str) -> tuple[Connection, Connection, int]:
    """(a, b, stream id) with a's view of the stream in *state*.

    Right after opening, b sends HALF window bytes on the stream that a
    leaves unacknowledged (so SEND_WINDOW has something to give back).
    """
    a, b = make_pair(SMALL, SMALL)
    if state is StreamState.IDLE:
        return a, b, (1 if opener == "local" else 2)
    sid = a.open_stream() if opener == "local" else b.open_stream()
    exchange(a, b)
    b.send_data(sid, b"\x07" * HALF)
    assert received_bytes(pump(b, a), sid) == b"\x07" * HALF
    if state is StreamState.HALF_CLOSED_LOCAL:
        a.end_stream(sid)
    elif state is StreamState.HALF_CLOSED_REMOTE:
        b.end_stream(sid)
    elif state is StreamState.CLOSED:
        a.end_stream(sid)
        b.end_stream(sid)
    exchange(a, b)
    assert a.stream_state(sid) is state
    assert a.buffered_received == HALF
    return a, b, sid


def record_sends(a: Connection, sid: int) -> list[Callable[[], None]]:
    return [
        lambda: a.send_data(sid, b"abc"),
        lambda: a.send_pages(sid, region=0, page_size=512, addresses=(0,), data=bytes(512)),
        lambda: a.send_zero_pages(sid, region=0, page_size=4096, runs=((0, 3), (8192, 1))),
        lambda: a.send_device_state(sid, name="cpu0", version=2, data=b"regs"),
        lambda: a.send_iteration(sid, 1, final=True),
        lambda: a.send_zstd_pages(sid, region=0, page_size=4096, addresses=(0,), compressed=b"\x28\xb5\x2f\xfd"),
    ]


RECORD_FRAMES: list[tuple[Callable[[int], Frame], type[Event]]] = [
    (lambda sid: Data(stream_id=sid, data=b"hello"), DataReceived),
    (page_frame, RecordReceived),
    (lambda sid: ZeroPages(stream_id=sid, region=0, page_size=4096, runs=((0, 2),)), RecordReceived),
    (lambda sid: DeviceState(stream_id=sid, name="dev", version=1, data=b"blob"), RecordReceived),
    (lambda sid: Iteration(stream_id=sid, iteration=2), RecordReceived),
    (zstd_frame, RecordReceived),
]


def check_local(a: Connection, b: Connection, sid: int, state: StreamState, inp: StreamInput, opener: str) -> None:
    expected = TRANSITIONS.get((state, inp))
    if inp is StreamInput.SEND_OPEN:
        new = a.open_stream()
        if state is StreamState.IDLE and opener == "local":
            assert new == sid and a.stream_state(sid) is expected
        else:  # open_stream can only allocate a fresh id of this side's parity
            assert new != sid and new % 2 == 1 and a.stream_state(sid) is state
        return
    if inp is StreamInput.SEND_WINDOW:
        if state is StreamState.IDLE:
            with pytest.raises(LocalProtocolError):
                a.acknowledge_received(sid, 1)  # nothing was ever received
            return
        a.acknowledge_received(sid, HALF)
        updates = {f.stream_id: f.increment for f in sent(a) if isinstance(f, WindowUpdate)}
        if expected is None:  # the peer has ended its side (or the stream is gone): no stream update
            assert sid not in updates
        else:
            assert updates.get(sid) == HALF
        assert a.stream_state(sid) is (state if expected is None else expected)
        assert a.buffered_received == 0
        return
    if inp is StreamInput.SEND_RECORD:
        ops = record_sends(a, sid)
    elif inp is StreamInput.SEND_END:
        ops = [lambda: a.end_stream(sid)]
    else:
        assert inp is StreamInput.SEND_ABORT
        ops = [lambda: a.abort_stream(sid, ErrorCode.APPLICATION_ERROR, "stop")]
    for op in ops:
        if expected is None:
            if inp is StreamInput.SEND_ABORT and state is StreamState.CLOSED:
                op()  # documented: aborting a closed stream does nothing
            else:
                with pytest.raises(LocalProtocolError):
                    op()
            assert a.pending_output == 0
            assert a.stream_state(sid) is state
        else:
            op()
            assert a.stream_state(sid) is expected
    if expected is None:
        return
    # The peer accepts what a legal transition produced.
    events = pump(a, b)
    if inp is StreamInput.SEND_RECORD:
        assert [type(e) for e in events] == [t for _, t in RECORD_FRAMES]
    elif inp is StreamInput.SEND_END:
        assert [type(e) for e in events] == [StreamEnded]
    else:
        assert events == [StreamReset(stream_id=sid, error_code=ErrorCode.APPLICATION_ERROR, reason="stop", remote=True)]
        assert b.stream_state(sid) is StreamState.CLOSED


def check_remote(
    a: Connection, sid: int, state: StreamState, inp: StreamInput, opener: str, make: Callable[[int], Frame] | None
) -> None:
    expected = TRANSITIONS.get((state, inp))
    if inp is StreamInput.RECV_OPEN:
        frame: Frame = StreamOpen(stream_id=sid, label="again")
    elif inp is StreamInput.RECV_RECORD:
        assert make is not None
        frame = make(sid)
    elif inp is StreamInput.RECV_END:
        info = a.stream_info(sid)
        frame = StreamEnd(stream_id=sid, total_bytes=info.bytes_received if info else 0)
    elif inp is StreamInput.RECV_ABORT:
        frame = StreamAbort(stream_id=sid, error_code=ErrorCode.CANCEL, reason="peer")
    else:
        assert inp is StreamInput.RECV_WINDOW
        frame = WindowUpdate(stream_id=sid, increment=100)
    blob = encode(frame)
    info_before = a.stream_info(sid)
    buffered_before = a.buffered_received

    legal_open = inp is StreamInput.RECV_OPEN and state is StreamState.IDLE and opener == "remote"
    if not legal_open and (state is StreamState.IDLE or inp is StreamInput.RECV_OPEN):
        # Frames on idle streams, opens of used or wrong-parity ids: connection errors.
        assert_connection_error(a, blob)
        return
    if state is StreamState.CLOSED:
        assert a.receive_data(blob) == []
        assert a.stream_state(sid) is StreamState.CLOSED
        assert a.buffered_received == buffered_before  # connection credit given back at once
        assert all(not isinstance(f, StreamAbort) for f in sent(a))
        return
    events = a.receive_data(blob)
    if expected is None:
        # Out of place on a live stream: a stream error, the connection lives on.
        [reset] = events
        assert isinstance(reset, StreamReset)
        assert (reset.stream_id, reset.error_code, reset.remote) == (sid, ErrorCode.STREAM_STATE_ERROR, False)
        aborts = [f for f in sent(a) if isinstance(f, StreamAbort)]
        assert [(f.stream_id, f.error_code) for f in aborts] == [(sid, ErrorCode.STREAM_STATE_ERROR)]
        assert a.stream_state(sid) is StreamState.CLOSED
        assert a.state is ConnectionState.OPEN
        assert a.buffered_received == buffered_before
        return
    assert a.stream_state(sid) is expected
    assert a.state is ConnectionState.OPEN
    assert a.pending_output == 0  # legal input is never answered (an abort least of all)
    if inp is StreamInput.RECV_OPEN:
        assert [type(e) for e in events] == [StreamOpened]
    elif inp is StreamInput.RECV_RECORD:
        assert make is not None
        [(_, event_type)] = [m for m in RECORD_FRAMES if m[0] is make]
        assert [type(e) for e in events] == [event_type]
        assert a.buffered_received == buffered_before + len(blob) - HEADER_SIZE
    elif inp is StreamInput.RECV_END:
        assert [type(e) for e in events] == [StreamEnded]
    elif inp is StreamInput.RECV_ABORT:
        assert events == [StreamReset(stream_id=sid, error_code=ErrorCode.CANCEL, reason="peer", remote=True)]
    else:
        assert info_before is not None
        info = a.stream_info(sid)
        assert info is not None
        if state is StreamState.HALF_CLOSED_LOCAL:
            assert events == []  # credit for a direction we ended: ignored
            assert info.send_credit == info_before.send_credit
        else:
            assert events == [WindowUpdated(stream_id=sid, increment=100)]
            assert info.send_credit == info_before.send_credit + 100


PAIRS = [
    pytest.param(state, inp, opener, id=f"{state.name}-{inp.name}-{opener}")
    for state, inp, opener in itertools.product(StreamState, StreamInput, ["local", "remote"])
]


@pytest.mark.parametrize(("state", "inp", "opener"), PAIRS)
def test_state_table(state: StreamState, inp: StreamInput, opener: str) -> None:
    if inp in LOCAL_INPUTS:
        a, b, sid = stream_in_state(state, opener)
        check_local(a, b, sid, state, inp, opener)
    elif inp is StreamInput.RECV_RECORD:
        for make, _ in RECORD_FRAMES:  # each record type on a fresh pair
            a, b, sid = stream_in_state(state, opener)
            check_remote(a, sid, state, inp, opener, make)
    else:
        a, b, sid = stream_in_state(state, opener)
        check_remote(a, sid, state, inp, opener, None)


def test_state_table_covers_what_the_tests_assume() -> None:
    """The walk above derives expectations from TRANSITIONS; pin the table's shape."""
    S, I = StreamState, StreamInput
    assert {s for s, _ in TRANSITIONS} == {S.IDLE, S.OPEN, S.HALF_CLOSED_LOCAL, S.HALF_CLOSED_REMOTE}
    assert all(TRANSITIONS[(S.IDLE, i)] is S.OPEN for i in (I.SEND_OPEN, I.RECV_OPEN))
    assert {i for s, i in TRANSITIONS if s is S.IDLE} == {I.SEND_OPEN, I.RECV_OPEN}
    # A direction that was ended carries nothing more.
    assert (S.HALF_CLOSED_LOCAL, I.SEND_RECORD) not in TRANSITIONS
    assert (S.HALF_CLOSED_REMOTE, I.RECV_RECORD) not in TRANSITIONS
    # Aborts are legal in every live state.
    for s in (S.OPEN, S.HALF_CLOSED_LOCAL, S.HALF_CLOSED_REMOTE):
        assert TRANSITIONS[(s, I.SEND_ABORT)] is TRANSITIONS[(s, I.RECV_ABORT)] is S.CLOSED


# ----------------------------------------------------------------------
# Concurrency limit


def test_max_concurrent_streams_local_check() -> None:
    a, _b = make_pair(server=Settings(max_concurrent_streams=2))
    a.open_stream()
    a.open_stream()
    with pytest.raises(LocalProtocolError):
        a.open_stream()
    # Once one of them is gone, there is room again.
    a.abort_stream(1)
    assert a.open_stream() == 5


def test_max_concurrent_streams_refused() -> None:
    _a, b = make_pair(server=Settings(max_concurrent_streams=1, connection_window=65536))
    assert [type(e) for e in b.receive_data(encode(StreamOpen(stream_id=1)))] == [StreamOpened]
    # A peer ignoring the limit: its stream is refused, not the connection.
    events = b.receive_data(encode(StreamOpen(stream_id=3)) + encode(Data(stream_id=3, data=b"x" * 10000)))
    assert events == []
    assert [(f.stream_id, f.error_code) for f in sent(b) if isinstance(f, StreamAbort)] == [(3, ErrorCode.REFUSED_STREAM)]
    assert b.state is ConnectionState.OPEN
    assert b.stream_state(3) is StreamState.CLOSED
    assert b.buffered_received == 0  # the refused stream's data was dropped, its credit kept
    assert b.open_streams == [1]


# ----------------------------------------------------------------------
# Flow control


def test_send_beyond_stream_credit_raises() -> None:
    a, _b = make_pair(server=SMALL)
    sid = a.open_stream()
    a.bytes_to_send()
    assert a.send_window(sid) == 8192
    a.send_data(sid, b"a" * 8000)
    assert a.send_window(sid) == 192
    a.bytes_to_send()
    with pytest.raises(FlowControlError) as info:
        a.send_data(sid, b"b" * 193)
    assert info.value.error_code == ErrorCode.FLOW_CONTROL_ERROR
    assert isinstance(info.value, LocalProtocolError)
    # A refused send changes nothing.
    assert a.pending_output == 0 and a.send_window(sid) == 192
    with pytest.raises(FlowControlError):
        a.send_pages(sid, region=0, page_size=512, addresses=(0,), data=bytes(512))  # 536 flow-controlled bytes
    a.send_data(sid, b"b" * 192)
    assert a.send_window(sid) == 0
    assert a.stream_info(sid).bytes_sent == 8192  # type: ignore[union-attr]


def test_send_beyond_connection_credit_raises() -> None:
    a, _b = make_pair(server=Settings(max_frame_size=16384, initial_stream_window=8192, connection_window=10000))
    s1, s3 = a.open_stream(), a.open_stream()
    a.send_data(s1, bytes(8192))
    assert a.connection_credit == 1808
    assert a.send_window(s3) == 1808  # the connection limits, not the stream
    with pytest.raises(FlowControlError):
        a.send_device_state(s3, name="x", data=bytes(1808))  # 1808 + 7 header bytes
    a.send_device_state(s3, name="x", data=bytes(1808 - 7))
    assert a.send_window(s3) == a.connection_credit == 0


def test_records_count_their_whole_payload() -> None:
    a, b = make_pair(server=SMALL)
    sid = a.open_stream()
    a.send_pages(sid, region=0, page_size=512, addresses=(0, 512), data=bytes(1024))
    assert a.send_window(sid) == 8192 - (16 + 2 * 8 + 1024)
    a.send_zero_pages(sid, region=0, page_size=512, runs=((0, 5),))
    assert a.send_window(sid) == 8192 - (16 + 2 * 8 + 1024) - (16 + 16)
    events = pump(a, b)
    assert [e.flow_controlled_length for e in events if hasattr(e, "flow_controlled_length")] == [1056, 32]
    assert b.buffered_received == 1088


def test_oversized_frames_raise_frame_too_large() -> None:
    a, _b = make_pair(server=Settings(max_frame_size=16384))
    sid = a.open_stream()
    a.bytes_to_send()
    with pytest.raises(FrameTooLargeError):
        a.send_device_state(sid, name="big", data=bytes(16384))
    assert a.pending_output == 0
    # Opaque data is split into frames the peer accepts instead.
    a.send_data(sid, bytes(range(256)) * 160)  # 40960 bytes
    frames = sent(a)
    assert [len(f.data) for f in frames if isinstance(f, Data)] == [16384, 16384, 8192]


def test_send_data_accepts_any_buffer() -> None:
    a, b = make_pair()
    sid = a.open_stream()
    pump(a, b)
    payload = bytearray(b"0123456789" * 100)
    a.send_data(sid, memoryview(payload)[10:])
    a.send_data(sid, payload)
    assert received_bytes(pump(a, b), sid) == bytes(payload[10:]) + bytes(payload)


def test_receiver_stream_window_overrun() -> None:
    a, b = make_pair(server=SMALL)
    sid = a.open_stream()
    pump(a, b)
    b.receive_data(encode(Data(stream_id=sid, data=bytes(8000))))
    assert_connection_error(b, encode(Data(stream_id=sid, data=bytes(193))), ErrorCode.FLOW_CONTROL_ERROR)


def test_receiver_overrun_with_a_record() -> None:
    a, b = make_pair(server=SMALL)
    sid = a.open_stream()
    pump(a, b)
    b.receive_data(encode(Data(stream_id=sid, data=bytes(8192 - 100))))
    assert_connection_error(b, encode(DeviceState(stream_id=sid, name="x", data=bytes(94))), ErrorCode.FLOW_CONTROL_ERROR)


def test_receiver_overrun_is_detected_on_the_data_header() -> None:
    """A DATA frame larger than the window fails before its payload arrives."""
    a, b = make_pair(server=SMALL)
    sid = a.open_stream()
    pump(a, b)
    blob = encode(Data(stream_id=sid, data=bytes(8193)))
    assert_connection_error(b, blob[: HEADER_SIZE + 1], ErrorCode.FLOW_CONTROL_ERROR)


def test_receiver_connection_window_overrun() -> None:
    a, b = make_pair(server=Settings(max_frame_size=16384, initial_stream_window=8192, connection_window=10000))
    s1, s3 = a.open_stream(), a.open_stream()
    pump(a, b)
    b.receive_data(encode(Data(stream_id=s1, data=bytes(8000))))
    assert_connection_error(b, encode(Data(stream_id=s3, data=bytes(2001))), ErrorCode.FLOW_CONTROL_ERROR)


def test_window_update_overflow_is_a_connection_error() -> None:
    a, b = make_pair()
    sid = a.open_stream()
    pump(a, b)
    big = 2**31 - 1
    assert_connection_error(a, encode(WindowUpdate(stream_id=0, increment=big)), ErrorCode.FLOW_CONTROL_ERROR)
    a, b = make_pair()
    sid = a.open_stream()
    pump(a, b)
    assert_connection_error(a, encode(WindowUpdate(stream_id=sid, increment=big)), ErrorCode.FLOW_CONTROL_ERROR)


def test_window_update_of_zero_is_a_connection_error() -> None:
    a, _b = make_pair()
    zero = HEADER.pack(4, 0x05, 0, 0, 0) + b"\0\0\0\0"
    assert_connection_error(a, zero, ErrorCode.FLOW_CONTROL_ERROR)


def test_window_update_for_a_half_closed_local_stream_is_ignored_even_if_huge() -> None:
    a, b = make_pair()
    sid = a.open_stream()
    a.end_stream(sid)
    pump(a, b)
    assert a.receive_data(encode(WindowUpdate(stream_id=sid, increment=2**31 - 1))) == []
    assert a.state is ConnectionState.OPEN and a.pending_output == 0


def test_credit_returns_only_after_acknowledge() -> None:
    a, b = make_pair(server=SMALL)
    sid = a.open_stream()
    got: list[Event] = []
    # A producer that sends whenever it may, a consumer that never acknowledges.
    for _ in range(50):
        window = a.send_window(sid)
        if window:
            a.send_data(sid, b"z" * min(window, 1500))
        ev_a, ev_b = exchange(a, b)
        got += ev_b
        assert b.buffered_received <= SMALL.initial_stream_window
        assert not any(isinstance(e, WindowUpdated) for e in ev_a)
    assert a.send_window(sid) == 0
    assert a.stream_info(sid).bytes_sent == 8192  # type: ignore[union-attr]
    assert b.buffered_received == 8192
    assert b.stream_info(sid).receive_window == 0  # type: ignore[union-attr]
    assert received_bytes(got, sid) == b"z" * 8192
    # The application takes the records: credit flows back.
    assert sum(e.flow_controlled_length for e in got if isinstance(e, DataReceived)) == 8192
    b.acknowledge_received(sid, 8192)
    ev_a, _ = exchange(a, b)
    assert WindowUpdated(stream_id=sid, increment=8192) in ev_a
    assert a.send_window(sid) == 8192
    assert b.buffered_received == 0


def test_window_updates_are_batched_at_half_a_window() -> None:
    a, b = make_pair(server=SMALL)
    sid = a.open_stream()
    a.send_data(sid, bytes(6000))
    pump(a, b)
    b.acknowledge_received(sid, 1000)
    b.acknowledge_received(sid, 3095)
    assert b.pending_output == 0  # 4095 < half of 8192
    b.acknowledge_received(sid, 1)
    # The stream crossed half its window; the connection (65536) did not.
    assert sent(b) == [WindowUpdate(stream_id=sid, increment=4096)]
    b.acknowledge_received(sid, 1904)
    assert b.pending_output == 0
    assert b.buffered_received == 0


def test_exhausted_window_updates_at_once() -> None:
    """With no credit left at all, any acknowledgement is sent right away."""
    a, b = make_pair(server=SMALL)
    sid = a.open_stream()
    a.send_data(sid, bytes(8192))
    pump(a, b)
    b.acknowledge_received(sid, 1)
    assert sent(b) == [WindowUpdate(stream_id=sid, increment=1)]
    assert b.stream_info(sid).receive_window == 1  # type: ignore[union-attr]


def test_connection_window_updates_are_batched() -> None:
    server = Settings(max_frame_size=16384, initial_stream_window=8192, connection_window=20000)
    a, b = make_pair(server=server)
    sids = [a.open_stream() for _ in range(3)]
    for sid in sids:
        a.send_data(sid, bytes(3000))
    pump(a, b)
    # 3 x 3000 acknowledged in 1000-byte steps; the connection updates at 10000.
    updates: list[Frame] = []
    for sid in sids:
        for _ in range(3):
            b.acknowledge_received(sid, 1000)
            updates += sent(b)
    assert updates == []  # no stream reached 4096, the connection is at 9000 < 10000
    a.send_data(sids[0], bytes(1000))
    pump(a, b)
    b.acknowledge_received(sids[0], 1000)
    # The connection reached half its window; stream 1 (4000 of 8192) did not.
    assert sent(b) == [WindowUpdate(stream_id=0, increment=10000)]


def _stream_updates(a: Connection, b: Connection, sid: int) -> list[int]:
    """Deliver both ways; the increments *a* was granted on *sid*."""
    ev_a, _ = exchange(a, b)
    return [e.increment for e in ev_a if isinstance(e, WindowUpdated) and e.stream_id == sid]


def test_shrinking_a_stream_window_withholds_credit_until_the_peer_holds_the_new_size() -> None:
    a, b = make_pair(server=SMALL)  # stream window 8192
    sid = a.open_stream()
    a.send_data(sid, bytes(6000))
    exchange(a, b)
    b.resize_stream_window(sid, 2048)
    assert b.pending_output == 0  # nothing announces a smaller window
    # 8192 - 2048 = 6144 bytes are withheld from what is taken next: nothing goes back yet.
    b.acknowledge_received(sid, 6000)
    assert _stream_updates(a, b, sid) == []
    assert a.send_window(sid) == 2192  # the peer keeps the credit it held
    a.send_data(sid, bytes(2192))
    exchange(a, b)
    b.acknowledge_received(sid, 144)  # the last withheld bytes: still nothing owed
    assert _stream_updates(a, b, sid) == []
    b.acknowledge_received(sid, 1024)  # half the new window owed: given back
    assert _stream_updates(a, b, sid) == [1024]
    b.acknowledge_received(sid, 1024)
    assert _stream_updates(a, b, sid) == [1024]
    assert b.buffered_received == 0
    assert a.send_window(sid) == 2048  # from now on the peer holds the new window, no more


def test_growing_a_stream_window_grants_the_difference_after_cancelling_what_was_withheld() -> None:
    a, b = make_pair(server=SMALL)
    sid = a.open_stream()
    a.send_data(sid, bytes(8192))
    exchange(a, b)
    b.resize_stream_window(sid, 1024)  # 7168 to withhold
    b.acknowledge_received(sid, 3000)  # 3000 of them withheld
    assert _stream_updates(a, b, sid) == []
    # 10000 = 5192 buffered + the credit granted now: the 4168 still withheld are cancelled.
    b.resize_stream_window(sid, 10000)
    assert _stream_updates(a, b, sid) == [4808]
    b.acknowledge_received(sid, 5192)
    assert _stream_updates(a, b, sid) == [5192]
    assert a.send_window(sid) == 10000
    assert b.buffered_received == 0


def test_resizing_an_unknown_or_finished_stream_is_ignored_and_a_bad_size_refused() -> None:
    a, b = make_pair(server=SMALL)
    sid = a.open_stream()
    b.resize_stream_window(sid + 100, 10)  # idle or unknown: nothing to do
    a.end_stream(sid)
    exchange(a, b)
    b.resize_stream_window(sid, 100000)  # the peer sends no more: no credit for it
    assert _stream_updates(a, b, sid) == []
    with pytest.raises(LocalProtocolError):
        b.resize_stream_window(sid, -1)
    with pytest.raises(LocalProtocolError):
        b.resize_stream_window(sid, 2**31)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    steps=st.lists(
        st.one_of(
            st.tuples(st.just("send"), st.integers(1, 5000)),
            st.tuples(st.just("take"), st.integers(1, 5000)),
            st.tuples(st.just("resize"), st.integers(1, 20000)),
        ),
        max_size=40,
    )
)
def test_resized_windows_never_deadlock_nor_let_the_peer_exceed_them(steps: list[tuple[str, int]]) -> None:
    """Whatever the resizes: once everything is taken the peer holds credit (no deadlock), and
    after each resize has been withheld in full, credit plus buffered stays within the window."""
    server = Settings(max_frame_size=16384, initial_stream_window=8192, connection_window=1 << 20)
    a, b = make_pair(server=server)
    sid = a.open_stream()
    exchange(a, b)
    window = 8192
    high = 8192  # the largest window the peer may still hold credit from
    for op, n in steps:
        if op == "send":
            size = min(n, a.send_window(sid))
            if size:
                a.send_data(sid, bytes(size))
        elif op == "take":
            size = min(n, b.buffered_received)
            if size:
                b.acknowledge_received(sid, size)
        else:
            b.resize_stream_window(sid, n)
            window = n
            high = max(high, n)
        exchange(a, b)
        assert a.send_window(sid) + b.buffered_received <= high
    # Drain: the sender uses all its credit, the receiver takes everything, repeatedly.
    for _ in range(20):
        size = a.send_window(sid)
        if size:
            a.send_data(sid, bytes(size))
        exchange(a, b)
        if b.buffered_received:
            b.acknowledge_received(sid, b.buffered_received)
        exchange(a, b)
        assert a.send_window(sid) > 0  # never stuck without credit
    assert a.send_window(sid) == window  # the withholding is over: exactly the last size


def test_acknowledge_more_than_received_raises() -> None:
    a, b = make_pair()
    sid = a.open_stream()
    a.send_data(sid, bytes(10))
    pump(a, b)
    with pytest.raises(LocalProtocolError):
        b.acknowledge_received(sid, 11)
    with pytest.raises(LocalProtocolError):
        b.acknowledge_received(sid, -1)
    b.acknowledge_received(sid, 10)
    assert b.buffered_received == 0


def test_frames_on_closed_streams_give_connection_credit_back() -> None:
    a, b = make_pair(server=SMALL)
    sid = a.open_stream()
    pump(a, b)
    b.abort_stream(sid)
    pump(b, a)
    assert b.stream_state(sid) is a.stream_state(sid) is StreamState.CLOSED
    # Late frames from a peer that had not seen the abort yet.
    late = [encode(Data(stream_id=sid, data=bytes(16000))) for _ in range(3)] + [encode(page_frame(sid))]
    for blob in late:
        assert b.receive_data(blob) == []
        assert b.buffered_received == 0
    frames = sent(b)
    assert frames == [WindowUpdate(stream_id=0, increment=48000)]  # batched, half of 65536 passed
    assert b.connection_window == 65536 - (len(late[-1]) - HEADER_SIZE)
    assert b.state is ConnectionState.OPEN


def test_acknowledging_records_of_an_aborted_stream_restores_the_connection_window() -> None:
    a, b = make_pair(server=SMALL)
    sid = a.open_stream()
    a.send_data(sid, bytes(8192))
    events = pump(a, b)
    b.abort_stream(sid)
    assert b.buffered_received == 8192
    ack_all(b, events)
    assert b.buffered_received == 0
    assert [f for f in sent(b) if isinstance(f, WindowUpdate)] == []  # 8192 < 32768, no hurry
    assert b.connection_window + 8192 == 65536  # owed, not lost


def test_data_split_mid_frame_is_accounted_once() -> None:
    a, b = make_pair(server=SMALL)
    sid = a.open_stream()
    pump(a, b)
    a.send_data(sid, bytes(range(200)) * 20)
    wire = a.bytes_to_send()
    events: list[Event] = []
    for i in range(0, len(wire), 7):
        events += b.receive_data(wire[i : i + 7])
    assert received_bytes(events, sid) == bytes(range(200)) * 20
    assert sum(e.flow_controlled_length for e in events if isinstance(e, DataReceived)) == 4000
    assert b.buffered_received == 4000


# ----------------------------------------------------------------------
# Digests


def _payload(frame: Frame) -> bytes:
    return encode(frame)[HEADER_SIZE:]


def _digest(algorithm: DigestAlgorithm, chunks: list[bytes]) -> bytes:
    if algorithm is DigestAlgorithm.CRC32:
        crc = 0
        for c in chunks:
            crc = zlib.crc32(c, crc)
        return crc.to_bytes(4, "big")
    return hashlib.sha256(b"".join(chunks)).digest()


@pytest.mark.parametrize("algorithm", [DigestAlgorithm.CRC32, DigestAlgorithm.SHA256])
def test_digest_round_trip(algorithm: DigestAlgorithm) -> None:
    a, b = make_pair()
    sid = a.open_stream(digest=algorithm)
    data = bytes(range(256)) * 9
    pages = Pages(stream_id=sid, region=3, page_size=512, addresses=(1024,), data=b"\x5a" * 512)
    zeros = ZeroPages(stream_id=sid, region=3, page_size=512, runs=((0, 2),))
    dev = DeviceState(stream_id=sid, name="virtio-net", version=4, data=b"state")
    a.send_data(sid, data)
    a.send_pages(sid, region=3, page_size=512, addresses=(1024,), data=b"\x5a" * 512)
    a.send_zero_pages(sid, region=3, page_size=512, runs=((0, 2),))
    a.send_device_state(sid, name="virtio-net", version=4, data=b"state")
    a.end_stream(sid)
    events = pump(a, b)
    chunks = [data, _payload(pages), _payload(zeros), _payload(dev)]
    expected = _digest(algorithm, chunks)
    assert len(expected) == algorithm.digest_size
    assert events[-1] == StreamEnded(stream_id=sid, total_bytes=sum(map(len, chunks)), digest=expected)
    assert not any(isinstance(e, StreamReset) for e in events)
    assert b.stream_state(sid) is StreamState.HALF_CLOSED_REMOTE


@pytest.mark.parametrize("algorithm", [DigestAlgorithm.CRC32, DigestAlgorithm.SHA256])
@pytest.mark.parametrize("what", ["data", "pages"])
def test_tampered_byte_is_a_digest_mismatch(algorithm: DigestAlgorithm, what: str) -> None:
    a, b = make_pair()
    sid = a.open_stream(digest=algorithm)
    pump(a, b)
    payload = bytes(range(256)) * 4
    if what == "data":
        a.send_data(sid, payload)
    else:
        a.send_pages(sid, region=0, page_size=512, addresses=(0, 512), data=payload)
    a.end_stream(sid)  # its digest covers the original bytes
    parts = [bytes(p) for p in a.data_to_send()]
    [i] = [k for k, p in enumerate(parts) if p == payload]
    tampered = bytearray(payload)
    tampered[300] ^= 0x01
    parts[i] = bytes(tampered)
    events = b.receive_data(b"".join(parts))
    assert not any(isinstance(e, StreamEnded) for e in events)
    reset = events[-1]
    assert isinstance(reset, StreamReset)
    assert (reset.stream_id, reset.error_code, reset.remote) == (sid, ErrorCode.DIGEST_MISMATCH, False)
    reply = b.bytes_to_send()
    assert [(f.stream_id, f.error_code) for f in parse(reply) if isinstance(f, StreamAbort)] == [(sid, ErrorCode.DIGEST_MISMATCH)]
    assert b.stream_state(sid) is StreamState.CLOSED and b.state is ConnectionState.OPEN
    # The sender learns of it as a remote abort.
    a_events = a.receive_data(reply)
    assert [type(e) for e in a_events] == [StreamReset]
    assert a.stream_state(sid) is StreamState.CLOSED


def test_untampered_raw_frames_pass() -> None:
    """Control for the tampering test: the same crafting without the flip ends cleanly."""
    a, b = make_pair()
    sid = a.open_stream(digest=DigestAlgorithm.CRC32)
    payload = bytes(range(256)) * 4
    a.send_data(sid, payload)
    a.end_stream(sid)
    events = b.receive_data(b"".join(bytes(p) for p in a.data_to_send()))
    assert isinstance(events[-1], StreamEnded)


@pytest.mark.parametrize("delta", [-1, 1])
def test_total_bytes_mismatch(delta: int) -> None:
    a, b = make_pair()
    sid = a.open_stream()
    a.send_data(sid, bytes(100))
    pump(a, b)
    events = b.receive_data(encode(StreamEnd(stream_id=sid, total_bytes=100 + delta)))
    assert [(type(e), e.error_code) for e in events] == [(StreamReset, ErrorCode.DIGEST_MISMATCH)]  # type: ignore[attr-defined]
    assert b.stream_state(sid) is StreamState.CLOSED


def test_wrong_digest_algorithm_at_end() -> None:
    a, b = make_pair()
    sid = a.open_stream(digest=DigestAlgorithm.CRC32)
    pump(a, b)
    events = b.receive_data(encode(StreamEnd(stream_id=sid, total_bytes=0)))
    assert [(type(e), e.error_code) for e in events] == [(StreamReset, ErrorCode.PROTOCOL_ERROR)]  # type: ignore[attr-defined]


@pytest.mark.parametrize("who_lacks", ["client", "server", "both"])
def test_sha256_needs_the_feature_on_both_sides(who_lacks: str) -> None:
    plain = Settings(features=Feature.NONE)
    a, b = make_pair(
        client=plain if who_lacks in ("client", "both") else None,
        server=plain if who_lacks in ("server", "both") else None,
    )
    for conn in (a, b):
        with pytest.raises(LocalProtocolError):
            conn.open_stream(digest=DigestAlgorithm.SHA256)
        assert conn.pending_output == 0 and conn.open_streams == []
        conn.open_stream(digest=DigestAlgorithm.CRC32)  # needs no feature


def test_sha256_open_refused_without_the_feature() -> None:
    _a, b = make_pair(server=Settings(features=Feature.NONE))
    events = b.receive_data(
        encode(StreamOpen(stream_id=1, digest=DigestAlgorithm.SHA256)) + encode(Data(stream_id=1, data=b"x" * 100))
    )
    assert events == []
    assert [(f.stream_id, f.error_code) for f in sent(b) if isinstance(f, StreamAbort)] == [(1, ErrorCode.REFUSED_STREAM)]
    assert b.stream_state(1) is StreamState.CLOSED and b.state is ConnectionState.OPEN
    assert b.buffered_received == 0


# ----------------------------------------------------------------------
# ITERATION and ZSTD_PAGES


def test_iterations_are_records_in_order_and_in_the_digest() -> None:
    a, b = make_pair(server=SMALL)
    sid = a.open_stream(digest=DigestAlgorithm.CRC32)
    a.send_iteration(sid, 0)
    a.send_pages(sid, region=0, page_size=512, addresses=(0,), data=bytes(512))
    a.send_iteration(sid, 1, final=True)
    assert a.send_window(sid) == 8192 - 8 - (16 + 8 + 512) - 8  # 8 flow-controlled bytes each
    a.end_stream(sid)
    events = pump(a, b)
    assert [type(e) for e in events] == [StreamOpened, RecordReceived, RecordReceived, RecordReceived, StreamEnded]
    assert events[1] == RecordReceived(stream_id=sid, record=IterationRecord(iteration=0, final=False), flow_controlled_length=8)
    assert isinstance(events[2], RecordReceived) and isinstance(events[2].record, PagesRecord)
    assert events[3] == RecordReceived(stream_id=sid, record=IterationRecord(iteration=1, final=True), flow_controlled_length=8)
    assert events[4] == StreamEnded(stream_id=sid, total_bytes=8 + 536 + 8, digest=events[4].digest)  # type: ignore[attr-defined]
    assert b.buffered_received == 552
    ack_all(b, events)
    assert b.buffered_received == 0


def test_tampered_iteration_is_a_digest_mismatch() -> None:
    """The iteration number is covered by the digest like any record payload."""
    a, b = make_pair()
    sid = a.open_stream(digest=DigestAlgorithm.CRC32)
    a.send_iteration(sid, 4)
    a.end_stream(sid)
    wire = bytearray(a.bytes_to_send())
    frames = parse(bytes(wire))
    assert isinstance(frames[1], RecordFrame) and isinstance(frames[1].record, IterationRecord)
    offset = sum(len(encode(f)) for f in frames[:1]) + HEADER_SIZE + 3  # low byte of the iteration number
    wire[offset] ^= 0x01
    events = b.receive_data(bytes(wire))
    assert isinstance(events[1], RecordReceived) and events[1].record == IterationRecord(iteration=5)
    assert [(type(e), getattr(e, "error_code", None)) for e in events[2:]] == [(StreamReset, ErrorCode.DIGEST_MISMATCH)]


@pytest.mark.parametrize(("payload", "code"), [
    (bytes.fromhex("00000001 00000002"), ErrorCode.PROTOCOL_ERROR),
    (bytes.fromhex("00000001 80000001"), ErrorCode.PROTOCOL_ERROR),
    (bytes.fromhex("00000001 000000"), ErrorCode.FRAME_SIZE_ERROR),
    (bytes.fromhex("00000001 00000000 00"), ErrorCode.FRAME_SIZE_ERROR),
])
def test_malformed_iteration_is_a_connection_error(payload: bytes, code: int) -> None:
    a, b = make_pair()
    sid = a.open_stream()
    pump(a, b)
    assert_connection_error(b, HEADER.pack(len(payload), 0x27, 0, 0, sid) + payload, code)


def test_send_iteration_checks_its_number() -> None:
    a, _b = make_pair()
    sid = a.open_stream()
    a.bytes_to_send()
    for bad in (-1, 2**32):
        with pytest.raises(LocalProtocolError):
            a.send_iteration(sid, bad)
    assert a.pending_output == 0 and a.send_window(sid) == Settings().initial_stream_window
    a.send_iteration(sid, 2**32 - 1, final=True)
    assert sent(a) == [Iteration(stream_id=sid, iteration=2**32 - 1, final=True)]


def test_features_in_effect() -> None:
    assert Connection(client=True, settings=ZSTD).features == Feature.NONE  # before the handshake
    a, b = make_pair(ZSTD, ZSTD)
    assert a.features == b.features == Feature.DIGEST_SHA256 | Feature.ZSTD
    a, b = make_pair(ZSTD, None)
    assert a.features == b.features == Feature.DIGEST_SHA256


def test_zstd_pages_round_trip_count_the_wire_bytes() -> None:
    a, b = make_pair(SMALL, SMALL)
    sid = a.open_stream(digest=DigestAlgorithm.SHA256)
    blob = b"\x28\xb5\x2f\xfd" + bytes(range(100))
    a.send_zstd_pages(sid, region=5, page_size=4096, addresses=(0, 4096, 65536), compressed=memoryview(blob))
    wire = 16 + 3 * 8 + len(blob)
    assert a.send_window(sid) == 8192 - wire  # far less than the 12 KiB of pages it stands for
    a.end_stream(sid)
    events = pump(a, b)
    assert [type(e) for e in events] == [StreamOpened, RecordReceived, StreamEnded]
    got = events[1]
    assert isinstance(got, RecordReceived) and isinstance(got.record, ZstdPagesRecord)
    r = got.record
    assert (got.stream_id, r.region, r.page_size, r.addresses, bytes(r.compressed), got.flow_controlled_length) == (
        sid, 5, 4096, (0, 4096, 65536), blob, wire,
    )
    ended = events[2]
    assert isinstance(ended, StreamEnded) and ended.total_bytes == wire
    assert ended.digest == hashlib.sha256(encode(ZstdPages(stream_id=sid, region=5, page_size=4096, addresses=(0, 4096, 65536), compressed=blob))[HEADER_SIZE:]).digest()


@pytest.mark.parametrize("who_lacks", ["client", "server", "both"])
def test_zstd_pages_need_the_feature_on_both_sides(who_lacks: str) -> None:
    a, b = make_pair(
        client=None if who_lacks in ("client", "both") else ZSTD,
        server=None if who_lacks in ("server", "both") else ZSTD,
    )
    sid = a.open_stream()
    pump(a, b)
    with pytest.raises(LocalProtocolError):
        a.send_zstd_pages(sid, region=0, page_size=4096, addresses=(0,), compressed=b"z")
    assert a.pending_output == 0
    # Sent anyway (crafted), it is a connection error, whichever side lacked the bit.
    err = assert_connection_error(b, encode(zstd_frame(sid)))
    assert "ZSTD" in err.reason


def test_zstd_pages_without_the_feature_on_a_closed_stream_is_still_a_connection_error() -> None:
    a, b = make_pair()
    sid = a.open_stream()
    a.abort_stream(sid)
    pump(a, b)
    assert b.stream_state(sid) is StreamState.CLOSED
    assert_connection_error(b, encode(zstd_frame(sid)))


def test_zstd_pages_above_the_expansion_limit() -> None:
    """count x page_size may not exceed 64 x the receiver's max frame size: refused
    by the sender's core, and a stream error at the receiver (nothing allocated)."""
    a, b = make_pair(SMALL, SMALL)
    limit = ZSTD_MAX_EXPANSION * SMALL.max_frame_size  # 1 MiB
    sid = a.open_stream()
    pump(a, b)
    ok = tuple(range(0, limit, 4096))
    a.send_zstd_pages(sid, region=0, page_size=4096, addresses=ok, compressed=b"z")
    with pytest.raises(FrameTooLargeError):
        a.send_zstd_pages(sid, region=0, page_size=4096, addresses=(*ok, limit), compressed=b"z")
    with pytest.raises(FrameTooLargeError):
        a.send_zstd_pages(sid, region=0, page_size=2 * limit, addresses=(0,), compressed=b"z")
    [event] = pump(a, b)
    assert isinstance(event, RecordReceived) and isinstance(event.record, ZstdPagesRecord) and event.record.raw_size == limit
    ack_all(b, [event])
    too_big = ZstdPages(stream_id=sid, region=0, page_size=4096, addresses=(*ok, limit), compressed=b"z")
    events = b.receive_data(encode(too_big))
    assert events == [StreamReset(stream_id=sid, error_code=ErrorCode.PROTOCOL_ERROR, reason=events[0].reason, remote=False)]  # type: ignore[attr-defined]
    assert str(limit) in events[0].reason  # type: ignore[attr-defined]
    assert [(f.stream_id, f.error_code) for f in sent(b) if isinstance(f, StreamAbort)] == [(sid, ErrorCode.PROTOCOL_ERROR)]
    assert b.state is ConnectionState.OPEN and b.stream_state(sid) is StreamState.CLOSED
    assert b.buffered_received == 0  # its connection credit was given back at once


# ----------------------------------------------------------------------
# External (spliced) data


def test_external_data_sender_side() -> None:
    a, b = make_pair(server=SMALL)
    sid = a.open_stream()
    a.send_data(sid, b"head")
    hdr = a.prepare_external_data(sid, 5000)
    assert len(hdr) == HEADER_SIZE
    assert a.send_window(sid) == 8192 - 4 - 5000
    assert a.stream_info(sid).bytes_sent == 5004  # type: ignore[union-attr]
    body = bytes(range(250)) * 20
    events = b.receive_data(a.bytes_to_send() + hdr + body)
    assert received_bytes(events, sid) == b"head" + body
    a.end_stream(sid)
    assert pump(a, b)[-1] == StreamEnded(stream_id=sid, total_bytes=5004, digest=b"")


def test_external_data_sender_refusals() -> None:
    a, _b = make_pair(server=SMALL)
    crc = a.open_stream(digest=DigestAlgorithm.CRC32)
    plain = a.open_stream()
    a.bytes_to_send()
    with pytest.raises(LocalProtocolError):
        a.prepare_external_data(crc, 10)
    with pytest.raises(LocalProtocolError):
        a.prepare_external_data(plain, 0)
    with pytest.raises(FlowControlError):
        a.prepare_external_data(plain, 8193)
    assert a.send_window(crc) == a.send_window(plain) == 8192
    assert a.pending_output == 0


def test_external_data_receiver_side() -> None:
    a, b = make_pair(server=SMALL)
    sid = a.open_stream()
    body = bytes(range(200)) * 25  # 5000
    a.send_data(sid, body)
    wire = a.bytes_to_send()
    body_at = len(wire) - len(body)
    assert b.pending_data_payload is None
    b.receive_data(wire[:body_at])
    assert b.pending_data_payload == (sid, 5000)
    # The driver moves 2000 bytes itself (os.splice), then the core reads the rest.
    events = b.receive_external_data(2000)
    assert events == [DataReceived(stream_id=sid, data=None, flow_controlled_length=2000)]
    assert b.pending_data_payload == (sid, 3000)
    events = b.receive_data(wire[body_at + 2000 : body_at + 2500])
    assert received_bytes(events, sid) == body[2000:2500]
    assert b.receive_external_data(2500) == [DataReceived(stream_id=sid, data=None, flow_controlled_length=2500)]
    assert b.pending_data_payload is None
    assert b.stream_info(sid).bytes_received == 5000  # type: ignore[union-attr]
    assert b.buffered_received == 5000
    with pytest.raises(LocalProtocolError):
        b.receive_external_data(1)  # nothing pending any more
    a.end_stream(sid)
    assert pump(a, b) == [StreamEnded(stream_id=sid, total_bytes=5000, digest=b"")]
    b.acknowledge_received(sid, 5000)
    assert b.buffered_received == 0


def test_external_data_receiver_refusals() -> None:
    a, b = make_pair(server=SMALL)
    sid = a.open_stream()
    a.send_data(sid, bytes(100))
    wire = a.bytes_to_send()
    b.receive_data(wire[:-100])
    for size in (0, -1, 101):
        with pytest.raises(LocalProtocolError):
            b.receive_external_data(size)
    assert b.pending_data_payload == (sid, 100)


def test_external_data_refused_on_digest_streams() -> None:
    a, b = make_pair(server=SMALL)
    sid = a.open_stream(digest=DigestAlgorithm.CRC32)
    a.send_data(sid, bytes(100))
    wire = a.bytes_to_send()
    b.receive_data(wire[:-100])
    assert b.pending_data_payload == (sid, 100)
    with pytest.raises(LocalProtocolError):
        b.receive_external_data(50)


def test_external_data_for_a_stream_aborted_meanwhile() -> None:
    a, b = make_pair(server=SMALL)
    sid = a.open_stream()
    a.send_data(sid, bytes(3000))
    wire = a.bytes_to_send()
    b.receive_data(wire[:-3000])
    b.abort_stream(sid)
    assert b.receive_external_data(3000) == []
    # Nothing was delivered, so nothing will be acknowledged: the core must
    # give the connection credit back itself, as it does for dropped chunks.
    assert b.buffered_received == 0


# ----------------------------------------------------------------------
# RPC


def test_many_calls_matched_by_serial() -> None:
    a, b = make_pair()
    serials = [a.send_call(0x20008086, 1, proc, b"arg%d" % proc) for proc in range(10)]
    assert len(set(serials)) == 10 and 0 not in serials
    assert a.calls_outstanding == 10
    calls = pump(a, b)
    assert [(e.serial, e.procedure, bytes(e.body)) for e in calls] == [(s, p, b"arg%d" % p) for p, s in enumerate(serials)]  # type: ignore[attr-defined]
    # Answered out of order, half with errors.
    for call in reversed(calls):
        assert isinstance(call, CallReceived)
        if call.procedure % 2:
            b.send_error(call.serial, ErrorCode.APPLICATION_ERROR, f"no {call.procedure}")
        else:
            b.send_reply(call.serial, b"re:" + bytes(call.body))
    answers = pump(b, a)
    assert a.calls_outstanding == 0
    by_serial: dict[int, Any] = {e.serial: e for e in answers}  # type: ignore[attr-defined]
    assert sorted(by_serial) == sorted(serials)
    for proc, serial in enumerate(serials):
        ans = by_serial[serial]
        assert (ans.program, ans.version, ans.procedure) == (0x20008086, 1, proc)
        if proc % 2:
            assert isinstance(ans, CallFailed) and ans.error_code == ErrorCode.APPLICATION_ERROR and ans.message == f"no {proc}"
        else:
            assert isinstance(ans, ReplyReceived) and bytes(ans.body) == b"re:arg%d" % proc


def test_answering_twice_or_unknown_serial_raises() -> None:
    a, b = make_pair()
    serial = a.send_call(1, 1, 1)
    pump(a, b)
    with pytest.raises(LocalProtocolError):
        b.send_reply(serial + 1)
    b.send_reply(serial)
    with pytest.raises(LocalProtocolError):
        b.send_reply(serial)
    with pytest.raises(LocalProtocolError):
        b.send_error(serial, ErrorCode.APPLICATION_ERROR, "x")


def test_busy_beyond_max_concurrent_calls() -> None:
    a, b = make_pair(server=Settings(max_concurrent_calls=2))
    s1, s2, s3 = (a.send_call(1, 1, p) for p in (1, 2, 3))
    calls = pump(a, b)
    assert [e.serial for e in calls] == [s1, s2]  # type: ignore[attr-defined]
    [busy] = pump(b, a)
    assert isinstance(busy, CallFailed) and busy.serial == s3 and busy.error_code == ErrorCode.BUSY
    assert a.calls_outstanding == 2
    b.send_reply(s1)
    pump(b, a)
    s4 = a.send_call(1, 1, 4)
    assert [e.serial for e in pump(a, b)] == [s4]  # type: ignore[attr-defined]


def test_call_too_large() -> None:
    a, b = make_pair(server=Settings(max_call_size=100))
    with pytest.raises(FrameTooLargeError):
        a.send_call(1, 1, 1, bytes(101))
    assert a.calls_outstanding == 0 and a.pending_output == 0
    a.send_call(1, 1, 1, bytes(100))
    assert [type(e) for e in pump(a, b)] == [CallReceived]
    # A peer that ignores the limit gets an error for that call only.
    assert b.receive_data(encode(RpcCall(program=1, version=2, procedure=3, serial=77, body=bytes(101)))) == []
    [err] = sent(b)
    assert isinstance(err, RpcError) and (err.serial, err.error_code, err.procedure) == (77, ErrorCode.CALL_TOO_LARGE, 3)
    assert b.state is ConnectionState.OPEN


def test_call_larger_than_a_frame_raises_locally() -> None:
    a, _b = make_pair(server=Settings(max_frame_size=16384, max_call_size=10**6))
    with pytest.raises(FrameTooLargeError):
        a.send_call(1, 1, 1, bytes(16384 - 16 + 1))
    a.send_call(1, 1, 1, bytes(16384 - 16))


def test_duplicate_serial_is_a_connection_error() -> None:
    _a, b = make_pair()
    call = encode(RpcCall(program=1, version=1, procedure=1, serial=7))
    assert [type(e) for e in b.receive_data(call)] == [CallReceived]
    assert_connection_error(b, call)


def test_serial_may_be_reused_after_the_answer() -> None:
    _a, b = make_pair()
    call = encode(RpcCall(program=1, version=1, procedure=1, serial=7))
    b.receive_data(call)
    b.send_reply(7)
    assert [type(e) for e in b.receive_data(call)] == [CallReceived]


@pytest.mark.parametrize("kind", ["reply", "error"])
def test_answer_to_unknown_serial_is_a_connection_error(kind: str) -> None:
    a, _b = make_pair()
    a.send_call(1, 1, 1)
    frame: Frame = (
        RpcReply(program=1, version=1, procedure=1, serial=99)
        if kind == "reply"
        else RpcError(program=1, version=1, procedure=1, serial=99, error_code=ErrorCode.APPLICATION_ERROR)
    )
    assert_connection_error(a, encode(frame))


def test_cancel_call_drops_the_reply() -> None:
    a, b = make_pair()
    keep = a.send_call(1, 1, 1)
    gone = a.send_call(1, 1, 2)
    a.cancel_call(gone)
    assert a.calls_outstanding == 1
    pump(a, b)
    # The cancelled serial is not handed out again while its reply may come.
    assert a.send_call(1, 1, 3) not in (keep, gone)
    pump(a, b)
    b.send_reply(gone, b"late")
    b.send_reply(keep, b"kept")
    answers = pump(b, a)
    assert [(type(e), e.serial) for e in answers] == [(ReplyReceived, keep)]  # type: ignore[attr-defined]
    # Only one answer is absorbed: a second one for that serial is a violation.
    assert_connection_error(a, encode(RpcReply(program=1, version=1, procedure=2, serial=gone)))


def test_cancelled_call_answered_by_error_is_dropped_too() -> None:
    a, b = make_pair()
    serial = a.send_call(1, 1, 1)
    pump(a, b)
    a.cancel_call(serial)
    a.cancel_call(serial)  # twice: harmless
    b.send_error(serial, ErrorCode.APPLICATION_ERROR, "x")
    assert pump(b, a) == []
    assert a.state is ConnectionState.OPEN


def test_rpc_error_message_is_truncated_to_fit_a_frame() -> None:
    a, b = make_pair(client=Settings(max_frame_size=16384))
    serial = a.send_call(1, 1, 1)
    pump(a, b)
    b.send_error(serial, ErrorCode.APPLICATION_ERROR, "é" * 20000)
    [failed] = pump(b, a)
    assert isinstance(failed, CallFailed)
    assert 0 < len(failed.message.encode()) <= 16384 - 20
    assert set(failed.message) == {"é"}


# ----------------------------------------------------------------------
# PING, GOODBYE, close


def test_ping_is_answered_automatically() -> None:
    a, b = make_pair()
    a.ping(b"abcdefgh")
    assert pump(a, b) == []
    pong = b.bytes_to_send()
    assert parse(pong) == [Pong(opaque=b"abcdefgh")]
    assert a.receive_data(pong) == [PongReceived(opaque=b"abcdefgh")]
    with pytest.raises(LocalProtocolError):
        a.ping(b"short")


def test_pings_arriving_while_a_pong_is_unsent_get_one_pong() -> None:
    """A flood of PINGs from a peer that does not read costs one queued PONG,
    which echoes the newest PING (protocol.md 8.1)."""
    a, b = make_pair()
    for i in range(1000):
        b.receive_data(encode(Ping(opaque=i.to_bytes(8, "big"))))
    assert b.pending_control_bytes == len(encode(Pong(opaque=b"\0" * 8)))
    assert parse(b.bytes_to_send()) == [Pong(opaque=(999).to_bytes(8, "big"))]
    assert b.pending_control_bytes == 0
    # Once taken, the next PING gets a PONG of its own, behind other output.
    b.receive_data(encode(Ping(opaque=b"one.....")))
    b.send_call(1, 1, 1, b"x")
    b.receive_data(encode(Ping(opaque=b"two.....")))
    frames = parse(b.bytes_to_send())
    assert [f for f in frames if isinstance(f, Pong)] == [Pong(opaque=b"two.....")]
    assert len(frames) == 2


def test_pending_control_bytes_counts_answers_to_the_peer_only() -> None:
    a, b = make_pair()
    sid = a.open_stream(digest=DigestAlgorithm.NONE)
    pump(a, b)
    # The application's own output does not count.
    b.send_call(7, 1, 1, b"c" * 5000)
    b.ping(b"12345678")
    assert b.pending_control_bytes == 0
    # Answers do: PONGs, window updates, RPC answers past max_concurrent_calls.
    a.send_call(7, 1, 1, b"call")
    a.send_call(7, 1, 2, b"call")
    a.send_data(sid, b"d" * 3000)
    a.ping(b"pingping")
    events = pump(a, b)
    calls = [e for e in events if isinstance(e, CallReceived)]
    b.send_error(calls[0].serial, ErrorCode.UNKNOWN_PROCEDURE, "nope")
    b.send_reply(calls[1].serial, b"r" * 100)
    ack_all(b, events)
    # Answers to calls count only once the peer has more than
    # max_concurrent_calls of them waiting: up to there it is owed them.
    owed = b.pending_control_bytes
    assert owed == 20 and b.pending_rpc_answers == 2  # the PONG
    assert b.pending_output > owed + 5000
    b.data_to_send()
    assert b.pending_control_bytes == 0 and b.pending_rpc_answers == 0
    limit = b.local_settings.max_concurrent_calls
    for _ in range(limit + 1):
        a.send_call(7, 1, 3)
    for event in pump(a, b):
        assert isinstance(event, CallReceived)
        b.send_error(event.serial, ErrorCode.UNKNOWN_PROCEDURE, "nope")
    assert b.pending_rpc_answers == limit + 1
    assert b.pending_control_bytes == b.pending_output


def test_frames_received_and_receiving_frame() -> None:
    a = Connection(client=True)
    b = Connection(client=False)
    blob = a.bytes_to_send()  # preface and SETTINGS
    assert not b.receiving_frame and b.frames_received == 0
    b.receive_data(blob[:3])
    assert b.receiving_frame and b.frames_received == 0
    b.receive_data(blob[3:])
    assert not b.receiving_frame and b.frames_received == 2
    a.receive_data(b.bytes_to_send())
    sid = a.open_stream(digest=DigestAlgorithm.NONE)
    a.send_data(sid, b"x" * 100)
    blob = a.bytes_to_send()
    b.receive_data(blob[:-1])
    assert b.receiving_frame and b.frames_received == 3  # STREAM_OPEN; DATA under way
    b.receive_data(blob[-1:])
    assert not b.receiving_frame and b.frames_received == 4


def test_goodbye_terminates_and_later_input_is_ignored() -> None:
    a, b = make_pair()
    sid = a.open_stream()
    pump(a, b)
    a.close(ErrorCode.NO_ERROR, "done")
    assert a.state is ConnectionState.CLOSED
    # Frames after the GOODBYE, even in the same read, are not processed.
    blob = a.bytes_to_send() + encode(Ping()) + encode(Data(stream_id=sid, data=b"x"))
    events = b.receive_data(blob)
    assert events == [ConnectionTerminated(error_code=ErrorCode.NO_ERROR, last_stream_id=0, reason="done")]
    assert b.state is ConnectionState.CLOSED
    assert b.close_reason is not None and "done" in b.close_reason
    assert b.pending_output == 0  # no PONG
    assert b.receive_data(encode(Ping())) == []
    assert b.receive_data(b"garbage that would be a protocol error") == []
    with pytest.raises(LocalProtocolError):
        b.send_data(sid, b"x")
    with pytest.raises(LocalProtocolError):
        b.open_stream()


def test_unknown_error_codes_are_accepted() -> None:
    a, b = make_pair()
    sid = a.open_stream()
    pump(a, b)
    assert a.receive_data(encode(StreamAbort(stream_id=sid, error_code=12345, reason="new"))) == [
        StreamReset(stream_id=sid, error_code=12345, reason="new", remote=True)
    ]
    assert a.pending_output == 0
    [term] = a.receive_data(encode(Goodbye(error_code=99999)))
    assert isinstance(term, ConnectionTerminated) and term.error_code == 99999
    assert a.close_reason is not None and "UNKNOWN(99999)" in a.close_reason


def test_goodbye_reports_its_last_stream_id() -> None:
    a, b = make_pair()
    b.open_stream()
    b.open_stream()
    pump(b, a)
    a.close(ErrorCode.INTERNAL_ERROR, "oops")
    [term] = pump(a, b)
    assert term == ConnectionTerminated(error_code=ErrorCode.INTERNAL_ERROR, last_stream_id=4, reason="oops")


def test_close_then_local_sends_raise() -> None:
    a, b = make_pair()
    sid = a.open_stream()
    serial_peer = b.send_call(1, 1, 1)
    pump(b, a)
    a.close()
    assert [type(f) for f in sent(a)] == [StreamOpen, Goodbye]
    attempts: list[Callable[[], object]] = [
        lambda: a.open_stream(),
        lambda: a.send_data(sid, b"x"),
        lambda: a.send_zero_pages(sid, region=0, page_size=512, runs=((0, 1),)),
        lambda: a.end_stream(sid),
        lambda: a.send_call(1, 1, 1),
        lambda: a.send_reply(serial_peer),
        lambda: a.ping(b"12345678"),
        lambda: a.prepare_external_data(sid, 1),
    ]
    for attempt in attempts:
        with pytest.raises(LocalProtocolError):
            attempt()
    a.abort_stream(sid)  # nothing to abort on a closed connection: no-op
    a.close()  # idempotent
    a.acknowledge_received(sid, 5)  # nothing to give back any more
    assert a.pending_output == 0


# ----------------------------------------------------------------------
# send_record / RecordReceived: one record type from sender to receiver


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(S.records(max_size=2048), st.sampled_from([DigestAlgorithm.NONE, DigestAlgorithm.CRC32, DigestAlgorithm.SHA256]))
def test_send_record_arrives_as_the_same_record(record: Any, digest: DigestAlgorithm) -> None:
    big = Settings(
        features=Feature.DIGEST_SHA256 | Feature.ZSTD, max_frame_size=2**24 - 1, initial_stream_window=2**31 - 1, connection_window=2**31 - 1
    )
    a, b = make_pair(big, big)
    sid = a.open_stream(digest=digest)
    pump(a, b)
    size = payload_size(record)
    expanded = getattr(record, "raw_size", 0)
    if expanded > ZSTD_MAX_EXPANSION * big.max_frame_size:
        with pytest.raises(FrameTooLargeError):
            a.send_record(sid, record)
        return
    a.send_record(sid, record)
    assert a.send_window(sid) == 2**31 - 1 - size  # the size the record says is the size the credit pays
    a.end_stream(sid)
    events = pump(a, b)
    assert events[0] == RecordReceived(stream_id=sid, record=record, flow_controlled_length=size)
    assert type(events[0].record) is type(record)  # type: ignore[attr-defined]
    assert isinstance(events[1], StreamEnded) and events[1].total_bytes == size


def test_send_record_refuses_an_invalid_record_and_queues_nothing() -> None:
    a, b = make_pair()
    sid = a.open_stream()
    pump(a, b)
    before = a.send_window(sid)
    with pytest.raises(LocalProtocolError):
        a.send_record(sid, PagesRecord(region=0, page_size=4096, addresses=(100,), data=bytes(4096)))
    assert a.pending_output == 0 and a.send_window(sid) == before


def test_window_0_opens_when_the_application_asks_for_data() -> None:
    """A window of 0: no credit until the receiver's application asks (request_data);
    then as much as it asked for, once, and again at the next request."""
    a, b = make_pair(server=Settings(initial_stream_window=0, connection_window=0))
    sid = a.open_stream()
    exchange(a, b)
    assert a.send_window(sid) == 0
    b.request_data(sid, 1000)
    exchange(a, b)
    assert a.send_window(sid) == 1000
    b.request_data(sid, 1000)  # the peer holds credit already: nothing more
    assert b.pending_output == 0
    a.send_data(sid, b"x" * 1000)
    _, events = exchange(a, b)
    assert sum(len(e.data or b"") for e in events if isinstance(e, DataReceived)) == 1000
    b.request_data(sid, 500)  # 1000 bytes are buffered: nothing
    assert b.pending_output == 0
    b.acknowledge_received(sid, 1000)  # taken: the granted credit does not come back by itself
    exchange(a, b)
    assert a.send_window(sid) == 0 and b.buffered_received == 0
    b.request_data(sid, 500)
    exchange(a, b)
    assert a.send_window(sid) == 500


def test_window_0_grants_at_most_one_frame_whatever_the_request() -> None:
    """A consumer asking for a gigabyte lets the peer send one frame's worth (the receiver's MAX_FRAME_SIZE)."""
    a, b = make_pair(server=Settings(initial_stream_window=0, connection_window=0, max_frame_size=64 * 1024))
    sid = a.open_stream()
    exchange(a, b)
    b.request_data(sid, 1 << 30)
    exchange(a, b)
    assert a.send_window(sid) == 64 * 1024


def test_request_data_grants_nothing_to_a_window_above_0() -> None:
    a, b = make_pair(server=Settings(initial_stream_window=8192, connection_window=8192))
    sid = a.open_stream()
    exchange(a, b)
    for _ in range(3):
        b.request_data(sid, 4096)
        assert b.pending_output == 0
        a.send_data(sid, b"y" * a.send_window(sid))
        exchange(a, b)
        b.acknowledge_received(sid, 8192)  # all taken: credit comes back as always
        exchange(a, b)
        assert a.send_window(sid) == 8192
