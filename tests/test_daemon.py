"""The reference daemon and its client: real sockets, real QEMU processes.

Daemons run in the test's trio loop (real unix and TLS sockets, real QEMU
children); the CLI tests run ``python -m tunnel`` as a process and check its
exit status and its one-line errors.
"""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
import trustme
from daemon_proc import Certs, daemon_process, free_port, kill_guests, pid_alive
from qemu_fixtures import RANDOM_ADDR, RandomRam, base_args, file_digest, loader_args, random_ram, requires_qemu, run_dir

from tunnel.client import connect
from tunnel.daemon import Daemon as _Daemon
from tunnel.daemon import DaemonError, PermissionDenied, TLSFiles, parse_uri

__all__ = ["random_ram", "run_dir"]  # fixtures, imported for pytest

MiB = 1024 * 1024
pytestmark = requires_qemu


def definition(name: str, ram: RandomRam | None, mem_mib: int = 128) -> dict[str, Any]:
    args = base_args(mem_mib) + (loader_args(ram) if ram is not None else [])
    return {"name": name, "qemu": args}





def Daemon(**options: Any) -> _Daemon:
    """A daemon whose guests may load files from the temp directory and stop with it (tests leave nothing running)."""
    options.setdefault("allow_paths", [tempfile.gettempdir()])
    options.setdefault("shutdown_guests_on_exit", True)
    options.setdefault("log", lambda line: print(line, file=sys.stderr))  # shown by pytest when a test fails
    return _Daemon(**options)


@asynccontextmanager
async def running(daemon: _Daemon) -> AsyncIterator[_Daemon]:
    async with trio.open_nursery() as nursery:
        await nursery.start(daemon.run)
        try:
            yield daemon
        finally:
            nursery.cancel_scope.cancel()


@asynccontextmanager
async def unix_pair(root: str, **dest_options: Any) -> AsyncIterator[tuple[str, str, _Daemon, _Daemon]]:
    src_uri, dst_uri = f"unix://{root}/src.sock", f"unix://{root}/dst.sock"
    async with (
        running(Daemon(state_dir=f"{root}/src", listen=[src_uri])) as src,
        running(Daemon(state_dir=f"{root}/dst", listen=[dst_uri], **dest_options)) as dst,
    ):
        yield src_uri, dst_uri, src, dst


async def dest_memory_digest(uri: str, name: str, directory: str, size: int, tls: TLSFiles | None = None) -> str:
    """pmemsave on the destination daemon (state directory DIRECTORY/dst): the file lands in the guest's directory."""
    path = os.path.join(directory, "dst", "run", name, "dump.mem")
    async with connect(uri, tls=tls) as client:
        reply = await client.monitor(name, {"execute": "pmemsave", "arguments": {"val": RANDOM_ADDR, "size": size, "filename": "dump.mem"}})
    assert "return" in reply, reply
    try:
        return await trio.to_thread.run_sync(file_digest, path)
    finally:
        os.unlink(path)





# ----------------------------------------------------------------------
# Migrations


async def test_tunnelled_migration_over_unix_moves_256_mib_of_random_ram(run_dir: str, random_ram: Callable[[int], RandomRam]) -> None:
    ram = random_ram(256 * MiB)
    with trio.fail_after(120):
        async with unix_pair(run_dir) as (src_uri, dst_uri, _src, _dst):
            async with connect(src_uri) as client:
                await client.define(definition("vm1", ram, 320))
                assert await client.start("vm1") == "running"
                result = await client.migrate("vm1", dst_uri, live=True, p2p=True, tunnelled=True, persistent=True)
                assert result["status"] == "completed"
                assert result["tunnel_bytes_sent"] >= ram.size  # random pages cannot shrink
                assert result["tunnel_bytes_received"] > 0  # QEMU's return path came back on the same stream
                assert result["destination_state"] == "running"
                rows = {d["name"]: d for d in await client.list()}
                assert rows["vm1"]["state"] == "shut off"  # confirm stopped the source
                assert rows["vm1"]["migrated_to"] == dst_uri
                assert (await client.jobinfo("vm1"))["status"] == "completed"
                # One live copy: the source refuses to start what now runs on the destination.
                with pytest.raises(DaemonError, match=f"was migrated to {dst_uri} and runs there.*--force"):
                    await client.start("vm1")
            async with connect(dst_uri) as client:
                rows = {d["name"]: d for d in await client.list()}
                assert rows["vm1"]["state"] == "running"
            assert await dest_memory_digest(dst_uri, "vm1", run_dir, ram.size) == ram.sha256
            # The destination now owns a persistent definition (--persistent).
            assert os.path.exists(f"{run_dir}/dst/domains/vm1.json")


