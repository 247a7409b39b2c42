"""Medians, spreads and ratios of the suite's results, against the targets; as a table or as Markdown.

The input is ``{script: outcome}`` as :mod:`bench._runner` records it (one
result object per round).  Every figure is the median over its samples
(rounds, or the script's own runs where it lists them), with the minimum
and maximum beside it.  A ratio is taken per sample, from a figure and a
baseline measured in the same round, never from two invocations.
"""

from __future__ import annotations

import math
import statistics
from typing import Any

from .targets import MISSING_BASELINES, ROWS, Row

__all__ = ["evaluate", "markdown", "text"]

OPS = {"<=": lambda a, b: a <= b, ">=": lambda a, b: a >= b, "==": lambda a, b: a == b}
SHOWN_OP = {"<=": "≤", ">=": "≥", "==": "="}


def _get(result: dict[str, Any], key: str) -> Any:
    node: Any = result
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        return None
    return float(value)


def _rounds(outcomes: dict[str, dict[str, Any]], path: str) -> tuple[str, str, list[dict[str, Any]]]:
    script, key = path.split(".", 1)
    return script, key, (outcomes.get(script) or {}).get("rounds", [])


def _per_round(outcomes: dict[str, dict[str, Any]], path: str) -> list[float | None]:
    _, key, rounds = _rounds(outcomes, path)
    return [_number(_get(r, key)) for r in rounds]


def _runs(outcomes: dict[str, dict[str, Any]], path: str) -> list[list[float | None]]:
    _, key, rounds = _rounds(outcomes, path)
    out = []
    for r in rounds:
        value = _get(r, key)
        out.append([_number(v) for v in value] if isinstance(value, list) else [])
    return out


def spread(values: list[float | None]) -> dict[str, float | int] | None:
    numbers = [v for v in values if v is not None]
    if not numbers:
        return None
    return {"median": statistics.median(numbers), "min": min(numbers), "max": max(numbers), "n": len(numbers)}


def _flat(outcomes: dict[str, dict[str, Any]], runs_key: str | None, key: str | None) -> list[float | None]:
    """Samples of a figure: its per-run list in every round where the script keeps one, else one value per round."""
    if runs_key:
        return [v for runs in _runs(outcomes, runs_key) for v in runs]
    return _per_round(outcomes, key) if key else []


def _same_script(row: Row) -> bool:
    """Whether *row*'s figure and baseline come from the same script (so their rounds or runs pair up)."""
    figure = (row.figure_runs or row.figure).split(".", 1)[0]
    baseline = (row.baseline_runs or row.baseline or "").split(".", 1)[0]
    return figure == baseline


def _samples(outcomes: dict[str, dict[str, Any]], row: Row) -> tuple[list[float | None], list[float | None], list[float | None]]:
    """(figure samples, baseline samples, ratio samples) for *row*.

    Ratios pair runs of one round (``figure_runs`` with ``baseline_runs``),
    or take the script's own ratio per round (``ratio_key``), or pair
    rounds of one script.  Where figure and baseline come from different
    scripts (their runs are not paired: they ran minutes apart), each figure
    sample is divided by the baseline's median.
    """
    if row.figure_runs and row.baseline_runs:
        figure: list[float | None] = []
        baseline: list[float | None] = []
        for f_runs, b_runs in zip(_runs(outcomes, row.figure_runs), _runs(outcomes, row.baseline_runs), strict=False):
            pairs = list(zip(f_runs, b_runs, strict=False))
            figure += [f for f, _ in pairs]
            baseline += [b for _, b in pairs]
    else:
        figure = _flat(outcomes, row.figure_runs, row.figure)
        baseline = _flat(outcomes, row.baseline_runs, row.baseline)
    if row.ratio_key:
        ratios = _per_round(outcomes, row.ratio_key)
    elif row.baseline and len(figure) == len(baseline) and _same_script(row):
        ratios = [f / b if f is not None and b else None for f, b in zip(figure, baseline, strict=True)]
    elif row.baseline:
        middle = spread(baseline)
        ratios = [f / middle["median"] if f is not None and middle and middle["median"] else None for f in figure]
    else:
        ratios = []
    return figure, baseline, ratios


def _status(outcomes: dict[str, dict[str, Any]], path: str | None) -> str | None:
    """Why the script behind *path* gave nothing, or None when it ran."""
    if path is None:
        return None
    script = path.split(".", 1)[0]
    outcome = outcomes.get(script)
    if outcome is None:
        return "not run"
    if outcome["status"] == "ok":
        return None
    return f"{script} {outcome['status']}"  # the scripts' list gives the reason


