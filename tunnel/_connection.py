"""The sans-I/O connection: bytes in, events out, bytes to send collected.

Theory of operation.  A :class:`Connection` is one end of a tunnel
connection.  The caller feeds it whatever arrives from the transport
(:meth:`receive_data`, which returns events), calls methods to open streams,
send records and make RPC calls, and drains :meth:`data_to_send` into the
transport.  Nothing here blocks, sleeps or does I/O, so a daemon with any
event loop can drive it; ``tunnel.trio`` is one such driver.

Flow control is enforced on both sides.  Sending more than the peer's credit
raises :class:`FlowControlError` (the driver waits for a
:class:`WindowUpdated` event instead of queueing).  Credit is returned to the
peer only through :meth:`acknowledge_received`, which the driver calls once
the application has taken a record, so a stalled consumer stalls the
producer with at most one window in flight.

Errors the peer causes are of two sizes.  A *stream error* (a frame out of
place on one stream, a digest mismatch) aborts that stream, queues
``STREAM_ABORT`` and returns a :class:`StreamReset` event; the connection
carries on.  A *connection error* (malformed framing, a window overrun, an
unknown stream) queues ``GOODBYE`` and raises :class:`RemoteProtocolError`;
the connection is then dead and later input is ignored.

Answers are bounded by the driver, not here.  Frames queued in answer to
the peer (PONG, RPC answers, WINDOW_UPDATE, STREAM_ABORT) are counted in
:attr:`Connection.pending_control_bytes` until :meth:`data_to_send` takes
them; a driver stops feeding input while that count is above its bound,
so a peer that sends without reading cannot grow the queue without end.
A PING that arrives while the PONG for an earlier one is still queued
replaces that PONG's payload instead of queueing another (protocol.md 8.1).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum, auto
from typing import Any

from ._digest import RunningDigest
from ._errors import (
    ErrorCode,
    FlowControlError,
    FrameTooLargeError,
    LocalProtocolError,
    RemoteProtocolError,
)
from ._events import (
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
from ._frames import (
    RECORD_FRAME_NAMES,
    Buffer,
    DigestAlgorithm,
    Frame,
    FrameType,
    Goodbye,
    Ping,
    Pong,
    RpcCall,
    RpcError,
    RpcReply,
    SettingsFrame,
    StreamAbort,
    StreamEnd,
    StreamKind,
    StreamOpen,
    WindowUpdate,
    encode,
    encode_parts,
    encode_record,
    header,
    record_frame_type,
)
from ._frametypes import MAX_WINDOW
from ._reader import DataChunk, DataStart, FrameReader, Item, Preface, RecordItem
from ._records import (
    DeviceStateRecord,
    IterationRecord,
    PagesRecord,
    Record,
    ZeroPagesRecord,
    ZstdPagesRecord,
)
from ._settings import MAGIC, PREFACE, PROTOCOL_VERSION, ZSTD_MAX_EXPANSION, Feature, Settings, negotiate_version
from ._state import TRANSITIONS, StreamInput, StreamState
from ._windows import ReceiveWindow, SendCredit

__all__ = ["Connection", "ConnectionState", "StreamInfo"]

_RPC_HEADER = 16


class ConnectionState(Enum):
    HANDSHAKE = auto()
    OPEN = auto()
    #: GOODBYE sent or received, or a connection error happened.
    CLOSED = auto()


class _Stream:
    __slots__ = ("credit", "digest", "kind", "local", "received", "sent", "state", "stream_id", "window")

    def __init__(self, stream_id: int, kind: int, digest: int, local: bool, credit: int, window: int) -> None:
        self.stream_id = stream_id
        self.state = StreamState.IDLE
        self.kind = kind
        self.digest = digest
        self.local = local
        self.credit = SendCredit(credit)
        self.window = ReceiveWindow(window)
        self.sent = RunningDigest(digest)
        self.received = RunningDigest(digest)


@dataclass(frozen=True, slots=True, kw_only=True)
class StreamInfo:
    """A snapshot of one stream's protocol state."""

    stream_id: int
    state: StreamState
    kind: int
    digest: int
    send_credit: int
    receive_window: int
    bytes_sent: int
    bytes_received: int