async def test_tunnelled_migration_over_mutual_tls(run_dir: str, random_ram: Callable[[int], RandomRam]) -> None:
    ram = random_ram(256 * MiB)
    certs = Certs(run_dir)
    src_tls, dst_tls, client_tls = certs.files("source"), certs.files("destination"), certs.files("operator")
    src_uri, dst_uri = f"tls://127.0.0.1:{free_port()}", f"tls://127.0.0.1:{free_port()}"
    with trio.fail_after(120):
        async with (
            running(Daemon(state_dir=f"{run_dir}/src", listen=[src_uri], tls=src_tls, allow_admin=["cn:operator"])),
            running(Daemon(state_dir=f"{run_dir}/dst", listen=[dst_uri], tls=dst_tls, allow=["cn:source"], allow_admin=["cn:operator"])),
        ):
            async with connect(src_uri, tls=client_tls) as client:
                await client.define(definition("vm1", ram, 320))
                await client.start("vm1")
                result = await client.migrate("vm1", dst_uri, live=True, p2p=True, tunnelled=True, dname="vm1-moved")
                assert result["status"] == "completed"
                assert result["destination_name"] == "vm1-moved"
            assert await dest_memory_digest(dst_uri, "vm1-moved", run_dir, ram.size, tls=client_tls) == ram.sha256


async def test_native_p2p_between_tls_daemons_uses_qemus_own_tls(run_dir: str, random_ram: Callable[[int], RandomRam]) -> None:
    ram = random_ram(64 * MiB)
    certs = Certs(run_dir)
    operator = certs.files("operator")
    src_uri, dst_uri = f"tls://127.0.0.1:{free_port()}", f"tls://127.0.0.1:{free_port()}"
    with trio.fail_after(120):
        async with (
            running(Daemon(state_dir=f"{run_dir}/src", listen=[src_uri], tls=certs.files("source"), allow_admin=["cn:operator"])),
            running(
                Daemon(
                    state_dir=f"{run_dir}/dst",
                    listen=[dst_uri],
                    tls=certs.files("destination"),
                    allow=["cn:source"],
                    allow_admin=["cn:operator"],
                )
            ),
        ):
            async with connect(src_uri, tls=operator) as client:
                await client.define(definition("vm1", ram))
                await client.start("vm1")
                # plain TCP is refused without --insecure, before anything starts
                with pytest.raises(DaemonError, match="without TLS"):
                    await client.migrate("vm1", f"tcp://127.0.0.1:{free_port()}", live=True, p2p=True)
                result = await client.migrate("vm1", dst_uri, live=True, p2p=True)
                assert result["status"] == "completed" and result["tunnel_bytes_sent"] is None
            async with connect(dst_uri, tls=operator) as dest:
                params = (await dest.monitor("vm1", {"execute": "query-migrate-parameters"}))["return"]
                assert params["tls-creds"] == "tunnel-migration-tls"  # QEMU's own TLS carried the data
            assert await dest_memory_digest(dst_uri, "vm1", run_dir, ram.size, tls=operator) == ram.sha256


