"""The file-descriptor data path: ``send_fd`` / ``receive_fd``.

On plain sockets the payload is spliced by the kernel (``bytes_spliced``
counts it); on TLS and in-memory transports, and for streams with a digest,
it is copied.  Either way every byte arrives, in order, and EOF is passed on.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import struct
import termios
import threading

import pytest
import trio
from conftest import TRANSPORTS, connected

import tunnel


def _feed(fd: int, payload: bytes) -> threading.Thread:
    def run() -> None:
        view = memoryview(payload)
        while view:
            view = view[os.write(fd, view[:65536]) :]
        os.close(fd)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def _drain(fd: int, into: bytearray) -> threading.Thread:
    def run() -> None:
        while chunk := os.read(fd, 1 << 20):
            into.extend(chunk)
        os.close(fd)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


@pytest.mark.parametrize("digest", [tunnel.DigestAlgorithm.NONE, tunnel.DigestAlgorithm.CRC32])
@pytest.mark.parametrize("transport", sorted(TRANSPORTS))
async def test_pipe_to_pipe(transport: str, digest: int) -> None:
    payload = os.urandom(9 * 1024 * 1024 + 5)
    src_r, src_w = os.pipe()
    dst_r, dst_w = os.pipe()
    got = bytearray()
    feeder, drainer = _feed(src_w, payload), _drain(dst_r, got)
    with trio.fail_after(60):
        async with connected(TRANSPORTS[transport]) as (client, server), trio.open_nursery() as nursery:

            async def send() -> None:
                s = await client.open_stream(digest=digest, label="qemu")
                assert await s.send_fd(src_r) == len(payload)
                await s.send_eof()
                assert await s.receive_some() == b""
                stats = s.statistics()
                spliced = transport in ("tcp", "unix") and digest == tunnel.DigestAlgorithm.NONE
                assert (stats.bytes_spliced == len(payload)) if spliced else (stats.bytes_spliced == 0)
                await s.aclose()

            nursery.start_soon(send)
            r = await server.accept_stream()
            assert await r.receive_fd(dst_w) == len(payload)
            os.close(dst_w)
            await r.send_eof()
            await r.aclose()
    os.close(src_r)
    await trio.to_thread.run_sync(feeder.join)
    await trio.to_thread.run_sync(drainer.join)
    assert got == payload


async def test_receive_fd_failure_aborts_the_stream(fd_leak_check: None) -> None:
    """A destination that stops reading (closed pipe) aborts the stream; the sender sees why."""
    dst_r, dst_w = os.pipe()
    os.close(dst_r)
    with trio.fail_after(30):
        async with connected(TRANSPORTS["unix"]) as (client, server):
            s = await client.open_stream(digest=tunnel.DigestAlgorithm.NONE)
            async with trio.open_nursery() as nursery:

                async def send() -> None:
                    with pytest.raises(tunnel.StreamAborted) as info:
                        while True:
                            await s.send_all(b"x" * 65536)
                    assert info.value.error_code == tunnel.ErrorCode.APPLICATION_ERROR
                    assert "destination write failed" in info.value.reason

                nursery.start_soon(send)
                r = await server.accept_stream()
                with pytest.raises(OSError):
                    await r.receive_fd(dst_w)
    os.close(dst_w)


def _queued(sock: socket.socket) -> int:
    """Bytes waiting to be read on *sock* (SIOCINQ)."""
    return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0"))[0]


@pytest.mark.parametrize("buffering", [None, 64 * 1024])
@pytest.mark.parametrize("transport", ["unix", "tcp", "tls_bulk"])
async def test_set_buffering_bounds_what_waits_between_source_and_sink(
    transport: str, buffering: int | None, fd_leak_check: None
) -> None:
    """Behind a sink that stopped reading, a stream holds about its buffering, not its window and pipe.

    QEMU's socket in, QEMU's socket out, as in a daemon.  The sink reads
    freely first (so a shrunk window has withheld what the peer held), then
    stops; once nothing moves any more, the bytes taken from the source and
    not yet in the sink are what the stream holds on both sides.
    """
    total = 48 * 1024 * 1024
    payload = os.urandom(1024 * 1024)
    src_ours, src_theirs = socket.socketpair()
    sink_ours, sink_theirs = socket.socketpair()
    for s in (src_ours, src_theirs, sink_ours, sink_theirs):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
    fed = [0]
    read = [0]
    reading = threading.Event()
    reading.set()
    filled = threading.Event()  # the sink has read 8 MiB: the stream runs at full speed

    def feed() -> None:
        with contextlib.suppress(OSError):
            while fed[0] < total:
                # Small sends: a blocked send's bytes already queued are not counted until it returns.
                fed[0] += src_theirs.send(payload[: min(16 * 1024, total - fed[0])])
        src_theirs.shutdown(socket.SHUT_WR)

    def drain() -> None:
        while True:
            reading.wait()
            chunk = sink_theirs.recv(1 << 20)
            if not chunk:
                return
            read[0] += len(chunk)
            if read[0] >= 8 * 1024 * 1024:
                filled.set()

    threads = [threading.Thread(target=feed, daemon=True), threading.Thread(target=drain, daemon=True)]
    for t in threads:
        t.start()
    held: list[int] = []
    with trio.fail_after(60):
        async with connected(TRANSPORTS[transport]) as (client, server), trio.open_nursery() as nursery:

            async def send() -> None:
                s = await client.open_stream(digest=tunnel.DigestAlgorithm.NONE, label="qemu")
                s.set_buffering(buffering)
                await s.send_fd(src_ours.fileno())
                await s.send_eof()
                assert await s.receive_some() == b""
                await s.aclose()

            async def receive() -> None:
                r = await server.accept_stream()
                r.set_buffering(buffering)
                await r.receive_fd(sink_ours.fileno())
                sink_ours.shutdown(socket.SHUT_WR)
                await r.send_eof()
                await r.aclose()

            nursery.start_soon(send)
            nursery.start_soon(receive)
            await trio.to_thread.run_sync(filled.wait, abandon_on_cancel=True)
            reading.clear()  # the sink stops reading (after the read in progress)
            last, still = -1, 0
            while still < 5:  # settled: nothing taken from the source for 5 polls
                await trio.sleep(0.05)
                taken = fed[0] - _queued(src_ours)
                still = still + 1 if taken == last else 0
                last = taken
            held.append(last - read[0] - _queued(sink_theirs))
            reading.set()
    for t in threads:
        t.join(10)
    assert read[0] == total
    for s in (src_ours, src_theirs, sink_ours, sink_theirs):
        s.close()
    if buffering is None:
        assert held[0] > 1024 * 1024  # a 1 MiB pipe and a 4 MiB window: the measure sees them
    else:
        # Read ahead of credit, plus the window, plus one read's worth of slack on each side.
        assert 0 <= held[0] <= 4 * buffering, held[0]
