"""Points of protocol.md that an implementation written from the document alone had to guess.

Each test names the section that now states the rule.  Frames that the
encoder refuses to build (they are malformed on purpose) are written here
byte by byte, from the layouts of §3.1 and §4.
"""

from __future__ import annotations

import struct
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing
import zstandard
from conftest import unix_pair

import tunnel
from tunnel import Connection, ErrorCode, FrameType, RemoteProtocolError, RPCError, Settings
from tunnel.transport import open_connection

KiB = 1024
MiB = 1024 * 1024
PAGE = 4096


def frame(ftype: FrameType, stream_id: int, payload: bytes) -> bytes:
    """One frame: the 12-byte header of §3.1 (length, type, flags, reserved, stream id) and *payload*."""
    return struct.pack(">IBBHI", len(payload), ftype, 0, 0, stream_id) + payload


def pages_payload(*, count: int, page_size: int, reserved: int = 0, addresses: tuple[int, ...] | None = None, data: bytes | None = None) -> bytes:
    addresses = tuple(i * page_size for i in range(count)) if addresses is None else addresses
    body = struct.pack(">IIII", 0, count, page_size, reserved) + b"".join(struct.pack(">Q", a) for a in addresses)
    return body + (bytes(count * page_size) if data is None else data)


def pair(client_settings: Settings | None = None, server_settings: Settings | None = None) -> tuple[Connection, Connection]:
    client, server = Connection(client=True, settings=client_settings), Connection(client=False, settings=server_settings)
    server.receive_data(client.bytes_to_send())
    client.receive_data(server.bytes_to_send())
    return client, server


def opened(client_settings: Settings | None = None, server_settings: Settings | None = None) -> tuple[Connection, Connection, int]:
    """A client and server with one stream the client opened, OPEN on both sides."""
    client, server = pair(client_settings, server_settings)
    sid = client.open_stream()
    [event] = server.receive_data(client.bytes_to_send())
    assert isinstance(event, tunnel.StreamOpened)
    return client, server, sid


def connection_error(core: Connection, data: bytes) -> int:
    with pytest.raises(RemoteProtocolError) as info:
        core.receive_data(data)
    assert core.state is tunnel.ConnectionState.CLOSED
    return info.value.error_code


# ---------------------------------------------------------------------------
# §5.3: validity comes before the stream's state


def closed_on_the_server() -> tuple[Connection, Connection, int]:
    """The client's stream, aborted by the server: closed there, while the client may still send on it."""
    client, server, sid = opened()
    server.abort_stream(sid, ErrorCode.CANCEL, "not wanted")
    server.bytes_to_send()  # the abort is in flight: the client has not seen it
    return client, server, sid


def test_well_formed_frames_on_a_closed_stream_are_ignored() -> None:
    _, server, sid = closed_on_the_server()
    good = [
        frame(FrameType.DATA, sid, b"late"),
        frame(FrameType.PAGES, sid, pages_payload(count=1, page_size=PAGE)),
        frame(FrameType.STREAM_ABORT, sid, struct.pack(">I", ErrorCode.CANCEL) + b"too late"),
    ]
    for raw in good:
        assert server.receive_data(raw) == []
    assert server.state is tunnel.ConnectionState.OPEN


@pytest.mark.parametrize(
    ("name", "raw", "code"),
    [
        ("PAGES with a bad page size", frame(FrameType.PAGES, 1, pages_payload(count=1, page_size=3000)), ErrorCode.PROTOCOL_ERROR),
        ("PAGES one byte short", frame(FrameType.PAGES, 1, pages_payload(count=1, page_size=PAGE)[:-1]), ErrorCode.FRAME_SIZE_ERROR),
        ("ZERO_PAGES run of 0 pages", frame(FrameType.ZERO_PAGES, 1, struct.pack(">IIIIQQ", 0, 1, PAGE, 0, 0, 0)), ErrorCode.PROTOCOL_ERROR),
        ("STREAM_ABORT reason not UTF-8", frame(FrameType.STREAM_ABORT, 1, struct.pack(">I", 9) + b"\xff\xfe"), ErrorCode.PROTOCOL_ERROR),
        ("STREAM_END too short", frame(FrameType.STREAM_END, 1, b"\0"), ErrorCode.FRAME_SIZE_ERROR),
    ],
)
def test_malformed_frames_on_a_closed_stream_end_the_connection(name: str, raw: bytes, code: int) -> None:
    _, server, sid = closed_on_the_server()
    assert sid == 1
    assert connection_error(server, raw) == code, name


