"""The connection's reader task: bytes from the transport to the core, events to their owners.

Theory of operation.  The reader reads into pooled buffers (:mod:`._buffers`)
and hands the core what it read; the core's events go, through one table
(:meth:`Reader._dispatch`), to the stream's inbox, the stream table, the RPC
call table or the keepalive.  It never waits for an application, so one
slow consumer cannot stall the others (each stream's backlog is bounded by
its window instead).  Three things keep the number of wakeups, reads and checkpoints per
megabyte low, which is most of what the trio layer costs next to a plain
socket copy:

* Collecting.  Once a DATA header is in, the rest of the frame is the
  payload and nothing else can arrive before it ends, so the reader reads
  on (into the same buffer) until the payload is complete before handing
  it to the core: the consumer wakes once per frame, not once per read
  (on TLS once per record), and returns credit once.  On TCP the reader
  asks for SO_RCVLOWAT meanwhile, so epoll wakes it only when a good part
  of the payload has arrived.  The core still parses every byte; the
  reader only peeks at a header to decide how far to read.
* Splicing.  A payload for a stream in ``receive_fd`` is spliced from the
  socket into the sink's pipes and, as far as the sink takes it without
  blocking, on into the sink, once per batch (``_flush_sinks``), before the
  reader next waits or checkpoints.  Right behind such a payload the reader
  reads just the next header, so payload bytes never ride along into memory.
* Checkpoints.  Reads use the socket directly and wait only when it is
  empty.  The reader checkpoints once per batch it hands over unless it
  waited meanwhile, and always after dispatching events, so the tasks they
  woke run before the next read is dispatched.

What a connection costs before it carries bulk data is small: the reader
reads into small buffers (the handshake and RPC need no more) and switches
to the large pooled ones only after the handshake, once a read fills a
small buffer.  It does not read while more than ``max_control_backlog``
bytes of answers to the peer wait to be written: a peer that does not read
must not make this side buffer for it.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import socket
import sys
import termios
from collections.abc import Callable, Container
from typing import Any

import trio

from .._connection import Connection
from .._errors import ErrorCode, RemoteProtocolError
from .._events import (
    CallFailed,
    CallReceived,
    ConnectionTerminated,
    DataReceived,
    Event,
    HandshakeComplete,
    PongReceived,
    RecordReceived,
    ReplyReceived,
    StreamEnded,
    StreamOpened,
    StreamReset,
    WindowUpdated,
)
from .._frames import HEADER, HEADER_SIZE, Buffer, FrameType
from .._records import Record, bulk_of, with_bulk
from ._buffers import BufferPool, ReadBuffer
from ._inbox import Inbox, SinkRegistry
from ._keepalive import Keepalive
from ._rpc import CallTable
from ._splice import splice_some
from ._stream import StreamTable
from ._util import BrokenConnection, Health, aborted
from ._writer import Writer

__all__ = ["READ_SIZE", "SMALL_READ_SIZE", "Reader"]

#: Pooled read buffers hold a whole default-size DATA frame (1 MiB payload and
#: its header) with _MIN_READ to spare, so a frame read from offset 0 is
#: collected into one piece.
READ_SIZE = 1024 * 1024 + 256 * 1024
#: Read buffers until the connection carries bulk data: a handshake, RPC
#: calls and pings fit, and an idle connection costs little.
SMALL_READ_SIZE = 16 * 1024
#: A pooled buffer with less room than this left is retired or restarted.
_MIN_READ = 128 * 1024
#: Received slices smaller than this are copied rather than keeping a buffer alive.
_MIN_PIN = 4096
#: Reads while a spliced sink is active and no DATA payload is under way:
#: small, so the next payload is not pulled into memory with the header.
_HEAD_READ = 4096
_DATA = int(FrameType.DATA)
#: Largest SO_RCVLOWAT the reader sets on a TCP socket while it collects a payload.
_LOWAT = 512 * 1024
#: Largest piece asked of a non-socket transport (a larger request only costs a larger allocation).
_STREAM_READ = 64 * 1024


class Reader:
    """Reads the transport, feeds the core, and routes the core's events to their owners.

    Owns the read buffers and pools (slices that streams hold keep their
    buffers alive until released, nothing else does), the bytes read and
    not yet fed, and the frame-timeout clock.  It splices a DATA payload
    into a file sink whose inbox is in *sinks*.
    """

    def __init__(
        self,
        transport: trio.abc.Stream,
        sock: trio.socket.SocketType | None,
        core: Connection,
        health: Health,
        writer: Writer,
        *,
        sinks: SinkRegistry,
        streams: StreamTable,
        rpc: CallTable,
        keepalive: Keepalive,
        acknowledge: Callable[[int, int], None],
        opened: Callable[[StreamOpened], None],
        fail: Callable[[BaseException], None],
        max_control_backlog: int,
    ) -> None:
        self._transport = transport
        self._sock = sock
        self._core = core
        self._health = health
        self._writer = writer
        self._sinks = sinks
        self._streams = streams
        self._acknowledge = acknowledge
        self._fail = fail
        self.max_control_backlog = max_control_backlog
        self._tcp = sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6)
        #: A stream that decrypts into our buffer (TLSStream) has receive_into.
        self._receive_into = getattr(transport, "receive_into", None) if sock is None else None
        self._lowat = 1  # the socket's SO_RCVLOWAT
        #: Large read buffers, made once the connection carries bulk data.
        self.pool: BufferPool | None = None
        #: Small read buffers: the handshake and RPC need no more.
        self._small_pool = BufferPool(SMALL_READ_SIZE, max_buffers=8, keep=1)
        #: Reads fill small buffers: take large ones from now on.
        self._grow = False
        self._buffer: ReadBuffer | None = None
        # Bytes [_fed, _offset) of the current buffer were read but not yet given
        # to the core: the middle of a DATA payload, collected so that a payload
        # reaches its stream in one piece instead of one per read (on TLS one
        # per record), which saves a wakeup of the consumer and an
        # acknowledgement each.  Nothing else can arrive before the payload
        # ends, so holding it back delays no other frame.
        self._offset = self._fed = 0
        #: The reader waited for the socket for a sink's payload, and it still moved nothing.
        self._waited = False
        #: The reader has waited (so other tasks ran) since it last handed bytes
        #: to the core; if not, it checkpoints after doing so.
        self._fresh = False
        #: Inboxes whose sink got payload since the reader last flushed: it
        #: flushes them once per batch, before it waits or checkpoints.
        self._dirty: list[Inbox] = []
        #: The reader just spliced a payload to its end: the next byte starts a frame.
        self._at_boundary = False
        #: When something was last received, and when the frame now arriving
        #: began (None between frames): the watchdog reads both.
        self.last_rx = trio.current_time()
        self.partial_since: float | None = None
        self._frames_seen = 0
        self.bytes_received = 0
        #: Set once the handshake completed; the reader then waits for *released*
        #: before it dispatches anything behind the handshake.
        self.handshake = trio.Event()
        self.released = trio.Event()
        self._handlers: dict[type[Event], Callable[[Any], None]] = {
            DataReceived: self._on_data,
            RecordReceived: self._on_record,
            WindowUpdated: self._on_window,
            StreamOpened: opened,
            StreamEnded: self._on_ended,
            StreamReset: self._on_reset,
            CallReceived: rpc.called,
            ReplyReceived: rpc.answered,
            CallFailed: rpc.answered,
            PongReceived: keepalive.pong,
            ConnectionTerminated: self._on_terminated,
            HandshakeComplete: self._on_handshake,
        }

    # ------------------------------------------------------------------
    # Dispatch: each event to its owner, through one table

    async def _dispatch(self, events: list[Event]) -> None:
        handlers = self._handlers
        for event in events:
            handlers[type(event)](event)
            if type(event) is HandshakeComplete:
                # Nothing behind the handshake (in this read or the next) is
                # dispatched before open_connection has handed the connection
                # to its body and the body ran up to its first checkpoint:
                # handlers it registers at once find a call that came right behind.
                await self.released.wait()

    def _on_data(self, event: DataReceived) -> None:
        stream = self._streams.get(event.stream_id)
        if stream is None or event.data is None:
            self._acknowledge(event.stream_id, event.flow_controlled_length)
            return
        data, buf = self._lend(event.data)
        if isinstance(data, memoryview) and isinstance(data.obj, bytes) and len(data) == len(data.obj):
            data = data.obj  # a whole read: hand out the bytes object itself
        if stream.inbox.deliver(data, event.flow_controlled_length, buf):
            self._mark_dirty(stream.inbox)

    def _on_record(self, event: RecordReceived) -> None:
        stream = self._streams.get(event.stream_id)
        if stream is None:
            self._acknowledge(event.stream_id, event.flow_controlled_length)
            return
        # A ZSTD_PAGES record is decompressed by the stream's consumer
        # (receive_record), not here: the reader never waits for CPU work on
        # one stream's behalf.
        record, buf = self._lend_record(event.record)
        stream.inbox.deliver(record, event.flow_controlled_length, buf)

    def _on_window(self, event: WindowUpdated) -> None:
        self._streams.credit_granted(event.stream_id)
        self._writer.kick()

    def _on_ended(self, event: StreamEnded) -> None:
        stream = self._streams.get(event.stream_id)
        if stream is not None:
            stream.inbox.ended()

    def _on_reset(self, event: StreamReset) -> None:
        stream = self._streams.get(event.stream_id)
        if stream is not None:
            stream.failed(aborted(event.error_code, event.reason, remote=event.remote))
        self._writer.kick()

    def _on_terminated(self, event: ConnectionTerminated) -> None:
        reason = event.reason or "no reason given"
        self._fail(BrokenConnection(f"the peer closed the connection ({ErrorCode.name_of(event.error_code)}: {reason})"))

    def _on_handshake(self, event: HandshakeComplete) -> None:
        self.handshake.set()

    # ------------------------------------------------------------------
    # The task

    async def run(self) -> None:
        try:
            await self._read_loop()
        finally:
            # The reader owns its buffer and the pools: slices that streams
            # still hold keep their buffers alive until released, nothing else does.
            buf, self._buffer = self._buffer, None
            if buf is not None:
                buf.pool.retire(buf)
            self._small_pool.close()
            if self.pool is not None:
                self.pool.close()

    def _owes(self) -> int:
        """Bytes of answers to the peer queued or being written."""
        return self._core.pending_control_bytes + self._writer.writing_control

    async def _read_loop(self) -> None:
        while self._health.alive:
            if self._owes() > self.max_control_backlog:
                await self._writer.wait_drained()
                self._fresh = True
                continue
            try:
                if not await self._gather():
                    continue
                assert self._buffer is not None
                events = self._core.receive_data(self._buffer.view[self._fed : self._offset])
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                self._fail(BrokenConnection(f"the connection broke: {exc or type(exc).__name__}"))
                return
            except RemoteProtocolError as exc:
                self._fail(BrokenConnection(f"protocol error from the peer: {exc}"))
                return
            self._fed = self._offset
            self._note_frames()
            await self._dispatch(events)
            self._recycle()
            if self._core.pending_output:
                self._writer.kick()
            after = self._core.pending_data_payload
            if after is not None and after[0] in self._sinks and not events:
                continue  # the payload's splice comes next, and checkpoints for both
            if self._dirty:
                self._flush_sinks()
            if events or not self._fresh:
                # Let the tasks these events woke run before the next read is
                # dispatched, and never hog the loop while the socket has data.
                await trio.lowlevel.checkpoint()
            self._fresh = False

    async def _gather(self) -> bool:
        """Read or splice; True when bytes [_fed, _offset) are to be handed to the core now."""
        pending = self._core.pending_data_payload
        if pending is not None and pending[0] in self._sinks:
            if self._fed < self._offset:
                self._waited = False
                return True  # a sink appeared behind collected payload: hand that over first
            if await self._splice_turn(*pending):
                return False
            # Otherwise the socket has data but the pipe is full: read into memory.
        self._waited = False
        size = await self._read(pending)
        if size is None:
            return False
        if not size:
            self._fail(BrokenConnection("the peer closed the connection without saying goodbye"))
            return False
        buf = self._buffer
        assert buf is not None
        self._offset += size
        if self._offset == len(buf.data) and not self._grow and self._core.peer_settings is not None:
            self._grow = True  # bulk traffic: large buffers from the next one on
        self._at_boundary = False
        self.last_rx = trio.current_time()
        self.bytes_received += size
        if pending is None and _data_continues(buf.data, self._fed, self._offset, self._sinks):
            # A DATA frame starts here and its payload goes on past what was
            # read: the core sees its header alone first, so that it knows the
            # payload to collect.
            events = self._core.receive_data(buf.view[self._fed : self._fed + HEADER_SIZE])
            self._fed += HEADER_SIZE
            self._note_frames()
            await self._dispatch(events)
        return not self._collecting(len(buf.data))

    async def _splice_turn(self, stream_id: int, remaining: int) -> bool:
        """A DATA payload for a file sink is under way: splice it, or wait for it.

        False when the socket has data that the sink's pipe does not take
        (then it is read into memory).
        """
        if self._splice_in(stream_id, remaining):
            # Payload for a file sink: socket -> sink pipe, in the kernel.
            self._waited = False
            if not self._fresh:
                await trio.lowlevel.checkpoint()
            self._fresh = False
            return True
        if self._waited:
            return False
        self._waited = True
        if self._dirty:
            self._flush_sinks()
        assert self._sock is not None
        if self._tcp:
            self._set_lowat(self._sock, min(remaining, _LOWAT))
        await trio.lowlevel.wait_readable(self._sock)
        self._fresh = True
        return True

    async def _read(self, pending: tuple[int, int] | None) -> int | None:
        """Read into the current buffer: the size read (0 at end of input), or None if it waited instead."""
        buf = self._buffer
        if buf is None:
            buf = self._buffer = self._take_buffer()
            self._offset = self._fed = 0
        offset = self._offset
        want = len(buf.data) - offset
        if pending is not None:
            want = min(want, pending[1] - (offset - self._fed))  # up to the payload's end
        elif self._sinks:
            # Not into the next payload: it may go to a sink.  Right behind
            # a spliced payload the next frame starts: read just its header.
            want = min(want, HEADER_SIZE if self._at_boundary else _HEAD_READ)
        if self._owes() > self.max_control_backlog // 2:
            # Close to the bound: small reads, so that the answers to one
            # read (an RPC_ERROR per 28-byte call) overshoot it by little.
            want = min(want, SMALL_READ_SIZE)
        if self._dirty:
            self._flush_sinks()
        sock = self._sock
        if sock is not None:
            # Plain socket: read into a pooled buffer, hand out slices of it.
            if self._tcp:
                self._set_lowat(sock, min(want, _LOWAT) if pending is not None and pending[0] not in self._sinks else 1)
            try:
                return os.readv(sock.fileno(), [buf.view[offset : offset + want]])
            except BlockingIOError:
                # Nothing yet.  Wait, then decide afresh: a sink may have
                # appeared meanwhile, which changes what to read.
                await trio.lowlevel.wait_readable(sock)
                self._fresh = True
                return None
        receive_into = self._receive_into
        self._fresh = True  # receive_into and receive_some always checkpoint
        if receive_into is not None:
            # A stream that decrypts into our buffer (TLSStream): no copy, and
            # as large a piece as the payload and the buffer allow.
            size: int = await receive_into(buf.view[offset : offset + want])
            return size
        # Other streams return new bytes objects: copy them into the pooled
        # buffer too, so consecutive pieces are one slice.
        data = await self._transport.receive_some(min(want, _STREAM_READ))
        buf.view[offset : offset + len(data)] = data
        return len(data)

    def _recycle(self) -> None:
        """After the core was fed: keep filling this buffer, or go on in a fresh one."""
        buf = self._buffer
        assert buf is not None
        if self._grow and buf.pool is self._small_pool:
            self._small_pool.retire(buf)
            self._buffer = None
        elif buf.refs == 0:
            self._offset = self._fed = 0  # nothing refers to it any more: fill it again from the start
        elif len(buf.data) - self._offset < len(buf.data) // 2:
            # A stream holds a slice: go on in a fresh buffer (from the pool)
            # while the next frame still fits in one piece.
            buf.pool.retire(buf)
            self._buffer = None

    def _take_buffer(self) -> ReadBuffer:
        if not self._grow:
            return self._small_pool.get()
        if self.pool is None:
            self.pool = BufferPool(READ_SIZE)
        return self.pool.get()

    def _note_frames(self) -> None:
        """After the core was fed: start or stop the frame timeout's clock."""
        core = self._core
        frames = core.frames_received
        if not core.receiving_frame:
            self.partial_since = None
        elif self.partial_since is None or frames != self._frames_seen:
            self.partial_since = self.last_rx  # a new frame began in the latest read
        self._frames_seen = frames

    def _set_lowat(self, sock: trio.socket.SocketType, lowat: int) -> None:
        """Within a payload, wake the reader only once a good part of it is there (TCP only:
        a unix socket's readiness ignores SO_RCVLOWAT).  The payload is on its way, so the
        wait ends; end of connection and errors wake it in any case."""
        if lowat != self._lowat:
            self._lowat = lowat
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, lowat)

    def _collecting(self, capacity: int) -> bool:
        """Whether to read on before handing bytes [_fed, _offset) to the core."""
        pending = self._core.pending_data_payload
        return (
            pending is not None
            and self._offset - self._fed < pending[1]  # all of it is payload, and more is on its way
            and capacity - self._offset >= _MIN_READ
            and pending[0] not in self._sinks
        )

    # ------------------------------------------------------------------
    # Sinks: payload spliced into a stream's file descriptor

    def _splice_in(self, stream_id: int, remaining: int) -> bool:
        """Splice payload from the socket into a sink's pipe; False if nothing moved.

        Goes on while the socket has more of the payload and the pipe has
        room (the inbox moves each piece on into the sink at once): a frame
        usually arrives in a few pieces, and the reader checkpoints once for
        all of them.
        """
        inbox = self._sinks.get(stream_id)
        assert inbox is not None and inbox.sink is not None and self._sock is not None
        sink = inbox.sink
        fd = self._sock.fileno()
        total = 0
        while remaining and self._health.alive and self._sinks.get(stream_id) is inbox and inbox.sink is sink:
            pipe = sink.intake()
            if pipe is None and self._dirty:
                self._flush_sinks()  # make room
                pipe = sink.intake()
            if pipe is None:
                break
            moved = splice_some(fd, pipe.write_fd, min(remaining, pipe.room))
            if moved is None:
                if pipe.level and _readable_bytes(fd):
                    # The socket has data, so the pipe refused it: its buffer slots
                    # are used up (small pieces), whatever room the byte count shows.
                    pipe.refused = True
                    continue
                break
            if moved == 0:
                self._fail(BrokenConnection("the peer closed the connection without saying goodbye"))
                return True
            total += moved
            remaining -= moved
            self.bytes_received += moved
            for event in self._core.receive_external_data(moved):
                assert isinstance(event, DataReceived)
                if self._sinks.get(stream_id) is inbox and inbox.sink is sink:
                    inbox.spliced(pipe, moved)
                    self._mark_dirty(inbox)
                else:
                    self._acknowledge(stream_id, event.flow_controlled_length)
        if self._dirty:
            self._flush_sinks()
        if not total:
            return False
        self._at_boundary = not remaining
        self.last_rx = trio.current_time()
        self._note_frames()
        return True

    def _mark_dirty(self, inbox: Inbox) -> None:
        if not inbox.dirty:
            inbox.dirty = True
            self._dirty.append(inbox)

    def _flush_sinks(self) -> None:
        """Move queued payload on into the sinks (as far as each takes it) and return its credit."""
        dirty, self._dirty = self._dirty, []
        for inbox in dirty:
            inbox.dirty = False
            sink = inbox.sink
            if sink is not None and not sink.blocked:
                inbox.flush_sink()

    # ------------------------------------------------------------------
    # Lending: received slices keep their read buffer alive

    def _lend(self, data: Buffer) -> tuple[Buffer, ReadBuffer | None]:
        """Keep *data* (a slice of the current read buffer) alive, or copy it."""
        buf = self._buffer
        if buf is None or not isinstance(data, memoryview) or data.obj is not buf.data:
            return data, None
        if len(data) < _MIN_PIN or not buf.pool.may_pin:
            return bytes(data), None
        buf.refs += 1
        return data, buf

    def _lend_record(self, record: Record) -> tuple[Record, ReadBuffer | None]:
        """*record* with its bulk bytes kept alive in the read buffer, or copied out of it."""
        bulk = bulk_of(record)
        if bulk is None:
            return record, None
        kept, buf = self._lend(bulk)
        return (record if kept is bulk else with_bulk(record, kept)), buf


def _data_continues(data: bytearray | mmap.mmap, start: int, end: int, sinks: Container[int]) -> bool:
    """Whether *data* [start, end) begins with a DATA header whose payload runs past *end*
    (for a stream without a sink: a sink's payload is spliced, not collected).

    Only a hint for collecting (the core still parses and checks every
    header); it assumes *start* is a frame boundary, which is the case
    whenever the core has no frame under way.
    """
    if end - start <= HEADER_SIZE:
        return False
    length: int
    frame_type: int
    stream_id: int
    length, frame_type, _, _, stream_id = HEADER.unpack_from(data, start)
    return frame_type == _DATA and length > end - start - HEADER_SIZE and stream_id not in sinks


def _readable_bytes(fd: int) -> int:
    """Bytes waiting in socket *fd*'s receive queue."""
    buf = bytearray(4)
    fcntl.ioctl(fd, termios.FIONREAD, buf)
    return int.from_bytes(buf, sys.byteorder, signed=True)
