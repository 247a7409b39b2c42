"""Reading a guest's memory image with pre-copy: the ``memory-image`` source.

Theory of operation.  The image is a file of ``size`` bytes (sparse, up to
many GiB) holding the guest's memory, one page every ``page_size`` bytes.
The stream opens with an :class:`ImageHeader` record (size, page size,
region) so the destination needs no configuration, then:

* Pass 0 sends every page.  Holes (found with ``SEEK_DATA`` /
  ``SEEK_HOLE``) are never read and go out as ``ZERO_PAGES`` runs; the data
  extents are read ``batch_pages`` pages at a time into one reused buffer,
  all-zero pages among them are found with ``bytearray.startswith`` against
  a zero page (memcmp in C, no copy) and also become runs, and the other
  pages go out as one ``PAGES`` record per batch (compacted in place in the
  buffer when zero pages were among them).  So zero pages cost 16 bytes per
  run on the wire, never their data.
* With a :class:`DirtyTracker` (a running guest), each further pass sends
  the pages dirtied during the previous one: the tracker's marks are taken
  and cleared in one step before the pass reads them, so a page written
  meanwhile is marked again for the next pass.  After each pass
  :class:`PrecopyPlanner` compares what is dirty with what the measured rate
  can send within the downtime budget, and either goes on, or pauses the
  guest and sends the final pass, or gives up (see :class:`PrecopyPolicy`:
  by default the migration fails with :class:`NotConverged`; with
  ``on_non_convergence="stop-and-copy"`` the final pass happens anyway).
* An :class:`IterationRecord` starts each pass; ``final=True`` starts the
  last one (stop-and-copy), which ends with the device-state blobs given to
  the reader (sent while the guest is paused, as a hypervisor does).

Within one pass each page is sent at most once, so the order of records
within a pass does not matter; passes are strictly in order.  The reader
never pauses or resumes the guest except for the final pass: after a failed
migration the caller resumes it (``guest.resume()``), after a successful
one the guest runs on the destination.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping
from typing import TypeVar

import trio

from .. import DeviceStateRecord, IterationRecord, PagesRecord, StreamKind, ZeroPagesRecord
from ._api import NotConverged, PausableGuest, Progress, SourceRecord
from ._imagefile import ImageHeader, page_extents, read_into
from ._precopy import PrecopyPlanner, PrecopyPolicy, Step
from .dirty import DirtyTracker

__all__ = ["MemoryImageReader"]

_R = TypeVar("_R", bound=SourceRecord)
_MAX_ZERO_RUNS = 4096  # runs per ZERO_PAGES record: 64 KiB of payload


class MemoryImageReader:
    """Source reader of a memory image file, with optional pre-copy of a running guest."""

    stream_kind = StreamKind.MEMORY

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        page_size: int = 4096,
        region: int = 0,
        batch_pages: int = 128,
        tracker: DirtyTracker | None = None,
        guest: PausableGuest | None = None,
        policy: PrecopyPolicy | None = None,
        device_states: Mapping[str, bytes] | None = None,
    ) -> None:
        if page_size < 512 or page_size & (page_size - 1):
            raise ValueError("page_size must be a power of two >= 512")
        if batch_pages < 1:
            raise ValueError("batch_pages must be >= 1")
        self.path = os.fspath(path)
        self.page_size = page_size
        self.region = region
        self.batch_pages = batch_pages
        self.tracker = tracker
        self.guest = guest
        self.policy = policy or PrecopyPolicy()
        self.device_states = dict(device_states or {})
        self._fd = os.open(self.path, os.O_RDONLY)
        try:
            self.size = os.fstat(self._fd).st_size
            if self.size % page_size:
                raise ValueError(f"{self.path}: size {self.size} is not a multiple of the page size {page_size}")
            self.pages = self.size // page_size
            if tracker is not None and tracker.pages != self.pages:
                raise ValueError(f"the dirty tracker covers {tracker.pages} pages, the image has {self.pages}")
        except BaseException:
            os.close(self._fd)
            raise
        _advise(self._fd, "POSIX_FADV_SEQUENTIAL")  # pass 0 reads the data extents in order
        self._buf = bytearray(batch_pages * page_size)
        self._view = memoryview(self._buf)
        self._zero_page = bytes(page_size)
        self._zero_batch = memoryview(bytes(len(self._buf)))
        self._planner = PrecopyPlanner(self.policy, page_size)
        # progress
        self._records = 0
        self._bytes = 0
        self._pages_sent = 0
        self._zero_pages = 0
        self._iteration = 0
        self._pass_left = self.pages  # pages of the current pass not yet read
        self._pass_bytes = 0  # page data sent in the current pass
        self._finished = False
        self._closed = False

    # ------------------------------------------------------------------
    # SourceReader

    def records(self) -> AsyncIterator[SourceRecord]:
        return self._records_gen()

    def progress(self) -> Progress:
        dirty = self.tracker.count() if self.tracker is not None and not self._finished else 0
        planner = self._planner
        return Progress(
            records=self._records,
            bytes_sent=self._bytes,
            total_bytes=self.size,
            iteration=self._iteration,
            pages_sent=self._pages_sent,
            zero_pages=self._zero_pages,
            remaining_bytes=(self._pass_left + dirty) * self.page_size if not self._finished else 0,
            rate_bytes_per_s=planner.rate,
            dirty_pages_per_s=planner.dirty_pages_per_s,
            dirty_bytes_per_s=planner.dirty_pages_per_s * self.page_size,
            expected_downtime_s=planner.expected_downtime_s,
            converged=planner.converged,
            finished=self._finished,
        )

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            os.close(self._fd)
        await trio.lowlevel.checkpoint()

    # ------------------------------------------------------------------

    def _emit(self, record: _R, payload: int) -> _R:
        self._records += 1
        self._bytes += payload
        return record

    async def _records_gen(self) -> AsyncIterator[SourceRecord]:
        tracker, planner = self.tracker, self._planner
        yield self._emit(ImageHeader(size=self.size, page_size=self.page_size, region=self.region).record(), 0)
        if tracker is not None:
            tracker.collect().release()  # dirty logging starts now; pass 0 reads everything anyway
        last_collect = trio.current_time()
        final = tracker is None
        if final:
            planner.converged = True
        yield self._emit(IterationRecord(iteration=0, final=final), 0)
        started = trio.current_time()
        async for record in self._pass(self._full_pass(), self.pages):
            yield record
        _advise(self._fd, "POSIX_FADV_RANDOM")  # dirty passes read scattered pages: readahead would only waste work
        while not final:
            assert tracker is not None
            planner.pass_done(sent_bytes=self._pass_bytes, seconds=trio.current_time() - started)
            now = trio.current_time()
            dirty = tracker.count()
            planner.dirty_observed(pages=dirty, seconds=now - last_collect)
            step = planner.next_step(dirty)
            if step is Step.GIVE_UP and self.policy.on_non_convergence == "fail":
                raise NotConverged(self._not_converged_message(dirty), self.progress())
            final = step is not Step.CONTINUE
            if final and self.guest is not None:
                await self.guest.pause()
            snapshot = tracker.collect()
            last_collect = trio.current_time()
            self._iteration += 1
            try:
                yield self._emit(IterationRecord(iteration=self._iteration, final=final), 0)
                started = trio.current_time()
                async for record in self._pass(((first, count, True) for first, count in snapshot.runs()), snapshot.count):
                    yield record
            finally:
                snapshot.release()
        for record in self._device_records():  # in the final pass: the guest is paused
            yield record
        self._finished = True

    def _not_converged_message(self, dirty: int) -> str:
        planner = self._planner
        rate = planner.rate
        rate_text = "unmeasured" if rate is None else f"{rate / 1e6:.1f} MB/s"
        downtime = planner.expected_downtime_s
        downtime_text = "unknown" if downtime is None else f"{downtime:.3f} s"
        return (
            f"pre-copy did not converge after {planner.passes} passes: {dirty} dirty pages would take {downtime_text} "
            f"at {rate_text}, over the {self.policy.downtime_s} s downtime budget; "
            f"distinct pages get dirty at {planner.dirty_pages_per_s:.0f} pages/s"
        )

    def _device_records(self) -> Iterator[SourceRecord]:
        for name, blob in self.device_states.items():
            yield self._emit(DeviceStateRecord(name=name, version=0, data=blob), len(blob))

    def _full_pass(self) -> Iterator[tuple[int, int, bool]]:
        """(first page, count, has data) over the whole image: data extents and the holes between."""
        at = 0
        for first, count in page_extents(self._fd, self.size, self.page_size):
            if first > at:
                yield at, first - at, False
            yield first, count, True
            at = first + count
        if at < self.pages:
            yield at, self.pages - at, False

    async def _pass(self, runs: Iterable[tuple[int, int, bool]], pages: int) -> AsyncIterator[SourceRecord]:
        """Records for *runs* of pages, read batch by batch into the one reused buffer."""
        ps, batch = self.page_size, self.batch_pages
        self._pass_left = pages
        self._pass_bytes = 0
        zero_runs: list[tuple[int, int]] = []  # pending (first page, count), merged
        numbers: list[int] = []  # page number of each page in the buffer
        for first, count, has_data in runs:
            if not has_data:
                _add_zero(zero_runs, first, count)
                self._zero_pages += count
                self._pass_left -= count
                if len(zero_runs) >= _MAX_ZERO_RUNS:
                    yield self._zero_record(zero_runs)
                continue
            page, end = first, first + count
            while page < end:
                n = min(batch - len(numbers), end - page)
                at = len(numbers) * ps
                read_into(self._fd, self._view[at : at + n * ps], page * ps)
                numbers.extend(range(page, page + n))
                page += n
                if len(numbers) == batch:
                    record = self._classify(numbers, zero_runs)
                    if record is not None:
                        yield record  # the buffer is free again once the pump resumes us
                    numbers.clear()
                    if len(zero_runs) >= _MAX_ZERO_RUNS:
                        yield self._zero_record(zero_runs)
        if numbers:
            record = self._classify(numbers, zero_runs)
            if record is not None:
                yield record
        if zero_runs:
            yield self._zero_record(zero_runs)
        self._pass_left = 0

    def _classify(self, numbers: list[int], zero_runs: list[tuple[int, int]]) -> PagesRecord | None:
        """Split the buffered pages into zero runs and one PAGES record of the others."""
        ps, buf, view = self.page_size, self._buf, self._view
        fill = len(numbers)
        self._pass_left -= fill
        if buf.startswith(self._zero_batch[: fill * ps]):  # all zero: one memcmp
            for number in numbers:
                _add_zero(zero_runs, number, 1)
            self._zero_pages += fill
            return None
        zero = self._zero_page
        kept: list[int] = []
        for i, number in enumerate(numbers):
            if buf.startswith(zero, i * ps):
                _add_zero(zero_runs, number, 1)
                continue
            dst = len(kept) * ps
            if dst != i * ps:
                view[dst : dst + ps] = view[i * ps : (i + 1) * ps]  # compact in place: pages never overlap
            kept.append(number * ps)
        self._zero_pages += fill - len(kept)
        self._pages_sent += len(kept)
        size = len(kept) * ps
        self._pass_bytes += size
        record = PagesRecord(region=self.region, page_size=ps, addresses=tuple(kept), data=view[:size])
        return self._emit(record, size)

    def _zero_record(self, zero_runs: list[tuple[int, int]]) -> SourceRecord:
        ps = self.page_size
        record = ZeroPagesRecord(region=self.region, page_size=ps, runs=tuple((first * ps, count) for first, count in zero_runs))
        zero_runs.clear()
        return self._emit(record, 0)


def _advise(fd: int, advice: str) -> None:
    if hasattr(os, advice):
        os.posix_fadvise(fd, 0, 0, getattr(os, advice))


def _add_zero(runs: list[tuple[int, int]], first: int, count: int) -> None:
    if runs and runs[-1][0] + runs[-1][1] == first:
        runs[-1] = (runs[-1][0], runs[-1][1] + count)
    else:
        runs.append((first, count))
