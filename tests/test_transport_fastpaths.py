"""The trio layer's fast paths: sink pipes, splice sources, collected payloads, handshake order.

These paths exist for speed (bench/throughput.py, bench/qemu.py); the tests
check that they keep the guarantees: every byte in order, bounded buffers,
credit only for bytes in the sink, calls right behind the handshake served.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time

import pytest
import trio
import trio.testing
from conftest import TRANSPORTS, connected, unix_pair

import tunnel
from tunnel.transport import open_connection
from tunnel.transport._splice import PIPE_SIZE, PipeSource, SinkQueue, splice_some, widen_pipe

MiB = 1024 * 1024


def _fill_pipe(fd: int, size: int) -> bytes:
    data = os.urandom(size)
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
    return data


def test_sink_queue_opens_pipes_up_to_its_capacity_and_keeps_order() -> None:
    """A sink that does not read: payload goes into further pipes, never past the capacity."""
    out_r, out_w = socket.socketpair()
    src_r, src_w = os.pipe()
    sink = SinkQueue(out_w.fileno(), capacity=3 * PIPE_SIZE)
    os.set_blocking(out_w.fileno(), False)
    expected = bytearray()
    try:
        widen_pipe(src_w)
        for i in range(40):
            pipe = sink.intake()
            if pipe is None:
                break
            piece = _fill_pipe(src_w, 256 * 1024)
            moved = splice_some(src_r, pipe.write_fd, len(piece))
            assert moved == len(piece)
            sink.add_pipe(pipe, moved)
            sink.add_memory(bytes([i]) * 100, None)  # header-read bytes ride in memory, in order
            expected += piece + bytes([i]) * 100
        # Room for the whole capacity (with a pipe to spare), and no more pipes than that.
        assert len(sink.pipes) == 4
        assert 3 * PIPE_SIZE <= sum(p.level for p in sink.pipes) <= 4 * PIPE_SIZE
        assert sink.intake() is None  # full: the reader would read into memory instead
        # Give up: everything comes back as memory, in order, and the pipes are closed.
        leftover = b"".join(bytes(data) for data, _ in sink.release())
        assert leftover == bytes(expected)
        assert all(p.read_fd == -1 for p in sink.pipes)
    finally:
        for fd in (src_r, src_w):
            os.close(fd)
        out_r.close()
        out_w.close()


def test_sink_queue_flush_reuses_emptied_pipes() -> None:
    """Flushing moves pipe and memory segments into the sink in order; an emptied pipe is reused."""
    out_r, out_w = socket.socketpair()
    src_r, src_w = os.pipe()
    out_w.setblocking(False)
    out_r.settimeout(10)
    sink = SinkQueue(out_w.fileno(), capacity=2 * PIPE_SIZE)
    try:
        widen_pipe(src_w)
        pipe = sink.intake()
        assert pipe is not None
        first = _fill_pipe(src_w, 100_000)
        sink.add_pipe(pipe, splice_some(src_r, pipe.write_fd, len(first)) or 0)
        sink.add_memory(b"middle", None)
        moved, spliced = sink.flush()
        assert (moved, spliced) == (100_006, 100_000)
        assert not sink.segments and pipe.level == 0 and not sink.blocked
        got = bytearray()
        while len(got) < moved:
            got += out_r.recv(1 << 20)
        assert bytes(got) == first + b"middle"
        assert sink.intake() is pipe and len(sink.pipes) == 1  # still room: no second pipe
    finally:
        sink.release()
        for fd in (src_r, src_w):
            os.close(fd)
        out_r.close()
        out_w.close()


def test_pipe_source_stops_at_limit_and_eof() -> None:
    src_r, src_w = os.pipe()
    os.set_blocking(src_r, False)
    source = PipeSource(src_r, limit=70_000)
    try:
        data = _fill_pipe(src_w, 50_000)
        assert source.fill() and source.total == 50_000 and not source.eof
        assert not source.fill()  # nothing more for now: not an end
        data += _fill_pipe(src_w, 40_000)
        assert source.fill() and source.total == 70_000 and source.eof  # the limit ends it
        assert os.read(source.pipe.read_fd, 1 << 20) == data[:70_000]
        source.pipe.level = 0
        os.close(src_w)
        src_w = -1
        eof_source = PipeSource(src_r, limit=None)
        eof_source.fill()
        assert eof_source.eof and eof_source.total == 20_000  # the rest, then the writer closed it
        eof_source.pipe.close()
    finally:
        source.pipe.close()
        for fd in (src_r, src_w):
            if fd >= 0:
                os.close(fd)


async def test_slow_sink_is_spliced_not_copied() -> None:
    """A sink slower than the connection: the payload waits in the sink's pipes (within the
    window), not in memory; only bytes that arrived before receive_fd started are copied."""
    payload = os.urandom(12 * MiB + 7)
    src_r, src_w = os.pipe()
    dst_r, dst_w = os.pipe()
    received = bytearray()

    def slow_reader() -> None:
        with os.fdopen(dst_r, "rb", buffering=0) as f:
            while chunk := f.read(64 * 1024):
                received.extend(chunk)
                time.sleep(0.001)  # slower than the tunnel: the sink's pipes fill up

    def feeder() -> None:
        with os.fdopen(src_w, "wb", buffering=0) as f:
            f.write(payload)

    reader_thread = threading.Thread(target=slow_reader, daemon=True)
    reader_thread.start()
    with trio.fail_after(60):
        async with connected(unix_pair) as (client, server), trio.open_nursery() as nursery:
            receiving = trio.Event()

            async def receive() -> None:
                r = await server.accept_stream()
                nursery.start_soon(_set_when_blocked, receiving)
                assert await r.receive_fd(dst_w) == len(payload)
                os.close(dst_w)
                stats = r.statistics()
                # All but the bytes read together with the first header went through pipes.
                assert stats.bytes_spliced >= len(payload) - 64 * 1024
                assert stats.buffered == 0
                await r.aclose()

            nursery.start_soon(receive)
            s = await client.open_stream(digest=tunnel.DigestAlgorithm.NONE)
            await receiving.wait()
            feeder_thread = threading.Thread(target=feeder, daemon=True)
            feeder_thread.start()
            assert await s.send_fd(src_r) == len(payload)
            await s.send_eof()
            await trio.to_thread.run_sync(feeder_thread.join)
            assert await s.receive_some() == b""  # the receiver has it all (else aclose aborts it)
            await s.aclose()
    os.close(src_r)
    await trio.to_thread.run_sync(reader_thread.join)
    assert received == payload


async def _set_when_blocked(event: trio.Event) -> None:
    await trio.testing.wait_all_tasks_blocked()
    event.set()


def _opening_with_a_call() -> bytes:
    """A client's first bytes: preface, SETTINGS and at once a call (as a fast peer sends them)."""
    client = tunnel.Connection(client=True)
    stand_in = tunnel.Connection(client=False)  # only to complete the client's handshake
    first = client.bytes_to_send()
    stand_in.receive_data(first)
    client.receive_data(stand_in.bytes_to_send())
    client.send_call(0x77, 1, 1, b"first")
    return first + client.bytes_to_send()


