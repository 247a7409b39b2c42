"""ITERATION marks and zstd-compressed pages through the trio layer.

Iteration records round trip over real sockets; compression is negotiated
(a peer without zstd is simulated with ``open_connection(compression=False)``),
used only when it pays, transparent to the reader, and counted in the
statistics.  A misbehaving peer is a real sans-I/O core driven by hand: what
it sends that does not decompress aborts that stream only, and a ZSTD_PAGES
that was never negotiated ends the connection.  Nothing here measures time.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager

import pytest
import trio
import trio.testing
import zstandard
from conftest import TRANSPORTS, memory_pair, tcp_pair, unix_pair

import tunnel
from tunnel import DigestAlgorithm, ErrorCode, Feature, Settings
from tunnel._frames import ZstdPages, encode
from tunnel.transport import (
    IterationRecord,
    PagesRecord,
    StreamStatistics,
    TunnelConnection,
    ZeroPagesRecord,
    open_connection,
)
from tunnel.transport._compress import (
    COMPRESS_THREAD_MIN,
    DECOMPRESS_THREAD_MIN,
    MAX_WINDOW,
    CompressionError,
    PageCompressor,
    PageDecompressor,
)

KiB = 1024
MiB = 1024 * 1024
PAGE = 4096


def compressible(pages: int) -> bytes:
    """Page contents that compress well, each page different (like text or code in guest RAM)."""
    return b"".join((f"page {i:08d}: the quick brown fox jumps over the lazy dog. ".encode() * 80)[:PAGE] for i in range(pages))


def batch(data: bytes, *, base: int = 0, region: int = 0) -> PagesRecord:
    n = len(data) // PAGE
    return PagesRecord(region=region, page_size=PAGE, addresses=tuple(base + i * PAGE for i in range(n)), data=data)


def plain(record: object) -> object:
    """*record* with its data as bytes, for comparison."""
    if isinstance(record, PagesRecord):
        return PagesRecord(region=record.region, page_size=record.page_size, addresses=record.addresses, data=bytes(record.data))
    return record


@asynccontextmanager
async def pair(
    transport: Callable[[], AbstractAsyncContextManager[tuple[trio.abc.Stream, trio.abc.Stream]]] = memory_pair,
    *,
    client_compression: bool | None = None,
    server_compression: bool | None = None,
    server_settings: Settings | None = None,
) -> AsyncIterator[tuple[TunnelConnection, TunnelConnection]]:
    """Two connected tunnel connections, each with its own compression option."""
    ready = trio.Event()
    done = trio.Event()
    box: dict[str, TunnelConnection] = {}
    async with transport() as (a, b), trio.open_nursery() as nursery:

        async def server() -> None:
            async with open_connection(b, client=False, compression=server_compression, settings=server_settings) as conn:
                box["server"] = conn
                ready.set()
                await done.wait()

        nursery.start_soon(server)
        async with open_connection(a, client=True, compression=client_compression) as client:
            await ready.wait()
            try:
                yield client, box["server"]
            finally:
                done.set()


async def send_and_receive(
    client: TunnelConnection, server: TunnelConnection, records: list[PagesRecord], *, compress: bool
) -> tuple[list[object], StreamStatistics, StreamStatistics]:
    """Send *records* on a new stream, read them back; (records read, sender stats, receiver stats)."""
    got: list[object] = []
    out = await client.open_stream(kind=tunnel.StreamKind.MEMORY, compress=compress)
    async with trio.open_nursery() as nursery:

        async def read() -> None:
            s = await server.accept_stream()
            while (r := await s.receive_record()) != b"":
                got.append(plain(r))
            box.append(s.statistics())

        box: list[StreamStatistics] = []
        nursery.start_soon(read)
        for record in records:
            await out.send_record(record)
        await out.send_eof()
    return got, out.statistics(), box[0]


# ---------------------------------------------------------------------------
# ITERATION


@pytest.mark.parametrize("name", ["memory", "tcp", "unix"])
async def test_iteration_records_round_trip(name: str) -> None:
    pages = os.urandom(2 * PAGE)
    with trio.fail_after(10):
        async with pair(TRANSPORTS[name]) as (client, server):
            out = await client.open_stream(kind=tunnel.StreamKind.MEMORY, digest=DigestAlgorithm.SHA256)
            await out.send_iteration(0)
            await out.send_pages(region=0, page_size=PAGE, addresses=(0, PAGE), data=pages)
            await out.send_zero_pages(region=0, page_size=PAGE, runs=((2 * PAGE, 10),))
            await out.send_iteration(1)
            await out.send_pages(region=0, page_size=PAGE, addresses=(PAGE,), data=pages[PAGE:])
            await out.send_iteration(2**32 - 1, final=True)
            await out.send_eof()
            s = await server.accept_stream()
            got = []
            while (r := await s.receive_record()) != b"":
                got.append(plain(r))
    assert got == [
        IterationRecord(iteration=0, final=False),
        PagesRecord(region=0, page_size=PAGE, addresses=(0, PAGE), data=pages),
        ZeroPagesRecord(region=0, page_size=PAGE, runs=((2 * PAGE, 10),)),
        IterationRecord(iteration=1),
        PagesRecord(region=0, page_size=PAGE, addresses=(PAGE,), data=pages[PAGE:]),
        IterationRecord(iteration=2**32 - 1, final=True),
    ]


def test_the_transport_records_are_the_core_records() -> None:
    """One record type from reader to writer: the trio layer re-exports the core's."""
    for name in ("PagesRecord", "ZeroPagesRecord", "DeviceStateRecord", "IterationRecord", "ZstdPagesRecord"):
        assert getattr(tunnel.transport, name) is getattr(tunnel, name) is getattr(tunnel._records, name)


