"""The daemon's side of its sockets: listeners, the server TLS handshake and peer identity.

Unix sockets are created with the operator's mode (0600 unless told
otherwise, never wider at any moment) and group, and the peer's uid comes
from ``SO_PEERCRED``.
TLS is mutual: the daemon requires a client certificate signed by the
operator's CA, and the subject common name of that certificate is the
peer's identity.  Outgoing connections (to a peer daemon, as a client's)
are :func:`tunnel.control.connect`.
"""

from __future__ import annotations

import errno
import os
import socket
import ssl
import stat
import struct
from dataclasses import dataclass

import trio

from ..control import HANDSHAKE_TIMEOUT, URI, DaemonError
from ..transport import TLSStream

__all__ = ["Identity", "accept_tls", "listen", "peer_identity"]

#: Connections the kernel queues before accept (it caps this at net.core.somaxconn).
BACKLOG = 512


@dataclass(frozen=True, slots=True, kw_only=True)
class Identity:
    """Who is on the other end: ``uid:N`` for a unix peer, ``cn:NAME`` for a TLS peer, ``tcp:ADDR`` otherwise."""

    kind: str
    value: str

    def __str__(self) -> str:
        return f"{self.kind}:{self.value}"


def peer_identity(stream: trio.abc.Stream) -> Identity:
    if isinstance(stream, (TLSStream, trio.SSLStream)):
        cert = stream.getpeercert()
        for rdn in (cert or {}).get("subject", ()):
            for key, value in rdn:
                if key == "commonName":
                    return Identity(kind="cn", value=value)
        return Identity(kind="cn", value="")
    assert isinstance(stream, trio.SocketStream)
    sock = stream.socket
    if sock.family == socket.AF_UNIX:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        _pid, uid, _gid = struct.unpack("3i", creds)
        return Identity(kind="uid", value=str(uid))
    host, port = sock.getpeername()[:2]
    return Identity(kind="tcp", value=f"{host}:{port}")


def _unix_socket(path: str, *, mode: int, group: int | None) -> trio.socket.SocketType:
    """Bind a listening unix socket at *path* with *mode* (and *group*), replacing only a dead socket."""
    if os.path.lexists(path):
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            raise DaemonError(f"cannot listen on {path}: it exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except OSError as exc:
            if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT):
                raise
            os.unlink(path)  # a stale socket left by a daemon that died
        else:
            raise DaemonError(f"cannot listen on {path}: another daemon is listening there")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        # bind() creates the file with the socket inode's mode less the umask, so
        # narrowing the inode first means the file is never wider than *mode*,
        # without touching the process-wide umask while other threads run.
        os.fchmod(sock.fileno(), mode & 0o600)
        sock.bind(path)
        if group is not None:
            os.chown(path, -1, group)
        os.chmod(path, mode)
    except BaseException:
        sock.close()
        raise
    sock.listen(BACKLOG)
    return trio.socket.from_stdlib_socket(sock)


async def listen(uri: URI, *, mode: int = 0o600, group: int | None = None) -> list[trio.SocketListener]:
    """Listeners for *uri* (TLS is layered per connection by the daemon); *mode* and *group* are for unix sockets."""
    if uri.scheme == "unix":
        try:
            return [trio.SocketListener(_unix_socket(uri.path, mode=mode, group=group))]
        except OSError as exc:
            raise DaemonError(f"cannot listen on {uri}: {exc.strerror or exc}") from None
    try:
        return await trio.open_tcp_listeners(uri.port, host=uri.host, backlog=BACKLOG)
    except OSError as exc:
        raise DaemonError(f"cannot listen on {uri}: {exc.strerror or exc}") from None


async def accept_tls(stream: trio.SocketStream, context: ssl.SSLContext, *, failure: list[str] | None = None) -> TLSStream | None:
    """Server side TLS handshake; None (connection dropped) if the peer fails it, the reason appended to *failure*."""
    ssl_stream = TLSStream(stream, context, server_side=True)
    try:
        with trio.fail_after(HANDSHAKE_TIMEOUT):
            await ssl_stream.do_handshake()
    except (trio.BrokenResourceError, trio.TooSlowError, ssl.SSLError) as exc:
        if failure is not None:
            failure.append(_handshake_failure(exc))
        await trio.aclose_forcefully(ssl_stream)
        return None
    return ssl_stream


def _handshake_failure(exc: BaseException) -> str:
    """Why a TLS handshake failed, in OpenSSL's words where it gave any."""
    if isinstance(exc, trio.TooSlowError):
        return f"no handshake within {HANDSHAKE_TIMEOUT:.0f} s"
    cause = exc.__cause__ if isinstance(exc, trio.BrokenResourceError) and exc.__cause__ is not None else exc
    if isinstance(cause, ssl.SSLError):
        if cause.reason == "UNEXPECTED_EOF_WHILE_READING":
            return "the peer closed the connection during the handshake"
        verify = getattr(cause, "verify_message", None)
        reason = (cause.reason or "").replace("_", " ").lower()  # TLSV1_ALERT_UNKNOWN_CA: "tlsv1 alert unknown ca"
        return f"{reason}: {verify}" if verify else reason or str(cause)
    return f"the connection broke ({cause})" if str(cause) else "the connection broke"
