"""What both demos (QEMU and memory-image guest) share: the daemon processes, the clock, a migration with progress."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from typing import Any

import trio

from ..client import Client
from ..control import DaemonError
from ._progress import ProgressBar

__all__ = ["Clock", "Daemons", "migrate_with_progress", "say"]


def say(args: argparse.Namespace, text: str) -> None:
    if not args.json:
        print(text, flush=True)


class Clock:
    """Where the demo's time goes, so that every second of it is accounted for at the end."""

    def __init__(self) -> None:
        self.start = self.mark = time.monotonic()
        self.phases: list[tuple[str, float]] = []

    def lap(self, what: str) -> float:
        now = time.monotonic()
        self.phases.append((what, now - self.mark))
        self.mark = now
        return now - self.phases[-1][1]

    def summary(self) -> str:
        total = time.monotonic() - self.start
        parts = ", ".join(f"{what} {seconds:.2f} s" for what, seconds in self.phases)
        return f"Time: {total:.2f} s in all: {parts}."


class Daemons:
    """Two daemon processes, always stopped on the way out."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.procs: list[trio.Process] = []

    async def start(self, name: str) -> str:
        sock = os.path.join(self.root, f"{name}.sock")
        log = os.open(os.path.join(self.root, f"{name}.log"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            proc = await trio.lowlevel.open_process(
                [
                    sys.executable, "-m", "tunnel", "daemon", "--listen", f"unix://{sock}", "--state-dir", os.path.join(self.root, name),
                    # the guest's RAM file lives in the demo's directory; a throw-away demo stops its guests
                    "--allow-path", self.root, "--shutdown-guests-on-exit",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        finally:
            os.close(log)
        self.procs.append(proc)
        with trio.move_on_after(20):
            while not os.path.exists(sock):
                if proc.poll() is not None:
                    break
                await trio.sleep(0.05)
        if not os.path.exists(sock):
            raise DaemonError(f"the {name} daemon did not start: {self.log_tail(name)}")
        return f"unix://{sock}"

    def log_tail(self, name: str) -> str:
        try:
            with open(os.path.join(self.root, f"{name}.log"), encoding="utf-8", errors="replace") as f:
                return f.read()[-2000:].strip()
        except OSError:
            return ""

    async def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            with trio.move_on_after(20):
                await proc.wait()
            if proc.poll() is None:
                proc.kill()
                await proc.wait()


async def migrate_with_progress(
    client: Client, name: str, dest: str, *, tunnelled: bool, show: bool, verify: bool = False
) -> dict[str, Any]:
    bar = ProgressBar(sys.stdout) if show and sys.stdout.isatty() else None
    result: dict[str, Any] = {}

    async def poll() -> None:
        try:
            while True:
                await trio.sleep(0.25)
                info = await client.jobinfo(name)
                if bar is not None and info.get("status") == "active":
                    bar.update(info)
        except DaemonError:
            return

    error: DaemonError | None = None
    async with trio.open_nursery() as nursery:
        nursery.start_soon(poll)
        try:
            # --undefinesource: the demo defines the guest afresh for each run
            result = await client.migrate(name, dest, live=True, p2p=True, tunnelled=tunnelled, verify=verify, undefine_source=True)
        except DaemonError as exc:
            error = exc
        nursery.cancel_scope.cancel()
    if bar is not None:
        bar.close()
    if error is not None:
        raise error
    return result
