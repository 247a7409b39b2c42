"""The reference migration daemon (``tunnel daemon``) and its wire-level pieces.

It sits on top of the trio layer: every connection, client or peer, is a
tunnel connection carrying JSON RPC calls and, for TUNNELLED migrations,
QEMU's migration stream.
"""

from __future__ import annotations

from ._access import Role
from ._daemon import Daemon, Domain, parse_allow
from ._domains import DomainStore, validate_definition
from ._net import Identity, TLSFiles
from ._rpc import PROGRAM, DaemonError, PermissionDenied, Procedure
from ._uri import URI, URIError, parse_uri

__all__ = [
    "PROGRAM",
    "URI",
    "Daemon",
    "DaemonError",
    "Domain",
    "DomainStore",
    "Identity",
    "PermissionDenied",
    "Procedure",
    "Role",
    "TLSFiles",
    "URIError",
    "parse_allow",
    "parse_uri",
    "validate_definition",
]
