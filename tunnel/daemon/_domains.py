"""Domain definitions: validation and the daemon's state directory.

A definition is a JSON object::

    {"name": "vm1",
     "qemu": ["-machine", "q35", "-accel", "tcg", "-m", "512", "-nodefaults", "-display", "none"],
     "description": "optional text"}

A memory-image guest has ``"image"`` instead of ``"qemu"`` (see
:mod:`._imageguest`).  ``qemu`` holds QEMU's arguments without the binary, the QMP socket or
``-incoming``: the daemon adds those itself.  Definitions live in
``STATE_DIR/domains/NAME.json``, written atomically; the daemon's runtime
files (QMP sockets, QEMU logs) live in ``STATE_DIR/run``.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from typing import Any

from ._rpc import DaemonError

__all__ = ["DomainStore", "validate_definition"]

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
#: Options the daemon owns: a definition that sets them would break supervision or migration.
RESERVED_OPTIONS = frozenset({"-qmp", "-qmp-pretty", "-incoming", "-daemonize", "-monitor", "-mon", "-pidfile", "-S"})
KNOWN_KEYS = frozenset({"name", "qemu", "image", "description"})


def validate_name(name: object) -> str:
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise DaemonError(f"bad domain name {name!r}: use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit")
    return name


def validate_definition(obj: object) -> dict[str, Any]:
    """Check a definition; return a normalised copy or raise :class:`DaemonError`."""
    if not isinstance(obj, dict):
        raise DaemonError("bad definition: it must be a JSON object")
    unknown = sorted(set(obj) - KNOWN_KEYS)
    if unknown:
        raise DaemonError(f"bad definition: unknown keys {', '.join(unknown)} (known: {', '.join(sorted(KNOWN_KEYS))})")
    name = validate_name(obj.get("name"))
    if ("qemu" in obj) == ("image" in obj):
        raise DaemonError("bad definition: give either 'qemu' (QEMU's arguments) or 'image' (a memory-image guest), not both or neither")
    if "image" in obj:
        from ._imageguest import validate_image_spec

        definition: dict[str, Any] = {"name": name, "image": validate_image_spec(obj["image"])}
        if isinstance(obj.get("description"), str):
            definition["description"] = obj["description"]
        return definition
    args = obj.get("qemu")
    if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
        raise DaemonError("bad definition: 'qemu' must be a list of strings (QEMU's arguments without the binary)")
    for arg in args:
        option = arg.split("=", 1)[0]
        if option.startswith("--"):
            option = option[1:]
        if option in RESERVED_OPTIONS:
            raise DaemonError(f"bad definition: {option} is added by the daemon; remove it from 'qemu'")
    definition = {"name": name, "qemu": list(args)}
    if "description" in obj:
        if not isinstance(obj["description"], str):
            raise DaemonError("bad definition: 'description' must be a string")
        definition["description"] = obj["description"]
    return definition


class DomainStore:
    """Definitions persisted as one JSON file per domain."""

    def __init__(self, state_dir: str) -> None:
        self.state_dir = os.path.abspath(state_dir)
        self.domains_dir = os.path.join(self.state_dir, "domains")
        self.run_dir = os.path.join(self.state_dir, "run")
        self.images_dir = os.path.join(self.state_dir, "images")
        for path in (self.state_dir, self.domains_dir, self.run_dir, self.images_dir):
            os.makedirs(path, mode=0o700, exist_ok=True)

    def _path(self, name: str) -> str:
        return os.path.join(self.domains_dir, validate_name(name) + ".json")

    def load_all(self) -> dict[str, dict[str, Any]]:
        found: dict[str, dict[str, Any]] = {}
        for entry in sorted(os.listdir(self.domains_dir)):
            if not entry.endswith(".json"):
                continue
            with open(os.path.join(self.domains_dir, entry), encoding="utf-8") as f:
                definition = validate_definition(json.load(f))
            found[definition["name"]] = definition
        return found

    def save(self, definition: dict[str, Any]) -> None:
        path = self._path(definition["name"])
        fd, tmp = tempfile.mkstemp(dir=self.domains_dir, prefix=".tmp-")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(definition, f, indent=2)
                f.write("\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise

    def remove(self, name: str) -> None:
        try:
            os.unlink(self._path(name))
        except FileNotFoundError:
            pass