async def test_native_p2p_migration_uses_a_direct_channel(run_dir: str, random_ram: Callable[[int], RandomRam]) -> None:
    ram = random_ram(64 * MiB)
    with trio.fail_after(90):
        async with unix_pair(run_dir) as (src_uri, dst_uri, _src, _dst):
            async with connect(src_uri) as client:
                await client.define(definition("vm1", ram))
                await client.start("vm1", paused=True)
                result = await client.migrate("vm1", dst_uri, p2p=True)
                assert result["status"] == "completed"
                assert result["tunnel_bytes_sent"] is None  # nothing went through the tunnel
                assert result["destination_state"] == "paused"  # it was paused on the source
            assert await dest_memory_digest(dst_uri, "vm1", run_dir, ram.size) == ram.sha256


async def test_client_driven_migration_without_p2p(run_dir: str, random_ram: Callable[[int], RandomRam]) -> None:
    ram = random_ram(64 * MiB)
    with trio.fail_after(90):
        async with unix_pair(run_dir) as (src_uri, dst_uri, _src, _dst), connect(src_uri) as client:
            await client.define(definition("vm1", ram))
            await client.start("vm1")
            result = await client.migrate("vm1", dst_uri, live=True, dname="vm1-b")
            assert result["status"] == "completed" and result["destination_state"] == "running"
            assert (await client.list())[0]["state"] == "shut off"
            assert await dest_memory_digest(dst_uri, "vm1-b", run_dir, ram.size) == ram.sha256
            # a destination that refuses leaves the source running (--force: it runs renamed there, as vm1-b)
            await client.start("vm1", force=True)
            with pytest.raises(DaemonError, match="already exists and is active on the destination"):
                await client.migrate("vm1", dst_uri, live=True, dname="vm1-b")
            assert (await client.list())[0]["state"] == "running"


async def test_abort_half_way_leaves_the_source_as_it_was_and_no_destination(
    run_dir: str, random_ram: Callable[[int], RandomRam]
) -> None:
    ram = random_ram(128 * MiB)
    with trio.fail_after(120):
        async with unix_pair(run_dir) as (src_uri, dst_uri, _src, _dst):
            async with connect(src_uri) as client, connect(dst_uri) as dclient:
                await client.define(definition("vm1", ram, 192))
                await client.start("vm1")
                source_pid = (await client.list())[0]["pid"]
                outcome: dict[str, Any] = {}

                async def migrate() -> None:
                    try:
                        await client.migrate("vm1", dst_uri, live=True, p2p=True, tunnelled=True, bandwidth_mib=16)
                    except DaemonError as exc:
                        outcome["error"] = exc.message

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(migrate)
                    dest_pid = None
                    while True:
                        await trio.sleep(0.1)
                        info = await client.jobinfo("vm1")
                        rows = await dclient.list()
                        if rows and rows[0]["state"] == "incoming":
                            dest_pid = rows[0]["pid"]
                        if info.get("status") == "active" and (info.get("data_processed") or 0) > 8 * MiB:
                            break
                    assert dest_pid is not None
                    aborted = await client.abort("vm1")
                    assert aborted["status"] == "cancelled" and aborted["where"] == "the guest runs here", aborted
                    # abort returns once the source guest runs again: no waiting for the destination
                    rows = await client.list()
                    assert rows[0]["state"] == "running" and rows[0]["pid"] == source_pid
                assert "cancelled" in outcome["error"] and "aborted by the client" in outcome["error"]
                info = await client.jobinfo("vm1")
                # the figures it had, not zeroes
                assert info["status"] == "cancelled" and info["data_processed"] > 8 * MiB and info["data_total"] > 0
                assert info["data_remaining"] <= info["data_total"]
                # the destination cleans up in the background
                while await dclient.list() != [] or pid_alive(dest_pid):
                    await trio.sleep(0.05)
                assert os.listdir(f"{run_dir}/dst/domains") == []
                # The source is usable: the same migration now succeeds.
                result = await client.migrate("vm1", dst_uri, live=True, p2p=True, tunnelled=True)
                assert result["status"] == "completed"
            assert await dest_memory_digest(dst_uri, "vm1", run_dir, ram.size) == ram.sha256


