"""tunnel: live-migration data multiplexed with RPC on one connection.

The core (this package's top level) is sans-I/O and never imports trio:
:class:`Connection` takes bytes and returns events.  ``tunnel.trio`` drives
it over a trio stream.
"""

from __future__ import annotations

from ._connection import Connection, ConnectionState, StreamInfo
from ._errors import (
    ConnectionLost,
    ErrorCode,
    FlowControlError,
    FrameTooLargeError,
    LocalProtocolError,
    ProtocolError,
    RemoteProtocolError,
    RPCError,
    StreamAborted,
    TunnelError,
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
from ._frames import Buffer, DigestAlgorithm, FrameType, StreamKind
from ._records import (
    RECORD_TYPES,
    DeviceStateRecord,
    IterationRecord,
    PagesRecord,
    Record,
    ZeroPagesRecord,
    ZstdPagesRecord,
    record_units,
    split_record,
)
from ._settings import PROTOCOL_VERSION, Feature, SettingId, Settings
from ._state import StreamState

__all__ = [
    "PROTOCOL_VERSION",
    "RECORD_TYPES",
    "Buffer",
    "CallFailed",
    "CallReceived",
    "Connection",
    "ConnectionLost",
    "ConnectionState",
    "ConnectionTerminated",
    "DataReceived",
    "DeviceStateRecord",
    "DigestAlgorithm",
    "ErrorCode",
    "Event",
    "Feature",
    "FlowControlError",
    "FrameTooLargeError",
    "FrameType",
    "HandshakeComplete",
    "IterationRecord",
    "LocalProtocolError",
    "PagesRecord",
    "PongReceived",
    "ProtocolError",
    "RPCError",
    "Record",
    "RecordReceived",
    "RemoteProtocolError",
    "ReplyReceived",
    "SettingId",
    "Settings",
    "StreamAborted",
    "StreamEnded",
    "StreamInfo",
    "StreamKind",
    "StreamOpened",
    "StreamReset",
    "StreamState",
    "TunnelError",
    "WindowUpdated",
    "ZeroPagesRecord",
    "ZstdPagesRecord",
    "record_units",
    "split_record",
]
