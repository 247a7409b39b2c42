"""Memory-image guests: the daemon's stand-in for QEMU where QEMU is not installed.

A definition with ``"image"`` instead of ``"qemu"``::

    {"name": "vm1", "image": {"size_mib": 256, "random_mib": 64, "dirty_pages_per_s": 500}}

describes a guest whose memory is a sparse image file
(``STATE_DIR/images/NAME.img``) of ``size_mib``, created on first start with
``random_mib`` of random bytes (default a quarter; the rest zero pages), and a
:class:`~tunnel.endpoints.SimulatedGuest` that dirties ``dirty_pages_per_s``
random pages while it runs.  It migrates (TUNNELLED only: there is no QEMU
to open a direct channel) with the memory-image reader doing pre-copy on the
source and the atomic image writer on the destination, which commits only
after the stream's digest matched.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import trio

from ..control import DaemonError
from ..endpoints import DirtyTracker, SimulatedGuest

__all__ = ["ImageGuest", "validate_image_spec"]

MiB = 1024 * 1024
PAGE = 4096
IMAGE_KEYS = {"size_mib": 256, "random_mib": 64, "dirty_pages_per_s": 0}


def validate_image_spec(spec: object) -> dict[str, int]:
    if not isinstance(spec, dict):
        raise DaemonError("bad definition: 'image' must be an object such as {\"size_mib\": 256, \"random_mib\": 64}")
    unknown = sorted(set(spec) - set(IMAGE_KEYS))
    if unknown:
        raise DaemonError(f"bad definition: unknown image keys {', '.join(unknown)} (known: {', '.join(IMAGE_KEYS)})")
    out: dict[str, int] = {}
    for key, default in IMAGE_KEYS.items():
        value = spec.get(key, default)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise DaemonError(f"bad definition: image {key} must be a whole number >= 0")
        out[key] = value
    if "random_mib" not in spec:
        out["random_mib"] = out["size_mib"] // 4
    if out["size_mib"] < 1 or out["random_mib"] > out["size_mib"]:
        raise DaemonError("bad definition: image size_mib must be >= 1 and random_mib <= size_mib")
    return out


def _create_image(path: str, size: int, random_size: int) -> None:
    tmp = path + ".creating"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.ftruncate(fd, size)
        # Random data spread over the image in 1 MiB pieces, so zero runs and data alternate.
        pieces = random_size // MiB
        stride = size // max(pieces, 1)
        for i in range(pieces):
            os.pwrite(fd, os.urandom(MiB), (i * stride) // MiB * MiB)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


class ImageGuest:
    """A running memory-image guest; quacks like :class:`~tunnel.qemu.QemuProcess` where the daemon needs it."""

    pid: int | None = None

    def __init__(self, path: str, spec: dict[str, int], *, paused: bool) -> None:
        self.path = path
        self.spec = spec
        size = os.path.getsize(path)
        self.tracker = DirtyTracker(size // PAGE)
        self.sim = SimulatedGuest(path, self.tracker, pages_per_second=spec["dirty_pages_per_s"], page_size=PAGE)
        self._paused = paused
        self._stopped = trio.Event()
        self._scope = trio.CancelScope()

    @classmethod
    async def start(
        cls,
        spec: dict[str, int],
        *,
        images_dir: str,
        name: str,
        paused: bool,
        nursery: trio.Nursery,
        create: bool = True,
        on_io_error: Callable[[OSError], None] | None = None,
    ) -> ImageGuest:
        """Start the guest (creating its image if *create*); *on_io_error* hears of a write error that paused it."""
        os.makedirs(images_dir, mode=0o700, exist_ok=True)
        path = os.path.join(images_dir, f"{name}.img")
        if not os.path.exists(path):
            if not create:
                raise DaemonError(f"the memory image of {name!r} is missing: {path}")
            await trio.to_thread.run_sync(_create_image, path, spec["size_mib"] * MiB, spec["random_mib"] * MiB)
        guest = cls(path, spec, paused=paused)
        guest.sim.on_io_error = on_io_error
        nursery.start_soon(guest._run)
        await trio.lowlevel.checkpoint()
        return guest

    async def _run(self) -> None:
        with self._scope:
            if self._paused:
                await self.sim.pause()
            await self.sim.run()
        self._stopped.set()

    @property
    def running(self) -> bool:
        """Running: not paused by the daemon, nor by a write error of its image (a full disk), nor stopped."""
        return not self._paused and not self.sim.paused and not self._stopped.is_set()

    async def pause(self) -> None:
        self._paused = True
        await self.sim.pause()

    def resume(self) -> None:
        self._paused = False
        self.sim.resume()

    async def stop(self, timeout: float = 5.0) -> int:
        self.sim.stop()
        self._scope.cancel()
        with trio.move_on_after(timeout):
            await self._stopped.wait()
        return 0

    async def wait(self) -> int:
        await self._stopped.wait()
        return 0

    def describe(self) -> dict[str, Any]:
        info: dict[str, Any] = {"image": self.path, "pages_dirtied": self.sim.pages_dirtied}
        if self.sim.io_error is not None:
            info["io_error"] = self.sim.io_error.strerror or str(self.sim.io_error)
        return info
