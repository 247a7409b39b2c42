"""The trio driver: RPC and streams multiplexed on one trio stream.

Theory of operation.  Three background tasks serve one
:class:`tunnel.Connection` core.  The *reader* reads from the transport and
dispatches the core's events to streams, calls and handlers; it never waits
for an application, so one slow consumer cannot stall the others (each
stream's backlog is bounded by its window instead).  It lives in
:mod:`._reading`, with how it keeps reads and wakeups few.  The *writer* is the
only task that writes: each round it first drains what the core has queued
(RPC, window updates, pongs, opens, ends, aborts) and only then writes one
data frame, taken round-robin from the streams that have data, credit and
bandwidth budget.  So control traffic waits behind at most one data frame,
and N busy streams get equal shares.  The *watchdog* task pings an idle
peer and declares it dead after the keepalive timeout, and drops a peer
whose frame stays incomplete for ``frame_timeout``.

What one connection costs is bounded whatever the peer does.  The reader
starts with a small buffer and takes large pooled ones only once the
handshake is done and reads fill the small one (:mod:`._reading`).  It
stops reading while the answers it owes the peer and has not yet written
exceed ``max_control_backlog`` (counted by the core,
``Connection.pending_control_bytes``), so a peer that sends without
reading is throttled by its own socket, not buffered for.

Every failure (transport error, protocol error, keepalive timeout, GOODBYE)
goes through :meth:`TunnelConnection._fail`, which fails every stream and
pending call with :class:`tunnel.ConnectionLost`; the writer then flushes any
GOODBYE the core queued and closes the transport.
"""

from __future__ import annotations

import dataclasses
import math
import socket
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager

import trio

from .._connection import Connection
from .._errors import ErrorCode, FrameTooLargeError, LocalProtocolError, RPCError
from .._events import (
    CallFailed,
    CallReceived,
    ConnectionTerminated,
    DataReceived,
    DeviceStateReceived,
    Event,
    HandshakeComplete,
    IterationReceived,
    PagesReceived,
    PongReceived,
    ReplyReceived,
    StreamEnded,
    StreamOpened,
    StreamReset,
    WindowUpdated,
    ZeroPagesReceived,
    ZstdPagesReceived,
)
from .._frames import Buffer, DigestAlgorithm, StreamKind
from .._settings import Feature, Settings
from .._state import StreamState
from ._buffers import BufferPool, ReadBuffer
from ._compress import CompressedPages, zstd_available
from ._io import BufferWriter, raw_socket, tune_socket
from ._reading import SMALL_READ_SIZE, Reading
from ._splice import SinkQueue, can_splice
from ._stats import ConnectionStatistics
from ._stream import DeviceStateRecord, IterationRecord, PagesRecord, TunnelStream, ZeroPagesRecord, _Outgoing, record_size
from ._util import BrokenConnection, Signal, aborted

__all__ = ["Handler", "TunnelConnection", "open_connection"]

#: An RPC handler: takes the call body, returns the reply body.
Handler = Callable[[bytes], Awaitable[Buffer]]

_CLOSE_TIMEOUT = 5.0


class _Call:
    __slots__ = ("done", "error", "result")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.result = b""
        self.error: BaseException | None = None


