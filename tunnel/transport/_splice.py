"""Moving stream payload between file descriptors and the connection's socket
with ``os.splice``, so guest data never enters Python.

Theory of operation.  ``splice(2)`` moves bytes between a pipe and another
file descriptor inside the kernel.  Each spliced stream direction gets a
private pipe (:class:`KernelPipe`) used as a bounded kernel-side buffer:

* Sending: the task in ``send_fd`` splices whatever the source (QEMU's
  socket or pipe) has into the pipe.  The connection's writer then knows
  exactly how many bytes are ready, writes a DATA header for ``k <= credit``
  of them and splices those ``k`` bytes from the pipe into the socket.  The
  header states the length before the payload, which is why the bytes are
  staged in the pipe first.
* Receiving: while the core reports a DATA payload under way for a stream
  with a file sink, the reader splices it from the socket into the sink's
  pipe; the task in ``receive_fd`` splices it on into the sink and only then
  returns the credit.  Payload bytes that arrived in an ordinary read (those
  just behind a header) are queued as memory segments, in order with the
  pipe's (:class:`SinkQueue`).

Neither the reader nor the writer ever waits for a source or a sink; they
wait only for the connection's socket.  A slow sink fills its pipe, then
its window, and then its peer stops sending: other streams go on.
"""

from __future__ import annotations

import fcntl
import os
import stat
from collections import deque

from ._buffers import ReadBuffer
from ._util import Signal

__all__ = ["KernelPipe", "SinkQueue", "can_splice", "is_spliceable", "splice_some"]

PIPE_SIZE = 1024 * 1024


def can_splice() -> bool:
    return hasattr(os, "splice")


def is_spliceable(fd: int) -> bool:
    """splice(2) works between a pipe and a pipe or socket."""
    mode = os.fstat(fd).st_mode
    return stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)


def splice_some(fd_in: int, fd_out: int, size: int, *, more: bool = False) -> int | None:
    """Splice up to *size* bytes; None if it would block, 0 at end of input."""
    flags = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK | (os.SPLICE_F_MORE if more else 0)
    try:
        return os.splice(fd_in, fd_out, size, flags=flags)
    except (BlockingIOError, InterruptedError):
        return None


class KernelPipe:
    """A pipe used as a bounded buffer that lives in the kernel."""

    def __init__(self, size: int = PIPE_SIZE) -> None:
        self.read_fd, self.write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            fcntl.fcntl(self.write_fd, fcntl.F_SETPIPE_SZ, size)
        except OSError:  # pragma: no cover - capped by /proc/sys/fs/pipe-max-size
            pass
        self.capacity = fcntl.fcntl(self.write_fd, fcntl.F_GETPIPE_SZ)
        #: Bytes currently in the pipe.
        self.level = 0

    @property
    def room(self) -> int:
        return self.capacity - self.level

    def drain_to_memory(self) -> bytes:
        """Read everything left in the pipe (used when a splice user gives up)."""
        chunks = []
        while self.level:
            try:
                chunk = os.read(self.read_fd, self.level)
            except BlockingIOError:  # pragma: no cover - level says the bytes are there
                break
            if not chunk:  # pragma: no cover
                break
            self.level -= len(chunk)
            chunks.append(chunk)
        return b"".join(chunks)

    def close(self) -> None:
        for fd in (self.read_fd, self.write_fd):
            if fd >= 0:
                os.close(fd)
        self.read_fd = self.write_fd = -1


class SinkQueue:
    """Payload waiting to reach a sink fd, in order: pipe bytes and memory segments."""

    def __init__(self) -> None:
        self.pipe = KernelPipe()
        #: int = that many bytes in the pipe; tuple = a memory segment and its read buffer.
        self.segments: deque[int | tuple[memoryview | bytes, ReadBuffer | None]] = deque()
        self.signal = Signal()

    def add_pipe(self, size: int) -> None:
        self.pipe.level += size
        if self.segments and isinstance(self.segments[-1], int):
            self.segments[-1] += size
        else:
            self.segments.append(size)
        self.signal.fire()

    def add_memory(self, data: memoryview | bytes, buf: ReadBuffer | None) -> None:
        self.segments.append((data, buf))
        self.signal.fire()

    def release(self) -> list[tuple[bytes | memoryview, ReadBuffer | None]]:
        """Give up: everything still queued, in order, as memory; closes the pipe."""
        out: list[tuple[bytes | memoryview, ReadBuffer | None]] = []
        piped = self.pipe.drain_to_memory()
        offset = 0
        for seg in self.segments:
            if isinstance(seg, int):
                out.append((piped[offset : offset + seg], None))
                offset += seg
            else:
                out.append(seg)
        self.segments.clear()
        self.pipe.close()
        return out
