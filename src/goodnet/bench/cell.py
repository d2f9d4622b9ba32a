"""The work of a benchmark: build a backdoored model, and run one defense on it and measure.

Both functions take plain frozen settings and return plain records, so any executor (this
process, a process pool, Ray) can run them; neither raises: a failure comes back as a record
with ``status: "failed"`` and the error, and the grid goes on.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import platform
import threading
import time
import traceback
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from goodnet.artifacts import load_model, save_model
from goodnet.attacks import ATTACKS, attack_class, make_attack
from goodnet.backdoor import attack_from_card, train_model
from goodnet.bench.detect_report import screen_figures
from goodnet.bench.grid import CLEAN, AnyCell, DetectCell, ModelJob, ScanCell, normal, resolved
from goodnet.data import load_dataset, split_clean
from goodnet.data.dataset import ImageData
from goodnet.data.holdout import HoldOut, defender_clean
from goodnet.defenses import make_defense
from goodnet.detectors import make_detector
from goodnet.errors import GoodnetError
from goodnet.metrics import auroc, poisoned_batches
from goodnet.models import model_device
from goodnet.pipeline import repair
from goodnet.scans import make_scanner
from goodnet.settings import build_settings
from goodnet.verdict import verdict_scanner
from goodnet.version import __version__


def versions() -> dict[str, str]:
    import numpy

    return {"goodnet": __version__, "torch": torch.__version__, "numpy": numpy.__version__,
            "python": platform.python_version()}


def machine() -> dict[str, Any]:
    """The machine this process runs on, as a benchmark reports it: host name, CPU model and
    count, memory, and the GPU PyTorch sees (if any)."""
    cpu = platform.processor() or platform.machine()
    memory = None
    try:
        with open("/proc/cpuinfo") as handle:
            cpu = next((line.split(":", 1)[1].strip() for line in handle
                        if line.startswith("model name")), cpu)
        with open("/proc/meminfo") as handle:
            kib = next(int(line.split()[1]) for line in handle if line.startswith("MemTotal"))
        memory = round(kib / 2**20, 1)
    except (OSError, ValueError, IndexError, StopIteration):
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"host": platform.node(), "cpu": cpu, "cpus": os.cpu_count(), "memory_gib": memory,
            "gpu": gpu}


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource
        import sys

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # the peak so far, not now
        return peak if sys.platform == "darwin" else peak * 1024


class PeakMemory:
    """The largest resident set size of this process while the block runs (sampled every 20 ms,
    plus at both ends), in MiB: per cell, whichever executor runs it."""

    def __init__(self, interval: float = 0.02) -> None:
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, _rss_bytes())

    def __enter__(self) -> PeakMemory:
        self.peak = _rss_bytes()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes())

    @property
    def mib(self) -> float:
        return self.peak / 2**20


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask, where the system has one)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run with ``n`` PyTorch threads, at most the CPUs this process may use (each thread costs
    memory: a grid's ``threads: 1000000000`` would take gigabytes), and put the caller's
    setting back after."""
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, min(n, usable_cpus())))
    try:
        yield
    finally:
        torch.set_num_threads(before)


@functools.lru_cache(maxsize=4)
def _data(name: str, split: str, limit: int | None) -> ImageData:
    """A data set (its first ``limit`` images), memoised per worker process: the cells of a grid
    read the same few data sets over and over, and nothing writes to them."""
    data = load_dataset(name, split)
    if limit is not None and limit < len(data):
        data = data.subset(torch.arange(limit), f"{data.name}[:{limit}]")
    return data


def _failure(error: BaseException) -> dict[str, Any]:
    message = str(error) if isinstance(error, GoodnetError) else \
        f"{type(error).__name__}: {error}"
    record = {"status": "failed", "error": message.splitlines()[0] if message else message}
    if not isinstance(error, GoodnetError):
        record["traceback"] = traceback.format_exc(limit=-8)
    return record