async def test_send_record_takes_every_kind_and_bytes() -> None:
    """send_record takes bytes and every typed record; the peer's receive_record
    hands back the same types (a ZstdPagesRecord, decompressed, as a PagesRecord)."""
    pages = compressible(2)
    sent: list[tunnel.transport.Record | tunnel.ZstdPagesRecord] = [
        b"opaque bytes",
        tunnel.IterationRecord(iteration=3),
        batch(pages),
        tunnel.ZeroPagesRecord(region=0, page_size=PAGE, runs=((0, 4),)),
        tunnel.DeviceStateRecord(name="cpu0", version=2, data=b"regs"),
        tunnel.ZstdPagesRecord(region=0, page_size=PAGE, addresses=(0, PAGE), compressed=zstandard.compress(pages)),
    ]
    with trio.fail_after(10):
        async with pair() as (client, server):
            out = await client.open_stream()
            for record in sent:
                await out.send_record(record)
            await out.send_eof()
            s = await server.accept_stream()
            got = []
            while (r := await s.receive_record()) != b"":
                got.append(plain(r))
    assert got == [plain(r) for r in sent[:5]] + [plain(batch(pages))]
    assert [type(r) for r in got[1:]] == [
        tunnel.IterationRecord, tunnel.PagesRecord, tunnel.ZeroPagesRecord, tunnel.DeviceStateRecord, tunnel.PagesRecord
    ]


async def test_iteration_counts_in_flow_control_and_statistics() -> None:
    with trio.fail_after(10):
        async with pair() as (client, server):
            out = await client.open_stream()
            for i in range(3):
                await out.send_iteration(i, final=i == 2)
            s = await server.accept_stream()
            assert out.statistics().bytes_sent == 24
            await trio.testing.wait_all_tasks_blocked()
            assert s.statistics().buffered == 24  # held until taken
            assert await s.receive_record() == IterationRecord(iteration=0)
            assert s.statistics().buffered == 16


async def test_receive_some_refuses_an_iteration_like_any_typed_record() -> None:
    with trio.fail_after(10):
        async with pair() as (client, server):
            out = await client.open_stream()
            await out.send_all(b"qemu")
            await out.send_iteration(3)
            await out.send_all(b"more")
            s = await server.accept_stream()
            assert await s.receive_some() == b"qemu"
            with pytest.raises(tunnel.TunnelError, match="IterationRecord.*receive_record"):
                await s.receive_some()
            # Nothing was lost: the record is still next.
            assert await s.receive_record() == IterationRecord(iteration=3)
            assert await s.receive_some() == b"more"


