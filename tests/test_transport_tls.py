"""TLSStream: trio's generic stream checks, mutual TLS, errors, and big transfers through worker threads."""

from __future__ import annotations

import os
import ssl

import pytest
import trio
import trio.testing
from conftest import mutual_tls_contexts, tcp_pair, unix_pair
from trio.testing import check_two_way_stream

from tunnel.transport import TLSStream, _tls


def _memory_tls_pair(
    make: object = trio.testing.memory_stream_pair, offload_min: int | None = None
) -> tuple[TLSStream, TLSStream]:
    client_ctx, server_ctx = mutual_tls_contexts()
    a, b = make()  # type: ignore[operator]
    return (
        TLSStream(a, client_ctx, server_hostname="tunnel.test", offload_min=offload_min),
        TLSStream(b, server_ctx, server_side=True, offload_min=offload_min),
    )


@pytest.mark.parametrize("offload_min", [None, 1], ids=["inline", "threads"])
async def test_check_two_way_stream_in_memory(offload_min: int | None) -> None:
    async def maker() -> tuple[TLSStream, TLSStream]:
        return _memory_tls_pair(offload_min=offload_min)

    async def clogged_maker() -> tuple[TLSStream, TLSStream]:
        # Handshake first, as trio's own SSLStream test does: otherwise the
        # receive that should unclog the peer starts a handshake and waits too.
        client, server = _memory_tls_pair(trio.testing.lockstep_stream_pair, offload_min)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.do_handshake)
            nursery.start_soon(server.do_handshake)
        return client, server

    await check_two_way_stream(maker, clogged_maker)


@pytest.mark.parametrize("pair", [tcp_pair, unix_pair], ids=["tcp", "unix"])
async def test_check_two_way_stream_over_sockets(pair: object) -> None:
    client_ctx, server_ctx = mutual_tls_contexts()
    opened = []

    async def maker() -> tuple[TLSStream, TLSStream]:
        cm = pair()  # type: ignore[operator]
        a, b = await cm.__aenter__()
        opened.append(cm)
        return TLSStream(a, client_ctx, server_hostname="tunnel.test"), TLSStream(b, server_ctx, server_side=True)

    try:
        await check_two_way_stream(maker, None)
    finally:
        for cm in opened:
            await cm.__aexit__(None, None, None)


async def _handshake(client: TLSStream, server: TLSStream) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client.do_handshake)
        nursery.start_soon(server.do_handshake)


async def test_mutual_tls_identity_and_cipher() -> None:
    client, server = _memory_tls_pair()
    await _handshake(client, server)
    subject = dict(rdn[0] for rdn in server.getpeercert()["subject"])
    assert subject["commonName"] == "client.test"
    assert client.cipher() == server.cipher()
    assert "GCM" in client.cipher()[0]  # type: ignore[index]
    assert client.version() == "TLSv1.3"


async def test_tls12_prefers_aes_128_gcm() -> None:
    client_ctx, server_ctx = mutual_tls_contexts()
    client_ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    a, b = trio.testing.memory_stream_pair()
    client = TLSStream(a, client_ctx, server_hostname="tunnel.test")
    server = TLSStream(b, server_ctx, server_side=True)
    await _handshake(client, server)
    assert client.cipher()[0].endswith("AES128-GCM-SHA256")  # type: ignore[index]


async def test_server_refuses_a_client_without_certificate() -> None:
    _, server_ctx = mutual_tls_contexts()
    bare = ssl.create_default_context()
    bare.check_hostname = False
    bare.verify_mode = ssl.CERT_NONE
    a, b = trio.testing.memory_stream_pair()
    client = TLSStream(a, bare, server_hostname="tunnel.test")
    server = TLSStream(b, server_ctx, server_side=True)

    async def serve() -> None:
        with pytest.raises(trio.BrokenResourceError) as info:
            await server.do_handshake()
        assert isinstance(info.value.__cause__, ssl.SSLError)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve)
        # TLS 1.3: the client finishes its side first and hears of the refusal on its first read.
        with pytest.raises(trio.BrokenResourceError) as info:
            await client.do_handshake()
            await client.receive_some(1)
        assert isinstance(info.value.__cause__, ssl.SSLError)


async def test_client_checks_the_server_name() -> None:
    client_ctx, server_ctx = mutual_tls_contexts()
    a, b = trio.testing.memory_stream_pair()
    client = TLSStream(a, client_ctx, server_hostname="elsewhere.test")
    server = TLSStream(b, server_ctx, server_side=True)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.testing.wait_all_tasks_blocked)

        async def serve() -> None:
            with pytest.raises(trio.BrokenResourceError):
                await server.do_handshake()

        nursery.start_soon(serve)
        with pytest.raises(trio.BrokenResourceError) as info:
            await client.do_handshake()
        assert isinstance(info.value.__cause__, ssl.SSLCertVerificationError)
        # once broken, always broken
        with pytest.raises(trio.BrokenResourceError):
            await client.send_all(b"x")


async def test_transport_end_without_close_notify_is_broken() -> None:
    client, server = _memory_tls_pair()
    await _handshake(client, server)
    await client.transport_stream.aclose()  # no close_notify
    with pytest.raises(trio.BrokenResourceError):
        await server.receive_some(10)


