"""Pre-copy: the dirty tracker, the simulated guest, the planner, and migrations of a running guest.

Migrations here run on trio's MockClock (virtual time) with a bandwidth limit
on the stream, so the link rate and the guest's dirty rate are exact and
the outcome does not depend on how busy the machine is.
"""

from __future__ import annotations

import math
import os
import random
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_endpoints_support import PAGE, leftovers, make_image, migrate, read_file

from tunnel import StreamAborted
from tunnel.endpoints import (
    DirtyTracker,
    MemoryImageReader,
    MemoryImageWriter,
    NotConverged,
    PrecopyPolicy,
    SimulatedGuest,
    TransferResult,
    image_digest,
)
from tunnel.endpoints._precopy import PrecopyPlanner, Step

MiB = 1024 * 1024


# ---------------------------------------------------------------------------
# Dirty tracker


def test_tracker_collects_runs_and_starts_clean() -> None:
    tracker = DirtyTracker(100)
    for page in (3, 4, 5, 9, 99):
        tracker.mark(page)
    tracker.mark_range(50, 10)
    assert tracker.count() == 15
    snapshot = tracker.collect()
    assert snapshot.count == 15 and tracker.count() == 0
    tracker.mark(4)  # written after the snapshot: belongs to the next one
    assert list(snapshot.runs()) == [(3, 3), (9, 1), (50, 10), (99, 1)]
    snapshot.release()
    second = tracker.collect()
    assert list(second.runs()) == [(4, 1)] and second.count == 1
    second.release()
    third = tracker.collect()  # recycled memory comes back clean
    assert third.count == 0 and list(third.runs()) == []
    with pytest.raises(IndexError):
        tracker.mark_range(95, 10)


# ---------------------------------------------------------------------------
# Planner


def test_planner_finishes_when_the_rest_fits_the_budget() -> None:
    planner = PrecopyPlanner(PrecopyPolicy(downtime_s=0.5), PAGE)
    planner.pass_done(sent_bytes=100 * MiB, seconds=1.0)  # 100 MiB/s
    assert planner.next_step(20 * 1024) is Step.CONTINUE  # 80 MiB: 0.8 s
    assert planner.expected_downtime_s == pytest.approx(0.8)
    planner.pass_done(sent_bytes=80 * MiB, seconds=0.8)
    assert planner.next_step(10 * 1024) is Step.FINAL  # 40 MiB: 0.4 s
    assert planner.converged is True


def test_planner_gives_up_when_dirty_pages_stop_shrinking() -> None:
    planner = PrecopyPlanner(PrecopyPolicy(downtime_s=0.1, stall_passes=3), PAGE)
    steps = []
    for dirty in (5000, 4000, 4100, 4050, 4300):
        planner.pass_done(sent_bytes=MiB, seconds=1.0)
        steps.append(planner.next_step(dirty))
    assert steps == [Step.CONTINUE, Step.CONTINUE, Step.CONTINUE, Step.CONTINUE, Step.GIVE_UP]
    assert planner.converged is False


def test_planner_gives_up_after_max_iterations() -> None:
    planner = PrecopyPlanner(PrecopyPolicy(downtime_s=0.0, max_iterations=4), PAGE)
    steps = []
    for dirty in (1000, 900, 800, 700):  # shrinking, but never to zero
        planner.pass_done(sent_bytes=MiB, seconds=1.0)
        steps.append(planner.next_step(dirty))
        if steps[-1] is not Step.CONTINUE:
            break
    assert steps == [Step.CONTINUE, Step.CONTINUE, Step.GIVE_UP]  # 3 pre-copy passes + the final one = 4