def check_model(job: ModelJob, card_training: dict[str, Any], card_attack: Any) -> None:
    """Refuse a cached model built with other settings than ``job`` asks for."""
    wanted = job.train_config_dict()
    found = card_training.get("config", {})
    attack = _stored_attack(card_attack)
    expected_attack = (None if job.attack.name == CLEAN
                       else job.attack.resolved(ATTACKS, "attack"))
    held = HoldOut.from_training(card_training, str(job.path()))
    found_hold_out = (held.amount, held.seed) if held is not None else (0, job.seed)
    if normal(found) != normal(wanted) or normal(attack) != normal(expected_attack) or \
            found_hold_out != (job.hold_out, job.seed):
        why = ("trained on the images now held out for the defender (a zoo from before "
               "issue 27)" if held is None and job.hold_out else "built with other training, "
               "attack or hold-out settings than the grid asks for")
        raise GoodnetError(f"{job.path()}: this cached model was {why}; move it away to "
                           "rebuild")


def _stored_attack(card_attack: Any) -> dict[str, Any] | None:
    """A card's attack settings resolved as a key hashes them (a card written before a setting
    was renamed reads the same as one written after), or None for a clean model; a card whose
    settings no longer build reads as written (and so matches nothing)."""
    if not card_attack:
        return None
    name, config = card_attack.get("name"), card_attack.get("config")
    try:
        return resolved(build_settings(attack_class(name).Config, config, "attack",
                                       warn=False))
    except GoodnetError:
        return config


def build_model(job: ModelJob, threads: int = 1) -> dict[str, Any]:
    """Train and save ``job``'s model unless a valid one is cached; a record of what happened."""
    path = job.path()
    record: dict[str, Any] = {"path": str(path), "status": "ok", "built": False}
    try:
        with torch_threads(threads):
            if path.exists():
                loaded = load_model(path)
                check_model(job, loaded.card.training, loaded.card.attack)
                return record
            train = _data(job.data, "train", job.train_limit)
            test = _data(job.data, "test", None)  # the card's figures: the whole test set
            attack = None
            if job.attack.name != CLEAN:
                attack = make_attack(job.attack.name, dict(job.attack.settings),
                                     train.image_shape, train.num_classes)
            start = time.perf_counter()
            result = train_model(job.arch, train, test, job.train_config(), attack,
                                 hold_out=job.hold_out)
            save_model(path, result.model, result.card, extras=result.extras)
            record.update(built=True, seconds=time.perf_counter() - start)
    except Exception as error:  # recorded, and the grid goes on
        record.update(_failure(error))
    return record


def _number(value: float) -> float | str:
    """A float for JSON: infinities and NaN as the strings float() reads back."""
    return float(value) if math.isfinite(value) else str(float(value))


def _new_record(job: Any, **fields: str) -> dict[str, Any]:
    """A cell's record before it runs: the model it is about and the method (``fields``)."""
    return {"key": None, "status": "ok", "data": job.data, "arch": job.arch,
            "attack": job.attack.label, **fields, "seed": job.seed, "versions": versions(),
            "host": platform.node()}


def _card_figures(card: Any) -> dict[str, Any]:
    """The backdoored model's own figures, from its card, as a cell's record keeps them."""
    return {"clean_accuracy": card.metrics.get("clean_accuracy"),
            "attack_success_rate": card.metrics.get("attack_success_rate")}


def _load_checked(job: Any) -> Any:
    """The job's model file, checked to be the model the job describes."""
    loaded = load_model(job.path())
    check_model(job, loaded.card.training, loaded.card.attack)
    return loaded


def _model_and_data(job: ModelJob, clean: float | int) -> tuple[Any, ImageData, ImageData]:
    """(the job's checked model, its test images, the defender's clean data): what a defense
    or detector cell starts from."""
    loaded = _load_checked(job)
    test = _data(job.data, "test", job.test_limit)
    return loaded, test, _clean(job, loaded.card, clean)


