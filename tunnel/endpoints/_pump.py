"""Pumping a reader into a tunnel stream, and a tunnel stream into a writer.

Theory of operation.  Back-pressure needs no buffer of its own here: the
source pump awaits ``stream.send_*`` for each record, which returns only
once the record is on the wire (so the reader's buffer may be reused) and
waits whenever the stream has no credit; the destination pump awaits
``writer.write`` before it takes the next record, and the transport returns
credit to the source only as records are taken.  So a slow writer fills the
stream window, the source waits for credit, and the reader is not resumed:
memory on both sides stays within one stream window.

The outcome travels back on the same stream.  After the source's records
and its end of stream, the destination commits and then ends its own
direction; the source waits for that end before it reports success.  If
anything fails on either side, the stream is aborted with a code and a
reason: the writer discards its partial result, and the other side's pump
raises :class:`tunnel.StreamAborted` carrying that reason.
"""

from __future__ import annotations

from dataclasses import dataclass

import trio

from .. import RECORD_TYPES, DigestAlgorithm, ErrorCode, FrameTooLargeError, Record, StreamAborted, record_units, split_record
from ..transport import StreamStatistics, TunnelConnection, TunnelStream
from ._api import DestinationWriter, EndpointError, FdDestination, FdSource, Progress, SourceReader, SourceRecord

__all__ = ["TransferResult", "receive_into", "send_from", "send_source"]


@dataclass(frozen=True, slots=True, kw_only=True)
class TransferResult:
    """What one pump moved."""

    #: Records handed over (for the fd path: 0, the bytes are in ``statistics``).
    records: int
    #: Flow-controlled payload bytes of the stream in this direction.
    payload_bytes: int
    #: The stream's statistics at the end (page compression counters included if present).
    statistics: StreamStatistics
    #: The reader's final progress (source side only).
    progress: Progress | None = None


_MAX_REASON = 1000  # characters of an exception's text that go to the peer


def _reason(exc: BaseException) -> str:
    if isinstance(exc, StreamAborted):
        return exc.reason
    if isinstance(exc, trio.Cancelled):
        return "the migration was cancelled"
    text = str(exc)
    reason = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return reason[:_MAX_REASON]


def _code(exc: BaseException) -> int:
    if isinstance(exc, trio.Cancelled | KeyboardInterrupt):
        return ErrorCode.CANCEL
    return ErrorCode.APPLICATION_ERROR


def _source_fd(reader: object) -> int | None:
    return reader.source_fd() if isinstance(reader, FdSource) else None


def _sink_fd(writer: object) -> int | None:
    return writer.sink_fd() if isinstance(writer, FdDestination) else None


class _RecordSender:
    """Sends records on a stream, splitting those the peer cannot take whole.

    A page or zero-page record larger than the peer's frames or windows is
    sent in pieces (:func:`tunnel.split_record`); the largest piece that
    worked is remembered per record type, so later records are cut up front.
    """

    def __init__(self, stream: TunnelStream) -> None:
        self.stream = stream
        #: Record type -> most units (pages, runs) one record of it may carry.
        self.most: dict[type[object], int] = {}

    async def send(self, record: SourceRecord) -> None:
        if isinstance(record, bytes | memoryview | bytearray):
            await self.stream.send_all(record)
        elif isinstance(record, RECORD_TYPES):
            await self._send(record)
        else:
            raise EndpointError(f"a source reader yielded {type(record).__name__}, which is not a record")

    async def _send(self, record: Record) -> None:
        most = self.most.get(type(record))
        if most is not None and record_units(record) > most:
            for piece in split_record(record, most):
                await self._send(piece)
            return
        try:
            await self.stream.send_record(record)
        except FrameTooLargeError:
            count = record_units(record)
            if count <= 1:
                raise
            self.most[type(record)] = count // 2 if most is None else min(most, count // 2)
            await self._send(record)  # now in pieces


async def _abort(stream: TunnelStream, exc: BaseException) -> None:
    with trio.CancelScope(shield=True):
        await stream.abort(_code(exc), _reason(exc))


