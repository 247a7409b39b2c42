"""The trio layer: a tunnel connection over any ``trio.abc.Stream``.

    async with tunnel.transport.open_connection(stream, client=True) as conn:
        reply = await conn.call(PROGRAM, PROCEDURE, b"...")
        s = await conn.open_stream(label="qemu")
        await s.send_all(data)
        await s.send_eof()
"""

from __future__ import annotations

from ._connection import Handler, TunnelConnection, open_connection
from ._stats import ConnectionStatistics, StreamStatistics
from ._stream import DeviceStateRecord, IterationRecord, PagesRecord, Record, TunnelStream, ZeroPagesRecord
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
    "open_connection",
    "tune_context",
]
