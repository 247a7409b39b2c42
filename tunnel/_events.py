"""Events returned by :meth:`Connection.receive_data`.

Record events (:class:`DataReceived` for opaque bytes, :class:`RecordReceived`
for the typed records of :mod:`tunnel._records`) carry
``flow_controlled_length``: the number of bytes to hand back to
:meth:`Connection.acknowledge_received` once the application has taken the
record, which is what returns credit to the peer.  Bulk fields are
memoryviews of the buffer passed to ``receive_data``: valid while that
buffer is, never copied by the core.
"""

from __future__ import annotations

from dataclasses import dataclass

from ._records import Buffer, Record
from ._settings import Settings

__all__ = [
    "CallFailed",
    "CallReceived",
    "ConnectionTerminated",
    "DataReceived",
    "Event",
    "HandshakeComplete",
    "PongReceived",
    "RecordReceived",
    "ReplyReceived",
    "StreamEnded",
    "StreamOpened",
    "StreamReset",
    "WindowUpdated",
]


@dataclass(frozen=True, slots=True, kw_only=True)
class Event:
    """Base class of all events."""


@dataclass(frozen=True, slots=True, kw_only=True)
class HandshakeComplete(Event):
    version: int
    peer_settings: Settings


@dataclass(frozen=True, slots=True, kw_only=True)
class CallReceived(Event):
    program: int
    version: int
    procedure: int
    serial: int
    body: Buffer


@dataclass(frozen=True, slots=True, kw_only=True)
class ReplyReceived(Event):
    program: int
    version: int
    procedure: int
    serial: int
    body: Buffer


@dataclass(frozen=True, slots=True, kw_only=True)
class CallFailed(Event):
    program: int
    version: int
    procedure: int
    serial: int
    error_code: int
    message: str


@dataclass(frozen=True, slots=True, kw_only=True)
class StreamOpened(Event):
    stream_id: int
    kind: int
    digest: int
    migration_id: bytes
    label: str


@dataclass(frozen=True, slots=True, kw_only=True)
class DataReceived(Event):
    """Opaque stream bytes.  One DATA frame may arrive as several events.

    ``data`` is None when the payload was moved past the core by
    :meth:`Connection.receive_external_data` (spliced).
    """

    stream_id: int
    data: Buffer | None
    flow_controlled_length: int


@dataclass(frozen=True, slots=True, kw_only=True)
class RecordReceived(Event):
    """A typed record: pages, zero pages, device state, an iteration mark, or
    zstd-compressed pages (:mod:`tunnel._records`).

    Bulk fields of *record* are views of the buffer given to ``receive_data``.
    A :class:`ZstdPagesRecord` is delivered as received: the core does not
    decompress (it must not depend on ``zstandard``); the driver
    decompresses it to ``record.raw_size`` bytes and treats a corrupt frame
    or any other size as a stream error ``PROTOCOL_ERROR`` (protocol.md
    §4.17).  The core has already checked that size against the limit of
    64 x this side's ``max_frame_size``.
    """

    stream_id: int
    record: Record
    flow_controlled_length: int


@dataclass(frozen=True, slots=True, kw_only=True)
class StreamEnded(Event):
    """The peer half-closed the stream; its byte count and digest matched."""

    stream_id: int
    total_bytes: int
    digest: bytes


@dataclass(frozen=True, slots=True, kw_only=True)
class StreamReset(Event):
    """The stream was aborted: by the peer (``remote``) or by this core on a stream error."""

    stream_id: int
    error_code: int
    reason: str
    remote: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class WindowUpdated(Event):
    """The peer granted credit; stream_id 0 is the connection window."""

    stream_id: int
    increment: int


@dataclass(frozen=True, slots=True, kw_only=True)
class PongReceived(Event):
    opaque: bytes


@dataclass(frozen=True, slots=True, kw_only=True)
class ConnectionTerminated(Event):
    """The peer sent GOODBYE; nothing more will be processed on this connection."""

    error_code: int
    last_stream_id: int
    reason: str
