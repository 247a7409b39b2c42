"""Fault injection with real daemon processes and real QEMU: one case per fault class (tests/fault_tools.py).

After each fault (and a restart of whatever daemon it killed) the guest must
run on exactly one host as it ran before, with the loaded random bytes
intact, and no QEMU, temporary file, guest directory or daemon fd may be
left over.  ``bench/faults.py`` runs the same cases at random points.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import trio
from fault_tools import Case, Pair
from qemu_fixtures import RandomRam, random_ram, requires_qemu, run_dir

__all__ = ["random_ram", "run_dir"]  # fixtures, imported for pytest

MiB = 1024 * 1024
pytestmark = requires_qemu

#: (case, where the guest must end up, or None when either host is right).
CASES: list[tuple[Case, str | None]] = [
    (Case(fault="cut", point="prepare"), "source"),
    (Case(fault="cut", point="transfer", how="rst", transport="tcp", fraction=0.4), "source"),
    (Case(fault="cut", point="end"), "source"),
    (Case(fault="cut", point="finish-answer", hold=1.0), "destination"),
    (Case(fault="cut", point="confirm", tunnelled=False), "destination"),
    (Case(fault="stall", point="transfer", hold=2.0), "destination"),
    (Case(fault="term-src", point="finish"), None),
    (Case(fault="kill-src", point="transfer"), "source"),
    (Case(fault="term-dst", point="transfer", transport="tcp"), "source"),
    (Case(fault="kill-dst", point="finish"), None),
    (Case(fault="kill-qemu-src", point="finish"), "destination"),
    (Case(fault="kill-qemu-dst", point="transfer", transport="tcp"), "source"),
    (Case(fault="stop-qemu-dst", point="transfer", hold=2.0), "destination"),
    (Case(fault="disk-full", point="transfer"), "source"),
]


@pytest.mark.parametrize(("case", "where"), CASES, ids=[case.label.replace(" ", "-") for case, _ in CASES])
async def test_fault_leaves_one_intact_guest_and_nothing_else(
    case: Case, where: str | None, run_dir: str, random_ram: Callable[[int], RandomRam]
) -> None:
    with trio.fail_after(150):
        async with Pair(run_dir, random_ram(32 * MiB)) as pair:
            if case.fault == "disk-full" and pair.tmpfs is None:
                pytest.skip(pair.tmpfs_skip or "no tmpfs for the destination's images")
            result = await pair.run_case(case)
    assert result.injected, result.line()
    assert result.verdict == "clean", result.line()
    if where is not None:
        assert result.where == where, result.line()


async def test_killed_source_during_finish_never_loses_the_guest(run_dir: str, random_ram: Callable[[int], RandomRam]) -> None:
    """Regression: a source that died right after FINISH cancelled the destination's handler after it had recorded
    'finished'; the destination then discarded the guest and the restarted source stopped its copy (half the runs)."""
    with trio.fail_after(150):
        async with Pair(run_dir, random_ram(32 * MiB), images_tmpfs_mib=None) as pair:
            for _ in range(4):
                result = await pair.run_case(Case(fault="kill-src", point="finish", transport="tcp"))
                assert result.injected and result.verdict == "clean", result.line()


async def test_killed_destination_qemu_over_tcp_fails_the_migration_at_once(run_dir: str, random_ram: Callable[[int], RandomRam]) -> None:
    """Regression: over a TCP peer connection the spliced receive never noticed the dead QEMU; both sides hung."""
    with trio.fail_after(60):
        async with Pair(run_dir, random_ram(32 * MiB), images_tmpfs_mib=None) as pair:
            result = await pair.run_case(Case(fault="kill-qemu-dst", point="transfer", transport="tcp", fraction=0.3))
    assert result.verdict == "clean" and result.where == "source", result.line()  # the fail_after above catches a hang


async def test_sigterm_of_the_source_during_finish_exits_promptly(run_dir: str, random_ram: Callable[[int], RandomRam]) -> None:
    """Regression: the shielded FINISH waited 135 s for an answer the cancelled connection could never read."""
    with trio.fail_after(60):
        async with Pair(run_dir, random_ram(32 * MiB), images_tmpfs_mib=None) as pair:
            result = await pair.run_case(Case(fault="term-src", point="finish"))
    assert result.verdict == "clean", result.line()  # the fail_after above catches the old 135 s hang