async def test_send_iteration_out_of_range_fails_that_send_only() -> None:
    with trio.fail_after(10):
        async with pair() as (client, server):
            out = await client.open_stream()
            with pytest.raises(tunnel.LocalProtocolError):
                await out.send_iteration(2**32)
            await out.send_iteration(5)
            s = await server.accept_stream()
            assert await s.receive_record() == IterationRecord(iteration=5)


# ---------------------------------------------------------------------------
# Negotiation


@pytest.mark.parametrize("client_side", [None, True, False])
@pytest.mark.parametrize("server_side", [None, True, False])
async def test_compression_is_negotiated(client_side: bool | None, server_side: bool | None) -> None:
    with trio.fail_after(10):
        async with pair(client_compression=client_side, server_compression=server_side) as (client, server):
            advertised = {"client": client_side is not False, "server": server_side is not False}  # zstandard is installed
            assert bool(server.peer_settings.features & Feature.ZSTD) == advertised["client"]
            assert bool(client.peer_settings.features & Feature.ZSTD) == advertised["server"]
            expected = advertised["client"] and advertised["server"]
            assert client.compression == server.compression == expected
            out = await client.open_stream(compress=True)
            assert out.compress == expected
            # Either way, pages arrive as they were sent.
            data = compressible(8)
            await out.send_record(batch(data))
            s = await server.accept_stream()
            assert plain(await s.receive_record()) == batch(data)
            stats = out.statistics()
            assert stats.pages_raw_bytes == len(data)
            assert (stats.pages_wire_bytes < len(data)) == expected


async def test_compression_option_overrides_the_settings_bit() -> None:
    with trio.fail_after(10):
        zstd_settings = Settings(features=Feature.DIGEST_SHA256 | Feature.ZSTD)
        async with pair(server_compression=False, server_settings=zstd_settings) as (client, server):
            assert not client.peer_settings.features & Feature.ZSTD
            assert client.peer_settings.features & Feature.DIGEST_SHA256  # the rest of the settings is kept
            assert not server.compression


# ---------------------------------------------------------------------------
# Sending: compressed only when asked, negotiated, and paying


@pytest.mark.parametrize("name", ["memory", "tcp", "unix"])
async def test_compressible_pages_go_compressed_and_arrive_identical(name: str) -> None:
    records = [batch(compressible(16), base=i * 16 * PAGE) for i in range(4)]
    raw = sum(len(r.data) for r in records)
    with trio.fail_after(20):
        async with pair(TRANSPORTS[name]) as (client, server):
            got, sent, received = await send_and_receive(client, server, records, compress=True)
            assert server.statistics().buffered == 0
    assert got == records
    assert sent.pages_raw_bytes == raw
    assert sent.pages_wire_bytes <= 0.2 * raw  # this text compresses far better than the 90% rule needs
    # Flow control counted the compressed wire payload on both sides, not the pages.
    wire = sum(16 + 8 * len(r.addresses) for r in records) + sent.pages_wire_bytes
    assert sent.bytes_sent == received.bytes_received == wire


async def test_incompressible_pages_go_uncompressed() -> None:
    records = [batch(os.urandom(8 * PAGE)), batch(os.urandom(PAGE))]
    raw = sum(len(r.data) for r in records)
    with trio.fail_after(10):
        async with pair() as (client, server):
            got, sent, received = await send_and_receive(client, server, records, compress=True)
    assert got == records
    assert sent.pages_raw_bytes == sent.pages_wire_bytes == raw
    assert sent.bytes_sent == received.bytes_received == raw + sum(16 + 8 * len(r.addresses) for r in records)


async def test_nothing_is_compressed_unless_the_stream_asks() -> None:
    records = [batch(compressible(8))]
    with trio.fail_after(10):
        async with pair() as (client, server):
            assert client.compression
            got, sent, _ = await send_and_receive(client, server, records, compress=False)
    assert got == records
    assert sent.pages_raw_bytes == sent.pages_wire_bytes == 8 * PAGE


