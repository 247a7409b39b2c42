"""What the figures were measured on: cores, memory, kernel, versions, KVM or TCG, load, the commit."""

from __future__ import annotations

import os
import platform
import shutil
import ssl
import subprocess
from typing import Any

__all__ = ["describe", "load_average"]


def _first_line(command: list[str]) -> str | None:
    if shutil.which(command[0]) is None:
        return None
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = (done.stdout or done.stderr).strip().splitlines()
    return lines[0].strip() if lines else None


def _meminfo_gib() -> float | None:
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def _version(module: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:  # noqa: BLE001 - not installed
        return None


def _socat_version() -> str | None:
    if shutil.which("socat") is None:
        return None
    done = subprocess.run(["socat", "-V"], capture_output=True, text=True, timeout=20, check=False)
    return next((line.strip() for line in done.stdout.splitlines() if line.startswith("socat version")), None)


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _commit(repo: str) -> str | None:
    head = _first_line(["git", "-C", repo, "rev-parse", "--short", "HEAD"])
    if head is None:
        return None
    dirty = subprocess.run(
        ["git", "-C", repo, "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, check=False
    )
    return head + ("-dirty" if dirty.stdout.strip() else "")


def describe(repo: str) -> dict[str, Any]:
    """The machine and software the suite runs on."""
    qemu = os.environ.get("TUNNEL_QEMU") or "qemu-system-x86_64"
    kvm = os.access("/dev/kvm", os.R_OK | os.W_OK)
    return {
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "cpu": _cpu_model(),
        "memory_GiB": _meminfo_gib(),
        "kernel": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "trio": _version("trio"),
        "openssl": ssl.OPENSSL_VERSION,
        "qemu": _first_line([qemu, "--version"]),
        # The QEMU benchmarks run their guests with -accel tcg: here a guest writing memory runs faster under TCG than KVM.
        "accel": "tcg",
        "kvm_available": kvm,
        "iperf3": _first_line(["iperf3", "--version"]),
        "socat": _socat_version(),
        "matplotlib": _version("matplotlib"),
        "tunnel_commit": _commit(repo),
        "load_average": load_average(),
    }  # fmt: skip
