"""The plug-in interfaces: where migration data comes from and where it goes.

A *source reader* produces the records of one migration stream; a
*destination writer* applies them on the other side.  Both are plain
objects that satisfy the :class:`typing.Protocol`\\ s below, so a hypervisor
driver can supply its own without subclassing anything in ``tunnel``
(register it under the ``tunnel.sources`` / ``tunnel.writers`` entry-point
groups, see :mod:`tunnel.endpoints._registry`).  Moving records between a
reader, a tunnel stream and a writer, with back-pressure, is the job of
:mod:`tunnel.endpoints._pump`; a plug-in never touches the stream.

The records are the core's own dataclasses (:mod:`tunnel._records`, re-exported
by :mod:`tunnel.transport`), the same objects the stream sends and receives:

* ``bytes`` / ``memoryview``: opaque chunks of a byte stream (``DATA``);
* :class:`~tunnel.transport.PagesRecord`: guest pages of one size, each with
  its byte address in a region;
* :class:`~tunnel.transport.ZeroPagesRecord`: runs of all-zero pages, no data;
* :class:`~tunnel.transport.DeviceStateRecord`: one named device-state blob;
* :class:`~tunnel.transport.IterationRecord`: the end of one pre-copy pass
  (``final=True`` after the last one).

Buffer lifetime, both ways: a record's buffer is only valid until the next
record is asked for (a reader may reuse one read buffer; a writer receives
views of the transport's pooled receive buffers).  A writer that keeps data
must copy it; a reader must not touch a yielded buffer until it is resumed.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from .. import TunnelError
from ..transport import Record

__all__ = [
    "DestinationWriter",
    "EndpointError",
    "FdDestination",
    "FdSource",
    "NotConverged",
    "PausableGuest",
    "Progress",
    "SourceReader",
    "SourceRecord",
    "UnknownEndpoint",
]

#: What a reader yields and a writer is given.
#: What a source yields and a destination writes: the stream's own record type.
SourceRecord = Record


class EndpointError(TunnelError):
    """A reader or writer cannot go on (bad input, unexpected record, incomplete stream)."""


class UnknownEndpoint(EndpointError, LookupError):
    """No reader or writer is registered under the requested name."""


class NotConverged(EndpointError):
    """Pre-copy gave up: what stays dirty does not fit the downtime budget."""

    def __init__(self, message: str, progress: Progress) -> None:
        super().__init__(message)
        self.progress = progress


@dataclass(frozen=True, slots=True, kw_only=True)
class Progress:
    """A snapshot of a reader's progress (what ``SourceReader.progress()`` returns).

    Fields a reader cannot know are ``None`` (a byte stream has no total).
    """

    #: Records yielded so far, and their payload bytes (page data, chunks, blobs).
    records: int = 0
    bytes_sent: int = 0
    #: Size of the whole source if known (file size, image size).
    total_bytes: int | None = None
    #: Pre-copy pass under way or last finished (0 = the first, full pass).
    iteration: int = 0
    #: Data pages sent (all passes) and zero pages announced as runs.
    pages_sent: int = 0
    zero_pages: int = 0
    #: Bytes still to send: the rest of this pass plus what is dirty now.
    remaining_bytes: int | None = None
    #: Send rate measured over the passes so far, bytes per second.
    rate_bytes_per_s: float | None = None
    #: How fast the guest dirties memory, measured between passes.
    dirty_pages_per_s: float = 0.0
    dirty_bytes_per_s: float = 0.0
    #: What the final (stop-and-copy) pass would take at the measured rate.
    expected_downtime_s: float | None = None
    #: None while pre-copy runs; True or False once it decided.
    converged: bool | None = None
    #: The reader has yielded its last record.
    finished: bool = False


@runtime_checkable
class SourceReader(Protocol):
    """Where migration data comes from.

    ``records()`` is called once and yields the stream's records in order; it
    runs inside the pump's task, so every ``await`` in it is a point where
    the stream pushes back (a slow link or writer suspends it).  Raising
    from it aborts the migration: the stream is aborted with the exception
    as reason and the destination writer discards what it received.
    ``aclose()`` releases the reader's resources; it is called exactly once,
    after ``records()`` finished or failed, and must not raise for a reader
    that was never iterated.
    """

    #: A :class:`tunnel.StreamKind`, sent to the peer when the stream opens.
    @property
    def stream_kind(self) -> int: ...

    def records(self) -> AsyncIterator[SourceRecord]: ...

    def progress(self) -> Progress: ...

    async def aclose(self) -> None: ...


@runtime_checkable
class FdSource(Protocol):
    """Optional reader capability: the data is whatever a file descriptor yields until EOF.

    When ``source_fd()`` returns a descriptor, the pump calls
    ``stream.send_fd(fd)`` instead of iterating ``records()``, so a pipe or
    socket from the hypervisor is spliced by the kernel on plain-socket
    connections (no copy through Python).  Return None to use ``records()``.
    ``fd_finished(total)`` is called once the descriptor reached EOF, with
    the number of bytes sent, so ``progress()`` can report them.
    """

    def source_fd(self) -> int | None: ...

    def fd_finished(self, total: int) -> None: ...


@runtime_checkable
class DestinationWriter(Protocol):
    """Where migration data goes.

    ``write()`` is awaited for each record in order; the next record is not
    taken from the stream until it returns, so a slow writer slows the
    source (the stream's window fills and the sender waits for credit).
    ``commit()`` is called once, only after the stream ended normally, which
    means the transport verified the end-of-stream byte count and digest;
    only then may the destination become visible as complete.  ``abort()``
    is called instead if anything failed (including ``write`` or ``commit``
    raising); it must discard partial results, may be called after a failed
    ``commit()``, and must be idempotent.  Raising from ``write`` or
    ``commit`` aborts the stream: the source sees the exception text as the
    abort reason.
    """

    async def write(self, record: SourceRecord) -> None: ...

    async def commit(self) -> None: ...

    async def abort(self, reason: str) -> None: ...


@runtime_checkable
class FdDestination(Protocol):
    """Optional writer capability: the stream's bytes go into a file descriptor.

    When ``sink_fd()`` returns a descriptor, the pump calls
    ``stream.receive_fd(fd)`` (spliced by the kernel where possible) and then
    ``commit()``; ``write()`` is not used.  Return None to get records.
    ``fd_finished(total)`` is called at end of stream, before ``commit()``,
    with the number of bytes written into the descriptor.
    """

    def sink_fd(self) -> int | None: ...

    def fd_finished(self, total: int) -> None: ...


@runtime_checkable
class PausableGuest(Protocol):
    """What a pre-copy reader needs from the guest: stopping it for the final pass.

    A hypervisor driver pauses the vCPUs (QMP ``stop``);
    :class:`tunnel.endpoints.SimulatedGuest` stops dirtying pages.  Once
    ``pause()`` returns, no page may change until the migration is over.
    """

    async def pause(self) -> None: ...
