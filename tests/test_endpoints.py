"""Source readers and destination writers: registry, file and byte-stream endpoints, the pumps.

Everything runs for real: files in a temporary directory, pipes and unix
sockets from the OS, tunnel connections over memory streams or socket pairs.
"""

from __future__ import annotations

import errno
import os
import socket
import sys
import tomllib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
import trio.lowlevel
import trio.testing
from conftest import connected, memory_pair, unix_pair
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_endpoints_support import Outcome, leftovers, migrate, read_file

import tunnel
from tunnel import ErrorCode, Settings, StreamAborted
from tunnel.endpoints import (
    ByteStreamReader,
    ByteStreamWriter,
    DestinationWriter,
    EndpointError,
    FdDestination,
    FdSource,
    FileReader,
    FileWriter,
    MemoryImageReader,
    MemoryImageWriter,
    Progress,
    SourceReader,
    SourceRecord,
    UnknownEndpoint,
    available_sources,
    available_writers,
    destination_writer,
    receive_into,
    register_source,
    send_from,
    send_source,
    source_reader,
)
from tunnel.endpoints._registry import BUILTIN_SOURCES, BUILTIN_WRITERS
from tunnel.transport import TunnelConnection

KiB = 1024
MiB = 1024 * KiB


# ---------------------------------------------------------------------------
# Registry


def test_builtins_by_name() -> None:
    assert source_reader("file") is FileReader
    assert source_reader("bytestream") is ByteStreamReader
    assert source_reader("memory-image") is MemoryImageReader
    assert destination_writer("file") is FileWriter
    assert destination_writer("bytestream") is ByteStreamWriter
    assert destination_writer("memory-image") is MemoryImageWriter
    assert {"file", "bytestream", "memory-image"} <= set(available_sources())
    assert {"file", "bytestream", "memory-image"} <= set(available_writers())


def test_unknown_name_lists_what_exists() -> None:
    with pytest.raises(UnknownEndpoint) as info:
        source_reader("floppy")
    message = str(info.value)
    assert "'floppy'" in message and "bytestream, file, memory-image" in message and "tunnel.sources" in message
    with pytest.raises(LookupError):
        destination_writer("floppy")


def test_pyproject_declares_the_builtins() -> None:
    pyproject = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())
    groups = pyproject["project"]["entry-points"]
    assert groups["tunnel.sources"] == BUILTIN_SOURCES
    assert groups["tunnel.writers"] == BUILTIN_WRITERS


def test_builtins_cannot_be_replaced() -> None:
    with pytest.raises(ValueError, match="built-in"):
        register_source("file", FileReader)


_PLUGIN = '''
"""A plug-in package found through its entry points."""
import hashlib
import trio
from tunnel.endpoints import Progress

class PatternReader:
    stream_kind = 0
    def __init__(self, *, blocks, block=b"plug-in "):
        self.blocks, self.block, self.sent = blocks, block * 1024, 0
    async def _gen(self):
        for _ in range(self.blocks):
            self.sent += len(self.block)
            yield self.block
    def records(self):
        return self._gen()
    def progress(self):
        return Progress(bytes_sent=self.sent, finished=True)
    async def aclose(self):
        await trio.lowlevel.checkpoint()

class DigestWriter:
    results = {}
    def __init__(self, *, key):
        self.key, self.hash, self.size = key, hashlib.sha256(), 0
    async def write(self, record):
        self.hash.update(record)
        self.size += len(record)
        await trio.lowlevel.checkpoint()
    async def commit(self):
        DigestWriter.results[self.key] = (self.size, self.hash.hexdigest())
        await trio.lowlevel.checkpoint()
    async def abort(self, reason):
        DigestWriter.results[self.key] = reason
        await trio.lowlevel.checkpoint()
'''


