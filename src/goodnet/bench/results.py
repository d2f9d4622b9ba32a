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

Both files are checked where they are read: a line that is no complete JSON value (a write cut
short by a kill, fenced off since) is skipped with a warning; any other line must be a record
whose fields have the types the report relies on, or the file and line are named in one error.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from goodnet.attacks import ATTACK_ALIASES
from goodnet.defenses.base import AXES
from goodnet.errors import GoodnetError
from goodnet.paths import require_regular_file

log = logging.getLogger(__name__)

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


RATES = ("clean_accuracy", "attack_success_rate", "robust_accuracy", "detection_rate",
         "false_alarm_rate")
_MAX_AMOUNT = 1e15  # seconds or MiB: far beyond any real run, small enough for float arithmetic


def in_range(value: Any, low: float, high: float) -> bool:
    """Whether ``value`` is a JSON number (not a boolean) from ``low`` to ``high``."""
    return (isinstance(value, int | float) and not isinstance(value, bool)
            and low <= value <= high)  # NaN fails both comparisons; a huge int fails the second


def _optional(record: dict[str, Any], name: str, kind: type, what: str) -> str | None:
    value = record.get(name)
    return None if value is None or isinstance(value, kind) else f"{name} must be {what} or null"


def cell_problem(record: Any) -> str | None:
    """What is wrong with a cell record, or None: the types every reader of results relies on."""
    if not isinstance(record, dict):
        return "not a record (a JSON object)"
    return _identity_problem(record) or _measurement_problem(record) or _curve_problem(record)


def _identity_problem(record: dict[str, Any]) -> str | None:
    """What is wrong with the fields that say which cell a record is and where it ran."""
    kind = record.get("kind")
    if kind not in (None, "scan", "detect"):
        return "kind must be 'scan', 'detect' or absent"
    method = {"scan": "scanner", "detect": "detector"}.get(kind or "", "defense")
    for name in ("key", "status", "data", "arch", "attack", method):
        if not isinstance(record.get(name), str):
            return f"{name} must be a string"
    if kind is not None:
        problem = (scan_problem if kind == "scan" else detect_problem)(record)
        if problem:
            return problem
    seed = record.get("seed")
    if not (isinstance(seed, int) and not isinstance(seed, bool) and 0 <= seed < 2**63):
        return "seed must be a whole number from 0 to 2**63 - 1"
    for name in ("error", "host", "chosen", "traceback"):
        problem = _optional(record, name, str, "a string")
        if problem:
            return problem
    return None


def _measurement_problem(record: dict[str, Any]) -> str | None:
    """What is wrong with the rates measured, the times and the versions of a record."""
    for part in ("before", "after", "goodnet"):
        problem = _optional(record, part, dict, "an object")
        if problem:
            return problem
        for rate in RATES:
            value = (record.get(part) or {}).get(rate)
            if value is not None and not in_range(value, 0, 1):
                return f"{part}.{rate} must be a number between 0 and 1 or null"
    for name in ("repair_seconds", "evaluation_seconds", "measure_seconds", "peak_memory_mib",
                 "seconds"):
        value = record.get(name)
        if value is not None and not in_range(value, 0, _MAX_AMOUNT):
            return f"{name} must be a number >= 0 or null"
    versions = record.get("versions")
    if versions is not None and not (isinstance(versions, dict) and all(
            isinstance(v, str) for v in versions.values())):
        return "versions must map names to strings"
    return None


def _curve_problem(record: dict[str, Any]) -> str | None:
    """What is wrong with a record's curve: its points, axis, marks and channels pruned."""
    curve = record.get("curve")
    if curve is not None and not (isinstance(curve, list) and all(
            isinstance(point, dict) for point in curve)):
        return "curve must be a list of objects or null"
    axis = record.get("curve_axis")
    if axis is not None and axis not in AXES:
        return f"curve_axis must be one of {', '.join(AXES)} or null"
    marks = record.get("curve_marks")
    if marks is not None and not (isinstance(marks, dict) and all(
            isinstance(v, int) and not isinstance(v, bool) for v in marks.values())):
        return "curve_marks must map variant names to step numbers or be null"
    # pruned: the channels, layer → indices; a count in records from before issue 28 (now
    # pruned_count)
    pruned = record.get("pruned")
    if pruned is not None and not (_count(pruned) or (isinstance(pruned, dict) and all(
            isinstance(v, list) and all(_count(i) for i in v) for v in pruned.values()))):
        return "pruned must map layers to channel indices, be a whole number >= 0, or null"
    count = record.get("pruned_count")
    if count is not None and not _count(count):
        return "pruned_count must be a whole number >= 0 or null"
    return None


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**63


def pruned_count(record: dict[str, Any]) -> int | None:
    """The channels a repair record's chosen model prunes: ``pruned_count``, or ``pruned`` in
    records from before issue 28, where it was the count."""
    if "pruned_count" in record:
        return record["pruned_count"]
    pruned = record.get("pruned")
    return pruned if isinstance(pruned, int) else None


def _score_like(value: Any) -> bool:
    """A finite number, or one of the strings a non-finite score is stored as."""
    if isinstance(value, str):
        return value in ("inf", "-inf", "nan")
    return in_range(value, -_MAX_AMOUNT, _MAX_AMOUNT)


