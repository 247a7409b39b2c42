"""Writing frame buffers to a trio stream without joining payloads.

On a plain socket (``trio.SocketStream``) header and payload buffers go to
the kernel together with one ``writev`` (gather write): no copy in Python.
A stream with ``send_all_parts`` (:class:`~._tls.TLSStream`) takes the
buffers as they are, in one call: a header is encrypted with its payload.
On other streams (in-memory, say) small buffers are joined so each write is
worth its cost, and large payloads are written as they are.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Awaitable, Callable, Sequence

import trio

from .._frames import Buffer
from ._splice import splice_some

__all__ = ["BufferWriter", "push_corked", "raw_socket", "tune_socket"]

_IOV_MAX = 512
_SMALL = 64 * 1024


def raw_socket(transport: trio.abc.Stream) -> trio.socket.SocketType | None:
    """The socket under *transport*, if it is a plain socket stream."""
    if isinstance(transport, trio.SocketStream):
        return transport.socket
    return None


#: Send and receive buffer asked for on a unix socket (the kernel caps it at
#: net.core.wmem_max / rmem_max).
UNIX_BUFFER = 4 * 1024 * 1024


def tune_socket(sock: trio.socket.SocketType) -> None:
    """Give a unix socket buffers that hold a few whole frames.

    A unix stream socket's default send buffer (net.core.wmem_default,
    about 208 KiB) is the most one write or splice can move: a 1 MiB frame
    then took five writes, five wakeups of each side and, on the receiving
    side, five splices on into the sink.  TCP sockets are left alone: the
    kernel sizes their buffers itself, and setting them would stop that.
    """
    if sock.family != socket.AF_UNIX:
        return
    for option in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        try:
            if sock.getsockopt(socket.SOL_SOCKET, option) < UNIX_BUFFER:
                sock.setsockopt(socket.SOL_SOCKET, option, UNIX_BUFFER)
        except OSError:  # pragma: no cover - not a socket we may tune
            pass


def push_corked(sock: trio.socket.SocketType) -> None:
    """Send a TCP socket's corked tail segment now.

    A splice into a socket that stops part-way (send buffer full) leaves its
    last segment corked: the kernel sent it with MSG_MORE because the pipe
    still held bytes.  Nothing pushes it until an ACK arrives, and with the
    peer's delayed ACK that took up to 200 ms per stall (the receiver had
    nothing to read, the sender waited for room).  Setting TCP_NODELAY, even
    to its current value, pushes pending segments (``tcp_push_pending_frames``).
    """
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:  # pragma: no cover - a socket being torn down
        pass


class BufferWriter:
    def __init__(self, transport: trio.abc.Stream) -> None:
        self._transport = transport
        self._sock = raw_socket(transport)
        self._tcp = self._sock is not None and self._sock.family in (socket.AF_INET, socket.AF_INET6)
        #: TLSStream's: one encryption pass and one write for a header and its payload.
        self._send_parts: Callable[[Sequence[Buffer]], Awaitable[None]] | None = getattr(transport, "send_all_parts", None)
        #: Bytes written so far.
        self.written = 0

    async def write(self, buffers: list[Buffer]) -> None:
        """Write *buffers*, in order.

        On a plain socket this waits only if the socket is full: when the
        kernel takes everything at once it returns without a checkpoint,
        so a writer that wrote only control frames goes straight back to
        waiting for work.  A caller writing data frames checkpoints itself.
        """
        if self._sock is not None:
            await self._gather(list(buffers))
        else:
            await self._coalesced(buffers)

    async def _gather(self, bufs: list[Buffer]) -> None:
        sock = self._sock
        assert sock is not None
        fd = sock.fileno()
        while bufs:
            try:
                sent = os.writev(fd, bufs[:_IOV_MAX])
            except BlockingIOError:
                await trio.lowlevel.wait_writable(sock)
                continue
            self.written += sent
            while sent:
                first = len(bufs[0])
                if sent >= first:
                    sent -= first
                    del bufs[0]
                else:
                    bufs[0] = memoryview(bufs[0])[sent:]
                    sent = 0
            while bufs and not len(bufs[0]):
                del bufs[0]

    async def _coalesced(self, buffers: list[Buffer]) -> None:
        if self._send_parts is not None:
            await self._send_parts(buffers)
            self.written += sum(memoryview(buf).nbytes for buf in buffers)
            return
        pending: list[Buffer] = []
        size = 0
        for buf in buffers:
            if len(buf) >= _SMALL:
                if pending:
                    await self._transport.send_all(b"".join(pending))
                    pending, size = [], 0
                await self._transport.send_all(buf)
            else:
                pending.append(buf)
                size += len(buf)
            self.written += len(buf)
        if pending:
            await self._transport.send_all(b"".join(pending))

    async def write_spliced(self, header: bytes, pipe_fd: int, size: int) -> None:
        """Write *header*, then move *size* bytes from *pipe_fd* into the socket (kernel only).

        Like :meth:`write`, checkpoints only if it has to wait for the socket.
        """
        sock = self._sock
        assert sock is not None
        fd = sock.fileno()
        view = memoryview(header)
        while view:
            try:
                sent = os.write(fd, view)
            except BlockingIOError:
                await trio.lowlevel.wait_writable(sock)
                continue
            view = view[sent:]
            self.written += sent
        while size:
            moved = splice_some(pipe_fd, fd, size)
            if moved is None:
                if self._tcp:
                    push_corked(sock)
                await trio.lowlevel.wait_writable(sock)
                continue
            if moved == 0:  # pragma: no cover - the pipe holds at least size bytes
                raise OSError("splice source ran dry")
            size -= moved
            self.written += moved
