"""What a stream may ask of its connection: the narrow interface between them.

A :class:`~._stream.TunnelStream` holds one :class:`StreamLink` and nothing
else of the connection.  Every method turns a stream's need into a call on
the sans-I/O core and, where that queued output, a kick of the writer; once
the connection has failed they do nothing (or raise its error, where the
stream must learn of it).
"""

from __future__ import annotations

import math
from collections.abc import Callable

from .._connection import Connection, StreamInfo
from .._errors import ErrorCode, FrameTooLargeError
from .._settings import Feature
from .._state import StreamState
from ._outbox import Outbox
from ._util import Health
from ._writer import Writer

__all__ = ["StreamLink"]


class StreamLink:
    """A stream's view of its connection (one per connection, shared by its streams)."""

    def __init__(
        self, core: Connection, health: Health, writer: Writer, *, forget: Callable[[int], None], can_splice: bool
    ) -> None:
        self._core = core
        self._health = health
        self._writer = writer
        self._forget = forget
        #: Whether a stream's fd may be spliced to or from the transport (a plain socket, Linux).
        self.can_splice = can_splice

    @property
    def chunk_size(self) -> int:
        """Bytes per read when a stream copies from a file descriptor."""
        return self._writer.chunk_size

    @property
    def receive_window(self) -> int:
        """The stream window this side grants: what a stream may have to buffer."""
        return self._core.local_settings.initial_stream_window

    @property
    def compression(self) -> bool:
        """Whether both sides set the ZSTD feature."""
        return bool(self._core.features & Feature.ZSTD)

    def check_alive(self) -> None:
        self._health.check()

    def schedule(self, outbox: Outbox) -> None:
        self._writer.schedule(outbox)

    def send_window(self, stream_id: int) -> int:
        self._health.check()
        return self._core.send_window(stream_id)

    def check_record_fits(self, size: int) -> None:
        """A record of *size* flow-controlled bytes can ever be sent (else FrameTooLargeError)."""
        peer = self._core.peer_settings
        assert peer is not None
        # A window of 0 opens on demand, a frame's worth at a time (request_data).
        limit = min(peer.max_frame_size, peer.initial_stream_window or math.inf, peer.connection_window or math.inf)
        if size > limit:
            raise FrameTooLargeError(
                f"a record of {size} bytes can never be sent: the peer accepts frames and windows of {limit} bytes"
            )

    def acknowledge(self, stream_id: int, size: int) -> None:
        """The application took *size* flow-controlled bytes: credit goes back to the peer."""
        if size and self._health.alive:
            self._core.acknowledge_received(stream_id, size)
            if self._core.pending_output:
                self._writer.kick()

    def resize_window(self, stream_id: int, size: int) -> None:
        """Grant *stream_id* a receive window of *size* bytes from now on."""
        if self._health.alive:
            self._core.resize_stream_window(stream_id, size)
            if self._core.pending_output:
                self._writer.kick()

    def request_data(self, stream_id: int, size: int | None) -> None:
        """A stream's consumer waits with nothing buffered: credit for a peer that has none (window 0).

        *size* is how much the consumer asked for (None: a frame's worth).
        """
        if self._health.alive:
            self._core.request_data(stream_id, size or self._core.local_settings.max_frame_size)
            if self._core.pending_output:
                self._writer.kick()

    def end_stream(self, stream_id: int) -> None:
        self._health.check()
        self._core.end_stream(stream_id)
        self._writer.kick()

    def abort_stream(self, stream_id: int, error_code: int, reason: str) -> None:
        if self._health.alive:
            self._core.abort_stream(stream_id, error_code, reason)
            self._writer.kick()

    def close_stream(self, stream_id: int, *, eof_sent: bool, sending: bool) -> None:
        """aclose(): end our direction, abort the peer's if it is still sending.

        With a send in flight (*sending*), the peer has only part of it: abort, never end.
        """
        if not self._health.alive:
            return
        core = self._core
        state = core.stream_state(stream_id)
        if state in (StreamState.OPEN, StreamState.HALF_CLOSED_REMOTE) and sending:
            core.abort_stream(stream_id, ErrorCode.CANCEL, "the sender closed the stream during a send")
            self._writer.kick()
            return
        if state in (StreamState.OPEN, StreamState.HALF_CLOSED_REMOTE) and not eof_sent:
            core.end_stream(stream_id)
            state = core.stream_state(stream_id)
        if state in (StreamState.OPEN, StreamState.HALF_CLOSED_LOCAL):
            core.abort_stream(stream_id, ErrorCode.CANCEL, "the receiver closed the stream")
        self._writer.kick()

    def forget(self, stream_id: int) -> None:
        """The stream was closed: the connection no longer routes anything to it."""
        self._forget(stream_id)

    def stream_state(self, stream_id: int) -> StreamState:
        return self._core.stream_state(stream_id)

    def stream_info(self, stream_id: int) -> StreamInfo | None:
        return self._core.stream_info(stream_id)
