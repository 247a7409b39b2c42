"""QEMU's migration channels as unix sockets: what post-copy with ``postcopy-preempt`` needs.

With ``postcopy-preempt`` the source QEMU sends the pages the destination
asks for on a second connection, so they never queue behind the background
copy.  QEMU opens that connection itself, to the address of the main one,
so ``fd:`` (one channel, handed over) cannot carry it; the daemons use
``unix:`` sockets in the guest's directory instead and carry each
connection on a stream of its own (labels :data:`MAIN_LABEL` and
:data:`PREEMPT_LABEL`, same migration id).

* Source: the daemon listens (:class:`QemuListener`) and QEMU connects to
  it (``migrate unix:PATH``): the main channel at once, the preempt channel
  at the switch to post-copy and again after each resume, always after the
  main one.  Only the guest's QEMU may connect: the peer's ``SO_PEERCRED``
  pid must be QEMU's; any other connection is closed unread.
  QEMU's own socket sends with the kernel's default buffer (about 208 KiB),
  a tenth of what the ``fd:`` socketpair queues, so the daemon woke ten
  times as often per byte and post-copy took longer.  Where the kernel lets
  it (``pidfd_getfd``, Linux 5.6: the daemon may ptrace QEMU, as root does),
  :func:`qemu_end` takes a duplicate of QEMU's end, so the daemon sizes its
  buffer as a socketpair's and shrinks it at the switch, as for ``fd:``.
  ``bench/postcopy.py --size 256`` (6 rounds each; native 0.18-0.20 s):
  QEMU's default buffer took 0.29 s median from the switch (0.62 ms per
  page request), 4 MiB shrunk to 1 MiB 0.235 s (1.5 ms per request, the
  QEMUs busier on 2 cores), shrunk to 256 KiB 0.259 s (0.9 ms, but twice
  as many requests, as the guest waited longer for the rest).
* Destination: QEMU listens (``migrate-incoming``/``migrate-recover``
  ``unix:PATH``) and the daemon connects (:func:`connect_qemu`).  QEMU takes
  the first connection for the main channel, so the daemon connects it first,
  as soon as QEMU listens, and the preempt channel when its stream arrives.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import socket
import struct

import trio

from ..control import DaemonError
from ._migration import MiB

__all__ = ["MAIN_LABEL", "PREEMPT_LABEL", "QemuListener", "connect_qemu", "qemu_end"]

#: The label of the stream that carries QEMU's main migration channel (and its return path).
MAIN_LABEL = "qemu"
#: The label of the stream that carries post-copy's preempt channel (requested pages).
PREEMPT_LABEL = "qemu-postcopy"
#: Socket buffers of the daemon's ends, as the socketpairs of ``fd:`` migrations (see ``socketpair``).
BUFFER = 4 * MiB
_PEERCRED = struct.Struct("3i")  # pid, uid, gid
#: pidfd_getfd(2): the same number on every architecture but alpha (Linux >= 5.6).
_SYS_PIDFD_GETFD = 438


def _buffers(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, BUFFER)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, BUFFER)


def _unlink(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


class QemuListener:
    """A unix socket the source QEMU connects to (``migrate unix:PATH``); accepts QEMU's connections only."""

    def __init__(self, path: str, *, pid: int, owner: int | None = None) -> None:
        self.path = path
        self.pid = pid
        _unlink(path)  # a leftover of an earlier attempt
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(path)
            os.chmod(path, 0o600)
            if owner is not None:  # QEMU runs as --qemu-user
                os.chown(path, owner, -1)
            sock.listen(2)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            _unlink(path)
            raise
        self._sock: socket.socket | None = sock
        #: Connections refused because they did not come from QEMU.
        self.refused = 0

    @property
    def uri(self) -> str:
        return f"unix:{self.path}"

    async def accept(self) -> socket.socket:
        """The next connection from QEMU (blocking mode, buffers as a socketpair's); others are closed unread."""
        while True:
            sock = self._sock
            if sock is None:
                raise trio.ClosedResourceError("the listener for QEMU's channels was closed")
            await trio.lowlevel.wait_readable(sock)
            try:
                conn, _ = sock.accept()
            except BlockingIOError:
                continue
            pid = _PEERCRED.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))[0]
            if pid != self.pid:
                self.refused += 1
                conn.close()
                continue
            conn.setblocking(True)
            _buffers(conn)
            return conn

    def close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            trio.lowlevel.notify_closing(sock)
            sock.close()
            _unlink(self.path)


def connect_qemu(path: str) -> socket.socket:
    """A connection to the unix socket a destination QEMU listens on (``unix:PATH``), buffered as a socketpair's end."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        _buffers(sock)
        sock.settimeout(5.0)  # a unix connect waits only while QEMU's backlog is full
        sock.connect(path)
        sock.settimeout(None)
    except OSError as exc:
        sock.close()
        raise DaemonError(f"cannot connect to the incoming QEMU's migration socket: {exc.strerror or exc}") from None
    return sock


def qemu_end(pid: int, path: str) -> socket.socket | None:
    """A duplicate of process *pid*'s socket connected to *path* (QEMU's end of its channel), or None.

    None where the kernel does not allow it (no ``pidfd_getfd``, or no
    right to ptrace *pid*) or no such socket is found: the caller goes on
    without it.  Call it while QEMU has one connection to *path*.
    """
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        return None
    syscall = ctypes.CDLL(None, use_errno=True).syscall
    try:
        for name in os.listdir(f"/proc/{pid}/fd"):
            try:
                if not os.readlink(f"/proc/{pid}/fd/{name}").startswith("socket:"):
                    continue
            except OSError:  # closed meanwhile
                continue
            fd = syscall(_SYS_PIDFD_GETFD, pidfd, int(name), 0)
            if fd < 0:
                if ctypes.get_errno() == 9:  # EBADF: closed meanwhile
                    continue
                return None  # EPERM, ENOSYS: not allowed here
            sock = socket.socket(fileno=fd)
            try:
                if sock.family == socket.AF_UNIX and sock.getpeername() == path:
                    return sock
            except OSError:
                pass
            sock.close()
    except OSError:
        return None
    finally:
        os.close(pidfd)
    return None