def _clean(job: ModelJob, card: Any, clean: float | int) -> ImageData:
    """The defender's clean data, drawn with the job's seed from the images its model never
    saw (:func:`goodnet.data.holdout.defender_clean`, as ``--clean`` on the command line)."""
    train = _data(job.data, "train", job.train_limit)
    images, _ = defender_clean(train, clean, job.seed,
                               HoldOut.from_training(card.training, str(job.path())))
    return images


def run_scan_cell(cell: ScanCell) -> dict[str, Any]:
    """Run ``cell``'s scanner on its (already built) model: one result record, with what the
    model really is (backdoored or clean, its target and attack success) beside the verdict."""
    job = cell.model
    record = _new_record(job, kind="scan", scanner=cell.scanner.label)
    start = time.perf_counter()
    try:
        record.update(key=cell.key, config=cell.configuration())
        with torch_threads(cell.threads), PeakMemory() as memory:
            loaded = _load_checked(job)
            clean = None
            if cell.needs_clean():
                clean = _clean(job, loaded.card, cell.clean)
            scanner = make_scanner(cell.scanner.name, dict(cell.scanner.settings))
            report = scanner.scan(loaded.model, clean)
        attack = (loaded.card.attack or {}).get("config") or {}
        verdict = report.verdict
        record.update({
            "backdoored_model": job.attack.name != CLEAN,
            "true_targets": ([attack["target"]] if attack.get("target") is not None
                             else list(attack.get("targets") or [])),
            "all_to_one": (job.attack.name != CLEAN and attack.get("target") is not None
                           and attack.get("mode", "all-to-one") == "all-to-one"),
            "model_card": _card_figures(loaded.card),
            "flagged": verdict.backdoored, "targets": list(verdict.targets),
            "score": _number(verdict.score), "threshold": _number(verdict.threshold),
            "score_name": report.score_name, "scores": [_number(v) for v in verdict.scores],
            "clean_images": report.clean_images, "scan_seconds": report.seconds,
            "peak_memory_mib": memory.mib,
        })
    except Exception as error:  # recorded, and the grid goes on
        record.update(_failure(error))
        record["seconds"] = time.perf_counter() - start
    return record


SCORE_DIGITS = 6  # significant digits of a stored score (the report combines detectors on them)


def _stored(scores: torch.Tensor) -> list[float]:
    return [float(f"{v:.{SCORE_DIGITS}g}") for v in scores.double().tolist()]


def _triggered_scores(detection: Any, test: ImageData, attack: Any) -> torch.Tensor:
    """The detection's scores of the triggered copies of ``test`` (other classes than the
    target)."""
    device = model_device(detection.model)
    with torch.no_grad():
        triggered = [detection(x_poisoned.to(device)).float().cpu()
                     for _, _, parts in poisoned_batches(test, attack, 256)
                     for _, x_poisoned, _, _ in parts]
    return torch.cat(triggered) if triggered else torch.empty(0)


def _fired(model: nn.Module, test: ImageData, attack: Any) -> list[int]:
    """Which triggered copies of ``test`` the backdoored ``model`` sends to their target (the
    working triggers), 1 or 0 in the order of :func:`_triggered_scores`."""
    device = model_device(model)
    with torch.no_grad():
        fired = [model(x_poisoned.to(device)).argmax(1).cpu() == targets.cpu()
                 for _, _, parts in poisoned_batches(test, attack, 256)
                 for _, x_poisoned, _, targets in parts]
    return [int(v) for v in torch.cat(fired).tolist()] if fired else []


