"""The reference migration daemon (``tunnel daemon``) and its wire-level pieces.

It sits on top of the trio layer: every connection, client or peer, is a
tunnel connection carrying JSON RPC calls and, for TUNNELLED migrations,
QEMU's migration stream.
"""

from __future__ import annotations

from ..control import PROGRAM, URI, DaemonError, PermissionDenied, Procedure, TLSFiles, URIError, parse_uri
from ._access import Role
from ._daemon import Daemon, Domain, parse_allow
from ._domains import DomainStore, validate_definition
from ._log import LEVELS as LOG_LEVELS
from ._log import LogSink
from ._net import Identity

__all__ = [
    "LOG_LEVELS",
    "PROGRAM",
    "URI",
    "Daemon",
    "DaemonError",
    "Domain",
    "DomainStore",
    "Identity",
    "LogSink",
    "PermissionDenied",
    "Procedure",
    "Role",
    "TLSFiles",
    "URIError",
    "parse_allow",
    "parse_uri",
    "validate_definition",
]
