"""``python -m bench --dry-run``: every benchmark script runs at its smallest size and prints its keys.

The suite cannot rot unnoticed: a script that no longer runs, or no longer
prints a key the summary or the plots read, fails here.  Nothing here looks
at a figure: a dry run's numbers come from tiny sizes on a busy machine.
Scripts whose programs are missing (QEMU, as, ld) are skipped by the suite
with the reason recorded, and that reason is checked instead.  Results go to
a temporary directory, never into the repository.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench._runner import has_key, last_json_object
from bench._suite import SUITE

#: A bound on the whole dry run (it takes about a minute on an idle 2-core machine); a hang fails, slowness does not matter.
DRY_RUN_TIMEOUT = 900


def _tree(path: Path) -> set[str]:
    return {str(p.relative_to(path)) for p in path.rglob("*") if "__pycache__" not in p.parts}


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any], str]:
    results = tmp_path_factory.mktemp("bench-results")
    before = _tree(ROOT / "bench")
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--dry-run", "--no-plots", "--results-dir", str(results)],
        cwd=ROOT, capture_output=True, text=True, timeout=DRY_RUN_TIMEOUT, check=False,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]
    assert _tree(ROOT / "bench") == before, "the dry run left files in the repository"
    (run_dir,) = results.iterdir()
    summary = json.loads((run_dir / "summary.json").read_text())
    return run_dir, summary, done.stdout


def test_every_script_ran_and_printed_its_keys(dry_run: tuple[Path, dict[str, Any], str]) -> None:
    run_dir, summary, _ = dry_run
    assert set(summary["scripts"]) == {b.name for b in SUITE}
    for bench in SUITE:
        record = json.loads((run_dir / f"{bench.name}.json").read_text())
        assert record["machine"]["cores"] and record["date"] and record["command"]
        if bench.dry_skip:  # too slow for a dry run even at its smallest size: left out, and the record says why
            assert (record["status"], record["reason"]) == ("skipped", bench.dry_skip)
            continue
        if record["status"] == "skipped":  # only where a program it needs is missing
            assert record["reason"].startswith("not installed:"), record["reason"]
            continue
        assert record["status"] == "ok", f"{bench.name}: {record['reason']}"
        assert len(record["rounds"]) == bench.rounds["dry"]
        for result in record["rounds"]:
            missing = [key for key in bench.keys if not has_key(result, key)]
            assert not missing, f"{bench.name} lacks {missing}"


def test_the_summary_judges_nothing_in_a_dry_run(dry_run: tuple[Path, dict[str, Any], str]) -> None:
    _, summary, stdout = dry_run
    assert summary["level"] == "dry"
    for key in ("cores", "memory_GiB", "kernel", "python", "trio", "openssl", "qemu", "accel", "kvm_available"):
        assert key in summary["machine"]
    assert summary["rows"]
    assert all(row["met"] is None for row in summary["rows"])
    assert "not judged (dry run)" in stdout
    assert not any("not measured" in (row["note"] or "") for row in summary["rows"])  # every baseline asked for is measured


def test_an_earlier_run_prints_as_markdown(dry_run: tuple[Path, dict[str, Any], str]) -> None:
    run_dir, _, _ = dry_run
    done = subprocess.run([sys.executable, "-m", "bench", "--from", str(run_dir), "--markdown"], cwd=ROOT, capture_output=True,
                          text=True, timeout=60, check=True, env={**os.environ, "PYTHONPATH": str(ROOT)})  # fmt: skip
    table = [line for line in done.stdout.splitlines() if line.startswith("|")]
    assert table[0].startswith("| figure |") and table[1].startswith("|---|")
    assert len(table) > 10


def test_plots_from_the_dry_run(dry_run: tuple[Path, dict[str, Any], str], tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from bench.plots import make_plots

    run_dir, _, _ = dry_run
    for name in ("scaling", "concurrency", "summary"):
        (tmp_path / f"{name}.json").write_bytes((run_dir / f"{name}.json").read_bytes())
    paths, why = make_plots(str(tmp_path))
    assert why is None
    assert {os.path.basename(p) for p in paths} == {
        "scaling_data.png", "scaling_frame.png", "scaling_window.png", "scaling_streams.png", "latency_cdf.png", "concurrency.png",
    }  # fmt: skip
    assert all(os.path.getsize(p) > 1000 for p in paths)


def test_plots_say_why_without_matplotlib(tmp_path: Path) -> None:
    code = "import sys; sys.modules['matplotlib'] = None; from bench.plots import make_plots; print(make_plots(sys.argv[1]))"
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          check=True, env={**os.environ, "PYTHONPATH": str(ROOT)})  # fmt: skip
    assert "matplotlib is not installed" in done.stdout


def test_the_last_json_object_is_the_result() -> None:
    assert last_json_object('progress\n{"a": 1}\nnot json {\n{"b": 2}\ntrailing words\n') == {"b": 2}
    assert last_json_object("no json here\n[1, 2]\n") is None
