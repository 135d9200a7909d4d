"""Progress reporting that stays readable in job logs (tiling, inference, export).

On a terminal: a tqdm bar on stderr (cleared when done). When stderr is not a terminal (a SLURM or
Snakemake log, a pipe): no carriage-return redraws, but one log line each time another
:data:`LOG_STEP_PERCENT` % is done, and one at the end, e.g.
``tile: 40 % (41/102 chunks, 3.1 s)``. Nothing with ``--quiet`` (the ``pipeline`` logger then
shows warnings only) or when there is nothing to do.
"""

from __future__ import annotations

import logging
import sys
import time

log = logging.getLogger("pipeline.progress")

LOG_STEP_PERCENT = 10  # one log line per this many percent when stderr is not a terminal


def _quiet() -> bool:
    return not logging.getLogger("pipeline").isEnabledFor(logging.INFO)


class Progress:
    """``with Progress(total, "infer", "chunk") as bar: ... bar.update(n)``.

    Parameters
    ----------
    total : int
        Units of work.
    desc : str
        Stage name (first word of each line).
    unit : str
        Unit name (singular; an ``s`` is added in log lines).
    quiet : bool, optional
        Force off (True) or on (False); default: off when the ``pipeline`` logger is above INFO.
    tty : bool, optional
        Force the terminal (bar) or log (lines) mode; default: ``sys.stderr.isatty()``.
    """

    def __init__(self, total: int, desc: str, unit: str = "chunk", *, quiet: bool | None = None,
                 tty: bool | None = None) -> None:
        self.total = int(total)
        self.desc = desc
        self.unit = unit
        self.n = 0
        self.enabled = self.total > 0 and not (_quiet() if quiet is None else quiet)
        self._bar = None
        self._next_step = LOG_STEP_PERCENT
        self._t0 = time.perf_counter()
        if not self.enabled:
            return
        is_tty = sys.stderr.isatty() if tty is None else tty
        if is_tty:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=self.total, unit=unit, desc=desc, leave=False, file=sys.stderr)

    def update(self, n: int = 1) -> None:
        self.update_to(self.n + n)

    def update_to(self, n: int) -> None:
        """Set the done count to ``n`` (clipped to ``total``; never goes back)."""
        n = min(self.total, max(self.n, int(n)))
        if not self.enabled or n == self.n:
            self.n = n
            return
        if self._bar is not None:
            self._bar.update(n - self.n)
        self.n = n
        if self._bar is None:
            percent = 100 * n // self.total
            if percent >= self._next_step and n < self.total:
                self._line(percent)
                self._next_step = (percent // LOG_STEP_PERCENT + 1) * LOG_STEP_PERCENT

    def _line(self, percent: int) -> None:
        unit = self.unit if self.total == 1 else self.unit + "s"
        log.info("%s: %d %% (%d/%d %s, %.1f s)", self.desc, percent, self.n, self.total, unit,
                 time.perf_counter() - self._t0)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self.enabled and self.n == self.total:
            self._line(100)
        self.enabled = False

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close()


__all__ = ["LOG_STEP_PERCENT", "Progress"]
