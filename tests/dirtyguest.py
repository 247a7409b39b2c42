"""The self-checking guest (``tests/guest/dirtyguest.S``): build it, run it, read its reports.

A 32-bit multiboot kernel, loaded with ``-kernel``, that fills a working set
with a pattern derived from each page's address and generation, rewrites
pages at a chosen rate and verifies pages as it goes (the header of the
assembly source has the details).  It reports on port 0xe9, which
``-debugcon file:guest.log`` writes to a file in QEMU's working directory
(the guest directory, so source and destination each have their own)::

    kernel = build_kernel(directory)             # as + ld, once per directory
    args = base_args(guest_mib(64)) + guest_args(kernel, mib=64, rate=2000)
    report = read_report(os.path.join(guest_dir, GUEST_LOG))
    assert report.ok and report.progress

In tests, the session fixture ``dirty_kernel`` builds it once; import it into
the test module with the other fixtures.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field

import pytest
import trio

__all__ = [
    "GEN_ADDR",
    "GUEST_LOG",
    "WS_ADDR",
    "GuestReport",
    "build_kernel",
    "dirty_kernel",
    "expected_static_sha256",
    "guest_args",
    "guest_mib",
    "read_report",
    "requires_toolchain",
    "wait_progress",
]

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "guest", "dirtyguest.S")
#: Guest-physical address of the working set, and of the generation table (4 bytes per page).
WS_ADDR = 0x1000000
GEN_ADDR = 0x400000
#: The debugcon file, relative to QEMU's working directory (its guest directory).
GUEST_LOG = "guest.log"
GOLDEN = 0x9E3779B1

requires_toolchain = pytest.mark.skipif(
    shutil.which("as") is None or shutil.which("ld") is None, reason="the self-checking guest needs binutils (as, ld)"
)


def build_kernel(directory: str) -> str:
    """Assemble and link the guest into *directory* (once: an up-to-date ELF is reused); return its path."""
    elf = os.path.join(directory, "dirtyguest.elf")
    if os.path.exists(elf) and os.path.getmtime(elf) >= os.path.getmtime(SOURCE):
        return elf
    obj = os.path.join(directory, "dirtyguest.o")
    subprocess.run(["as", "--32", "-o", obj, SOURCE], check=True, capture_output=True)
    tmp = elf + ".tmp"
    subprocess.run(["ld", "-m", "elf_i386", "-n", "-Ttext=0x100000", "-e", "_start", "--no-warn-rwx-segments", "-o", tmp, obj],
                   check=True, capture_output=True)
    os.replace(tmp, elf)
    os.chmod(elf, 0o644)  # a QEMU run as another user reads it
    return elf


def guest_mib(ws_mib: int) -> int:
    """Guest RAM for a working set of *ws_mib*: 16 MiB below it, a little above."""
    return ws_mib + 32


def guest_args(kernel: str, *, mib: int, rate: int = 0, write: bool = True, log: str = GUEST_LOG) -> list[str]:
    """The guest's options: kernel, parameters, report file.  Both sides of a migration get the same."""
    return ["-kernel", kernel, "-append", f"mib={mib} rate={rate} write={int(write)}", "-debugcon", f"file:{log}"]


@dataclass
class GuestReport:
    """What the guest wrote so far."""

    started: bool = False
    ready: bool = False
    #: (sweeps, rewrites, verified pages, corrupt pages) per PROGRESS line.
    progress: list[tuple[int, int, int, int]] = field(default_factory=list)
    #: (address, expected, found) per CORRUPT line.
    corrupt: list[tuple[int, int, int]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """No mismatch seen, reported or counted, and no error."""
        return not self.corrupt and not self.errors and all(p[3] == 0 for p in self.progress)


_LINE = re.compile(r"(START|READY|PROGRESS|CORRUPT|ERROR)\b ?(.*)")


def read_report(path: str) -> GuestReport:
    report = GuestReport()
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            lines = f.read().split("\n")[:-1]  # the last, unterminated line may still be written
    except FileNotFoundError:
        return report
    for line in lines:
        m = _LINE.match(line)
        if m is None:
            continue
        kind, rest = m.groups()
        if kind == "START":
            report.started = True
        elif kind == "READY":
            report.ready = True
        elif kind == "PROGRESS":
            a, b, c, d = (int(x, 16) for x in rest.split())
            report.progress.append((a, b, c, d))
        elif kind == "CORRUPT":
            a, b, c = (int(x, 16) for x in rest.split())
            report.corrupt.append((a, b, c))
        else:
            report.errors.append(rest)
    return report


async def wait_progress(path: str, *, lines: int = 2, after: tuple[int, ...] | None = None, poll: float = 0.1) -> GuestReport:
    """Wait until *path* holds *lines* PROGRESS lines (beyond *after*'s rewrite/verify counts); bound it with fail_after."""
    while True:
        report = read_report(path)
        assert report.ok, f"the guest found corrupt memory: {report.corrupt[:4]} {report.errors}"
        fresh = [p for p in report.progress if after is None or p[2] > after[2]]
        if len(fresh) >= lines:
            return report
        await trio.sleep(poll)


def expected_static_sha256(mib: int) -> str:
    """sha256 of the working set after the fill (generation 1 everywhere), as ``write=0`` leaves it.

    Each dword is its address XOR GOLDEN; within a 64 KiB block the high
    half of the address is constant, so a block is built by slice assignment.
    """
    key = (1 * GOLDEN) & 0xFFFFFFFF
    lo = bytearray(2 * 16384)
    for i in range(16384):
        v = (4 * i) ^ (key & 0xFFFF)
        lo[2 * i] = v & 0xFF
        lo[2 * i + 1] = v >> 8
    block = bytearray(65536)
    block[0::4] = lo[0::2]
    block[1::4] = lo[1::2]
    digest = hashlib.sha256()
    for n in range(mib * 16):
        hi = ((WS_ADDR >> 16) + n) ^ (key >> 16)
        block[2::4] = bytes([hi & 0xFF]) * 16384
        block[3::4] = bytes([hi >> 8]) * 16384
        digest.update(block)
    return digest.hexdigest()


@pytest.fixture(scope="session")
def dirty_kernel(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The guest's ELF, built once per test session (under the temp directory, which test daemons allow)."""
    if shutil.which("as") is None or shutil.which("ld") is None:
        pytest.skip("the self-checking guest needs binutils (as, ld)")
    return build_kernel(str(tmp_path_factory.mktemp("dirtyguest")))
