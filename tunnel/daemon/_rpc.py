"""The daemon's side of its RPC program: handlers, request fields and what a client may read.

The program itself (numbers, JSON bodies, :class:`DaemonError`) is shared
with clients in :mod:`tunnel.control`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import trio

from .. import ErrorCode, RPCError, TunnelError
from ..control import DaemonError, JSONObject, decode, encode
from ..qemu import QemuError, QemuStartError

__all__ = ["field", "json_handler", "public_message"]


def public_message(exc: BaseException, *, hide: tuple[str, ...] = ()) -> str:
    """What a client may read of *exc*: no exception class names, no host paths of the daemon.

    The full text goes to the daemon's log; clients get QEMU's own words where
    QEMU gave any (they are about the client's definition), an OS error's
    description without its file name, and otherwise only that something
    failed.  Each string in *hide* (the state directory) is replaced by ``...``.
    """
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


def json_handler(fn: Callable[[JSONObject], Awaitable[JSONObject]]) -> Callable[[bytes], Awaitable[bytes]]:
    """Adapt ``async fn(request) -> reply`` to a tunnel RPC handler."""

    async def handler(body: bytes) -> bytes:
        try:
            return encode(await fn(decode(body)))
        except DaemonError as exc:
            raise RPCError(ErrorCode.APPLICATION_ERROR, exc.message) from None

    return handler


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
