"""Reaching a daemon: mutual TLS contexts and the outgoing connection.

TLS is mutual: each side presents a certificate signed by the operator's CA.
TLS connections are :class:`tunnel.transport.TLSStream`s, built for the
migration data they carry.  Plain TCP exists only for operators who ask for it.
"""

from __future__ import annotations

import os
import ssl
from dataclasses import dataclass

import trio

from ..transport import TLSStream, tune_context
from ._program import DaemonError
from ._uri import URI

__all__ = ["HANDSHAKE_TIMEOUT", "TLSFiles", "connect"]

#: How long a TLS handshake may take, either side.
HANDSHAKE_TIMEOUT = 10.0


@dataclass(frozen=True, slots=True, kw_only=True)
class TLSFiles:
    cert: str
    key: str
    ca: str

    def server_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=self.ca)
        ctx.load_cert_chain(self.cert, self.key)
        ctx.verify_mode = ssl.CERT_REQUIRED
        return tune_context(ctx)

    def client_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=self.ca)
        ctx.load_cert_chain(self.cert, self.key)
        return tune_context(ctx)

    def write_qemu_dir(self, path: str, endpoint: str, *, owner: int | None = None) -> str:
        """Copy these files into *path* in QEMU's ``tls-creds-x509`` layout for *endpoint* (server or client).

        QEMU runs sandboxed and maybe as another user, so it gets its own
        copies (mode 0600, owned by *owner* when given) rather than the daemon's paths.
        """
        os.makedirs(path, mode=0o700, exist_ok=True)
        for source, name in ((self.ca, "ca-cert.pem"), (self.cert, f"{endpoint}-cert.pem"), (self.key, f"{endpoint}-key.pem")):
            target = os.path.join(path, name)
            with open(source, "rb") as f:
                data = f.read()
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
            try:
                os.write(fd, data)
                if owner is not None:
                    os.fchown(fd, owner, -1)
            finally:
                os.close(fd)
        if owner is not None:
            os.chown(path, owner, -1)
        return path



async def connect(uri: URI, tls: TLSFiles | None) -> trio.abc.Stream:
    """A connected stream to the daemon at *uri* (TLS handshake done); :class:`DaemonError` if unreachable."""
    try:
        if uri.scheme == "unix":
            return await trio.open_unix_socket(uri.path)
        stream = await trio.open_tcp_stream(uri.host, uri.port)
    except OSError as exc:
        raise DaemonError(f"cannot connect to {uri}: {exc.strerror or exc}") from None
    if uri.scheme == "tcp":
        return stream
    if tls is None:
        await stream.aclose()
        raise DaemonError(f"cannot connect to {uri}: TLS needs --tls-cert, --tls-key and --tls-ca")
    ssl_stream = TLSStream(stream, tls.client_context(), server_hostname=uri.host)
    try:
        with trio.fail_after(HANDSHAKE_TIMEOUT):
            await ssl_stream.do_handshake()
    except (trio.BrokenResourceError, trio.TooSlowError, ssl.SSLError) as exc:
        await trio.aclose_forcefully(ssl_stream)
        cause = exc.__cause__ or exc
        raise DaemonError(f"TLS handshake with {uri} failed: {cause}") from None
    except BaseException:  # cancelled from outside: the socket must not wait for the garbage collector
        await trio.aclose_forcefully(ssl_stream)
        raise
    return ssl_stream
