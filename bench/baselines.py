"""What a user would measure instead of the tunnel: iperf3 over loopback, and a plain blocking-socket copy.

Alternating in one invocation:

* ``iperf3``: ``iperf3 -c 127.0.0.1 -n BYTES`` against a one-off
  ``iperf3 -s -1``, the receiver's rate: the physical limit of loopback TCP
  on this machine (skipped, with the reason in ``iperf3_skipped``, when
  iperf3 is not installed);
* ``blocking``: two Python processes, blocking sockets, 1 MiB ``sendall``
  / ``recv_into`` (the ``raw`` path of ``relay.py``): the simplest copy a
  user would write.  ``throughput.py`` has the raw trio copy.

Figures are medians, with the minimum, the maximum and every run.

Usage: python bench/baselines.py [--size MiB] [--repeat N]
The last line printed is one JSON object (MB = 10**6 bytes).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import emit
from relay import _free_port, run_once


def iperf3_once(total: int) -> float:
    """One iperf3 transfer of *total* bytes over loopback; the receiver's MB/s."""
    port = _free_port()
    server = subprocess.Popen(["iperf3", "-s", "-1", "-B", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while True:
            done = subprocess.run(["iperf3", "-c", "127.0.0.1", "-p", str(port), "-n", str(total), "-J"], capture_output=True,
                                  text=True, timeout=600, check=False)  # fmt: skip
            report = json.loads(done.stdout) if done.stdout.strip().startswith("{") else {}
            if done.returncode == 0 and "sum_received" in report.get("end", {}):
                return float(report["end"]["sum_received"]["bits_per_second"]) / 8 / 1e6
            if time.monotonic() > deadline:
                raise SystemExit(f"iperf3 failed: {report.get('error') or done.stderr.strip() or done.stdout[-300:]}")
            time.sleep(0.05)  # the server is not listening yet
    finally:
        server.kill()
        server.wait()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=2048, help="MiB per run (default 2048)")
    p.add_argument("--repeat", type=int, default=5, help="rounds (default 5)")
    args = p.parse_args()
    total = args.size * 2**20
    out: dict[str, Any] = {"bytes_per_run": total, "repeat": args.repeat}
    modes = ["iperf3", "blocking"]
    if shutil.which("iperf3") is None:
        modes.remove("iperf3")
        out["iperf3_skipped"] = "iperf3 is not installed"
    runs: dict[str, list[float]] = {m: [] for m in modes}
    for index in range(args.repeat):
        for mode in modes:
            rate = iperf3_once(total) if mode == "iperf3" else run_once("raw", total)["MBps"]
            runs[mode].append(rate)
            print(f"round {index + 1} {mode:8s} {rate:8.1f} MB/s", flush=True)
    for mode, rates in runs.items():
        out[f"{mode}_MBps"] = round(statistics.median(rates), 1)
        out[f"{mode}_min_MBps"] = round(min(rates), 1)
        out[f"{mode}_max_MBps"] = round(max(rates), 1)
        out[f"{mode}_runs_MBps"] = [round(r, 1) for r in rates]
    emit(out)


if __name__ == "__main__":
    main()