class Connection:
    """One end of a tunnel connection, without I/O.

    *client* is True on the side that opened the transport; it allocates odd
    stream ids, the other side even ones.  Otherwise both ends are alike.
    The preface and SETTINGS are queued at construction: drain
    :meth:`data_to_send` right away.
    """

    def __init__(
        self,
        *,
        client: bool,
        settings: Settings | None = None,
        min_version: int = PROTOCOL_VERSION,
        max_version: int = PROTOCOL_VERSION,
    ) -> None:
        self.client = client
        self.local_settings = settings if settings is not None else Settings()
        self.peer_settings: Settings | None = None
        self.version: int | None = None
        self.state = ConnectionState.HANDSHAKE
        #: Why the connection closed, once it has.
        self.close_reason: str | None = None
        self._min_version = min_version
        self._max_version = max_version
        self._reader = FrameReader(self.local_settings.max_frame_size)
        self._got_preface = False
        self._out: list[Buffer] = [PREFACE.pack(MAGIC, min_version, max_version)]
        #: Answers to the peer in _out (see pending_control_bytes): bytes of
        #: PONG, WINDOW_UPDATE and STREAM_ABORT; bytes and number of RPC answers.
        self._owed = 0
        self._owed_rpc = 0
        self._rpc_answers = 0
        #: Index in _out of a PONG not yet taken by data_to_send, which a newer PING overwrites.
        self._pong_at: int | None = None
        self._queue(self.local_settings.to_frame())
        self._streams: dict[int, _Stream] = {}
        self._next_stream_id = 1 if client else 2
        self._highest_peer_stream = 0
        self._conn_window = ReceiveWindow(self.local_settings.connection_window)
        self._conn_credit = SendCredit(0)
        self._next_serial = 1
        self._calls_out: dict[int, tuple[int, int, int]] = {}
        self._cancelled: set[int] = set()
        self._calls_in: dict[int, tuple[int, int, int]] = {}

    # ------------------------------------------------------------------
    # Output

    def _queue(self, frame: Frame) -> None:
        self._out.extend(encode_parts(frame))

    def _answer_peer(self, frame: Frame) -> None:
        """Queue a frame the peer's input called for: it counts towards pending_control_bytes."""
        parts = encode_parts(frame)
        if isinstance(frame, RpcReply | RpcError):
            self._owed_rpc += sum(len(p) for p in parts)
            self._rpc_answers += 1
        else:
            self._owed += sum(len(p) for p in parts)
        self._out.extend(parts)

    def _pong(self, opaque: bytes) -> None:
        pong = encode(Pong(opaque=opaque))
        if self._pong_at is not None:
            # Still unsent: answer the newest PING only, so a flood of PINGs
            # costs one queued PONG, not one each.
            self._out[self._pong_at] = pong
            return
        self._pong_at = len(self._out)
        self._out.append(pong)
        self._owed += len(pong)

    def data_to_send(self) -> list[Buffer]:
        """Buffers to write to the transport, in order; the queue is emptied.

        Bulk payloads are the application's own buffers (not copies): write
        them before the application reuses them.
        """
        out, self._out = self._out, []
        self._owed = self._owed_rpc = self._rpc_answers = 0
        self._pong_at = None
        return out

    def bytes_to_send(self) -> bytes:
        """:meth:`data_to_send` joined into one bytes object (copies)."""
        return b"".join(self.data_to_send())

    @property
    def pending_output(self) -> int:
        return sum(len(b) for b in self._out)

    @property
    def pending_control_bytes(self) -> int:
        """Bytes queued in answer to the peer that :meth:`data_to_send` has not
        taken yet and that count against the driver's bound: PONG, WINDOW_UPDATE,
        STREAM_ABORT, and RPC answers once more than the local
        ``max_concurrent_calls`` of them are queued.

        Only the peer's reading drains them, so a driver stops feeding input
        while this is above its bound.  A peer that keeps to
        MAX_CONCURRENT_CALLS is owed the answers to its calls, however large
        (they are not counted until it exceeds it), and the application's own
        output (calls, streams, data) never counts: pausing input for either
        could deadlock two peers that call each other with large bodies.
        """
        if self._rpc_answers > self.local_settings.max_concurrent_calls:
            return self._owed + self._owed_rpc
        return self._owed

    @property
    def pending_rpc_answers(self) -> int:
        """RPC_REPLY and RPC_ERROR frames queued and not yet taken by :meth:`data_to_send`."""
        return self._rpc_answers

    @property
    def receiving_frame(self) -> bool:
        """Whether part of a frame (or of the preface) has arrived and the rest has not."""
        return self._reader.partial

    @property
    def frames_received(self) -> int:
        """Frames completed so far (the preface counts as one): a driver that times out
        incomplete frames restarts its clock when this changes."""
        return self._reader.frames

    # ------------------------------------------------------------------
    # Queries

    @property
    def open_streams(self) -> list[int]:
        return sorted(self._streams)

    def stream_info(self, stream_id: int) -> StreamInfo | None:
        s = self._streams.get(stream_id)
        if s is None:
            return None
        return StreamInfo(
            stream_id=stream_id,
            state=s.state,
            kind=s.kind,
            digest=s.digest,
            send_credit=s.credit.available,
            receive_window=s.window.available,
            bytes_sent=s.sent.total,
            bytes_received=s.received.total,
        )

    def stream_state(self, stream_id: int) -> StreamState:
        s = self._streams.get(stream_id)
        if s is not None:
            return s.state
        return StreamState.IDLE if self._is_idle(stream_id) else StreamState.CLOSED

    @property
    def features(self) -> Feature:
        """Features in effect: set by both sides (none before the handshake)."""
        if self.peer_settings is None:
            return Feature.NONE
        return Feature(self.local_settings.features & self.peer_settings.features)

    @property
    def connection_credit(self) -> int:
        """Bytes this side may still send, summed over all streams."""
        return self._conn_credit.available

    @property
    def connection_window(self) -> int:
        """Bytes the peer may still send this side, summed over all streams."""
        return self._conn_window.available

    @property
    def buffered_received(self) -> int:
        """Flow-controlled bytes received and not yet acknowledged."""
        return self._conn_window.buffered

    def send_window(self, stream_id: int) -> int:
        """Flow-controlled bytes that may be sent on *stream_id* right now."""
        s = self._streams.get(stream_id)
        if s is None or (s.state, StreamInput.SEND_RECORD) not in TRANSITIONS:
            return 0
        return min(s.credit.available, self._conn_credit.available)

    @property
    def max_send_frame(self) -> int:
        """Largest frame payload the peer accepts."""
        if self.peer_settings is None:
            return 0
        return self.peer_settings.max_frame_size

    @property
    def pending_data_payload(self) -> tuple[int, int] | None:
        """(stream id, bytes) of a DATA payload under way on input, or None.

        The driver may move those bytes itself (``os.splice``) and then call
        :meth:`receive_external_data`.
        """
        if self._reader.data_remaining:
            return self._reader.data_stream, self._reader.data_remaining
        return None

    @property
    def calls_outstanding(self) -> int:
        return len(self._calls_out)

    # ------------------------------------------------------------------
    # Input

    def receive_data(self, data: Buffer) -> list[Event]:
        """Process bytes from the peer; returns the events they complete.

        Raises :class:`RemoteProtocolError` on a connection error, after
        queueing ``GOODBYE``.  Input after the connection closed is ignored.
        """
        if self.state is ConnectionState.CLOSED:
            return []
        events: list[Event] = []
        items: list[Item] = []
        try:
            # The frames before a malformed one are processed first, so the
            # outcome does not depend on how the peer's bytes were split into
            # reads (a GOODBYE before the bad bytes still wins).
            try:
                self._reader.feed(data, items)
                malformed: RemoteProtocolError | None = None
            except RemoteProtocolError as exc:
                malformed = exc
            for item in items:
                if self._closed:
                    break  # nothing after a GOODBYE is processed
                self._process(item, events)
            if malformed is not None and not self._closed:
                raise malformed
        except RemoteProtocolError as exc:
            self._fail(exc)
            raise
        return events

    def receive_external_data(self, size: int) -> list[Event]:
        """*size* bytes of the pending DATA payload were moved by the driver.

        Returns a :class:`DataReceived` with ``data=None`` whose length still
        has to be acknowledged.  The stream must use no digest.
        """
        pending = self.pending_data_payload
        if pending is None or not 0 < size <= pending[1]:
            raise LocalProtocolError(f"{size} bytes of DATA payload are not pending")
        self._reader.skip_data(size)
        stream_id = pending[0]
        s = self._streams.get(stream_id)
        if s is None or s.state not in (StreamState.OPEN, StreamState.HALF_CLOSED_LOCAL):
            self._give_back_connection(size)  # dropped: the stream is gone, as for DataChunk
            return []
        if s.digest != DigestAlgorithm.NONE:
            raise LocalProtocolError("a stream with a digest cannot receive spliced data")
        s.received.skip(size)
        return [DataReceived(stream_id=stream_id, data=None, flow_controlled_length=size)]

    @property
    def _closed(self) -> bool:
        # A property, not an inline test: _process() changes the state, which
        # mypy's narrowing of ``self.state`` inside receive_data cannot see.
        return self.state is ConnectionState.CLOSED

    def _fail(self, exc: RemoteProtocolError) -> None:
        if self.state is not ConnectionState.CLOSED:
            self._out.extend(
                encode_parts(
                    Goodbye(last_stream_id=self._highest_peer_stream, error_code=exc.error_code, reason=exc.reason[:512])
                )
            )
            self.state = ConnectionState.CLOSED
            self.close_reason = f"protocol error: {exc.reason}"

    def _is_idle(self, stream_id: int) -> bool:
        if stream_id % 2 == (1 if self.client else 0):
            return stream_id >= self._next_stream_id
        return stream_id > self._highest_peer_stream

    def _give_back_connection(self, size: int) -> None:
        increment = self._conn_window.acknowledge(size)
        if increment:
            self._answer_peer(WindowUpdate(stream_id=0, increment=increment))

    def _stream_error(self, s: _Stream, code: ErrorCode, reason: str) -> StreamReset:
        self._close_stream(s)
        self._answer_peer(StreamAbort(stream_id=s.stream_id, error_code=code, reason=reason))
        return StreamReset(stream_id=s.stream_id, error_code=code, reason=reason, remote=False)

    def _close_stream(self, s: _Stream) -> None:
        s.state = StreamState.CLOSED
        del self._streams[s.stream_id]

    def _advance(self, s: _Stream, inp: StreamInput) -> None:
        s.state = TRANSITIONS[(s.state, inp)]
        if s.state is StreamState.CLOSED:
            del self._streams[s.stream_id]

    def _process(self, item: object, events: list[Event]) -> None:
        if self.state is ConnectionState.HANDSHAKE:
            self._handshake(item, events)
            return
        handler = _HANDLERS.get(type(item))
        if handler is None:  # pragma: no cover - the reader yields a Preface only first
            raise RemoteProtocolError(f"unexpected {type(item).__name__}")
        handler(self, item, events)

    def _on_data_chunk(self, item: DataChunk, events: list[Event]) -> None:
        s = self._streams.get(item.stream_id)
        if s is not None and s.state in (StreamState.OPEN, StreamState.HALF_CLOSED_LOCAL):
            s.received.update(item.data)
            events.append(DataReceived(stream_id=item.stream_id, data=item.data, flow_controlled_length=len(item.data)))
        else:
            self._give_back_connection(len(item.data))  # dropped: the stream is gone

    def _on_data_start(self, item: DataStart, events: list[Event]) -> None:
        self._record_stream(item.stream_id, item.length, "DATA", events, drop_credit=False)

    def _on_abort(self, item: StreamAbort, events: list[Event]) -> None:
        s = self._known_stream(item.stream_id, "STREAM_ABORT")
        if s is not None:
            self._advance(s, StreamInput.RECV_ABORT)
            events.append(StreamReset(stream_id=item.stream_id, error_code=item.error_code, reason=item.reason, remote=True))

    def _on_ping(self, item: Ping, events: list[Event]) -> None:
        self._pong(item.opaque)

    def _on_pong(self, item: Pong, events: list[Event]) -> None:
        events.append(PongReceived(opaque=item.opaque))

    def _on_goodbye(self, item: Goodbye, events: list[Event]) -> None:
        self.state = ConnectionState.CLOSED
        self.close_reason = f"peer said goodbye: {ErrorCode.name_of(item.error_code)}: {item.reason}"
        events.append(ConnectionTerminated(error_code=item.error_code, last_stream_id=item.last_stream_id, reason=item.reason))

    def _on_settings(self, item: SettingsFrame, events: list[Event]) -> None:
        raise RemoteProtocolError("SETTINGS sent twice")

    def _handshake(self, item: object, events: list[Event]) -> None:
        if not self._got_preface:
            assert isinstance(item, Preface)
            self.version = negotiate_version(self._min_version, self._max_version, item.min_version, item.max_version)
            self._got_preface = True
            return
        if isinstance(item, Goodbye):
            # The peer refused us (e.g. no common version) before its SETTINGS.
            self.state = ConnectionState.CLOSED
            self.close_reason = f"peer refused the connection: {ErrorCode.name_of(item.error_code)}: {item.reason}"
            events.append(ConnectionTerminated(error_code=item.error_code, last_stream_id=item.last_stream_id, reason=item.reason))
            return
        if not isinstance(item, SettingsFrame):
            raise RemoteProtocolError(f"the first frame must be SETTINGS, got {_name(item)}")
        self.peer_settings = Settings.from_frame(item)
        self._conn_credit = SendCredit(self.peer_settings.connection_window)
        self.state = ConnectionState.OPEN
        assert self.version is not None
        events.append(HandshakeComplete(version=self.version, peer_settings=self.peer_settings))

    def _known_stream(self, stream_id: int, what: str) -> _Stream | None:
        """The open stream, None if it closed already, error if it never existed."""
        s = self._streams.get(stream_id)
        if s is None and self._is_idle(stream_id):
            raise RemoteProtocolError(f"{what} on stream {stream_id}, which was never opened")
        return s

    def _record_stream(
        self, stream_id: int, size: int, what: str, events: list[Event], *, drop_credit: bool = True
    ) -> _Stream | None:
        """Account a flow-controlled frame; the stream to deliver it to, or None to drop it.

        A dropped frame's connection credit is given back at once (for DATA,
        chunk by chunk as its payload passes, hence *drop_credit*).
        """
        self._conn_window.consume(size, "connection window")
        s = self._known_stream(stream_id, what)
        if s is not None and (s.state, StreamInput.RECV_RECORD) not in TRANSITIONS:
            events.append(self._stream_error(s, ErrorCode.STREAM_STATE_ERROR, f"{what} after the peer ended the stream"))
            s = None
        if s is None:
            if drop_credit:
                self._give_back_connection(size)
            return None
        s.window.consume(size, f"stream {stream_id} window")
        return s

    def _on_record(self, item: RecordItem, events: list[Event]) -> None:
        record = item.record
        size = len(item.payload)
        zstd = type(record) is ZstdPagesRecord
        if zstd and not self.features & Feature.ZSTD:
            raise RemoteProtocolError(f"ZSTD_PAGES on stream {item.stream_id}, but the ZSTD feature was not negotiated")
        s = self._record_stream(item.stream_id, size, RECORD_FRAME_NAMES[type(record)], events)
        if s is None:
            return
        if zstd:
            expanded = record.raw_size  # type: ignore[union-attr]
            limit = ZSTD_MAX_EXPANSION * self.local_settings.max_frame_size
            if expanded > limit:
                # Well formed, so not a connection error; refused before the
                # driver allocates anything for it.
                events.append(
                    self._stream_error(s, ErrorCode.PROTOCOL_ERROR, f"ZSTD_PAGES of {expanded} bytes decompressed exceeds {limit}")
                )
                self._give_back_connection(size)
                return
        s.received.update(item.payload)
        events.append(RecordReceived(stream_id=item.stream_id, record=record, flow_controlled_length=size))

    def _on_call(self, call: RpcCall, events: list[Event]) -> None:
        if call.serial in self._calls_in:
            raise RemoteProtocolError(f"RPC call serial {call.serial} is already in progress")
        refusal: tuple[ErrorCode, str] | None = None
        if len(call.body) > self.local_settings.max_call_size:
            refusal = (ErrorCode.CALL_TOO_LARGE, f"call body of {len(call.body)} bytes exceeds {self.local_settings.max_call_size}")
        elif len(self._calls_in) >= self.local_settings.max_concurrent_calls:
            refusal = (ErrorCode.BUSY, f"{len(self._calls_in)} calls already in progress")
        if refusal is not None:
            self._answer_peer(
                RpcError(program=call.program, version=call.version, procedure=call.procedure, serial=call.serial, error_code=refusal[0], message=refusal[1])
            )
            return
        self._calls_in[call.serial] = (call.program, call.version, call.procedure)
        events.append(CallReceived(program=call.program, version=call.version, procedure=call.procedure, serial=call.serial, body=call.body))

    def _on_reply(self, reply: RpcReply | RpcError, events: list[Event]) -> None:
        if reply.serial in self._cancelled:
            self._cancelled.discard(reply.serial)
            return
        if self._calls_out.pop(reply.serial, None) is None:
            raise RemoteProtocolError(f"reply to serial {reply.serial}, which has no call outstanding")
        if isinstance(reply, RpcReply):
            events.append(ReplyReceived(program=reply.program, version=reply.version, procedure=reply.procedure, serial=reply.serial, body=reply.body))
        else:
            events.append(
                CallFailed(
                    program=reply.program,
                    version=reply.version,
                    procedure=reply.procedure,
                    serial=reply.serial,
                    error_code=reply.error_code,
                    message=reply.message,
                )
            )

    def _on_open(self, frame: StreamOpen, events: list[Event]) -> None:
        sid = frame.stream_id
        if sid % 2 == (1 if self.client else 0):
            raise RemoteProtocolError(f"peer opened stream {sid}, an id this side allocates")
        if sid <= self._highest_peer_stream:
            raise RemoteProtocolError(f"peer opened stream {sid}, not above its last stream {self._highest_peer_stream}")
        self._highest_peer_stream = sid
        peer_open = sum(1 for s in self._streams.values() if not s.local)
        if frame.digest == DigestAlgorithm.SHA256 and not self._sha256_agreed():
            self._answer_peer(StreamAbort(stream_id=sid, error_code=ErrorCode.REFUSED_STREAM, reason="SHA-256 digests were not negotiated"))
            return
        if peer_open >= self.local_settings.max_concurrent_streams:
            self._answer_peer(
                StreamAbort(
                    stream_id=sid,
                    error_code=ErrorCode.REFUSED_STREAM,
                    reason=f"{peer_open} streams already open, the maximum is {self.local_settings.max_concurrent_streams}",
                )
            )
            return
        assert self.peer_settings is not None
        s = _Stream(sid, frame.kind, frame.digest, False, self.peer_settings.initial_stream_window, self.local_settings.initial_stream_window)
        self._streams[sid] = s
        self._advance(s, StreamInput.RECV_OPEN)
        events.append(StreamOpened(stream_id=sid, kind=frame.kind, digest=frame.digest, migration_id=frame.migration_id, label=frame.label))

    def _on_end(self, frame: StreamEnd, events: list[Event]) -> None:
        s = self._known_stream(frame.stream_id, "STREAM_END")
        if s is None:
            return
        if (s.state, StreamInput.RECV_END) not in TRANSITIONS:
            events.append(self._stream_error(s, ErrorCode.STREAM_STATE_ERROR, "STREAM_END received twice"))
            return
        if frame.digest_algorithm != s.digest:
            events.append(self._stream_error(s, ErrorCode.PROTOCOL_ERROR, f"STREAM_END digest algorithm {frame.digest_algorithm}, stream uses {s.digest}"))
            return
        if frame.total_bytes != s.received.total:
            events.append(
                self._stream_error(s, ErrorCode.DIGEST_MISMATCH, f"peer sent {frame.total_bytes} bytes, {s.received.total} arrived")
            )
            return
        if frame.digest != s.received.digest():
            events.append(self._stream_error(s, ErrorCode.DIGEST_MISMATCH, "digest of the delivered bytes does not match the peer's"))
            return
        self._advance(s, StreamInput.RECV_END)
        events.append(StreamEnded(stream_id=frame.stream_id, total_bytes=frame.total_bytes, digest=frame.digest))

    def _on_window(self, frame: WindowUpdate, events: list[Event]) -> None:
        if frame.stream_id == 0:
            self._conn_credit.grant(frame.increment, "connection")
            events.append(WindowUpdated(stream_id=0, increment=frame.increment))
            return
        s = self._known_stream(frame.stream_id, "WINDOW_UPDATE")
        if s is None or s.state is StreamState.HALF_CLOSED_LOCAL:
            return  # crossed our END or ABORT on the wire
        self._advance(s, StreamInput.RECV_WINDOW)
        s.credit.grant(frame.increment, f"stream {frame.stream_id}")
        events.append(WindowUpdated(stream_id=frame.stream_id, increment=frame.increment))

    def _sha256_agreed(self) -> bool:
        assert self.peer_settings is not None
        return bool(self.local_settings.features & self.peer_settings.features & Feature.DIGEST_SHA256)

    # ------------------------------------------------------------------
    # Local actions

    def _check_open(self) -> Settings:
        if self.state is ConnectionState.HANDSHAKE or self.peer_settings is None:
            raise LocalProtocolError("the handshake has not completed")
        if self.state is ConnectionState.CLOSED:
            raise LocalProtocolError(f"the connection is closed ({self.close_reason})")
        return self.peer_settings

    def _sending_stream(self, stream_id: int, inp: StreamInput) -> _Stream:
        self._check_open()
        s = self._streams.get(stream_id)
        if s is None:
            state = self.stream_state(stream_id)
            raise LocalProtocolError(f"stream {stream_id} is {state.name.lower()}")
        if (s.state, inp) not in TRANSITIONS:
            raise LocalProtocolError(f"cannot {inp.name.lower().replace('_', ' ')} on stream {stream_id} in state {s.state.name}")
        return s

    def _take_credit(self, s: _Stream, size: int) -> None:
        peer = self._check_open()
        if size > peer.max_frame_size:
            raise FrameTooLargeError(f"frame payload of {size} bytes exceeds the peer's maximum of {peer.max_frame_size}")
        available = min(s.credit.available, self._conn_credit.available)
        if size > available:
            raise FlowControlError(f"{size} bytes exceed the {available} bytes of credit on stream {s.stream_id}")
        s.credit.available -= size
        self._conn_credit.available -= size

    def open_stream(
        self,
        *,
        kind: int = StreamKind.BYTES,
        digest: int = DigestAlgorithm.NONE,
        migration_id: bytes = b"\0" * 16,
        label: str = "",
    ) -> int:
        """Open a stream towards the peer; returns its id."""
        peer = self._check_open()
        if digest == DigestAlgorithm.SHA256 and not self._sha256_agreed():
            raise LocalProtocolError("SHA-256 digests were not negotiated with the peer")
        mine = sum(1 for s in self._streams.values() if s.local)
        if mine >= peer.max_concurrent_streams:
            raise LocalProtocolError(f"the peer allows {peer.max_concurrent_streams} concurrent streams, {mine} are open")
        stream_id = self._next_stream_id
        if stream_id > 0xFFFFFFFF:
            raise LocalProtocolError("stream ids are exhausted on this connection")
        frame = StreamOpen(stream_id=stream_id, kind=kind, digest=digest, migration_id=migration_id, label=label)
        parts = encode_parts(frame)  # validates before any state changes
        self._next_stream_id += 2
        s = _Stream(stream_id, kind, digest, True, peer.initial_stream_window, self.local_settings.initial_stream_window)
        self._streams[stream_id] = s
        self._advance(s, StreamInput.SEND_OPEN)
        self._out.extend(parts)
        return stream_id

    def send_data(self, stream_id: int, data: Buffer) -> None:
        """Queue *data* on the stream, split into frames the peer accepts.

        Raises :class:`FlowControlError` if it exceeds the available credit.
        """
        s = self._sending_stream(stream_id, StreamInput.SEND_RECORD)
        view = memoryview(data)
        total = len(view)
        if total > min(s.credit.available, self._conn_credit.available):
            self._take_credit(s, total)  # raises with the right message
        step = self.max_send_frame
        for offset in range(0, total, step):
            chunk = view[offset : offset + step]
            self._take_credit(s, len(chunk))
            s.sent.update(chunk)
            self._out.append(header(FrameType.DATA, stream_id, len(chunk)))
            self._out.append(chunk)

    def prepare_external_data(self, stream_id: int, length: int) -> bytes:
        """Header of a DATA frame whose *length* payload bytes the caller writes itself.

        For splicing: the caller writes everything :meth:`data_to_send`
        holds, then this header, then exactly *length* bytes, with nothing
        in between.  The stream must use no digest.
        """
        s = self._sending_stream(stream_id, StreamInput.SEND_RECORD)
        if s.digest != DigestAlgorithm.NONE:
            raise LocalProtocolError("a stream with a digest cannot send spliced data")
        if length <= 0:
            raise LocalProtocolError("external DATA needs a positive length")
        self._take_credit(s, length)
        s.sent.skip(length)
        return header(FrameType.DATA, stream_id, length)

    def send_record(self, stream_id: int, record: Record) -> None:
        """Queue one typed record (pages, zero pages, device state, an
        iteration mark, zstd pages) as one frame.

        Raises :class:`LocalProtocolError` for an invalid record (nothing is
        queued then), :class:`FrameTooLargeError` or :class:`FlowControlError`
        if it does not fit.  A :class:`ZstdPagesRecord` needs the ZSTD feature
        on both sides; the core cannot check its compressed bytes (it does not
        depend on ``zstandard``): they must decompress to ``raw_size`` bytes.
        """
        s = self._sending_stream(stream_id, StreamInput.SEND_RECORD)
        if type(record) is ZstdPagesRecord:
            self._check_zstd(record)
        ftype, parts = encode_record(record)
        size = sum(len(p) for p in parts)
        self._take_credit(s, size)
        for part in parts:
            s.sent.update(part)  # counts only, for a stream without a digest
        self._out.append(header(ftype, stream_id, size))
        self._out.extend(parts)

    def _check_zstd(self, record: ZstdPagesRecord) -> None:
        peer = self._check_open()
        if not self.features & Feature.ZSTD:
            raise LocalProtocolError("ZSTD_PAGES needs the ZSTD feature on both sides")
        expanded = record.raw_size
        if expanded > ZSTD_MAX_EXPANSION * peer.max_frame_size:
            raise FrameTooLargeError(
                f"{expanded} bytes of pages exceed what the peer decompresses from one frame "
                f"({ZSTD_MAX_EXPANSION} x {peer.max_frame_size})"
            )

    # Shorthands for send_record, one per record kind.

    def send_pages(self, stream_id: int, *, region: int, page_size: int, addresses: tuple[int, ...], data: Buffer) -> None:
        """Queue one PAGES frame: ``len(addresses)`` pages, contiguous in *data*."""
        self.send_record(stream_id, PagesRecord(region=region, page_size=page_size, addresses=tuple(addresses), data=data))

    def send_zero_pages(self, stream_id: int, *, region: int, page_size: int, runs: tuple[tuple[int, int], ...]) -> None:
        self.send_record(stream_id, ZeroPagesRecord(region=region, page_size=page_size, runs=tuple(runs)))

    def send_device_state(self, stream_id: int, *, name: str, version: int = 0, data: Buffer = b"") -> None:
        self.send_record(stream_id, DeviceStateRecord(name=name, version=version, data=data))

    def send_iteration(self, stream_id: int, iteration: int, *, final: bool = False) -> None:
        """Queue an ITERATION mark: the records after it belong to pre-copy pass *iteration*."""
        self.send_record(stream_id, IterationRecord(iteration=iteration, final=final))

    def send_zstd_pages(
        self, stream_id: int, *, region: int, page_size: int, addresses: tuple[int, ...], compressed: Buffer
    ) -> None:
        """Queue one ZSTD_PAGES frame; *compressed* is one zstd frame of the page contents."""
        record = ZstdPagesRecord(region=region, page_size=page_size, addresses=tuple(addresses), compressed=compressed)
        self.send_record(stream_id, record)

    def end_stream(self, stream_id: int) -> None:
        """Half-close: no more records from this side; queues STREAM_END with the digest."""
        s = self._sending_stream(stream_id, StreamInput.SEND_END)
        self._queue(StreamEnd(stream_id=stream_id, total_bytes=s.sent.total, digest_algorithm=s.digest, digest=s.sent.digest()))
        self._advance(s, StreamInput.SEND_END)

    def abort_stream(self, stream_id: int, error_code: int = ErrorCode.CANCEL, reason: str = "") -> None:
        """Abort the stream in both directions.  Aborting a closed stream does nothing."""
        if self.state is not ConnectionState.OPEN:
            return
        s = self._streams.get(stream_id)
        if s is None:
            if self._is_idle(stream_id):
                raise LocalProtocolError(f"stream {stream_id} was never opened")
            return
        self._queue(StreamAbort(stream_id=stream_id, error_code=error_code, reason=reason))
        self._advance(s, StreamInput.SEND_ABORT)

    def acknowledge_received(self, stream_id: int, size: int) -> None:
        """The application took *size* flow-controlled bytes of *stream_id*.

        Acknowledge every record event, also those of streams that were
        aborted meanwhile, or the connection window shrinks for good.
        """
        if size < 0:
            raise LocalProtocolError("cannot acknowledge a negative size")
        if not size or self.state is ConnectionState.CLOSED:
            return
        if size > self._conn_window.buffered:
            raise LocalProtocolError(f"acknowledging {size} bytes, only {self._conn_window.buffered} were received")
        self._give_back_connection(size)
        s = self._streams.get(stream_id)
        if s is not None and (s.state, StreamInput.SEND_WINDOW) in TRANSITIONS:
            increment = s.window.acknowledge(min(size, s.window.buffered))
            if increment:
                self._answer_peer(WindowUpdate(stream_id=stream_id, increment=increment))

    def resize_stream_window(self, stream_id: int, size: int) -> None:
        """Grant *stream_id* a receive window of *size* bytes from now on.

        For a stream whose needs change while it runs: a smaller window holds
        fewer bytes between the two applications (less latency behind a
        backlog), a larger one carries more per round trip.  Shrinking takes
        no credit back (a peer may always use what it was granted); this side
        withholds the difference from the credit it would return next, so the
        peer soon holds at most *size*.  Growing grants the difference at once.
        Nothing on the wire announces it (see protocol.md, section 6).  A
        stream that can no longer receive is left alone.
        """
        if not 0 <= size <= MAX_WINDOW:
            raise LocalProtocolError(f"a stream window of {size} bytes is outside 0..2**31-1")
        if self.state is ConnectionState.CLOSED:
            return
        s = self._streams.get(stream_id)
        if s is None or (s.state, StreamInput.SEND_WINDOW) not in TRANSITIONS:
            return
        increment = s.window.resize(size)
        if increment:
            self._answer_peer(WindowUpdate(stream_id=stream_id, increment=increment))

    def request_data(self, stream_id: int, size: int) -> None:
        """The application waits for data on *stream_id* and has none buffered.

        Where the peer holds no credit on the stream and none is buffered or
        due back (a window of 0), grant *size* bytes (at most this side's
        MAX_FRAME_SIZE), and as much on the
        connection so that each stream's grant can be used whatever other
        streams do; else grant *size* on the connection if that is so
        there.  Otherwise do nothing.  Without this a window of 0 never
        carries data.
        """
        if self.state is ConnectionState.CLOSED:
            return
        s = self._streams.get(stream_id)
        if s is None or (s.state, StreamInput.SEND_WINDOW) not in TRANSITIONS:
            return
        # At most one frame's worth: a consumer asking for a gigabyte must not let the peer
        # push a gigabyte into this side's buffers.
        size = min(size, self.local_settings.max_frame_size)
        increment = s.window.request(size)
        if increment:
            self._answer_peer(WindowUpdate(stream_id=stream_id, increment=increment))
            increment = self._conn_window.lend(increment)
        else:
            increment = self._conn_window.request(size)
        if increment:
            self._answer_peer(WindowUpdate(stream_id=0, increment=increment))

    # RPC

    def send_call(self, program: int, version: int, procedure: int, body: Buffer = b"") -> int:
        """Queue an RPC call; returns its serial."""
        peer = self._check_open()
        if len(body) > peer.max_call_size or len(body) + _RPC_HEADER > peer.max_frame_size:
            raise FrameTooLargeError(f"call body of {len(body)} bytes exceeds the peer's limit of {min(peer.max_call_size, peer.max_frame_size - _RPC_HEADER)}")
        serial = self._next_serial
        while serial in self._calls_out or serial in self._cancelled or serial == 0:
            serial = (serial + 1) & 0xFFFFFFFF
        self._queue(RpcCall(program=program, version=version, procedure=procedure, serial=serial, body=body))
        self._next_serial = (serial + 1) & 0xFFFFFFFF
        self._calls_out[serial] = (program, version, procedure)
        return serial

    def cancel_call(self, serial: int) -> None:
        """Forget a call; its reply, when it comes, is dropped."""
        if self._calls_out.pop(serial, None) is not None:
            self._cancelled.add(serial)

    def _answer(self, serial: int) -> tuple[int, int, int]:
        self._check_open()
        try:
            return self._calls_in.pop(serial)
        except KeyError:
            raise LocalProtocolError(f"no call with serial {serial} is waiting for an answer") from None

    def send_reply(self, serial: int, body: Buffer = b"") -> None:
        peer = self._check_open()
        if serial in self._calls_in and len(body) + _RPC_HEADER > peer.max_frame_size:
            raise FrameTooLargeError(f"reply of {len(body)} bytes exceeds the peer's maximum frame size")
        program, version, procedure = self._answer(serial)
        self._answer_peer(RpcReply(program=program, version=version, procedure=procedure, serial=serial, body=body))

    def send_error(self, serial: int, error_code: int, message: str) -> None:
        peer = self._check_open()
        encoded = message.encode("utf-8", "replace")[: peer.max_frame_size - 64]
        program, version, procedure = self._answer(serial)
        self._answer_peer(
            RpcError(
                program=program,
                version=version,
                procedure=procedure,
                serial=serial,
                error_code=error_code,
                message=encoded.decode("utf-8", "ignore"),
            )
        )

    # Connection

    def ping(self, opaque: bytes) -> None:
        self._check_open()
        self._queue(Ping(opaque=opaque))

    def close(self, error_code: int = ErrorCode.NO_ERROR, reason: str = "") -> None:
        """Queue GOODBYE; afterwards nothing more is sent or processed."""
        if self.state is ConnectionState.CLOSED:
            return
        self._queue(Goodbye(last_stream_id=self._highest_peer_stream, error_code=error_code, reason=reason))
        self.state = ConnectionState.CLOSED
        self.close_reason = f"closed locally: {ErrorCode.name_of(error_code)}: {reason}"


#: What the connection does with each item the reader yields once the handshake is done.
_HANDLERS: dict[type[object], Callable[[Connection, Any, list[Event]], None]] = {
    DataChunk: Connection._on_data_chunk,
    DataStart: Connection._on_data_start,
    RecordItem: Connection._on_record,
    RpcCall: Connection._on_call,
    RpcReply: Connection._on_reply,
    RpcError: Connection._on_reply,
    StreamOpen: Connection._on_open,
    StreamEnd: Connection._on_end,
    StreamAbort: Connection._on_abort,
    WindowUpdate: Connection._on_window,
    Ping: Connection._on_ping,
    Pong: Connection._on_pong,
    Goodbye: Connection._on_goodbye,
    SettingsFrame: Connection._on_settings,
}


def _name(item: object) -> str:
    if isinstance(item, DataStart | DataChunk):
        return "DATA"
    if isinstance(item, RecordItem):
        return record_frame_type(item.record).name
    return type(item).__name__
