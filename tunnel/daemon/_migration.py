"""Migration between two daemons, modelled on libvirt's v3 sequence.

The source's job lives in :mod:`._source`, the destination's side in
:mod:`._incoming`, and what a restarted daemon does about migrations it
left half-done in :mod:`._recovery`; this module holds what they share.

Theory of operation.  The client asks the *source* daemon to migrate a guest
(PEER2PEER: the source drives everything).  The source daemon

1. **begin**: checks the guest is running or paused and takes its definition
   (renamed if the client gave ``--dname``) and run state as the cookie;
2. connects to the destination daemon with its *own* identity and calls
   **prepare**: the destination authorizes that identity, starts QEMU with
   the same definition and ``-incoming defer``, and either (TUNNELLED) waits
   for the stream the source will open on this connection with the
   migration's id, or (native) opens a unix or TCP endpoint for QEMU;
3. **perform**: points its QEMU's migration at a socketpair whose other end
   the daemon pumps into the stream (TUNNELLED), or at the destination's
   endpoint (native), and waits for QEMU to report completion;
4. calls **finish** on the destination, which waits until its QEMU has
   loaded everything, resumes it if the source guest was running, keeps its
   definition and reports the state;
5. **confirm**: on success the source stops its QEMU (the guest now lives on
   the destination); on any failure it tells the destination to discard its
   QEMU and resumes the source guest as it was.

Each QEMU is connected to the tunnel through one end of a socketpair (a
two-way socket, not a pipe), and the daemon pumps both directions: QEMU's
migration stream forward and its return path back.  On a plain-socket
connection those bytes are spliced by the kernel and never enter Python.
"""

from __future__ import annotations

import socket

import trio

from .. import TunnelError
from ..transport import TunnelStream

__all__ = [
    "CLEANUP_TIMEOUT",
    "FINISH_TIMEOUT",
    "POLL_INTERVAL",
    "POSTCOPY_STREAM_WINDOW",
    "RETURN_PATH",
    "UNLIMITED_BANDWIDTH",
    "domain_state",
    "postcopy_buffers",
    "pump_socket",
    "socketpair",
]

MiB = 1024 * 1024
#: What "no limit" means to QEMU, whose own default caps migration at 128 MiB/s.
UNLIMITED_BANDWIDTH = 1 << 40
#: QEMU's return path (destination to source on the same socket): the
#: tunnel's streams are two-way, so it flows back through the tunnel.
RETURN_PATH = {"return-path": True}
#: How often QEMU's migration state is polled: it bounds how late completion is noticed.
POLL_INTERVAL = 0.005
#: How long the destination may take to load what the source finished sending.
FINISH_TIMEOUT = 120.0
#: Bound on each clean-up step, so an unresponsive peer cannot hang a failure.
CLEANUP_TIMEOUT = 5.0
#: SO_SNDBUF of a QEMU socketpair's sending end during post-copy (the kernel doubles it).
POSTCOPY_SOCKET_BUFFER = 1024 * 1024
#: The main stream's window on the destination once post-copy runs with the preempt channel (see postcopy_buffers).
POSTCOPY_STREAM_WINDOW = 1024 * 1024


def socketpair() -> tuple[socket.socket, socket.socket]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    for s in (a, b):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 * MiB)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * MiB)
    return a, b


def postcopy_buffers(sock: socket.socket) -> None:
    """Shrink what the sending end *sock* of a QEMU socketpair may queue, once post-copy started.

    The pages the destination asks for are sent after every byte already
    queued between the two QEMUs, and its vCPU waits meanwhile.  A unix
    stream socket's queue is bounded by the sender's SO_SNDBUF alone: 4 MiB
    asked (8 MiB granted) per socketpair suits pre-copy's bulk, not
    post-copy's requests.  Bytes already queued stay; nothing is lost.

    How far to shrink trades the guest's waits against the time post-copy
    takes.  ``bench/postcopy.py --size 1024`` (2 runs each, tunnelled
    against native 0.63-0.83 s and 0-431 ms of blocktime): 128 KiB asked
    took 1.12-1.28 s with 10-239 ms of blocktime; 1 MiB asked 0.90-0.93 s
    with 11-69 ms; no shrinking 0.57-0.84 s with 0-511 ms (7.6 ms per page
    request).  1 MiB it is.

    The tunnel stream's own buffering (4 MiB window, 1 MiB read ahead) is
    left as it is.  Shrinking it too (``TunnelStream.set_buffering``) was
    measured (``bench/postcopy.py``, 256 MiB, 5 rounds each, the socket
    pairs then shrunk to 128 KiB): at 256 KiB a
    page request waited 0.8 ms instead of 3.5 ms, but the guest, running
    more, asked for more pages, its total blocktime stayed the same (about
    190 ms), and post-copy took 27% longer; at 64 KiB it took 3.4 times as
    long.  Total blocktime follows the rate at which the rest arrives.
    """
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, POSTCOPY_SOCKET_BUFFER)
    except OSError:  # closed meanwhile: nothing left to shrink
        pass


async def pump_socket(stream: TunnelStream, sock: socket.socket) -> tuple[int, int]:
    """Move bytes both ways between *sock* (QEMU's end is the other) and *stream*.

    Forward: everything QEMU writes, up to its EOF, then EOF on the stream.
    Back: everything the peer sends, then ``shutdown(SHUT_WR)`` so QEMU sees
    EOF at once.  Returns (bytes sent, bytes received).  The first failure of
    either direction stops both and is raised as itself (never as a group).
    """
    fd = sock.fileno()
    counts = [0, 0]
    failures: list[BaseException] = []

    async def forward(scope: trio.CancelScope) -> None:
        try:
            counts[0] = await stream.send_fd(fd)
            await stream.send_eof()
        except (TunnelError, OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            failures.append(exc)
            scope.cancel()

    async def back(scope: trio.CancelScope) -> None:
        try:
            counts[1] = await stream.receive_fd(fd)
        except (TunnelError, OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            failures.append(exc)
            scope.cancel()
            return
        try:
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # QEMU already closed its end

    async with trio.open_nursery() as nursery:
        nursery.start_soon(forward, nursery.cancel_scope)
        nursery.start_soon(back, nursery.cancel_scope)
    if failures:
        raise failures[0]
    return counts[0], counts[1]


def domain_state(qemu_state: str) -> str:
    """What an operator calls QEMU's run state: running, paused (however it got there) or shut off."""
    if qemu_state == "running":
        return "running"
    return "shut off" if qemu_state == "shutdown" else "paused"
