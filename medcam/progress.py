"""Progress of long runs: which stage each case is in, and how long every stage took.

The pipeline marks its stages (load, preprocess, explain, back to scan, each writer) with
:func:`stage`; a :class:`Reporter` installed with :func:`reporting` hears when each starts and
ends. Without one, :func:`stage` costs nothing. The command line's reporter shows the stage on
the per-case progress bar and one timing line per case (``--quiet`` installs none);
:class:`StageTimes` collects the seconds per stage (benchmarks, the cohort's status records).

Reporting follows the context: threads that work for a run (medcam's prefetch) run in a copy
of its context (``contextvars.copy_context().run``), so a case loaded ahead reports under its
own case name (:func:`case`) and overlapping cases never mix their times.
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol

__all__ = [
    "BarReporter",
    "Reporter",
    "StageTimes",
    "case",
    "current_case",
    "current_reporter",
    "reporting",
    "stage",
]


class Reporter(Protocol):
    """Hears about stages. Both methods may be called from several threads."""

    def started(self, case: str, stage: str) -> None: ...

    def finished(self, case: str, stage: str, seconds: float) -> None: ...


_reporter: contextvars.ContextVar[Reporter | None] = contextvars.ContextVar(
    "medcam_reporter", default=None
)
_case: contextvars.ContextVar[str] = contextvars.ContextVar("medcam_case", default="")


def current_reporter() -> Reporter | None:
    """The reporter stages go to here (``None``: nobody listens)."""
    return _reporter.get()


def current_case() -> str:
    """The case the calling thread works on (``""`` outside one)."""
    return _case.get()


@contextlib.contextmanager
def reporting(reporter: Reporter | None) -> Iterator[None]:
    """Send the stages run inside the block to ``reporter`` (``None``: to nobody)."""
    token = _reporter.set(reporter)
    try:
        yield
    finally:
        _reporter.reset(token)


@contextlib.contextmanager
def case(name: str) -> Iterator[None]:
    """Stages inside the block belong to case ``name``."""
    token = _case.set(str(name))
    try:
        yield
    finally:
        _case.reset(token)


@contextlib.contextmanager
def stage(name: str) -> Iterator[None]:
    """Mark a stage of the current case (timed only when a reporter listens)."""
    reporter = _reporter.get()
    if reporter is None:
        yield
        return
    who = _case.get()
    reporter.started(who, name)
    start = time.perf_counter()
    try:
        yield
    finally:
        reporter.finished(who, name, time.perf_counter() - start)


class Sized:
    """An iterable with a length, so that a progress bar knows the total.

    Parameters
    ----------
    iterable : Iterable
        What is iterated (e.g. a generator of results, in order).
    length : int
        How many items it yields.
    """

    def __init__(self, iterable: Iterable, length: int) -> None:
        self.iterable, self.length = iterable, length

    def __iter__(self) -> Iterator:
        return iter(self.iterable)

    def __len__(self) -> int:
        return self.length


class StageTimes:
    """A reporter that keeps ``{case: {stage: seconds}}`` (a stage run twice adds up), and
    forwards everything to another reporter when given one."""

    def __init__(self, forward: Reporter | None = None) -> None:
        self.times: dict[str, dict[str, float]] = {}
        self.forward = forward
        self._lock = threading.Lock()

    def started(self, case: str, stage: str) -> None:
        if self.forward is not None:
            self.forward.started(case, stage)

    def finished(self, case: str, stage: str, seconds: float) -> None:
        with self._lock:
            per_case = self.times.setdefault(case, {})
            per_case[stage] = per_case.get(stage, 0.0) + seconds
        if self.forward is not None:
            self.forward.finished(case, stage, seconds)

    def pop(self, case: str) -> dict[str, float]:
        """The stage times of ``case``, forgotten here."""
        with self._lock:
            return self.times.pop(case, {})

    @staticmethod
    def summary(times: dict[str, float]) -> str:
        """``load 1.2 s, explain 0.1 s, ...`` in the order the stages ran."""
        return ", ".join(f"{name} {seconds:.2f} s" for name, seconds in times.items())


class BarReporter:
    """Shows, on a progress bar (``tqdm``), the stage each case is in: ``case: stage``
    (several cases when they overlap)."""

    def __init__(self, bar: Callable[[], Any]) -> None:
        self._bar = bar  # the bar to write on (made later than this reporter)
        self._running: dict[str, str] = {}
        self._lock = threading.Lock()

    def _show(self) -> None:
        bar = self._bar()
        if bar is not None:
            text = " | ".join(f"{c}: {s}" if c else s for c, s in self._running.items())
            bar.set_postfix_str(text, refresh=True)

    def started(self, case: str, stage: str) -> None:
        with self._lock:
            self._running[case] = stage
            self._show()

    def finished(self, case: str, stage: str, seconds: float) -> None:
        with self._lock:
            if self._running.get(case) == stage:
                del self._running[case]
            self._show()
