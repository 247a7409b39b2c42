"""Immutable statistics snapshots of streams and connections."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ConnectionStatistics", "StreamStatistics"]


@dataclass(frozen=True, slots=True, kw_only=True)
class StreamStatistics:
    stream_id: int
    label: str
    #: Flow-controlled payload bytes and frames sent / received on this stream.
    bytes_sent: int
    bytes_received: int
    frames_sent: int
    frames_received: int
    #: Credit this side may still use, and credit the peer may still use.
    send_credit: int
    receive_window: int
    #: Received bytes not yet taken by the application.
    buffered: int
    #: Seconds this stream had data to send but no credit.
    blocked_on_credit_s: float
    #: Bytes per second, 0 for none.
    bandwidth_limit: int
    #: Bytes spliced by the kernel without entering this process.
    bytes_spliced: int
    #: Page contents sent in page records, before compression and as they went
    #: on the wire (smaller for batches sent as ZSTD_PAGES); equal without compression.
    pages_raw_bytes: int = 0
    pages_wire_bytes: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class ConnectionStatistics:
    #: Bytes and frames on the transport, all frame types, headers included.
    bytes_sent: int
    bytes_received: int
    frames_sent: int
    #: Credit this side may still use for all streams, and the peer's.
    connection_credit: int
    connection_window: int
    #: Received stream bytes not yet taken by applications, all streams.
    buffered: int
    calls_outstanding: int
    calls_served: int
    streams: tuple[StreamStatistics, ...]
    #: Seconds since anything arrived from the peer.
    idle_s: float
