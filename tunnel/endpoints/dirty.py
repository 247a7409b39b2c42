"""Dirty-page tracking for pre-copy migration.

One byte per page (a 8 GiB guest with 4 KiB pages needs 2 MiB): whoever
writes guest memory marks the page *after* writing it, and the migration
takes a snapshot of the marks and clears them in one step before it reads
those pages.  A page written after the snapshot is marked again and goes in
the next pass, so no write is lost whatever the interleaving.

A byte (not a bit) per page keeps marking cheap and lets the runs of dirty
pages be found by the regular-expression engine in C
(``re.finditer(rb"[^\\x00]+", ...)``) instead of a loop over pages.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

__all__ = ["DirtySnapshot", "DirtyTracker"]

_RUNS = re.compile(rb"[^\x00]+")


class DirtySnapshot:
    """The pages that were dirty when :meth:`DirtyTracker.collect` ran."""

    __slots__ = ("_marks", "_tracker", "count")

    def __init__(self, tracker: DirtyTracker, marks: bytearray) -> None:
        self._tracker = tracker
        self._marks = marks
        #: Number of dirty pages in the snapshot.
        self.count = len(marks) - marks.count(0)

    def runs(self) -> Iterator[tuple[int, int]]:
        """(first page, page count) of each run of dirty pages, in address order."""
        for match in _RUNS.finditer(self._marks):
            yield match.start(), match.end() - match.start()

    def release(self) -> None:
        """Give the snapshot's memory back to the tracker for the next collection."""
        if self._marks:
            self._tracker._recycle(self._marks)
            self._marks = bytearray()
            self.count = 0


class DirtyTracker:
    """A dirty log of *pages* pages, marked by the guest and collected by the migration."""

    __slots__ = ("_marks", "_spare", "pages")

    def __init__(self, pages: int) -> None:
        if pages < 0:
            raise ValueError("pages must be >= 0")
        self.pages = pages
        self._marks = bytearray(pages)
        self._spare: bytearray | None = None

    def mark(self, page: int) -> None:
        self._marks[page] = 1

    def mark_range(self, first: int, count: int) -> None:
        if first < 0 or first + count > self.pages:
            raise IndexError(f"pages {first}..{first + count} outside 0..{self.pages}")
        self._marks[first : first + count] = b"\x01" * count

    def count(self) -> int:
        """Pages dirty now (not yet collected)."""
        return self.pages - self._marks.count(0)

    def collect(self) -> DirtySnapshot:
        """Take the current marks and start a clean log, in one step."""
        fresh = self._spare if self._spare is not None else bytearray(self.pages)
        self._spare = None
        marks, self._marks = self._marks, fresh
        return DirtySnapshot(self, marks)

    def _recycle(self, marks: bytearray) -> None:
        marks[:] = bytes(len(marks))  # two bitmaps at most, whatever the number of passes
        self._spare = marks
