"""Behaviour of the trio layer: RPC, typed records, flow control, scheduling,
bandwidth limits, statistics, liveness, clean shutdown, and transport chunking.

Nothing here measures wall-clock time.  Anything with a timeout runs on the
``autojump_clock`` (virtual time), and ordering is checked with events and
byte counts, never with durations.  Fakes that stand in for a misbehaving
peer drive a real sans-I/O :class:`tunnel.Connection` by hand.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import os
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager

import pytest
import trio
import trio.testing
from conftest import connected, memory_pair, unix_pair
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from trio.testing import wait_all_tasks_blocked

import tunnel
from tunnel import ErrorCode, Settings
from tunnel._frames import HEADER
from tunnel.transport import (
    DeviceStateRecord,
    PagesRecord,
    TunnelConnection,
    TunnelStream,
    ZeroPagesRecord,
    open_connection,
)

KiB = 1024
MiB = 1024 * 1024
PROG = 0x20008086


async def _read_exactly(stream: TunnelStream, size: int) -> bytes:
    buf = bytearray()
    while len(buf) < size:
        chunk = await stream.receive_some(size - len(buf))
        assert chunk, f"end of stream after {len(buf)} of {size} bytes"
        buf += chunk
    return bytes(buf)


async def _read_all(stream: TunnelStream) -> bytes:
    buf = bytearray()
    while chunk := await stream.receive_some():
        buf += chunk
    return bytes(buf)


async def _drain_count(stream: TunnelStream) -> int:
    total = 0
    while chunk := await stream.receive_view():
        total += len(chunk)
    return total


# ---------------------------------------------------------------------------
# 1. RPC


async def test_rpc_handlers_by_program_and_procedure() -> None:
    async with connected() as (client, server):

        async def upper(body: bytes) -> bytes:
            return body.upper()

        async def reverse(body: bytes) -> bytes:
            return body[::-1]

        async def other_program(body: bytes) -> bytearray:
            return bytearray(b"other:" + body)

        server.register(PROG, 1, upper)
        server.register(PROG, 2, reverse)
        server.register(PROG + 1, 1, other_program)
        assert await client.call(PROG, 1, b"abc") == b"ABC"
        assert await client.call(PROG, 2, b"abc") == b"cba"
        assert await client.call(PROG + 1, 1, b"abc") == b"other:abc"
        assert await client.call(PROG, 1) == b""

        # Calls go both ways on one connection.
        async def hello(body: bytes) -> bytes:
            return b"client says " + body

        client.register(PROG, 7, hello)
        assert await server.call(PROG, 7, b"hi") == b"client says hi"


async def test_rpc_many_outstanding_calls_complete_in_reverse_order() -> None:
    n = 50
    release = [trio.Event() for _ in range(n)]
    started = 0
    all_started = trio.Event()
    async with connected() as (client, server):

        async def slow(body: bytes) -> bytes:
            nonlocal started
            index = int(body)
            started += 1
            if started == n:
                all_started.set()
            await release[index].wait()
            return b"reply to %d" % index

        server.register(PROG, 1, slow)
        results: dict[int, bytes] = {}
        completion: list[int] = []

        async def caller(i: int) -> None:
            results[i] = await client.call(PROG, 1, b"%d" % i)
            completion.append(i)

        async with trio.open_nursery() as nursery:
            for i in range(n):
                nursery.start_soon(caller, i)
            await all_started.wait()
            assert client.statistics().calls_outstanding == n
            for i in reversed(range(n)):
                release[i].set()
                # Let this reply travel before the next handler finishes.
                while len(completion) < n - i:
                    await wait_all_tasks_blocked()
        assert completion == list(reversed(range(n)))
        assert results == {i: b"reply to %d" % i for i in range(n)}
        assert client.statistics().calls_outstanding == 0
        assert server.statistics().calls_served == n


async def test_rpc_handler_exception_becomes_application_error() -> None:
    async with connected() as (client, server):

        async def broken(body: bytes) -> bytes:
            raise ValueError("the guest is on fire")

        server.register(PROG, 1, broken)
        with pytest.raises(tunnel.RPCError) as info:
            await client.call(PROG, 1, b"x")
        assert info.value.code == ErrorCode.APPLICATION_ERROR
        assert "the guest is on fire" in info.value.message
        # The connection is unaffected.
        assert not client.is_closed and not server.is_closed
        await client.ping()


@pytest.mark.parametrize("code", [ErrorCode.BUSY, 4242])
async def test_rpc_handler_rpc_error_keeps_code_and_message(code: int) -> None:
    async with connected() as (client, server):

        async def refuse(body: bytes) -> bytes:
            raise tunnel.RPCError(code, "try again later")

        server.register(PROG, 1, refuse)
        with pytest.raises(tunnel.RPCError) as info:
            await client.call(PROG, 1)
        assert info.value.code == code
        assert info.value.message == "try again later"


async def test_rpc_unknown_procedure() -> None:
    async with connected() as (client, server):
        server.register(PROG, 1, lambda body: _const(b"ok"))
        with pytest.raises(tunnel.RPCError) as info:
            await client.call(PROG, 2)
        assert info.value.code == ErrorCode.UNKNOWN_PROCEDURE
        with pytest.raises(tunnel.RPCError) as info:
            await client.call(PROG + 1, 1)
        assert info.value.code == ErrorCode.UNKNOWN_PROCEDURE
        assert await client.call(PROG, 1) == b"ok"


async def _const(value: bytes) -> bytes:
    return value


async def test_rpc_oversized_call_fails_locally_before_sending() -> None:
    limit = 1000
    async with connected(server_settings=Settings(max_call_size=limit)) as (client, server):
        calls: list[bytes] = []

        async def echo(body: bytes) -> bytes:
            calls.append(body)
            return body

        server.register(PROG, 1, echo)
        sent_before = client.statistics().bytes_sent
        with pytest.raises(tunnel.FrameTooLargeError):
            await client.call(PROG, 1, b"x" * (limit + 1))
        await wait_all_tasks_blocked()
        assert client.statistics().bytes_sent == sent_before  # nothing went out
        assert client.statistics().calls_outstanding == 0
        assert calls == []
        # At the limit is fine, and the connection is still usable.
        assert await client.call(PROG, 1, b"y" * limit) == b"y" * limit
        # Beyond the frame size also fails locally, whatever max_call_size says.
    async with connected(server_settings=Settings(max_call_size=2**32 - 1)) as (client, server):
        with pytest.raises(tunnel.FrameTooLargeError):
            await client.call(PROG, 1, bytes(client.peer_settings.max_frame_size))
        await client.ping()


async def test_rpc_peer_refuses_call_too_large() -> None:
    """A peer that ignores our max_call_size gets CALL_TOO_LARGE back, not a handler run."""
    a, b = trio.testing.memory_stream_pair()
    limit = 1000
    async with trio.open_nursery() as nursery:
        fake_box: dict[str, tunnel.Connection] = {}

        async def fake_client() -> None:
            fake_box["core"] = await _fake_handshake(a, client=True)

        nursery.start_soon(fake_client)
        async with open_connection(b, client=False, settings=Settings(max_call_size=limit)) as server:
            ran: list[bytes] = []

            async def echo(body: bytes) -> bytes:
                ran.append(body)
                return body

            server.register(PROG, 1, echo)
            await wait_all_tasks_blocked()
            core = fake_box["core"]
            # The fake peer pretends the server never declared its limit.
            core.peer_settings = Settings()
            big = core.send_call(PROG, 1, 1, b"z" * (limit + 1))
            small = core.send_call(PROG, 1, 1, b"z" * limit)
            await a.send_all(core.bytes_to_send())
            events = await _fake_receive_until(a, core, lambda evs: len([e for e in evs if hasattr(e, "serial")]) >= 2)
            answers = {e.serial: e for e in events if isinstance(e, tunnel.CallFailed | tunnel.ReplyReceived)}
            refused, answered = answers[big], answers[small]
            assert isinstance(refused, tunnel.CallFailed)
            assert refused.error_code == ErrorCode.CALL_TOO_LARGE
            assert isinstance(answered, tunnel.ReplyReceived)
            assert bytes(answered.body) == b"z" * limit
            assert ran == [b"z" * limit]
            core.close()
            await a.send_all(core.bytes_to_send())


async def test_rpc_cancelled_call_leaves_connection_usable(autojump_clock: trio.testing.MockClock) -> None:
    async with connected() as (client, server):
        gate = trio.Event()
        handler_done = trio.Event()

        async def blocked(body: bytes) -> bytes:
            await gate.wait()
            handler_done.set()
            return b"late reply"

        async def quick(body: bytes) -> bytes:
            return b"quick:" + body

        server.register(PROG, 1, blocked)
        server.register(PROG, 2, quick)
        with trio.move_on_after(1) as scope:
            await client.call(PROG, 1, b"slow")
        assert scope.cancelled_caught
        assert client.statistics().calls_outstanding == 0
        assert await client.call(PROG, 2, b"1") == b"quick:1"
        # Now let the abandoned handler answer: its reply is dropped silently.
        gate.set()
        await handler_done.wait()
        served = server.statistics().calls_served
        await wait_all_tasks_blocked()
        assert not client.is_closed and not server.is_closed
        assert await client.call(PROG, 2, b"2") == b"quick:2"
        assert server.statistics().calls_served == served + 1
        await client.ping()


# ---------------------------------------------------------------------------
# Fake peers: a real sans-I/O core driven by hand over a memory stream.


async def _fake_handshake(transport: trio.abc.Stream, *, client: bool, settings: Settings | None = None) -> tunnel.Connection:
    core = tunnel.Connection(client=client, settings=settings)
    await transport.send_all(core.bytes_to_send())
    while core.state is tunnel.ConnectionState.HANDSHAKE:
        data = await transport.receive_some(64 * KiB)
        assert data, "the peer closed during the handshake"
        core.receive_data(data)
    return core


async def _fake_receive_until(
    transport: trio.abc.Stream, core: tunnel.Connection, done: Callable[[list[tunnel.Event]], bool]
) -> list[tunnel.Event]:
    events: list[tunnel.Event] = []
    while not done(events):
        data = await transport.receive_some(64 * KiB)
        if not data:
            break
        events += core.receive_data(data)
    return events


async def _fake_receive_all(transport: trio.abc.Stream, core: tunnel.Connection) -> list[tunnel.Event]:
    events: list[tunnel.Event] = []
    while data := await transport.receive_some(64 * KiB):
        events += core.receive_data(data)
    return events


# ---------------------------------------------------------------------------
# 2. Typed records, digests, full duplex

PAGE = 4096


def _records() -> list[object]:
    """An interleaving of every record type and plain data."""
    pages = os.urandom(3 * PAGE)
    return [
        b"QEVM\x00\x00\x00\x03",
        PagesRecord(region=0, page_size=PAGE, addresses=(0, 8 * PAGE, 9 * PAGE), data=pages),
        ZeroPagesRecord(region=0, page_size=PAGE, runs=((PAGE, 7), (10 * PAGE, 1000))),
        os.urandom(100 * KiB),
        DeviceStateRecord(name="virtio-net", version=3, data=os.urandom(999)),
        PagesRecord(region=1, page_size=2 * MiB, addresses=(4 * MiB,), data=os.urandom(2 * MiB)),
        DeviceStateRecord(name="empty", version=0, data=b""),
        ZeroPagesRecord(region=2, page_size=512, runs=()),
        b"tail",
    ]


def _normalise(items: list[object]) -> list[object]:
    """Join adjacent data chunks (their framing is the transport's business); bytes for buffers."""
    out: list[object] = []
    for item in items:
        if isinstance(item, bytes | bytearray | memoryview):
            if out and isinstance(out[-1], bytes):
                out[-1] += bytes(item)
            else:
                out.append(bytes(item))
        elif isinstance(item, PagesRecord | DeviceStateRecord):
            out.append(dataclasses.replace(item, data=bytes(item.data)))
        else:
            out.append(item)
    return out


async def _send_records(stream: TunnelStream, records: list[object]) -> None:
    for record in records:
        if isinstance(record, bytes):
            await stream.send_all(record)
        elif isinstance(record, PagesRecord):
            await stream.send_pages(
                region=record.region, page_size=record.page_size, addresses=record.addresses, data=record.data
            )
        elif isinstance(record, ZeroPagesRecord):
            await stream.send_zero_pages(region=record.region, page_size=record.page_size, runs=record.runs)
        else:
            assert isinstance(record, DeviceStateRecord)
            await stream.send_device_state(name=record.name, version=record.version, data=record.data)


async def _receive_records(stream: TunnelStream) -> list[object]:
    items: list[object] = []
    while True:
        item = await stream.receive_record()
        if isinstance(item, bytes | memoryview) and not len(item):
            return _normalise(items)
        # A received view is only valid until the next receive: copy now.
        items += _normalise([item])


@pytest.mark.parametrize("digest", [tunnel.DigestAlgorithm.NONE, tunnel.DigestAlgorithm.CRC32, tunnel.DigestAlgorithm.SHA256])
async def test_records_interleaved_arrive_in_order(digest: int) -> None:
    records = _records()
    big = Settings(max_frame_size=4 * MiB)
    async with connected(client_settings=big, server_settings=big) as (client, server):
        s = await client.open_stream(kind=tunnel.StreamKind.MEMORY, digest=digest, label="ram", migration_id=b"m" * 16)

        async def send() -> None:
            await _send_records(s, records)
            # send_record also takes the record objects themselves.
            await s.send_record(DeviceStateRecord(name="last", version=1, data=b"!"))
            await s.send_eof()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(send)
            r = await server.accept_stream()
            assert (r.kind, r.digest, r.label, r.migration_id) == (tunnel.StreamKind.MEMORY, digest, "ram", b"m" * 16)
            got = await _receive_records(r)
            # After the end, receive_record keeps returning b"".
            assert await r.receive_record() == b""
            assert await r.receive_some() == b""
        assert _normalise(got) == _normalise(records + [DeviceStateRecord(name="last", version=1, data=b"!")])
        assert r.statistics().bytes_received == s.statistics().bytes_sent
        await r.aclose()
        await s.aclose()


async def test_receive_some_refuses_a_typed_record() -> None:
    async with connected() as (client, server):
        s = await client.open_stream()
        await s.send_all(b"data")
        await s.send_zero_pages(region=0, page_size=PAGE, runs=((0, 1),))
        await s.send_all(b"more")
        await s.send_eof()
        r = await server.accept_stream()
        assert await _read_exactly(r, 4) == b"data"
        with pytest.raises(tunnel.TunnelError, match="receive_record"):
            await r.receive_some()
        assert await r.receive_record() == ZeroPagesRecord(region=0, page_size=PAGE, runs=((0, 1),))
        assert await _read_all(r) == b"more"


async def test_record_larger_than_the_peer_accepts_fails_locally() -> None:
    async with connected() as (client, server):
        s = await client.open_stream()
        limit = client.peer_settings.max_frame_size
        with pytest.raises(tunnel.FrameTooLargeError):
            await s.send_device_state(name="huge", data=bytes(limit))
        # The stream is still usable.
        await s.send_device_state(name="ok", data=b"1")
        await s.send_eof()
        r = await server.accept_stream()
        assert _normalise(await _receive_records(r)) == [DeviceStateRecord(name="ok", version=0, data=b"1")]


@pytest.mark.parametrize(
    "record",
    [
        ZeroPagesRecord(region=0, page_size=PAGE, runs=((0, 0),)),  # an empty run
        ZeroPagesRecord(region=0, page_size=3000, runs=((0, 1),)),  # not a power of two
        PagesRecord(region=0, page_size=PAGE, addresses=(0, PAGE), data=bytes(PAGE)),  # data for one page, not two
        PagesRecord(region=0, page_size=PAGE, addresses=(100,), data=bytes(PAGE)),  # unaligned
        DeviceStateRecord(name="cpu", version=2**32, data=b""),  # version too large
    ],
    ids=["empty-run", "page-size", "short-data", "unaligned", "version"],
)
async def test_invalid_record_fails_the_send_not_the_connection(record: object) -> None:
    async with connected() as (client, server):
        s = await client.open_stream()
        with pytest.raises(tunnel.LocalProtocolError):
            await s.send_record(record)  # type: ignore[arg-type]
        assert not client.is_closed
        await s.send_all(b"still fine")
        await s.send_eof()
        r = await server.accept_stream()
        assert await _read_all(r) == b"still fine"
        await client.ping()


async def test_full_duplex_acknowledgements_while_sending() -> None:
    """The acceptor acknowledges each chunk on the same stream before the opener sends the next."""
    chunk = 200 * KiB
    rounds = 20
    small = Settings(initial_stream_window=64 * KiB, connection_window=256 * KiB)
    async with connected(client_settings=small, server_settings=small) as (client, server):
        s = await client.open_stream(digest=tunnel.DigestAlgorithm.SHA256)
        data = [os.urandom(chunk) for _ in range(rounds)]
        received = hashlib.sha256()

        async def opener() -> None:
            for i in range(rounds):
                await s.send_all(data[i])
                ack = await _read_exactly(s, 16)
                assert ack == b"ack %12d" % i
            await s.send_eof()
            assert await s.receive_some() == b""

        async def acceptor() -> None:
            r = await server.accept_stream()
            for i in range(rounds):
                received.update(await _read_exactly(r, chunk))
                await r.send_all(b"ack %12d" % i)
            assert await r.receive_some() == b""
            await r.send_eof()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(opener)
            nursery.start_soon(acceptor)
        assert received.digest() == hashlib.sha256(b"".join(data)).digest()


async def test_full_duplex_both_directions_at_full_speed() -> None:
    """Both ends send more than a window at the same time; neither may wait for the other's EOF."""
    size = 3 * MiB
    small = Settings(initial_stream_window=64 * KiB, connection_window=128 * KiB)
    up, down = os.urandom(size), os.urandom(size)
    async with connected(client_settings=small, server_settings=small) as (client, server):
        s = await client.open_stream()
        results: dict[str, bytes] = {}

        async def run(stream: TunnelStream, payload: bytes, name: str) -> None:
            async def sender() -> None:
                await stream.send_all(payload)
                await stream.send_eof()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(sender)
                results[name] = await _read_all(stream)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(run, s, up, "at_client")
            r = await server.accept_stream()
            nursery.start_soon(run, r, down, "at_server")
        assert results == {"at_client": down, "at_server": up}


# ---------------------------------------------------------------------------
# 3. Flow control and back-pressure, in bytes


async def test_stalled_consumer_blocks_producer_within_one_window(autojump_clock: trio.testing.MockClock) -> None:
    window = 64 * KiB
    small = Settings(initial_stream_window=window, connection_window=4 * MiB)
    payload = os.urandom(1 * MiB)
    async with connected(client_settings=small, server_settings=small) as (client, server):
        s = await client.open_stream()
        sent = trio.Event()

        async def produce() -> None:
            await s.send_all(payload)
            sent.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(produce)
            r = await server.accept_stream()
            await wait_all_tasks_blocked()
            # The consumer has not read: the producer is stuck, with exactly one window in flight.
            assert not sent.is_set()
            assert s.statistics().send_credit == 0
            assert r.statistics().buffered == window
            assert server.statistics().buffered == window
            assert r.statistics().receive_window == 0
            # Stays so, however long nobody reads (virtual time), and the producer counts that time.
            blocked = s.statistics().blocked_on_credit_s
            for _ in range(5):
                await trio.sleep(10)
                assert r.statistics().buffered <= window
                assert server.statistics().buffered <= window
            assert not sent.is_set()
            assert s.statistics().blocked_on_credit_s == pytest.approx(blocked + 50)
            # Reading a little gives credit back in batches; the buffer never exceeds the window.
            got = bytearray()
            while len(got) < len(payload):
                got += await r.receive_some(8 * KiB)
                assert r.statistics().buffered <= window
                assert server.statistics().buffered <= window
            await sent.wait()
        assert got == payload
        await wait_all_tasks_blocked()
        assert r.statistics().buffered == 0
        assert server.statistics().buffered == 0


async def test_connection_window_bounds_all_streams_together() -> None:
    stream_window = 256 * KiB
    conn_window = 512 * KiB
    n = 8  # 8 x 256 KiB of stream windows = 2 MiB > 512 KiB connection window
    settings = Settings(initial_stream_window=stream_window, connection_window=conn_window)
    size = 1 * MiB
    async with connected(client_settings=settings, server_settings=settings) as (client, server):
        streams = [await client.open_stream(label=str(i)) for i in range(n)]
        done = [trio.Event() for _ in range(n)]

        async def produce(i: int) -> None:
            await streams[i].send_all(bytes([i]) * size)
            await streams[i].send_eof()
            done[i].set()

        async with trio.open_nursery() as nursery:
            for i in range(n):
                nursery.start_soon(produce, i)
            receivers = [await server.accept_stream() for _ in range(n)]
            await wait_all_tasks_blocked()
            assert not any(d.is_set() for d in done)
            assert server.statistics().buffered == conn_window
            assert sum(r.statistics().buffered for r in receivers) == conn_window
            assert all(r.statistics().buffered <= stream_window for r in receivers)
            assert client.statistics().connection_credit == 0
            assert server.statistics().connection_window == 0

            # Drain all streams at once in small steps (reading them one after
            # another could wait for a stream whose data is stuck behind the
            # others' use of the connection window); the bound holds throughout.
            async def drain(r: TunnelStream) -> None:
                i = int(r.label)
                total = 0
                while chunk := await r.receive_some(16 * KiB):
                    assert chunk == bytes([i]) * len(chunk)
                    total += len(chunk)
                    assert server.statistics().buffered <= conn_window
                    assert sum(x.statistics().buffered for x in receivers) <= conn_window
                assert total == size

            for r in receivers:
                nursery.start_soon(drain, r)
        assert all(d.is_set() for d in done)


# ---------------------------------------------------------------------------
# 4. Scheduling: control ahead of bulk data, fairness between streams


@pytest.mark.parametrize("pair", [memory_pair, unix_pair], ids=["memory", "unix"])
async def test_rpc_and_ping_overtake_a_saturating_transfer(pair: Callable[[], object]) -> None:
    size = 64 * MiB
    payload = bytes(size)
    async with connected(pair) as (client, server):

        async def echo(body: bytes) -> bytes:
            return body

        server.register(PROG, 1, echo)
        client.register(PROG, 1, echo)
        s = await client.open_stream(label="bulk")
        bulk_done = trio.Event()
        received = 0
        flowing = trio.Event()

        async def bulk() -> None:
            await s.send_all(payload)
            await s.send_eof()
            bulk_done.set()

        async def consume(r: TunnelStream) -> None:
            nonlocal received
            while chunk := await r.receive_view():
                received += len(chunk)
                if received >= 2 * MiB:
                    flowing.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(bulk)
            nursery.start_soon(consume, await server.accept_stream())
            await flowing.wait()
            window = client.peer_settings.initial_stream_window
            for _ in range(3):
                at_call = received
                assert await client.call(PROG, 1, b"while busy") == b"while busy"
                # The reply came back while the transfer still ran, and the call
                # waited behind at most about a window of data, not the transfer.
                assert not bulk_done.is_set()
                assert received < size
                assert received - at_call <= window + 2 * client.chunk_size
                # The other direction too: the receiving side calls the sending side.
                at_call = received
                assert await server.call(PROG, 1, b"back") == b"back"
                assert not bulk_done.is_set()
                assert received - at_call <= window + 2 * client.chunk_size
                await client.ping()
                assert not bulk_done.is_set()
        assert received == size


async def test_fairness_between_concurrent_streams() -> None:
    n = 16
    size = 2 * MiB
    chunk = 64 * KiB
    async with connected(chunk_size=chunk) as (client, server):
        senders = [await client.open_stream(label=str(i)) for i in range(n)]
        receivers: list[TunnelStream] = []
        got = [0] * n
        snapshot: list[int] = []
        arrived: list[int] = []
        finish_order: list[int] = []

        async def produce(i: int) -> None:
            await senders[i].send_all(bytes(size))
            await senders[i].send_eof()

        async def consume(r: TunnelStream) -> None:
            i = int(r.label)
            while data := await r.receive_view():
                got[i] += len(data)
                if got[i] == size and not snapshot:
                    snapshot.extend(got)
                    arrived.extend(x.statistics().bytes_received for x in receivers)
            finish_order.append(i)

        async with trio.open_nursery() as nursery:
            for i in range(n):
                nursery.start_soon(produce, i)
            for _ in range(n):
                receivers.append(await server.accept_stream())
            receivers.sort(key=lambda r: int(r.label))
            for r in receivers:
                nursery.start_soon(consume, r)
        assert got == [size] * n and sorted(finish_order) == list(range(n))
        # When the first stream had everything, every other had nearly as much.
        assert min(snapshot) >= 0.8 * max(snapshot), snapshot
        assert min(arrived) >= 0.8 * max(arrived), arrived


# ---------------------------------------------------------------------------
# 5. Bandwidth limits, in virtual time


async def _timed_transfer(
    client: TunnelConnection,
    server: TunnelConnection,
    size: int,
    *,
    bandwidth: int = 0,
    change: Callable[[TunnelStream], object] | None = None,
    change_at: float | None = None,
) -> float:
    s = await client.open_stream(bandwidth=bandwidth)
    if change is not None and change_at is None:
        change(s)  # before the transfer starts
        change = None
    start = trio.current_time()
    finished = 0.0

    async def send() -> None:
        nonlocal finished
        await s.send_all(bytes(size))
        finished = trio.current_time()
        await s.send_eof()

    async def changer() -> None:
        assert change_at is not None
        await trio.sleep(change_at)
        assert change is not None
        change(s)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(send)
        if change is not None:
            nursery.start_soon(changer)
        r = await server.accept_stream()
        assert await _drain_count(r) == size
    await s.aclose()
    await r.aclose()
    return finished - start


async def test_bandwidth_limit(autojump_clock: trio.testing.MockClock) -> None:
    async with connected() as (client, server):
        elapsed = await _timed_transfer(client, server, 4 * MiB, bandwidth=MiB)
        assert 4 * 0.8 <= elapsed <= 4 * 1.2, elapsed
        # set_bandwidth on an idle stream works the same as the open_stream argument.
        elapsed = await _timed_transfer(client, server, 2 * MiB, change=lambda s: s.set_bandwidth(2 * MiB))
        assert 1 * 0.8 <= elapsed <= 1 * 1.2, elapsed


async def test_bandwidth_change_mid_transfer(autojump_clock: trio.testing.MockClock) -> None:
    async with connected() as (client, server):
        # 1 MiB at 1 MiB/s, then the remaining 3 MiB at 4 MiB/s: 1 + 0.75 s.
        elapsed = await _timed_transfer(
            client, server, 4 * MiB, bandwidth=MiB, change=lambda s: s.set_bandwidth(4 * MiB), change_at=1.0
        )
        assert 1.75 * 0.8 <= elapsed <= 1.75 * 1.2, elapsed
        # Lifting the limit (0) mid-run finishes the rest at once.
        elapsed = await _timed_transfer(
            client, server, 4 * MiB, bandwidth=MiB, change=lambda s: s.set_bandwidth(0), change_at=1.0
        )
        assert 1.0 * 0.8 <= elapsed <= 1.0 * 1.2, elapsed


async def test_bandwidth_zero_is_unlimited(autojump_clock: trio.testing.MockClock) -> None:
    async with connected() as (client, server):
        elapsed = await _timed_transfer(client, server, 8 * MiB, bandwidth=0)
        assert elapsed < 0.1
        s = await client.open_stream(bandwidth=MiB)
        assert s.bandwidth == MiB and s.statistics().bandwidth_limit == MiB
        s.set_bandwidth(0)
        assert s.bandwidth == 0 and s.statistics().bandwidth_limit == 0
        with pytest.raises(ValueError):
            s.set_bandwidth(-1)


# ---------------------------------------------------------------------------
# 6. Statistics


async def test_statistics_count_bytes_and_frames() -> None:
    size = 300 * KiB
    async with connected(chunk_size=64 * KiB) as (client, server):
        await wait_all_tasks_blocked()
        c0, s0 = client.statistics(), server.statistics()
        assert c0.bytes_sent == s0.bytes_received and s0.bytes_sent == c0.bytes_received
        s = await client.open_stream(label="stats")
        await s.send_all(os.urandom(size))
        r = await server.accept_stream()
        assert len(await _read_exactly(r, size)) == size
        await r.send_all(b"x" * 1000)
        assert await _read_exactly(s, 1000) == b"x" * 1000
        await wait_all_tasks_blocked()

        ss, rs = s.statistics(), r.statistics()
        assert (ss.stream_id, ss.label) == (s.stream_id, "stats")
        assert ss.bytes_sent == size and rs.bytes_received == size
        assert rs.bytes_sent == 1000 and ss.bytes_received == 1000
        assert ss.frames_sent >= size // (64 * KiB) and rs.frames_received >= ss.frames_sent
        assert rs.frames_sent >= 1 and ss.frames_received >= 1
        assert rs.buffered == 0 and ss.buffered == 0
        assert ss.blocked_on_credit_s == 0

        c1, s1 = client.statistics(), server.statistics()
        assert c1.bytes_sent - c0.bytes_sent >= size
        assert s1.bytes_received - s0.bytes_received >= size
        assert c1.frames_sent - c0.frames_sent >= ss.frames_sent
        assert s1.bytes_sent - s0.bytes_sent >= 1000
        # Quiet connection: what one side wrote, the other has read.
        assert c1.bytes_sent == s1.bytes_received and s1.bytes_sent == c1.bytes_received
        assert [x.stream_id for x in c1.streams] == [s.stream_id]
        assert [x.stream_id for x in s1.streams] == [r.stream_id]

        # Counters survive the end of the stream.
        await s.send_eof()
        assert await r.receive_some() == b""
        await r.send_eof()
        assert await s.receive_some() == b""
        await wait_all_tasks_blocked()
        assert s.statistics().bytes_sent == size and r.statistics().bytes_received == size
        assert r.statistics().bytes_sent == 1000 and s.statistics().bytes_received == 1000

        # RPC counters.
        async def echo(body: bytes) -> bytes:
            return body

        server.register(PROG, 1, echo)
        await client.call(PROG, 1, b"x")
        assert server.statistics().calls_served == s1.calls_served + 1
        assert client.statistics().calls_outstanding == 0


async def test_statistics_blocked_on_credit(autojump_clock: trio.testing.MockClock) -> None:
    window = 64 * KiB
    small = Settings(initial_stream_window=window)
    async with connected(server_settings=small) as (client, server):
        s = await client.open_stream()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(s.send_all, bytes(4 * window))
            r = await server.accept_stream()
            await trio.sleep(3)
            stats = s.statistics()
            assert stats.send_credit == 0
            assert 2.5 <= stats.blocked_on_credit_s <= 3.5
            assert client.statistics().streams[0].blocked_on_credit_s > 0
            assert r.statistics().buffered == window
            assert await _read_exactly(r, 4 * window) == bytes(4 * window)
        blocked = s.statistics().blocked_on_credit_s
        await trio.sleep(5)
        assert s.statistics().blocked_on_credit_s == blocked  # not blocked any more: it stopped counting


async def test_statistics_are_immutable_snapshots() -> None:
    async with connected() as (client, server):
        s = await client.open_stream()
        conn_stats = client.statistics()
        stream_stats = s.statistics()
        with pytest.raises(dataclasses.FrozenInstanceError):
            conn_stats.bytes_sent = 0  # type: ignore[misc]
        with pytest.raises(dataclasses.FrozenInstanceError):
            stream_stats.bytes_sent = 0  # type: ignore[misc]
        assert isinstance(conn_stats.streams, tuple)
        # A snapshot does not change when the connection moves on.
        await s.send_all(b"abc")
        r = await server.accept_stream()
        await _read_exactly(r, 3)
        assert stream_stats.bytes_sent == 0 and s.statistics().bytes_sent == 3


# ---------------------------------------------------------------------------
# 7. Liveness: keepalive, silent peers, aborts, protocol violations


async def test_keepalive_keeps_an_idle_connection_alive(autojump_clock: trio.testing.MockClock) -> None:
    async with connected(keepalive_interval=1.0, keepalive_timeout=3.0) as (client, server):

        async def echo(body: bytes) -> bytes:
            return body

        server.register(PROG, 1, echo)
        s = await client.open_stream()
        r = await server.accept_stream()
        start = trio.current_time()
        await trio.sleep(30)  # ten timeouts of silence from the application
        assert trio.current_time() - start >= 30
        assert not client.is_closed and not server.is_closed
        assert client.statistics().idle_s < 3.0 and server.statistics().idle_s < 3.0
        assert await client.call(PROG, 1, b"still there") == b"still there"
        await s.send_all(b"ping")
        assert await _read_exactly(r, 4) == b"ping"


async def test_silent_peer_fails_everything_pending(autojump_clock: trio.testing.MockClock) -> None:
    interval, timeout = 1.0, 4.0
    a, b = trio.testing.memory_stream_pair()
    outcomes: dict[str, tuple[type[BaseException] | None, float]] = {}
    async with trio.open_nursery() as outer:
        fake_box: dict[str, tunnel.Connection] = {}
        handshook = trio.Event()

        async def silent_server() -> None:
            fake_box["core"] = await _fake_handshake(b, client=False, settings=Settings(initial_stream_window=16 * KiB))
            handshook.set()
            # ... and from now on never reads nor writes.

        outer.start_soon(silent_server)
        async with open_connection(a, client=True, keepalive_interval=interval, keepalive_timeout=timeout) as conn:
            await handshook.wait()
            start = trio.current_time()
            s = await conn.open_stream()

            async def attempt(name: str, op: Callable[[], object]) -> None:
                try:
                    await op()  # type: ignore[misc]
                except tunnel.ConnectionLost:
                    outcomes[name] = (tunnel.ConnectionLost, trio.current_time() - start)
                except BaseException as exc:  # noqa: BLE001 - recorded and asserted below
                    outcomes[name] = (type(exc), trio.current_time() - start)
                else:
                    outcomes[name] = (None, trio.current_time() - start)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(attempt, "call", lambda: conn.call(PROG, 1, b"anyone?"))
                nursery.start_soon(attempt, "receive", s.receive_some)
                nursery.start_soon(attempt, "send", lambda: s.send_all(bytes(64 * KiB)))
                nursery.start_soon(attempt, "accept", conn.accept_stream)
                nursery.start_soon(attempt, "ping", conn.ping)
            assert conn.is_closed
            with pytest.raises(tunnel.ConnectionLost):
                await conn.call(PROG, 1)
            with pytest.raises(tunnel.ConnectionLost):
                await s.send_all(b"x")
    assert set(outcomes) == {"call", "receive", "send", "accept", "ping"}
    for name, (error, when) in outcomes.items():
        assert error is tunnel.ConnectionLost, (name, error)
        assert timeout <= when <= timeout + interval, (name, when)
    # The client said why it gave up, even though nobody listened.
    events = await _fake_receive_all(b, fake_box["core"])
    goodbyes = [e for e in events if isinstance(e, tunnel.ConnectionTerminated)]
    assert goodbyes and goodbyes[0].error_code == ErrorCode.KEEPALIVE_TIMEOUT


@pytest.mark.parametrize("aborter", ["opener", "acceptor"])
async def test_abort_reaches_the_other_side(aborter: str) -> None:
    small = Settings(initial_stream_window=16 * KiB)
    async with connected(client_settings=small, server_settings=small) as (client, server):
        s = await client.open_stream()
        await s.send_all(b"hello")
        r = await server.accept_stream()
        assert await _read_exactly(r, 5) == b"hello"
        active, victim = (s, r) if aborter == "opener" else (r, s)
        outcomes: dict[str, BaseException] = {}

        async def pending(name: str, op: Callable[[], object]) -> None:
            with pytest.raises(tunnel.StreamAborted) as info:
                await op()  # type: ignore[misc]
            outcomes[name] = info.value

        async with trio.open_nursery() as nursery:
            nursery.start_soon(pending, "receive", victim.receive_some)
            nursery.start_soon(pending, "send", lambda: victim.send_all(bytes(64 * KiB)))  # more than the window
            await wait_all_tasks_blocked()
            assert not outcomes
            await active.abort(ErrorCode.APPLICATION_ERROR, "guest paused by the operator")

        # Pending and later operations on the other side all raise, with the code and reason.
        for op in (victim.receive_some, lambda: victim.send_all(b"x"), victim.send_eof, victim.receive_record):
            with pytest.raises(tunnel.StreamAborted) as info:
                await op()
            outcomes[f"later {len(outcomes)}"] = info.value
        for exc in outcomes.values():
            assert isinstance(exc, tunnel.StreamAborted)
            assert exc.error_code == ErrorCode.APPLICATION_ERROR
            assert exc.reason == "guest paused by the operator"
            assert exc.remote
        # The aborting side's own later operations fail too (locally).
        with pytest.raises(tunnel.StreamAborted) as info:
            await active.send_all(b"x")
        assert not info.value.remote and info.value.reason == "guest paused by the operator"
        with pytest.raises(tunnel.StreamAborted):
            await active.receive_some()
        # Closing after an abort is quiet, and the connection is unharmed.
        await victim.aclose()
        await active.aclose()
        await client.ping()
        s2 = await client.open_stream()
        await s2.send_all(b"next")
        r2 = await server.accept_stream()
        assert await _read_exactly(r2, 4) == b"next"
        await wait_all_tasks_blocked()
        assert server.statistics().buffered == 0


async def test_protocol_violation_breaks_the_connection_with_goodbye(autojump_clock: trio.testing.MockClock) -> None:
    a, b = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as outer:
        fake_box: dict[str, tunnel.Connection] = {}
        handshook = trio.Event()
        misbehave = trio.Event()
        received: list[tunnel.Event] = []

        async def bad_client() -> None:
            core = fake_box["core"] = await _fake_handshake(a, client=True)
            sid = core.open_stream(label="fake")
            core.send_data(sid, b"legit")
            await a.send_all(core.bytes_to_send())
            handshook.set()
            await misbehave.wait()
            # A frame header with a frame type that does not exist.
            await a.send_all(HEADER.pack(0, 0xEE, 0, 0, 0))
            received.extend(await _fake_receive_all(a, core))

        outer.start_soon(bad_client)
        async with open_connection(b, client=False, keepalive_interval=None) as server:
            await handshook.wait()
            r = await server.accept_stream()
            assert await _read_exactly(r, 5) == b"legit"
            start = trio.current_time()
            failures: list[BaseException] = []

            async def pending(op: Callable[[], object]) -> None:
                with pytest.raises(tunnel.ConnectionLost) as info:
                    await op()  # type: ignore[misc]
                failures.append(info.value)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(pending, r.receive_some)
                nursery.start_soon(pending, lambda: server.call(PROG, 1, b"?"))
                nursery.start_soon(pending, server.accept_stream)
                await wait_all_tasks_blocked()
                misbehave.set()
            assert len(failures) == 3
            assert trio.current_time() == start  # at once, no timeout involved
            assert server.is_closed
    goodbyes = [e for e in received if isinstance(e, tunnel.ConnectionTerminated)]
    assert len(goodbyes) == 1
    assert goodbyes[0].error_code == ErrorCode.PROTOCOL_ERROR
    assert "frame type" in goodbyes[0].reason


# ---------------------------------------------------------------------------
# 8. Nothing outlives the connection


def _all_tasks() -> set[trio.lowlevel.Task]:
    tasks: set[trio.lowlevel.Task] = set()
    todo = [trio.lowlevel.current_root_task()]
    while todo:
        task = todo.pop()
        if task is None:
            continue
        tasks.add(task)
        for nursery in task.child_nurseries:
            todo.extend(nursery.child_tasks)
    return tasks


async def _serve_until_closed(transport: trio.abc.Stream, **kwargs: object) -> None:
    async with open_connection(transport, client=False, **kwargs) as conn:  # type: ignore[arg-type]

        async def echo(body: bytes) -> bytes:
            return body

        conn.register(PROG, 1, echo)
        try:
            while True:
                r = await conn.accept_stream()
                await r.send_all(await _read_all(r))
                await r.send_eof()
        except tunnel.ConnectionLost:
            pass


@pytest.mark.parametrize("pair", [memory_pair, unix_pair], ids=["memory", "unix"])
async def test_nothing_outlives_the_connection(
    pair: Callable[[], AbstractAsyncContextManager[tuple[trio.abc.Stream, trio.abc.Stream]]],
) -> None:
    async with pair() as (a, b):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_serve_until_closed, b)
            await wait_all_tasks_blocked()
            before = _all_tasks()
            nurseries = list(trio.lowlevel.current_task().child_nurseries)
            async with open_connection(a, client=True) as conn:
                assert len(_all_tasks()) > len(before)  # reader, writer, keepalive
                assert await conn.call(PROG, 1, b"x") == b"x"
                s = await conn.open_stream()
                await s.send_all(b"echo me")
                await s.send_eof()
                assert await _read_all(s) == b"echo me"
                s2 = await conn.open_stream()
                await s2.send_all(b"left open")
            # Every task the connection started has finished ...
            assert _all_tasks() <= before
            assert trio.lowlevel.current_task().child_nurseries == nurseries
        # ... and so has the server's, which saw the goodbye.
        assert not nursery.child_tasks
        # Both transports are closed.
        for transport in (a, b):
            with pytest.raises(trio.ClosedResourceError):
                await transport.send_all(b"x")
            if isinstance(transport, trio.SocketStream):
                assert transport.socket.fileno() == -1
        # Streams and calls of a finished connection fail cleanly, buffering nothing.
        with pytest.raises(trio.BrokenResourceError):
            await s2.send_all(b"x")
        assert s2.statistics().buffered == 0
        with pytest.raises(tunnel.ConnectionLost):
            await conn.call(PROG, 1)
        with pytest.raises(tunnel.ConnectionLost):
            await conn.open_stream()


