"""A receive window of 0 (protocol.md §2.4, §6): the peer gets credit only when the
receiving application asks for data, and then the stream carries it."""

from __future__ import annotations

import pytest
import trio
from conftest import connected

import tunnel
from tunnel.transport import PagesRecord, TunnelStream

KiB = 1024


@pytest.mark.parametrize("window", ["stream", "connection", "both"])
async def test_window_0_carries_data_once_the_consumer_asks(window: str) -> None:
    settings = tunnel.Settings(
        initial_stream_window=0 if window in ("stream", "both") else 4 * 1024 * KiB,
        connection_window=0 if window in ("connection", "both") else 16 * 1024 * KiB,
    )
    payload = bytes(range(256)) * 1024  # 256 KiB
    with trio.fail_after(10):
        async with connected(server_settings=settings) as (client, server), trio.open_nursery() as nursery:
            s = await client.open_stream()

            async def send() -> None:
                await s.send_all(payload)
                await s.send_eof()

            nursery.start_soon(send)
            r = await server.accept_stream()
            await trio.testing.wait_all_tasks_blocked()
            assert r.statistics().bytes_received == 0  # nothing moves before the consumer asks
            got = bytearray()
            while chunk := await r.receive_some(16 * KiB):
                got += chunk
                assert r.statistics().buffered == 0  # it sent no more than was asked for
            assert got == payload


async def test_window_0_carries_records() -> None:
    settings = tunnel.Settings(initial_stream_window=0)
    with trio.fail_after(10):
        async with connected(server_settings=settings) as (client, server), trio.open_nursery() as nursery:
            s = await client.open_stream(kind=tunnel.StreamKind.MEMORY)

            async def send() -> None:
                for i in range(3):
                    await s.send_pages(region=0, page_size=4096, addresses=(i * 4096,), data=bytes([i]) * 4096)
                await s.send_eof()

            nursery.start_soon(send)
            r = await server.accept_stream()
            got = []
            while record := await r.receive_record():
                assert isinstance(record, PagesRecord)
                got.append((record.addresses, bytes(record.data)))
            assert got == [((i * 4096,), bytes([i]) * 4096) for i in range(3)]


async def test_window_0_serves_several_waiting_streams() -> None:
    """Each stream's grant brings its own connection credit: the peer cannot spend
    one stream's request on another and leave the first waiting."""
    settings = tunnel.Settings(initial_stream_window=0, connection_window=0)
    with trio.fail_after(10):
        async with connected(server_settings=settings) as (client, server), trio.open_nursery() as nursery:
            streams = [await client.open_stream() for _ in range(3)]
            for i, s in enumerate(streams):
                nursery.start_soon(s.send_all, bytes([i]) * 64 * KiB)
            received = [await server.accept_stream() for _ in streams]
            got: dict[int, int] = {}

            async def drain(r: TunnelStream, i: int) -> None:
                total = 0
                while total < 64 * KiB:
                    chunk = await r.receive_some(8 * KiB)
                    assert chunk == bytes([i]) * len(chunk)
                    total += len(chunk)
                got[i] = total

            async with trio.open_nursery() as readers:
                for i, r in enumerate(received):
                    readers.start_soon(drain, r, i)
            assert got == {0: 64 * KiB, 1: 64 * KiB, 2: 64 * KiB}
