"""What one connection can cost, whatever the peer does: memory before the
handshake, answers to a peer that never reads, incomplete
frames and handshakes, and calls to versions nobody serves.

Nothing here measures time: timeouts run on the ``autojump_clock``.  RSS is
read from /proc where memory is the point, with bounds far from both the
old and the new behaviour.  Misbehaving peers are real sans-I/O cores
driven by hand.  That memory goes back after connections close is measured
against a daemon process by bench/connections.py (in a test process the heap
left by other tests hides it).
"""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio
import trio.lowlevel
import trio.testing
from conftest import connected, memory_pair, unix_pair

import tunnel
from tunnel import ErrorCode, FrameType, RPCError
from tunnel._frames import HEADER, Ping, RpcCall, encode
from tunnel.transport import TunnelConnection, open_connection

KiB = 1024
MiB = 1024 * 1024
PROG = 0x54554E64


def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS in /proc/self/status")


async def _handshake(transport: trio.abc.Stream, *, client: bool = True) -> tunnel.Connection:
    core = tunnel.Connection(client=client)
    await transport.send_all(core.bytes_to_send())
    while core.state is tunnel.ConnectionState.HANDSHAKE:
        data = await transport.receive_some(64 * KiB)
        assert data, "the peer closed during the handshake"
        core.receive_data(data)
    return core


@asynccontextmanager
async def _serving(
    transport: trio.abc.Stream, **kwargs: object
) -> AsyncIterator[tuple[dict[str, TunnelConnection], dict[str, BaseException]]]:
    """Run open_connection(client=False) on *transport* in the background."""
    holder: dict[str, TunnelConnection] = {}
    failure: dict[str, BaseException] = {}

    async def serve() -> None:
        try:
            async with open_connection(transport, client=False, **kwargs) as conn:  # type: ignore[arg-type]
                holder["conn"] = conn
                while True:
                    await conn.accept_stream()  # raises once the connection fails
        except tunnel.ConnectionLost as exc:
            failure["error"] = exc

    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve)
        yield holder, failure
        nursery.cancel_scope.cancel()


# ---------------------------------------------------------------------------
# Memory per connection


async def test_a_connection_before_its_handshake_costs_little() -> None:
    """500 peers that sent 3 bytes of a preface: no large buffer each (it was ~1.3 MiB)."""
    count = 300
    peers: list[trio.socket.SocketType] = []
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:

            async def serve(sock: trio.socket.SocketType) -> None:
                async with open_connection(trio.SocketStream(sock), client=False):
                    pytest.fail("no handshake was sent")  # pragma: no cover

            async def open_one() -> None:
                a, b = trio.socket.socketpair()
                nursery.start_soon(serve, b)
                await a.send(b"TUN")
                peers.append(a)

            for _ in range(10):  # warm up: first-time allocations of the machinery
                await open_one()
            await trio.testing.wait_all_tasks_blocked()
            gc.collect()
            before = _rss_kib()
            for _ in range(count):
                await open_one()
            await trio.testing.wait_all_tasks_blocked()
            per_connection = (_rss_kib() - before) / count
            nursery.cancel_scope.cancel()
    for sock in peers:
        sock.close()
    assert per_connection <= 64, f"{per_connection:.0f} KiB per connection before the handshake"


async def test_rpc_only_connections_never_take_large_buffers() -> None:
    async with connected(unix_pair) as (client, server):

        async def echo(body: bytes) -> bytes:
            return body

        server.register(PROG, 1, echo)
        for size in (10, 1000, 10 * KiB):
            assert await client.call(PROG, 1, b"x" * size) == b"x" * size
        assert server._reader.pool is None and client._reader.pool is None
        # Bulk data switches to the large buffers.
        stream = await client.open_stream(digest=tunnel.DigestAlgorithm.NONE)
        incoming = await server.accept_stream()
        async with trio.open_nursery() as nursery:

            async def send() -> None:
                await stream.send_all(b"d" * (4 * MiB))
                await stream.send_eof()

            nursery.start_soon(send)
            total = 0
            while chunk := await incoming.receive_some():
                total += len(chunk)
        assert total == 4 * MiB
        assert server._reader.pool is not None