async def test_plugin_found_through_entry_points(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A real installed distribution, as pip would leave it: a module and a dist-info with entry_points.txt.
    (tmp_path / "tunnel_testplugin.py").write_text(_PLUGIN)
    info = tmp_path / "tunnel_testplugin-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: tunnel-testplugin\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(
        "[tunnel.sources]\npattern = tunnel_testplugin:PatternReader\n\n[tunnel.writers]\nsha256 = tunnel_testplugin:DigestWriter\n"
    )
    with pytest.raises(UnknownEndpoint):
        source_reader("pattern")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "tunnel_testplugin", raising=False)
    try:
        assert "pattern" in available_sources() and "sha256" in available_writers()
        reader = source_reader("pattern")(blocks=40)
        writer = destination_writer("sha256")(key="k")
        assert isinstance(reader, SourceReader) and isinstance(writer, DestinationWriter)
        outcome = await migrate(reader, writer)
        assert not isinstance(outcome.source, BaseException), outcome.source
        import hashlib

        expected = b"plug-in " * 1024 * 40
        results = sys.modules["tunnel_testplugin"].DigestWriter.results
        assert results["k"] == (len(expected), hashlib.sha256(expected).hexdigest())
    finally:
        sys.modules.pop("tunnel_testplugin", None)


# ---------------------------------------------------------------------------
# File and byte stream round trips


def _ok(outcome: Outcome) -> None:
    assert not isinstance(outcome.source, BaseException), repr(outcome.source)
    assert not isinstance(outcome.destination, BaseException), repr(outcome.destination)


@pytest.mark.parametrize("size", [0, 1, MiB - 1, 3 * MiB + 17])
async def test_file_to_file(tmp_path: Path, size: int) -> None:
    data = os.urandom(size)
    (tmp_path / "saved.guest").write_bytes(data)
    target = tmp_path / "out" / "restored.guest"
    target.parent.mkdir()
    reader = FileReader(tmp_path / "saved.guest")
    writer = FileWriter(target)
    assert writer.temp_path is not None and os.path.exists(writer.temp_path)
    assert not target.exists()
    outcome = await migrate(reader, writer)
    _ok(outcome)
    assert read_file(str(target)) == data
    assert leftovers(str(target.parent)) == []
    assert isinstance(outcome.source, tunnel.endpoints.TransferResult)
    progress = outcome.source.progress
    assert progress is not None and progress.finished and progress.bytes_sent == size and progress.remaining_bytes == 0


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(
    data=st.binary(max_size=3000).map(lambda b: b * 200),
    chunk=st.sampled_from([1, 4096, 65536, MiB]),
    pairing=st.sampled_from(["file-file", "file-bytestream", "bytestream-file", "bytestream-bytestream"]),
)
def test_byte_pairings_round_trip(tmp_path: Path, data: bytes, chunk: int, pairing: str) -> None:
    directory = tmp_path / os.urandom(4).hex()
    directory.mkdir()
    (directory / "src").write_bytes(data)
    target = directory / "dst"

    async def main() -> bytes:
        received = bytearray()
        eof = trio.Event()
        source_kind, _, writer_kind = pairing.partition("-")
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                reader: SourceReader
                if source_kind == "file":
                    reader = FileReader(directory / "src", chunk_size=chunk)
                else:
                    r, w = os.pipe()
                    nursery.start_soon(_Producer(data).to_pipe, w)
                    reader = ByteStreamReader(r, chunk_size=max(chunk, 4096))
                writer: DestinationWriter
                if writer_kind == "file":
                    writer = FileWriter(target)
                else:
                    r2, w2 = os.pipe()
                    nursery.start_soon(_collect, r2, received, eof)
                    writer = ByteStreamWriter(w2)
                _ok(await migrate(reader, writer, pair=unix_pair))
        return read_file(str(target)) if writer_kind == "file" else bytes(received)

    assert trio.run(main) == data
    assert leftovers(str(directory)) == []


async def test_file_writer_replaces_atomically(tmp_path: Path) -> None:
    target = tmp_path / "guest.save"
    target.write_bytes(b"old contents")
    (tmp_path / "src").write_bytes(b"new contents" * 1000)
    old_inode = target.stat().st_ino
    _ok(await migrate(FileReader(tmp_path / "src"), FileWriter(target)))
    assert target.read_bytes() == b"new contents" * 1000
    assert target.stat().st_ino != old_inode  # renamed over, never written in place


