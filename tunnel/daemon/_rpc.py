"""The daemon's RPC program: procedure numbers and JSON bodies.

Client to daemon and daemon to daemon calls travel as tunnel RPC calls of
one program; each body is a UTF-8 JSON object, and so is each reply.  A
failure the operator should read is a :class:`DaemonError`; it crosses the
connection as an ``RPC_ERROR`` with ``APPLICATION_ERROR`` and its message,
and the client raises it again as a :class:`DaemonError`.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from enum import IntEnum
from typing import Any

import trio

from .._errors import ErrorCode, RPCError, TunnelError

__all__ = ["PROGRAM", "DaemonError", "PermissionDenied", "Procedure", "decode", "encode", "json_handler", "public_message"]

#: "TUNd": the program number of the daemon's procedures.
PROGRAM = 0x54554E64

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


def public_message(exc: BaseException, *, hide: tuple[str, ...] = ()) -> str:
    """What a client may read of *exc*: no exception class names, no host paths of the daemon.

    The full text goes to the daemon's log; clients get QEMU's own words where
    QEMU gave any (they are about the client's definition), an OS error's
    description without its file name, and otherwise only that something
    failed.  Each string in *hide* (the state directory) is replaced by ``...``.
    """
    from ..qemu import QemuError, QemuStartError

    if isinstance(exc, DaemonError):
        text = exc.message
    elif isinstance(exc, QemuStartError):
        lines = [line.strip() for line in exc.log_tail.splitlines() if line.strip()]
        # QEMU prefixes its errors with its program name; a hint may follow on a line of its own.
        errors = [i for i, line in enumerate(lines) if line.split(":", 1)[0].startswith("qemu-system")]
        if errors:
            first = errors[-1]
            text = "QEMU exited during start: " + lines[first].split(":", 1)[1].strip()
            hints = lines[first + 1 :]
            if hints:
                text += f" ({'; '.join(hints)})"
        else:
            text = "QEMU exited during start" + (f": {lines[-1]}" if lines else "")
    elif isinstance(exc, (QemuError, TunnelError)):
        text = str(exc)
    elif isinstance(exc, OSError):
        text = exc.strerror or "an operating system error"
    elif isinstance(exc, (trio.BrokenResourceError, trio.ClosedResourceError)):
        text = "the connection broke"
    else:
        text = "an internal error (the daemon's log has the details)"
    for secret in hide:
        if secret:
            text = text.replace(secret, "...")
    return " ".join(text.split())  # one line


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


def json_handler(fn: Callable[[JSONObject], Awaitable[JSONObject]]) -> Callable[[bytes], Awaitable[bytes]]:
    """Adapt ``async fn(request) -> reply`` to a tunnel RPC handler."""

    async def handler(body: bytes) -> bytes:
        try:
            return encode(await fn(decode(body)))
        except DaemonError as exc:
            raise RPCError(ErrorCode.APPLICATION_ERROR, exc.message) from None

    return handler


def error_of(exc: RPCError) -> DaemonError:
    """The :class:`DaemonError` a failed call stands for, on the calling side."""
    if exc.code == ErrorCode.APPLICATION_ERROR:
        return DaemonError(exc.message)
    if exc.code == ErrorCode.PERMISSION_DENIED:
        return PermissionDenied(f"permission denied: {exc.message}")
    return DaemonError(f"{ErrorCode.name_of(exc.code)}: {exc.message}")


def field(request: JSONObject, name: str, kind: type, default: Any = ...) -> Any:
    """``request[name]`` checked against *kind*, or a clear error."""
    if name not in request:
        if default is ...:
            raise DaemonError(f"malformed request: missing {name!r}")
        return default
    value = request[name]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise DaemonError(f"malformed request: {name!r} must be {kind.__name__}")
    return value