async def test_set_speed_during_a_run_changes_the_rate_and_jobinfo_moves(
    run_dir: str, random_ram: Callable[[int], RandomRam]
) -> None:
    ram = random_ram(128 * MiB)
    with trio.fail_after(120):
        async with unix_pair(run_dir) as (src_uri, dst_uri, _src, _dst), connect(src_uri) as client:
            await client.define(definition("vm1", ram, 192))
            await client.start("vm1")
            async def migrate() -> None:
                with pytest.raises(DaemonError, match="aborted by the client"):
                    await client.migrate("vm1", dst_uri, live=True, p2p=True, tunnelled=True, bandwidth_mib=4)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(migrate)

                async def sample(seconds: float) -> tuple[dict[str, Any], dict[str, Any]]:
                    first = await client.jobinfo("vm1")
                    await trio.sleep(seconds)
                    return first, await client.jobinfo("vm1")

                while (await client.jobinfo("vm1")).get("status") != "active":
                    await trio.sleep(0.05)
                await trio.sleep(0.3)
                a, b = await sample(1.0)
                # jobinfo figures move
                assert b["time_elapsed_ms"] > a["time_elapsed_ms"]
                assert b["data_processed"] > a["data_processed"] > 0
                assert b["data_total"] >= ram.size and b["data_remaining"] < a["data_remaining"]
                assert b["iteration"] >= 1 and b["bandwidth_limit_bytes_per_s"] == 4 * 1024 * 1024

                # The cap holds: counted against the daemon's own clock, never more
                # than the cap allows plus a burst.  (A bound a busy machine cannot
                # break; the cap's timing is tested in virtual time in test_transport.)
                _assert_capped(a, b, 4 * MiB)

                await client.set_speed("vm1", 64)
                params = await client.monitor("vm1", {"execute": "query-migrate-parameters"})
                assert params["return"]["max-bandwidth"] == 64 * MiB
                await trio.sleep(0.3)
                c, d = await sample(1.0)
                assert d["bandwidth_limit_bytes_per_s"] == 64 * 1024 * 1024
                assert d["data_processed"] > c["data_processed"]
                _assert_capped(c, d, 64 * MiB)
                await client.abort("vm1")


def _assert_capped(first: dict[str, Any], then: dict[str, Any], rate: int) -> None:
    """Between two jobinfo samples, no more data moved than *rate* allows over the
    time the daemon reports, plus slack: 0.2 s of rate (QEMU enforces its cap per
    100 ms window, and the daemon reads QEMU's counter and its own clock at
    slightly different moments) and 8 MiB (socket buffers and frames in flight).
    An uncapped migration moves hundreds of MB/s here, far above either bound."""
    seconds = (then["time_elapsed_ms"] - first["time_elapsed_ms"]) / 1000
    moved = then["data_processed"] - first["data_processed"]
    assert moved <= rate * (seconds + 0.2) + 8 * MiB, (moved, seconds, rate)