class _Producer:
    """Writes *data* into a pipe or socket like a hypervisor, then ends its side (but may keep it open)."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.hung_up = False

    async def to_pipe(self, fd: int) -> None:
        stream = trio.lowlevel.FdStream(fd)
        try:
            await stream.send_all(self.data)
        except trio.BrokenResourceError:
            self.hung_up = True  # the migration failed and the tunnel closed its end, as QEMU would see
        await stream.aclose()

    async def to_socket(self, sock: socket.socket, done: trio.Event) -> None:
        tsock = trio.socket.from_stdlib_socket(sock)
        view = memoryview(self.data)
        while view:
            sent = await tsock.send(view)
            view = view[sent:]
        tsock.shutdown(socket.SHUT_WR)  # EOF, but the socket stays open, as QEMU keeps its own
        await done.wait()
        tsock.close()


async def _collect(fd: int, into: bytearray, eof: trio.Event) -> None:
    stream = trio.lowlevel.FdStream(fd)
    while chunk := await stream.receive_some(256 * KiB):
        into += chunk
    eof.set()
    await stream.aclose()


@pytest.mark.parametrize("kind", ["pipe", "socket"])
@pytest.mark.parametrize("transport", ["memory", "unix"])
async def test_bytestream_round_trip(kind: str, transport: str) -> None:
    # What QEMU writes after its EOF section must come through too: the data runs to the fd's EOF.
    data = os.urandom(5 * MiB + 3) + b"\x00\x00\x00\x00QEMU_VM_EOF" + b'{"trailing": "json"}'
    received = bytearray()
    eof = trio.Event()
    producer_done = trio.Event()
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            if kind == "pipe":
                src_r, src_w = os.pipe()
                dst_r, dst_w = os.pipe()
                nursery.start_soon(_Producer(data).to_pipe, src_w)
            else:
                src_a, src_b = socket.socketpair()
                dst_a, dst_b = socket.socketpair()
                src_r, dst_w, dst_r = src_a.detach(), dst_a.detach(), dst_b.detach()
                nursery.start_soon(_Producer(data).to_socket, src_b, producer_done)
            nursery.start_soon(_collect, dst_r, received, eof)
            reader, writer = ByteStreamReader(src_r), ByteStreamWriter(dst_w)
            assert isinstance(reader, FdSource) and isinstance(writer, FdDestination)
            outcome = await migrate(reader, writer, pair=unix_pair if transport == "unix" else memory_pair)
            # EOF reached the destination's reader while the source's producer still holds its socket open.
            await eof.wait()
            producer_done.set()
    _ok(outcome)
    assert bytes(received) == data
    assert isinstance(outcome.destination, tunnel.endpoints.TransferResult)
    if transport == "unix":  # plain sockets and no digest: the kernel moved the bulk (bytes right behind a header are read)
        assert outcome.destination.statistics.bytes_spliced > len(data) // 2
    else:
        assert outcome.destination.statistics.bytes_spliced == 0
    assert outcome.destination.payload_bytes == len(data)
    assert writer.bytes_written == len(data) and writer.committed
    assert isinstance(outcome.source, tunnel.endpoints.TransferResult) and outcome.source.progress is not None
    assert outcome.source.progress.bytes_sent == len(data) and outcome.source.progress.finished


async def test_bytestream_unix_socket_helpers(tmp_path: Path) -> None:
    # migrate unix:PATH on the source (QEMU connects to us), -incoming unix:PATH on the destination (we connect).
    data = os.urandom(2 * MiB)
    src_path, dst_path = str(tmp_path / "src.sock"), str(tmp_path / "dst.sock")
    received = bytearray()
    with trio.fail_after(60):
        listener = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        await listener.bind(dst_path)
        listener.listen(1)
        async with trio.open_nursery() as nursery:

            async def qemu_source() -> None:
                while True:  # until the tunnel listens (the path exists from bind(), before listen())
                    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                    try:
                        await sock.connect(src_path)
                        break
                    except (FileNotFoundError, ConnectionRefusedError):
                        sock.close()
                        await trio.sleep(0.01)
                stream = trio.SocketStream(sock)
                await stream.send_all(data)
                await stream.aclose()

            async def qemu_destination() -> None:
                conn, _ = await listener.accept()
                stream = trio.SocketStream(conn)
                while chunk := await stream.receive_some():
                    received.extend(chunk)
                await stream.aclose()

            nursery.start_soon(qemu_source)
            nursery.start_soon(qemu_destination)
            reader = await ByteStreamReader.accept_unix(src_path)
            writer = await ByteStreamWriter.connect_unix(dst_path)
            outcome = await migrate(reader, writer, pair=unix_pair)
        listener.close()
    _ok(outcome)
    assert bytes(received) == data
    assert not os.path.exists(src_path)


async def test_bytestream_to_file_and_file_to_bytestream(tmp_path: Path) -> None:
    data = os.urandom(3 * MiB + 5)
    r, w = os.pipe()
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_Producer(data).to_pipe, w)
            outcome = await migrate(ByteStreamReader(r), FileWriter(tmp_path / "saved"))
    _ok(outcome)
    assert read_file(str(tmp_path / "saved")) == data

    received = bytearray()
    eof = trio.Event()
    r, w = os.pipe()
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_collect, r, received, eof)
            outcome = await migrate(FileReader(tmp_path / "saved"), ByteStreamWriter(w), pair=unix_pair)
    _ok(outcome)
    assert bytes(received) == data


async def test_records_path_of_fd_endpoints() -> None:
    # The pumps take the fd path when offered; records()/write() must work on their own too.
    data = os.urandom(MiB + 11)
    a, b = socket.socketpair()
    c, d = socket.socketpair()
    reader, writer = ByteStreamReader(a.detach()), ByteStreamWriter(c.detach())
    received = bytearray()
    eof = trio.Event()
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_Producer(data).to_pipe, b.detach())
            nursery.start_soon(_collect, d.detach(), received, eof)
            async for record in reader.records():
                await writer.write(record)
            await writer.commit()
            await reader.aclose()
    assert bytes(received) == data and reader.progress().bytes_sent == len(data)
    with pytest.raises(EndpointError):
        await writer.write(b"more")


# ---------------------------------------------------------------------------
# The pumps: back-pressure, failures, what each side sees


class _SlowWriter:
    """A destination that takes records only when the test lets it."""

    def __init__(self) -> None:
        self.taken = 0
        self.gate = trio.Event()
        self.committed = False

    async def write(self, record: SourceRecord) -> None:
        if self.taken >= 2:
            await self.gate.wait()
        assert isinstance(record, bytes | memoryview)
        self.taken += len(record)

    async def commit(self) -> None:
        self.committed = True
        await trio.lowlevel.checkpoint()

    async def abort(self, reason: str) -> None:
        await trio.lowlevel.checkpoint()


async def test_slow_writer_holds_the_reader_back(tmp_path: Path) -> None:
    window = 256 * KiB
    small = Settings(initial_stream_window=window, connection_window=4 * window, max_frame_size=64 * KiB)
    size = 16 * MiB
    (tmp_path / "big").write_bytes(os.urandom(size))
    reader = FileReader(tmp_path / "big", chunk_size=64 * KiB)
    writer = _SlowWriter()
    with trio.fail_after(60):
        async with connected(client_settings=small, server_settings=small) as (client, server), trio.open_nursery() as nursery:

            async def destination() -> None:
                await receive_into(await server.accept_stream(), writer)

            nursery.start_soon(destination)
            stream = await client.open_stream(kind=reader.stream_kind)
            nursery.start_soon(send_from, reader, stream)
            await trio.testing.wait_all_tasks_blocked()
            # The writer is stuck: the reader got at most a window (plus the record in flight) ahead.
            ahead = reader.progress().bytes_sent - writer.taken
            assert ahead <= window + 2 * 64 * KiB, ahead
            assert reader.progress().bytes_sent < size
            writer.gate.set()
    assert writer.committed and writer.taken == size


class _FailingWriter:
    """A writer plug-in whose storage fills up after *limit* bytes."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.size = 0
        self.aborted: str | None = None
        self.committed = False

    async def write(self, record: SourceRecord) -> None:
        assert isinstance(record, bytes | memoryview)
        if self.size + len(record) > self.limit:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.size += len(record)
        await trio.lowlevel.checkpoint()

    async def commit(self) -> None:
        self.committed = True
        await trio.lowlevel.checkpoint()

    async def abort(self, reason: str) -> None:
        self.aborted = reason
        await trio.lowlevel.checkpoint()


