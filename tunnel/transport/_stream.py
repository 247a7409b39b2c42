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

from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Union

import trio

from .._errors import ErrorCode, TunnelError
from .._events import DeviceStateReceived, PagesReceived, ZeroPagesReceived
from .._frames import Buffer
from .._state import StreamState
from ._ratelimit import RateLimit
from ._stats import StreamStatistics
from ._util import BrokenStream, ConflictGuard, Signal, aborted

if TYPE_CHECKING:
    from ._connection import TunnelConnection

__all__ = ["DeviceStateRecord", "PagesRecord", "Record", "TunnelStream", "ZeroPagesRecord", "record_size"]


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


#: What :meth:`TunnelStream.receive_record` returns; ``b""`` means end of stream.
Record = Union[bytes, memoryview, PagesRecord, ZeroPagesRecord, DeviceStateRecord]


class _Outgoing:
    """The one piece of work a stream has handed to the writer."""

    __slots__ = ("data", "record", "done", "error")

    def __init__(self, data: memoryview | None, record: object | None) -> None:
        self.data = data
        self.record = record
        self.done = trio.Event()
        self.error: BaseException | None = None


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
        # receive side
        self._recv_guard = ConflictGuard("another task is receiving on this stream")
        self._backlog: deque[tuple[object, int]] = deque()  # (item, flow-controlled length)
        self._buffered = 0
        self._head_offset = 0  # bytes of the first backlog item already taken
        self._eof_received = False
        self._recv_signal = Signal()
        self._frames_received = 0
        self._bytes_received = 0
        # both
        self._closed = False
        self._error: BaseException | None = None

    # ------------------------------------------------------------------
    # Called by the connection

    def _on_record(self, item: object, length: int) -> None:
        if self._closed or self._error is not None:
            self._conn._acknowledge(self.stream_id, length)
            return
        self._backlog.append((item, length))
        self._buffered += length
        self._bytes_received += length
        self._frames_received += 1
        self._recv_signal.fire()

    def _on_eof(self) -> None:
        self._eof_received = True
        self._recv_signal.fire()

    def _on_error(self, error: BaseException) -> None:
        """The stream was aborted or the connection died."""
        if self._error is None:
            self._error = error
        if not self._eof_received or not isinstance(error, BrokenStream):
            self._drop_backlog()
        out, self._outgoing = self._outgoing, None
        if out is not None:
            out.error = error
            out.done.set()
        self._recv_signal.fire()
        self._credit_signal.fire()

    def _on_credit(self) -> None:
        self._credit_signal.fire()

    def _drop_backlog(self) -> None:
        if self._buffered:
            self._conn._acknowledge(self.stream_id, self._buffered)
        self._backlog.clear()
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
            raise
        if out.error is not None:
            if self._closed:
                raise trio.ClosedResourceError("the stream was closed") from None
            raise out.error

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

    async def send_record(self, record: PagesRecord | ZeroPagesRecord | DeviceStateRecord) -> None:
        """Send one typed record, in order with the stream's data."""
        with self._send_guard:
            self._check_send()
            self._conn._check_record_fits(record)
            await self._hand_over(_Outgoing(None, record))

    async def send_pages(self, *, region: int, page_size: int, addresses: tuple[int, ...], data: Buffer) -> None:
        await self.send_record(PagesRecord(region=region, page_size=page_size, addresses=tuple(addresses), data=data))

    async def send_zero_pages(self, *, region: int, page_size: int, runs: tuple[tuple[int, int], ...]) -> None:
        await self.send_record(ZeroPagesRecord(region=region, page_size=page_size, runs=tuple(runs)))

    async def send_device_state(self, *, name: str, version: int = 0, data: Buffer = b"") -> None:
        await self.send_record(DeviceStateRecord(name=name, version=version, data=data))

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

    async def _wait_item(self) -> bool:
        """Wait for a backlog item; False at end of stream."""
        while not self._backlog:
            if self._closed:
                raise trio.ClosedResourceError("the stream was closed")
            if self._eof_received:
                return False
            if self._error is not None:
                raise self._error
            await self._recv_signal.wait()
        if self._closed:
            raise trio.ClosedResourceError("the stream was closed")
        return True

    def _take_bytes(self, max_bytes: int | None, view_ok: bool) -> Buffer:
        item, length = self._backlog[0]
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
        self._buffered -= taken
        self._conn._acknowledge(self.stream_id, taken)
        if start == 0 and end == length and isinstance(item, bytes):
            return item
        chunk = memoryview(item)[start:end]
        return chunk if view_ok else bytes(chunk)

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
            if not await self._wait_item():
                await trio.lowlevel.checkpoint()
                return b""
            data = self._take_bytes(max_bytes, view_ok=False)
            await trio.lowlevel.checkpoint()
            assert isinstance(data, bytes)
            return data

    async def receive_view(self, max_bytes: int | None = None) -> Buffer:
        """Like :meth:`receive_some` without a copy: may return a memoryview."""
        self._check_max(max_bytes)
        with self._recv_guard:
            if not await self._wait_item():
                await trio.lowlevel.checkpoint()
                return b""
            data = self._take_bytes(max_bytes, view_ok=True)
            await trio.lowlevel.checkpoint()
            return data

    async def receive_record(self) -> Record:
        """The next data chunk or typed record; ``b""`` at end of stream."""
        with self._recv_guard:
            if not await self._wait_item():
                await trio.lowlevel.checkpoint()
                return b""
            item, length = self._backlog[0]
            if isinstance(item, (bytes, memoryview)):
                data = self._take_bytes(None, view_ok=True)
            else:
                self._backlog.popleft()
                self._buffered -= length
                self._conn._acknowledge(self.stream_id, length)
                data = _record_of(item)
            await trio.lowlevel.checkpoint()
            return data

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
            out, self._outgoing = self._outgoing, None
            if out is not None:
                out.error = trio.ClosedResourceError("the stream was closed")
                out.done.set()
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
        )

    def __repr__(self) -> str:
        return f"<TunnelStream {self.stream_id} {self.label!r}>"


def _record_of(event: object) -> Record:
    if isinstance(event, PagesReceived):
        return PagesRecord(region=event.region, page_size=event.page_size, addresses=event.addresses, data=event.data)
    if isinstance(event, ZeroPagesReceived):
        return ZeroPagesRecord(region=event.region, page_size=event.page_size, runs=event.runs)
    assert isinstance(event, DeviceStateReceived)
    return DeviceStateRecord(name=event.name, version=event.version, data=event.data)


def record_size(record: PagesRecord | ZeroPagesRecord | DeviceStateRecord) -> int:
    """Flow-controlled payload size of *record* on the wire."""
    if isinstance(record, PagesRecord):
        return 16 + 8 * len(record.addresses) + len(record.data)
    if isinstance(record, ZeroPagesRecord):
        return 16 + 16 * len(record.runs)
    return 6 + len(record.name.encode("utf-8")) + len(record.data)

