"""The memory-image reader and writer: exact round trips, zero pages, sparse files, digests, failures."""

from __future__ import annotations

import errno
import os
import random
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.lowlevel
import trio.testing
from conftest import connected
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_endpoints_support import PAGE, leftovers, make_image, migrate, read_file

from tunnel import DigestAlgorithm, ErrorCode, Settings, StreamAborted
from tunnel.endpoints import (
    DirtyTracker,
    EndpointError,
    MemoryImageReader,
    MemoryImageWriter,
    Progress,
    SourceRecord,
    TransferResult,
    image_digest,
    receive_into,
    send_from,
)
from tunnel.transport import IterationRecord, PagesRecord, ZeroPagesRecord

MiB = 1024 * 1024

# What a page can be: a hole, allocated zeros, random data, one repeated byte,
# or zeros with a single non-zero byte somewhere (zero detection must see it).
_KINDS = ["hole", "zero", "random", "pattern", "one-byte"]


def _page(kind: str, seed: int) -> bytes | None:
    rng = random.Random(seed)
    if kind == "hole":
        return None
    if kind == "zero":
        return bytes(PAGE)
    if kind == "random":
        return rng.randbytes(PAGE)
    if kind == "pattern":
        return bytes([rng.randrange(1, 256)]) * PAGE
    page = bytearray(PAGE)
    page[rng.randrange(PAGE)] = rng.randrange(1, 256)
    return bytes(page)


_pages = st.lists(st.tuples(st.sampled_from(_KINDS), st.integers(0, 2**32)), min_size=1, max_size=48).map(
    lambda spec: [_page(kind, seed) for kind, seed in spec]
)
_SMALL = Settings(initial_stream_window=64 * 1024, connection_window=128 * 1024, max_frame_size=16 * 1024)


def _ok(outcome: Any) -> tuple[TransferResult, TransferResult]:
    assert isinstance(outcome.source, TransferResult), repr(outcome.source)
    assert isinstance(outcome.destination, TransferResult), repr(outcome.destination)
    return outcome.source, outcome.destination


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(
    pages=_pages,
    batch=st.sampled_from([1, 3, 8, 128]),
    digest=st.sampled_from(list(DigestAlgorithm)),
    small=st.booleans(),
    compress=st.booleans(),
)
def test_image_round_trip(
    tmp_path: Path, pages: list[bytes | None], batch: int, digest: int, small: bool, compress: bool
) -> None:
    directory = tmp_path / os.urandom(4).hex()
    directory.mkdir()
    source, target = str(directory / "guest.mem"), str(directory / "incoming.mem")
    make_image(source, pages)

    async def main() -> Any:
        reader = MemoryImageReader(source, batch_pages=batch)
        writer = MemoryImageWriter(target)
        options = {"client_settings": _SMALL, "server_settings": _SMALL} if small else {}
        outcome = await migrate(reader, writer, digest=digest, compress=compress, connect_options=options)
        return outcome, writer

    outcome, writer = trio.run(main)
    sent, _ = _ok(outcome)
    assert read_file(target) == read_file(source)
    assert writer.digest() == image_digest(source) and writer.iterations == 1 and writer.final
    data_pages = sum(1 for page in pages if page is not None and any(page))
    # Zero pages never travel as data, holes or not; each data page exactly once.
    assert writer.pages_written == data_pages
    assert sent.progress is not None and sent.progress.pages_sent == data_pages
    assert sent.progress.zero_pages == len(pages) - data_pages
    assert sent.progress.finished and sent.progress.converged is True
    assert leftovers(str(directory)) == []