class TunnelConnection(Reading):
    """RPC and migration streams over one trio stream.  Create with :func:`open_connection`."""

    def __init__(
        self,
        transport: trio.abc.Stream,
        core: Connection,
        *,
        keepalive_interval: float | None,
        keepalive_timeout: float,
        chunk_size: int,
        frame_timeout: float | None = None,
        max_control_backlog: int = 4 * 1024 * 1024,
    ) -> None:
        self._transport = transport
        self._core = core
        self._out = BufferWriter(transport)
        self._sock = raw_socket(transport)
        if self._sock is not None:
            tune_socket(self._sock)
        #: Large read buffers, made once the connection carries bulk data.
        self._pool: BufferPool | None = None
        #: Small read buffers: the handshake and RPC need no more.
        self._small_pool = BufferPool(SMALL_READ_SIZE, max_buffers=8, keep=1)
        #: Reads fill small buffers: take large ones from now on.
        self._grow = False
        self._buffer: ReadBuffer | None = None
        self.frame_timeout = frame_timeout
        self.max_control_backlog = max_control_backlog
        #: When the frame now arriving began (None between frames), and
        #: core.frames_received when it was last looked at.
        self._partial_since: float | None = None
        self._frames_seen = 0
        #: Answers to the peer in the batch the writer is writing now.
        self._writing_control = 0
        #: Set when the writer finishes a write, for a reader paused on the backlog.
        self._drained: trio.Event | None = None
        #: Streams whose payload the reader splices into a file descriptor.
        self._sinks: dict[int, SinkQueue] = {}
        #: Streams whose sink got payload since the reader last flushed: it
        #: flushes them once per batch, before it waits or checkpoints.
        self._dirty: list[TunnelStream] = []
        #: The reader just spliced a payload to its end: the next byte starts a frame.
        self._at_boundary = False
        self._can_splice = self._sock is not None and can_splice()
        self._tcp = self._sock is not None and self._sock.family in (socket.AF_INET, socket.AF_INET6)
        self._lowat = 1  # the socket's SO_RCVLOWAT
        self.keepalive_interval = keepalive_interval
        self.keepalive_timeout = keepalive_timeout
        self.chunk_size = chunk_size
        self._kick_event = trio.Event()
        self._senders: deque[TunnelStream] = deque()
        self._streams: dict[int, TunnelStream] = {}
        self._incoming: deque[TunnelStream] = deque()
        self._incoming_signal = Signal()
        self._calls: dict[int, _Call] = {}
        self._handlers: dict[tuple[int, int, int], Handler] = {}
        #: The versions registered for each program, for UNKNOWN_PROCEDURE messages.
        self._versions: dict[int, set[int]] = {}
        self._handshake = trio.Event()
        self._error: BaseException | None = None
        self._internal_error: BaseException | None = None
        self._closed = trio.Event()
        self._nursery: trio.Nursery | None = None
        self._last_rx = trio.current_time()
        self._bytes_received = 0
        self._frames_sent = 0
        self._calls_served = 0
        self._pings = 0
        #: ping() calls waiting, by sequence number (their opaque bytes).
        self._pong_waiters: dict[int, trio.Event] = {}

    # ------------------------------------------------------------------
    # Public API

    @property
    def client(self) -> bool:
        return self._core.client

    @property
    def peer_settings(self) -> Settings:
        assert self._core.peer_settings is not None
        return self._core.peer_settings

    @property
    def compression(self) -> bool:
        """Whether both sides set the ZSTD feature, so streams may send compressed pages."""
        return bool(self._core.features & Feature.ZSTD)

    @property
    def is_closed(self) -> bool:
        return self._error is not None

    def register(self, program: int, procedure: int, handler: Handler, *, version: int = 1) -> None:
        """Serve calls to (*program*, *version*, *procedure*) with ``await handler(body) -> reply body``.

        A handler that raises :class:`tunnel.RPCError` sends its code and
        message back; any other exception becomes ``APPLICATION_ERROR``.
        Calls to a version with no handler are answered ``UNKNOWN_PROCEDURE``
        with the versions that are served.
        """
        self._handlers[(program, version, procedure)] = handler
        self._versions.setdefault(program, set()).add(version)

    async def call(self, program: int, procedure: int, body: Buffer = b"", *, version: int = 1) -> bytes:
        """Call a procedure on the peer and return its reply body.

        Raises :class:`tunnel.RPCError` with the peer's code and message, or
        :class:`tunnel.ConnectionLost`.  Cancelling leaves the connection usable.
        """
        self._check_alive()
        serial = self._core.send_call(program, version, procedure, body)
        call = _Call()
        self._calls[serial] = call
        self._kick()
        try:
            await call.done.wait()
        finally:
            if not call.done.is_set():
                del self._calls[serial]
                self._core.cancel_call(serial)
        if call.error is not None:
            raise call.error
        return call.result

    async def open_stream(
        self,
        *,
        kind: int = StreamKind.BYTES,
        digest: int = DigestAlgorithm.CRC32,
        migration_id: bytes = b"\0" * 16,
        label: str = "",
        bandwidth: int = 0,
        compress: bool = False,
    ) -> TunnelStream:
        """Open a stream; the peer receives it from :meth:`accept_stream`.

        With *compress*, page batches sent on it go zstd-compressed when that
        pays, if both sides negotiated ZSTD (:attr:`compression`); otherwise
        the flag changes nothing.  The peer reads ordinary ``PagesRecord``s.
        """
        self._check_alive()
        stream_id = self._core.open_stream(kind=kind, digest=digest, migration_id=migration_id, label=label)
        stream = TunnelStream(
            self,
            stream_id,
            kind=kind,
            digest=digest,
            migration_id=migration_id,
            label=label,
            bandwidth=bandwidth,
            compress=compress,
        )
        self._streams[stream_id] = stream
        self._kick()
        await trio.lowlevel.checkpoint()
        return stream

    async def accept_stream(self) -> TunnelStream:
        """The next stream the peer opened (its kind, label and migration id are attributes)."""
        while not self._incoming:
            self._check_alive()
            await self._incoming_signal.wait()
        stream = self._incoming.popleft()
        await trio.lowlevel.checkpoint()
        return stream

    async def ping(self) -> float:
        """Round-trip time of one PING, in seconds."""
        self._check_alive()
        waiter = trio.Event()
        seq = self._send_ping()
        self._pong_waiters[seq] = waiter
        start = trio.current_time()
        try:
            await waiter.wait()
        finally:
            self._pong_waiters.pop(seq, None)
        self._check_alive()
        return trio.current_time() - start

    def statistics(self) -> ConnectionStatistics:
        return ConnectionStatistics(
            bytes_sent=self._out.written,
            bytes_received=self._bytes_received,
            frames_sent=self._frames_sent,
            connection_credit=self._core.connection_credit,
            connection_window=self._core.connection_window,
            buffered=self._core.buffered_received,
            calls_outstanding=len(self._calls),
            calls_served=self._calls_served,
            streams=tuple(s.statistics() for s in self._streams.values()),
            idle_s=trio.current_time() - self._last_rx,
        )

    async def aclose(self) -> None:
        """Orderly shutdown: GOODBYE, flush, close the transport, stop the tasks."""
        if self._error is None:
            self._core.close(ErrorCode.NO_ERROR, "closing")
            self._fail(BrokenConnection("the connection was closed locally"))
        with trio.CancelScope(shield=True):
            with trio.move_on_after(_CLOSE_TIMEOUT + 1):
                await self._closed.wait()
            if not self._closed.is_set():  # pragma: no cover - writer stuck past its own timeout
                await trio.aclose_forcefully(self._transport)
                if self._nursery is not None:
                    self._nursery.cancel_scope.cancel()

    # ------------------------------------------------------------------
    # Used by streams

    def _send_ping(self) -> int:
        """Queue a PING; returns its sequence number, which is also its payload.

        The peer may answer only the newest of several PINGs (protocol.md
        8.1), so a PONG answers every PING up to the one it echoes.
        """
        self._pings += 1
        self._core.ping(self._pings.to_bytes(8, "big"))
        self._kick()
        return self._pings

    def _check_alive(self) -> None:
        if self._error is not None:
            raise self._error

    def _kick(self) -> None:
        self._kick_event.set()

    def _schedule(self, stream: TunnelStream) -> None:
        if stream not in self._senders:
            self._senders.append(stream)
        self._kick()

    def _send_window(self, stream_id: int) -> int:
        self._check_alive()
        return self._core.send_window(stream_id)

    def _acknowledge(self, stream_id: int, size: int) -> None:
        if size and self._error is None:
            self._core.acknowledge_received(stream_id, size)
            if self._core.pending_output:
                self._kick()

    def _request_data(self, stream_id: int, size: int | None) -> None:
        """A stream's consumer waits with nothing buffered: credit for a peer that has none (window 0)."""
        if self._error is None:
            self._core.request_data(stream_id, size or self._core.local_settings.max_frame_size)
            if self._core.pending_output:
                self._kick()

    def _end_stream(self, stream_id: int) -> None:
        self._check_alive()
        self._core.end_stream(stream_id)
        self._kick()

    def _abort_stream(self, stream_id: int, error_code: int, reason: str) -> None:
        if self._error is None:
            self._core.abort_stream(stream_id, error_code, reason)
            self._kick()

    def _close_stream(self, stream: TunnelStream) -> None:
        """aclose(): end our direction, abort the peer's if it is still sending.

        With a send in flight, the peer has only part of it: abort, never end.
        """
        if self._error is not None:
            return
        state = self._core.stream_state(stream.stream_id)
        if state in (StreamState.OPEN, StreamState.HALF_CLOSED_REMOTE) and stream._outgoing is not None:
            self._core.abort_stream(stream.stream_id, ErrorCode.CANCEL, "the sender closed the stream during a send")
            self._kick()
            return
        if state in (StreamState.OPEN, StreamState.HALF_CLOSED_REMOTE) and not stream._eof_sent:
            self._core.end_stream(stream.stream_id)
            state = self._core.stream_state(stream.stream_id)
        if state in (StreamState.OPEN, StreamState.HALF_CLOSED_LOCAL):
            self._core.abort_stream(stream.stream_id, ErrorCode.CANCEL, "the receiver closed the stream")
        self._kick()

    def _forget(self, stream: TunnelStream) -> None:
        self._streams.pop(stream.stream_id, None)

    def _check_record_fits(self, record: PagesRecord | ZeroPagesRecord | DeviceStateRecord | IterationRecord) -> None:
        size = record_size(record)
        peer = self.peer_settings
        # A window of 0 opens on demand, a frame's worth at a time (_request_data).
        limit = min(peer.max_frame_size, peer.initial_stream_window or math.inf, peer.connection_window or math.inf)
        if size > limit:
            raise FrameTooLargeError(
                f"a record of {size} bytes can never be sent: the peer accepts frames and windows of {limit} bytes"
            )

    # ------------------------------------------------------------------
    # Failure

    def _fail(self, error: BaseException) -> None:
        if self._error is not None:
            return
        self._error = error
        for stream in list(self._streams.values()) + list(self._incoming):
            stream._on_error(error)
        for call in self._calls.values():
            call.error = error
            call.done.set()
        self._calls.clear()
        for waiter in self._pong_waiters.values():
            waiter.set()
        if self._drained is not None:
            self._drained.set()
        self._incoming_signal.fire()
        self._handshake.set()
        self._kick()

    # ------------------------------------------------------------------
    # Background tasks

    async def _run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._guard, self._reader)
            nursery.start_soon(self._guard, self._writer)
            if self.keepalive_interval is not None or self.frame_timeout is not None:
                nursery.start_soon(self._guard, self._watchdog)
            task_status.started()

    async def _guard(self, task: Callable[[], Awaitable[None]]) -> None:
        try:
            await task()
        except Exception as exc:  # noqa: BLE001 - a bug: surface it, never as a bare group
            self._internal_error = exc
            self._fail(BrokenConnection(f"internal error in the tunnel: {exc!r}"))

    async def _dispatch_all(self, events: list[Event] | tuple[()]) -> None:
        for event in events:
            self._dispatch(event)
            if isinstance(event, HandshakeComplete):
                # open_connection's body runs (it was woken just now: the next
                # batch) before anything behind the handshake, in this read or
                # the next, is dispatched: handlers it registers at once find
                # a call that came right behind.
                await trio.lowlevel.checkpoint()
                await trio.lowlevel.checkpoint()

    def _dispatch(self, event: Event) -> None:
        if isinstance(event, DataReceived):
            stream = self._streams.get(event.stream_id)
            if stream is None or event.data is None:
                self._acknowledge(event.stream_id, event.flow_controlled_length)
            else:
                data, buf = self._lend(event.data)
                if isinstance(data, memoryview) and isinstance(data.obj, bytes) and len(data) == len(data.obj):
                    data = data.obj  # a whole read: hand out the bytes object itself
                stream._on_record(data, event.flow_controlled_length, buf)
        elif isinstance(event, PagesReceived | ZeroPagesReceived | DeviceStateReceived | IterationReceived | ZstdPagesReceived):
            stream = self._streams.get(event.stream_id)
            if stream is None:
                self._acknowledge(event.stream_id, event.flow_controlled_length)
            elif isinstance(event, ZeroPagesReceived | IterationReceived):
                stream._on_record(event, event.flow_controlled_length, None)
            elif isinstance(event, ZstdPagesReceived):
                # Decompressed by the stream's consumer (receive_record), not here:
                # the reader never waits for CPU work on one stream's behalf.
                compressed, buf = self._lend(event.compressed)
                if compressed is not event.compressed:
                    event = dataclasses.replace(event, compressed=compressed)
                stream._on_record(event, event.flow_controlled_length, buf)
            else:
                data, buf = self._lend(event.data)
                if data is not event.data:
                    event = dataclasses.replace(event, data=data)
                stream._on_record(event, event.flow_controlled_length, buf)
        elif isinstance(event, WindowUpdated):
            if event.stream_id == 0:
                for stream in self._streams.values():
                    stream._on_credit()
            else:
                stream = self._streams.get(event.stream_id)
                if stream is not None:
                    stream._on_credit()
            self._kick()
        elif isinstance(event, StreamOpened):
            stream = TunnelStream(
                self,
                event.stream_id,
                kind=event.kind,
                digest=event.digest,
                migration_id=event.migration_id,
                label=event.label,
            )
            self._streams[event.stream_id] = stream
            self._incoming.append(stream)
            self._incoming_signal.fire()
        elif isinstance(event, StreamEnded):
            stream = self._streams.get(event.stream_id)
            if stream is not None:
                stream._on_eof()
        elif isinstance(event, StreamReset):
            stream = self._streams.get(event.stream_id)
            if stream is not None:
                stream._on_error(aborted(event.error_code, event.reason, remote=event.remote))
            self._kick()
        elif isinstance(event, CallReceived):
            self._start_handler(event)
        elif isinstance(event, ReplyReceived | CallFailed):
            call = self._calls.pop(event.serial, None)
            if call is not None:
                if isinstance(event, ReplyReceived):
                    call.result = bytes(event.body)
                else:
                    call.error = RPCError(event.error_code, event.message)
                call.done.set()
        elif isinstance(event, PongReceived):
            seq = int.from_bytes(event.opaque, "big")
            for answered in [n for n in self._pong_waiters if n <= seq]:
                self._pong_waiters.pop(answered).set()
        elif isinstance(event, ConnectionTerminated):
            reason = event.reason or "no reason given"
            self._fail(BrokenConnection(f"the peer closed the connection ({ErrorCode.name_of(event.error_code)}: {reason})"))
        elif isinstance(event, HandshakeComplete):
            self._handshake.set()

    def _start_handler(self, event: CallReceived) -> None:
        handler = self._handlers.get((event.program, event.version, event.procedure))
        if handler is None:
            self._core.send_error(event.serial, ErrorCode.UNKNOWN_PROCEDURE, self._unknown(event))
            self._kick()
            return
        assert self._nursery is not None
        self._nursery.start_soon(self._serve, handler, event.serial, bytes(event.body))

    def _unknown(self, call: CallReceived) -> str:
        program = f"program 0x{call.program:08x}"
        versions = self._versions.get(call.program)
        if not versions:
            return f"{program} is not served here"
        if call.version not in versions:
            supported = ", ".join(str(v) for v in sorted(versions))
            return f"{program} version {call.version} is not supported (supported: {supported})"
        return f"{program} version {call.version} has no procedure {call.procedure}"

    async def _serve(self, handler: Handler, serial: int, body: bytes) -> None:
        try:
            reply = await handler(body)
        except RPCError as exc:
            code, message = exc.code, exc.message
        except Exception as exc:  # noqa: BLE001 - the handler's failure goes back to the caller
            code, message = ErrorCode.APPLICATION_ERROR, f"{type(exc).__name__}: {exc}"
        else:
            if self._error is not None:
                return
            try:
                self._core.send_reply(serial, reply)
            except FrameTooLargeError as exc:
                self._core.send_error(serial, ErrorCode.APPLICATION_ERROR, f"reply too large: {exc}")
            self._calls_served += 1
            self._kick()
            return
        if self._error is None:
            self._core.send_error(serial, code, message)
            self._calls_served += 1
            self._kick()

    async def _writer(self) -> None:
        try:
            while self._error is None:
                if self._kick_event.is_set():
                    self._kick_event = trio.Event()  # kicks from here on wake the wait below
                deadline = await self._write_round()
                if deadline is None:
                    continue
                if deadline == math.inf:  # nothing to do until kicked: no timeout scope needed
                    await self._kick_event.wait()
                else:
                    with trio.move_on_at(deadline):
                        await self._kick_event.wait()
            # Flush what the core queued last (a GOODBYE), then close.
            with trio.move_on_after(_CLOSE_TIMEOUT) as scope:
                scope.shield = True
                buffers = self._take_output()
                if buffers:
                    await self._out.write(buffers)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            self._fail(BrokenConnection(f"the connection broke: {exc or type(exc).__name__}"))
        finally:
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(self._transport)
            self._closed.set()
            if self._nursery is not None:
                self._nursery.cancel_scope.cancel()

    async def _write_round(self) -> float | None:
        """Write one batch; returns None if it did, else when to look again."""
        core = self._core
        buffers = self._take_output()
        if buffers:
            self._frames_sent += 1
            await self._out.write(buffers)
            self._wrote()
            return None
        now = trio.current_time()
        deadline = math.inf
        for _ in range(len(self._senders)):
            stream = self._senders[0]
            self._senders.rotate(-1)
            out = stream._outgoing
            if out is None:
                self._senders.remove(stream)
                continue
            ready_at = stream._rate.ready_at(now)
            if ready_at > now:
                deadline = min(deadline, ready_at)
                continue
            window = core.send_window(stream.stream_id)
            if out.source is not None:
                if await self._write_spliced(stream, out, window, now):
                    await trio.lowlevel.checkpoint()  # one per data frame, whatever the socket did
                    return None
                continue
            if out.record is not None:
                size = record_size(out.record)  # type: ignore[arg-type]
                if window < size:
                    _blocked(stream, now)
                    continue
                try:
                    _send_record(core, stream.stream_id, out.record)
                except LocalProtocolError as exc:  # an invalid record fails its send, not the connection
                    stream._outgoing = None
                    self._senders.remove(stream)
                    out.fail(exc)
                    return None
                finished = True
            else:
                assert out.data is not None
                if window <= 0:
                    _blocked(stream, now)
                    continue
                size = min(len(out.data), window, stream._rate.chunk(self.chunk_size))
                core.send_data(stream.stream_id, out.data[:size])
                out.data = out.data[size:]
                finished = not out.data
            _unblocked(stream, now)
            stream._rate.spend(size, now)
            stream._frames_sent += 1
            stream._bytes_sent += size  # statistics() falls back to it once the core forgets the stream
            if finished:
                stream._outgoing = None
                self._senders.remove(stream)
            self._frames_sent += 1
            await self._out.write(self._take_output())
            self._wrote()
            if finished:
                out.done.set()
            await trio.lowlevel.checkpoint()  # one per data frame, whatever the socket did
            return None
        return deadline

    def _take_output(self) -> list[Buffer]:
        """What the core queued; its answers to the peer count as being written until _wrote()."""
        self._writing_control = self._core.pending_control_bytes
        return self._core.data_to_send()

    def _wrote(self) -> None:
        self._writing_control = 0
        if self._drained is not None:
            self._drained.set()
            self._drained = None

    async def _write_spliced(self, stream: TunnelStream, out: _Outgoing, window: int, now: float) -> bool:
        """One DATA frame whose payload goes from the stream's pipe into the socket."""
        source = out.source
        assert source is not None
        pipe = source.pipe
        if window > 0:
            source.fill()  # top up first: the frame carries all the source has ready
        if pipe.level == 0 or source.error is not None:
            # Nothing to send: send_fd's task waits for the source (or ends, or raises).
            self._senders.remove(stream)
            out.drained.fire()
            return False
        if window <= 0:
            _blocked(stream, now)
            return False
        _unblocked(stream, now)
        size = min(pipe.level, window, stream._rate.chunk(self.chunk_size))
        head = self._core.prepare_external_data(stream.stream_id, size)
        out.writing = True
        try:
            await self._out.write_spliced(head, pipe.read_fd, size)
        finally:
            out.writing = False
            if out.abandoned:
                # send_fd returned during the splice and handed the pipe to us:
                # close it on every path (a broken socket, a cancel) or it leaks.
                pipe.close()
        pipe.level -= size
        stream._bytes_spliced += size
        stream._frames_sent += 1
        stream._bytes_sent += size
        stream._rate.spend(size, now)
        self._frames_sent += 1
        return True

    async def _watchdog(self) -> None:
        """Keepalive (ping an idle peer, drop a silent one) and the frame timeout."""
        # Not before the handshake: open_connection bounds that wait itself.
        await self._handshake.wait()
        interval = self.keepalive_interval
        frame_timeout = self.frame_timeout
        pinged_at = -math.inf
        while self._error is None:
            now = trio.current_time()
            wake = math.inf
            if interval is not None:
                idle = now - self._last_rx
                if idle >= self.keepalive_timeout:
                    self._time_out(
                        f"nothing received for {idle:.1f} s",
                        f"keepalive timeout: nothing received from the peer for {idle:.1f} s (timeout {self.keepalive_timeout} s)",
                    )
                    return
                # <=: a reply that arrives in the same clock tick as the ping still
                # counts (else the loop would spin, sleeping until a past time).
                if idle >= interval and pinged_at <= self._last_rx:
                    pinged_at = now
                    self._send_ping()
                    wake = self._last_rx + self.keepalive_timeout
                else:
                    wake = self._last_rx + min(interval, self.keepalive_timeout)
            if frame_timeout is not None:
                since = self._partial_since
                if since is None:
                    # The reader does not wake this task when a frame begins (it
                    # would cost every read): look again soon enough that a stalled
                    # frame is dropped within 1.25 frame_timeout.
                    wake = min(wake, now + frame_timeout / 4)
                elif now - since >= frame_timeout:
                    self._time_out(
                        f"a frame stayed incomplete for {now - since:.1f} s",
                        f"frame timeout: a frame from the peer stayed incomplete for {now - since:.1f} s (timeout {frame_timeout} s)",
                    )
                    return
                else:
                    wake = min(wake, since + frame_timeout)
            await trio.sleep_until(wake)

    def _time_out(self, reason: str, message: str) -> None:
        self._core.close(ErrorCode.KEEPALIVE_TIMEOUT, reason)
        self._fail(BrokenConnection(message))