# ---------------------------------------------------------------------------
# §4.11, §4.12, §4.17: which error wins when a page frame breaks several rules


PAGE_FRAME_CASES = [
    # (frame type, payload, the code of the first rule broken)
    ("shorter than the fixed part", FrameType.PAGES, struct.pack(">III", 0, 1, 3000), ErrorCode.FRAME_SIZE_ERROR),
    ("bad page size and bad length", FrameType.PAGES, pages_payload(count=2, page_size=3000, data=b"x"), ErrorCode.PROTOCOL_ERROR),
    ("bad reserved and bad length", FrameType.PAGES, pages_payload(count=1, page_size=PAGE, reserved=1, data=b""), ErrorCode.PROTOCOL_ERROR),
    ("bad length and bad address", FrameType.PAGES, pages_payload(count=1, page_size=PAGE, addresses=(7,), data=b"x"), ErrorCode.FRAME_SIZE_ERROR),
    ("bad address alone", FrameType.PAGES, pages_payload(count=1, page_size=PAGE, addresses=(7,)), ErrorCode.PROTOCOL_ERROR),
    ("zero pages: bad page size and bad length", FrameType.ZERO_PAGES, struct.pack(">IIII", 0, 3, 1000, 0), ErrorCode.PROTOCOL_ERROR),
    ("zero pages: bad length and bad run", FrameType.ZERO_PAGES, struct.pack(">IIIIQQ", 0, 2, PAGE, 0, 7, 0), ErrorCode.FRAME_SIZE_ERROR),
    ("zero pages: shorter than the fixed part", FrameType.ZERO_PAGES, b"\0" * 15, ErrorCode.FRAME_SIZE_ERROR),
    ("zstd: bad page size and too short", FrameType.ZSTD_PAGES, struct.pack(">IIII", 0, 4, 1000, 0), ErrorCode.PROTOCOL_ERROR),
    ("zstd: too short and bad address", FrameType.ZSTD_PAGES, struct.pack(">IIIIQ", 0, 2, PAGE, 0, 7), ErrorCode.FRAME_SIZE_ERROR),
]


@pytest.mark.parametrize(("name", "ftype", "payload", "code"), PAGE_FRAME_CASES, ids=[c[0] for c in PAGE_FRAME_CASES])
def test_page_frame_checks_come_in_the_documented_order(name: str, ftype: FrameType, payload: bytes, code: int) -> None:
    both = Settings(features=tunnel.Feature.DIGEST_SHA256 | tunnel.Feature.ZSTD)
    _, server, sid = opened(both, both)
    assert connection_error(server, frame(ftype, sid, payload)) == code, name


def test_zstd_pages_layout_is_checked_before_the_feature() -> None:
    _, server, sid = opened()  # ZSTD not in effect
    assert not server.features & tunnel.Feature.ZSTD
    too_short = struct.pack(">IIIIQ", 0, 2, PAGE, 0, 0)
    assert connection_error(server, frame(FrameType.ZSTD_PAGES, sid, too_short)) == ErrorCode.FRAME_SIZE_ERROR
    _, server, sid = opened()
    well_formed = struct.pack(">IIIIQ", 0, 1, PAGE, 0, 0) + b"\x28\xb5\x2f\xfd"
    assert connection_error(server, frame(FrameType.ZSTD_PAGES, sid, well_formed)) == ErrorCode.PROTOCOL_ERROR


# ---------------------------------------------------------------------------
# §4.17: the zstd window, single-segment frames included


def _zstd(size: int, window_log: int) -> bytes:
    params = zstandard.ZstdCompressionParameters.from_level(1, window_log=window_log, write_content_size=True)
    return zstandard.ZstdCompressor(compression_params=params).compress(bytes(size))


