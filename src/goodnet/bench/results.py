"""The append-only results file of a benchmark: one JSON record per line, one line per cell run.

Only the runner's main process writes. Each record is written with a single ``write`` on a file
opened for appending and made durable with ``fsync`` before the cell counts as done, so a run
killed at any instant (even by SIGKILL) loses at most the cell it was writing. A torn last line
(the kill landed inside the write) is ignored on reading and fenced off with a newline before
the next append, so it can never glue itself to a good record. A cell run again (after a
failure) appends a new record; readers keep the last record per cell key.

Beside it, ``runs.jsonl`` logs each ``goodnet bench`` that wrote to the folder (when, how long,
how many cells, which executor, which machine), written the same way, so a report can state the
wall time a grid took even when it was run in several sittings.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from goodnet.errors import GoodnetError

RESULTS = "results.jsonl"
RUNS = "runs.jsonl"


def finite(value: Any) -> Any:
    """``value`` with every NaN or infinity replaced by None (JSON has neither)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite(v) for v in value]
    return value


def _read_objects(path: Path) -> list[dict[str, Any]]:
    """Every complete JSON object in ``path``, one per line (torn or foreign lines skipped)."""
    if not path.exists():
        return []
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise GoodnetError(f"cannot read {path}: {error.strerror or error}") from None
    objects = []
    for line in raw.split(b"\n"):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue  # a record torn by a kill mid-write
        if isinstance(value, dict):
            objects.append(value)
    return objects


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """Every complete cell record in ``path`` (in file order; torn or foreign lines skipped)."""
    return [r for r in _read_objects(Path(path)) if isinstance(r.get("key"), str)]


def read_runs(path: str | Path) -> list[dict[str, Any]]:
    """Every complete run record in a run log (``runs.jsonl``: one line per ``goodnet bench``)."""
    return [r for r in _read_objects(Path(path))
            if isinstance(r.get("seconds"), int | float) and isinstance(r.get("started"), str)]


def latest(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The last record of each cell key."""
    return {record["key"]: record for record in records}


class ResultsFile:
    """Appends records to a results file, durably, one line each."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        except OSError as error:
            raise GoodnetError(f"cannot write {self.path}: {error.strerror or error}") from None
        self._fence()

    def _fence(self) -> None:
        """End a torn last line (from a killed run) so the next record starts a line of its
        own."""
        size = os.fstat(self._fd).st_size
        if size:
            with open(self.path, "rb") as handle:
                handle.seek(size - 1)
                if handle.read(1) != b"\n":
                    os.write(self._fd, b"\n")

    def append(self, record: dict[str, Any]) -> None:
        line = (json.dumps(finite(record), default=str, allow_nan=False) + "\n").encode()
        view = memoryview(line)
        try:
            while view:  # a regular file takes it in one write; loop only on a short write
                view = view[os.write(self._fd, view):]
            os.fsync(self._fd)
        except OSError as error:
            raise GoodnetError(f"cannot write {self.path}: {error.strerror or error}") from None

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> ResultsFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