async def test_sparse_image_costs_only_its_data(tmp_path: Path) -> None:
    # 1 GiB image, 40 data pages: zero pages cost runs, not bytes; the destination stays sparse.
    size_pages = 256 * 1024
    source, target = tmp_path / "big.mem", tmp_path / "big.out"
    fd = os.open(source, os.O_RDWR | os.O_CREAT, 0o644)
    os.ftruncate(fd, size_pages * PAGE)
    rng = random.Random(7)
    for _ in range(40):
        os.pwrite(fd, rng.randbytes(PAGE), rng.randrange(size_pages) * PAGE)
    os.close(fd)
    sent, _ = _ok(await migrate(MemoryImageReader(source), MemoryImageWriter(target)))
    data = 40 * PAGE
    assert sent.payload_bytes < data * 1.1
    assert os.stat(target).st_size == size_pages * PAGE
    assert os.stat(target).st_blocks * 512 <= 2 * data
    assert image_digest(source) == image_digest(target)


class _DirtyAfterFirstPage:
    """Wraps a pre-copy reader; once the first data batch is on the wire, the 'guest' changes it.

    Page 0 is zeroed (the destination must clear what it already wrote) and
    page 1 rewritten, and both are marked dirty, exactly as a running guest would.
    """

    def __init__(self, inner: MemoryImageReader, path: str) -> None:
        self.inner = inner
        self.path = path
        self.stream_kind = inner.stream_kind

    async def _gen(self) -> AsyncIterator[SourceRecord]:
        done = False
        async for record in self.inner.records():
            yield record
            if not done and isinstance(record, PagesRecord):
                done = True
                fd = os.open(self.path, os.O_RDWR)
                os.pwrite(fd, bytes(PAGE), 0)
                os.pwrite(fd, b"\x55" * PAGE, PAGE)
                os.close(fd)
                assert self.inner.tracker is not None
                self.inner.tracker.mark_range(0, 2)

    def records(self) -> AsyncIterator[SourceRecord]:
        return self._gen()

    def progress(self) -> Progress:
        return self.inner.progress()

    async def aclose(self) -> None:
        await self.inner.aclose()


async def test_dirty_pages_resent_and_zeroed_pages_cleared(tmp_path: Path) -> None:
    source, target = str(tmp_path / "g.mem"), str(tmp_path / "g.out")
    make_image(source, [os.urandom(PAGE), os.urandom(PAGE), None, os.urandom(PAGE)])
    tracker = DirtyTracker(4)
    reader = _DirtyAfterFirstPage(MemoryImageReader(source, tracker=tracker), source)
    writer = MemoryImageWriter(target)
    sent, _ = _ok(await migrate(reader, writer))
    assert read_file(target) == read_file(source)
    assert read_file(target)[:PAGE] == bytes(PAGE) and read_file(target)[PAGE : 2 * PAGE] == b"\x55" * PAGE
    assert writer.iterations == 2 and writer.final and writer.pages_zeroed == 1
    assert sent.progress is not None and sent.progress.iteration == 1 and sent.progress.converged


async def test_device_states_travel_in_the_final_pass(tmp_path: Path) -> None:
    source, target = str(tmp_path / "g.mem"), str(tmp_path / "g.out")
    make_image(source, [os.urandom(PAGE), None])
    states = {"cpu0": os.urandom(3000), "virtio-net": b"", "vga": os.urandom(70_000)}
    writer = MemoryImageWriter(target)
    _ok(await migrate(MemoryImageReader(source, device_states=states), writer))
    assert writer.device_states == states


async def test_compression_pays_on_text_and_is_skipped_on_random(tmp_path: Path) -> None:
    text = (b"the quick brown fox jumps over the lazy dog; " * 100)[:PAGE]
    for name, page, compressible in (("text", text, True), ("random", None, False)):
        source, target = str(tmp_path / f"{name}.mem"), str(tmp_path / f"{name}.out")
        make_image(source, [page if page is not None else os.urandom(PAGE) for _ in range(512)])
        sent, _ = _ok(await migrate(MemoryImageReader(source), MemoryImageWriter(target), compress=True))
        stats = sent.statistics
        assert stats.pages_raw_bytes == 512 * PAGE
        if compressible:
            assert stats.pages_wire_bytes < stats.pages_raw_bytes // 4
        else:
            assert stats.pages_wire_bytes == stats.pages_raw_bytes  # incompressible batches go as plain PAGES
        assert read_file(target) == read_file(source)