def test_zstd_window_rule_follows_rfc_8878_for_single_segment_frames() -> None:
    from tunnel.transport._compress import MAX_WINDOW, CompressionError, PageDecompressor

    assert MAX_WINDOW == 8 * MiB
    d = PageDecompressor()
    # A single-segment frame has no window descriptor: its window is its content size.
    for size, window_log, accepted in [
        (8 * MiB, 24, True),  # single segment, window = content = 8 MiB: the limit itself
        (8 * MiB + PAGE, 24, False),  # single segment, window = content > 8 MiB
        (9 * MiB, 24, False),
        (9 * MiB, 23, True),  # the same content in a multi-segment frame with an 8 MiB window
    ]:
        compressed = _zstd(size, window_log)
        single = bool(compressed[4] & 0x20)  # Single_Segment_flag of the frame header descriptor
        assert single == (window_log == 24), (size, window_log)
        assert zstandard.get_frame_parameters(compressed).window_size == (size if single else 8 * MiB)
        if accepted:
            assert len(d.decompress(compressed, size)) == size
        else:
            with pytest.raises(CompressionError, match="window"):
                d.decompress(compressed, size)



def test_the_reference_compressor_keeps_to_the_window_rule() -> None:
    from tunnel.transport._compress import MAX_WINDOW, PageCompressor

    for size in (PAGE, 8 * MiB, 9 * MiB, 16 * MiB):
        compressed = PageCompressor().compress(bytes(size))
        assert compressed is not None
        assert zstandard.get_frame_parameters(compressed).window_size <= MAX_WINDOW, size


# ---------------------------------------------------------------------------
# §6: when credit comes back


def window_updates(client: Connection, server: Connection) -> list[tuple[int, int]]:
    return [(e.stream_id, e.increment) for e in client.receive_data(server.bytes_to_send()) if isinstance(e, tunnel.WindowUpdated)]


def test_credit_comes_back_at_half_a_window_not_sooner() -> None:
    server_settings = Settings(initial_stream_window=64 * KiB, connection_window=256 * KiB)
    client, server, sid = opened(server_settings=server_settings)
    half_stream, half_connection = [(sid, 32 * KiB)], [(0, 128 * KiB), (sid, 32 * KiB)]
    for expected in ([], half_stream, [], half_stream, [], half_stream, [], half_connection):
        client.send_data(sid, bytes(16 * KiB))
        received = sum(e.flow_controlled_length for e in server.receive_data(client.bytes_to_send()) if isinstance(e, tunnel.DataReceived))
        server.acknowledge_received(sid, received)  # the consumer took it all
        assert window_updates(client, server) == expected


def test_credit_comes_back_at_once_when_the_peer_has_none_left() -> None:
    server_settings = Settings(initial_stream_window=1000)
    client, server, sid = opened(server_settings=server_settings)
    client.send_data(sid, bytes(1000))  # all the credit there is
    server.receive_data(client.bytes_to_send())
    server.acknowledge_received(sid, 10)
    assert window_updates(client, server) == [(sid, 10)]
    # While the peer has credit left, less than half a window stays owed.
    server.acknowledge_received(sid, 400)
    assert window_updates(client, server) == []
    server.acknowledge_received(sid, 89)
    assert window_updates(client, server) == []
    server.acknowledge_received(sid, 11)  # 500 owed: half the window
    assert window_updates(client, server) == [(sid, 500)]


def test_dropped_records_count_as_taken_at_once_but_are_batched() -> None:
    client, server, sid = opened(server_settings=Settings(connection_window=64 * KiB))
    server.abort_stream(sid, ErrorCode.CANCEL, "not wanted")
    server.bytes_to_send()
    client.send_data(sid, bytes(16 * KiB))
    assert server.receive_data(client.bytes_to_send()) == []  # dropped: the stream is closed here
    assert window_updates(client, server) == []  # 16 KiB owed, less than half of 64 KiB
    client.send_data(sid, bytes(16 * KiB))
    server.receive_data(client.bytes_to_send())
    assert window_updates(client, server) == [(0, 32 * KiB)]


# ---------------------------------------------------------------------------
# §7: serial 0, MAX_CONCURRENT_CALLS, versions


def test_serial_zero_is_a_valid_serial() -> None:
    _, server = pair()
    call = frame(FrameType.RPC_CALL, 0, struct.pack(">IIII", 7, 1, 2, 0) + b"body")
    [event] = server.receive_data(call)
    assert isinstance(event, tunnel.CallReceived) and event.serial == 0 and bytes(event.body) == b"body"
    server.send_reply(0, b"answer")
    assert server.bytes_to_send() == frame(FrameType.RPC_REPLY, 0, struct.pack(">IIII", 7, 1, 2, 0) + b"answer")