async def test_writer_failure_aborts_and_the_source_sees_why(tmp_path: Path, fd_leak_check: None) -> None:
    (tmp_path / "src").write_bytes(os.urandom(8 * MiB))
    writer = _FailingWriter(limit=3 * MiB)
    outcome = await migrate(FileReader(tmp_path / "src"), writer)
    assert isinstance(outcome.source, StreamAborted), outcome.source
    assert outcome.source.remote and outcome.source.error_code == ErrorCode.APPLICATION_ERROR
    assert "No space left on device" in outcome.source.reason and "OSError" in outcome.source.reason
    assert isinstance(outcome.destination, OSError)
    assert writer.aborted is not None and "No space left" in writer.aborted and not writer.committed


async def test_hypervisor_hangs_up_mid_stream(fd_leak_check: None) -> None:
    # The destination QEMU dies: writes to its pipe fail with EPIPE, and the source learns it.
    data = os.urandom(16 * MiB)
    src_r, src_w = os.pipe()
    dst_r, dst_w = os.pipe()
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            producer = _Producer(data)
            nursery.start_soon(producer.to_pipe, src_w)

            async def dying_consumer() -> None:
                stream = trio.lowlevel.FdStream(dst_r)
                await stream.receive_some(64 * KiB)
                await stream.aclose()

            nursery.start_soon(dying_consumer)
            outcome = await migrate(ByteStreamReader(src_r), ByteStreamWriter(dst_w), digest=tunnel.DigestAlgorithm.CRC32)
    assert isinstance(outcome.source, StreamAborted) and outcome.source.remote
    assert "Broken pipe" in outcome.source.reason
    assert isinstance(outcome.destination, BrokenPipeError | StreamAborted)
    assert producer.hung_up  # the source hypervisor sees the failure too, and nothing is left waiting


