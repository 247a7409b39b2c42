"""The trio driver: RPC and streams multiplexed on one trio stream.

:class:`TunnelConnection` is a composition of parts, each owning its state
and talking to the others through a few methods (the theory of operation
of the whole package is in :mod:`tunnel.transport`):

* the sans-I/O core (:class:`tunnel.Connection`), the protocol state;
* the :class:`~._reading.Reader` task, which feeds the core and routes its events;
* the :class:`~._writer.Writer` task, the only one that writes;
* the :class:`~._rpc.CallTable`, calls in both directions;
* the :class:`~._keepalive.Keepalive`, pings and the watchdog task;
* the :class:`~._stream.StreamTable` of streams, each talking to the
  connection only through its :class:`~._link.StreamLink`.

Every failure (transport error, protocol error, keepalive timeout, GOODBYE)
goes through :meth:`TunnelConnection._fail`, which records it in the shared
:class:`~._util.Health` and fails every stream and pending call with
:class:`tunnel.ConnectionLost`; the writer then flushes any GOODBYE the core
queued, and the connection closes the transport.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager

import trio

from .._connection import Connection
from .._errors import ErrorCode
from .._events import StreamOpened
from .._frames import Buffer, DigestAlgorithm, StreamKind
from .._settings import Feature, Settings
from ._compress import zstd_available
from ._inbox import SinkRegistry
from ._io import BufferWriter, raw_socket, tune_socket
from ._keepalive import Keepalive
from ._link import StreamLink
from ._reading import Reader
from ._rpc import CallTable, Handler
from ._splice import can_splice
from ._stats import ConnectionStatistics
from ._stream import StreamTable, TunnelStream
from ._util import BrokenConnection, Health
from ._writer import CLOSE_TIMEOUT, Writer

__all__ = ["Handler", "TunnelConnection", "open_connection"]


class TunnelConnection:
    """RPC and migration streams over one trio stream.  Create with :func:`open_connection`."""

    def __init__(
        self,
        transport: trio.abc.Stream,
        core: Connection,
        *,
        keepalive_interval: float | None,
        keepalive_timeout: float,
        chunk_size: int,
        frame_timeout: float | None = None,
        max_control_backlog: int = 4 * 1024 * 1024,
    ) -> None:
        self._transport = transport
        self._core = core
        sock = raw_socket(transport)
        if sock is not None:
            tune_socket(sock)
        self._health = Health()
        self._writer = Writer(core, BufferWriter(transport), self._health, chunk_size)
        self._streams = StreamTable(self._health)
        self._sinks = SinkRegistry()
        self._link = StreamLink(
            core, self._health, self._writer, forget=self._streams.forget, can_splice=sock is not None and can_splice()
        )
        self._rpc = CallTable(core, self._health, self._writer.kick)
        self._keepalive = Keepalive(
            core,
            self._health,
            self._writer.kick,
            self._fail,
            interval=keepalive_interval,
            timeout=keepalive_timeout,
            frame_timeout=frame_timeout,
        )
        self._reader = Reader(
            transport,
            sock,
            core,
            self._health,
            self._writer,
            sinks=self._sinks,
            streams=self._streams,
            rpc=self._rpc,
            keepalive=self._keepalive,
            acknowledge=self._link.acknowledge,
            opened=self._opened,
            fail=self._fail,
            max_control_backlog=max_control_backlog,
        )
        #: A background task failed with a bug (not a connection failure).
        self._internal_error: BaseException | None = None
        self._closed = trio.Event()
        self._nursery: trio.Nursery | None = None

    # ------------------------------------------------------------------
    # Public API

    @property
    def client(self) -> bool:
        return self._core.client

    @property
    def peer_settings(self) -> Settings:
        assert self._core.peer_settings is not None
        return self._core.peer_settings

    @property
    def compression(self) -> bool:
        """Whether both sides set the ZSTD feature, so streams may send compressed pages."""
        return self._link.compression

    @property
    def is_closed(self) -> bool:
        return not self._health.alive

    @property
    def chunk_size(self) -> int:
        """Largest DATA frame payload this side writes."""
        return self._writer.chunk_size

    def register(self, program: int, procedure: int, handler: Handler, *, version: int = 1) -> None:
        """Serve calls to (*program*, *version*, *procedure*) with ``await handler(body) -> reply body``.

        A handler that raises :class:`tunnel.RPCError` sends its code and
        message back; any other exception becomes ``APPLICATION_ERROR``.
        Calls to a version with no handler are answered ``UNKNOWN_PROCEDURE``
        with the versions that are served.
        """
        self._rpc.register(program, procedure, handler, version)

    async def call(self, program: int, procedure: int, body: Buffer = b"", *, version: int = 1) -> bytes:
        """Call a procedure on the peer and return its reply body.

        Raises :class:`tunnel.RPCError` with the peer's code and message, or
        :class:`tunnel.ConnectionLost`.  Cancelling leaves the connection usable.
        """
        return await self._rpc.call(program, procedure, body, version)

    async def open_stream(
        self,
        *,
        kind: int = StreamKind.BYTES,
        digest: int = DigestAlgorithm.CRC32,
        migration_id: bytes = b"\0" * 16,
        label: str = "",
        bandwidth: int = 0,
        compress: bool = False,
    ) -> TunnelStream:
        """Open a stream; the peer receives it from :meth:`accept_stream`.

        With *compress*, page batches sent on it go zstd-compressed when that
        pays, if both sides negotiated ZSTD (:attr:`compression`); otherwise
        the flag changes nothing.  The peer reads ordinary ``PagesRecord``s.
        """
        self._health.check()
        stream_id = self._core.open_stream(kind=kind, digest=digest, migration_id=migration_id, label=label)
        stream = TunnelStream(
            self._link,
            self._sinks,
            stream_id,
            kind=kind,
            digest=digest,
            migration_id=migration_id,
            label=label,
            bandwidth=bandwidth,
            compress=compress,
        )
        self._streams.add(stream)
        self._writer.kick()
        await trio.lowlevel.checkpoint()
        return stream

    async def accept_stream(self) -> TunnelStream:
        """The next stream the peer opened (its kind, label and migration id are attributes)."""
        return await self._streams.accept()

    async def ping(self) -> float:
        """Round-trip time of one PING, in seconds."""
        return await self._keepalive.ping()

    def statistics(self) -> ConnectionStatistics:
        return ConnectionStatistics(
            bytes_sent=self._writer.bytes_written,
            bytes_received=self._reader.bytes_received,
            frames_sent=self._writer.frames_sent,
            connection_credit=self._core.connection_credit,
            connection_window=self._core.connection_window,
            buffered=self._core.buffered_received,
            calls_outstanding=self._rpc.outstanding,
            calls_served=self._rpc.served,
            streams=self._streams.statistics(),
            idle_s=trio.current_time() - self._reader.last_rx,
        )

    async def aclose(self) -> None:
        """Orderly shutdown: GOODBYE, flush, close the transport, stop the tasks."""
        if self._health.alive:
            self._core.close(ErrorCode.NO_ERROR, "closing")
            self._fail(BrokenConnection("the connection was closed locally"))
        with trio.CancelScope(shield=True):
            with trio.move_on_after(CLOSE_TIMEOUT + 1):
                await self._closed.wait()
            if not self._closed.is_set():  # pragma: no cover - writer stuck past its own timeout
                await trio.aclose_forcefully(self._transport)
                if self._nursery is not None:
                    self._nursery.cancel_scope.cancel()

    # ------------------------------------------------------------------
    # Wiring

    def _opened(self, event: StreamOpened) -> None:
        """The peer opened a stream: it waits for accept_stream."""
        stream = TunnelStream(
            self._link,
            self._sinks,
            event.stream_id,
            kind=event.kind,
            digest=event.digest,
            migration_id=event.migration_id,
            label=event.label,
        )
        self._streams.add_incoming(stream)

    def _fail(self, error: BaseException) -> None:
        """The connection failed (or is closing): every part learns it once, with *error*."""
        if not self._health.alive:
            return
        self._health.error = error
        self._streams.fail_all(error)
        self._rpc.fail(error)
        self._keepalive.fail()
        self._writer.wake_all()
        self._reader.handshake.set()
        self._reader.released.set()

    async def _run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            self._rpc.nursery = nursery
            nursery.start_soon(self._guard, self._reader.run)
            nursery.start_soon(self._guard, self._write)
            if self._keepalive.needed:
                nursery.start_soon(self._guard, self._watch)
            task_status.started()

    async def _guard(self, task: Callable[[], Awaitable[None]]) -> None:
        try:
            await task()
        except Exception as exc:  # noqa: BLE001 - a bug: surface it, never as a bare group
            self._internal_error = exc
            self._fail(BrokenConnection(f"internal error in the tunnel: {exc!r}"))

    async def _write(self) -> None:
        """The writer task; the connection owns the transport and closes it when the writer is done."""
        try:
            await self._writer.run()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            self._fail(BrokenConnection(f"the connection broke: {exc or type(exc).__name__}"))
        finally:
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(self._transport)
            self._closed.set()
            if self._nursery is not None:
                self._nursery.cancel_scope.cancel()

    async def _watch(self) -> None:
        # Not before the handshake: open_connection bounds that wait itself.
        await self._reader.handshake.wait()
        await self._keepalive.watch(self._reader)

    async def _handshake(self, timeout: float) -> None:
        """Wait for the peer's handshake (at most *timeout* s); then the connection is ready for its body."""
        with trio.move_on_after(timeout):
            await self._reader.handshake.wait()
        if not self._reader.handshake.is_set():
            self._core.close(ErrorCode.KEEPALIVE_TIMEOUT, f"no handshake within {timeout} s")
            self._fail(BrokenConnection(f"no handshake from the peer within {timeout} s"))
        self._health.check()
        self._writer.chunk_size = min(self._writer.chunk_size, self._core.max_send_frame)

    def _release(self) -> None:
        """The body of open_connection starts now: the reader may dispatch what came behind the handshake."""
        self._reader.released.set()