def test_the_reference_caller_never_picks_serial_zero() -> None:
    client, _ = pair()
    serials = [client.send_call(7, 1, 2) for _ in range(5)]
    assert 0 not in serials and len(set(serials)) == 5


def test_max_concurrent_calls_does_not_bind_the_caller() -> None:
    client, server = pair(server_settings=Settings(max_concurrent_calls=1))
    first = client.send_call(7, 1, 1)
    second = client.send_call(7, 1, 2)  # beyond the peer's limit: allowed, not a protocol error
    events = server.receive_data(client.bytes_to_send())
    assert [(type(e), e.serial) for e in events] == [(tunnel.CallReceived, first)]  # type: ignore[attr-defined]
    [busy] = client.receive_data(server.bytes_to_send())  # answered at once, before the first call is
    assert isinstance(busy, tunnel.CallFailed) and (busy.serial, busy.error_code) == (second, ErrorCode.BUSY)
    assert client.state is server.state is tunnel.ConnectionState.OPEN
    # Once the first call is answered, the same call goes through.
    server.send_reply(first, b"")
    client.receive_data(server.bytes_to_send())
    third = client.send_call(7, 1, 2)
    [event] = server.receive_data(client.bytes_to_send())
    assert isinstance(event, tunnel.CallReceived) and event.serial == third


async def test_the_trio_layer_does_not_hold_calls_back() -> None:
    release = trio.Event()

    async def slow(body: bytes) -> bytes:
        await release.wait()
        return body

    with trio.fail_after(10):
        async with unix_pair() as (a, b), trio.open_nursery() as nursery:
            nursery.start_soon(_serve, b, Settings(max_concurrent_calls=1), slow)
            async with open_connection(a, client=True) as conn:
                results: list[object] = []

                async def call() -> None:
                    results.append(await conn.call(7, 1, b"first"))

                nursery.start_soon(call)
                await trio.testing.wait_all_tasks_blocked()
                with pytest.raises(RPCError) as info:
                    await conn.call(7, 1, b"second")
                assert info.value.code == ErrorCode.BUSY
                release.set()
                await trio.testing.wait_all_tasks_blocked()
                assert results == [b"first"]
            nursery.cancel_scope.cancel()


async def _serve(stream: trio.abc.Stream, settings: Settings, handler: Callable[[bytes], Awaitable[bytes]]) -> None:
    """A server of procedure (7, 1), version 1."""
    async with open_connection(stream, client=False, settings=settings, handlers={(7, 1): handler}):
        await trio.sleep_forever()


@asynccontextmanager
async def a_daemon() -> AsyncIterator[str]:
    from tunnel.daemon import Daemon

    with tempfile.TemporaryDirectory(prefix="tpr-", dir="/tmp") as root:
        sock = f"{root}/d.sock"
        async with trio.open_nursery() as nursery:
            await nursery.start(Daemon(state_dir=f"{root}/state", listen=[f"unix://{sock}"]).run)
            yield sock
            nursery.cancel_scope.cancel()


@pytest.mark.parametrize("version", [0, 2, 0xFFFFFFFF])
async def test_daemon_answers_other_versions_with_unknown_procedure(version: int) -> None:
    from tunnel.control import PROGRAM, VERSION, Procedure, decode, encode

    definition = {"name": "vm1", "image": {"size_mib": 16}}
    with trio.fail_after(20):
        async with a_daemon() as sock, open_connection(await trio.open_unix_socket(sock), client=True) as conn:
            for procedure, body in ((Procedure.LIST, {}), (Procedure.DEFINE, {"definition": definition})):
                with pytest.raises(RPCError) as info:
                    await conn.call(PROGRAM, procedure, encode(body), version=version)
                assert info.value.code == ErrorCode.UNKNOWN_PROCEDURE
                assert f"version {version} is not supported (supported: {VERSION})" in info.value.message
            # Nothing ran: the DEFINE of another version defined nothing; the same call of version 1 does.
            assert decode(await conn.call(PROGRAM, Procedure.LIST, encode({}), version=VERSION)) == {"domains": []}
            await conn.call(PROGRAM, Procedure.DEFINE, encode({"definition": definition}), version=VERSION)
            listed = decode(await conn.call(PROGRAM, Procedure.LIST, encode({}), version=VERSION))
            assert [d["name"] for d in listed["domains"]] == ["vm1"]


