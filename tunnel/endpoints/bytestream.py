"""A hypervisor's migration byte stream: the ``bytestream`` source and writer.

This is how a real QEMU's stream enters and leaves the tunnel: on the
source, QEMU writes into a pipe (``migrate fd:``) or a unix socket
(``migrate unix:PATH``); on the destination, QEMU reads a pipe
(``-incoming fd:``) or a unix socket it listens on.  The stream is opaque:
every byte is forwarded, including what QEMU writes after its EOF section
(the trailing JSON description), and end of stream is passed on at once in
both directions.

Both endpoints expose their descriptor through the fd capability
(:class:`FdSource` / :class:`FdDestination`), so the pump uses
``stream.send_fd`` / ``stream.receive_fd`` and, on a plain-socket tunnel
with a stream opened without a digest, the bytes are spliced by the kernel
and never enter Python.  ``records()`` and ``write()`` are there for
callers that pump by hand.  The writer's ``commit()`` is the end of
stream for QEMU: ``shutdown(SHUT_WR)`` on a socket (its reading side stays
usable), close on a pipe; ``abort()`` closes the descriptor, so QEMU sees a
truncated stream and fails the incoming migration.

A byte stream is consumed as it arrives, so "commit" cannot hide a partial
stream from QEMU: its own stream format (sections, EOF marker) is what
tells it the stream was cut short.
"""

from __future__ import annotations

import os
import socket
import stat
from collections.abc import AsyncIterator

import trio

from .. import StreamKind
from ._api import EndpointError, Progress, SourceRecord

__all__ = ["ByteStreamReader", "ByteStreamWriter"]

_CHUNK = 1024 * 1024


def _is_socket(fd: int) -> bool:
    return stat.S_ISSOCK(os.fstat(fd).st_mode)


class ByteStreamReader:
    """Source reader of the byte stream that *fd* (a pipe or socket) yields until EOF.

    *close*: close *fd* in :meth:`aclose` (the reader owns it).
    """

    stream_kind = StreamKind.BYTES

    def __init__(self, fd: int, *, close: bool = True, chunk_size: int = _CHUNK) -> None:
        self.fd = fd
        self.close = close
        self._buf = memoryview(bytearray(chunk_size))
        self._sent = 0
        self._records = 0
        self._finished = False
        self._closed = False

    @classmethod
    async def accept_unix(cls, path: str, **options: object) -> ByteStreamReader:
        """Listen on a unix socket at *path*, take one connection (QEMU's ``migrate unix:PATH``), and read it."""
        listener = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            await listener.bind(path)
            listener.listen(1)
            conn, _ = await listener.accept()
        finally:
            listener.close()
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        return cls(conn.detach(), **options)  # type: ignore[arg-type]

    def source_fd(self) -> int:
        return self.fd

    def fd_finished(self, total: int) -> None:
        self._sent += total
        self._finished = True

    def records(self) -> AsyncIterator[SourceRecord]:
        return self._chunks()

    async def _chunks(self) -> AsyncIterator[SourceRecord]:
        os.set_blocking(self.fd, False)
        while True:
            try:
                size = os.readv(self.fd, [self._buf])
            except BlockingIOError:
                await trio.lowlevel.wait_readable(self.fd)
                continue
            if not size:
                break
            self._sent += size
            self._records += 1
            yield self._buf[:size]
        self._finished = True

    def progress(self) -> Progress:
        return Progress(records=self._records, bytes_sent=self._sent, finished=self._finished)

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            if self.close:
                trio.lowlevel.notify_closing(self.fd)
                os.close(self.fd)
        await trio.lowlevel.checkpoint()


class ByteStreamWriter:
    """Destination writer of a byte stream into *fd* (a pipe or socket to the hypervisor).

    At end of stream a socket is shut down for writing (and closed if
    *close*); a pipe is always closed, the only way its reader sees EOF.
    :meth:`abort` always closes *fd*, so the hypervisor sees a cut stream.
    """

    def __init__(self, fd: int, *, close: bool = True) -> None:
        self.fd = fd
        self.close = close
        self.bytes_written = 0
        self.committed = False
        self._done = False

    @classmethod
    async def connect_unix(cls, path: str, **options: object) -> ByteStreamWriter:
        """Connect to a unix socket at *path* (QEMU's ``-incoming unix:PATH``) and write to it."""
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            await sock.connect(path)
        except BaseException:
            sock.close()
            raise
        return cls(sock.detach(), **options)  # type: ignore[arg-type]

    def sink_fd(self) -> int:
        return self.fd

    def fd_finished(self, total: int) -> None:
        self.bytes_written += total

    async def write(self, record: SourceRecord) -> None:
        if self._done:
            raise EndpointError("the byte stream was already ended")
        if not isinstance(record, bytes | memoryview | bytearray):
            raise EndpointError(f"a byte stream takes opaque data, not {type(record).__name__} records")
        os.set_blocking(self.fd, False)
        view = memoryview(record)
        done = 0
        while done < len(view):
            try:
                done += os.write(self.fd, view[done:])
            except BlockingIOError:
                await trio.lowlevel.wait_writable(self.fd)
        self.bytes_written += done
        await trio.lowlevel.checkpoint()

    async def commit(self) -> None:
        """End of stream for the reader of *fd*, at once."""
        if self._done:
            raise EndpointError("the byte stream was already ended")
        self._done = True
        if _is_socket(self.fd):
            with socket.socket(fileno=os.dup(self.fd)) as sock:
                sock.shutdown(socket.SHUT_WR)
            if self.close:
                self._close()
        else:
            self._close()  # a pipe's reader sees EOF only once every write end is closed
        self.committed = True
        await trio.lowlevel.checkpoint()

    async def abort(self, reason: str) -> None:
        if not self._done:
            self._done = True
            self._close()
        await trio.lowlevel.checkpoint()

    def _close(self) -> None:
        if self.fd >= 0:
            trio.lowlevel.notify_closing(self.fd)
            os.close(self.fd)
            self.fd = -1
