"""Post-copy from the CLI: ``migrate --postcopy --timeout N --timeout-postcopy``, and job info on both sides.

Two daemon processes on unix sockets, the CLI as a process, and the
self-checking guest rewriting pages flat out while pre-copy is capped, so
the migration can only complete through the switch that ``--timeout``
makes.  The destination's ``domjobinfo`` shows the phase while it runs and
QEMU's blocktime once it completed; the guest must go on there without a
CORRUPT line.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import trio
from daemon_proc import daemon_process
from dirtyguest import GUEST_LOG, dirty_kernel, guest_args, guest_mib, requires_toolchain, wait_progress
from qemu_fixtures import base_args, requires_qemu, run_dir

from tunnel.client import Client, connect

__all__ = ["dirty_kernel", "run_dir"]  # fixtures, imported for pytest

pytestmark = [requires_qemu, requires_toolchain]
MiB = 1024 * 1024
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WS_MIB = 48


async def tunnel(*args: str, check: bool = True) -> subprocess.CompletedProcess[bytes]:
    done = await trio.run_process([sys.executable, "-m", "tunnel", *args], capture_stdout=True, capture_stderr=True, check=False,
                                  env={**os.environ, "PYTHONPATH": ROOT})
    if check:
        assert done.returncode == 0, done.stderr.decode()
    return done


def one_line_error(done: subprocess.CompletedProcess[bytes], needle: str) -> None:
    err = done.stderr.decode()
    assert done.returncode == 1 and err.count("\n") == 1 and needle in err and "Traceback" not in err, err


async def wait_info(client: Client, **want: Any) -> dict[str, Any]:
    """Poll the job info of ``vm`` until every key in *want* has its value (bounded by the test's fail_after)."""
    while True:
        info = await client.jobinfo("vm")
        if all(info.get(k) == v for k, v in want.items()):
            return info
        assert info["status"] not in ("failed", "cancelled"), info
        await trio.sleep(0.02)


async def test_timeout_postcopy_switches_and_jobinfo_shows_phase_and_blocktime(run_dir: str, dirty_kernel: str) -> None:
    src, dst = f"{run_dir}/src.sock", f"{run_dir}/dst.sock"
    c, d = ("--connect", f"unix://{src}"), ("--connect", f"unix://{dst}")
    allow = ("--allow-path", os.path.dirname(dirty_kernel))
    with trio.fail_after(150):
        async with (
            daemon_process(run_dir, "src", "--listen", f"unix://{src}", *allow),
            daemon_process(run_dir, "dst", "--listen", f"unix://{dst}", *allow),
            connect(f"unix://{src}") as client,
            connect(f"unix://{dst}") as dest,
        ):
            await client.define({"name": "vm", "qemu": base_args(guest_mib(WS_MIB)) + guest_args(dirty_kernel, mib=WS_MIB)})
            await client.start("vm")
            await wait_progress(os.path.join(run_dir, "src", "run", "vm", GUEST_LOG), lines=1)
            migrate = ("migrate", "--live", "--p2p", "--tunnelled", "--bandwidth", "16")
            one_line_error(await tunnel(*c, *migrate, "--postcopy", "--timeout-postcopy", "vm", f"unix://{dst}", check=False),
                           "--timeout-postcopy needs --timeout")
            one_line_error(await tunnel(*c, *migrate, "--timeout", "2", "--timeout-postcopy", "vm", f"unix://{dst}", check=False),
                           "--timeout-postcopy needs --postcopy")
            done: list[subprocess.CompletedProcess[bytes]] = []
            seen: dict[str, Any] = {}
            async with trio.open_nursery() as nursery:

                async def run() -> None:
                    done.append(await tunnel(*c, *migrate, "--postcopy", "--postcopy-bandwidth", "16", "--timeout", "2",
                                             "--timeout-postcopy", "vm", f"unix://{dst}"))

                nursery.start_soon(run)
                seen["src_pre"] = await wait_info(client, status="active", phase="pre-copy")
                seen["dst_pre"] = await wait_info(dest, status="active", phase="pre-copy")
                seen["src_post"] = await wait_info(client, phase="post-copy")
                seen["dst_post"] = await wait_info(dest, phase="post-copy")
            out = done[0].stdout.decode()
            assert "completed" in out and "switched to post-copy after --timeout 2 s" in out, out
            assert seen["src_pre"]["timeout_postcopy"] is False and seen["dst_pre"]["operation"] == "incoming"
            assert seen["src_post"]["timeout_postcopy"] is True
            assert seen["dst_post"]["status"] in ("active", "completed")
            # the destination: the phase, and QEMU's blocktime now that it completed
            info = await dest.jobinfo("vm")
            assert (info["status"], info["phase"]) == ("completed", "post-copy"), info
            assert info["postcopy_blocktime_ms"] >= 0 and len(info["postcopy_vcpu_blocktime_ms"]) == 1
            text = (await tunnel(*d, "domjobinfo", "vm")).stdout.decode()
            assert "Operation:              incoming migration" in text and "Phase:                  post-copy" in text, text
            assert f"Blocktime:              {info['postcopy_blocktime_ms']} ms" in text, text
            assert "Requested pages on:     their own stream (postcopy-preempt)\n" in text, text
            as_json = json.loads((await tunnel(*d, "domjobinfo", "--completed", "--json", "vm")).stdout)
            assert as_json["postcopy_blocktime_ms"] == info["postcopy_blocktime_ms"]
            text = (await tunnel(*c, "domjobinfo", "--completed", "vm")).stdout.decode()
            assert "Phase:                  post-copy" in text and "Post-copy by timeout:   yes" in text, text
            assert "Destination blocktime:  " in text
            assert "Requested pages on:     their own stream (postcopy-preempt), " in text, text
            # the guest goes on at the destination and never saw a wrong page
            report = await wait_progress(os.path.join(run_dir, "dst", "run", "vm", GUEST_LOG), lines=3)
            assert report.progress[-1][2] > report.progress[0][2]
            assert (await dest.list())[0]["state"] == "running"
            await dest.destroy("vm")