# ---------------------------------------------------------------------------
# Failures: nothing half-written ever appears under the target name


def _corrupting_pair(marker: bytes, hits: list[int]) -> Callable[[], Any]:
    """A memory transport that flips one bit of the first *marker* it carries from client to server."""

    @asynccontextmanager
    async def pair() -> AsyncIterator[tuple[trio.abc.Stream, trio.abc.Stream]]:
        up_send, up_recv = trio.testing.memory_stream_one_way_pair()
        down_send, down_recv = trio.testing.memory_stream_one_way_pair()

        async def corrupt() -> None:
            data = up_send.get_data_nowait()
            at = data.find(marker)
            if at >= 0 and not hits:
                hits.append(at)
                data = data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1 :]
            up_recv.put_data(data)

        up_send.send_all_hook = corrupt
        yield trio.StapledStream(up_send, down_recv), trio.StapledStream(down_send, up_recv)

    return pair


@pytest.mark.parametrize("digest", [DigestAlgorithm.CRC32, DigestAlgorithm.SHA256])
async def test_digest_mismatch_never_commits(tmp_path: Path, digest: int) -> None:
    marker = b"bit rot happens on the way: " * 8
    page = (marker * 20)[:PAGE]
    source, target = str(tmp_path / "g.mem"), str(tmp_path / "g.out")
    make_image(source, [os.urandom(PAGE), page, None, os.urandom(PAGE)])
    hits: list[int] = []
    writer = MemoryImageWriter(target)
    outcome = await migrate(MemoryImageReader(source), writer, pair=_corrupting_pair(marker, hits), digest=digest)
    assert hits, "the relay did not see the page"
    assert isinstance(outcome.destination, StreamAborted) and outcome.destination.error_code == ErrorCode.DIGEST_MISMATCH
    assert isinstance(outcome.source, StreamAborted) and outcome.source.error_code == ErrorCode.DIGEST_MISMATCH
    assert not writer.committed and not os.path.exists(target) and leftovers(str(tmp_path)) == []


class _QuotaImageWriter(MemoryImageWriter):
    """An image writer on storage that runs out of space part-way."""

    def __init__(self, path: str, quota_pages: int) -> None:
        super().__init__(path)
        self.quota_pages = quota_pages

    async def write(self, record: SourceRecord) -> None:
        if isinstance(record, PagesRecord) and self.pages_written + len(record.addresses) > self.quota_pages:
            raise OSError(errno.ENOSPC, "No space left on device")
        await super().write(record)


async def test_image_writer_failure_reaches_the_source(tmp_path: Path) -> None:
    source, target = str(tmp_path / "g.mem"), str(tmp_path / "g.out")
    make_image(source, [os.urandom(PAGE) for _ in range(1024)])
    writer = _QuotaImageWriter(target, quota_pages=300)
    outcome = await migrate(MemoryImageReader(source), writer)
    assert isinstance(outcome.source, StreamAborted) and outcome.source.remote
    assert "No space left on device" in outcome.source.reason
    assert isinstance(outcome.destination, OSError)
    assert not os.path.exists(target) and leftovers(str(tmp_path)) == []


async def test_size_mismatch_is_refused(tmp_path: Path) -> None:
    source, target = str(tmp_path / "g.mem"), str(tmp_path / "g.out")
    make_image(source, [os.urandom(PAGE)] * 4)
    outcome = await migrate(MemoryImageReader(source), MemoryImageWriter(target, size=8 * PAGE))
    assert isinstance(outcome.destination, EndpointError)
    assert isinstance(outcome.source, StreamAborted) and "expects" in outcome.source.reason
    assert leftovers(str(tmp_path)) == [] and not os.path.exists(target)