def evaluate(outcomes: dict[str, dict[str, Any]], *, judged: bool = True) -> list[dict[str, Any]]:
    """One summary row per target row whose script ran; *judged* False (a dry run) leaves ``met`` undecided."""
    rows = []
    for row in ROWS:
        if row.figure.split(".", 1)[0] not in outcomes:  # a run of some scripts only (--only, --skip)
            continue
        figure, baseline, ratios = _samples(outcomes, row)
        f, b, r = spread(figure), spread(baseline), spread(ratios)
        if f is not None and f["n"] == 1 and row.figure_range:
            low, high = (_per_round(outcomes, key)[-1:] or [None] for key in row.figure_range)
            if low[0] is not None and high[0] is not None:
                f = {**f, "min": low[0], "max": high[0]}
        judged_on = r if row.baseline else f
        met: bool | None = None
        if row.target is not None and judged_on is not None and judged:
            op, value = row.target
            met = bool(OPS[op](judged_on["median"], value))
        note = _status(outcomes, row.figure) or _status(outcomes, row.baseline)
        if note is None and f is None:
            note = "no figure"
        elif note is None and row.baseline and b is None:
            note = "no baseline figure"
        rows.append(
            {
                "label": row.label,
                "figure_key": row.figure,
                "unit": row.unit,
                "figure": f,
                "baseline_label": row.baseline_label,
                "baseline_key": row.baseline,
                "baseline": b,
                "ratio": r if row.baseline else None,
                "target": f"{SHOWN_OP[row.target[0]]} {row.target[1]:g}" if row.target else None,
                "target_on": ("ratio" if row.baseline else "figure") if row.target else None,
                "met": met,
                "issue": row.issue,
                "note": note,
            }
        )
    for label, why in MISSING_BASELINES:
        rows.append({"label": label, "figure_key": None, "unit": "", "figure": None, "baseline_label": None, "baseline_key": None,
                     "baseline": None, "ratio": None, "target": None, "target_on": None, "met": None, "issue": "15",
                     "note": f"not measured: {why}"})  # fmt: skip
    return rows


def _num(value: float) -> str:
    size = abs(value)
    if size >= 1000:
        return f"{value:,.0f}"
    if size >= 100:
        return f"{value:.0f}"
    if size >= 10:
        return f"{value:.1f}"
    if size >= 1:
        return f"{value:.2f}"
    return f"{value:.3f}"


def _cell(s: dict[str, Any] | None, unit: str = "") -> str:
    if s is None:
        return "—"
    text = _num(s["median"])
    if s["n"] > 1 or s["min"] != s["max"]:
        text += f" [{_num(s['min'])}–{_num(s['max'])}]"
    return f"{text} {unit}".rstrip()


def _met(row: dict[str, Any], judged: bool) -> str:
    if row["target"] is None:
        return ""
    if row["figure"] is None:
        return "not measured"
    if not judged:
        return "not judged (dry run)"
    return "met" if row["met"] else "MISSED"


def _table(rows: list[dict[str, Any]], judged: bool) -> list[list[str]]:
    head = ["figure", "median [min–max]", "baseline", "baseline median [min–max]", "ratio [min–max]", "target", "met"]
    body = [head]
    for row in rows:
        met = _met(row, judged)
        if row["note"] and not met:
            met = row["note"]
        elif row["note"]:
            met = f"{met} ({row['note']})"
        body.append([
            row["label"], _cell(row["figure"], row["unit"]), row["baseline_label"] or "",
            _cell(row["baseline"], row["unit"]) if row["baseline_label"] else "",
            _cell(row["ratio"]) if row["baseline_label"] else "", row["target"] or "", met,
        ])  # fmt: skip
    return body


def text(rows: list[dict[str, Any]], *, judged: bool = True) -> str:
    """The summary as a plain-text table for a terminal."""
    body = _table(rows, judged)
    widths = [min(max(len(line[i]) for line in body), 48) for i in range(len(body[0]))]
    lines = []
    for n, line in enumerate(body):
        lines.append("  ".join(cell.ljust(widths[i]) if i < len(line) - 1 else cell for i, cell in enumerate(line)).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown(rows: list[dict[str, Any]], *, judged: bool = True) -> str:
    """The summary as a Markdown table, for the README's Performance section."""
    body = _table(rows, judged)
    out = ["| " + " | ".join(body[0]) + " |", "|" + "---|" * len(body[0])]
    for line in body[1:]:
        out.append("| " + " | ".join(cell.replace("|", "\\|") for cell in line) + " |")
    return "\n".join(out)