class _BrokenReader:
    """A source that fails after *good* chunks (the hypervisor's stream broke)."""

    stream_kind = 0

    def __init__(self, good: int) -> None:
        self.good = good
        self.closed = False

    async def _gen(self) -> object:
        for _ in range(self.good):
            yield os.urandom(256 * KiB)
            await trio.lowlevel.checkpoint()
        raise EndpointError("the hypervisor's migration stream ended early")

    def records(self):  # type: ignore[no-untyped-def]
        return self._gen()

    def progress(self) -> Progress:
        return Progress()

    async def aclose(self) -> None:
        self.closed = True
        await trio.lowlevel.checkpoint()


async def test_source_failure_leaves_no_files(tmp_path: Path, fd_leak_check: None) -> None:
    reader = _BrokenReader(good=12)
    target = tmp_path / "restored"
    outcome = await migrate(reader, FileWriter(target))
    assert isinstance(outcome.source, EndpointError) and reader.closed
    assert isinstance(outcome.destination, StreamAborted)
    assert outcome.destination.remote and "ended early" in outcome.destination.reason
    assert not target.exists() and leftovers(str(tmp_path)) == []


async def test_cancelled_migration_leaves_no_files(tmp_path: Path, fd_leak_check: None) -> None:
    (tmp_path / "src").write_bytes(os.urandom(8 * MiB))
    target = tmp_path / "out"
    writer = FileWriter(target)
    got: dict[str, BaseException] = {}
    with trio.fail_after(60):
        async with connected() as (client, server), trio.open_nursery() as nursery:

            async def destination() -> None:
                try:
                    await receive_into(await server.accept_stream(), writer)
                except StreamAborted as exc:
                    got["destination"] = exc

            nursery.start_soon(destination)
            with trio.CancelScope() as scope:
                reader = FileReader(tmp_path / "src", chunk_size=256 * KiB)
                stream = await client.open_stream(kind=reader.stream_kind)

                async def cancel_soon() -> None:
                    while writer.bytes_written < MiB:
                        await trio.lowlevel.checkpoint()
                    scope.cancel()

                nursery.start_soon(cancel_soon)
                await send_from(reader, stream)
            assert scope.cancelled_caught
    error = got["destination"]
    assert isinstance(error, StreamAborted) and error.error_code == ErrorCode.CANCEL
    assert not target.exists() and leftovers(str(tmp_path)) == []


