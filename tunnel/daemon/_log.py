"""The daemon's log: levels and structured fields, for plain callables and for sinks that want them.

``Daemon(log=...)`` takes either a plain ``callable(str)`` (every line at
info level and above, warnings and errors prefixed ``WARNING:`` / ``ERROR:``)
or a :class:`LogSink`, which gets the level, the message and the fields
(peer identity, role, domain, ...) separately and filters and formats them
itself (the ``tunnel daemon --log-level/--log-format`` writer is one).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

__all__ = ["LEVELS", "LogSink", "emit"]

#: Level names, lowest first, and their numbers (those of :mod:`logging`).
LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40}


@runtime_checkable
class LogSink(Protocol):
    def emit(self, level: str, message: str, fields: dict[str, Any]) -> None: ...


def emit(log: Callable[[str], None] | LogSink, level: str, message: str, fields: dict[str, Any]) -> None:
    if isinstance(log, LogSink):
        log.emit(level, message, fields)
    elif LEVELS[level] >= LEVELS["info"]:  # plain callables never had debug lines
        log(message if level == "info" else f"{level.upper()}: {message}")
