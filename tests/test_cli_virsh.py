"""The CLI as a virsh user runs it: virsh's command names, run-state commands, migrate flags, job info.

Two daemon processes on unix sockets, the CLI as a process, real QEMU
guests (TCG, no OS: ACPI power-down is never answered, which is what
``shutdown --timeout`` is for) and memory-image guests.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import trio
from daemon_proc import daemon_process
from qemu_fixtures import RandomRam, base_args, loader_args, random_ram, requires_qemu, run_dir

from tunnel.client import connect
from tunnel.daemon._jobstats import JOB_KEYS

__all__ = ["random_ram", "run_dir"]  # fixtures, imported for pytest

MiB = 1024 * 1024
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


async def tunnel(*args: str, check: bool = True) -> subprocess.CompletedProcess[bytes]:
    done = await trio.run_process([sys.executable, "-m", "tunnel", *args], capture_stdout=True, capture_stderr=True, check=False,
                                  env={**os.environ, "PYTHONPATH": ROOT})
    if check:
        assert done.returncode == 0, done.stderr.decode()
    return done


async def wait_for(predicate: Callable[[], Awaitable[bool]], timeout: float = 30) -> None:
    with trio.fail_after(timeout):
        while not await predicate():
            await trio.sleep(0.05)


def one_line_error(done: subprocess.CompletedProcess[bytes], needle: str) -> None:
    err = done.stderr.decode()
    assert done.returncode == 1 and err.count("\n") == 1 and needle in err and "Traceback" not in err, err


@requires_qemu
async def test_virsh_commands_on_a_qemu_guest(run_dir: str) -> None:
    sock = f"{run_dir}/d.sock"
    c = ("--connect", f"unix://{sock}")
    await trio.Path(f"{run_dir}/vm1.json").write_text(json.dumps({"name": "vm1", "qemu": base_args(64), "description": "a test guest"}))
    await trio.Path(f"{run_dir}/off.json").write_text(json.dumps({"name": "off", "image": {"size_mib": 16, "random_mib": 1}}))
    with trio.fail_after(90):
        async with daemon_process(run_dir, "d", "--listen", f"unix://{sock}"):
            await tunnel(*c, "define", f"{run_dir}/vm1.json")
            await tunnel(*c, "define", f"{run_dir}/off.json")
            await tunnel(*c, "start", "vm1")
            # list: running only; --all; --inactive

            def names(done: subprocess.CompletedProcess[bytes]) -> list[str]:
                return [row["name"] for row in json.loads(done.stdout)]

            assert names(await tunnel(*c, "list", "--json")) == ["vm1"]
            assert names(await tunnel(*c, "list", "--all", "--json")) == ["off", "vm1"]
            assert names(await tunnel(*c, "list", "--inactive", "--json")) == ["off"]
            assert (await tunnel(*c, "domstate", "vm1")).stdout == b"running\n"
            await tunnel(*c, "suspend", "vm1")
            assert (await tunnel(*c, "domstate", "vm1")).stdout == b"paused\n"
            reply = json.loads((await tunnel(*c, "qemu-monitor-command", "vm1", '{"execute": "query-status"}')).stdout)
            assert reply["return"]["status"] == "paused"
            await tunnel(*c, "resume", "vm1")
            assert (await tunnel(*c, "domstate", "vm1")).stdout == b"running\n"
            info = (await tunnel(*c, "dominfo", "vm1")).stdout.decode()
            assert "QEMU guest" in info and "64.0 MiB" in info and "a test guest" in info
            assert json.loads((await tunnel(*c, "dumpdef", "vm1")).stdout)["qemu"] == base_args(64)
            await tunnel(*c, "reboot", "vm1")
            assert (await tunnel(*c, "domjobinfo", "vm1")).stdout.decode().split() == ["Job", "status:", "none"]
            assert (await tunnel(*c, "migrate-getspeed", "vm1")).stdout == b"0\n"
            one_line_error(await tunnel(*c, "reboot", "off", check=False), "is not running")
            # no OS answers the ACPI button: destroyed after the timeout
            done = await tunnel(*c, "shutdown", "--timeout", "1", "vm1")
            assert b"did not power down within 1 s: destroyed" in done.stdout
            assert (await tunnel(*c, "domstate", "vm1")).stdout == b"shut off\n"
            assert (await tunnel(*c, "--version")).stdout.startswith(b"tunnel ")


@requires_qemu
async def test_migrate_flags_with_a_real_guest(run_dir: str, random_ram: Callable[[int], RandomRam]) -> None:
    """--timeout suspends the guest mid-transfer, --auto-converge and --compressed set QEMU's capabilities,
    --verbose prints progress without a terminal; job info on both sides, then kept with --completed."""
    ram = random_ram(32 * MiB)
    src, dst = f"{run_dir}/src.sock", f"{run_dir}/dst.sock"
    allow = ("--allow-path", os.path.dirname(ram.path))
    c = ("--connect", f"unix://{src}")
    with trio.fail_after(150):
        async with (
            daemon_process(run_dir, "src", "--listen", f"unix://{src}", *allow),
            daemon_process(run_dir, "dst", "--listen", f"unix://{dst}", *allow),
        ):
            async with connect(f"unix://{src}") as client, connect(f"unix://{dst}") as dest:
                await client.define({"name": "vm1", "qemu": base_args() + loader_args(ram)})
                await client.start("vm1")
                one_line_error(await tunnel(*c, "migrate", "--p2p", "--tunnelled", "--timeout", "1", "--timeout-postcopy", "vm1",
                                            f"unix://{dst}", check=False), "--timeout-postcopy needs --postcopy")
                one_line_error(await tunnel(*c, "migrate", "--p2p", "--tunnelled", "--compressed", "--comp-methods", "zstd", "vm1",
                                            f"unix://{dst}", check=False), "zstd is for memory-image guests")
                done: list[subprocess.CompletedProcess[bytes]] = []
                seen: dict[str, Any] = {}
                async with trio.open_nursery() as nursery:

                    async def run() -> None:
                        done.append(await tunnel(*c, "migrate", "--live", "--p2p", "--tunnelled", "--bandwidth", "8", "--timeout", "1",
                                                 "--auto-converge", "--compressed", "--verbose", "vm1", f"unix://{dst}"))

                    nursery.start_soon(run)

                    async def suspended() -> bool:
                        info = await client.jobinfo("vm1")
                        return info["status"] == "active" and info["timeout_suspended"] is True

                    await wait_for(suspended)
                    status = await client.monitor("vm1", {"execute": "query-status"})
                    seen["running"] = status["return"]["running"]
                    caps = await client.monitor("vm1", {"execute": "query-migrate-capabilities"})
                    seen["caps"] = {c["capability"]: c["state"] for c in caps["return"]}
                    seen["incoming"] = await dest.jobinfo("vm1")
                    seen["speed"] = (await tunnel(*c, "migrate-getspeed", "vm1")).stdout
                    one_line_error(await tunnel(*c, "resume", "vm1", check=False), "is migrating")
                assert seen["running"] is False  # --timeout suspended it mid-transfer
                assert seen["caps"]["auto-converge"] is True and seen["caps"]["xbzrle"] is True
                assert seen["incoming"]["operation"] == "incoming" and seen["incoming"]["status"] == "active"
                assert seen["incoming"]["source"] == f"uid:{os.getuid()}" and seen["incoming"]["tunnel_bytes_received"] > 0
                assert seen["speed"] == b"8\n"
                out, err = done[0].stdout.decode(), done[0].stderr.decode()
                assert "completed" in out and "guest suspended after --timeout 1 s" in out
                assert "Migration: [" in err  # --verbose without a terminal
                # the guest was running when the migration began: it runs on the destination
                assert (await dest.list())[0]["state"] == "running"
                completed = await client.jobinfo("vm1", completed=True)
                assert completed["status"] == "completed" and completed["operation"] == "outgoing"
                assert completed["compression"] == ["xbzrle"] and completed["auto_converge"] is True
                assert completed["timeout_suspended"] is True
                assert completed["memory_processed"] >= 32 * MiB and completed["page_size"] == 4096
                assert completed["downtime_ms"] is not None and completed["setup_time_ms"] is not None
                assert list(completed)[: len(JOB_KEYS)] == list(JOB_KEYS)
                incoming = await dest.jobinfo("vm1", completed=True)
                assert incoming["operation"] == "incoming" and incoming["status"] == "completed"
                assert list(incoming) == list(JOB_KEYS)
                await dest.destroy("vm1")


async def test_image_guest_job_info_has_the_same_keys_and_zstd(run_dir: str) -> None:
    src, dst = f"{run_dir}/src.sock", f"{run_dir}/dst.sock"
    with trio.fail_after(90):
        async with (
            daemon_process(run_dir, "src", "--listen", f"unix://{src}"),
            daemon_process(run_dir, "dst", "--listen", f"unix://{dst}"),
        ):
            async with connect(f"unix://{src}") as client:
                await client.define({"name": "img", "image": {"size_mib": 32, "random_mib": 4, "dirty_pages_per_s": 500}})
                await client.start("img")
                one_line_error(await tunnel("--connect", f"unix://{src}", "migrate", "--p2p", "--tunnelled", "--auto-converge", "img",
                                            f"unix://{dst}", check=False), "applies to QEMU guests only")
                done = await tunnel("--connect", f"unix://{src}", "migrate", "--live", "--p2p", "--tunnelled", "--compressed",
                                    "--json", "img", f"unix://{dst}")
                result = json.loads(done.stdout)
                assert result["status"] == "completed" and result["compression"] == ["zstd"]
                assert set(JOB_KEYS) <= set(result) and result["compression_saved_bytes"] is not None
                assert result["rate_bytes_per_s"] and result["constant_pages"] > 0 and result["page_size"] == 4096
                text = (await tunnel("--connect", f"unix://{src}", "jobinfo", "--completed", "img")).stdout.decode()
                assert "Compression:            zstd" in text and "Operation:              outgoing migration" in text
            async with connect(f"unix://{dst}") as dest:
                info = await dest.jobinfo("img")
                assert info["operation"] == "incoming" and info["status"] == "completed" and info["data_processed"] > 0
                assert list(info) == list(JOB_KEYS)
