"""The allow list of QMP commands a client may pass to a guest's monitor (MONITOR).

QMP is QEMU's full control interface: ``migrate`` to ``exec:``,
``human-monitor-command``, ``device_add`` or ``chardev-add`` turn a
monitor connection into commands run as root.  So a client gets the
read-only queries and the commands that change only the guest's own run
state; everything else needs the operator to start the daemon with
``--allow-unsafe-monitor``.

The commands that write guest memory or the screen to a file
(``pmemsave``, ``memsave``, ``screendump``) write only inside the guest's
run directory, with no ``--allow-path`` exceptions: the file name is made
absolute there, so QEMU's working directory does not matter.
"""

from __future__ import annotations

from typing import Any, NoReturn

from ..control import DaemonError
from ._hostpaths import HostPathError, PathPolicy

__all__ = ["check_qmp"]

PREFIX = "bad monitor command: "
UNSAFE_HINT = "start the daemon with --allow-unsafe-monitor to pass any command"

#: Commands that read state or change only the guest's run state, beyond every query-*.
SAFE_COMMANDS = frozenset(
    {
        "qom-get", "qom-list", "stop", "cont", "system_reset", "system_powerdown", "system_wakeup", "inject-nmi",
        "send-key", "input-send-event", "balloon",
    }
)  # fmt: skip
#: Commands that write a host file, and the argument naming it.
FILE_COMMANDS = {"pmemsave": "filename", "memsave": "filename", "screendump": "filename"}
#: Why well-known commands are refused.
REASONS = {
    "qmp_capabilities": "the daemon negotiated capabilities when it connected",
    "migrate": "the daemon owns migration; use the MIGRATE procedure",
    "migrate-incoming": "the daemon owns migration",
    "migrate-set-parameters": "the daemon owns migration; use SET_SPEED for the bandwidth",
    "migrate-set-capabilities": "the daemon owns migration",
    "migrate_cancel": "the daemon owns migration; use ABORT",
    "human-monitor-command": "HMP commands bypass this allow list",
    "quit": "use DESTROY",
    "getfd": "it passes host file descriptors",
    "add-fd": "it passes host file descriptors",
    "dump-guest-memory": "it writes a host file",
    "device_add": "devices are part of the definition, which the daemon checks",
    "object-add": "objects are part of the definition, which the daemon checks",
    "chardev-add": "chardevs are part of the definition, which the daemon checks",
    "netdev_add": "netdevs are part of the definition, which the daemon checks",
    "blockdev-add": "block devices are part of the definition, which the daemon checks",
}
KNOWN_KEYS = frozenset({"execute", "arguments", "id"})


def check_qmp(command: object, *, run_dir: str, allow_unsafe: bool = False) -> dict[str, Any]:
    """Return *command*, file names made absolute, if a client may send it; else raise :class:`DaemonError`."""
    if not isinstance(command, dict):
        _refuse('it must be a JSON object such as {"execute": "query-status"}')
    if allow_unsafe:
        return command
    unknown = sorted(set(command) - KNOWN_KEYS)
    if unknown:
        _refuse(f"unknown key {unknown[0]!r} (known: {', '.join(sorted(KNOWN_KEYS))})")
    name = command.get("execute")
    if not isinstance(name, str):
        _refuse("'execute' must be the command's name, a string")
    arguments = command.get("arguments", {})
    if not isinstance(arguments, dict):
        _refuse(f"{name}: 'arguments' must be a JSON object")
    if name.startswith("query-") or name in SAFE_COMMANDS:
        return command
    if name in FILE_COMMANDS:
        key = FILE_COMMANDS[name]
        filename = arguments.get(key)
        if not isinstance(filename, str) or not filename:
            _refuse(f"{name}: '{key}' must be a file name")
        try:
            path = PathPolicy(run_dir=run_dir, widen_hint="").resolve(filename)
        except HostPathError as exc:
            _refuse(f"{name}: {key} {filename!r} {exc}")
        return {**command, "arguments": {**arguments, key: path}}
    reason = REASONS.get(name) or ("experimental commands are not checked" if name.startswith("x-") else None)
    because = f": {reason}" if reason else " (only queries and run-state commands are)"
    _refuse(f"{name!r} is not allowed{because}; {UNSAFE_HINT}")


def _refuse(message: str) -> NoReturn:
    raise DaemonError(PREFIX + message)
