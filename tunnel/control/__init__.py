"""What a client and a daemon both speak: the daemon's RPC program, its addresses and how to reach one.

``tunnel.client`` and ``tunnel.daemon`` both build on this package, so a
client loads neither the daemon nor the QEMU supervisor nor the endpoints:

* :data:`PROGRAM` and :class:`Procedure`, with JSON bodies (:func:`encode`,
  :func:`decode`) and :class:`DaemonError` for a refused call;
* :func:`parse_uri`: ``unix:///path.sock``, ``tls://host:port``, ``tcp://host:port``;
* :class:`TLSFiles` (mutual TLS contexts) and :func:`connect`.
"""

from __future__ import annotations

from ._connect import HANDSHAKE_TIMEOUT, TLSFiles, connect
from ._program import PROGRAM, VERSION, DaemonError, JSONObject, PermissionDenied, Procedure, decode, encode, error_of
from ._uri import URI, URIError, parse_uri

__all__ = [
    "HANDSHAKE_TIMEOUT",
    "PROGRAM",
    "URI",
    "VERSION",
    "DaemonError",
    "JSONObject",
    "PermissionDenied",
    "Procedure",
    "TLSFiles",
    "URIError",
    "connect",
    "decode",
    "encode",
    "error_of",
    "parse_uri",
]
