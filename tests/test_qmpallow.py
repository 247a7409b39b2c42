"""The monitor allow list: queries and run-state commands pass, everything that reaches the host is refused."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any

import pytest

from tunnel.control import DaemonError
from tunnel.daemon._qmpallow import check_qmp


@pytest.fixture
def run() -> Iterator[str]:
    path = tempfile.mkdtemp(prefix="tqm-", dir="/tmp")
    os.symlink("/etc", os.path.join(path, "etc"))
    try:
        yield path
    finally:
        shutil.rmtree(path)


PASSED: dict[str, dict[str, Any]] = {
    "query-status": {"execute": "query-status"},
    "query-with-args": {"execute": "query-migrate", "arguments": {}, "id": 7},
    "qom-get": {"execute": "qom-get", "arguments": {"path": "/machine", "property": "type"}},
    "stop": {"execute": "stop"},
    "cont": {"execute": "cont"},
    "system_reset": {"execute": "system_reset"},
    "send-key": {"execute": "send-key", "arguments": {"keys": [{"type": "qcode", "data": "a"}]}},
}


@pytest.mark.parametrize("command", PASSED.values(), ids=PASSED.keys())
def test_passed_unchanged(command: dict[str, Any], run: str) -> None:
    assert check_qmp(command, run_dir=run) == command


@pytest.mark.parametrize("name", ["pmemsave", "memsave", "screendump"])
def test_file_commands_write_in_run_dir(name: str, run: str) -> None:
    relative = check_qmp({"execute": name, "arguments": {"val": 0, "size": 4096, "filename": "dump.bin"}}, run_dir=run)
    assert relative["arguments"] == {"val": 0, "size": 4096, "filename": os.path.join(os.path.realpath(run), "dump.bin")}
    absolute = os.path.join(run, "a.bin")
    assert check_qmp({"execute": name, "arguments": {"filename": absolute}}, run_dir=run)["arguments"]["filename"] == absolute


REFUSED: dict[str, tuple[Any, list[str]]] = {
    "migrate-exec": ({"execute": "migrate", "arguments": {"uri": "exec:sh -c id"}}, ["'migrate'", "MIGRATE"]),
    "migrate-incoming": ({"execute": "migrate-incoming", "arguments": {"uri": "exec:id"}}, ["migrate-incoming"]),
    "hmp": ({"execute": "human-monitor-command", "arguments": {"command-line": "migrate exec:id"}}, ["HMP"]),
    "set-parameters": ({"execute": "migrate-set-parameters", "arguments": {"tls-creds": "x"}}, ["owns migration"]),
    "device_add": ({"execute": "device_add", "arguments": {"driver": "vfio-pci"}}, ["device_add"]),
    "chardev-add": ({"execute": "chardev-add", "arguments": {}}, ["chardev-add"]),
    "object-add": ({"execute": "object-add", "arguments": {}}, ["object-add"]),
    "getfd": ({"execute": "getfd", "arguments": {"fdname": "x"}}, ["file descriptors"]),
    "quit": ({"execute": "quit"}, ["DESTROY"]),
    "dump-guest-memory": ({"execute": "dump-guest-memory", "arguments": {"paging": False, "protocol": "file:/etc/x"}}, ["dump"]),
    "x-command": ({"execute": "x-exit-preconfig"}, ["experimental"]),
    "capabilities": ({"execute": "qmp_capabilities"}, ["negotiated"]),
    "unknown": ({"execute": "no-such-command"}, ["'no-such-command' is not allowed"]),
    "pmemsave-outside": ({"execute": "pmemsave", "arguments": {"val": 0, "size": 1, "filename": "/etc/x"}}, ["outside"]),
    "pmemsave-symlink": ({"execute": "pmemsave", "arguments": {"val": 0, "size": 1, "filename": "etc/x"}}, ["symlink"]),
    "pmemsave-dotdot": ({"execute": "pmemsave", "arguments": {"val": 0, "size": 1, "filename": "../x"}}, ["'..'"]),
    "memsave-no-name": ({"execute": "memsave", "arguments": {"val": 0, "size": 1}}, ["'filename'"]),
    "not-object": (["query-status"], ["JSON object"]),
    "execute-not-string": ({"execute": 1}, ["'execute'"]),
    "arguments-not-object": ({"execute": "query-status", "arguments": []}, ["'arguments'"]),
    "exec-oob": ({"exec-oob": "migrate-pause"}, ["'exec-oob'"]),
}


@pytest.mark.parametrize(("command", "words"), REFUSED.values(), ids=REFUSED.keys())
def test_refused(command: Any, words: list[str], run: str) -> None:
    with pytest.raises(DaemonError) as info:
        check_qmp(command, run_dir=run)
    message = info.value.message
    assert message.startswith("bad monitor command: ")
    assert "\n" not in message
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"


def test_refusals_of_commands_name_the_unsafe_option(run: str) -> None:
    with pytest.raises(DaemonError, match="--allow-unsafe-monitor"):
        check_qmp({"execute": "migrate", "arguments": {"uri": "exec:id"}}, run_dir=run)


def test_allow_unsafe_passes_anything(run: str) -> None:
    command = {"execute": "human-monitor-command", "arguments": {"command-line": "info status"}}
    assert check_qmp(command, run_dir=run, allow_unsafe=True) is command
