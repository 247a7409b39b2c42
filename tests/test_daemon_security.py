"""Attacks on a running daemon process, over real sockets, as an outsider would try them.

Each test starts ``tunnel daemon`` as a process and attacks it over a unix
socket, TCP (``--insecure``) or mutual TLS.  Each asserts three things: the
attack was refused with a clear error, nothing ran on the host (a marker file
a hostile definition or QMP command would create does not exist), and the
daemon still answers its operator.
"""

from __future__ import annotations

import datetime
import json
import os
import ssl
import stat
import sys
from collections.abc import Callable
from typing import Any

import pytest
import trio
import trustme
from daemon_proc import Certs, daemon_process, free_port, qemu_pids_under
from qemu_fixtures import base_args, requires_qemu, run_dir

from tunnel import ErrorCode, RPCError
from tunnel.client import connect
from tunnel.control import encode
from tunnel.daemon import PROGRAM, DaemonError, PermissionDenied, Procedure, TLSFiles
from tunnel.transport import open_connection

__all__ = ["run_dir"]  # fixture, imported for pytest

pytestmark = requires_qemu


def hostile_definitions(marker: str) -> list[dict[str, Any]]:
    """Definitions that would run ``touch MARKER`` as the daemon's user if QEMU were started with them."""
    shell = f"/bin/sh -c 'touch {marker}'"
    return [
        {"name": "evil1", "qemu": [*base_args(), "-netdev", f"bridge,id=n0,br=br0,helper={shell}"]},
        {"name": "evil2", "qemu": [*base_args(), "-netdev", f"tap,id=n0,script={marker}.sh,downscript=no"]},
        {"name": "evil3", "qemu": [*base_args(), "-chardev", f"file,id=c0,path={marker}"]},
        {"name": "evil4", "qemu": [*base_args(), "-readconfig", "/etc/passwd"]},
    ]


def hostile_qmp(marker: str) -> list[dict[str, Any]]:
    return [
        {"execute": "migrate", "arguments": {"uri": f"exec:touch {marker}"}},
        {"execute": "human-monitor-command", "arguments": {"command-line": f"migrate exec:touch {marker}"}},
        {"execute": "pmemsave", "arguments": {"val": 0, "size": 4096, "filename": marker}},
    ]





async def every_admin_call_is_refused(uri: str, tls: TLSFiles | None, marker: str) -> None:
    async with connect(uri, tls=tls) as client:
        for definition in hostile_definitions(marker):
            with pytest.raises(PermissionDenied, match="DEFINE needs the admin role"):
                await client.define(definition)
        for call in (client.start, client.destroy, client.undefine):
            with pytest.raises(PermissionDenied, match="needs the admin role"):
                await call("vm1")
        for command in hostile_qmp(marker):
            with pytest.raises(PermissionDenied, match="MONITOR needs the admin role"):
                await client.monitor("vm1", command)
        with pytest.raises(PermissionDenied, match="MIGRATE needs the admin role"):
            await client.migrate("vm1", "unix:///tmp/x.sock", p2p=True, tunnelled=True)
    assert not os.path.exists(marker)


