"""One tunnel stream, as a ``trio.abc.HalfCloseableStream`` with typed records.

A stream is two parts and a link.  Its :class:`~._outbox.Outbox` holds the
one piece of work ``send_all``/``send_record``/``send_fd`` has handed to the
connection's writer task (the caller's buffer, not a copy), and the stream
waits until the writer has put all of it on the wire; so each stream holds
at most one caller buffer and nothing is queued behind it.  Its
:class:`~._inbox.Inbox` holds what the connection's reader delivered and the
application has not taken; credit goes back to the peer only when
``receive_*`` hands an item to the application.  Everything the stream asks
of its connection goes through its :class:`~._link.StreamLink`.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Awaitable, Callable

import trio

from .._errors import ErrorCode
from .._frames import Buffer, DigestAlgorithm
from .._records import (
    DeviceStateRecord,
    IterationRecord,
    PagesRecord,
    ZeroPagesRecord,
    ZstdPagesRecord,
    payload_size,
)
from .._records import Record as TypedRecord
from .._state import StreamState
from ._compress import COMPRESS_THREAD_MIN, PageCompressor, run_sized
from ._inbox import Inbox, SinkRegistry
from ._link import StreamLink
from ._outbox import Outbox, Work
from ._splice import PipeSource, is_spliceable, widen_pipe
from ._stats import StreamStatistics
from ._util import ConflictGuard, Health, Signal, aborted

__all__ = ["Record", "StreamTable", "TunnelStream"]

#: What :meth:`TunnelStream.receive_record` returns (``b""`` means end of stream)
#: and :meth:`TunnelStream.send_record` takes: a chunk of stream bytes or a typed
#: record (``send_record`` also takes a :class:`ZstdPagesRecord`, which
#: ``receive_record`` hands out decompressed, as a ``PagesRecord``).
Record = bytes | memoryview | PagesRecord | ZeroPagesRecord | DeviceStateRecord | IterationRecord


class TunnelStream(trio.abc.HalfCloseableStream):
    """A flow-controlled, full-duplex stream inside a tunnel connection."""

    def __init__(
        self,
        link: StreamLink,
        sinks: SinkRegistry,
        stream_id: int,
        *,
        kind: int,
        digest: int,
        migration_id: bytes,
        label: str,
        bandwidth: int = 0,
        compress: bool = False,
    ) -> None:
        self._link = link
        self.stream_id = stream_id
        self.kind = kind
        self.digest = digest
        self.migration_id = migration_id
        self.label = label
        #: The send side, which the connection's writer serves.
        self.outbox = Outbox(stream_id, link.schedule, bandwidth)
        #: The receive side, which the connection's reader fills.
        self.inbox = Inbox(stream_id, link, sinks)
        self._send_guard = ConflictGuard("another task is sending on this stream")
        self._recv_guard = ConflictGuard("another task is receiving on this stream")
        self._eof_sent = False
        #: set_buffering(): what send_fd may read ahead of credit (None: its pipe or chunk).
        self._staging: int | None = None
        # Page batches are compressed only when asked for and both sides set ZSTD.
        self._compressor: PageCompressor | None = PageCompressor() if compress and link.compression else None
        self._pages_raw_bytes = 0
        self._pages_wire_bytes = 0
        #: Waits on a file descriptor (send_fd and receive_fd may both wait at once), woken on failure.
        self._fd_scopes: set[trio.CancelScope] = set()
        self._closed = False
        self._error: BaseException | None = None

    # ------------------------------------------------------------------
    # Called by the connection

    def failed(self, error: BaseException) -> None:
        """The stream was aborted (by the peer, or on a stream error) or the connection died."""
        if self._error is None:
            self._error = error
        self.inbox.fail(error)
        self.outbox.fail(error)
        self._cancel_fd_waits()

    def _cancel_fd_waits(self) -> None:
        for scope in self._fd_scopes:
            scope.cancel()

    # ------------------------------------------------------------------
    # Sending

    def _check_send(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("the stream was closed")
        if self._eof_sent:
            raise trio.ClosedResourceError("send_eof() was called on this stream")
        if self._error is not None:
            raise self._error

    async def _hand_over(self, work: Work) -> None:
        self.outbox.hand_over(work)
        try:
            await work.done.wait()
        except BaseException:
            self.outbox.take_back(work)
            if not work.done.is_set():
                self._break_send()
            raise
        if work.error is not None:
            if self._closed:
                raise trio.ClosedResourceError("the stream was closed") from None
            raise work.error

    def _break_send(self) -> None:
        """A send was interrupted part way (cancelled): break the stream.

        The peer may have part of it, and the writer may still be writing
        slices of the caller's buffer.  As trio's SSLStream does, the stream
        is broken from now on (``trio.BrokenResourceError``), and the peer
        gets STREAM_ABORT: a half-done send must never end cleanly.
        """
        if self._error is None and not self._closed:
            reason = "the sender was cancelled during a send"
            self._link.abort_stream(self.stream_id, ErrorCode.CANCEL, reason)
            self.failed(aborted(ErrorCode.CANCEL, reason, remote=False))

    async def send_all(self, data: Buffer) -> None:
        with self._send_guard:
            self._check_send()
            view = memoryview(data)
            if view.ndim != 1 or view.format != "B":
                view = view.cast("B")
            if not len(view):
                await trio.lowlevel.checkpoint()
                return
            await self._hand_over(Work(view))

    @property
    def compress(self) -> bool:
        """Whether page batches sent on this stream are compressed (asked for, and ZSTD negotiated)."""
        return self._compressor is not None

    async def send_record(self, record: Record | ZstdPagesRecord) -> None:
        """Send one typed record (or a chunk of bytes, as :meth:`send_all`), in order with the stream's data.

        On a stream opened with ``compress=True`` a page batch goes as
        ZSTD_PAGES when compressing pays, else as PAGES; the peer reads a
        ``PagesRecord`` either way.  The batch must fit uncompressed.
        """
        if isinstance(record, bytes | bytearray | memoryview):
            await self.send_all(record)
            return
        with self._send_guard:
            self._check_send()
            size = payload_size(record)
            self._link.check_record_fits(size)
            wire: TypedRecord = record
            if type(record) is PagesRecord and self._compressor is not None and len(record.data):
                raw = len(record.data)
                compressed = await run_sized(raw, COMPRESS_THREAD_MIN, self._compressor.compress, record.data)
                self._check_send()  # the stream may have failed meanwhile
                if compressed is not None:
                    wire = ZstdPagesRecord(
                        region=record.region, page_size=record.page_size, addresses=record.addresses, compressed=compressed
                    )
                    size = payload_size(wire)
            await self._hand_over(Work(None, wire, size))
            if type(record) is PagesRecord:
                self._pages_raw_bytes += len(record.data)
                self._pages_wire_bytes += len(wire.compressed) if type(wire) is ZstdPagesRecord else len(record.data)

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
            while self._link.send_window(self.stream_id) <= 0:
                await self.outbox.credit.wait()
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
                self._link.end_stream(self.stream_id)
            await trio.lowlevel.checkpoint()

    # ------------------------------------------------------------------
    # Receiving

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
            ready, blocked = await self.inbox.wait_item(max_bytes)
            data = self.inbox.take_bytes(max_bytes, view_ok=False) if ready else b""
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
            ready, blocked = await self.inbox.wait_item(max_bytes)
            data = self.inbox.take_bytes(max_bytes, view_ok=True) if ready else b""
            if not blocked:
                await trio.lowlevel.checkpoint()
            return data

    async def receive_record(self) -> Record:
        """The next data chunk or typed record; ``b""`` at end of stream."""
        with self._recv_guard:
            ready, blocked = await self.inbox.wait_item()
            if not ready:
                if not blocked:
                    await trio.lowlevel.checkpoint()
                return b""
            item, checkpointed = await self.inbox.take_item()
            if not blocked and not checkpointed:
                await trio.lowlevel.checkpoint()
            return item

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
            if self._spliceable(fd):
                return await self._send_fd_spliced(fd, limit)
            return await self._send_fd_copied(fd, limit)

    def _spliceable(self, fd: int) -> bool:
        return self._link.can_splice and self.digest == DigestAlgorithm.NONE and is_spliceable(fd)

    async def _send_fd_copied(self, fd: int, limit: int | None) -> int:
        buf = bytearray(self._link.chunk_size)
        view = memoryview(buf)
        total = 0
        while limit is None or total < limit:
            want = len(buf) if self._staging is None else min(len(buf), self._staging)
            if limit is not None:
                want = min(want, limit - total)
            try:
                size = os.readv(fd, [view[:want]])
            except BlockingIOError:
                await self._wait_fd(trio.lowlevel.wait_readable, fd, None)
                continue
            if not size:
                break
            self._check_send()  # the stream may have failed while we waited for the fd: nobody would fail this hand-over
            await self._hand_over(Work(view[:size]))
            total += size
        await trio.lowlevel.checkpoint()
        return total

    async def _wait_fd(self, wait: Callable[[int], Awaitable[None]], fd: int, work: Work | None) -> None:
        """Wait on *fd*, but wake with the stream's error if it fails meanwhile."""
        with trio.CancelScope() as scope:
            if work is not None:
                work.wait_scope = scope
            self._fd_scopes.add(scope)
            try:
                await wait(fd)
            finally:
                self._fd_scopes.discard(scope)
        if work is not None:
            work.wait_scope = None
        if self._closed:
            raise trio.ClosedResourceError("the stream was closed")
        if self._error is not None:
            raise self._error

    async def _send_fd_spliced(self, fd: int, limit: int | None) -> int:
        source = PipeSource(fd, limit, self._staging)
        work = Work(None, source=source)
        self.outbox.work = work
        try:
            while True:
                if work.error is not None:
                    raise work.error
                if source.fill():
                    self.outbox.schedule()
                if source.error is not None:
                    raise source.error
                if source.pipe.level:
                    # The writer sends it, topping the pipe up from the source before
                    # each frame, and wakes us once the pipe ran empty.
                    await work.drained.wait()
                elif source.eof:
                    break
                else:
                    await self._wait_fd(trio.lowlevel.wait_readable, fd, work)
        except BaseException:
            if work.error is None and source.error is None:
                self._break_send()  # cancelled: bytes taken from fd may never be sent
            raise
        finally:
            self.outbox.take_back(work)
            if work.writing:
                work.abandoned = True  # the writer closes the pipe when its splice is done
            else:
                source.pipe.close()
        if work.error is not None:
            raise work.error
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
            self.inbox.release_lent()
            if self._closed:
                raise trio.ClosedResourceError("the stream was closed")
            os.set_blocking(fd, False)
            widen_pipe(fd)
            if self._spliceable(fd):
                total = await self.inbox.drain_into(fd, self._wait_writable, self._abort_write)
            else:
                total = 0
                while (await self.inbox.wait_item())[0]:
                    data = self.inbox.take_bytes(None, view_ok=True)
                    total += await self._write_fd(fd, memoryview(data))
                    self.inbox.release_lent()
            await trio.lowlevel.checkpoint()
            return total

    async def _wait_writable(self, fd: int) -> None:
        await self._wait_fd(trio.lowlevel.wait_writable, fd, None)

    async def _abort_write(self, reason: str) -> None:
        await self.abort(ErrorCode.APPLICATION_ERROR, reason)

    async def _write_fd(self, fd: int, view: memoryview) -> int:
        written = 0
        while written < len(view):
            try:
                written += os.write(fd, view[written:])
            except BlockingIOError:
                await self._wait_writable(fd)
            except OSError as exc:
                await self._abort_write(f"destination write failed: {exc}")
                raise
        return written

    # ------------------------------------------------------------------
    # Control

    def set_bandwidth(self, bytes_per_second: int) -> None:
        """Limit this stream's send rate (0 for none); takes effect at once."""
        self.outbox.rate.set_rate(bytes_per_second)
        self.outbox.schedule()

    @property
    def bandwidth(self) -> int:
        return self.outbox.rate.rate

    def set_buffering(self, size: int | None) -> None:
        """Hold about *size* bytes of this stream on this side from now on, in each direction.

        For a stream whose latency comes to matter more than its throughput:
        what is asked for next waits behind less.  (QEMU's post-copy looked
        like one, but its total blocktime did not fall: see the daemon's
        ``postcopy_buffers``.)  Sending from a file
        descriptor, at most *size* bytes are read ahead of the peer's credit;
        receiving, the peer is granted a window of *size* bytes
        (``resize_stream_window``: credit it holds stays valid, less comes
        back).  None restores the defaults.  Takes effect at once; nothing
        queued is lost.
        """
        if size is not None and size <= 0:
            raise ValueError("buffering must be positive (or None for the default)")
        self._staging = size
        work = self.outbox.work
        if work is not None and work.source is not None:
            work.source.staging = size
        self._link.resize_window(self.stream_id, self._link.receive_window if size is None else size)

    async def abort(self, error_code: int = ErrorCode.CANCEL, reason: str = "aborted by the application") -> None:
        """Abort both directions; the peer's operations raise StreamAborted with *reason*."""
        if not self._closed and self._error is None:
            self._link.abort_stream(self.stream_id, error_code, reason)
            self.failed(aborted(error_code, reason, remote=False))
        await trio.lowlevel.checkpoint()

    async def aclose(self) -> None:
        """Close both directions: sends end of stream, and aborts the receive side if still open."""
        if not self._closed:
            self._closed = True
            if self._error is None:
                self._link.close_stream(self.stream_id, eof_sent=self._eof_sent, sending=self.outbox.work is not None)
            self.inbox.close()
            self.outbox.fail(trio.ClosedResourceError("the stream was closed"))
            self._cancel_fd_waits()
            self._link.forget(self.stream_id)
        await trio.lowlevel.checkpoint()

    @property
    def state(self) -> StreamState:
        return self._link.stream_state(self.stream_id)

    def statistics(self) -> StreamStatistics:
        info = self._link.stream_info(self.stream_id)
        inbox, outbox = self.inbox, self.outbox
        return StreamStatistics(
            stream_id=self.stream_id,
            label=self.label,
            bytes_sent=info.bytes_sent if info else outbox.bytes_sent,
            bytes_received=inbox.bytes_received,
            frames_sent=outbox.frames_sent,
            frames_received=inbox.frames_received,
            send_credit=info.send_credit if info else 0,
            receive_window=info.receive_window if info else 0,
            buffered=inbox.buffered,
            blocked_on_credit_s=outbox.blocked_seconds(trio.current_time()),
            bandwidth_limit=outbox.rate.rate,
            bytes_spliced=outbox.bytes_spliced + inbox.bytes_spliced,
            pages_raw_bytes=self._pages_raw_bytes,
            pages_wire_bytes=self._pages_wire_bytes,
        )

    def __repr__(self) -> str:
        return f"<TunnelStream {self.stream_id} {self.label!r}>"