def scan_problem(record: dict[str, Any]) -> str | None:
    """What is wrong with the scan part of a scan cell's record, or None."""
    if record.get("status") != "ok":
        return None
    for name in ("flagged", "backdoored_model", "all_to_one"):
        if not isinstance(record.get(name), bool):
            return f"{name} must be true or false"
    for name in ("score", "threshold"):
        if not _score_like(record.get(name)):
            return f"{name} must be a number (or 'inf', '-inf', 'nan')"
    scores = record.get("scores")
    if not (isinstance(scores, list) and len(scores) <= 10**6 and all(map(_score_like, scores))):
        return "scores must be a list of numbers"
    for name in ("targets", "true_targets"):
        value = record.get(name)
        if not (isinstance(value, list) and all(
                isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)):
            return f"{name} must be a list of class numbers"
    if not in_range(record.get("scan_seconds"), 0, _MAX_AMOUNT):
        return "scan_seconds must be a number >= 0"
    return None


_MAX_SCORES = 10**7


def detect_problem(record: dict[str, Any]) -> str | None:
    """What is wrong with the detector part of a detector cell's record, or None."""
    if record.get("status") != "ok":
        return None
    value = record.get("auroc")
    if value is not None and not in_range(value, 0, 1):
        return "auroc must be a number between 0 and 1 or null"
    for name in ("detection", "false_alarm"):
        rates = record.get(name)
        if not (isinstance(rates, dict) and rates and all(
                isinstance(k, str) and _rate_like(k) and (v is None or in_range(v, 0, 1))
                for k, v in rates.items())):
            return f"{name} must map rates to numbers between 0 and 1 (or null)"
    if set(record["detection"]) != set(record["false_alarm"]):
        return "detection and false_alarm must name the same rates"
    scores = record.get("scores")
    if not (isinstance(scores, dict) and set(scores) == {"calibration", "clean", "triggered"}
            and all(isinstance(v, list) and len(v) <= _MAX_SCORES
                    and all(in_range(x, -_MAX_AMOUNT, _MAX_AMOUNT) for x in v)
                    for v in scores.values())):
        return "scores must hold the calibration, clean and triggered lists of numbers"
    if not in_range(record.get("ms_per_input"), 0, _MAX_AMOUNT):
        return "ms_per_input must be a number >= 0"
    fired = record.get("fired")
    if fired is not None and not (isinstance(fired, list) and len(fired) == len(
            scores["triggered"]) and all(v in (0, 1) and not isinstance(v, float)
                                         for v in fired)):
        return "fired must be a list of 0 and 1, one per triggered score"
    return None


def _rate_like(text: str) -> bool:
    """A rate as a detector record names it: ``"0.01"`` (the ``:g`` form), in (0, 1)."""
    try:
        value = float(text)
    except ValueError:
        return False
    return 0 < value < 1 and text == f"{value:g}"


def run_problem(record: Any) -> str | None:
    """What is wrong with a run record (a line of ``runs.jsonl``), or None."""
    if not isinstance(record, dict):
        return "not a record (a JSON object)"
    if not isinstance(record.get("started"), str):
        return "started must be a string"
    if not in_range(record.get("seconds"), 0, _MAX_AMOUNT):
        return "seconds must be a number >= 0"
    return _optional(record, "machine", dict, "an object")


def _read_records(path: Path, problem: Callable[[Any], str | None]) -> list[dict[str, Any]]:
    """Every complete record in ``path``, one per line, each checked by ``problem``."""
    if not path.exists() and not path.is_symlink():
        return []
    try:
        raw = require_regular_file(path).read_bytes()
    except OSError as error:
        raise GoodnetError(f"cannot read {path}: {error.strerror or error}") from None
    records = []
    skipped: list[int] = []
    try:
        for number, line in enumerate(raw.split(b"\n"), 1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError):
                skipped.append(number)
                continue
            except RecursionError:
                raise GoodnetError(f"{path}, line {number}: nested too deeply to be a record") \
                    from None
            except ValueError:  # an integer of thousands of digits
                raise GoodnetError(f"{path}, line {number}: a number too long to read") \
                    from None
            found = problem(value)
            if found:
                raise GoodnetError(f"{path}, line {number}: {found}")
            records.append(value)
    finally:  # one line however many, and before any error about a later line
        if len(skipped) == 1:
            log.warning("%s: line %d skipped: not a complete record (a write cut short by a "
                        "kill, or not a results file)", path, skipped[0])
        elif skipped:
            lines = ", ".join(map(str, skipped[:3])) + (", ..." if len(skipped) > 3 else "")
            log.warning("%s: %d lines skipped (lines %s): not complete records (a write cut "
                        "short by a kill, or not a results file)", path, len(skipped), lines)
    return records


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """Every complete cell record in ``path``, in file order (torn lines skipped). An attack
    written under an old name of a registered attack reads under its name now, so a grid run
    before and after the rename tabulates as one."""
    records = _read_records(Path(path), cell_problem)
    for record in records:
        if record.get("attack") in ATTACK_ALIASES:
            record["attack"] = ATTACK_ALIASES[record["attack"]]
    return records


def read_runs(path: str | Path) -> list[dict[str, Any]]:
    """Every complete run record in a run log (``runs.jsonl``: one line per ``goodnet bench``)."""
    return _read_records(Path(path), run_problem)


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