# ---------------------------------------------------------------------------
# A peer that never reads


async def test_ping_flood_from_a_peer_that_never_reads_queues_one_pong() -> None:
    async with unix_pair() as (peer, ours), _serving(ours) as (holder, failure):
        with trio.fail_after(30):
            core = await _handshake(peer)
            while "conn" not in holder:
                await trio.lowlevel.checkpoint()
            conn = holder["conn"]
            pings = b"".join(encode(Ping(opaque=i.to_bytes(8, "big"))) for i in range(3000))
            most = 0
            for _ in range(100):  # 6 MB of PINGs, never reading a PONG
                await peer.send_all(pings)
                most = max(most, conn._core.pending_output)
            await trio.testing.wait_all_tasks_blocked()
            most = max(most, conn._core.pending_output)
        assert most <= 20  # one PONG
        assert not failure
        del core


async def test_call_flood_from_a_peer_that_never_reads_stops_the_reader(autojump_clock: trio.testing.MockClock) -> None:
    """RPC_ERRORs for unknown procedures are bounded by max_control_backlog:
    the reader stops, and the flooding peer's own socket fills up."""
    limit = 64 * KiB
    async with (
        unix_pair() as (peer, ours),
        _serving(ours, max_control_backlog=limit, keepalive_interval=None) as (
            holder,
            failure,
        ),
    ):
        await _handshake(peer)
        while "conn" not in holder:
            await trio.lowlevel.checkpoint()
        conn = holder["conn"]
        sent = 0
        most = 0
        with trio.move_on_after(5) as scope:  # a socket that stays full ends the flood
            for round in range(200):  # up to 5.6 MB of calls
                batch = b"".join(
                    encode(RpcCall(program=PROG, version=1, procedure=99, serial=serial, body=b""))
                    for serial in range(round * 1000 + 1, round * 1000 + 1001)
                )
                await peer.send_all(batch)
                sent += 1
                most = max(most, conn._core.pending_control_bytes + conn._writer.writing_control)
                await trio.lowlevel.checkpoint()
        assert scope.cancelled_caught, "the reader never stopped"
        most = max(most, conn._core.pending_control_bytes + conn._writer.writing_control)
        # Above the bound by at most the answers to one read (16 KiB of calls).
        assert most <= limit + 100 * KiB
        assert conn._core.pending_output <= limit + 100 * KiB
        assert not failure


@pytest.fixture
def autojump(autojump_clock: trio.testing.MockClock) -> trio.testing.MockClock:
    return autojump_clock


async def test_peers_calling_each_other_with_large_bodies_do_not_deadlock(autojump: trio.testing.MockClock) -> None:
    """Both sides call the other with near-maximal bodies and replies while
    neither waits to read: the bound counts only answers, and is far above them."""

    async def echo(body: bytes) -> bytes:
        return body

    body = b"b" * (MiB - 4 * KiB)
    async with connected(unix_pair, handlers={(PROG, 1): echo}) as (client, server):
        with trio.fail_after(120):
            async with trio.open_nursery() as nursery:
                for conn in (client, server) * 8:

                    async def call(conn: TunnelConnection = conn) -> None:
                        assert await conn.call(PROG, 1, body) == body

                    nursery.start_soon(call)


# ---------------------------------------------------------------------------
# Incomplete frames and handshakes


async def test_peer_trickling_a_frame_is_dropped(autojump_clock: trio.testing.MockClock) -> None:
    """One byte every 4 s keeps the keepalive happy but never completes a frame."""
    async with memory_pair() as (peer, ours), _serving(ours) as (holder, failure):
        with trio.fail_after(200):
            await _handshake(peer)
            frame = encode(Ping(opaque=b"trickle!")) * 10  # a frame takes 80 s to arrive
            with pytest.raises(trio.BrokenResourceError):
                for byte in frame:
                    await peer.send_all(bytes([byte]))
                    await trio.sleep(4)
            assert "frame timeout" in str(failure["error"])
            assert "conn" in holder


