"""One progress helper for long loops (dataset generation, prediction, sweeps): a count, a rate, an ETA, written
as a line every 10% (or redrawn in place on a terminal). Top level, so ``data`` and ``engine`` can both use it."""

from __future__ import annotations

import math
import sys
import time
from typing import Optional, TextIO

__all__ = ["Progress", "format_duration"]


def format_duration(seconds: float) -> str:
    """H:MM:SS (with "Nd " in front past a day); "?" for an unknown (non-finite) duration."""
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    days, rem = divmod(seconds, 86400)
    hours, rem = divmod(rem, 3600)
    minutes, secs = divmod(rem, 60)
    return (f"{days}d " if days else "") + f"{hours:d}:{minutes:02d}:{secs:02d}"


class Progress:
    """``update(n)`` after each of ``total`` items; prints ``what`` done so far, the rate and the ETA.

    prefix: text in front of every line; bar: draw a 30-character bar (a terminal's progress bar) or not.
    """

    def __init__(self, total: int, what: str = "images", stream: Optional[TextIO] = None, prefix: str = "",
                 bar: bool = True) -> None:
        self.total, self.what, self.stream, self.prefix, self.bar = total, what, stream or sys.stderr, prefix, bar
        self.start, self.done, self._last_tenth = time.perf_counter(), 0, -1
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def eta(self) -> float:
        """Seconds left at the rate so far (nan before the first item)."""
        return self.elapsed / self.done * (self.total - self.done) if self.done else math.nan

    def line(self) -> str:
        rate = self.done / self.elapsed if self.elapsed > 0 else 0.0
        filled = int(30 * self.done / max(1, self.total))
        bar = f"[{'#' * filled}{'.' * (30 - filled)}] " if self.bar else ""
        return (f"{self.prefix}{bar}{self.done}/{self.total} {self.what}  {rate:.2f}/s  "
                f"ETA {format_duration(self.eta())}")

    def update(self, n: int = 1) -> None:
        self.done += n
        tenth = self.done * 10 // max(1, self.total)
        if self.tty:
            self.stream.write("\r" + self.line() + ("\n" if self.done >= self.total else ""))
        elif tenth != self._last_tenth or self.done >= self.total:
            self._last_tenth = tenth
            self.stream.write(self.line() + "\n")
        self.stream.flush()
