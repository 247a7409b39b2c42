"""``python -m bench``: run every benchmark, keep each result as JSON, print the summary against the targets.

    python -m bench                 # the full set (the sizes the issues name; the better part of an hour)
    python -m bench --quick         # a few minutes in all
    python -m bench --dry-run       # every script at its smallest size: does it run, are its keys there
    python -m bench --only throughput,relay --quick
    python -m bench --markdown      # the summary also as a Markdown table, for the README
    python -m bench --from bench/results/RUN --markdown   # print an earlier run's summary again

Each run writes into ``RESULTS_DIR/RUN/`` (``RESULTS_DIR`` is
``bench/results`` unless ``--results-dir`` says otherwise; ``RUN`` is the
UTC start time and the level): ``NAME.json`` per script (its rounds' JSON
objects, the command, the machine, the date), ``NAME.log`` (everything it
printed), ``summary.json`` (the machine, every script's status, the
summary rows) and the plots (``*.png``).  The exit status is 1 when a
script failed or lacked a key, whatever the figures.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from typing import Any

from . import _summary
from ._machine import describe, load_average
from ._runner import REPO, run_bench
from ._suite import SUITE, by_name

DEFAULT_RESULTS = os.path.join(REPO, "bench", "results")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smaller sizes and fewer rounds: a few minutes in all")
    p.add_argument(
        "--dry-run", action="store_true", help="every script at its smallest size, to check that it runs (figures not judged)"
    )
    p.add_argument(
        "--only", metavar="NAMES", help="comma-separated scripts to run (default: all): " + ",".join(b.name for b in SUITE)
    )
    p.add_argument("--skip", metavar="NAMES", help="comma-separated scripts not to run")
    p.add_argument(
        "--results-dir", metavar="DIR", default=DEFAULT_RESULTS, help="where the run's directory goes (default bench/results)"
    )
    p.add_argument("--markdown", action="store_true", help="also print the summary as a Markdown table")
    p.add_argument("--no-plots", action="store_true", help="do not draw the PNG plots")
    p.add_argument("--from", dest="from_dir", metavar="RUN_DIR", help="print the summary of an earlier run instead of running")
    p.add_argument("--list", action="store_true", help="list the scripts and their arguments at the chosen level, and exit")
    p.add_argument("--echo", action="store_true", help="show each script's output as it finishes")
    return p


def _write_json(path: str, value: Any) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=1, sort_keys=False)
        f.write("\n")
    os.replace(tmp, path)


def _machine_text(machine: dict[str, Any]) -> str:
    return (
        f"{machine['cores']} cores ({machine.get('cpu')}), {machine['memory_GiB']} GiB, {machine['kernel']}; "
        f"Python {machine['python']}, trio {machine['trio']}, {machine['openssl']}; "
        f"{machine['qemu'] or 'QEMU not installed'} ({machine['accel'].upper()}, KVM {'present' if machine['kvm_available'] else 'absent'}); "
        f"tunnel {machine['tunnel_commit']}"
    )


def _reread(run_dir: str) -> dict[str, Any]:
    """An earlier run's summary, its rows evaluated again from its scripts' JSON files against today's targets."""
    with open(os.path.join(run_dir, "summary.json"), encoding="utf-8") as f:
        summary: dict[str, Any] = json.load(f)
    outcomes = {}
    for name in summary["scripts"]:
        path = os.path.join(run_dir, f"{name}.json")
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                outcomes[name] = json.load(f)
    summary["rows"] = _summary.evaluate(outcomes, judged=summary["level"] != "dry")
    return summary