# ---------------------------------------------------------------------------
# §8.1: keepalive timings
#
# frame_timeout=None: the keepalive timings do not depend on the frame timeout.  With the default frame
# timeout (30 s) the watchdog also re-checks every 7.5 s; a check that fell between a PING and the keepalive
# timeout once slept until a time already past and spun until the timeout (a busy loop in real time, a hang
# under autojump_clock): test_watchdog_waits_without_spinning_between_ping_and_timeout.


async def _quiet_peer(stream: trio.abc.Stream, log: list[tuple[str, float, int]], answer_after: float | None) -> None:
    """A peer that completes the handshake, then sends nothing, or only its PONGs *answer_after* s late.

    It notes when a PING arrives (its core then owes a PONG) and when a GOODBYE does.
    """
    core = Connection(client=False)
    await stream.send_all(core.bytes_to_send())
    while data := await stream.receive_some(64 * KiB):
        events = core.receive_data(data)
        now = trio.current_time()
        for event in events:
            if isinstance(event, tunnel.ConnectionTerminated):
                log.append(("goodbye", now, event.error_code))
                return
        if core.state is tunnel.ConnectionState.OPEN and core.pending_output:
            pong = core.bytes_to_send()
            log.append(("ping", now, 0))
            if answer_after is not None:
                await trio.sleep(answer_after)
                await stream.send_all(pong)


async def test_keepalive_pings_after_5_s_and_gives_up_20_s_after_the_last_bytes(autojump_clock: trio.testing.MockClock) -> None:
    log: list[tuple[str, float, int]] = []
    a, b = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_quiet_peer, b, log, None)
        start = trio.current_time()
        with pytest.raises(tunnel.ConnectionLost):
            async with open_connection(a, client=True, frame_timeout=None) as conn:  # keepalive defaults: 5 s, 20 s
                await trio.sleep(60)
                await conn.call(7, 1)
    # The peer's handshake was the last thing received, at the start.
    assert [(what, round(when - start, 6), code) for what, when, code in log] == [
        ("ping", 5.0, 0),
        ("goodbye", 20.0, ErrorCode.KEEPALIVE_TIMEOUT),
    ]


async def test_an_answer_within_15_s_keeps_the_connection(autojump_clock: trio.testing.MockClock) -> None:
    log: list[tuple[str, float, int]] = []
    a, b = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_quiet_peer, b, log, 14.5)
        start = trio.current_time()
        async with open_connection(a, client=True, frame_timeout=None) as conn:
            await trio.sleep(100)
            assert not conn.is_closed
        nursery.cancel_scope.cancel()
    # A PING 5 s after the last bytes received; the PONG 14.5 s later restarts both clocks.
    pings = [round(when - start, 6) for what, when, _ in log if what == "ping"]
    assert pings[:3] == [5.0, 24.5, 44.0]
    assert [what for what, _, code in log if what == "goodbye" and code == ErrorCode.KEEPALIVE_TIMEOUT] == []


class _StepCounter(trio.abc.Instrument):
    def __init__(self) -> None:
        self.steps = 0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self.steps += 1


def test_watchdog_waits_without_spinning_between_ping_and_timeout() -> None:
    """With the default frame timeout, the watchdog's check between PING and timeout sleeps, it does not spin.

    The clock runs 100 times faster than real time (so a spin would still end,
    at the timeout) and jumps over idle time; the number of task steps tells a
    sleeping watchdog (a few dozen) from a spinning one (thousands).
    """
    log: list[tuple[str, float, int]] = []
    counter = _StepCounter()

    async def main() -> None:
        a, b = trio.testing.memory_stream_pair()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_quiet_peer, b, log, None)
            with pytest.raises(tunnel.ConnectionLost):
                async with open_connection(a, client=True) as conn:  # frame timeout 30 s: re-checks every 7.5 s
                    await trio.sleep(60)
                    await conn.call(7, 1)

    clock = trio.testing.MockClock(rate=100, autojump_threshold=0)
    trio.run(main, clock=clock, instruments=[counter])
    assert [what for what, _, _ in log] == ["ping", "goodbye"]
    assert counter.steps < 500, counter.steps
