"""Cohort runs: a manifest of cases, sharded over ranks, resumable, never duplicated.

Each rank takes a deterministic, disjoint slice of the manifest (cases sorted by id, every
N-th from the rank's index; no padding, so no case runs twice). Every case is one transaction:
its outputs and its status record ``medcam.json`` are staged in a hidden folder and appear
together with one rename, replacing the case's previous folder as a whole (so a rerun with other
settings never leaves the earlier run's files beside the new ones). A case counts as done only
when its record says "done" with the same configuration hash. A rerun skips done cases and redoes
failed or reconfigured ones; an error in one case is recorded (the case folder then holds only
its record) and the rank moves on.

Ranks come from ``--shard i/N``, else torchrun (``RANK``/``WORLD_SIZE``), else a SLURM array
(``SLURM_ARRAY_TASK_ID``/``SLURM_ARRAY_TASK_COUNT``) or ``srun``
(``SLURM_PROCID``/``SLURM_NTASKS``), else a single process.
"""

from __future__ import annotations

import csv
import datetime
import hashlib
import json
import os
import traceback
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from medcam import __version__
from medcam.errors import InputError, MedcamError, OutputError
from medcam.io.output import OutputDir, safe_name

__all__ = [
    "Case",
    "CaseSteps",
    "cohort_status",
    "config_hash",
    "gather_and_index",
    "read_cohort_manifest",
    "resolve_shard",
    "run_cohort",
    "shard_cases",
]

STATUS_FILE = "medcam.json"
MANIFEST_COPY = "cohort_manifest.csv"
COLUMNS = ("case_id", "input", "target", "mask")


@dataclass(frozen=True)
class Case:
    """One manifest row: a unique id, an input (file or DICOM folder), optional target and mask."""

    case_id: str
    input: Path
    target: str | None = None
    mask: Path | None = None


def read_cohort_manifest(path: str | Path) -> list[Case]:
    """Read and check a cohort manifest CSV (columns ``case_id``, ``input``, optional ``target``
    and ``mask``); every problem is reported before any work starts."""
    from medcam.runner import manifest_errors

    path = Path(path)
    if not path.exists():
        raise InputError(f"The manifest {path} does not exist.")
    with manifest_errors(path), open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        columns = [c.strip() for c in (reader.fieldnames or [])]
        missing = [c for c in ("case_id", "input") if c not in columns]
        unknown = [c for c in columns if c not in COLUMNS]
        if missing or unknown:
            raise InputError(
                f"{path}: columns must be case_id, input[, target, mask]; "
                + (f"missing {missing}" if missing else "")
                + ("; " if missing and unknown else "")
                + (f"unknown {unknown}" if unknown else "")
                + "."
            )
        cases, seen, problems = [], {}, []
        for line, row in enumerate(reader, start=2):
            case_id = (row.get("case_id") or "").strip()
            raw_input = (row.get("input") or "").strip()
            if not case_id or not raw_input:
                problems.append(f"line {line}: empty case_id or input")
                continue
            if safe_name(case_id) != case_id:
                problems.append(f"line {line}: case_id {case_id!r} may only use A-Z a-z 0-9 . _ -")
            if case_id in seen:
                problems.append(f"line {line}: duplicate case_id {case_id!r} (first on line "
                                f"{seen[case_id]})")  # fmt: skip
            seen.setdefault(case_id, line)
            inp = Path(raw_input) if Path(raw_input).is_absolute() else path.parent / raw_input
            if not inp.exists():
                problems.append(f"line {line}: input {inp} does not exist")
            mask = (row.get("mask") or "").strip()
            mask_path = None
            if mask:
                mask_path = Path(mask) if Path(mask).is_absolute() else path.parent / mask
                if not mask_path.exists():
                    problems.append(f"line {line}: mask {mask_path} does not exist")
            cases.append(Case(case_id, inp, (row.get("target") or "").strip() or None, mask_path))
    if problems:
        raise InputError(f"{path} has {len(problems)} problem(s):\n  " + "\n  ".join(problems))
    if not cases:
        raise InputError(f"{path} lists no cases.")
    return cases


