"""The daemon's RPC program: procedure numbers and JSON bodies.

Client to daemon and daemon to daemon calls travel as tunnel RPC calls of
one program and version; each body is a UTF-8 JSON object, and so is each
reply.  A failure the operator should read is a :class:`DaemonError`; it
crosses the connection as an ``RPC_ERROR`` with ``APPLICATION_ERROR`` and its
message, and the caller raises it again as a :class:`DaemonError`.
"""

from __future__ import annotations

import json
from enum import IntEnum
from typing import Any

from .. import ErrorCode, RPCError

__all__ = ["PROGRAM", "VERSION", "DaemonError", "JSONObject", "PermissionDenied", "Procedure", "decode", "encode", "error_of"]

#: "TUNd": the program number of the daemon's procedures.
PROGRAM = 0x54554E64
#: The one version of :data:`PROGRAM`; a call to any other is answered ``UNKNOWN_PROCEDURE``.
VERSION = 1

JSONObject = dict[str, Any]


class Procedure(IntEnum):
    # client -> daemon
    DEFINE = 1
    UNDEFINE = 2
    START = 3
    LIST = 4
    DESTROY = 5
    MIGRATE = 6
    JOBINFO = 7
    ABORT = 8
    SET_SPEED = 9
    MONITOR = 10
    DOMAIN_INFO = 11
    CONFIRM = 12
    SUSPEND = 13
    RESUME = 14
    SHUTDOWN = 15
    REBOOT = 16
    #: Switch a running migration to post-copy (virsh migrate-postcopy).
    MIGRATE_POSTCOPY = 17
    # source daemon -> destination daemon (or the client, when it drives a migration without PEER2PEER)
    PREPARE = 32
    FINISH = 33
    #: A restarted source asks how a migration it started ended on the destination.
    MIGRATION_OUTCOME = 34
    #: A source resumes a post-copy migration on a new connection: the destination pairs it by id.
    POSTCOPY_RECOVER = 35


class DaemonError(Exception):
    """A request the daemon refused or could not carry out; the message is for the operator."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class PermissionDenied(DaemonError):
    """The daemon refused a call because the caller lacks the role it needs."""


def encode(obj: JSONObject) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode("utf-8")


def decode(body: bytes) -> JSONObject:
    try:
        obj = json.loads(body) if body else {}
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DaemonError(f"malformed request: {exc}") from None
    if not isinstance(obj, dict):
        raise DaemonError("malformed request: the body must be a JSON object")
    return obj


def error_of(exc: RPCError) -> DaemonError:
    """The :class:`DaemonError` a failed call stands for, on the calling side."""
    if exc.code == ErrorCode.APPLICATION_ERROR:
        return DaemonError(exc.message)
    if exc.code == ErrorCode.PERMISSION_DENIED:
        return PermissionDenied(f"permission denied: {exc.message}")
    return DaemonError(f"{ErrorCode.name_of(exc.code)}: {exc.message}")