async def test_tampered_record_is_broken() -> None:
    client_ctx, server_ctx = mutual_tls_contexts()
    async with tcp_pair() as (a, b):
        client = TLSStream(a, client_ctx, server_hostname="tunnel.test")
        server = TLSStream(b, server_ctx, server_side=True)
        await _handshake(client, server)
        # A record whose ciphertext was changed on the way.
        client._ssl.write(b"hello")
        record = bytearray(client._outgoing.read())
        record[-1] ^= 1
        await a.send_all(record)
        with pytest.raises(trio.BrokenResourceError) as info:
            await server.receive_some(10)
        assert isinstance(info.value.__cause__, ssl.SSLError)


@pytest.mark.parametrize("size", [1, 70_000, 5 * 1024 * 1024 + 3])
async def test_big_transfer_both_ways_at_once(size: int) -> None:
    """Writes of every size, both directions at once: the crypto lock and the ciphertext order hold."""
    data = os.urandom(size)
    client_ctx, server_ctx = mutual_tls_contexts()
    async with tcp_pair() as (a, b):
        client = TLSStream(a, client_ctx, server_hostname="tunnel.test")
        server = TLSStream(b, server_ctx, server_side=True)

        async def send(stream: TLSStream) -> None:
            for piece in (data[: size // 3], data[size // 3 :]):
                await stream.send_all(piece)

        async def receive(stream: TLSStream, out: bytearray, into: bool) -> None:
            buf = bytearray(300_000)
            while len(out) < size:
                if into:
                    n = await stream.receive_into(buf)
                    out += buf[:n]
                else:
                    out += await stream.receive_some()

        got_client, got_server = bytearray(), bytearray()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(send, client)
            nursery.start_soon(send, server)
            nursery.start_soon(receive, client, got_client, False)
            nursery.start_soon(receive, server, got_server, True)
        assert got_client == data
        assert got_server == data
        await client.aclose()
        assert await server.receive_some() == b""
        await server.aclose()


def _count_threads(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    threads: list[int] = []
    real = trio.to_thread.run_sync

    async def counting(*args: object, **kwargs: object) -> object:
        threads.append(1)
        return await real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(_tls.trio.to_thread, "run_sync", counting)
    return threads


async def test_by_default_every_pass_runs_inline(monkeypatch: pytest.MonkeyPatch) -> None:
    threads = _count_threads(monkeypatch)
    client, server = _memory_tls_pair()
    await _handshake(client, server)
    data = os.urandom(_tls.WRITE_CHUNK * 3)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client.send_all, data)
        got = bytearray()
        while len(got) < len(data):
            got += await server.receive_some()
    assert got == data
    assert not threads


async def test_big_passes_run_in_worker_threads_with_offload_min(monkeypatch: pytest.MonkeyPatch) -> None:
    threads = _count_threads(monkeypatch)
    client_ctx, server_ctx = mutual_tls_contexts()
    a, b = trio.testing.memory_stream_pair()
    client = TLSStream(a, client_ctx, server_hostname="tunnel.test", offload_min=_tls.THREAD_MIN)
    server = TLSStream(b, server_ctx, server_side=True, offload_min=_tls.THREAD_MIN)
    await _handshake(client, server)
    await client.send_all(b"small")
    assert await server.receive_some() == b"small"
    assert not threads  # small passes run inline
    data = os.urandom(_tls.THREAD_MIN * 4)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client.send_all, data)
        got = bytearray()
        while len(got) < len(data):
            got += await server.receive_some()
    assert got == data
    assert len(threads) >= 2  # the encryption and at least one decryption pass


class _CountingStream(trio.abc.Stream):
    """A transport that counts its writes."""

    def __init__(self, inner: trio.abc.Stream) -> None:
        self.inner = inner
        self.writes = 0

    async def send_all(self, data: object) -> None:
        self.writes += 1
        await self.inner.send_all(data)  # type: ignore[arg-type]

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self.inner.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self.inner.aclose()


async def test_send_all_parts_is_one_pass_and_one_write() -> None:
    """A header and its payload leave in one transport write, and arrive as their concatenation."""
    client_ctx, server_ctx = mutual_tls_contexts()
    a, b = trio.testing.memory_stream_pair()
    counting = _CountingStream(a)
    client = TLSStream(counting, client_ctx, server_hostname="tunnel.test")
    server = TLSStream(b, server_ctx, server_side=True)
    await _handshake(client, server)
    header, payload = b"H" * 9, os.urandom(_tls.WRITE_CHUNK)
    got = bytearray()

    async def read_all(size: int) -> None:
        while len(got) < size:
            got.extend(await server.receive_some())

    with trio.fail_after(30):
        before = counting.writes
        async with trio.open_nursery() as nursery:
            nursery.start_soon(read_all, len(header) + len(payload))
            await client.send_all_parts([header, memoryview(payload)])
        assert counting.writes - before == 1
        assert got == header + payload
        # Three pieces over two passes' worth: still in order, in two writes.
        got.clear()
        before = counting.writes
        big = os.urandom(3 * _tls.WRITE_CHUNK // 2)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(read_all, len(header) + 2 * len(big))
            await client.send_all_parts([header, big, big])
        assert counting.writes - before == 2
        assert got == header + big + big