def run_detect_cell(cell: DetectCell) -> dict[str, Any]:
    """Fit ``cell``'s detector on its (already built) model and measure it on the test images
    and their triggered copies (the inputs of other classes than the target, as ASR counts
    them): one result record, with the three lists of scores the report combines."""
    job = cell.model
    record = _new_record(job, kind="detect", detector=cell.detector.label)
    start = time.perf_counter()
    try:
        record.update(key=cell.key, config=cell.configuration())
        with torch_threads(cell.threads), PeakMemory() as memory:
            loaded, test, clean = _model_and_data(job, cell.clean)
            if cell.calibration >= len(clean):
                raise GoodnetError(f"calibration {cell.calibration} takes every one of the "
                                   f"{len(clean)} clean images; none is left to fit on")
            calibration, fit = split_clean(clean, cell.calibration, seed=job.seed)
            detector = make_detector(cell.detector.name, dict(cell.detector.settings))
            fit_start = time.perf_counter()
            detection = detector.detect(loaded.model, fit if detector.needs_clean else None)
            fit_seconds = time.perf_counter() - fit_start
            attack = attack_from_card(loaded.card, loaded.extras, test)
            calibration_scores = detection.scores(calibration)
            score_start = time.perf_counter()
            clean_scores = detection.scores(test)
            triggered_scores = _triggered_scores(detection, test, attack)
            score_seconds = time.perf_counter() - score_start
            fired = _fired(detection.model, test, attack)  # not timed: for the report
        every = torch.cat([calibration_scores, clean_scores, triggered_scores])
        if not torch.isfinite(every).all():
            raise GoodnetError(f"{cell.detector.label} gave scores that are not finite numbers")
        scores = {"calibration": _stored(calibration_scores), "clean": _stored(clean_scores),
                  "triggered": _stored(triggered_scores)}
        figures = screen_figures([(scores["calibration"], scores["clean"],
                                   scores["triggered"])], cell.false_alarms)
        scored = len(clean_scores) + len(triggered_scores)
        record.update({
            "calibration_images": len(calibration), "fit_images": len(fit),
            "test_images": len(clean_scores), "triggered_images": len(triggered_scores),
            "fired": fired,
            "auroc": (auroc(scores["triggered"], scores["clean"])
                      if scores["triggered"] and scores["clean"] else None),
            **figures,
            "ms_per_input": 1000 * score_seconds / scored if scored else 0.0,
            "fit_seconds": fit_seconds, "detect_seconds": fit_seconds + score_seconds,
            "peak_memory_mib": memory.mib, "scores": scores,
            "model_card": _card_figures(loaded.card),
        })
    except Exception as error:  # recorded, and the grid goes on
        record.update(_failure(error))
        record["seconds"] = time.perf_counter() - start
    return record


def run_cell(cell: AnyCell) -> dict[str, Any]:
    """Run ``cell``'s defense on its (already built) model and measure it
    (:func:`goodnet.pipeline.repair`, as ``goodnet repair`` does): one result record, the
    fields of :class:`goodnet.pipeline.RepairRecord` (those of ``repair.json``) with the cell's
    model, key and settings (a scan cell: :func:`run_scan_cell`; a detector cell:
    :func:`run_detect_cell`)."""
    if isinstance(cell, ScanCell):
        return run_scan_cell(cell)
    if isinstance(cell, DetectCell):
        return run_detect_cell(cell)
    job = cell.model
    record = _new_record(job, defense=cell.defense.label)
    start = time.perf_counter()
    try:
        record.update(key=cell.key, config=cell.configuration())
        with torch_threads(cell.threads), PeakMemory() as memory:
            loaded, test, clean = _model_and_data(job, cell.clean)
            defense = make_defense(cell.defense.name, dict(cell.defense.settings))
            verdict = verdict_scanner(cell.verdict, clean, loaded.card.spec.num_classes)
            run = repair(loaded.model, loaded.card, loaded.extras, defense, clean, test=test,
                         label=cell.defense.label, curve_limit=cell.curve_limit,
                         verdict=verdict, regrowth=cell.regrowth)
        record.update({
            **run.outcome(start).record(),
            "peak_memory_mib": memory.mib,
            "model_card": {**_card_figures(loaded.card),
                           "train_seconds": loaded.card.training.get("seconds")},
        })
    except Exception as error:  # recorded, and the grid goes on
        record.update(_failure(error))
        record["seconds"] = time.perf_counter() - start
    return record