class _Boom(Exception):
    pass


async def test_exception_in_body_propagates_as_itself() -> None:
    a, b = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_serve_until_closed, b)
        with pytest.raises(_Boom) as info:
            async with open_connection(a, client=True) as conn:
                s = await conn.open_stream()
                await s.send_all(b"half")
                raise _Boom("from the body")
        assert type(info.value) is _Boom
        assert str(info.value) == "from the body"
    with pytest.raises(trio.ClosedResourceError):
        await a.send_all(b"x")


async def test_cancellation_of_the_body_is_clean(autojump_clock: trio.testing.MockClock) -> None:
    a, b = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_serve_until_closed, b)
        with trio.move_on_after(2) as scope:
            async with open_connection(a, client=True) as conn:
                await conn.ping()
                await trio.sleep_forever()
        assert scope.cancelled_caught
        assert conn.is_closed
    with pytest.raises(trio.ClosedResourceError):
        await a.send_all(b"x")


# ---------------------------------------------------------------------------
# 9. However the transport chunks the bytes, everything arrives intact


def _chunking_pair(sizes: list[int]) -> Callable[[], object]:
    """A transport pair whose pumps move bytes in the given chunk sizes, cycled."""
    cycle: Iterator[int] = itertools.cycle(sizes)

    def one_way() -> tuple[trio.testing.MemorySendStream, trio.testing.MemoryReceiveStream]:
        send = trio.testing.MemorySendStream()
        recv = trio.testing.MemoryReceiveStream()

        async def pump_one_chunk() -> None:
            trio.testing.memory_stream_pump(send, recv, max_bytes=next(cycle))

        def pump_rest() -> None:
            trio.testing.memory_stream_pump(send, recv)

        send.send_all_hook = pump_one_chunk
        recv.receive_some_hook = pump_one_chunk
        send.close_hook = pump_rest
        return send, recv

    @asynccontextmanager
    async def pair() -> AsyncIterator[tuple[trio.abc.Stream, trio.abc.Stream]]:
        c2s_send, c2s_recv = one_way()
        s2c_send, s2c_recv = one_way()
        yield trio.StapledStream(c2s_send, s2c_recv), trio.StapledStream(s2c_send, c2s_recv)

    return pair


