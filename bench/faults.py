"""Fault campaign: real daemons, real QEMU, one random fault per migration; the invariant after each.

    python3 bench/faults.py [--cases N] [--seed S]

Each case starts the guest (128 MiB, 32 MiB of random RAM) on the source
daemon, migrates it (PEER2PEER, tunnelled for three cases in four, else
native; through a unix or a TCP relay) and injects one fault from
tests/fault_tools.py: a cut (FIN or RST) or stall of the daemons'
connection, SIGTERM or SIGKILL of either daemon, SIGKILL of either QEMU,
SIGSTOP of the destination QEMU, or a full destination disk for a
memory-image guest, at a random point (before prepare, in the transfer, at
the stream's end, at FINISH, FINISH's answer, confirm).  Killed daemons are
restarted; then the guest must run on exactly one host with its memory
intact, and nothing may be left over.  One progress line per case; the last
line is one JSON object with the counts.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import sys
import tempfile
import time
import traceback
from typing import Any

import trio

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.join(os.path.dirname(HERE), "tests"), os.path.dirname(HERE)]

from _common import emit
from fault_tools import Pair, Result, make_ram, random_case

VERDICTS = ("clean", "lost", "doubled", "leaked")


async def campaign(cases: int, seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    root = tempfile.mkdtemp(prefix="tf-", dir="/tmp")
    totals: dict[str, Any] = {"cases": cases, "seed": seed, **{v: 0 for v in VERDICTS}, "errors": 0, "not_reached": 0, "by_fault": {}}
    started = time.monotonic()
    try:
        ram = make_ram(root)
        done = 0
        while done < cases:
            # A fresh pair after a harness error; otherwise one pair for the whole campaign (fd counts compare across cases).
            async with Pair(os.path.join(root, f"p{done}"), ram) as pair:
                while done < cases:
                    case = random_case(rng)
                    fault = totals["by_fault"].setdefault(case.fault, {"cases": 0, **{v: 0 for v in VERDICTS}, "points": {}})
                    fault["cases"] += 1
                    fault["points"][case.point] = fault["points"].get(case.point, 0) + 1
                    done += 1
                    try:
                        result: Result = await pair.run_case(case)
                    except Exception as exc:  # noqa: BLE001 - a harness failure: count it, start a new pair
                        totals["errors"] += 1
                        print(f"[{done}/{cases}] ERROR   {case.label}: {type(exc).__name__}: {exc}", flush=True)
                        traceback.print_exc(file=sys.stderr)
                        break
                    totals[result.verdict] += 1
                    fault[result.verdict] += 1
                    totals["not_reached"] += not result.injected
                    print(f"[{done}/{cases}] {result.line()}", flush=True)
    finally:
        if all(totals[v] == 0 for v in ("lost", "doubled", "leaked", "errors")):
            shutil.rmtree(root, ignore_errors=True)
        else:  # the daemons' logs (pN/src.log, pN/dst.log) explain what went wrong
            print(f"kept {root} for the logs", flush=True)
    totals["seconds"] = round(time.monotonic() - started, 1)
    return totals


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=50)
    parser.add_argument("--seed", type=int, default=None, help="for a repeatable campaign (default: random, printed)")
    args = parser.parse_args()
    seed = args.seed if args.seed is not None else random.randrange(1 << 32)
    print(f"fault campaign: {args.cases} cases, seed {seed}", flush=True)
    emit(trio.run(campaign, args.cases, seed))


if __name__ == "__main__":
    main()
