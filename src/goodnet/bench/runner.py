"""Run a grid: build the backdoored models it needs, then every cell not yet done.

Cells already in the results file with ``status: ok`` are skipped (matched by key, a hash of
their whole configuration), so a rerun or a resumed run does only what is missing; failed cells
are tried again. Models are built first, each once, however many defenses share it, into the
zoo folder (atomically, so a kill leaves no half-written model); then the cells run on the
executor and each record is appended to ``results.jsonl`` as it finishes.
"""

from __future__ import annotations

import contextlib
import datetime
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from goodnet.bench.cell import build_model, machine, run_cell, versions
from goodnet.bench.executors import LocalExecutor, RayExecutor
from goodnet.bench.grid import AnyCell, DetectCell, Grid, ModelJob, ScanCell
from goodnet.bench.results import RESULTS, RUNS, ResultsFile, latest, read_records
from goodnet.errors import GoodnetError


@dataclass
class RunSummary:
    """What a run did."""

    cells: int = 0
    skipped: int = 0
    done: int = 0
    failed: int = 0
    models_built: int = 0
    seconds: float = 0.0
    failures: list[str] = field(default_factory=list)


def pending_cells(grid: Grid, results: Path) -> tuple[list[AnyCell], int]:
    """The grid's cells without a successful record in ``results``, and how many have one."""
    finished = {key for key, record in latest(read_records(results)).items()
                if record.get("status") == "ok"}
    cells = grid.cells()
    todo = [cell for cell in cells if cell.key not in finished]
    return todo, len(cells) - len(todo)


def run_grid(grid: Grid, out: str | Path, executor: LocalExecutor | RayExecutor | None = None,
             *, progress: bool = True) -> RunSummary:
    """Run every missing cell of ``grid``, appending to ``out/results.jsonl``; the run itself
    (wall time, counts, executor, machine) is logged to ``out/runs.jsonl``, even when it is
    interrupted by an exception or Ctrl-C."""
    executor = executor or LocalExecutor()
    started = datetime.datetime.now(datetime.timezone.utc)
    clock = time.perf_counter()
    summary = RunSummary()

    def log(outcome: str) -> None:
        summary.seconds = time.perf_counter() - clock
        with ResultsFile(Path(out) / RUNS) as runs:
            runs.append({"grid": grid.name, "started": started.isoformat(timespec="seconds"),
                         "seconds": summary.seconds, "outcome": outcome,
                         "cells": summary.cells, "run": summary.done,
                         "skipped": summary.skipped, "failed": summary.failed,
                         "models_built": summary.models_built, "executor": executor.name,
                         "workers": executor.workers, "threads": grid.threads,
                         "machine": machine(), "versions": versions()})

    try:
        _run(grid, Path(out), executor, summary, progress)
    except BaseException:
        with contextlib.suppress(GoodnetError):  # the original error is the one to report
            log("interrupted")
        raise
    log("finished")
    return summary


def _run(grid: Grid, out: Path, executor: LocalExecutor | RayExecutor,
         summary: RunSummary, progress: bool) -> None:
    results = out / RESULTS
    todo, skipped = pending_cells(grid, results)
    summary.cells, summary.skipped = len(todo) + skipped, skipped
    if not todo:
        return
    jobs = list({cell.model.path(): cell.model for cell in todo}.values())
    running = [0]
    bar = tqdm(total=len(jobs) + len(todo), disable=not progress, unit="task",
               desc=grid.name, dynamic_ncols=True)

    def show() -> None:
        bar.set_postfix_str(f"done {summary.done}, running {running[0]}, failed "
                            f"{summary.failed}, skipped {skipped}", refresh=True)

    def tick() -> None:
        bar.update()
        show()

    with ResultsFile(results) as sink, executor.session():
        bar.set_description(f"{grid.name}: models")
        broken = _build_models(jobs, grid.threads, executor, summary, running, tick)
        runnable = _fail_unbuilt(todo, broken, sink, summary, bar.update)
        bar.set_description(f"{grid.name}: cells")
        show()
        _run_cells(runnable, executor, sink, summary, running, tick)
    bar.close()


def _build_models(jobs: list[ModelJob], threads: int, executor: LocalExecutor | RayExecutor,
                  summary: RunSummary, running: list[int], tick: Callable[[], Any]
                  ) -> dict[Path, str]:
    """Build (or find) every model the cells need; returns the error of each one that failed,
    by its path."""
    broken: dict[Path, str] = {}
    for index, built in executor.run(build_model, [(job, threads) for job in jobs],
                                     running=running):
        if isinstance(built, BaseException):
            built = {"status": "failed", "error": f"worker died: {built!r}"}
        if built.get("status") != "ok":
            broken[jobs[index].path()] = built.get("error", "unknown error")
        summary.models_built += bool(built.get("built"))
        tick()
    return broken


def _fail_unbuilt(todo: list[AnyCell], broken: dict[Path, str], sink: ResultsFile,
                  summary: RunSummary, tick: Callable[[], Any]) -> list[AnyCell]:
    """Record a failure for each cell whose model failed to build; returns the other cells."""
    runnable = []
    for cell in todo:
        error = broken.get(cell.model.path())
        if error is None:
            runnable.append(cell)
            continue
        record = _failed(cell, f"building the model failed: {error}")
        sink.append(record)
        summary.failed += 1
        summary.failures.append(f"{cell.describe()}: {record['error']}")
        tick()
    return runnable


def _run_cells(runnable: list[AnyCell], executor: LocalExecutor | RayExecutor,
               sink: ResultsFile, summary: RunSummary, running: list[int],
               tick: Callable[[], Any]) -> None:
    """Run the cells, appending each one's record to ``sink`` as it comes back."""
    for index, record in executor.run(run_cell, [(cell,) for cell in runnable],
                                      running=running):
        cell = runnable[index]
        if isinstance(record, BaseException):
            record = _failed(cell, f"worker died: {record!r}")
        sink.append(record)
        if record["status"] == "ok":
            summary.done += 1
        else:
            summary.failed += 1
            summary.failures.append(f"{cell.describe()}: {record.get('error')}")
        tick()


def _failed(cell: AnyCell, error: str) -> dict[str, Any]:
    m = cell.model
    what: dict[str, str]
    if isinstance(cell, ScanCell):
        what = {"kind": "scan", "scanner": cell.scanner.label}
    elif isinstance(cell, DetectCell):
        what = {"kind": "detect", "detector": cell.detector.label}
    else:
        what = {"defense": cell.defense.label}
    return {"key": cell.key, "status": "failed", "error": error, "data": m.data, "arch": m.arch,
            "attack": m.attack.label, **what, "seed": m.seed,
            "config": cell.configuration(), "versions": versions()}