async def test_mixed_batches_and_large_batches_use_the_worker_thread() -> None:
    """A ~1 MiB batch is compressed and decompressed in a thread; small and
    incompressible batches around it keep their order."""
    big = compressible(255)  # the most 4 KiB pages one 1 MiB frame holds
    assert len(big) >= max(COMPRESS_THREAD_MIN, DECOMPRESS_THREAD_MIN)
    records = [batch(compressible(1)), batch(big, base=MiB), batch(os.urandom(4 * PAGE), base=4 * MiB), batch(compressible(2))]
    with trio.fail_after(20):
        async with pair(tcp_pair) as (client, server):
            got, sent, _ = await send_and_receive(client, server, records, compress=True)
    assert got == records
    assert sent.pages_raw_bytes == sum(len(r.data) for r in records)
    assert sent.pages_wire_bytes < sent.pages_raw_bytes - len(big) // 2


async def test_zero_page_batches_and_empty_batches_are_fine_with_compress() -> None:
    records = [PagesRecord(region=0, page_size=PAGE, addresses=(), data=b""), batch(bytes(4 * PAGE))]
    with trio.fail_after(10):
        async with pair() as (client, server):
            got, sent, _ = await send_and_receive(client, server, records, compress=True)
    assert got == records
    assert sent.pages_raw_bytes == 4 * PAGE and sent.pages_wire_bytes < PAGE


async def test_batches_must_fit_uncompressed() -> None:
    with trio.fail_after(10):
        async with pair() as (client, _server):
            out = await client.open_stream(compress=True)
            too_big = bytes(client.peer_settings.max_frame_size)  # plus the head: over the frame limit
            with pytest.raises(tunnel.FrameTooLargeError):
                await out.send_record(batch(too_big))


# ---------------------------------------------------------------------------
# A peer that sends bad ZSTD_PAGES: a sans-I/O core driven by hand


async def _fake_peer(transport: trio.abc.Stream, *, features: int) -> tunnel.Connection:
    core = tunnel.Connection(client=True, settings=Settings(features=features))
    await transport.send_all(core.bytes_to_send())
    while core.state is tunnel.ConnectionState.HANDSHAKE:
        data = await transport.receive_some(64 * KiB)
        assert data, "the peer closed during the handshake"
        core.receive_data(data)
    return core


async def _fake_events(transport: trio.abc.Stream, core: tunnel.Connection, done: Callable[[list[tunnel.Event]], bool]) -> list[tunnel.Event]:
    events: list[tunnel.Event] = []
    while not done(events):
        data = await transport.receive_some(64 * KiB)
        if not data:
            break
        events += core.receive_data(data)
        if core.pending_output:  # pongs and window updates
            await transport.send_all(core.bytes_to_send())
    return events


@asynccontextmanager
async def fake_peer_and_server(
    features: int = Feature.DIGEST_SHA256 | Feature.ZSTD, **server_kwargs: object
) -> AsyncIterator[tuple[trio.abc.Stream, tunnel.Connection, TunnelConnection]]:
    """(the fake peer's transport, its core, the real server) over a unix socket pair, handshakes done."""
    cores: list[tunnel.Connection] = []
    shaken = trio.Event()
    async with unix_pair() as (a, b), trio.open_nursery() as nursery:

        async def handshake() -> None:
            cores.append(await _fake_peer(a, features=features))
            shaken.set()

        nursery.start_soon(handshake)
        async with open_connection(b, client=False, **server_kwargs) as server:  # type: ignore[arg-type]
            await shaken.wait()
            yield a, cores[0], server


def _zstd(data: bytes, *, content_size: bool = True) -> bytes:
    return zstandard.ZstdCompressor(level=1, write_content_size=content_size).compress(data)


