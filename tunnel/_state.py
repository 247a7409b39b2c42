"""The per-stream state machine, as a table.

``TRANSITIONS[(state, input)]`` is the next state.  A pair missing from the
table is a protocol violation: a local one raises
:class:`LocalProtocolError`; a remote one is a stream error
``STREAM_STATE_ERROR`` (the stream is aborted, the connection lives on).
Tests walk every pair.
"""

from __future__ import annotations

from enum import Enum, auto

__all__ = ["TRANSITIONS", "StreamInput", "StreamState"]


class StreamState(Enum):
    IDLE = auto()
    OPEN = auto()
    #: This side sent STREAM_END; it still receives.
    HALF_CLOSED_LOCAL = auto()
    #: The peer sent STREAM_END; this side still sends.
    HALF_CLOSED_REMOTE = auto()
    CLOSED = auto()


class StreamInput(Enum):
    SEND_OPEN = auto()
    RECV_OPEN = auto()
    #: DATA, PAGES, ZERO_PAGES, DEVICE_STATE, ITERATION or ZSTD_PAGES: every record.
    SEND_RECORD = auto()
    RECV_RECORD = auto()
    SEND_END = auto()
    RECV_END = auto()
    SEND_ABORT = auto()
    RECV_ABORT = auto()
    #: WINDOW_UPDATE: sent while this side still receives, received while it still sends.
    SEND_WINDOW = auto()
    RECV_WINDOW = auto()


S, I = StreamState, StreamInput

TRANSITIONS: dict[tuple[StreamState, StreamInput], StreamState] = {
    (S.IDLE, I.SEND_OPEN): S.OPEN,
    (S.IDLE, I.RECV_OPEN): S.OPEN,
    (S.OPEN, I.SEND_RECORD): S.OPEN,
    (S.OPEN, I.RECV_RECORD): S.OPEN,
    (S.OPEN, I.SEND_WINDOW): S.OPEN,
    (S.OPEN, I.RECV_WINDOW): S.OPEN,
    (S.OPEN, I.SEND_END): S.HALF_CLOSED_LOCAL,
    (S.OPEN, I.RECV_END): S.HALF_CLOSED_REMOTE,
    (S.OPEN, I.SEND_ABORT): S.CLOSED,
    (S.OPEN, I.RECV_ABORT): S.CLOSED,
    (S.HALF_CLOSED_LOCAL, I.RECV_RECORD): S.HALF_CLOSED_LOCAL,
    (S.HALF_CLOSED_LOCAL, I.SEND_WINDOW): S.HALF_CLOSED_LOCAL,
    # Credit granted before our END crossed on the wire: harmless, ignored.
    (S.HALF_CLOSED_LOCAL, I.RECV_WINDOW): S.HALF_CLOSED_LOCAL,
    (S.HALF_CLOSED_LOCAL, I.RECV_END): S.CLOSED,
    (S.HALF_CLOSED_LOCAL, I.SEND_ABORT): S.CLOSED,
    (S.HALF_CLOSED_LOCAL, I.RECV_ABORT): S.CLOSED,
    (S.HALF_CLOSED_REMOTE, I.SEND_RECORD): S.HALF_CLOSED_REMOTE,
    (S.HALF_CLOSED_REMOTE, I.RECV_WINDOW): S.HALF_CLOSED_REMOTE,
    (S.HALF_CLOSED_REMOTE, I.SEND_END): S.CLOSED,
    (S.HALF_CLOSED_REMOTE, I.SEND_ABORT): S.CLOSED,
    (S.HALF_CLOSED_REMOTE, I.RECV_ABORT): S.CLOSED,
}

del S, I