def resolve_shard(shard: str | None = None, env: dict[str, str] | None = None) -> tuple[int, int]:
    """``(rank, world)`` from ``"i/N"``, torchrun, SLURM, or ``(0, 1)``."""
    env = dict(os.environ if env is None else env)
    if shard:
        try:
            i, n = (int(v) for v in shard.split("/"))
        except ValueError:
            raise MedcamError(f"--shard {shard!r} must look like i/N, e.g. 0/4.") from None
        if not 0 <= i < n:
            raise MedcamError(f"--shard {shard}: need 0 <= i < N.")
        return i, n
    for rank_key, world_key in (("RANK", "WORLD_SIZE"),
                                ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT"),
                                ("SLURM_PROCID", "SLURM_NTASKS")):  # fmt: skip
        if rank_key in env and world_key in env:
            rank, world = int(env[rank_key]), int(env[world_key])
            if rank_key == "SLURM_ARRAY_TASK_ID" and "SLURM_ARRAY_TASK_MIN" in env:
                rank -= int(env["SLURM_ARRAY_TASK_MIN"])
            return rank, world
    return 0, 1


def shard_cases(cases: Sequence[Case], rank: int, world: int) -> list[Case]:
    """The rank's disjoint slice: cases sorted by id, every ``world``-th from ``rank``."""
    ordered = sorted(cases, key=lambda c: c.case_id)
    return ordered[rank::world]


def config_hash(config: dict[str, Any]) -> str:
    """Stable hash of everything that changes a case's outputs."""
    text = json.dumps({**config, "medcam": __version__}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _record(folder: Path) -> dict[str, Any] | None:
    try:
        return json.loads((folder / STATUS_FILE).read_text())
    except (OSError, ValueError):
        return None


def _write_record(stage: OutputDir, record: dict[str, Any]) -> None:
    text = json.dumps(record, indent=2)
    stage.write_file(STATUS_FILE, lambda p: p.write_text(text))


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="microseconds")


class CaseSteps(Protocol):
    """A cohort case in three steps, so that consecutive cases overlap
    (:func:`medcam.prefetch.overlapped`): ``load`` (a loader thread), ``explain`` (the calling
    thread, where the model runs), ``write`` (a writer thread, into the case's staging
    folder). Calling it, ``process(case, stage)``, runs the three in a row."""

    def load(self, case: Case) -> Any: ...

    def explain(self, case: Case, loaded: Any) -> Any: ...

    def write(self, case: Case, explained: Any, stage: OutputDir) -> list[Path]: ...

    def __call__(self, case: Case, stage: OutputDir) -> list[Path]: ...