class StreamTable:
    """The connection's streams by id, and those the peer opened that wait for ``accept_stream``.

    Owned by the connection: the reader routes events through it, the
    application's ``open_stream``/``accept_stream`` add and take streams, and
    a stream's ``aclose`` removes it (through its link).
    """

    def __init__(self, health: Health) -> None:
        self._health = health
        self._by_id: dict[int, TunnelStream] = {}
        self._incoming: deque[TunnelStream] = deque()
        self._arrived = Signal()

    def get(self, stream_id: int) -> TunnelStream | None:
        return self._by_id.get(stream_id)

    def add(self, stream: TunnelStream) -> None:
        self._by_id[stream.stream_id] = stream

    def add_incoming(self, stream: TunnelStream) -> None:
        self._by_id[stream.stream_id] = stream
        self._incoming.append(stream)
        self._arrived.fire()

    def forget(self, stream_id: int) -> None:
        self._by_id.pop(stream_id, None)

    def statistics(self) -> tuple[StreamStatistics, ...]:
        return tuple(s.statistics() for s in self._by_id.values())

    def credit_granted(self, stream_id: int) -> None:
        """WINDOW_UPDATE: wake the stream's sender, or every sender for the connection window (0)."""
        if stream_id == 0:
            for each in self._by_id.values():
                each.outbox.credit.fire()
        else:
            stream = self._by_id.get(stream_id)
            if stream is not None:
                stream.outbox.credit.fire()

    async def accept(self) -> TunnelStream:
        while not self._incoming:
            self._health.check()
            await self._arrived.wait()
        stream = self._incoming.popleft()
        await trio.lowlevel.checkpoint()
        return stream

    def fail_all(self, error: BaseException) -> None:
        """The connection failed: every stream (accepted or not) fails with *error*."""
        for stream in list(self._by_id.values()) + list(self._incoming):
            stream.failed(error)
        self._arrived.fire()