def _blocked(stream: TunnelStream, now: float) -> None:
    if stream._blocked_since is None:
        stream._blocked_since = now


def _unblocked(stream: TunnelStream, now: float) -> None:
    if stream._blocked_since is not None:
        stream._blocked_total += now - stream._blocked_since
        stream._blocked_since = None


def _send_record(core: Connection, stream_id: int, record: object) -> None:
    if isinstance(record, PagesRecord):
        core.send_pages(stream_id, region=record.region, page_size=record.page_size, addresses=record.addresses, data=record.data)
    elif isinstance(record, ZeroPagesRecord):
        core.send_zero_pages(stream_id, region=record.region, page_size=record.page_size, runs=record.runs)
    elif isinstance(record, DeviceStateRecord):
        core.send_device_state(stream_id, name=record.name, version=record.version, data=record.data)
    elif isinstance(record, IterationRecord):
        core.send_iteration(stream_id, record.iteration, final=record.final)
    elif isinstance(record, CompressedPages):
        core.send_zstd_pages(
            stream_id, region=record.region, page_size=record.page_size, addresses=record.addresses, compressed=record.compressed
        )
    else:  # pragma: no cover
        raise TypeError(record)


def _with_compression(settings: Settings | None, compression: bool | None) -> Settings:
    settings = settings if settings is not None else Settings()
    if compression is None:
        compression = zstd_available()
    elif compression:
        import zstandard  # noqa: F401  # fail here, not at the first compressed frame
    features = settings.features | Feature.ZSTD if compression else settings.features & ~Feature.ZSTD
    return settings if features == settings.features else dataclasses.replace(settings, features=int(features))


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    found: list[BaseException] = []
    for exc in group.exceptions:
        found.extend(_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return found


@asynccontextmanager
async def open_connection(
    transport: trio.abc.Stream,
    *,
    client: bool,
    settings: Settings | None = None,
    keepalive_interval: float | None = 5.0,
    keepalive_timeout: float = 20.0,
    chunk_size: int = 1024 * 1024,
    handlers: Mapping[tuple[int, int], Handler] | None = None,
    compression: bool | None = None,
    handshake_timeout: float = 10.0,
    frame_timeout: float | None = 30.0,
    max_control_backlog: int = 4 * 1024 * 1024,
) -> AsyncIterator[TunnelConnection]:
    """Run a tunnel connection over *transport* for the body of the ``async with``.

    *client* is True on the side that opened the transport.  The handshake
    completes before the body starts.  *handlers* (``{(program, procedure):
    handler}``) are registered before the first byte is read, so a call that
    arrives right behind the peer's handshake finds them.  On exit the connection says goodbye,
    flushes and closes the transport; background tasks never outlive it.
    Failures appear as :class:`tunnel.ConnectionLost` (also a
    ``trio.BrokenResourceError``) from the operations they affect.

    *compression* decides whether this side advertises the ZSTD feature
    (accepts zstd-compressed pages, and may send them on streams opened with
    ``compress=True``): None advertises it exactly when ``zstandard`` is
    importable, False never, True always (ImportError without ``zstandard``).
    It overrides the ZSTD bit of *settings*.  Compression is in effect only
    if the peer advertises it too (:attr:`TunnelConnection.compression`).

    Limits on what the peer can cost (the defaults suit a daemon facing the
    network, and a bulk link of at least ~35 KB/s):

    * *handshake_timeout* (10 s): the peer's preface and SETTINGS must
      arrive within it, else :class:`tunnel.ConnectionLost`.
    * *frame_timeout* (30 s; None for no limit): a frame that has begun to
      arrive must be complete within it, else the connection is closed
      with ``KEEPALIVE_TIMEOUT``, as for a silent peer.  A stalled frame is
      noticed within 1.25 times the timeout.
    * *max_control_backlog* (4 MiB): while more bytes of answers to the peer
      than this wait to be written (PONG, WINDOW_UPDATE, STREAM_ABORT, and
      RPC answers once more than ``settings.max_concurrent_calls`` of them
      wait), nothing more is read, so a peer that sends without reading is
      throttled by its own socket; it is then silent and meets the keepalive
      timeout.  A peer that keeps to the call limit is owed its answers
      however large, and the application's own calls and stream data (flow
      controlled) never count, so peers that call each other cannot
      deadlock on it.  The overshoot is at most the answers to one 16 KiB read.
    """
    settings = _with_compression(settings, compression)
    core = Connection(client=client, settings=settings)
    conn = TunnelConnection(
        transport,
        core,
        keepalive_interval=keepalive_interval,
        keepalive_timeout=keepalive_timeout,
        chunk_size=min(chunk_size, (settings or Settings()).max_frame_size),
        frame_timeout=frame_timeout,
        max_control_backlog=max_control_backlog,
    )
    for (program, procedure), handler in (handlers or {}).items():
        conn.register(program, procedure, handler)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(conn._run)
            try:
                with trio.move_on_after(handshake_timeout):
                    await conn._handshake.wait()
                if not conn._handshake.is_set():
                    core.close(ErrorCode.KEEPALIVE_TIMEOUT, f"no handshake within {handshake_timeout} s")
                    conn._fail(BrokenConnection(f"no handshake from the peer within {handshake_timeout} s"))
                conn._check_alive()
                conn.chunk_size = min(conn.chunk_size, core.max_send_frame)
                yield conn
            finally:
                await conn.aclose()
    except BaseExceptionGroup as group:
        # The body's own error (or a cancellation from outside) comes out as
        # itself; when both happen at once, the error wins, since it says why.
        _cancelled, rest = group.split(trio.Cancelled)
        leaves = _leaves(rest) if rest is not None else _leaves(group)
        if len(leaves) == 1:
            raise leaves[0] from None
        raise  # pragma: no cover - background tasks never raise
    if conn._internal_error is not None:
        raise BrokenConnection("internal error in the tunnel") from conn._internal_error

