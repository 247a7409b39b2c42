"""The daemon's log as an operator and a log collector read it: levels, JSON, and what gets logged.

Connections with the peer's identity and roles, refusals, TLS handshake
failures with the reason and the peer's address, failed starts with QEMU's
own words, and ``--log-level`` filtering.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

import pytest
import trio
import trustme
from daemon_proc import daemon_process, free_port
from qemu_fixtures import base_args, requires_qemu, run_dir

from tunnel.client import connect
from tunnel.daemon import DaemonError, PermissionDenied, TLSFiles

__all__ = ["run_dir"]





def write_identity(ca: trustme.CA, name: str, directory: str) -> TLSFiles:
    cert = ca.issue_cert(name)
    files = TLSFiles(cert=f"{directory}/{name}.pem", key=f"{directory}/{name}.key", ca=f"{directory}/{name}-ca.pem")
    cert.cert_chain_pems[0].write_to_path(files.cert)
    cert.private_key_pem.write_to_path(files.key)
    ca.cert_pem.write_to_path(files.ca)
    return files


def records(log: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in log.splitlines() if line.startswith("{")]


async def logged(daemon: Any, done: Callable[[str], bool]) -> str:
    """The daemon's log once *done* holds for it (it writes after answering); bounded by the test's fail_after."""
    while not done(log := daemon.log()):
        await trio.sleep(0.02)
    return log


async def test_json_log_has_connections_refusals_and_tls_failures_with_reason_and_address(run_dir: str) -> None:
    ca = trustme.CA()
    server = write_identity(ca, "127.0.0.1", run_dir)
    other = write_identity(trustme.CA(), "stranger", run_dir)
    stranger = TLSFiles(cert=other.cert, key=other.key, ca=server.ca)  # trusts the daemon; signed by another CA
    port = free_port()
    ro = f"{run_dir}/ro.sock"
    with trio.fail_after(60):
        async with daemon_process(
            run_dir, "d", "--listen", f"tls://127.0.0.1:{port}", "--listen-ro", f"unix://{ro}", "--tls-cert", server.cert,
            "--tls-key", server.key, "--tls-ca", server.ca, "--log-format", "json", "--log-level", "debug", ports=[port],
        ) as daemon:
            with pytest.raises(DaemonError):
                async with connect(f"tls://127.0.0.1:{port}", tls=stranger) as client:
                    await client.list()
            async with connect(f"unix://{ro}") as client:
                await client.list()
                with pytest.raises(PermissionDenied):
                    await client.start("vm1")
            # The last line the daemon writes: the read-only (unix, uid:) connection closed.
            log = records(await logged(daemon, lambda text: any(
                str(r["message"]).startswith("connection from uid:") and str(r["message"]).endswith("closed") for r in records(text))))
    assert all({"time", "level", "pid", "message"} <= set(r) for r in log)
    tls = [r for r in log if "TLS handshake" in str(r["message"]) and "certificate verify failed" in str(r["reason"])]
    assert tls and tls[0]["level"] == "warning" and str(tls[0]["peer_address"]).startswith("127.0.0.1:"), "\n".join(str(r["message"]) for r in log)
    conn = [r for r in log if str(r["message"]).startswith("connection from uid:")]
    assert conn and conn[0]["roles"] == "read-only" and conn[0]["peer"] == f"uid:{os.getuid()}"
    refused = [r for r in log if str(r["message"]).startswith("refused START")]
    assert refused and refused[0]["level"] == "warning" and refused[0]["procedure"] == "START"
    assert any(str(r["message"]).endswith("closed") and r["level"] == "debug" for r in log)


@requires_qemu
async def test_text_log_levels_and_a_failed_start_with_qemus_reason(run_dir: str) -> None:
    sock = f"{run_dir}/d.sock"
    with trio.fail_after(60):
        async with daemon_process(run_dir, "d", "--listen", f"unix://{sock}", "--log-level", "warning") as daemon:
            async with connect(f"unix://{sock}") as client:
                await client.define({"name": "bad", "qemu": base_args(64, "-machine", "no-such-machine")})
                with pytest.raises(DaemonError, match="QEMU exited during start: unsupported machine type"):
                    await client.start("bad")
            log = await logged(daemon, lambda text: "cannot start bad" in text)
    assert "INFO:" not in log  # --log-level warning
    lines = [line for line in log.splitlines() if "cannot start bad" in line]
    assert len(lines) == 1 and "ERROR:" in lines[0] and "unsupported machine type" in lines[0], log
