"""Reusable pieces for tests that run real QEMU guests.

Import what you need into a test module (pytest finds fixtures by name in
the module's namespace)::

    from qemu_fixtures import requires_qemu, run_dir, random_ram, base_args, loader_args, assert_same_memory

* ``requires_qemu``: skip marker with the reason when no QEMU binary is found.
* ``run_dir``: a short private directory for QMP sockets (unix socket paths
  are limited to 107 bytes, pytest's ``tmp_path`` can be longer).
* ``random_ram``: a factory ``random_ram(size) -> RandomRam`` of random files
  to load into a source guest's RAM, cached per session.
* :func:`base_args` / :func:`loader_args`: the command line both sides share,
  and the loader device only the source gets (an incoming QEMU does not load
  it, so equal memory afterwards proves the bytes came through the stream).
* :func:`memory_digest` / :func:`assert_same_memory`: ``pmemsave`` and compare.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
import trio

from tunnel.qemu import QMPClient, qemu_binary

__all__ = [
    "GUEST_MIB",
    "RANDOM_ADDR",
    "RandomRam",
    "assert_same_memory",
    "base_args",
    "file_digest",
    "loader_args",
    "memory_digest",
    "random_ram",
    "requires_qemu",
    "run_dir",
]

#: Guest RAM of the small test guests.
GUEST_MIB = 128
#: Where the loader puts the random bytes (16 MiB, clear of firmware and low memory).
RANDOM_ADDR = 0x1000000

requires_qemu = pytest.mark.skipif(
    qemu_binary() is None,
    reason="qemu-system-x86_64 not found: install Debian's qemu-system-x86 (the test run does so when root) or set TUNNEL_QEMU",
)


@dataclass(frozen=True, slots=True, kw_only=True)
class RandomRam:
    path: str
    size: int
    sha256: str


def base_args(mem_mib: int = GUEST_MIB, *extra: str) -> list[str]:
    """The command line shared by source and destination (TCG, no devices, no display)."""
    return ["-machine", "q35", "-accel", "tcg", "-m", str(mem_mib), "-nodefaults", "-display", "none", *extra]


def loader_args(ram: RandomRam, addr: int = RANDOM_ADDR) -> list[str]:
    """The source-only device that copies *ram* into guest memory at *addr*."""
    return ["-device", f"loader,file={ram.path},addr={addr:#x},force-raw=on"]


def file_digest(path: str, offset: int = 0, size: int | None = None) -> str:
    """sha256 of *size* bytes of *path* from *offset*, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(offset)
        left = size if size is not None else os.fstat(f.fileno()).st_size - offset
        buf = bytearray(1 << 20)
        view = memoryview(buf)
        while left > 0:
            n = f.readinto(view[: min(left, len(buf))])
            if not n:
                raise AssertionError(f"{path} is shorter than expected")
            digest.update(view[:n])
            left -= n
    return digest.hexdigest()


async def memory_digest(qmp: QMPClient, directory: str, *, addr: int = 0, size: int = GUEST_MIB << 20) -> str:
    """sha256 of guest-physical memory [addr, addr+size) via ``pmemsave`` into a file in *directory*."""
    fd, path = tempfile.mkstemp(dir=directory, suffix=".mem")
    os.close(fd)
    try:
        await qmp.execute("pmemsave", {"val": addr, "size": size, "filename": path})
        assert os.path.getsize(path) == size
        return await trio.to_thread.run_sync(file_digest, path)
    finally:
        os.unlink(path)


async def assert_same_memory(
    a: QMPClient, b: QMPClient, directory: str, *, addr: int = 0, size: int = GUEST_MIB << 20, expected: str | None = None
) -> None:
    """Both guests hold the same bytes in [addr, addr+size) (and *expected*'s sha256 when given)."""
    digest_a = await memory_digest(a, directory, addr=addr, size=size)
    digest_b = await memory_digest(b, directory, addr=addr, size=size)
    assert digest_a == digest_b, f"guest memory differs in [{addr:#x}, {addr + size:#x})"
    if expected is not None:
        assert digest_a == expected, f"guest memory in [{addr:#x}, {addr + size:#x}) is not the loaded file"


@pytest.fixture
def run_dir() -> Iterator[str]:
    path = tempfile.mkdtemp(prefix="tq-", dir="/tmp")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def random_ram(tmp_path_factory: pytest.TempPathFactory) -> Callable[[int], RandomRam]:
    cache: dict[int, RandomRam] = {}

    def make(size: int = 64 << 20) -> RandomRam:
        if size not in cache:
            path = str(tmp_path_factory.mktemp("ram") / f"random-{size}.bin")
            digest = hashlib.sha256()
            with open(path, "wb") as f:
                for _ in range(0, size, 1 << 20):
                    chunk = os.urandom(min(1 << 20, size - f.tell()))
                    digest.update(chunk)
                    f.write(chunk)
            cache[size] = RandomRam(path=path, size=size, sha256=digest.hexdigest())
        return cache[size]

    return make
