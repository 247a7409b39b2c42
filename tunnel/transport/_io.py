"""Writing frame buffers to a trio stream without joining payloads.

On a plain socket (``trio.SocketStream``) header and payload buffers go to
the kernel together with one ``sendmsg`` (gather write): no copy in Python.
On other streams (TLS, in-memory) small buffers are joined so each write is
worth its cost, and large payloads are written as they are.
"""

from __future__ import annotations

import socket

import trio

from .._frames import Buffer
from ._splice import splice_some

__all__ = ["BufferWriter", "raw_socket"]

_IOV_MAX = 512
_SMALL = 64 * 1024


def raw_socket(transport: trio.abc.Stream) -> trio.socket.SocketType | None:
    """The socket under *transport*, if it is a plain socket stream."""
    if isinstance(transport, trio.SocketStream):
        return transport.socket
    return None


class BufferWriter:
    def __init__(self, transport: trio.abc.Stream) -> None:
        self._transport = transport
        self._sock = raw_socket(transport)
        #: Bytes written so far.
        self.written = 0

    async def write(self, buffers: list[Buffer]) -> None:
        if self._sock is not None:
            await self._gather(list(buffers))
        else:
            await self._coalesced(buffers)

    async def _gather(self, bufs: list[Buffer]) -> None:
        sock = self._sock
        assert sock is not None
        while bufs:
            sent = await sock.sendmsg(bufs[:_IOV_MAX])
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
        """Write *header*, then move *size* bytes from *pipe_fd* into the socket (kernel only)."""
        sock = self._sock
        assert sock is not None
        view = memoryview(header)
        while view:
            sent = await sock.send(view, socket.MSG_MORE)  # the payload follows at once
            view = view[sent:]
            self.written += sent
        fd = sock.fileno()
        while size:
            moved = splice_some(pipe_fd, fd, size)
            if moved is None:
                await trio.lowlevel.wait_writable(sock)
                continue
            if moved == 0:  # pragma: no cover - the pipe holds at least size bytes
                raise OSError("splice source ran dry")
            size -= moved
            self.written += moved
        await trio.lowlevel.checkpoint_if_cancelled()
