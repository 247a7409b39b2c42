"""The file-descriptor data path: ``send_fd`` / ``receive_fd``.

On plain sockets the payload is spliced by the kernel (``bytes_spliced``
counts it); on TLS and in-memory transports, and for streams with a digest,
it is copied.  Either way every byte arrives, in order, and EOF is passed on.
"""

from __future__ import annotations

import os
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
