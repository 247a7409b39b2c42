"""A simulated guest whose memory image cannot be written (a full disk) pauses, as QEMU's vCPUs do with werror=stop.

Real: a small tmpfs (root only) holding a sparse image bigger than the
tmpfs, so the guest's writes into holes fill it.  Before, the write error
ended the guest's task, and in the daemon the daemon itself.
"""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
import tempfile
from collections.abc import Iterator

import pytest
import trio

from tunnel.endpoints import DirtyTracker, SimulatedGuest

PAGE = 4096
MiB = 1024 * 1024


@contextlib.contextmanager
def small_tmpfs(mib: int) -> Iterator[str]:
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    path = tempfile.mkdtemp(prefix="tunnel-full-")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={mib}m", "tmpfs", path], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        os.rmdir(path)
        pytest.skip(f"cannot mount a tmpfs: {done.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", path], capture_output=True, check=False)
        os.rmdir(path)


async def test_a_full_disk_pauses_the_guest_and_resume_retries() -> None:
    with small_tmpfs(1) as mount:
        image = os.path.join(mount, "guest.img")
        with open(image, "wb") as f:
            f.truncate(64 * MiB)  # sparse: 16384 holes, room for about 256 of them
        errors: list[OSError] = []
        paused = trio.Event()

        def on_io_error(exc: OSError) -> None:
            errors.append(exc)
            paused.set()

        guest = SimulatedGuest(image, DirtyTracker(64 * MiB // PAGE), pages_per_second=200_000, seed=1)
        guest.on_io_error = on_io_error
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                await nursery.start(guest.run)
                await paused.wait()
                assert guest.io_error is not None
                assert guest.paused
                assert errors and errors[0].errno == errno.ENOSPC
                written = guest.pages_dirtied
                await trio.sleep(0.1)
                assert guest.pages_dirtied == written  # paused: no writes, no new errors
                assert len(errors) == 1
                # Room again: resume() clears the error and the guest dirties pages again.
                os.truncate(image, 0)
                guest.resume()
                assert guest.io_error is None
                while guest.pages_dirtied < written + 10:
                    await trio.sleep(0.01)
                guest.stop()