async def test_daemon_errors_are_one_line_messages(run_dir: str, random_ram: Callable[[int], RandomRam]) -> None:
    certs = Certs(run_dir)
    with trio.fail_after(90):
        async with unix_pair(run_dir) as (src_uri, dst_uri, _src, _dst):  # noqa: SIM117 - the clients need the daemons' URIs
            async with connect(src_uri) as client, connect(dst_uri) as dclient:
                with pytest.raises(DaemonError, match="cannot perform tunnelled migration without using peer2peer flag"):
                    await client.migrate("vm1", dst_uri, tunnelled=True)
                with pytest.raises(DaemonError, match="domain 'nope' is not defined"):
                    await client.migrate("nope", dst_uri, p2p=True)
                await client.define(definition("vm1", None))
                with pytest.raises(DaemonError, match="domain 'vm1' is not running"):
                    await client.migrate("vm1", dst_uri, p2p=True, tunnelled=True)
                await client.start("vm1")
                with pytest.raises(DaemonError, match="already running"):
                    await client.start("vm1")
                with pytest.raises(DaemonError, match="bad URI"):
                    await client.migrate("vm1", "http://example", p2p=True, tunnelled=True)
                with pytest.raises(DaemonError, match="cannot connect to unix:///nonexistent.sock"):
                    await client.migrate("vm1", "unix:///nonexistent.sock", p2p=True, tunnelled=True)
                # name clash: the destination runs a guest of the same name
                await dclient.define(definition("vm1", None))
                await dclient.start("vm1")
                with pytest.raises(DaemonError, match="already exists and is active on the destination"):
                    await client.migrate("vm1", dst_uri, p2p=True, tunnelled=True)
                with pytest.raises(DaemonError, match="'-qmp' is added by the daemon|-qmp is added by the daemon"):
                    await client.define({"name": "x", "qemu": ["-qmp", "stdio"]})
                with pytest.raises(DaemonError, match="bad domain name"):
                    await client.define({"name": "../x", "qemu": []})
                with pytest.raises(DaemonError, match="is running; stop it first"):
                    await client.undefine("vm1")
                # after every refusal the source guest still runs where it was
                assert (await client.list())[0]["state"] == "running"
        # The destination refuses a peer that is not on its allow list.
        src_uri, dst_uri = f"tls://127.0.0.1:{free_port()}", f"tls://127.0.0.1:{free_port()}"
        operator = certs.files("operator")
        async with (
            running(Daemon(state_dir=f"{run_dir}/src2", listen=[src_uri], tls=certs.files("source"), allow_admin=["cn:operator"])),
            running(Daemon(state_dir=f"{run_dir}/dst2", listen=[dst_uri], tls=certs.files("destination"), allow=["cn:someone-else"])),
        ):
            async with connect(src_uri, tls=operator) as client:
                await client.define(definition("vm2", None))
                await client.start("vm2")
                with pytest.raises(DaemonError, match="PREPARE needs the peer role.*cn:source has no role"):
                    await client.migrate("vm2", dst_uri, p2p=True, tunnelled=True)
                assert (await client.list())[0]["state"] == "running"
            # A certificate from another CA does not get in at all.
            stranger = certs.files("stranger", ca=trustme.CA())
            with pytest.raises(DaemonError, match="TLS handshake|lost the connection|cannot connect"):
                async with connect(src_uri, tls=stranger) as client:
                    await client.list()


# ----------------------------------------------------------------------
# The daemon process and the CLI


def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tunnel", *args], capture_output=True, text=True, timeout=timeout, check=False)


def test_cli_flag_rules_and_bad_requests_exit_non_zero_with_one_line(run_dir: str) -> None:
    done = cli("--connect", f"unix://{run_dir}/none.sock", "migrate", "--tunnelled", "vm1", "unix:///x.sock")
    assert done.returncode == 1
    assert done.stderr.strip() == "error: cannot perform tunnelled migration without using peer2peer flag"
    done = cli("--connect", f"unix://{run_dir}/none.sock", "list")
    assert done.returncode == 1 and done.stderr.count("\n") == 1 and "cannot connect to" in done.stderr
    done = cli("--connect", "unix:relative.sock", "list")
    assert done.returncode == 1 and "bad URI" in done.stderr and done.stderr.count("\n") == 1
    with open(f"{run_dir}/bad.json", "w") as f:
        f.write("{not json")
    done = cli("--connect", f"unix://{run_dir}/none.sock", "define", f"{run_dir}/bad.json")
    assert done.returncode == 1 and "is not valid JSON" in done.stderr
    assert cli("migrate").returncode == 2  # usage error from argparse
    assert "tunnelled" in cli("migrate", "--help").stdout


async def test_daemon_process_guests_outlive_sigterm_and_sigkill_and_are_reattached(run_dir: str) -> None:
    sock = f"{run_dir}/d.sock"
    args = ("--listen", f"unix://{sock}")
    with trio.fail_after(90):
        try:
            await _guests_outlive_their_daemon(run_dir, sock, args)
        finally:
            kill_guests(f"{run_dir}/state")  # whatever failed, no QEMU outlives the test


