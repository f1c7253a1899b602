"""Helpers every test module shares: waiting on a condition, and reading a process's log."""

from __future__ import annotations

import time
from pathlib import Path


def _describe(what) -> str:
    return what() if callable(what) else str(what)


def wait_for(predicate, timeout: float = 10.0, what="condition", interval: float = 0.05):
    """Poll ``predicate`` until it returns something true, and return that.

    ``what`` (text, or a callable giving text: evaluated only on failure, so it can show the
    current state) says what was awaited. Exceptions from ``predicate`` propagate.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {_describe(what)}")
        time.sleep(interval)


def hold_for(predicate, duration: float, what, interval: float = 0.2) -> None:
    """Check that ``predicate`` stays true for ``duration`` seconds; fail the moment it breaks."""
    deadline = time.monotonic() + duration
    while True:
        if not predicate():
            raise AssertionError(f"no longer true: {_describe(what)}")
        if time.monotonic() > deadline:
            return
        time.sleep(interval)


class LogFile:
    """For a helper that writes a process's output to ``self.log_path``."""

    log_path: Path

    def log_text(self) -> str:
        """Everything logged so far (across restarts)."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])
