"""``medcam listen``: an AI node. A DICOM C-STORE SCP receives series (what a PACS routing rule
sends), waits until a series is complete, explains it and stores the results back.

What a PACS administrator can rely on:

- **Complete series only.** A series counts as complete when no instance of it has arrived for
  ``quiet_period`` seconds (DICOM has no "end of series" signal).
- **Bounded.** At most ``max_series`` series wait or run at once; instances of a further new
  series are refused with status 0xA700 (out of resources), so the sender retries later
  instead of filling the disk.
- **Persistent journal.** Every received instance is on disk (``state/inbox/``) before it is
  acknowledged, and every series' state is in ``state/journal.sqlite3``. After a restart,
  series still receiving or waiting are explained, results not yet confirmed by the destination
  are sent again, and delivered series are never sent again. Results carry UIDs derived from
  the source instances, the model and the settings, so a resent result is stored once.
- **One bad series never stops the node.** A series the model cannot take is marked
  ``failed`` with the reason (its files are kept for inspection); a destination that is down
  is retried with growing delays, up to ``max_attempts`` times.
- **No patient data in logs.** Series are named by the end of their UID.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from medcam.errors import MedcamError, PacsError
from medcam.pacs import DEFAULT_AE_TITLE, check_ae_title
from medcam.sinks.base import WrittenCase

__all__ = ["Journal", "Listener"]

# job states
RECEIVING, QUEUED, RUNNING, EXPLAINED = "receiving", "queued", "running", "explained"
DONE, FAILED, DUPLICATE = "done", "failed", "duplicate"
ACTIVE = (RECEIVING, QUEUED, RUNNING, EXPLAINED)
OUT_OF_RESOURCES = 0xA700
CANNOT_UNDERSTAND = 0xC000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    key TEXT PRIMARY KEY,
    study_uid TEXT NOT NULL,
    series_uid TEXT NOT NULL,
    state TEXT NOT NULL,
    first_at REAL NOT NULL,
    last_at REAL NOT NULL,
    instances INTEGER NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_try REAL NOT NULL DEFAULT 0,
    digest TEXT,
    case_name TEXT,
    outputs TEXT,
    error TEXT,
    updated REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS jobs_series ON jobs (series_uid, state);
"""