GOOD = compressible(2)
BAD_FRAMES = {
    "not-zstd": b"this is not a zstd frame",
    "truncated": _zstd(GOOD)[:-3],
    "trailing-bytes": _zstd(GOOD) + b"\0",
    "two-frames": _zstd(GOOD[:PAGE]) + _zstd(GOOD[PAGE:]),
    "content-size-too-big": _zstd(GOOD + b"x"),
    "content-size-too-small": _zstd(GOOD[:-1]),
    "no-size-decompresses-to-more": _zstd(GOOD + GOOD, content_size=False),
    "no-size-decompresses-to-less": _zstd(GOOD[:PAGE], content_size=False),
    "skippable-frame": b"\x50\x2a\x4d\x18" + len(GOOD).to_bytes(4, "little") + GOOD,
    "corrupt-block": _zstd(GOOD)[:12] + bytes(len(_zstd(GOOD)) - 12),
}


@pytest.mark.parametrize("bad", list(BAD_FRAMES))
async def test_bad_compressed_pages_abort_the_stream_only(bad: str) -> None:
    """Records before the bad one are delivered; then that stream is aborted with
    PROTOCOL_ERROR on both sides, its credit comes back, and the connection lives on."""
    with trio.fail_after(10):
        async with fake_peer_and_server() as (a, core, server), trio.open_nursery() as nursery:
            sid = core.open_stream(digest=DigestAlgorithm.CRC32)
            core.send_iteration(sid, 0)
            core.send_zstd_pages(sid, region=0, page_size=PAGE, addresses=(0, PAGE), compressed=_zstd(GOOD))
            core.send_zstd_pages(sid, region=0, page_size=PAGE, addresses=(0, PAGE), compressed=BAD_FRAMES[bad])
            core.send_iteration(sid, 1)
            await a.send_all(core.bytes_to_send())
            s = await server.accept_stream()
            assert await s.receive_record() == IterationRecord(iteration=0)
            assert plain(await s.receive_record()) == batch(GOOD)
            with pytest.raises(tunnel.StreamAborted) as info:
                await s.receive_record()
            assert info.value.error_code == ErrorCode.PROTOCOL_ERROR and not info.value.remote
            events = await _fake_events(a, core, lambda evs: any(isinstance(e, tunnel.StreamReset) for e in evs))
            [reset] = [e for e in events if isinstance(e, tunnel.StreamReset)]
            assert (reset.stream_id, reset.error_code, reset.remote) == (sid, ErrorCode.PROTOCOL_ERROR, True)
            assert "ZSTD_PAGES" in reset.reason
            # The connection lives on, and holds nothing for the aborted stream.
            nursery.start_soon(_fake_events, a, core, lambda evs: False)
            await server.ping()
            assert server.statistics().buffered == 0  # all of it acknowledged, the aborted record too
            nursery.cancel_scope.cancel()


async def test_pages_above_the_expansion_limit_abort_the_stream() -> None:
    with trio.fail_after(10):
        async with fake_peer_and_server(settings=Settings(max_frame_size=16 * KiB)) as (a, core, server):
            sid = core.open_stream()
            frame = ZstdPages(stream_id=sid, region=0, page_size=2 * MiB, addresses=(0,), compressed=_zstd(bytes(2 * MiB)))
            await a.send_all(core.bytes_to_send() + encode(frame))
            s = await server.accept_stream()
            with pytest.raises(tunnel.StreamAborted) as info:
                await s.receive_record()
            assert info.value.error_code == ErrorCode.PROTOCOL_ERROR
            assert server.statistics().buffered == 0


async def test_zstd_pages_without_the_feature_end_the_connection() -> None:
    """The receiver did not advertise ZSTD (a peer without zstandard): a ZSTD_PAGES
    from a peer that sends it anyway is a connection error, GOODBYE PROTOCOL_ERROR."""
    with trio.fail_after(10):
        async with fake_peer_and_server(compression=False) as (a, core, server):
            assert not core.features & Feature.ZSTD
            sid = core.open_stream()
            frame = ZstdPages(stream_id=sid, region=0, page_size=PAGE, addresses=(0,), compressed=_zstd(bytes(PAGE)))
            await a.send_all(core.bytes_to_send() + encode(frame))
            events = await _fake_events(a, core, lambda evs: any(isinstance(e, tunnel.ConnectionTerminated) for e in evs))
            [goodbye] = [e for e in events if isinstance(e, tunnel.ConnectionTerminated)]
            assert goodbye.error_code == ErrorCode.PROTOCOL_ERROR and "ZSTD" in goodbye.reason
            with pytest.raises(tunnel.ConnectionLost):
                await server.accept_stream()