def run_cohort(
    cases: Sequence[Case],
    out: str | Path,
    process: Callable[[Case, OutputDir], list[Path]] | CaseSteps,
    *,
    config: dict[str, Any],
    rank: int = 0,
    world: int = 1,
    progress: Callable[[Iterable], Iterable] = lambda it: it,
    log: Callable[[str], None] = print,
    prefetch: int = 1,
) -> dict[str, int]:
    """Run ``process(case, stage) -> written paths`` over this rank's cases; ``stage`` is the
    case's staging :class:`~medcam.io.output.OutputDir` (paths reported as final paths).

    When ``process`` comes in steps (:class:`CaseSteps`, as
    :func:`medcam.runner.cohort_processor` makes it) and ``prefetch`` > 0, the next case is
    loaded and the previous one written while a case is explained (``prefetch`` cases loaded
    ahead at most); the outputs are those of the serial run. Each record also holds the
    seconds each stage took.

    Returns counts ``{"done", "skipped", "failed"}`` for this rank.
    """
    from medcam.prefetch import overlapped
    from medcam.progress import Sized, StageTimes, current_reporter, reporting

    root = OutputDir(out)
    digest = config_hash(config)

    def write_manifest(path: Path) -> None:  # csv quoting: paths and targets may hold commas
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(COLUMNS)
            for c in sorted(cases, key=lambda c: c.case_id):
                w.writerow([c.case_id, c.input, c.target or "", c.mask or ""])

    root.write_file(MANIFEST_COPY, write_manifest)
    counts = {"done": 0, "skipped": 0, "failed": 0}
    todo = []
    for case in shard_cases(cases, rank, world):
        previous = _record(root.path / case.case_id)
        if previous and previous.get("status") == "done" and previous.get("config_hash") == digest:
            counts["skipped"] += 1
        else:
            todo.append(case)
    started: dict[str, str] = {}
    steps = process if all(hasattr(process, m) for m in ("load", "explain", "write")) else None

    def new_record(case: Case) -> dict[str, Any]:
        return {"case_id": case.case_id, "config_hash": digest, "rank": rank, "world": world,
                "started": started.get(case.case_id) or _now()}  # fmt: skip

    def load(case: Case) -> Any:
        started[case.case_id] = _now()
        return steps.load(case) if steps is not None else None

    def explain(case: Case, loaded: Any) -> Any:
        return steps.explain(case, loaded) if steps is not None else None

    def write(case: Case, explained: Any) -> dict[str, Any]:
        record = new_record(case)
        folder = root.path / case.case_id
        # outputs and status record are one transaction: all appear, or none
        with root.case(case.case_id) as stage:
            written = steps.write(case, explained, stage) if steps else process(case, stage)
            record.update(status="done", finished=_now(),
                          outputs=[str(p.relative_to(folder)) for p in written],
                          seconds=times.pop(case.case_id))  # fmt: skip
            warn = getattr(steps, "warning", None)  # what a reader must know (an empty map)
            warning = warn(explained) if warn is not None else None
            if warning:
                record["warning"] = warning
            _write_record(stage, record)
        return record

    times = StageTimes(forward=current_reporter())
    outcomes = overlapped(todo, load, explain, write, depth=prefetch if steps else 0,
                          label=lambda c: c.case_id)  # fmt: skip
    with reporting(times):
        try:
            for outcome in progress(Sized(outcomes, len(todo))):
                case = outcome.item
                if outcome.error is None:
                    counts["done"] += 1
                    if "warning" in outcome.value:
                        log(f"[rank {rank}] {case.case_id} WARNING: {outcome.value['warning']}")
                    continue
                err = outcome.error  # recorded; the rank moves on to its next case
                record = new_record(case)
                record.update(status="failed", error=f"{type(err).__name__}: {err}",
                              traceback="".join(traceback.format_exception(err, limit=5)),
                              finished=_now(), seconds=times.pop(case.case_id))  # fmt: skip
                counts["failed"] += 1
                log(f"[rank {rank}] {case.case_id} failed: {type(err).__name__}: {err}")
                try:
                    with root.case(case.case_id) as stage:  # a failed run leaves only its record
                        _write_record(stage, record)
                except OSError as err:  # the folder itself fails (a full disk): stop the run
                    raise OutputError(
                        f"Case {case.case_id} failed ({record['error']}), and its failure "
                        f"cannot be recorded in {root.path} either ({err.strerror or err}); the "
                        "rank stops. Nothing of the case was written. Free space or fix the "
                        "output folder, then run the cohort again: finished cases are skipped."
                    ) from err
        finally:
            outcomes.close()  # a write in flight completes; nothing after a stop starts
    return counts


def gather_and_index(out: str | Path, rank: int, world: int) -> None:
    """Under torchrun: wait for every rank (gloo barrier), then rank 0 writes ``index.csv``.

    Single-process runs just write the index. The barrier needs no GPU; if the process group
    cannot be set up, the index is left to ``medcam cohort status``.
    """
    if world > 1 and "MASTER_ADDR" in os.environ:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("gloo", rank=rank, world_size=world)
        dist.barrier()
        if rank == 0:
            cohort_status(out)
        dist.destroy_process_group()
    elif world == 1:
        cohort_status(out)


def cohort_status(out: str | Path, write_index: bool = True) -> dict[str, Any]:
    """Done / failed / missing counts of a cohort folder and a merged ``index.csv``."""
    root = Path(out)
    manifest = root / MANIFEST_COPY
    if not manifest.exists():
        raise InputError(f"{root} holds no {MANIFEST_COPY}: not a medcam cohort output folder.")
    with open(manifest, newline="") as f:
        ids = [row["case_id"] for row in csv.DictReader(f)]
    rows, counts = [], {"done": 0, "failed": 0, "missing": 0}
    for case_id in ids:
        record = _record(root / case_id)
        status = record.get("status", "missing") if record else "missing"
        counts[status if status in counts else "missing"] += 1
        rows.append({
            "case_id": case_id, "status": status,
            "config_hash": (record or {}).get("config_hash", ""),
            "finished": (record or {}).get("finished", ""),
            "outputs": ";".join((record or {}).get("outputs", [])),
            "error": (record or {}).get("error", ""),
        })  # fmt: skip
    if write_index:

        def write(path: Path) -> None:
            with open(path, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["case_id"])
                w.writeheader()
                w.writerows(rows)

        OutputDir(root).write_file("index.csv", write)
    return {
        "counts": counts,
        "total": len(ids),
        "rows": rows,
        "complete": counts["done"] == len(ids),
    }