async def test_peer_sending_whole_frames_slowly_is_kept(autojump_clock: trio.testing.MockClock) -> None:
    async with memory_pair() as (peer, ours), _serving(ours) as (_holder, failure):
        core = await _handshake(peer)
        frame = encode(Ping(opaque=b"slowslow"))
        for _ in range(50):  # 200 s
            await peer.send_all(frame)
            await trio.sleep(4)
            core.receive_data(await peer.receive_some())
            await peer.send_all(core.bytes_to_send())
        assert not failure


@pytest.mark.parametrize("sent", [b"", b"TUN", b"TUNL\x00\x01\x00\x01"])
async def test_handshake_that_does_not_complete_is_dropped(autojump_clock: trio.testing.MockClock, sent: bytes) -> None:
    async with memory_pair() as (peer, ours):
        with trio.fail_after(60):
            await peer.send_all(sent)
            with pytest.raises(tunnel.ConnectionLost, match="no handshake from the peer within 3 s"):
                async with open_connection(ours, client=False, handshake_timeout=3):
                    pass  # pragma: no cover


async def test_frame_timeout_can_be_turned_off(autojump_clock: trio.testing.MockClock) -> None:
    async with memory_pair() as (peer, ours), _serving(ours, frame_timeout=None, keepalive_interval=None) as (holder, failure):
        await _handshake(peer)
        await peer.send_all(HEADER.pack(8, FrameType.PING, 0, 0, 0)[:5])
        await trio.sleep(1000)
        assert not failure and "conn" in holder


# ---------------------------------------------------------------------------
# PONGs that answer several PINGs, RPC versions


async def test_a_pong_answers_every_earlier_ping(autojump_clock: trio.testing.MockClock) -> None:
    """The peer coalesces two PINGs into one PONG: both ping() calls return."""
    async with memory_pair() as (ours, peer), trio.open_nursery() as nursery:
        nursery.start_soon(_coalescing_peer, peer)
        async with open_connection(ours, client=True, keepalive_interval=None) as conn:
            with trio.fail_after(10):
                async with trio.open_nursery() as pings:
                    pings.start_soon(conn.ping)
                    pings.start_soon(conn.ping)
        nursery.cancel_scope.cancel()


async def _coalescing_peer(transport: trio.abc.Stream) -> None:
    core = await _handshake(transport, client=False)
    base = core.frames_received
    while core.frames_received < base + 2:  # both PINGs in, neither answered yet
        data = await transport.receive_some()
        assert data
        core.receive_data(data)
    out = core.bytes_to_send()
    assert out.count(bytes([FrameType.PONG])) == 1 and len(out) == 20  # one PONG for both
    await transport.send_all(out)
    await trio.sleep_forever()


async def test_call_to_an_unserved_version_names_the_supported_ones() -> None:
    async def v1(body: bytes) -> bytes:
        return b"v1:" + body

    async def v3(body: bytes) -> bytes:
        return b"v3:" + body

    async with connected(handlers={(PROG, 1): v1}) as (client, server):
        assert await client.call(PROG, 1, b"a") == b"v1:a"
        with pytest.raises(RPCError) as info:
            await client.call(PROG, 1, b"a", version=2)
        assert info.value.code == ErrorCode.UNKNOWN_PROCEDURE
        assert info.value.message == "program 0x54554e64 version 2 is not supported (supported: 1)"
        server.register(PROG, 1, v3, version=3)
        assert await client.call(PROG, 1, b"a", version=3) == b"v3:a"
        assert await client.call(PROG, 1, b"a") == b"v1:a"
        with pytest.raises(RPCError) as info:
            await client.call(PROG, 1, b"a", version=2)
        assert info.value.message.endswith("(supported: 1, 3)")
        with pytest.raises(RPCError) as info:
            await client.call(PROG, 7, b"a", version=3)
        assert info.value.code == ErrorCode.UNKNOWN_PROCEDURE
        assert info.value.message == "program 0x54554e64 version 3 has no procedure 7"
        with pytest.raises(RPCError) as info:
            await client.call(0x1234, 1)
        assert info.value.message == "program 0x00001234 is not served here"