async def send_from(reader: SourceReader, stream: TunnelStream) -> TransferResult:
    """Send everything *reader* produces on *stream*, end it, and wait for the destination.

    Returns only after the destination's pump (:func:`receive_into`)
    committed its writer and ended its direction of the stream; a failure
    there raises :class:`tunnel.StreamAborted` with the destination's
    reason.  If the reader fails, the stream is aborted with the exception
    text as reason and the exception propagates.  The reader is closed and
    the stream closed in every case.  If the connection is lost after the
    last record, the outcome at the destination is unknown (as in any
    two-party commit): the caller must ask it, e.g. over RPC.
    """
    records = 0
    try:
        try:
            fd = _source_fd(reader)
            if fd is not None:
                assert isinstance(reader, FdSource)
                reader.fd_finished(await stream.send_fd(fd))
            else:
                sender = _RecordSender(stream)
                iterator = reader.records()
                try:
                    async for record in iterator:
                        await sender.send(record)
                        records += 1
                finally:
                    closer = getattr(iterator, "aclose", None)
                    if closer is not None:  # run the reader's cleanup now, not when the generator is collected
                        with trio.CancelScope(shield=True):
                            await closer()
            await stream.send_eof()
            reply = await stream.receive_record()  # the destination's end of stream: it committed
            if not (isinstance(reply, bytes) and not reply):
                raise EndpointError(f"the destination sent {type(reply).__name__} instead of confirming its commit")
        except BaseException as exc:
            await _abort(stream, exc)
            raise
        stats = stream.statistics()
        return TransferResult(records=records, payload_bytes=stats.bytes_sent, statistics=stats, progress=reader.progress())
    finally:
        with trio.CancelScope(shield=True):
            try:
                await reader.aclose()
            finally:
                await stream.aclose()


async def receive_into(stream: TunnelStream, writer: DestinationWriter) -> TransferResult:
    """Apply everything that arrives on *stream* with *writer*, then commit and confirm.

    ``writer.commit()`` runs only once end of stream arrived (the transport
    has verified the byte count and digest); then this side ends its
    direction, which tells the source pump that the destination is
    complete.  On any failure (the peer aborted, a digest mismatch, the
    writer raised) the writer is aborted, the stream aborted with the
    reason, and the exception propagates.
    """
    records = 0
    try:
        try:
            fd = _sink_fd(writer)
            if fd is not None:
                assert isinstance(writer, FdDestination)
                writer.fd_finished(await stream.receive_fd(fd))
            else:
                while True:
                    record = await stream.receive_record()
                    if isinstance(record, bytes) and not record:
                        break
                    await writer.write(record)
                    records += 1
            await writer.commit()
        except BaseException as exc:
            with trio.CancelScope(shield=True):
                await _abort(stream, exc)
                await writer.abort(_reason(exc))
            raise
        await stream.send_eof()
        stats = stream.statistics()
        return TransferResult(records=records, payload_bytes=stats.bytes_received, statistics=stats)
    finally:
        with trio.CancelScope(shield=True):
            await stream.aclose()


async def send_source(
    conn: TunnelConnection,
    reader: SourceReader,
    *,
    label: str = "",
    digest: int | None = None,
    compress: bool = False,
    bandwidth: int = 0,
    migration_id: bytes = b"\0" * 16,
) -> TransferResult:
    """Open a stream for *reader* on *conn* and :func:`send_from` it.

    *digest* None picks ``NONE`` for a reader that hands over a pipe or
    socket (so the kernel can splice it; the byte count is still verified)
    and ``CRC32`` otherwise.  *compress* asks for zstd on page data, used
    only if the peer agreed to it at the handshake.
    """
    if digest is None:
        digest = DigestAlgorithm.NONE if _source_fd(reader) is not None else DigestAlgorithm.CRC32
    try:
        stream = await conn.open_stream(
            kind=reader.stream_kind, digest=digest, label=label, migration_id=migration_id, bandwidth=bandwidth, compress=compress
        )
    except BaseException:
        with trio.CancelScope(shield=True):
            await reader.aclose()
        raise
    return await send_from(reader, stream)
