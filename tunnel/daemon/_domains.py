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

import contextlib
import json
import os
import re
import shutil
import tempfile
from typing import Any

import trio

from ..control import DaemonError

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


def _write_json(path: str, obj: object) -> None:
    """Write *obj* to *path* atomically and durably: temp file, fsync, rename, directory fsync."""
    directory = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _read_json(path: str) -> Any:
    """The JSON object in *path*, or None if it is missing or unreadable (a torn write never happens: see _write_json)."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _unlink(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


class DomainStore:
    """What the daemon keeps on disk, so that guests and migrations outlive it.

    * ``domains/NAME.json``: persistent definitions;
    * ``domains/NAME.migrated.json``: the guest was migrated away (to where, when);
    * ``run/NAME/``: the guest directory of a running QEMU (QMP socket, pidfile,
      log) with ``domain.json`` (its definition and whether it is persistent, so
      that a transient guest is found again) and, during a migration,
      ``migration.json`` (role, id, peer: what a restarted daemon needs to settle it);
    * ``migrations/ID.finished`` / ``ID.discarded``: how incoming migrations
      ended, for a source that lost the answer;
    * ``images/``: memory-image guests.

    Writes are atomic and fsynced; the async methods run them in a worker
    thread, so a slow disk never stalls the event loop.
    """

    def __init__(self, state_dir: str) -> None:
        self.state_dir = os.path.abspath(state_dir)
        self.domains_dir = os.path.join(self.state_dir, "domains")
        self.run_dir = os.path.join(self.state_dir, "run")
        self.images_dir = os.path.join(self.state_dir, "images")
        self.migrations_dir = os.path.join(self.state_dir, "migrations")
        for path in (self.state_dir, self.domains_dir, self.run_dir, self.images_dir, self.migrations_dir):
            os.makedirs(path, mode=0o700, exist_ok=True)

    def _path(self, name: str) -> str:
        return os.path.join(self.domains_dir, validate_name(name) + ".json")

    def guest_dir(self, name: str) -> str:
        return os.path.join(self.run_dir, validate_name(name))

    def load_all(self) -> dict[str, dict[str, Any]]:
        found: dict[str, dict[str, Any]] = {}
        for entry in sorted(os.listdir(self.domains_dir)):
            if not entry.endswith(".json") or entry.endswith(".migrated.json"):
                continue
            with open(os.path.join(self.domains_dir, entry), encoding="utf-8") as f:
                definition = validate_definition(json.load(f))
            found[definition["name"]] = definition
        return found

    async def save(self, definition: dict[str, Any]) -> None:
        await trio.to_thread.run_sync(_write_json, self._path(definition["name"]), definition)

    async def remove(self, name: str) -> None:
        await trio.to_thread.run_sync(_unlink, self._path(name))

    # ---------------------------------------------------------------- migrated away

    def migrated(self, name: str) -> dict[str, Any] | None:
        record = _read_json(os.path.join(self.domains_dir, validate_name(name) + ".migrated.json"))
        return record if isinstance(record, dict) else None

    async def set_migrated(self, name: str, record: dict[str, Any] | None) -> None:
        path = os.path.join(self.domains_dir, validate_name(name) + ".migrated.json")
        if record is None:
            await trio.to_thread.run_sync(_unlink, path)
        else:
            await trio.to_thread.run_sync(_write_json, path, record)

    # ---------------------------------------------------------------- running guests

    def running_guests(self) -> list[str]:
        """Names that have a guest directory: QEMUs that may still run."""
        return sorted(e for e in os.listdir(self.run_dir) if NAME_RE.fullmatch(e) and os.path.isdir(os.path.join(self.run_dir, e)))

    def runtime(self, name: str, what: str) -> dict[str, Any] | None:
        """``domain`` or ``migration`` record of a running guest, or None."""
        record = _read_json(os.path.join(self.guest_dir(name), f"{what}.json"))
        return record if isinstance(record, dict) else None

    async def set_runtime(self, name: str, what: str, record: dict[str, Any] | None) -> None:
        path = os.path.join(self.guest_dir(name), f"{what}.json")
        if record is None:
            await trio.to_thread.run_sync(_unlink, path)
        else:
            os.makedirs(self.guest_dir(name), mode=0o700, exist_ok=True)
            await trio.to_thread.run_sync(_write_json, path, record)

    async def clear_guest_dir(self, name: str) -> None:
        """Remove a stopped guest's records and directory (QEMU's log is kept, renamed NAME.log in run/)."""
        directory = self.guest_dir(name)

        def clear() -> None:
            log = os.path.join(directory, "qemu.log")
            if os.path.exists(log):
                os.replace(log, os.path.join(self.run_dir, f"{name}.log"))
            shutil.rmtree(directory, ignore_errors=True)

        await trio.to_thread.run_sync(clear)

    # ---------------------------------------------------------------- incoming outcomes

    def outcome(self, migration_id: str) -> str | None:
        for outcome in ("finished", "discarded"):
            if os.path.exists(os.path.join(self.migrations_dir, f"{migration_id}.{outcome}")):
                return outcome
        return None

    async def set_outcome(self, migration_id: str, outcome: str) -> None:
        assert outcome in ("finished", "discarded") and all(c in "0123456789abcdef" for c in migration_id)
        await trio.to_thread.run_sync(_write_json, os.path.join(self.migrations_dir, f"{migration_id}.{outcome}"), {})
