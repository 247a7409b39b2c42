"""QEMU's ``key=value,key=value`` option strings, parsed the way QEMU reads them.

QEMU (QemuOpts and keyval alike) splits a value at single commas, reads
``,,`` as a literal comma, and lets the first element omit its key when the
option has an *implied* key (``-netdev user,id=n0`` is ``type=user,id=n0``).
The first element is implied exactly when it has no ``=`` before its first
comma, even an escaped one, which is how QEMU's ``strcspn(params, "=,")``
decides it.

This parser is deliberately stricter than QEMU: a bare ``flag`` or
``noflag`` (QEMU's deprecated boolean shorthand, whose meaning depends on
the property's type), an empty element or an odd property name is an error,
so what it accepts QEMU can only read the same way or reject.
"""

from __future__ import annotations

import re

__all__ = ["OptsSyntaxError", "join_opts", "parse_opts"]

KEY_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


class OptsSyntaxError(ValueError):
    """A value this parser will not read; the message says how to write it instead."""


def parse_opts(value: str, implied_key: str | None = None) -> list[tuple[str, str]]:
    """``"user,id=n0,x=a,,b"`` with implied key ``"type"`` -> ``[("type", "user"), ("id", "n0"), ("x", "a,b")]``."""
    if value == "":
        raise OptsSyntaxError("the value is empty")
    pairs: list[tuple[str, str]] = []
    pos = 0
    while True:
        end = _find_any(value, "=,", pos)
        if end == len(value) or value[end] == ",":
            if pos == 0 and implied_key is not None:
                text, pos = _read_value(value, pos)
                pairs.append((implied_key, text))
            else:
                name = value[pos:end]
                if not name:
                    raise OptsSyntaxError("it has an empty element (',' at the start, the end or twice in a row)")
                raise OptsSyntaxError(f"property {name!r} has no value; write {name}=on (or =off) explicitly")
        else:
            key = value[pos:end]
            if not KEY_RE.fullmatch(key):
                raise OptsSyntaxError(f"{key!r} is not a property name")
            text, pos = _read_value(value, end + 1)
            pairs.append((key, text))
        if pos == len(value):
            return pairs
        pos += 1  # the separating comma
        if pos == len(value):
            raise OptsSyntaxError("it ends with a single ','")


def join_opts(pairs: list[tuple[str, str]], implied_key: str | None = None) -> str:
    """The inverse of :func:`parse_opts`: commas in values doubled, the implied key left out where QEMU allows."""
    parts = []
    for i, (key, value) in enumerate(pairs):
        escaped = value.replace(",", ",,")
        if i == 0 and key == implied_key and value and "=" not in value:
            parts.append(escaped)
        else:
            parts.append(f"{key}={escaped}")
    return ",".join(parts)


def _find_any(s: str, chars: str, pos: int) -> int:
    for i in range(pos, len(s)):
        if s[i] in chars:
            return i
    return len(s)


def _read_value(s: str, pos: int) -> tuple[str, int]:
    """Read up to the next single comma; return the unescaped text and the comma's index (or ``len(s)``)."""
    out = []
    while pos < len(s):
        c = s[pos]
        if c == ",":
            if s.startswith(",,", pos):
                out.append(",")
                pos += 2
                continue
            break
        out.append(c)
        pos += 1
    return "".join(out), pos
