"""Daemon addresses: ``unix:///abs/path.sock``, ``tls://host:port``, ``tcp://host:port``.

One parser for the daemon's ``--listen``, the CLI's ``--connect`` and the
destination URI of a migration, so every place rejects the same bad input
with the same message.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from urllib.parse import urlsplit

__all__ = ["URI", "URIError", "parse_uri"]

SCHEMES = ("unix", "tls", "tcp")


class URIError(ValueError):
    """A daemon URI that cannot be used."""


@dataclass(frozen=True, slots=True, kw_only=True)
class URI:
    scheme: str
    path: str = ""
    host: str = ""
    port: int = 0

    def __str__(self) -> str:
        if self.scheme == "unix":
            return f"unix://{self.path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"


def parse_uri(text: str) -> URI:
    """Parse *text*; raise :class:`URIError` saying what is wrong."""
    parts = urlsplit(text)
    scheme = parts.scheme.lower()
    if scheme not in SCHEMES:
        raise URIError(f"bad URI {text!r}: the scheme must be one of unix://, tls://, tcp://")
    if parts.query or parts.fragment:
        raise URIError(f"bad URI {text!r}: no query or fragment allowed")
    if scheme == "unix":
        if parts.netloc:
            raise URIError(f"bad URI {text!r}: a unix URI has an absolute path and no host, as in unix:///run/tunnel.sock")
        if not parts.path or not os.path.isabs(parts.path):
            raise URIError(f"bad URI {text!r}: a unix URI needs an absolute path, as in unix:///run/tunnel.sock")
        return URI(scheme=scheme, path=parts.path)
    if parts.path not in ("", "/"):
        raise URIError(f"bad URI {text!r}: a {scheme} URI has no path")
    try:
        port = parts.port
    except ValueError:
        raise URIError(f"bad URI {text!r}: the port must be a number from 1 to 65535") from None
    if not parts.hostname or port is None or port == 0:
        raise URIError(f"bad URI {text!r}: a {scheme} URI needs a host and a port, as in {scheme}://127.0.0.1:16514")
    return URI(scheme=scheme, host=parts.hostname, port=port)
