"""One tunnel stream, as a ``trio.abc.HalfCloseableStream`` with typed records.

Theory of operation.  A stream never writes to the transport itself.
``send_all`` hands the caller's buffer (not a copy) to the connection's
writer task and waits until the writer has put all of it on the wire, one
frame at a time, as credit and the bandwidth limit allow; so each stream
holds at most one caller buffer and nothing is queued behind it.  Received
records are appended by the connection's reader task to ``_backlog``; the
peer cannot send more than the stream window, so the backlog is bounded by
it.  Credit goes back to the peer only when ``receive_*`` hands a record to
the application.
"""

from __future__ import annotations

import os
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING

import trio

from .._errors import ErrorCode, TunnelError
from .._events import DeviceStateReceived, IterationReceived, PagesReceived, ZeroPagesReceived, ZstdPagesReceived
from .._frames import Buffer, DigestAlgorithm
from .._state import StreamState
from ._buffers import ReadBuffer
from ._compress import (
    COMPRESS_THREAD_MIN,
    DECOMPRESS_THREAD_MIN,
    CompressedPages,
    CompressionError,
    PageCompressor,
    PageDecompressor,
    run_sized,
)
from ._ratelimit import RateLimit
from ._splice import KernelPipe, PipeSource, SinkQueue, is_spliceable, widen_pipe
from ._stats import StreamStatistics
from ._util import BrokenStream, ConflictGuard, Signal, aborted

if TYPE_CHECKING:
    from ._connection import TunnelConnection

__all__ = ["DeviceStateRecord", "IterationRecord", "PagesRecord", "Record", "TunnelStream", "ZeroPagesRecord", "record_size"]


@dataclass(frozen=True, slots=True, kw_only=True)
class PagesRecord:
    region: int
    page_size: int
    addresses: tuple[int, ...]
    data: Buffer