def test_planner_rates() -> None:
    planner = PrecopyPlanner(PrecopyPolicy(), PAGE)
    assert planner.rate is None and planner.downtime_for(0) == 0.0 and planner.downtime_for(1) is None
    planner.pass_done(sent_bytes=MiB, seconds=0.0)
    assert planner.rate == math.inf and planner.downtime_for(10**6) == 0.0
    planner.dirty_observed(pages=500, seconds=0.5)
    assert planner.dirty_pages_per_s == 1000
    with pytest.raises(ValueError):
        PrecopyPolicy(max_iterations=1)
    with pytest.raises(ValueError):
        PrecopyPolicy(on_non_convergence="pray")  # type: ignore[arg-type,unused-ignore]


# ---------------------------------------------------------------------------
# Simulated guest


async def test_guest_dirties_at_its_rate_and_pauses(tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    path = str(tmp_path / "g.mem")
    make_image(path, [None] * 4096)
    tracker = DirtyTracker(4096)
    guest = SimulatedGuest(path, tracker, pages_per_second=1000, seed=1)
    with trio.fail_after(100):
        async with trio.open_nursery() as nursery:
            await nursery.start(guest.run)
            await trio.sleep(2.0)
            await guest.pause()
            dirtied = guest.pages_dirtied
            assert 1990 <= dirtied <= 2000
            assert 0 < tracker.count() <= dirtied
            await trio.sleep(5.0)
            assert guest.pages_dirtied == dirtied  # paused: nothing changes
            guest.resume()
            await trio.sleep(1.0)
            assert guest.pages_dirtied >= dirtied + 990
            guest.stop()
    # Every dirtied page holds data now, and only dirtied pages do.
    snapshot = tracker.collect()
    data = read_file(path)
    nonzero = {i for i in range(4096) if any(data[i * PAGE : (i + 1) * PAGE])}
    marked = {page for first, count in snapshot.runs() for page in range(first, first + count)}
    assert nonzero <= marked and len(nonzero) > 0.9 * len(marked)


# ---------------------------------------------------------------------------
# Migrating a running guest


def _image(path: str, pages: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    make_image(path, [rng.randbytes(PAGE) if rng.random() < 0.6 else None for _ in range(pages)])


async def _migrate_running(
    tmp_path: Path, *, pages: int, link: int, dirty_rate: float, policy: PrecopyPolicy, **guest_options: Any
) -> tuple[Any, SimulatedGuest, MemoryImageWriter, str, str]:
    source, target = str(tmp_path / "guest.mem"), str(tmp_path / "incoming.mem")
    _image(source, pages)
    tracker = DirtyTracker(pages)
    guest = SimulatedGuest(source, tracker, pages_per_second=dirty_rate, seed=3, **guest_options)
    writer = MemoryImageWriter(target, durable=False)  # a worker-thread fsync would let the mock clock run away
    with trio.fail_after(3600):  # virtual seconds: bounds a pre-copy that would not stop
        async with trio.open_nursery() as nursery:
            await nursery.start(guest.run)
            reader = MemoryImageReader(source, tracker=tracker, guest=guest, policy=policy, batch_pages=32)
            outcome = await migrate(reader, writer, bandwidth=link)
            guest.stop()
    return outcome, guest, writer, source, target


async def test_precopy_converges_below_the_link_rate(tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    # Link 4 MiB/s = 1024 pages/s; the guest dirties 100 pages/s.
    policy = PrecopyPolicy(downtime_s=0.05)
    outcome, guest, writer, source, target = await _migrate_running(
        tmp_path, pages=2048, link=4 * MiB, dirty_rate=100, policy=policy
    )
    assert isinstance(outcome.source, TransferResult), outcome.source
    progress = outcome.source.progress
    assert progress is not None and progress.converged is True and progress.finished
    assert progress.iteration >= 2 and writer.iterations == progress.iteration + 1 and writer.final
    assert progress.expected_downtime_s is not None and progress.expected_downtime_s <= 0.05
    assert progress.rate_bytes_per_s is not None and 3 * MiB < progress.rate_bytes_per_s <= 4.2 * MiB
    assert 20 < progress.dirty_pages_per_s <= 110
    assert guest.paused and guest.pages_dirtied > 0
    # The destination holds the guest as it was when it stopped.
    assert read_file(target) == read_file(source) and writer.digest() == image_digest(source)


async def test_precopy_reports_non_convergence_above_the_link_rate(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    # Link 1 MiB/s = 256 pages/s; the guest dirties 2000 pages/s of a 1024-page image.
    policy = PrecopyPolicy(downtime_s=0.1, max_iterations=30, stall_passes=4)
    outcome, guest, _, _, target = await _migrate_running(tmp_path, pages=1024, link=MiB, dirty_rate=2000, policy=policy)
    error = outcome.source
    assert isinstance(error, NotConverged), error
    assert "did not converge" in str(error) and error.progress.converged is False
    assert error.progress.iteration < policy.max_iterations
    # Distinct dirty pages per second: the whole image is dirty again by the time a pass ends.
    assert error.progress.dirty_pages_per_s > 200 and error.progress.remaining_bytes == 1024 * PAGE
    assert not guest.paused  # it was never stopped: the guest keeps running on the source
    assert isinstance(outcome.destination, StreamAborted) and "did not converge" in outcome.destination.reason
    assert not os.path.exists(target) and leftovers(str(tmp_path)) == []


async def test_precopy_stop_and_copy_when_asked(tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    policy = PrecopyPolicy(downtime_s=0.1, stall_passes=2, on_non_convergence="stop-and-copy")
    outcome, guest, writer, source, target = await _migrate_running(
        tmp_path, pages=1024, link=MiB, dirty_rate=2000, policy=policy
    )
    assert isinstance(outcome.source, TransferResult), outcome.source
    progress = outcome.source.progress
    assert progress is not None and progress.converged is False and progress.finished
    assert guest.paused and writer.final
    assert read_file(target) == read_file(source)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(
    pages=st.integers(1, 300),
    layout_seed=st.integers(0, 2**32),
    guest_seed=st.integers(0, 2**32),
    dirty_rate=st.sampled_from([0, 10, 200, 5000]),
    write_size=st.sampled_from([1, 64, PAGE]),
    zero_fraction=st.sampled_from([0.0, 0.3, 1.0]),
    batch=st.sampled_from([1, 7, 64]),
)
def test_precopy_round_trip_any_dirty_pattern(
    tmp_path: Path,
    pages: int,
    layout_seed: int,
    guest_seed: int,
    dirty_rate: int,
    write_size: int,
    zero_fraction: float,
    batch: int,
) -> None:
    # Whatever the guest does meanwhile, the destination ends equal to the paused source.
    directory = tmp_path / os.urandom(4).hex()
    directory.mkdir()
    source, target = str(directory / "g.mem"), str(directory / "g.out")
    _image(source, pages, layout_seed)
    policy = PrecopyPolicy(downtime_s=0.02, max_iterations=8, stall_passes=3, on_non_convergence="stop-and-copy")

    async def main() -> Any:
        tracker = DirtyTracker(pages)
        guest = SimulatedGuest(
            source, tracker, pages_per_second=dirty_rate, seed=guest_seed, write_size=write_size, zero_fraction=zero_fraction
        )
        writer = MemoryImageWriter(target, durable=False)
        with trio.fail_after(3600):
            async with trio.open_nursery() as nursery:
                await nursery.start(guest.run)
                reader = MemoryImageReader(source, tracker=tracker, guest=guest, policy=policy, batch_pages=batch)
                outcome = await migrate(reader, writer, bandwidth=256 * 1024)
                guest.stop()
        return outcome, writer

    outcome, writer = trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert isinstance(outcome.source, TransferResult), outcome.source
    assert isinstance(outcome.destination, TransferResult), outcome.destination
    assert read_file(target) == read_file(source)
    assert writer.final and 1 <= writer.iterations <= policy.max_iterations
    assert leftovers(str(directory)) == []
