"""One stream's receive side: what the reader delivered and the application has not taken.

The reader task appends what arrives for a stream to its inbox's backlog
(:meth:`Inbox.deliver`) and never waits for the application; the peer
cannot send more than the stream window, so the backlog is bounded by it.
Credit goes back to the peer (:meth:`StreamLink.acknowledge`) only when the
application takes an item, or when the backlog is dropped.

Ownership.  Each backlog item may be a slice of one of the reader's pooled
buffers; the inbox then holds a reference (``ReadBuffer.refs``) and
releases it when the item is taken and consumed, or dropped.  The buffer
behind the last item handed to the application (``lent``) is released at
the next receive call.  A file sink (``receive_fd``) owns its pipes; while
it exists it is registered in the connection's :class:`SinkRegistry`, so
the reader splices that stream's DATA payload into it.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Awaitable, Callable

import trio

from .._errors import ErrorCode, TunnelError
from .._frames import Buffer
from .._records import DeviceStateRecord, IterationRecord, PagesRecord, ZeroPagesRecord, ZstdPagesRecord
from .._records import Record as TypedRecord
from ._buffers import ReadBuffer
from ._compress import DECOMPRESS_THREAD_MIN, CompressionError, PageDecompressor, run_sized
from ._link import StreamLink
from ._splice import KernelPipe, SinkQueue
from ._util import BrokenStream, Signal, aborted

__all__ = ["Inbox", "Item", "SinkRegistry"]

#: What the reader puts in a backlog: a chunk of stream bytes or a typed record.
Item = Buffer | TypedRecord
#: The typed records the application receives (ZSTD_PAGES comes out as PAGES).
_Plain = PagesRecord | ZeroPagesRecord | DeviceStateRecord | IterationRecord


class SinkRegistry:
    """The inboxes whose DATA payload the reader splices into a file (``receive_fd``), by stream id.

    Owned by the connection; inboxes add and remove themselves, the reader looks them up.
    """

    __slots__ = ("_by_id",)

    def __init__(self) -> None:
        self._by_id: dict[int, Inbox] = {}

    def __contains__(self, stream_id: object) -> bool:
        return stream_id in self._by_id

    def __bool__(self) -> bool:
        return bool(self._by_id)

    def get(self, stream_id: int) -> Inbox | None:
        return self._by_id.get(stream_id)

    def add(self, inbox: Inbox) -> None:
        self._by_id[inbox.stream_id] = inbox

    def remove(self, inbox: Inbox) -> None:
        if self._by_id.get(inbox.stream_id) is inbox:
            del self._by_id[inbox.stream_id]


class Inbox:
    """A stream's backlog, its end-of-stream mark, and its file sink."""

    def __init__(self, stream_id: int, link: StreamLink, sinks: SinkRegistry) -> None:
        self.stream_id = stream_id
        self._link = link
        self._sinks = sinks
        # (item, flow-controlled length, pooled read buffer the item is a slice of)
        self._backlog: deque[tuple[Item, int, ReadBuffer | None]] = deque()
        self._lent: ReadBuffer | None = None  # buffer behind the last item handed out
        #: Flow-controlled bytes delivered and not yet taken.
        self.buffered = 0
        self._head_offset = 0  # bytes of the first backlog item already taken
        self.eof = False
        self.closed = False
        self.error: BaseException | None = None
        self._signal = Signal()
        self.sink: SinkQueue | None = None
        #: Queued for the reader's next flush of sinks.
        self.dirty = False
        self._decompressor: PageDecompressor | None = None  # created by the first ZSTD_PAGES
        self.frames_received = 0
        self.bytes_received = 0
        self.bytes_spliced = 0

    # ------------------------------------------------------------------
    # The reader's side

    def deliver(self, item: Item, length: int, buf: ReadBuffer | None) -> bool:
        """Take what arrived for the stream.  True if it went to the file sink (the
        reader then flushes the sink before it next waits)."""
        if self.closed or self.error is not None:
            self._link.acknowledge(self.stream_id, length)
            if buf is not None:
                buf.release()
            return False
        self.buffered += length
        self.bytes_received += length
        self.frames_received += 1
        sink = self.sink
        if sink is not None and isinstance(item, (bytes, memoryview)):
            sink.add_memory(item, buf)
            return True
        self._backlog.append((item, length, buf))
        self._signal.fire()
        return False

    def spliced(self, pipe: KernelPipe, size: int) -> None:
        """The reader spliced *size* payload bytes into *pipe*, one of this inbox's sink's."""
        sink = self.sink
        assert sink is not None
        sink.add_pipe(pipe, size)
        self.buffered += size
        self.bytes_received += size

    def flush_sink(self) -> None:
        """Move what the sink takes without blocking, and return its credit."""
        sink = self.sink
        if sink is None:
            return
        moved, spliced = sink.flush()
        if moved:
            self.bytes_spliced += spliced
            self.buffered -= moved
            self._link.acknowledge(self.stream_id, moved)
        if sink.blocked or sink.error is not None:
            sink.signal.fire()  # receive_fd's task waits for the sink, or raises

    def ended(self) -> None:
        self.eof = True
        if self.sink is not None:
            self.sink.signal.fire()
        self._signal.fire()

    def fail(self, error: BaseException) -> None:
        """The stream was aborted or the connection died.

        After end of stream, what is buffered stays readable if only the connection went.
        """
        if self.error is None:
            self.error = error
        if not self.eof or not isinstance(error, BrokenStream):
            self._drop_backlog()
        self._wake()

    def close(self) -> None:
        """aclose(): nothing more is received; what is buffered goes back as credit."""
        self.closed = True
        self._drop_backlog()
        self.release_lent()  # no receive comes after aclose
        self._wake()

    def _wake(self) -> None:
        if self.sink is not None:
            self.sink.signal.fire()
        self._signal.fire()

    def _drop_backlog(self) -> None:
        if self.buffered:
            self._link.acknowledge(self.stream_id, self.buffered)
        for _, _, buf in self._backlog:
            if buf is not None:
                buf.release()
        self._backlog.clear()
        if self.sink is not None:
            self.sink.signal.fire()  # receive_fd's task may wait on it: it must wake and raise
            self._sinks.remove(self)
            for _, buf in self.sink.release():
                if buf is not None:
                    buf.release()
            self.sink = None
        # Not the lent buffer: the application may still hold a view of it,
        # valid until its next receive call (or aclose), error or not.
        self.buffered = 0
        self._head_offset = 0

    # ------------------------------------------------------------------
    # The application's side (through the stream's receive methods)

    def release_lent(self) -> None:
        if self._lent is not None:
            self._lent.release()
            self._lent = None

    def _check_open(self) -> None:
        if self.closed:
            raise trio.ClosedResourceError("the stream was closed")

    async def wait_item(self, want: int | None = None) -> tuple[bool, bool]:
        """Wait for a backlog item: (False at end of stream, whether it blocked).

        A receive that blocked here has had its checkpoint; one that did not
        still owes one.  *want* is how much the caller asked for (None: a
        frame's worth), granted to a peer that holds no credit (window 0).
        """
        self.release_lent()  # what the previous receive returned is no longer needed
        blocked = False
        while not self._backlog:
            self._check_open()
            if self.eof:
                return False, blocked
            if self.error is not None:
                raise self.error
            self._link.request_data(self.stream_id, want)
            await self._signal.wait()
            blocked = True
        self._check_open()
        return True, blocked

    def take_bytes(self, max_bytes: int | None, view_ok: bool) -> Buffer:
        item, length, buf = self._backlog[0]
        if not isinstance(item, (bytes, bytearray, memoryview)):
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
        self.buffered -= taken
        self._link.acknowledge(self.stream_id, taken)
        if start == 0 and end == length and isinstance(item, bytes):
            return item
        chunk = memoryview(item)[start:end]
        if view_ok:
            self._lent = buf
            return chunk
        if buf is not None:
            buf.release()
        return bytes(chunk)

    async def take_item(self) -> tuple[bytes | memoryview | _Plain, bool]:
        """The head of the backlog (ready, see wait_item): a data chunk or a typed record,
        ZSTD_PAGES decompressed; and whether taking it checkpointed (decompressing does)."""
        item, length, buf = self._backlog[0]
        if isinstance(item, ZstdPagesRecord):
            return await self._take_compressed(item, length, buf), True
        if isinstance(item, (bytes, bytearray, memoryview)):
            chunk = self.take_bytes(None, view_ok=True)
            assert not isinstance(chunk, bytearray)  # slices of the backlog's bytes or views
            return chunk, False
        self._backlog.popleft()
        self._lent = buf
        self.buffered -= length
        self._link.acknowledge(self.stream_id, length)
        return item, False  # a typed record, as the core decoded it

    async def _take_compressed(self, item: ZstdPagesRecord, length: int, buf: ReadBuffer | None) -> PagesRecord:
        """Decompress the ZSTD_PAGES record at the head of the backlog into a PagesRecord.

        A corrupt frame or a wrong size is a stream error PROTOCOL_ERROR
        (protocol.md §4.17): the stream is aborted and the error raised.
        """
        size = item.raw_size
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
            self._check_open()
            assert self.error is not None
            raise self.error
        if failure is not None:
            reason = f"bad ZSTD_PAGES: {failure}"
            self._link.abort_stream(self.stream_id, ErrorCode.PROTOCOL_ERROR, reason)
            error = aborted(ErrorCode.PROTOCOL_ERROR, reason, remote=False)
            self.fail(error)  # drops the backlog, this record included, and gives its credit back
            raise error
        self._backlog.popleft()
        if buf is not None:
            buf.release()
        self.buffered -= length
        self._link.acknowledge(self.stream_id, length)
        return PagesRecord(region=item.region, page_size=item.page_size, addresses=item.addresses, data=data)

    async def drain_into(
        self, fd: int, wait_writable: Callable[[int], Awaitable[None]], abort: Callable[[str], Awaitable[None]]
    ) -> int:
        """receive_fd's spliced path: route this stream's payload into *fd* until end of stream.

        Returns the bytes written.  What the backlog already holds goes first;
        then the reader splices the payload into the sink's pipes and this
        task moves it on whenever the sink would block.  If writing to *fd*
        fails, ``abort(reason)`` aborts the stream and the error is raised.
        """
        for item, _, _ in self._backlog:
            if not isinstance(item, (bytes, memoryview)):
                raise TunnelError(f"stream {self.stream_id} carries typed records: use receive_record()")
        # Pipes for the whole receive window: the reader never has to copy this payload through memory.
        sink = SinkQueue(fd, self._link.receive_window)
        while self._backlog:
            item, _, buf = self._backlog.popleft()
            start, self._head_offset = self._head_offset, 0
            sink.add_memory(memoryview(item)[start:], buf)  # type: ignore[arg-type]
        self.sink = sink
        self._sinks.add(self)
        try:
            while True:
                self._check_open()
                if self.error is not None and not self.eof:
                    raise self.error
                if sink.error is not None:
                    await abort(f"destination write failed: {sink.error}")
                    raise sink.error
                if sink.blocked:
                    await wait_writable(fd)
                    sink.blocked = False
                    if self.sink is sink:
                        self.flush_sink()
                elif sink.segments:
                    self.flush_sink()
                elif self.eof:
                    break
                else:
                    self._link.request_data(self.stream_id, None)
                    await sink.signal.wait()  # the reader moves the data on while the sink keeps up
        finally:
            if self.sink is sink:
                self.sink = None
            self._sinks.remove(self)
            leftover = sink.release()
            if not self.closed and self.error is None:
                for data, buf in reversed(leftover):  # back to the backlog, in order
                    self._backlog.appendleft((data, len(data), buf))
            else:
                for _, buf in leftover:
                    if buf is not None:
                        buf.release()
        return sink.written

    def has_typed_records(self) -> bool:
        return any(not isinstance(item, (bytes, bytearray, memoryview)) for item, _, _ in self._backlog)