@dataclass(frozen=True, slots=True, kw_only=True)
class ZeroPagesRecord:
    region: int
    page_size: int
    runs: tuple[tuple[int, int], ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class DeviceStateRecord:
    name: str
    version: int
    data: Buffer


@dataclass(frozen=True, slots=True, kw_only=True)
class IterationRecord:
    """A pre-copy pass boundary: the records that follow belong to pass *iteration* (0 first)."""

    iteration: int
    #: The last pass (stop-and-copy).
    final: bool = False


#: What :meth:`TunnelStream.receive_record` returns; ``b""`` means end of stream.
Record = bytes | memoryview | PagesRecord | ZeroPagesRecord | DeviceStateRecord | IterationRecord


class _Outgoing:
    """The one piece of work a stream has handed to the writer.

    Either a caller's buffer (*data*), one typed *record*, or a *source*
    file descriptor staged through a kernel pipe (``send_fd``).
    """

    __slots__ = ("abandoned", "data", "done", "drained", "error", "record", "source", "wait_scope", "writing")

    def __init__(self, data: memoryview | None, record: object | None, source: PipeSource | None = None) -> None:
        self.data = data
        self.record = record
        self.source = source
        #: ``send_fd`` returned while the writer was splicing: the pipe is the
        #: writer's now, which closes it once that splice ends, however it ends.
        self.abandoned = False
        self.writing = False
        self.drained = Signal()
        self.done = trio.Event()
        self.error: BaseException | None = None
        self.wait_scope: trio.CancelScope | None = None

    def fail(self, error: BaseException) -> None:
        self.error = error
        self.done.set()
        self.drained.fire()
        if self.wait_scope is not None:
            self.wait_scope.cancel()


class TunnelStream(trio.abc.HalfCloseableStream):
    """A flow-controlled, full-duplex stream inside a tunnel connection."""

    def __init__(
        self,
        conn: TunnelConnection,
        stream_id: int,
        *,
        kind: int,
        digest: int,
        migration_id: bytes,
        label: str,
        bandwidth: int = 0,
        compress: bool = False,
    ) -> None:
        self._conn = conn
        self.stream_id = stream_id
        self.kind = kind
        self.digest = digest
        self.migration_id = migration_id
        self.label = label
        self._rate = RateLimit(bandwidth)
        # send side
        self._send_guard = ConflictGuard("another task is sending on this stream")
        self._outgoing: _Outgoing | None = None
        self._eof_sent = False
        self._credit_signal = Signal()
        self._blocked_since: float | None = None
        self._blocked_total = 0.0
        self._frames_sent = 0
        self._bytes_sent = 0
        self._bytes_spliced = 0
        # Page batches are compressed only when asked for and both sides set ZSTD.
        self._compressor: PageCompressor | None = PageCompressor() if compress and conn.compression else None
        self._pages_raw_bytes = 0
        self._pages_wire_bytes = 0
        # receive side
        self._recv_guard = ConflictGuard("another task is receiving on this stream")
        # (item, flow-controlled length, pooled read buffer the item is a slice of)
        self._backlog: deque[tuple[object, int, ReadBuffer | None]] = deque()
        self._lent: ReadBuffer | None = None  # buffer behind the last item handed out
        self._buffered = 0
        self._head_offset = 0  # bytes of the first backlog item already taken
        self._eof_received = False
        self._recv_signal = Signal()
        self._sink: SinkQueue | None = None
        self._sink_dirty = False  # queued for the reader's next flush
        #: Waits on a file descriptor (send_fd and receive_fd may both wait at once), woken on failure.
        self._fd_scopes: set[trio.CancelScope] = set()
        self._frames_received = 0
        self._bytes_received = 0
        self._decompressor: PageDecompressor | None = None  # created by the first ZSTD_PAGES
        # both
        self._closed = False
        self._error: BaseException | None = None

    # ------------------------------------------------------------------
    # Called by the connection

    def _on_record(self, item: object, length: int, buf: ReadBuffer | None) -> None:
        if self._closed or self._error is not None:
            self._conn._acknowledge(self.stream_id, length)
            if buf is not None:
                buf.release()
            return
        self._buffered += length
        self._bytes_received += length
        self._frames_received += 1
        sink = self._sink
        if sink is not None and isinstance(item, (bytes, memoryview)):
            sink.add_memory(item, buf)
            self._conn._sink_dirty(self)  # the reader flushes it before it next waits
            return
        self._backlog.append((item, length, buf))
        self._recv_signal.fire()

    def _on_spliced(self, pipe: KernelPipe, size: int) -> None:
        """The reader spliced *size* payload bytes into *pipe*, one of this stream's sink's."""
        sink = self._sink
        assert sink is not None
        sink.add_pipe(pipe, size)
        self._buffered += size
        self._bytes_received += size
        self._conn._sink_dirty(self)

    def _flush_sink(self, sink: SinkQueue) -> None:
        """Move what the sink takes without blocking, and return its credit."""
        moved, spliced = sink.flush()
        if moved:
            self._bytes_spliced += spliced
            self._buffered -= moved
            self._conn._acknowledge(self.stream_id, moved)
        if sink.blocked or sink.error is not None:
            sink.signal.fire()  # receive_fd's task waits for the sink, or raises

    def _on_eof(self) -> None:
        self._eof_received = True
        if self._sink is not None:
            self._sink.signal.fire()
        self._recv_signal.fire()

    def _on_error(self, error: BaseException) -> None:
        """The stream was aborted or the connection died."""
        if self._error is None:
            self._error = error
        if not self._eof_received or not isinstance(error, BrokenStream):
            self._drop_backlog()
        out, self._outgoing = self._outgoing, None
        if out is not None:
            out.fail(error)
        self._wake_sink()
        self._recv_signal.fire()
        self._credit_signal.fire()

    def _wake_sink(self) -> None:
        if self._sink is not None:
            self._sink.signal.fire()
        for scope in self._fd_scopes:
            scope.cancel()

    def _release_lent(self) -> None:
        if self._lent is not None:
            self._lent.release()
            self._lent = None

    def _on_credit(self) -> None:
        self._credit_signal.fire()

    def _drop_backlog(self) -> None:
        if self._buffered:
            self._conn._acknowledge(self.stream_id, self._buffered)
        for _, _, buf in self._backlog:
            if buf is not None:
                buf.release()
        self._backlog.clear()
        if self._sink is not None:
            self._sink.signal.fire()  # receive_fd's task may wait on it: it must wake and raise
            self._conn._sinks.pop(self.stream_id, None)
            for _, buf in self._sink.release():
                if buf is not None:
                    buf.release()
            self._sink = None
        # Not the lent buffer: the application may still hold a view of it,
        # valid until its next receive call (or aclose), error or not.
        self._buffered = 0
        self._head_offset = 0

    # ------------------------------------------------------------------
    # Sending

    def _check_send(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("the stream was closed")
        if self._eof_sent:
            raise trio.ClosedResourceError("send_eof() was called on this stream")
        if self._error is not None:
            raise self._error

    async def _hand_over(self, out: _Outgoing) -> None:
        self._outgoing = out
        self._conn._schedule(self)
        try:
            await out.done.wait()
        except BaseException:
            if self._outgoing is out:
                self._outgoing = None
            if not out.done.is_set():
                self._break_send()
            raise
        if out.error is not None:
            if self._closed:
                raise trio.ClosedResourceError("the stream was closed") from None
            raise out.error

    def _break_send(self) -> None:
        """A send was interrupted part way (cancelled): break the stream.

        The peer may have part of it, and the writer may still be writing
        slices of the caller's buffer.  As trio's SSLStream does, the stream
        is broken from now on (``trio.BrokenResourceError``), and the peer
        gets STREAM_ABORT: a half-done send must never end cleanly.
        """
        if self._error is None and not self._closed:
            reason = "the sender was cancelled during a send"
            self._conn._abort_stream(self.stream_id, ErrorCode.CANCEL, reason)
            self._on_error(aborted(ErrorCode.CANCEL, reason, remote=False))

    async def send_all(self, data: Buffer) -> None:
        with self._send_guard:
            self._check_send()
            view = memoryview(data)
            if view.ndim != 1 or view.format != "B":
                view = view.cast("B")
            if not len(view):
                await trio.lowlevel.checkpoint()
                return
            await self._hand_over(_Outgoing(view, None))

    @property
    def compress(self) -> bool:
        """Whether page batches sent on this stream are compressed (asked for, and ZSTD negotiated)."""
        return self._compressor is not None

    async def send_record(self, record: PagesRecord | ZeroPagesRecord | DeviceStateRecord | IterationRecord) -> None:
        """Send one typed record, in order with the stream's data.

        On a stream opened with ``compress=True`` a page batch goes as
        ZSTD_PAGES when compressing pays, else as PAGES; the peer reads a
        ``PagesRecord`` either way.  The batch must fit uncompressed.
        """
        with self._send_guard:
            self._check_send()
            self._conn._check_record_fits(record)
            wire: object = record
            if isinstance(record, PagesRecord) and self._compressor is not None and len(record.data):
                raw = len(record.data)
                compressed = await run_sized(raw, COMPRESS_THREAD_MIN, self._compressor.compress, record.data)
                self._check_send()  # the stream may have failed meanwhile
                if compressed is not None:
                    wire = CompressedPages(
                        region=record.region,
                        page_size=record.page_size,
                        addresses=record.addresses,
                        compressed=compressed,
                        raw_size=raw,
                    )
            await self._hand_over(_Outgoing(None, wire))
            if isinstance(record, PagesRecord):
                self._pages_raw_bytes += len(record.data)
                self._pages_wire_bytes += len(wire.compressed) if isinstance(wire, CompressedPages) else len(record.data)

    async def send_pages(self, *, region: int, page_size: int, addresses: tuple[int, ...], data: Buffer) -> None:
        await self.send_record(PagesRecord(region=region, page_size=page_size, addresses=tuple(addresses), data=data))

    async def send_zero_pages(self, *, region: int, page_size: int, runs: tuple[tuple[int, int], ...]) -> None:
        await self.send_record(ZeroPagesRecord(region=region, page_size=page_size, runs=tuple(runs)))

    async def send_device_state(self, *, name: str, version: int = 0, data: Buffer = b"") -> None:
        await self.send_record(DeviceStateRecord(name=name, version=version, data=data))

    async def send_iteration(self, iteration: int, *, final: bool = False) -> None:
        """Mark the start of pre-copy pass *iteration* (0 first); *final* for stop-and-copy."""
        await self.send_record(IterationRecord(iteration=iteration, final=final))

    async def wait_send_all_might_not_block(self) -> None:
        with self._send_guard:
            self._check_send()
            while self._conn._send_window(self.stream_id) <= 0:
                await self._credit_signal.wait()
                self._check_send()
            await trio.lowlevel.checkpoint()

    async def send_eof(self) -> None:
        """Half-close: the peer reads end of stream once it has everything sent before."""
        with self._send_guard:
            if self._closed:
                raise trio.ClosedResourceError("the stream was closed")
            if not self._eof_sent:
                if self._error is not None:
                    raise self._error
                self._eof_sent = True
                self._conn._end_stream(self.stream_id)
            await trio.lowlevel.checkpoint()

    # ------------------------------------------------------------------
    # Receiving

    async def _wait_item(self, want: int | None = None) -> tuple[bool, bool]:
        """Wait for a backlog item: (False at end of stream, whether it blocked).

        A receive that blocked here has had its checkpoint; one that did not
        still owes one.  *want* is how much the caller asked for (None: a
        frame's worth), granted to a peer that holds no credit (window 0).
        """
        self._release_lent()  # what the previous receive returned is no longer needed
        blocked = False
        while not self._backlog:
            if self._closed:
                raise trio.ClosedResourceError("the stream was closed")
            if self._eof_received:
                return False, blocked
            if self._error is not None:
                raise self._error
            self._conn._request_data(self.stream_id, want)
            await self._recv_signal.wait()
            blocked = True
        if self._closed:
            raise trio.ClosedResourceError("the stream was closed")
        return True, blocked

    def _take_bytes(self, max_bytes: int | None, view_ok: bool) -> Buffer:
        item, length, buf = self._backlog[0]
        if not isinstance(item, (bytes, memoryview)):
            raise TunnelError(f"the next item on stream {self.stream_id} is a {type(item).__name__}: use receive_record()")
        start = self._head_offset
        end = length if max_bytes is None else min(length, start + max_bytes)
        taken = end - start
        if end == length:
            self._backlog.popleft()
            self._head_offset = 0
        else:
            self._head_offset = end
            buf = None  # still held by the backlog entry
        self._buffered -= taken
        self._conn._acknowledge(self.stream_id, taken)
        if start == 0 and end == length and isinstance(item, bytes):
            return item
        chunk = memoryview(item)[start:end]
        if view_ok:
            self._lent = buf
            return chunk
        if buf is not None:
            buf.release()
        return bytes(chunk)

    def _check_max(self, max_bytes: int | None) -> None:
        if max_bytes is not None:
            if not isinstance(max_bytes, int) or isinstance(max_bytes, bool):
                raise TypeError("max_bytes must be an integer or None")
            if max_bytes < 1:
                raise ValueError("max_bytes must be >= 1")

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        """Up to *max_bytes* of stream data; ``b""`` only at end of stream."""
        self._check_max(max_bytes)
        with self._recv_guard:
            ready, blocked = await self._wait_item(max_bytes)
            data = self._take_bytes(max_bytes, view_ok=False) if ready else b""
            if not blocked:
                await trio.lowlevel.checkpoint()
            assert isinstance(data, bytes)
            return data

    async def receive_view(self, max_bytes: int | None = None) -> Buffer:
        """Like :meth:`receive_some` without a copy: may return a memoryview.

        The view is valid until the next receive call on this stream, or
        :meth:`aclose` (its memory is then reused), also if the stream fails
        meanwhile: copy what you need to keep.
        """
        self._check_max(max_bytes)
        with self._recv_guard:
            ready, blocked = await self._wait_item(max_bytes)
            data = self._take_bytes(max_bytes, view_ok=True) if ready else b""
            if not blocked:
                await trio.lowlevel.checkpoint()
            return data

    async def receive_record(self) -> Record:
        """The next data chunk or typed record; ``b""`` at end of stream."""
        with self._recv_guard:
            ready, blocked = await self._wait_item()
            if not ready:
                if not blocked:
                    await trio.lowlevel.checkpoint()
                return b""
            item, length, buf = self._backlog[0]
            if isinstance(item, ZstdPagesReceived):
                return await self._take_compressed(item, length, buf)
            data: Record
            if isinstance(item, (bytes, memoryview)):
                chunk = self._take_bytes(None, view_ok=True)
                assert not isinstance(chunk, bytearray)  # slices of the backlog's bytes or views
                data = chunk
            else:
                self._backlog.popleft()
                self._lent = buf
                self._buffered -= length
                self._conn._acknowledge(self.stream_id, length)
                data = _record_of(item)
            if not blocked:
                await trio.lowlevel.checkpoint()
            return data

    async def _take_compressed(self, item: ZstdPagesReceived, length: int, buf: ReadBuffer | None) -> PagesRecord:
        """Decompress the ZSTD_PAGES record at the head of the backlog into a PagesRecord.

        A corrupt frame or a wrong size is a stream error PROTOCOL_ERROR
        (protocol.md §4.17): the stream is aborted and the error raised.
        """
        size = len(item.addresses) * item.page_size
        if self._decompressor is None:
            self._decompressor = PageDecompressor()
        if buf is not None:
            buf.refs += 1  # the compressed bytes stay put even if the backlog is dropped meanwhile
        failure: CompressionError | None = None
        try:
            data = await run_sized(size, DECOMPRESS_THREAD_MIN, self._decompressor.decompress, item.compressed, size)
        except CompressionError as exc:
            failure = exc
        finally:
            if buf is not None:
                buf.release()
        if not self._backlog or self._backlog[0][0] is not item:
            # Closed or failed while decompressing: the backlog was dropped (and acknowledged).
            if self._closed:
                raise trio.ClosedResourceError("the stream was closed")
            assert self._error is not None
            raise self._error
        if failure is not None:
            reason = f"bad ZSTD_PAGES: {failure}"
            self._conn._abort_stream(self.stream_id, ErrorCode.PROTOCOL_ERROR, reason)
            error = aborted(ErrorCode.PROTOCOL_ERROR, reason, remote=False)
            self._on_error(error)  # drops the backlog, this record included, and gives its credit back
            raise error
        self._backlog.popleft()
        if buf is not None:
            buf.release()
        self._buffered -= length
        self._conn._acknowledge(self.stream_id, length)
        return PagesRecord(region=item.region, page_size=item.page_size, addresses=item.addresses, data=data)

    # ------------------------------------------------------------------
    # File descriptors: the data path of a real hypervisor

    async def send_fd(self, fd: int, *, limit: int | None = None) -> int:
        """Send what *fd* (a pipe or socket to QEMU, a file) yields until its EOF.

        Returns the number of bytes sent; does not send EOF on the stream.
        On a plain-socket connection, for a pipe or socket *fd* on a stream
        without a digest, the bytes are spliced by the kernel and never
        enter Python; otherwise they are copied through one reused buffer.
        *fd* is switched to non-blocking mode, and a pipe is widened to
        1 MiB where the system allows, so each splice moves more.
        """
        if limit is not None and limit < 0:
            raise ValueError("limit must be >= 0")
        with self._send_guard:
            self._check_send()
            os.set_blocking(fd, False)
            widen_pipe(fd)
            if self._conn._can_splice and self.digest == DigestAlgorithm.NONE and is_spliceable(fd):
                return await self._send_fd_spliced(fd, limit)
            return await self._send_fd_copied(fd, limit)

    async def _send_fd_copied(self, fd: int, limit: int | None) -> int:
        buf = bytearray(self._conn.chunk_size)
        view = memoryview(buf)
        total = 0
        while limit is None or total < limit:
            want = len(buf) if limit is None else min(len(buf), limit - total)
            try:
                size = os.readv(fd, [view[:want]])
            except BlockingIOError:
                await self._wait_fd(trio.lowlevel.wait_readable, fd, None)
                continue
            if not size:
                break
            self._check_send()  # the stream may have failed while we waited for the fd: nobody would fail this hand-over
            await self._hand_over(_Outgoing(view[:size], None))
            total += size
        await trio.lowlevel.checkpoint()
        return total

    async def _wait_fd(self, wait: object, fd: int, out: _Outgoing | None) -> None:
        """Wait on *fd*, but wake with the stream's error if it fails meanwhile."""
        with trio.CancelScope() as scope:
            if out is not None:
                out.wait_scope = scope
            self._fd_scopes.add(scope)
            try:
                await wait(fd)  # type: ignore[operator]
            finally:
                self._fd_scopes.discard(scope)
        if out is not None:
            out.wait_scope = None
        if self._closed:
            raise trio.ClosedResourceError("the stream was closed")
        if self._error is not None:
            raise self._error

    async def _send_fd_spliced(self, fd: int, limit: int | None) -> int:
        source = PipeSource(fd, limit)
        out = _Outgoing(None, None, source)
        self._outgoing = out
        try:
            while True:
                if out.error is not None:
                    raise out.error
                if source.fill():
                    self._conn._schedule(self)
                if source.error is not None:
                    raise source.error
                if source.pipe.level:
                    # The writer sends it, topping the pipe up from the source before
                    # each frame, and wakes us once the pipe ran empty.
                    await out.drained.wait()
                elif source.eof:
                    break
                else:
                    await self._wait_fd(trio.lowlevel.wait_readable, fd, out)
        except BaseException:
            if out.error is None and source.error is None:
                self._break_send()  # cancelled: bytes taken from fd may never be sent
            raise
        finally:
            if self._outgoing is out:
                self._outgoing = None
            if out.writing:
                out.abandoned = True  # the writer closes the pipe when its splice is done
            else:
                source.pipe.close()
        if out.error is not None:
            raise out.error
        await trio.lowlevel.checkpoint()
        return source.total

    async def receive_fd(self, fd: int) -> int:
        """Write everything the peer sends on this stream into *fd*, until end of stream.

        Returns the number of bytes written.  Spliced (never entering
        Python) under the same conditions as :meth:`send_fd`; credit goes
        back to the peer only once bytes are in *fd*.  If writing to *fd*
        fails, the stream is aborted with the reason and the error raised.
        *fd* is made non-blocking and, if a pipe, widened as for :meth:`send_fd`.
        """
        with self._recv_guard:
            self._release_lent()
            if self._closed:
                raise trio.ClosedResourceError("the stream was closed")
            os.set_blocking(fd, False)
            widen_pipe(fd)
            if self._conn._can_splice and self.digest == DigestAlgorithm.NONE and is_spliceable(fd):
                return await self._receive_fd_spliced(fd)
            total = 0
            while True:
                if not (await self._wait_item())[0]:
                    break
                data = self._take_bytes(None, view_ok=True)
                total += await self._write_fd(fd, memoryview(data))
                self._release_lent()
            await trio.lowlevel.checkpoint()
            return total

    async def _write_fd(self, fd: int, view: memoryview) -> int:
        written = 0
        while written < len(view):
            try:
                written += os.write(fd, view[written:])
            except BlockingIOError:
                await self._wait_fd(trio.lowlevel.wait_writable, fd, None)
            except OSError as exc:
                await self.abort(ErrorCode.APPLICATION_ERROR, f"destination write failed: {exc}")
                raise
        return written

    async def _receive_fd_spliced(self, fd: int) -> int:
        for item, _, _ in self._backlog:
            if not isinstance(item, (bytes, memoryview)):
                raise TunnelError(f"stream {self.stream_id} carries typed records: use receive_record()")
        # Pipes for the whole receive window: the reader never has to copy this payload through memory.
        sink = SinkQueue(fd, self._conn._core.local_settings.initial_stream_window)
        while self._backlog:
            item, _, buf = self._backlog.popleft()
            start, self._head_offset = self._head_offset, 0
            sink.add_memory(memoryview(item)[start:], buf)  # type: ignore[arg-type]
        self._sink = sink
        self._conn._sinks[self.stream_id] = sink
        try:
            while True:
                if self._closed:
                    raise trio.ClosedResourceError("the stream was closed")
                if self._error is not None and not self._eof_received:
                    raise self._error
                if sink.error is not None:
                    await self.abort(ErrorCode.APPLICATION_ERROR, f"destination write failed: {sink.error}")
                    raise sink.error
                if sink.blocked:
                    await self._wait_fd(trio.lowlevel.wait_writable, fd, None)
                    sink.blocked = False
                    if self._sink is sink:
                        self._flush_sink(sink)
                elif sink.segments:
                    self._flush_sink(sink)
                elif self._eof_received:
                    break
                else:
                    self._conn._request_data(self.stream_id, None)
                    await sink.signal.wait()  # the reader moves the data on while the sink keeps up
        finally:
            self._sink = None
            self._conn._sinks.pop(self.stream_id, None)
            leftover = sink.release()
            if not self._closed and self._error is None:
                for data, buf in reversed(leftover):  # back to the backlog, in order
                    self._backlog.appendleft((data, len(data), buf))
            else:
                for _, buf in leftover:
                    if buf is not None:
                        buf.release()
        await trio.lowlevel.checkpoint()
        return sink.written

    # ------------------------------------------------------------------
    # Control

    def set_bandwidth(self, bytes_per_second: int) -> None:
        """Limit this stream's send rate (0 for none); takes effect at once."""
        self._rate.set_rate(bytes_per_second)
        self._conn._schedule(self)

    @property
    def bandwidth(self) -> int:
        return self._rate.rate

    async def abort(self, error_code: int = ErrorCode.CANCEL, reason: str = "aborted by the application") -> None:
        """Abort both directions; the peer's operations raise StreamAborted with *reason*."""
        if not self._closed and self._error is None:
            self._conn._abort_stream(self.stream_id, error_code, reason)
            self._on_error(aborted(error_code, reason, remote=False))
        await trio.lowlevel.checkpoint()

    async def aclose(self) -> None:
        """Close both directions: sends end of stream, and aborts the receive side if still open."""
        if not self._closed:
            self._closed = True
            if self._error is None:
                self._conn._close_stream(self)
            self._drop_backlog()
            self._release_lent()  # no receive comes after aclose
            out, self._outgoing = self._outgoing, None
            if out is not None:
                out.fail(trio.ClosedResourceError("the stream was closed"))
            self._wake_sink()
            self._recv_signal.fire()
            self._credit_signal.fire()
            self._conn._forget(self)
        await trio.lowlevel.checkpoint()

    @property
    def state(self) -> StreamState:
        return self._conn._core.stream_state(self.stream_id)

    def statistics(self) -> StreamStatistics:
        info = self._conn._core.stream_info(self.stream_id)
        blocked = self._blocked_total
        if self._blocked_since is not None:
            blocked += trio.current_time() - self._blocked_since
        return StreamStatistics(
            stream_id=self.stream_id,
            label=self.label,
            bytes_sent=info.bytes_sent if info else self._bytes_sent,
            bytes_received=self._bytes_received,
            frames_sent=self._frames_sent,
            frames_received=self._frames_received,
            send_credit=info.send_credit if info else 0,
            receive_window=info.receive_window if info else 0,
            buffered=self._buffered,
            blocked_on_credit_s=blocked,
            bandwidth_limit=self._rate.rate,
            bytes_spliced=self._bytes_spliced,
            pages_raw_bytes=self._pages_raw_bytes,
            pages_wire_bytes=self._pages_wire_bytes,
        )

    def __repr__(self) -> str:
        return f"<TunnelStream {self.stream_id} {self.label!r}>"


def _record_of(event: object) -> Record:
    if isinstance(event, PagesReceived):
        return PagesRecord(region=event.region, page_size=event.page_size, addresses=event.addresses, data=event.data)
    if isinstance(event, ZeroPagesReceived):
        return ZeroPagesRecord(region=event.region, page_size=event.page_size, runs=event.runs)
    if isinstance(event, IterationReceived):
        return IterationRecord(iteration=event.iteration, final=event.final)
    assert isinstance(event, DeviceStateReceived)
    return DeviceStateRecord(name=event.name, version=event.version, data=event.data)


def record_size(record: PagesRecord | ZeroPagesRecord | DeviceStateRecord | IterationRecord | CompressedPages) -> int:
    """Flow-controlled payload size of *record* on the wire (uncompressed, for a PagesRecord)."""
    if isinstance(record, PagesRecord):
        return 16 + 8 * len(record.addresses) + len(record.data)
    if isinstance(record, CompressedPages):
        return 16 + 8 * len(record.addresses) + len(record.compressed)
    if isinstance(record, ZeroPagesRecord):
        return 16 + 16 * len(record.runs)
    if isinstance(record, IterationRecord):
        return 8
    return 6 + len(record.name.encode("utf-8")) + len(record.data)