async def test_tls_clients_without_the_admin_role_run_nothing(run_dir: str) -> None:
    certs = Certs(run_dir)
    port = free_port()
    uri = f"tls://127.0.0.1:{port}"
    marker = f"{run_dir}/PWNED"
    operator = certs.files("operator")
    with trio.fail_after(90):
        async with daemon_process(
            run_dir, "d", "--listen", uri, *certs.daemon_args("daemon"),
            "--allow-admin", "cn:operator", "--allow-peer", "cn:source", "--allow-ro", "cn:monitoring",
            ports=[port],
        ) as daemon:
            async with connect(uri, tls=operator) as client:
                await client.define({"name": "vm1", "qemu": base_args()})
                await client.start("vm1")
            # Signed by the CA, but on no allow list; a peer; a read-only client.
            rss_before = daemon.rss_kib()
            for name in ("mallory", "source", "monitoring"):
                for _ in range(3):
                    await every_admin_call_is_refused(uri, certs.files(name), marker)
            assert daemon.rss_kib() - rss_before < 16 * 1024  # refusals cost nothing that stays
            async with connect(uri, tls=certs.files("monitoring")) as client:
                assert [d["name"] for d in await client.list()] == ["vm1"]
                await client.jobinfo("vm1")
            async with connect(uri, tls=certs.files("mallory")) as client:
                with pytest.raises(PermissionDenied, match="LIST needs the read-only role"):
                    await client.list()
            # Certificates that do not even get a connection: another CA, expired, none.
            stranger = certs.files("stranger", ca=trustme.CA())
            expired = certs.files("expired", not_after=datetime.datetime(2020, 1, 1, tzinfo=datetime.UTC))
            for tls in (stranger, expired):
                with pytest.raises(DaemonError, match="TLS handshake|lost the connection"):
                    async with connect(uri, tls=tls) as client:
                        await client.list()
            # A TLS client without a certificate fails the handshake.
            bare = trio.SSLStream(
                await trio.open_tcp_stream("127.0.0.1", port), ssl.create_default_context(cafile=certs.ca_path), server_hostname="127.0.0.1"
            )
            with pytest.raises((trio.BrokenResourceError, ssl.SSLError)):
                await bare.do_handshake()
                await bare.send_all(b"TUNL")
                await bare.receive_some(10)
            await trio.aclose_forcefully(bare)
            # The operator still drives the daemon; the refusals were logged with who and what.
            async with connect(uri, tls=operator) as client:
                assert (await client.list())[0]["state"] == "running"
                await client.destroy("vm1")
            log = daemon.log()
            assert "refused DEFINE from cn:mallory (no role): needs admin" in log
            assert "refused MONITOR from cn:source (peer): needs admin" in log
    assert not os.path.exists(marker)


async def test_hostile_definitions_and_qmp_are_refused_even_to_the_admin_and_to_peers(run_dir: str) -> None:
    sock = f"{run_dir}/d.sock"
    marker = f"{run_dir}/PWNED"
    with trio.fail_after(90):
        async with daemon_process(run_dir, "d", "--listen", f"unix://{sock}") as daemon:
            async with connect(f"unix://{sock}") as client:
                for definition in hostile_definitions(marker):
                    with pytest.raises(DaemonError, match="bad definition") as info:
                        await client.define(definition)
                    assert "\n" not in info.value.message
                await client.define({"name": "vm1", "qemu": base_args()})
                await client.start("vm1")
                for command in hostile_qmp(marker):
                    with pytest.raises(DaemonError, match="--allow-unsafe-monitor|run directory"):
                        await client.monitor("vm1", command)
                # what the monitor is for still works
                assert (await client.monitor("vm1", {"execute": "query-status"}))["return"]["status"] == "running"
                reply = await client.monitor("vm1", {"execute": "pmemsave", "arguments": {"val": 0, "size": 4096, "filename": "m.bin"}})
                assert "return" in reply and os.path.getsize(f"{daemon.state_dir}/run/vm1/m.bin") == 4096
            # A compromised source daemon sends a hostile definition in PREPARE: the same checks apply.
            stream = await trio.open_unix_socket(sock)
            async with open_connection(stream, client=True) as conn:
                for definition in hostile_definitions(marker):
                    request = {"definition": definition, "migration_id": os.urandom(16).hex(), "tunnelled": True}
                    with pytest.raises(RPCError, match="bad definition"):
                        await conn.call(PROGRAM, Procedure.PREPARE, encode(request))
                # A call of another version of the program gets a version error, not a guess.
                with pytest.raises(RPCError) as version_error:
                    await conn.call(PROGRAM, Procedure.LIST, encode({}), version=2)
                assert version_error.value.code == ErrorCode.UNKNOWN_PROCEDURE and "version 2" in version_error.value.message
            async with connect(f"unix://{sock}") as client:
                assert [d["name"] for d in await client.list()] == ["vm1"]
                # QEMU runs sandboxed: even a migration to exec: cannot spawn (the kernel kills QEMU instead).
                pid = (await client.list())[0]["pid"]
                with open(f"/proc/{pid}/status", encoding="ascii") as f:
                    assert "Seccomp:\t2" in f.read()
                await client.destroy("vm1")
    assert not os.path.exists(marker)