def _with_compression(settings: Settings | None, compression: bool | None) -> Settings:
    settings = settings if settings is not None else Settings()
    if compression is None:
        compression = zstd_available()
    elif compression:
        import zstandard  # noqa: F401  # fail here, not at the first compressed frame
    features = settings.features | Feature.ZSTD if compression else settings.features & ~Feature.ZSTD
    return settings if features == settings.features else dataclasses.replace(settings, features=int(features))


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    found: list[BaseException] = []
    for exc in group.exceptions:
        found.extend(_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return found


@asynccontextmanager
async def open_connection(
    transport: trio.abc.Stream,
    *,
    client: bool,
    settings: Settings | None = None,
    keepalive_interval: float | None = 5.0,
    keepalive_timeout: float = 20.0,
    chunk_size: int = 1024 * 1024,
    handlers: Mapping[tuple[int, int], Handler] | None = None,
    compression: bool | None = None,
    handshake_timeout: float = 10.0,
    frame_timeout: float | None = 30.0,
    max_control_backlog: int = 4 * 1024 * 1024,
) -> AsyncIterator[TunnelConnection]:
    """Run a tunnel connection over *transport* for the body of the ``async with``.

    *client* is True on the side that opened the transport.  The handshake
    completes before the body starts.  *handlers* (``{(program, procedure):
    handler}``) are registered before the first byte is read, so a call that
    arrives right behind the peer's handshake finds them.  On exit the connection says goodbye,
    flushes and closes the transport; background tasks never outlive it.
    Failures appear as :class:`tunnel.ConnectionLost` (also a
    ``trio.BrokenResourceError``) from the operations they affect.

    *compression* decides whether this side advertises the ZSTD feature
    (accepts zstd-compressed pages, and may send them on streams opened with
    ``compress=True``): None advertises it exactly when ``zstandard`` is
    importable, False never, True always (ImportError without ``zstandard``).
    It overrides the ZSTD bit of *settings*.  Compression is in effect only
    if the peer advertises it too (:attr:`TunnelConnection.compression`).

    Limits on what the peer can cost (the defaults suit a daemon facing the
    network, and a bulk link of at least ~35 KB/s):

    * *handshake_timeout* (10 s): the peer's preface and SETTINGS must
      arrive within it, else :class:`tunnel.ConnectionLost`.
    * *frame_timeout* (30 s; None for no limit): a frame that has begun to
      arrive must be complete within it, else the connection is closed
      with ``KEEPALIVE_TIMEOUT``, as for a silent peer.  A stalled frame is
      noticed within 1.25 times the timeout.
    * *max_control_backlog* (4 MiB): while more bytes of answers to the peer
      than this wait to be written (PONG, WINDOW_UPDATE, STREAM_ABORT, and
      RPC answers once more than ``settings.max_concurrent_calls`` of them
      wait), nothing more is read, so a peer that sends without reading is
      throttled by its own socket; it is then silent and meets the keepalive
      timeout.  A peer that keeps to the call limit is owed its answers
      however large, and the application's own calls and stream data (flow
      controlled) never count, so peers that call each other cannot
      deadlock on it.  The overshoot is at most the answers to one 16 KiB read.
    """
    settings = _with_compression(settings, compression)
    core = Connection(client=client, settings=settings)
    conn = TunnelConnection(
        transport,
        core,
        keepalive_interval=keepalive_interval,
        keepalive_timeout=keepalive_timeout,
        chunk_size=min(chunk_size, (settings or Settings()).max_frame_size),
        frame_timeout=frame_timeout,
        max_control_backlog=max_control_backlog,
    )
    for (program, procedure), handler in (handlers or {}).items():
        conn.register(program, procedure, handler)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(conn._run)
            try:
                await conn._handshake(handshake_timeout)
                # The reader goes on once the body runs (and, if it registers
                # handlers at once, after it did): set here, right before the
                # yield, it cannot run earlier, whatever order trio picks.
                conn._release()
                yield conn
            finally:
                await conn.aclose()
    except BaseExceptionGroup as group:
        # The body's own error (or a cancellation from outside) comes out as
        # itself; when both happen at once, the error wins, since it says why.
        _cancelled, rest = group.split(trio.Cancelled)
        leaves = _leaves(rest) if rest is not None else _leaves(group)
        if len(leaves) == 1:
            raise leaves[0] from None
        raise  # pragma: no cover - background tasks never raise
    if conn._internal_error is not None:
        raise BrokenConnection("internal error in the tunnel") from conn._internal_error