_record_strategy = st.one_of(
    st.binary(min_size=1, max_size=3000),
    st.builds(
        lambda n, seed: PagesRecord(
            region=seed % 3, page_size=512, addresses=tuple(i * 512 for i in range(n)), data=bytes([seed]) * (512 * n)
        ),
        st.integers(0, 4),
        st.integers(0, 255),
    ),
    st.builds(
        lambda runs: ZeroPagesRecord(region=0, page_size=4096, runs=tuple((a * 4096, c) for a, c in runs)),
        st.lists(st.tuples(st.integers(0, 2**20), st.integers(1, 2**32 - 1)), max_size=4),
    ),
    st.builds(
        lambda name, data: DeviceStateRecord(name=name, version=7, data=data),
        st.text(st.characters(codec="utf-8"), max_size=20),
        st.binary(max_size=2000),
    ),
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    sizes=st.lists(st.integers(1, 4096), min_size=1, max_size=12),
    records=st.lists(_record_strategy, min_size=1, max_size=8),
    body=st.binary(max_size=5000),
    digest=st.sampled_from(list(tunnel.DigestAlgorithm)),
)
def test_any_transport_chunking_delivers_everything(sizes: list[int], records: list[object], body: bytes, digest: int) -> None:
    async def main() -> None:
        small = Settings(initial_stream_window=16 * KiB, connection_window=32 * KiB, max_frame_size=16 * KiB)
        async with connected(_chunking_pair(sizes), client_settings=small, server_settings=small, keepalive_interval=None) as (
            client,
            server,
        ):

            async def echo(body: bytes) -> bytes:
                return b"re:" + body

            server.register(PROG, 1, echo)
            s = await client.open_stream(digest=digest, label="chunked")
            results: dict[str, object] = {}

            async def send() -> None:
                await _send_records(s, records)
                await s.send_eof()

            async def call() -> None:
                results["reply"] = await client.call(PROG, 1, body)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(send)
                nursery.start_soon(call)
                r = await server.accept_stream()
                results["records"] = await _receive_records(r)
            assert results["reply"] == b"re:" + body
            assert results["records"] == _normalise(records)
            assert r.label == "chunked" and r.digest == digest

    trio.run(main)