@pytest.mark.parametrize("kind", ["memory", "unix"])
async def test_call_in_the_same_read_as_the_handshake_finds_a_handler_registered_in_the_body(kind: str) -> None:
    """The peer's SETTINGS and a call arrive in one read; the server registers its handler as
    the first thing in open_connection's body.  The call is dispatched only after that."""
    ours: trio.abc.Stream
    theirs: trio.abc.Stream
    if kind == "memory":
        ours, theirs = trio.testing.memory_stream_pair()
    else:
        a, b = trio.socket.socketpair()
        ours, theirs = trio.SocketStream(a), trio.SocketStream(b)
    await ours.send_all(_opening_with_a_call())  # all there before the server reads anything
    served: list[bytes] = []
    answered = trio.Event()
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:

            async def server() -> None:
                async with open_connection(theirs, client=False, keepalive_interval=None) as conn:

                    async def echo(body: bytes) -> bytes:
                        served.append(body)
                        answered.set()
                        return body

                    conn.register(0x77, 1, echo)
                    with trio.move_on_after(5):
                        await answered.wait()

            nursery.start_soon(server)
            nursery.start_soon(_drain, ours)
    assert served == [b"first"]  # not refused as UNKNOWN_PROCEDURE


async def _drain(stream: trio.abc.Stream) -> None:
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
        while await stream.receive_some():
            pass
    await stream.aclose()


@pytest.mark.parametrize("transport", sorted(TRANSPORTS))
async def test_collected_payloads_arrive_whole_and_in_order(transport: str) -> None:
    """Frames of every size, interleaved with calls: collecting a payload before it goes to
    the stream changes neither the bytes nor their order, and the stream ends cleanly."""
    sizes = [1, 11, 12, 13, 4095, 4096, 65_536, 1 << 20, (1 << 20) + 1, 3 * (1 << 20) + 5, 17]
    chunks = [os.urandom(n) for n in sizes]
    with trio.fail_after(60):
        async with connected(TRANSPORTS[transport]) as (client, server):

            async def echo(body: bytes) -> bytes:
                return body

            server.register(0x78, 1, echo)
            async with trio.open_nursery() as nursery:
                got = bytearray()

                async def receive() -> None:
                    r = await server.accept_stream()
                    while data := await r.receive_some():
                        got.extend(data)
                    await r.aclose()

                nursery.start_soon(receive)
                s = await client.open_stream()
                for chunk in chunks:
                    await s.send_all(chunk)
                    assert await client.call(0x78, 1, chunk[:100]) == chunk[:100]
                await s.send_eof()
            assert bytes(got) == b"".join(chunks)
            assert server.statistics().buffered == 0
