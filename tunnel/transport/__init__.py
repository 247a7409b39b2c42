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

Theory of operation
-------------------

A :class:`TunnelConnection` is an adapter over the sans-I/O core
(:class:`tunnel.Connection`), built from parts that each own their state
and call each other through a few public methods:

================  ==========================================  ==============================
part              owns                                         runs in
================  ==========================================  ==============================
core              protocol state: streams, windows, digests,   (no task: called by the others)
                  calls, the queue of bytes to write
Reader            read buffers and pools, bytes read and not   the reader task
(``_reading``)    yet fed, the frame-timeout clock; routes
                  each event through one table
Writer            the transport's write side, the rotation of  the writer task
(``_writer``)     scheduled outboxes
CallTable         waiters of outgoing calls, handlers          handler tasks (one per call)
(``_rpc``)
Keepalive         outstanding pings                            the watchdog task
(``_keepalive``)
StreamTable       streams by id, streams not yet accepted      (application tasks)
(``_stream``)
TunnelStream      its Outbox (the one piece of work handed to  the application's tasks
(``_stream``)     the writer) and its Inbox (what arrived and
                  was not taken, its file sink); talks to the
                  connection only through a StreamLink
================  ==========================================  ==============================

The connection owns the transport (the writer task closes it when it is
done) and the :class:`~._util.Health` that every part reads: the first
failure, recorded once by ``TunnelConnection._fail``, which fails every
stream, call and ping.  Background tasks live in a nursery that
``open_connection``'s ``async with`` owns.

Which task does what.  The *reader* reads, hands the bytes to the core and
dispatches the resulting events: data and records to the stream's inbox
(never waiting for the application), credit to the stream's outbox, calls
and replies to the call table, pongs to the keepalive.  It splices a DATA
payload straight into a file sink registered by ``receive_fd``.  The
*writer* is the only task that writes: each round it writes what the core
queued (control frames first), then one data frame from the next outbox in
the rotation.  The *watchdog* pings an idle peer and drops a silent one.
Application tasks only queue work in the core or hand a buffer to their
outbox, and wait.

The handshake: the reader completes it, then dispatches nothing behind it
until ``open_connection`` releases it, right before handing the connection
to its body; so handlers the body registers at once find a call that came
right behind the handshake, whatever order trio runs the tasks in.

Where back-pressure comes from.  Sending: a stream's ``send_*`` returns
only once the writer has put its work on the wire, and the writer sends a
stream's frame only within the credit the peer granted; so a slow peer
stalls the sender with one buffer in flight and nothing queued.  Receiving:
the reader never blocks on a consumer; the peer cannot exceed the stream
and connection windows, so an inbox holds at most a window, and credit
goes back only as the application takes data (or a sink takes it).  What
this side owes the peer (PONG, WINDOW_UPDATE, RPC answers) is bounded too:
the reader stops reading while more than ``max_control_backlog`` bytes of
it wait to be written, so a peer that does not read throttles itself.
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
