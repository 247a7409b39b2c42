"""What the ``tunnel`` command prints when something goes wrong: one line, never a traceback.

A user error (a refused request, a bad path or URI, TLS files that do not
belong together) becomes its own message.  Anything else is a bug: the
traceback goes to a log file and the line names that file.  Errors may
arrive wrapped in exception groups by the nurseries they went through; the
first real error in the group is the one reported.
"""

from __future__ import annotations

import os
import ssl
import tempfile
import time
import traceback

import trio

from ..control import DaemonError, URIError

__all__ = ["crash_log", "is_broken_pipe", "silence_stdout", "tls_reason", "user_message"]


def _leaves(exc: BaseException) -> list[BaseException]:
    """The non-group exceptions inside *exc*, cancellations (which a real error caused) left out."""
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for sub in exc.exceptions for leaf in _leaves(sub)]
    if isinstance(exc, trio.Cancelled):
        return []
    return [exc]


def tls_reason(exc: ssl.SSLError) -> str:
    """OpenSSL's reason in words an operator can act on."""
    reason = getattr(exc, "reason", None) or ""
    if reason == "KEY_VALUES_MISMATCH":
        return "the certificate and the private key do not belong together"
    if reason in ("NO_START_LINE", "PEM_LIB"):
        return "a file is not in PEM format"
    return reason.replace("_", " ").lower() or str(exc)


def user_message(exc: BaseException) -> str | None:
    """The line to print for *exc* if it is the user's to fix, else None (a bug)."""
    leaves = _leaves(exc)
    if not leaves:
        return None
    first = leaves[0]
    if isinstance(first, DaemonError):
        return first.message
    if isinstance(first, URIError):
        return str(first)
    if isinstance(first, ssl.SSLError):
        return f"TLS: {tls_reason(first)}"
    return None


def is_broken_pipe(exc: BaseException) -> bool:
    leaves = _leaves(exc)
    return bool(leaves) and all(isinstance(e, BrokenPipeError) for e in leaves)


def silence_stdout() -> None:
    """After a reader of our output went away (``tunnel list | head -1``): no second error at exit."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
    finally:
        os.close(devnull)


def crash_log(exc: BaseException) -> str:
    """Write *exc*'s traceback to a new private file; return its path."""
    directory = os.environ.get("TUNNEL_LOG_DIR") or tempfile.gettempdir()
    path = os.path.join(directory, f"tunnel-error-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write("".join(traceback.format_exception(exc)))
    return path
