"""The ``tunnel`` command line: daemon, client commands and the demo."""

from __future__ import annotations

from ._main import main

__all__ = ["main"]
