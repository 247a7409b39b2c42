"""The trio layer: a tunnel connection over any ``trio.abc.Stream``.

    async with tunnel.transport.open_connection(stream, client=True) as conn:
        reply = await conn.call(PROGRAM, PROCEDURE, b"...")
        s = await conn.open_stream(label="qemu")
        await s.send_all(data)
        await s.send_eof()

The record types (``PagesRecord`` and the rest) are the core's own
(:mod:`tunnel._records`), re-exported here: the same objects go from a
source reader through the stream, the core and the wire to the peer's
writer.
"""

from __future__ import annotations

from .._records import DeviceStateRecord, IterationRecord, PagesRecord, ZeroPagesRecord, ZstdPagesRecord
from ._connection import Handler, TunnelConnection, open_connection
from ._stats import ConnectionStatistics, StreamStatistics
from ._stream import Record, TunnelStream
from ._tls import TLSStream, tune_context

__all__ = [
    "ConnectionStatistics",
    "DeviceStateRecord",
    "Handler",
    "IterationRecord",
    "PagesRecord",
    "Record",
    "StreamStatistics",
    "TLSStream",
    "TunnelConnection",
    "TunnelStream",
    "ZeroPagesRecord",
    "ZstdPagesRecord",
    "open_connection",
    "tune_context",
]
