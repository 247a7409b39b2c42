"""The connection's reader task: bytes from the transport to the core, events to streams.

Theory of operation.  The reader reads into pooled buffers (:mod:`._buffers`)
and hands the core what it read; the core's events go to streams, calls and
handlers.  Three things keep the number of wakeups, reads and checkpoints per
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
from collections.abc import Mapping
from typing import TYPE_CHECKING

import trio

from .._connection import Connection
from .._errors import RemoteProtocolError
from .._events import Event
from .._frames import HEADER, HEADER_SIZE, Buffer, FrameType
from ._buffers import BufferPool, ReadBuffer
from ._splice import SinkQueue, splice_some
from ._util import BrokenConnection

if TYPE_CHECKING:
    from ._stream import TunnelStream

__all__ = ["READ_SIZE", "SMALL_READ_SIZE", "Reading"]

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


class Reading:
    """The reader half of :class:`~._connection.TunnelConnection` (a mixin: the state is the connection's)."""

    _core: Connection
    _transport: trio.abc.Stream
    _sock: trio.socket.SocketType | None
    _pool: BufferPool | None
    _small_pool: BufferPool
    _grow: bool
    _buffer: ReadBuffer | None
    _partial_since: float | None
    _frames_seen: int
    _writing_control: int
    _drained: trio.Event | None
    max_control_backlog: int
    _sinks: dict[int, SinkQueue]
    _dirty: list[TunnelStream]
    _at_boundary: bool
    _tcp: bool
    _lowat: int
    _streams: dict[int, TunnelStream]
    _error: BaseException | None
    _last_rx: float
    _bytes_received: int

    if TYPE_CHECKING:

        def _fail(self, error: BaseException) -> None: ...

        def _kick(self) -> None: ...

        def _acknowledge(self, stream_id: int, size: int) -> None: ...

        async def _dispatch_all(self, events: list[Event] | tuple[()]) -> None: ...

    async def _reader(self) -> None:
        try:
            await self._read_loop()
        finally:
            # The reader owns its buffer and the pools: slices that streams
            # still hold keep their buffers alive until released, nothing else does.
            buf, self._buffer = self._buffer, None
            if buf is not None:
                buf.pool.retire(buf)
            self._small_pool.close()
            if self._pool is not None:
                self._pool.close()

    def _take_buffer(self) -> ReadBuffer:
        if not self._grow:
            return self._small_pool.get()
        if self._pool is None:
            self._pool = BufferPool(READ_SIZE)
        return self._pool.get()

    async def _wait_backlog(self) -> None:
        """Wait until the writer has written some of what the core owes the peer."""
        self._drained = trio.Event()
        self._kick()
        await self._drained.wait()

    def _note_frames(self) -> None:
        """After the core was fed: start or stop the frame timeout's clock."""
        core = self._core
        frames = core.frames_received
        if not core.receiving_frame:
            self._partial_since = None
        elif self._partial_since is None or frames != self._frames_seen:
            self._partial_since = self._last_rx  # a new frame began in the latest read
        self._frames_seen = frames

    async def _read_loop(self) -> None:
        core = self._core
        sock = self._sock
        receive_into = getattr(self._transport, "receive_into", None) if sock is None else None
        # Bytes [fed, offset) of the current buffer were read but not yet given
        # to the core: the middle of a DATA payload, collected so that a payload
        # reaches its stream in one piece instead of one per read (on TLS one
        # per record), which saves a wakeup of the consumer and an
        # acknowledgement each.  Nothing else can arrive before the payload
        # ends, so holding it back delays no other frame.
        offset = fed = 0
        waited = False
        # Whether the reader has waited (so other tasks ran) since it last
        # handed bytes to the core; if not, it checkpoints after doing so.
        fresh = False
        while self._error is None:
            if core.pending_control_bytes + self._writing_control > self.max_control_backlog:
                await self._wait_backlog()
                fresh = True
                continue
            buf = self._buffer
            try:
                feed_now = False
                pending = core.pending_data_payload
                if pending is not None and pending[0] in self._sinks:
                    if fed < offset:
                        feed_now = True  # a sink appeared behind collected payload: hand that over first
                    elif self._splice_in(pending[0], pending[1]):
                        # Payload for a file sink: socket -> sink pipe, in the kernel.
                        waited = False
                        if not fresh:
                            await trio.lowlevel.checkpoint()
                        fresh = False
                        continue
                    elif not waited:
                        waited = True
                        if self._dirty:
                            self._flush_sinks()
                        assert sock is not None
                        if self._tcp:
                            self._set_lowat(sock, min(pending[1], _LOWAT))
                        await trio.lowlevel.wait_readable(sock)
                        fresh = True
                        continue
                    # Otherwise the socket has data but the pipe is full: read into memory.
                waited = False
                if not feed_now:
                    if buf is None:
                        buf = self._buffer = self._take_buffer()
                        offset = fed = 0
                    want = len(buf.data) - offset
                    if pending is not None:
                        want = min(want, pending[1] - (offset - fed))  # up to the payload's end
                    elif self._sinks:
                        # Not into the next payload: it may go to a sink.  Right behind
                        # a spliced payload the next frame starts: read just its header.
                        want = min(want, HEADER_SIZE if self._at_boundary else _HEAD_READ)
                    if core.pending_control_bytes + self._writing_control > self.max_control_backlog // 2:
                        # Close to the bound: small reads, so that the answers to one
                        # read (an RPC_ERROR per 28-byte call) overshoot it by little.
                        want = min(want, SMALL_READ_SIZE)
                    if self._dirty:
                        self._flush_sinks()
                    if sock is not None:
                        # Plain socket: read into a pooled buffer, hand out slices of it.
                        if self._tcp:
                            self._set_lowat(sock, min(want, _LOWAT) if pending is not None and pending[0] not in self._sinks else 1)
                        try:
                            size = os.readv(sock.fileno(), [buf.view[offset : offset + want]])
                        except BlockingIOError:
                            # Nothing yet.  Wait, then decide afresh: a sink may have
                            # appeared meanwhile, which changes what to read.
                            await trio.lowlevel.wait_readable(sock)
                            fresh = True
                            continue
                    elif receive_into is not None:
                        # A stream that decrypts into our buffer (TLSStream): no copy, and
                        # as large a piece as the payload and the buffer allow.
                        size = await receive_into(buf.view[offset : offset + want])
                        fresh = True  # receive_into always checkpoints
                    else:
                        # Other streams return new bytes objects: copy them into the
                        # pooled buffer too, so consecutive pieces are one slice.
                        data = await self._transport.receive_some(min(want, _STREAM_READ))
                        fresh = True  # receive_some always checkpoints
                        size = len(data)
                        buf.view[offset : offset + size] = data
                    if not size:
                        self._fail(BrokenConnection("the peer closed the connection without saying goodbye"))
                        return
                    offset += size
                    if offset == len(buf.data) and not self._grow and core.peer_settings is not None:
                        self._grow = True  # bulk traffic: large buffers from the next one on
                    self._at_boundary = False
                    self._last_rx = trio.current_time()
                    self._bytes_received += size
                    if pending is None and _data_continues(buf.data, fed, offset, self._sinks):
                        # A DATA frame starts here and its payload goes on past what
                        # was read: the core sees its header alone first, so that it
                        # knows the payload to collect.
                        events = core.receive_data(buf.view[fed : fed + HEADER_SIZE])
                        fed += HEADER_SIZE
                        self._note_frames()
                        await self._dispatch_all(events)
                    if self._collecting(fed, offset, len(buf.data)):
                        continue
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                self._fail(BrokenConnection(f"the connection broke: {exc or type(exc).__name__}"))
                return
            except RemoteProtocolError as exc:
                self._fail(BrokenConnection(f"protocol error from the peer: {exc}"))
                return
            assert buf is not None
            try:
                events = core.receive_data(buf.view[fed:offset])
            except RemoteProtocolError as exc:
                self._fail(BrokenConnection(f"protocol error from the peer: {exc}"))
                return
            fed = offset
            self._note_frames()
            await self._dispatch_all(events)
            if self._grow and buf.pool is self._small_pool:
                self._small_pool.retire(buf)
                self._buffer = None
            elif buf.refs == 0:
                offset = fed = 0  # nothing refers to it any more: fill it again from the start
            elif len(buf.data) - offset < len(buf.data) // 2:
                # A stream holds a slice: go on in a fresh buffer (from the pool)
                # while the next frame still fits in one piece.
                buf.pool.retire(buf)
                self._buffer = None
            if core.pending_output:
                self._kick()
            after = core.pending_data_payload
            if after is not None and after[0] in self._sinks and not events:
                continue  # the payload's splice comes next, and checkpoints for both
            if self._dirty:
                self._flush_sinks()
            if events or not fresh:
                # Let the tasks these events woke run before the next read is
                # dispatched (as a handler registered right after the handshake
                # expects), and never hog the loop while the socket has data.
                await trio.lowlevel.checkpoint()
            fresh = False

    def _set_lowat(self, sock: trio.socket.SocketType, lowat: int) -> None:
        """Within a payload, wake the reader only once a good part of it is there (TCP only:
        a unix socket's readiness ignores SO_RCVLOWAT).  The payload is on its way, so the
        wait ends; end of connection and errors wake it in any case."""
        if lowat != self._lowat:
            self._lowat = lowat
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, lowat)

    def _collecting(self, fed: int, offset: int, capacity: int) -> bool:
        """Whether to read on before handing bytes [fed, offset) to the core."""
        pending = self._core.pending_data_payload
        return (
            pending is not None
            and offset - fed < pending[1]  # all of it is payload, and more is on its way
            and capacity - offset >= _MIN_READ
            and pending[0] not in self._sinks
        )

    def _splice_in(self, stream_id: int, remaining: int) -> bool:
        """Splice payload from the socket into a sink's pipe; False if nothing moved.

        Goes on while the socket has more of the payload and the pipe has
        room (the stream moves each piece on into the sink at once): a frame
        usually arrives in a few pieces, and the reader checkpoints once for
        all of them.
        """
        sink = self._sinks[stream_id]
        assert self._sock is not None
        fd = self._sock.fileno()
        total = 0
        while remaining and self._error is None and self._sinks.get(stream_id) is sink:
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
            self._bytes_received += moved
            for event in self._core.receive_external_data(moved):
                stream = self._streams.get(stream_id)
                if stream is not None and stream._sink is sink:
                    stream._on_spliced(pipe, moved)
                else:
                    self._acknowledge(stream_id, event.flow_controlled_length)  # type: ignore[attr-defined]
        if self._dirty:
            self._flush_sinks()
        if not total:
            return False
        self._at_boundary = not remaining
        self._last_rx = trio.current_time()
        self._note_frames()
        return True

    def _sink_dirty(self, stream: TunnelStream) -> None:
        if not stream._sink_dirty:
            stream._sink_dirty = True
            self._dirty.append(stream)

    def _flush_sinks(self) -> None:
        """Move queued payload on into the sinks (as far as each takes it) and return its credit."""
        dirty, self._dirty = self._dirty, []
        for stream in dirty:
            stream._sink_dirty = False
            sink = stream._sink
            if sink is not None and not sink.blocked:
                stream._flush_sink(sink)

    def _lend(self, data: Buffer) -> tuple[Buffer, ReadBuffer | None]:
        """Keep *data* (a slice of the current read buffer) alive, or copy it."""
        buf = self._buffer
        if buf is None or not isinstance(data, memoryview) or data.obj is not buf.data:
            return data, None
        if len(data) < _MIN_PIN or not buf.pool.may_pin:
            return bytes(data), None
        buf.refs += 1
        return data, buf


def _data_continues(data: bytearray | mmap.mmap, start: int, end: int, sinks: Mapping[int, object]) -> bool:
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
