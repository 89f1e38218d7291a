"""The overlapped case loop: what runs at the same time, in which order, and what errors do."""

from __future__ import annotations

import threading
import time

import pytest

from medcam.prefetch import overlapped
from medcam.progress import StageTimes, reporting, stage


class Recorder:
    """load / explain / write that log events and track how many cases are in memory."""

    def __init__(self, fail: dict[tuple[str, int], Exception] | None = None, delay=0.02):
        self.events: list[tuple[str, str, int, str]] = []
        self.lock = threading.Lock()
        self.alive: set[int] = set()  # cases loaded and not yet written
        self.max_alive = 0
        self.fail = fail or {}
        self.delay = delay

    def _log(self, what: str, item: int, phase: str) -> None:
        with self.lock:
            self.events.append((what, phase, item, threading.current_thread().name))

    def _step(self, name: str, item: int) -> None:
        self._log(name, item, "start")
        with stage(name):
            time.sleep(self.delay)
        if (name, item) in self.fail:
            self._log(name, item, "error")
            raise self.fail[(name, item)]
        self._log(name, item, "end")

    def load(self, item: int):
        self._step("load", item)
        with self.lock:
            self.alive.add(item)
            self.max_alive = max(self.max_alive, len(self.alive))
        return {"scan": item}

    def explain(self, item: int, loaded):
        assert loaded == {"scan": item}
        self._step("explain", item)
        return {"heat": item}

    def write(self, item: int, explained):
        assert explained == {"heat": item}
        self._step("write", item)
        with self.lock:
            self.alive.discard(item)
        return f"out{item}"

    def times(self, what: str, item: int, phase: str) -> int:
        return next(i for i, e in enumerate(self.events) if e[:3] == (what, phase, item))


@pytest.mark.parametrize("depth", [0, 1, 2])
def test_every_case_gets_the_serial_calls_and_results_in_order(depth):
    rec = Recorder()
    outcomes = list(overlapped(range(6), rec.load, rec.explain, rec.write, depth=depth))
    assert [o.item for o in outcomes] == list(range(6))
    assert [o.value for o in outcomes] == [f"out{i}" for i in range(6)]
    assert all(o.error is None for o in outcomes)
    for i in range(6):  # each case: loaded, explained, written, in that order
        assert rec.times("load", i, "end") < rec.times("explain", i, "start")
        assert rec.times("explain", i, "end") < rec.times("write", i, "start")
    for i in range(5):  # explained in order; written in order, one at a time
        assert rec.times("explain", i, "end") < rec.times("explain", i + 1, "start")
        assert rec.times("write", i, "end") < rec.times("write", i + 1, "start")
    # bounded: the case written, the one explained and `depth` loaded ahead
    assert rec.max_alive <= depth + 2


def test_the_next_case_loads_and_the_previous_writes_while_one_is_explained():
    rec = Recorder(delay=0.05)
    list(overlapped(range(4), rec.load, rec.explain, rec.write, depth=1))
    overlap_load = overlap_write = False
    for i in range(1, 3):
        start, end = rec.times("explain", i, "start"), rec.times("explain", i, "end")
        overlap_load |= rec.times("load", i + 1, "start") < end
        overlap_write |= rec.times("write", i - 1, "end") > start
    assert overlap_load and overlap_write
    threads = {e[3] for e in rec.events}
    assert any(t.startswith("medcam-load") for t in threads)
    assert any(t.startswith("medcam-write") for t in threads)
    explained_in = {e[3] for e in rec.events if e[0] == "explain"}
    assert explained_in == {threading.current_thread().name}  # the model stays in this thread


@pytest.mark.parametrize("depth", [0, 1])
@pytest.mark.parametrize("where", ["load", "explain", "write"])
def test_an_error_stays_with_its_case_after_the_cases_before_it_are_written(depth, where):
    rec = Recorder(fail={(where, 2): ValueError("bad case 2")})
    outcomes = []
    for outcome in overlapped(range(5), rec.load, rec.explain, rec.write, depth=depth):
        rec._log("delivered", outcome.item, "end")
        outcomes.append(outcome)
    assert [o.item for o in outcomes] == list(range(5))
    bad = outcomes[2]
    assert isinstance(bad.error, ValueError) and bad.stage == where
    assert [o.value for i, o in enumerate(outcomes) if i != 2] == ["out0", "out1", "out3", "out4"]
    # case 1 was written before case 2's failure was delivered
    assert rec.times("write", 1, "end") < rec.times("delivered", 2, "end")


def test_stopping_at_an_error_leaves_no_half_written_case():
    rec = Recorder(fail={("explain", 2): RuntimeError("stop")})
    gen = overlapped(range(6), rec.load, rec.explain, rec.write, depth=2)
    for outcome in gen:
        if outcome.error is not None:
            gen.close()  # what medcam explain does: stop at the first failed case
            break
    written = [e[2] for e in rec.events if e[0] == "write" and e[1] == "end"]
    started = [e[2] for e in rec.events if e[0] == "write" and e[1] == "start"]
    assert written == started == [0, 1]  # nothing after the failed case, nothing half done


def test_stage_times_are_reported_per_case_from_every_thread():
    rec = Recorder()
    times = StageTimes()
    with reporting(times):
        list(overlapped([3, 4], rec.load, rec.explain, rec.write, depth=1, label=lambda i: f"c{i}"))
    assert set(times.times) == {"c3", "c4"}
    for per_case in times.times.values():
        assert list(per_case) == ["load", "explain", "write"]
        assert all(s > 0 for s in per_case.values())