async def _keep_full(fd: int) -> None:
    chunk = b"q" * MiB
    while True:
        try:
            os.write(fd, chunk)
        except BlockingIOError:
            await trio.lowlevel.wait_writable(fd)
        except BrokenPipeError:
            return


async def _read_all(fd: int) -> None:
    while True:
        try:
            if not os.read(fd, MiB):
                return
        except BlockingIOError:
            await trio.lowlevel.wait_readable(fd)


@pytest.mark.parametrize("ending", ["connection_closed", "peer_reset"])
async def test_connection_lost_mid_fd_transfer_leaks_no_fd(ending: str, fd_leak_check: None) -> None:
    """The pumps over hypervisor pipes, spliced over a unix socket; the connection is
    closed (or its socket reset under it) part way.  Both sides fail, and every fd
    the transport and the endpoints opened or were given is closed."""
    src_r, src_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    dst_r, dst_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    writer = ByteStreamWriter(dst_w)
    failures: dict[str, BaseException] = {}
    try:
        with trio.fail_after(30):
            async with unix_pair() as (a, b), connected(lambda: _given(a, b)) as (client, server), trio.open_nursery() as nursery:
                nursery.start_soon(_keep_full, src_w)
                nursery.start_soon(_read_all, dst_r)
                done = {"source": trio.Event(), "destination": trio.Event()}

                async def side(name: str, run: object) -> None:
                    try:
                        await run()  # type: ignore[operator]
                    except (trio.BrokenResourceError, tunnel.TunnelError) as exc:
                        failures[name] = exc
                    done[name].set()

                nursery.start_soon(side, "source", lambda: send_source(client, ByteStreamReader(src_r)))
                nursery.start_soon(side, "destination", lambda: _receive(server, writer))
                while server.statistics().bytes_received < 4 * MiB:  # well under way
                    await trio.lowlevel.checkpoint()
                if ending == "connection_closed":
                    await client.aclose()
                else:
                    a.socket.shutdown(socket.SHUT_RDWR)  # the peer's socket is reset under the tunnel
                await done["source"].wait()
                await done["destination"].wait()
                nursery.cancel_scope.cancel()
    finally:
        for fd in (src_w, dst_r):
            os.close(fd)
    assert isinstance(failures.get("source"), tunnel.ConnectionLost), failures
    assert isinstance(failures.get("destination"), tunnel.ConnectionLost | StreamAborted), failures


async def _receive(server: TunnelConnection, writer: ByteStreamWriter) -> None:
    await receive_into(await server.accept_stream(), writer)


def _given(a: trio.abc.Stream, b: trio.abc.Stream) -> object:
    @asynccontextmanager
    async def pair() -> AsyncIterator[tuple[trio.abc.Stream, trio.abc.Stream]]:
        yield a, b

    return pair()


async def test_writer_rejects_records_it_cannot_apply(tmp_path: Path, fd_leak_check: None) -> None:
    # A memory image sent to a file writer: the writer refuses, the migration fails cleanly.
    from test_endpoints_support import make_image

    make_image(str(tmp_path / "mem"), [os.urandom(4096), None, b"\x01" * 4096])
    outcome = await migrate(MemoryImageReader(tmp_path / "mem"), FileWriter(tmp_path / "out"))
    assert isinstance(outcome.destination, EndpointError)
    assert isinstance(outcome.source, StreamAborted) and "byte stream" in outcome.source.reason
    assert leftovers(str(tmp_path)) == [] and not (tmp_path / "out").exists()