class Journal:
    """The listener's persistent state: one row per received series (a *job*).

    States: ``receiving`` -> ``queued`` (complete) -> ``running`` -> ``explained`` (results
    written locally) -> ``done`` (destination confirmed); or ``failed`` / ``duplicate`` (the
    same instances were already explained and delivered).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.RLock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        with self._lock:
            self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _exec(self, sql: str, args: Sequence[Any] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    def recover(self) -> int:
        """After a restart: jobs that were running go back to the queue. Returns how many."""
        with self._lock:
            rows = self._exec("SELECT key FROM jobs WHERE state = ?", (RUNNING,))
            self._exec(
                "UPDATE jobs SET state = ?, updated = ? WHERE state = ?",
                (QUEUED, time.time(), RUNNING),
            )
        return len(rows)

    def receiving_job(self, study_uid: str, series_uid: str, max_active: int) -> str | None:
        """The key of the job receiving ``series_uid`` (a new one if none is); ``None`` when
        ``max_active`` series are already waiting or running (refuse the instance)."""
        now = time.time()
        with self._lock:
            rows = self._exec(
                "SELECT key FROM jobs WHERE series_uid = ? AND state = ?", (series_uid, RECEIVING)
            )
            if rows:
                return str(rows[0]["key"])
            active = self._exec(f"SELECT COUNT(*) AS n FROM jobs WHERE state IN {ACTIVE}")
            if int(active[0]["n"]) >= max_active:
                return None
            digest = hashlib.sha256(series_uid.encode()).hexdigest()[:12]
            key = f"{digest}-{uuid.uuid4().hex[:8]}"
            self._exec(
                "INSERT INTO jobs (key, study_uid, series_uid, state, first_at, last_at, "
                "updated) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (key, study_uid, series_uid, RECEIVING, now, now, now),
            )
            return key

    def received(self, key: str) -> None:
        now = time.time()
        self._exec(
            "UPDATE jobs SET instances = instances + 1, last_at = ?, updated = ? WHERE key = ?",
            (now, now, key),
        )

    def complete_quiet(self, quiet_period: float) -> list[str]:
        """Mark series with no instance for ``quiet_period`` seconds complete (queued)."""
        now = time.time()
        with self._lock:
            rows = self._exec(
                "SELECT key FROM jobs WHERE state = ? AND last_at <= ?",
                (RECEIVING, now - quiet_period),
            )
            for row in rows:
                self.set(row["key"], state=QUEUED)
        return [str(r["key"]) for r in rows]

    def next_job(self) -> sqlite3.Row | None:
        """The oldest job with work to do now (queued, or explained and due for delivery)."""
        rows = self._exec(
            "SELECT * FROM jobs WHERE (state = ? OR (state = ? AND next_try <= ?)) "
            "ORDER BY first_at LIMIT 1",
            (QUEUED, EXPLAINED, time.time()),
        )
        return rows[0] if rows else None

    def set(self, key: str, **values: Any) -> None:
        values["updated"] = time.time()
        cols = ", ".join(f"{k} = ?" for k in values)
        self._exec(f"UPDATE jobs SET {cols} WHERE key = ?", (*values.values(), key))

    def get(self, key: str) -> sqlite3.Row:
        return self._exec("SELECT * FROM jobs WHERE key = ?", (key,))[0]

    def delivered_digest(self, digest: str) -> str | None:
        """Key of a delivered job that explained exactly these instances, if any."""
        rows = self._exec("SELECT key FROM jobs WHERE digest = ? AND state = ?", (digest, DONE))
        return str(rows[0]["key"]) if rows else None

    def jobs(self) -> list[dict[str, Any]]:
        return [dict(r) for r in self._exec("SELECT * FROM jobs ORDER BY first_at")]

    def counts(self) -> dict[str, int]:
        rows = self._exec("SELECT state, COUNT(*) AS n FROM jobs GROUP BY state")
        return {str(r["state"]): int(r["n"]) for r in rows}


def _instances_digest(folder: Path) -> str:
    """Digest of a received series: its sorted instance file names (= SOP Instance UIDs)."""
    names = sorted(p.name for p in folder.glob("*.dcm"))
    return hashlib.sha256("\n".join(names).encode()).hexdigest()


class Listener:
    """A DICOM storage SCP that explains each complete series and stores the results.

    Parameters
    ----------
    pipeline:
        A :class:`medcam.pipeline.Pipeline` with the sinks results go to.
    state:
        Folder of the journal, received instances (``inbox/``) and results not yet delivered
        (``outbox/``). Keep it on a local disk; it holds patient data while jobs are open.
    ae_title, port, host:
        Where the node listens (callers must address it by ``ae_title``).
    quiet_period:
        Seconds without a new instance after which a series counts as complete.
    max_series:
        Series that may wait or run at once; instances of further new series are refused
        (0xA700), so the sender retries later.
    allowed_callers:
        Calling AE titles that may send (default: any).
    max_attempts:
        Delivery attempts per series before it is marked failed (delays double from
        ``retry_delay`` seconds up to 5 minutes).
    keep:
        Keep delivered results and received instances (default: remove them once the
        destination confirmed the results).
    """

    def __init__(
        self,
        pipeline: Any,
        state: str | Path,
        *,
        ae_title: str = DEFAULT_AE_TITLE,
        port: int = 11112,
        host: str = "0.0.0.0",
        quiet_period: float = 10.0,
        max_series: int = 16,
        allowed_callers: Sequence[str] = (),
        max_attempts: int = 10,
        retry_delay: float = 5.0,
        keep: bool = False,
        log: Callable[[str], None] = print,
    ) -> None:
        if quiet_period <= 0 or max_series < 1 or max_attempts < 1:
            raise MedcamError("quiet_period must be > 0, max_series and max_attempts >= 1.")
        self.pipeline = pipeline
        self.state = Path(state)
        self.inbox, self.outbox = self.state / "inbox", self.state / "outbox"
        for folder in (self.state, self.inbox, self.outbox):
            try:
                folder.mkdir(parents=True, exist_ok=True)
            except OSError as err:
                raise MedcamError(f"Cannot create the state folder {folder}: {err}") from err
        self.ae_title = check_ae_title(ae_title, "--ae-title")
        for caller in allowed_callers:
            check_ae_title(caller, "An allowed calling AE title")
        self.port, self.host = int(port), host
        self.quiet_period, self.max_series = float(quiet_period), int(max_series)
        self.allowed_callers = list(allowed_callers)
        self.max_attempts, self.retry_delay, self.keep = max_attempts, retry_delay, keep
        self.log = log
        self.journal = Journal(self.state / "journal.sqlite3")
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._server = None
        self._threads: list[threading.Thread] = []
        self._busy = threading.Lock()

    # -- receiving --------------------------------------------------------------------------

    def _on_store(self, event) -> int:
        try:
            ds = event.dataset
            study, series = str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID)
        except Exception:
            return CANNOT_UNDERSTAND  # no study/series UID: cannot be a series member
        from medcam.sources.dimse import received_file_name

        key = self.journal.receiving_job(study, series, self.max_series)
        if key is None:
            self.log(
                f"refused an instance of series ...{series[-12:]}: {self.max_series} "
                "series already waiting (sender will retry)"
            )
            return OUT_OF_RESOURCES
        folder = self.inbox / key
        folder.mkdir(exist_ok=True)
        final = folder / received_file_name(event.request.AffectedSOPInstanceUID)
        tmp = folder / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            with open(tmp, "wb") as f:
                f.write(event.encoded_dataset())
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)  # on disk before it is acknowledged
        except OSError as err:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            self.log(f"cannot store a received instance ({err.strerror}); refused")
            return OUT_OF_RESOURCES
        self.journal.received(key)
        return 0x0000

    def start(self) -> None:
        """Listen, and start the completion and worker threads (returns at once)."""
        from pynetdicom import AE, AllStoragePresentationContexts, evt
        from pynetdicom.sop_class import Verification

        recovered = self.journal.recover()
        if recovered:
            self.log(f"journal: {recovered} interrupted series queued again")
        ae = AE(ae_title=self.ae_title)
        ae.supported_contexts = AllStoragePresentationContexts
        ae.add_supported_context(Verification)
        ae.require_called_aet = True
        if self.allowed_callers:
            ae.require_calling_aet = self.allowed_callers
        try:
            self._server = ae.start_server(
                (self.host, self.port),
                block=False,
                evt_handlers=[(evt.EVT_C_STORE, self._on_store)],
            )
        except OSError as err:
            raise MedcamError(
                f"Cannot listen on {self.host}:{self.port}: {err.strerror or err}. "
                "Choose a free port (--port)."
            ) from err
        self._stop.clear()
        self._threads = [threading.Thread(target=self._loop, name="medcam-worker", daemon=True)]
        for t in self._threads:
            t.start()
        self.log(f"listening as {self.ae_title} on {self.host}:{self.port}; state in {self.state}")

    def stop(self) -> None:
        """Stop listening and let the job at hand finish; what is left stays in the journal."""
        self._stop.set()
        self._wake.set()
        if self._server is not None:
            self._server.shutdown()
            self._server = None
        for t in self._threads:
            t.join(timeout=600)
        self._threads = []
        self.journal.close()

    def serve_forever(self) -> None:
        """Run until interrupted (Ctrl-C or SIGTERM)."""
        import signal

        self.start()
        stop = threading.Event()
        previous = signal.signal(signal.SIGTERM, lambda *_: stop.set())
        try:
            while not stop.wait(0.5):
                pass
        except KeyboardInterrupt:
            pass
        finally:
            signal.signal(signal.SIGTERM, previous)
            self.log("stopping: finishing the job at hand; the rest stays in the journal")
            self.stop()

    def idle(self) -> bool:
        """True when no job waits, runs or is due (for tests and status)."""
        counts = self.journal.counts()
        if any(counts.get(s, 0) for s in (RECEIVING, QUEUED, RUNNING)):
            return False
        return self.journal.next_job() is None and not self._busy.locked()

    # -- working ----------------------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stop.is_set():
            for key in self.journal.complete_quiet(self.quiet_period):
                self.log(
                    f"series ...{self.journal.get(key)['series_uid'][-12:]} complete "
                    f"({self.journal.get(key)['instances']} instances), queued"
                )
            job = self.journal.next_job()
            if job is None:
                self._wake.wait(min(0.5, self.quiet_period / 4))
                self._wake.clear()
                continue
            with self._busy:
                self.run_job(job)

    def run_job(self, job) -> None:
        """Explain (if needed) and deliver one job; every failure is recorded, none escapes."""
        key, label = str(job["key"]), f"series ...{str(job['series_uid'])[-12:]}"
        try:
            if job["state"] == QUEUED:
                if not self._explain(job, label):
                    return
                job = self.journal.get(key)
            self._deliver(job, label)
        except Exception as err:  # never let one series stop the node
            self.journal.set(key, state=FAILED, error=f"{type(err).__name__}: {err}"[:2000])
            self.log(f"{label}: failed: {type(err).__name__}: {err}")

    def _explain(self, job, label: str) -> bool:
        from medcam.pipeline import series_case_name

        key = str(job["key"])
        folder = self.inbox / key
        digest = _instances_digest(folder) if folder.is_dir() else ""
        earlier = self.journal.delivered_digest(digest) if digest else None
        if earlier is not None:
            self.journal.set(key, state=DUPLICATE, digest=digest, error=f"same as job {earlier}")
            self.log(
                f"{label}: the same instances were explained and delivered before "
                f"(job {earlier}); nothing sent again"
            )
            self._cleanup(key, None)
            return False
        self.journal.set(key, state=RUNNING, digest=digest)
        case = f"{series_case_name(str(job['series_uid']))}-{key[-8:]}"
        try:
            if not folder.is_dir():
                raise MedcamError("its received files are missing from the state folder")
            written = self.pipeline.explain(folder, self.outbox, case)
        except Exception as err:
            self.journal.set(key, state=FAILED, error=f"{type(err).__name__}: {err}"[:2000])
            self.log(f"{label}: cannot be explained: {err}")
            return False
        outputs = {f: [str(p) for p in paths] for f, paths in written.outputs.items()}
        self.journal.set(
            key,
            state=EXPLAINED,
            case_name=case,
            next_try=0,
            outputs=json.dumps({"study": written.study_uid, "outputs": outputs}),
        )
        self.log(f"{label}: explained")
        return True

    def _deliver(self, job, label: str) -> None:
        key = str(job["key"])
        record = json.loads(job["outputs"])
        case = WrittenCase(
            str(job["case_name"]),
            self.outbox / str(job["case_name"]),
            {f: [Path(p) for p in v] for f, v in record["outputs"].items()},
            record["study"],
        )
        try:
            stored = self.pipeline.deliver(case)
        except PacsError as err:
            attempts = int(job["attempts"]) + 1
            if attempts >= self.max_attempts:
                self.journal.set(key, state=FAILED, attempts=attempts, error=str(err)[:2000])
                self.log(f"{label}: delivery failed {attempts} times, giving up: {err}")
                return
            delay = min(300.0, self.retry_delay * 2 ** (attempts - 1))
            self.journal.set(
                key, attempts=attempts, next_try=time.time() + delay, error=str(err)[:2000]
            )
            self.log(f"{label}: delivery attempt {attempts} failed, retry in {delay:.0f} s: {err}")
            return
        self.journal.set(key, state=DONE, attempts=int(job["attempts"]) + 1, error=None)
        self.log(f"{label}: {stored} result instances delivered")
        self._cleanup(key, case.folder)

    def _cleanup(self, key: str, results: Path | None) -> None:
        if self.keep:
            return
        shutil.rmtree(self.inbox / key, ignore_errors=True)
        if results is not None:
            shutil.rmtree(results, ignore_errors=True)