async def test_cancelled_image_migration_leaves_no_temporary_file(tmp_path: Path, fd_leak_check: None) -> None:
    source, target = str(tmp_path / "g.mem"), str(tmp_path / "g.out")
    make_image(source, [os.urandom(PAGE) for _ in range(2048)])
    writer = MemoryImageWriter(target)
    seen: dict[str, BaseException] = {}
    with trio.fail_after(60):
        async with connected() as (client, server), trio.open_nursery() as nursery:

            async def destination() -> None:
                try:
                    await receive_into(await server.accept_stream(), writer)
                except StreamAborted as exc:
                    seen["destination"] = exc

            nursery.start_soon(destination)
            with trio.CancelScope() as scope:
                reader = MemoryImageReader(source, batch_pages=16)
                stream = await client.open_stream(kind=reader.stream_kind)

                async def cancel_when_started() -> None:
                    while writer.pages_written < 200:
                        await trio.lowlevel.checkpoint()
                    assert writer.temp_path is not None and os.path.exists(writer.temp_path)
                    scope.cancel()

                nursery.start_soon(cancel_when_started)
                await send_from(reader, stream)
    error = seen["destination"]
    assert scope.cancelled_caught and isinstance(error, StreamAborted) and error.error_code == ErrorCode.CANCEL
    assert not os.path.exists(target) and leftovers(str(tmp_path)) == []


async def test_stream_without_final_iteration_does_not_commit(tmp_path: Path) -> None:
    # A plug-in reader that stops before any stop-and-copy pass: the image writer must not commit it.
    target = str(tmp_path / "g.out")
    from tunnel.endpoints._imagefile import ImageHeader

    class _Truncated:
        stream_kind = 1

        async def _gen(self) -> AsyncIterator[SourceRecord]:
            yield ImageHeader(size=4 * PAGE, page_size=PAGE, region=0).record()
            yield IterationRecord(iteration=0, final=False)
            yield PagesRecord(region=0, page_size=PAGE, addresses=(0,), data=os.urandom(PAGE))
            yield ZeroPagesRecord(region=0, page_size=PAGE, runs=((PAGE, 3),))

        def records(self) -> AsyncIterator[SourceRecord]:
            return self._gen()

        def progress(self) -> Progress:
            return Progress()

        async def aclose(self) -> None:
            await trio.lowlevel.checkpoint()

    outcome = await migrate(_Truncated(), MemoryImageWriter(target))
    assert isinstance(outcome.destination, EndpointError) and "without a final" in str(outcome.destination)
    assert isinstance(outcome.source, StreamAborted)
    assert not os.path.exists(target) and leftovers(str(tmp_path)) == []


async def test_a_writer_sized_by_its_definition_refuses_a_bigger_stream(tmp_path: Path) -> None:
    # The destination sizes the image from its own (checked) definition, never from the peer's header.
    pages = [os.urandom(PAGE) for _ in range(8)]
    source = str(tmp_path / "g.mem")
    make_image(source, pages)
    outcome = await migrate(MemoryImageReader(source), MemoryImageWriter(str(tmp_path / "ok.out"), size=8 * PAGE, page_size=PAGE))
    _ok(outcome)
    assert read_file(str(tmp_path / "ok.out")) == read_file(source)
    outcome = await migrate(MemoryImageReader(source), MemoryImageWriter(str(tmp_path / "small.out"), size=4 * PAGE, page_size=PAGE))
    assert isinstance(outcome.destination, EndpointError) and "expects 16384" in str(outcome.destination)
    assert not os.path.exists(tmp_path / "small.out") and leftovers(str(tmp_path)) == []


async def test_records_too_large_for_the_peer_are_split(tmp_path: Path) -> None:
    # 16 KiB frames: a 128-page batch and a ZERO_PAGES record of 1500 runs must both be cut to fit.
    pages = [os.urandom(PAGE) if i % 2 else None for i in range(3000)] + [os.urandom(PAGE) for _ in range(300)]
    source, target = str(tmp_path / "g.mem"), str(tmp_path / "g.out")
    make_image(source, pages)
    outcome = await migrate(
        MemoryImageReader(source, batch_pages=128),
        MemoryImageWriter(target),
        connect_options={"client_settings": _SMALL, "server_settings": _SMALL},
    )
    sent, received = _ok(outcome)
    assert read_file(target) == read_file(source)
    assert received.records > sent.records  # the destination saw the pieces