async def test_insecure_tcp_is_never_admin(run_dir: str) -> None:
    port = free_port()
    uri = f"tcp://127.0.0.1:{port}"
    marker = f"{run_dir}/PWNED"
    with trio.fail_after(60):
        async with daemon_process(
            run_dir, "d", "--listen", uri, "--listen", f"unix://{run_dir}/d.sock", "--insecure", "--allow-peer", "addr:127.0.0.1",
            ports=[port],
        ) as daemon:
            await every_admin_call_is_refused(uri, None, marker)
            async with connect(f"unix://{run_dir}/d.sock") as client:
                assert await client.list() == []
            assert "WARNING" in daemon.log()


def _as_user(uid: int, gid: int, fn: Callable[[], object]) -> str:
    """Run *fn* in a forked child with *uid*/*gid*; return what it printed or raised (one line)."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.close(read)
        try:
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
            result = f"ok {json.dumps(fn())}"
        except BaseException as exc:  # noqa: BLE001 - reported to the parent
            result = f"{type(exc).__name__}: {exc}"
        os.write(write, result.encode()[:60000])
        os._exit(0)
    os.close(write)
    chunks = []
    while chunk := os.read(read, 65536):
        chunks.append(chunk)
    os.close(read)
    os.waitpid(pid, 0)
    return b"".join(chunks).decode()


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to act as another uid")
async def test_unix_socket_mode_group_and_uid_roles(run_dir: str) -> None:
    nobody = 65534
    os.chmod(run_dir, 0o755)
    rw, ro = f"{run_dir}/rw.sock", f"{run_dir}/ro.sock"

    def call(uri: str, what: str) -> Callable[[], object]:
        async def main() -> object:
            async with connect(uri) as client:
                if what == "list":
                    return [d["name"] for d in await client.list()]
                return await client.define({"name": "evil", "qemu": base_args()})

        return lambda: trio.run(main)

    with trio.fail_after(60):
        async with daemon_process(
            run_dir, "d", "--listen", f"unix://{rw}", "--listen-ro", f"unix://{ro}",
            "--socket-mode", "660", "--socket-group", str(nobody), "--allow-ro", f"uid:{nobody}",
        ):
            assert stat.S_IMODE(os.stat(rw).st_mode) == 0o660 and os.stat(rw).st_gid == nobody
            assert stat.S_IMODE(os.stat(ro).st_mode) == 0o666
            # uid 65534 reaches the read-write socket through the group; SO_PEERCRED gives it read-only.
            assert await trio.to_thread.run_sync(_as_user, nobody, nobody, call(f"unix://{rw}", "list")) == "ok []"
            denied = await trio.to_thread.run_sync(_as_user, nobody, nobody, call(f"unix://{rw}", "define"))
            assert "DEFINE needs the admin role" in denied and "uid:65534 has read-only" in denied
            # The read-only socket grants read-only even to the daemon's own uid.
            async with connect(f"unix://{ro}") as client:
                assert await client.list() == []
                with pytest.raises(PermissionDenied):
                    await client.define({"name": "vm1", "qemu": base_args()})
            async with connect(f"unix://{rw}") as client:
                await client.define({"name": "vm1", "qemu": base_args()})


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to switch QEMU to another user")
async def test_qemu_user_runs_guests_unprivileged(run_dir: str) -> None:
    os.chmod(run_dir, 0o711)  # QEMU, as nobody, must reach its guest directory below it
    sock = f"{run_dir}/d.sock"
    with trio.fail_after(60):
        async with daemon_process(run_dir, "d", "--listen", f"unix://{sock}", "--qemu-user", "nobody"):
            async with connect(f"unix://{sock}") as client:
                await client.define({"name": "vm1", "qemu": base_args()})
                await client.start("vm1")
                pid = (await client.list())[0]["pid"]
                with open(f"/proc/{pid}/status", encoding="ascii") as f:
                    status = dict(line.split(":", 1) for line in f)
                assert status["Uid"].split() == ["65534"] * 4 and status["Seccomp"].strip() == "2"
                assert (await client.monitor("vm1", {"execute": "query-status"}))["return"]["status"] == "running"
                await client.destroy("vm1")


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to switch QEMU to another user")
async def test_postcopy_with_an_unprivileged_qemu(run_dir: str) -> None:
    """Post-copy needs userfaultfd in the destination QEMU: refused with what to change, or done (preempt sockets and all)."""
    os.chmod(run_dir, 0o711)
    with open("/proc/sys/vm/unprivileged_userfaultfd", encoding="ascii") as f:
        allowed = f.read().strip() == "1"
    src, dst = f"{run_dir}/src.sock", f"{run_dir}/dst.sock"
    with trio.fail_after(90):
        async with (
            daemon_process(run_dir, "src", "--listen", f"unix://{src}", "--qemu-user", "nobody"),
            daemon_process(run_dir, "dst", "--listen", f"unix://{dst}", "--qemu-user", "nobody"),
            connect(f"unix://{src}") as client,
        ):
            await client.define({"name": "vm1", "qemu": base_args()})
            await client.start("vm1")
            migrate = client.migrate("vm1", f"unix://{dst}", p2p=True, tunnelled=True, live=True, postcopy=True)
            if allowed:
                result = await migrate
                assert result["status"] == "completed" and result["postcopy_preempt"]
            else:
                with pytest.raises(DaemonError, match=r"cannot do post-copy: it needs userfaultfd.*vm\.unprivileged_userfaultfd=1"):
                    await migrate
                assert (await client.list())[0]["state"] == "running"


async def test_concurrent_starts_give_one_qemu(run_dir: str) -> None:
    sock = f"{run_dir}/d.sock"
    with trio.fail_after(90):
        async with daemon_process(run_dir, "d", "--listen", f"unix://{sock}") as daemon:
            async with connect(f"unix://{sock}") as client:
                await client.define({"name": "vm1", "qemu": base_args()})
            outcomes: list[str] = []

            async def start() -> None:
                async with connect(f"unix://{sock}") as c:
                    try:
                        outcomes.append(await c.start("vm1"))
                    except DaemonError as exc:
                        outcomes.append(exc.message)

            async with trio.open_nursery() as nursery:
                for _ in range(4):
                    nursery.start_soon(start)
            assert sorted(outcomes)[-1] == "running" and outcomes.count("running") == 1, outcomes
            assert all("already starting" in o or "already running" in o for o in outcomes if o != "running")
            assert len(qemu_pids_under(daemon.state_dir)) == 1
            async with connect(f"unix://{sock}") as client:
                await client.destroy("vm1")
            assert qemu_pids_under(daemon.state_dir) == []


async def test_errors_carry_no_daemon_paths_or_exception_names(run_dir: str) -> None:
    sock = f"{run_dir}/d.sock"
    with trio.fail_after(60):
        async with daemon_process(run_dir, "d", "--listen", f"unix://{sock}", "--max-image-mib", "64") as daemon:
            messages = []
            async with connect(f"unix://{sock}") as client:
                await client.define({"name": "bad", "qemu": [*base_args(), "-machine", "no-such-machine"]})
                for attempt in (
                    lambda: client.start("bad"),
                    lambda: client.define({"name": "big", "image": {"size_mib": 1 << 20}}),
                    lambda: client.monitor("nope", {"execute": "query-status"}),
                ):
                    with pytest.raises(DaemonError) as info:
                        await attempt()
                    messages.append(info.value.message)
            assert "unsupported machine type" in messages[0] or "no-such-machine" in messages[0], messages[0]
            assert "--max-image-mib" in messages[1]
            for message in messages:
                assert daemon.state_dir not in message and "Error:" not in message and "\n" not in message, message
            assert daemon.state_dir in daemon.log() or "cannot start bad" in daemon.log()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
