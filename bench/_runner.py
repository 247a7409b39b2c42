"""Run one benchmark script as a subprocess and keep the last JSON object it prints.

The script's whole output goes to ``NAME.log`` in the results directory
(round by round), so a failure can be read afterwards; only its last JSON
object is the result.  A script whose programs are missing is not run: its
record says why.  A script that fails, times out or lacks one of its keys
is recorded as such; the suite goes on with the next one.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from ._suite import Bench

__all__ = ["BENCH_DIR", "REPO", "Outcome", "has_key", "last_json_object", "missing_programs", "run_bench"]

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(BENCH_DIR)


@dataclass(slots=True, kw_only=True)
class Outcome:
    """What running one script (all its rounds) gave."""

    name: str
    #: ``ok``, ``skipped``, ``failed`` (non-zero exit, a timeout, no JSON) or ``incomplete`` (keys missing).
    status: str
    command: list[str]
    #: One result object per round that printed one.
    rounds: list[dict[str, Any]] = field(default_factory=list)
    #: Wall seconds of each round.
    seconds: list[float] = field(default_factory=list)
    #: Why it was skipped, or what went wrong.
    reason: str | None = None
    missing_keys: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "status": self.status,
            "command": self.command,
            "rounds": self.rounds,
            "seconds": [round(s, 2) for s in self.seconds],
            "reason": self.reason,
            "missing_keys": self.missing_keys,
        }


def last_json_object(output: str) -> dict[str, Any] | None:
    """The last line of *output* that is a JSON object, or None."""
    for line in reversed(output.splitlines()):
        line = line.strip()
        if not line.startswith("{"):
            continue
        try:
            value = json.loads(line)
        except ValueError:
            continue
        if isinstance(value, dict):
            return value
    return None


def has_key(result: dict[str, Any], spec: str) -> bool:
    """Whether *result* has the key *spec*: dotted for nested objects, ``a|b`` for either."""
    for alternative in spec.split("|"):
        node: Any = result
        for part in alternative.split("."):
            if not isinstance(node, dict) or part not in node:
                break
            node = node[part]
        else:
            return True
    return False


def _program(name: str) -> str | None:
    if name == "qemu":
        return shutil.which(os.environ.get("TUNNEL_QEMU") or "qemu-system-x86_64")
    return shutil.which(name)


def missing_programs(bench: Bench) -> list[str]:
    return [p for p in bench.needs if _program(p) is None]


def run_bench(bench: Bench, level: str, results_dir: str, *, echo: bool = False, named: bool = False) -> Outcome:
    """Run *bench*'s rounds at *level*; its output goes to ``results_dir/NAME.log``.

    *named*: the user asked for this script by name, so a dry run does not leave it out.
    """
    command = [sys.executable, os.path.join(BENCH_DIR, bench.script), *bench.args[level]]
    shown = ["python3", f"bench/{bench.script}", *bench.args[level]]
    if level == "dry" and bench.dry_skip and not named:
        return Outcome(name=bench.name, status="skipped", command=shown, reason=bench.dry_skip)
    missing = missing_programs(bench)
    if missing:
        what = " and ".join("qemu-system-x86_64 (or $TUNNEL_QEMU)" if p == "qemu" else p for p in missing)
        return Outcome(name=bench.name, status="skipped", command=shown, reason=f"not installed: {what}")
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), PYTHONUNBUFFERED="1")
    outcome = Outcome(name=bench.name, status="ok", command=shown)
    log_path = os.path.join(results_dir, f"{bench.name}.log")
    rounds = bench.rounds[level]
    with open(log_path, "a", encoding="utf-8") as log:
        for index in range(rounds):
            log.write(f"=== round {index + 1} of {rounds}: {' '.join(shown)}\n")
            log.flush()
            started = time.monotonic()
            try:
                done = subprocess.run(
                    command, cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                    text=True, timeout=bench.timeout[level], check=False,
                )  # fmt: skip
            except subprocess.TimeoutExpired as exc:
                out = exc.stdout if isinstance(exc.stdout, str) else (exc.stdout or b"").decode(errors="replace")
                log.write(out)
                outcome.seconds.append(time.monotonic() - started)
                outcome.status, outcome.reason = "failed", f"round {index + 1} timed out after {bench.timeout[level]:.0f} s"
                break
            outcome.seconds.append(time.monotonic() - started)
            log.write(done.stdout)
            if echo:
                sys.stdout.write(done.stdout)
            result = last_json_object(done.stdout)
            if done.returncode != 0 or result is None:
                tail = done.stdout.strip().splitlines()[-1:] or ["(no output)"]
                outcome.status = "failed"
                outcome.reason = f"round {index + 1}: exit status {done.returncode}, {'no JSON object' if result is None else 'JSON printed'}; last line: {tail[0][:300]}"
                break
            outcome.rounds.append(result)
    if outcome.status == "ok":
        outcome.missing_keys = sorted({k for r in outcome.rounds for k in bench.keys if not has_key(r, k)})
        if outcome.missing_keys:
            outcome.status, outcome.reason = "incomplete", f"keys missing: {', '.join(outcome.missing_keys)}"
    return outcome