def print_summary(summary: dict[str, Any], *, markdown: bool) -> None:
    judged = summary["level"] != "dry"
    print(f"\n{summary['level']} run of {summary['date']} on {_machine_text(summary['machine'])}")
    start, end = summary["machine"].get("load_average"), summary.get("load_average_after")
    print(f"load average at the start {start}, at the end {end}")
    if start and start[0] > 0.5 * (summary["machine"]["cores"] or 1):
        print("warning: the machine was busy when the run started; its figures are not comparable with a quiet run's")
    print("\nscripts:")
    for name, info in summary["scripts"].items():
        seconds = sum(info["seconds"])
        reason = f"  ({info['reason']})" if info.get("reason") else ""
        print(f"  {name:12s} {info['status']:10s} {seconds:7.1f} s  {len(info['seconds'])} round(s){reason}")
    if not judged:
        print("\ndry run: the figures below come from the smallest sizes and say nothing about speed; no target is judged")
    print()
    print(_summary.text(summary["rows"], judged=judged))
    if summary.get("plots"):
        print("\nplots: " + ", ".join(summary["plots"]))
    if summary.get("plots_skipped"):
        print(f"\n{summary['plots_skipped']}")
    if markdown:
        print(
            f"\nMeasured by `{summary['command']}` ({summary['level']}) on {summary['date']}: {_machine_text(summary['machine'])}.\n"
        )
        print(_summary.markdown(summary["rows"], judged=judged))


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.from_dir:
        print_summary(_reread(args.from_dir), markdown=args.markdown)
        return 0
    level = "dry" if args.dry_run else "quick" if args.quick else "full"
    names = args.only.split(",") if args.only else [b.name for b in SUITE]
    if args.skip:
        names = [n for n in names if n not in args.skip.split(",")]
    try:
        benches = by_name(names)
    except ValueError as exc:
        print(f"python -m bench: {exc}", file=sys.stderr)
        return 2
    if args.list:
        for b in benches:
            rounds = b.rounds[level]
            print(f"{b.name:12s} python3 bench/{b.script} {' '.join(b.args[level])}" + (f"  (x{rounds})" if rounds > 1 else ""))
        return 0

    started = datetime.datetime.now(datetime.UTC)
    run_dir = os.path.join(os.path.abspath(args.results_dir), f"{started:%Y-%m-%dT%H%M%SZ}-{level}")
    os.makedirs(run_dir, exist_ok=True)
    machine = describe(REPO)
    command = "python -m bench " + " ".join(argv if argv is not None else sys.argv[1:])
    print(f"{level} run: {len(benches)} scripts; results in {run_dir}", flush=True)
    outcomes: dict[str, dict[str, Any]] = {}
    wall = time.monotonic()
    for index, bench in enumerate(benches, 1):
        print(f"[{index}/{len(benches)}] {bench.name}: python3 bench/{bench.script} {' '.join(bench.args[level])}", flush=True)
        outcome = run_bench(bench, level, run_dir, echo=args.echo, named=bool(args.only)).to_json()
        outcomes[bench.name] = outcome
        record = {
            "script": f"bench/{bench.script}",
            "what": bench.what,
            "level": level,
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "machine": machine,
            **outcome,
        }
        _write_json(os.path.join(run_dir, f"{bench.name}.json"), record)  # fmt: skip
        reason = f": {outcome['reason']}" if outcome["reason"] else ""
        print(f"    {outcome['status']} in {sum(outcome['seconds']):.1f} s{reason}", flush=True)
    summary: dict[str, Any] = {
        "date": started.isoformat(timespec="seconds"),
        "level": level,
        "command": command.strip(),
        "wall_s": round(time.monotonic() - wall, 1),
        "machine": machine,
        "load_average_after": load_average(),
        "scripts": {
            name: {k: o[k] for k in ("status", "reason", "seconds", "command", "missing_keys")} for name, o in outcomes.items()
        },
        "rows": _summary.evaluate(outcomes, judged=level != "dry"),
        "plots": [],
        "plots_skipped": None,
    }
    _write_json(os.path.join(run_dir, "summary.json"), summary)
    if args.no_plots:
        summary["plots_skipped"] = "plots skipped: --no-plots"
    else:
        from .plots import make_plots

        paths, why = make_plots(run_dir)
        summary["plots"], summary["plots_skipped"] = [os.path.basename(p) for p in paths], why
    _write_json(os.path.join(run_dir, "summary.json"), summary)
    print_summary(summary, markdown=args.markdown)
    print(f"\nresults: {run_dir} ({summary['wall_s']:.0f} s)")
    return 1 if any(o["status"] in ("failed", "incomplete") for o in outcomes.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