async def _guests_outlive_their_daemon(run_dir: str, sock: str, args: tuple[str, ...]) -> None:
    async with daemon_process(run_dir, "state", *args, kill_qemus=False) as daemon:
        assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600
        async with connect(f"unix://{sock}") as client:
            await client.define(definition("vm1", None))
            await client.start("vm1")
            qemu_pid = (await client.list())[0]["pid"]
        assert pid_alive(qemu_pid)
        assert await daemon.stop(signal.SIGTERM) == 0
    log = daemon.log()
    assert "SIGTERM: shutting down" in log and f"left vm1 running (pid {qemu_pid})" in log
    assert pid_alive(qemu_pid)  # the guest outlived the daemon
    assert not os.path.exists(sock)  # no leftover socket
    # A new daemon on the same state directory finds it, with the same pid, and drives it.
    async with daemon_process(run_dir, "state", *args, kill_qemus=False) as daemon:
        async with connect(f"unix://{sock}") as client:
            rows = await client.list()
            assert (rows[0]["name"], rows[0]["state"], rows[0]["pid"]) == ("vm1", "running", qemu_pid)
            assert (await client.monitor("vm1", {"execute": "query-status"}))["return"]["status"] == "running"
        assert await daemon.stop(signal.SIGKILL) != 0
    assert pid_alive(qemu_pid)  # SIGKILL of the daemon does not touch it either
    # --shutdown-guests-on-exit: the old behaviour, for those who want it.
    async with daemon_process(run_dir, "state", *args, "--shutdown-guests-on-exit", kill_qemus=False) as daemon:
        async with connect(f"unix://{sock}") as client:
            assert (await client.list())[0]["pid"] == qemu_pid
        assert await daemon.stop(signal.SIGTERM) == 0
    assert not pid_alive(qemu_pid)
    assert "stopped vm1 (daemon shutting down)" in daemon.log()
    assert os.listdir(f"{run_dir}/state/run") == ["vm1.log"]  # no socket, pidfile or record left; the log kept
    assert os.path.exists(f"{run_dir}/state/domains/vm1.json")  # the definition survives the daemon


def test_plain_tcp_needs_insecure_and_says_so(run_dir: str) -> None:
    with pytest.raises(DaemonError, match="--insecure"):
        Daemon(state_dir=f"{run_dir}/s", listen=["tcp://127.0.0.1:1"])
    with pytest.raises(DaemonError, match="TLS needs"):
        Daemon(state_dir=f"{run_dir}/s", listen=["tls://127.0.0.1:1"])
    with pytest.raises(DaemonError, match="cannot make an admin"):
        Daemon(state_dir=f"{run_dir}/s", listen=["tcp://127.0.0.1:1"], insecure=True, allow_admin=["addr:127.0.0.1"])
    lines: list[str] = []

    async def main() -> None:
        port = free_port()
        daemon = Daemon(
            state_dir=f"{run_dir}/s", listen=[f"tcp://127.0.0.1:{port}"], insecure=True, allow_ro=["addr:127.0.0.1"], log=lines.append
        )
        async with running(daemon), connect(f"tcp://127.0.0.1:{port}") as client:
            assert await client.list() == []
            # an address on plain TCP can be granted read-only, never admin
            with pytest.raises(PermissionDenied, match="DEFINE needs the admin role"):
                await client.define({"name": "vm1", "qemu": []})

    trio.run(main)
    assert any("WARNING" in line and "without TLS" in line for line in lines)


def test_uri_parsing() -> None:
    assert str(parse_uri("unix:///run/x.sock")) == "unix:///run/x.sock"
    assert parse_uri("tls://[::1]:16514").host == "::1"
    for bad in ("unix://host/x", "unix:x.sock", "tls://host", "tcp://host:0", "ftp://h:1", "tls://h:99999", "tcp://h:1/path"):
        with pytest.raises(ValueError):
            parse_uri(bad)