async def test_stream_closed_while_a_record_is_decompressed_in_a_thread() -> None:
    """aclose() from another task during a threaded decompression: the receive
    raises ClosedResourceError and the pooled buffer is not reused under the thread."""
    big = compressible(255)  # the most 4 KiB pages one 1 MiB frame holds
    with trio.fail_after(10):
        async with pair(unix_pair) as (client, server):
            out = await client.open_stream(compress=True)
            await out.send_record(batch(big))
            await out.send_record(batch(big, base=MiB))
            s = await server.accept_stream()
            async with trio.open_nursery() as nursery:
                outcome: list[object] = []

                async def receive() -> None:
                    try:
                        outcome.append(plain(await s.receive_record()))
                    except trio.ClosedResourceError as exc:
                        outcome.append(exc)

                nursery.start_soon(receive)
                await trio.testing.wait_all_tasks_blocked()
                await s.aclose()
            # Either the thread finished first (the record was taken) or the close won.
            assert outcome == [batch(big)] or isinstance(outcome[0], trio.ClosedResourceError)
            assert server.statistics().buffered == 0
            # The connection is fine, and the buffers it reads into are intact.
            again = await client.open_stream(compress=True)
            await again.send_record(batch(big))
            s2 = await server.accept_stream()
            assert plain(await s2.receive_record()) == batch(big)


# ---------------------------------------------------------------------------
# The compressor and decompressor on their own


def test_compressor_declines_what_does_not_pay() -> None:
    c = PageCompressor()
    assert c.compress(os.urandom(64 * KiB)) is None
    packed = c.compress(compressible(16))
    assert packed is not None and len(packed) < 16 * PAGE // 5
    assert zstandard.get_frame_parameters(packed).content_size == 16 * PAGE
    assert PageDecompressor().decompress(packed, 16 * PAGE) == compressible(16)


def test_decompressor_refusals() -> None:
    d = PageDecompressor()
    for name, frame in BAD_FRAMES.items():
        with pytest.raises(CompressionError):
            d.decompress(frame, len(GOOD))
        assert d.decompress(_zstd(GOOD), len(GOOD)) == GOOD, name  # still usable afterwards
    # Frames made with a dictionary: one that names it is refused as such, a raw one is just corrupt.
    samples: list[bytes | bytearray | memoryview] = [f"record {i} name=dev{i % 7} value={i * 31 % 1000} ".encode() * 8 for i in range(1000)]
    trained = zstandard.train_dictionary(2048, samples)
    with_dict = zstandard.ZstdCompressor(level=1, dict_data=trained).compress(b"".join(samples[:10]))
    assert zstandard.get_frame_parameters(with_dict).dict_id == trained.dict_id() != 0
    with pytest.raises(CompressionError, match="dictionary"):
        d.decompress(with_dict, len(b"".join(samples[:10])))
    raw_dict = zstandard.ZstdCompressionDict(compressible(4), dict_type=zstandard.DICT_TYPE_RAWCONTENT)
    with pytest.raises(CompressionError):
        d.decompress(zstandard.ZstdCompressor(level=1, dict_data=raw_dict).compress(GOOD), len(GOOD))
    # A window above 8 MiB (protocol.md §4.17).
    size = 2 * MAX_WINDOW + PAGE
    params = zstandard.ZstdCompressionParameters.from_level(1, window_log=(2 * MAX_WINDOW).bit_length() - 1)
    wide = zstandard.ZstdCompressor(compression_params=params).compress(bytes(size))
    assert zstandard.get_frame_parameters(wide).window_size > MAX_WINDOW
    with pytest.raises(CompressionError):
        d.decompress(wide, size)
    # Empty pages: an empty frame, with or without its content size.
    assert d.decompress(_zstd(b""), 0) == b""
    assert d.decompress(_zstd(b"", content_size=False), 0) == b""
