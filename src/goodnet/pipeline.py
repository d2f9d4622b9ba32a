"""One repair, from the defender's clean data to the record of it: what ``goodnet repair``, the
demo and the benchmark's repair cells (:func:`goodnet.bench.cell.run_cell`) all run.

:func:`repair` splits the detectors' calibration images off the clean data (when the GoodNet is
to have input detectors), fits and calibrates the detectors on the original model, runs the
defense and measures the original, every repaired variant and each GoodNet on the test data,
against the attack the model's card names. It returns a :class:`RepairRun`; its
:meth:`RepairRun.outcome` is a :class:`RepairRecord`, the one record of a repair, which
``repair.json`` (:func:`write_repair`) and the benchmark's ``results.jsonl`` are written from,
with the same field names and meanings.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from goodnet.artifacts import ModelCard, save_model, write_text_atomic
from goodnet.backdoor import attack_from_card
from goodnet.data import split_clean
from goodnet.data.dataset import ImageData
from goodnet.data.holdout import forget_held_out
from goodnet.defenses.base import Defense, RepairResult
from goodnet.detector import GoodNet, Screen, calibrated_screens, calibration_size
from goodnet.errors import GoodnetError
from goodnet.metrics import Metrics, evaluate
from goodnet.train import finetune_config, train
from goodnet.triggers import plot_triggers, save_triggers, verdict_summary
from goodnet.verdict import Verdict, judge
from goodnet.workflow import RepairReport, curve_csv, plot_curve, repair_and_measure


def metrics_record(metrics: Metrics | None) -> dict[str, Any] | None:
    """Metrics as plain JSON values (NaN, a rate nothing measured, as None)."""
    if metrics is None:
        return None
    return {k: (None if isinstance(v, float) and math.isnan(v) else v)
            for k, v in dataclasses.asdict(metrics).items()}


@dataclass(frozen=True)
class RepairRecord:
    """What a repair did and measured: the fields ``repair.json`` and a benchmark's repair
    record share (:meth:`record`), with one meaning in both.

    Attributes:
        defense: the defense as its caller names it (the registry name, or a grid's label).
        settings: the defense's settings, every default filled in.
        chosen: the variant the defense chose as its result (None if it made none).
        before: the original model's metrics on the test data.
        after: the chosen variant's metrics (None without test data or a chosen variant).
        goodnet: the metrics of the GoodNet built from the chosen variant.
        variants: every variant's metrics, by name.
        goodnets: the metrics of the GoodNet built from each variant, by name.
        goodnet_checks: the GoodNet's checks: the lab's disagreement, and each calibrated
            detector (:meth:`goodnet.detector.Screen.record`).
        pruned: the chosen variant's pruned channels, layer → indices (None for a defense that
            does not prune).
        pruned_count: how many channels ``pruned`` holds.
        suspected: what the repair suspected, where it says: a scan's verdict, the class a
            proxy selection chose from.
        scan: the scan verdict of a defense that scans first (Neural Cleanse), else None.
        verdict: the scan of the repaired model (:class:`goodnet.verdict.Verdict`: is a
            backdoor still suspected, the class, the proxy ASR), or None where none was asked.
        message: what the defense has to say (why it pruned nothing, say); may be empty.
        notes: the defense's own notes (its layer, its pruning order, ...).
        curve: the repair's curve, one record per step.
        curve_axis: the curve's axis (``pruned``, ``epoch``, ...).
        curve_marks: the curve step of each variant.
        repair_seconds: the defense's own time, the curve's evaluation left out.
        evaluation_seconds: the time the curve's evaluation took during the repair.
        measure_seconds: ``seconds`` less ``repair_seconds``: loading, calibrating, measuring,
            and the verdict's scan and the regrowth check where asked.
        seconds: the wall time of the whole run (the command, or the benchmark cell).
        regrowth: the regrowth check, where one was asked: the chosen variant's metrics after
            ``epochs`` of ``goodnet finetune``'s fine-tuning on the clean data.
    """

    defense: str
    settings: dict[str, Any]
    chosen: str | None
    before: dict[str, Any] | None
    after: dict[str, Any] | None
    goodnet: dict[str, Any] | None
    variants: dict[str, dict[str, Any] | None]
    goodnets: dict[str, dict[str, Any] | None]
    goodnet_checks: dict[str, Any]
    pruned: dict[str, list[int]] | None
    pruned_count: int | None
    suspected: dict[str, Any] | None
    scan: dict[str, Any] | None
    verdict: dict[str, Any] | None
    message: str
    notes: dict[str, Any]
    curve: list[dict[str, Any]]
    curve_axis: str
    curve_marks: dict[str, int]
    repair_seconds: float
    evaluation_seconds: float
    measure_seconds: float
    seconds: float
    regrowth: dict[str, Any] | None = None

    def record(self) -> dict[str, Any]:
        """The record as a dict of plain values, for JSON."""
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class RepairRun:
    """A repair and what was measured of it.

    Attributes:
        report: the defense's result and the metrics (:class:`goodnet.workflow.RepairReport`).
        screens: the GoodNet's calibrated input detectors, each with its fitted detection.
        disagree: whether the GoodNet keeps the lab's disagreement check.
        label: the defense as the caller names it.
        started: when the run began (``time.perf_counter``), for its wall time.
        verdict: the scan of the repaired model, where one was asked.
        regrowth: the fine-tuning epochs of the regrowth check and the metrics after them,
            where one was asked.
    """

    report: RepairReport
    screens: list[tuple[Screen, nn.Module]]
    disagree: bool
    label: str
    started: float
    verdict: Verdict | None = None
    regrowth: tuple[int, Metrics] | None = None

    @property
    def result(self) -> RepairResult:
        return self.report.result

    def outcome(self, started: float | None = None) -> RepairRecord:
        """The record of the run, its wall time counted from ``started`` (``time.perf_counter``;
        default: when :func:`repair` began) to now."""
        result, report = self.report.result, self.report
        chosen = result.chosen if result.chosen in result.variants else None
        seconds = time.perf_counter() - (self.started if started is None else started)
        return RepairRecord(
            defense=self.label, settings=dict(result.settings), chosen=chosen,
            before=metrics_record(report.original),
            after=metrics_record(report.variants.get(chosen)) if chosen else None,
            goodnet=metrics_record(report.goodnets.get(chosen)) if chosen else None,
            variants={k: metrics_record(v) for k, v in report.variants.items()},
            goodnets={k: metrics_record(v) for k, v in report.goodnets.items()},
            goodnet_checks={"disagree": self.disagree,
                            "screens": [s.record() for s, _ in self.screens]},
            pruned=result.pruned, pruned_count=result.pruned_count,
            suspected=suspected(result),
            scan=verdict_summary(result.scan) if result.scan is not None else None,
            verdict=self.verdict.record() if self.verdict is not None else None,
            message=result.message, notes=dict(result.notes), curve=result.curve.records(),
            curve_axis=result.curve.axis, curve_marks=dict(result.curve.marks),
            repair_seconds=result.timings.repair,
            evaluation_seconds=result.timings.evaluation,
            measure_seconds=seconds - result.timings.repair, seconds=seconds,
            regrowth=None if self.regrowth is None else {
                "epochs": self.regrowth[0], **(metrics_record(self.regrowth[1]) or {})})


def suspected(result: RepairResult) -> dict[str, Any] | None:
    """What a repair suspected, where it says: Neural Cleanse's verdict, and the class whose
    reversed trigger chose a pruning (``select="proxy"``)."""
    out: dict[str, Any] = {}
    if result.scan is not None:
        out.update(backdoored=result.scan.backdoored, targets=list(result.scan.targets),
                   score=result.scan.score)
    proxy = {k.removeprefix("proxy_"): v for k, v in result.notes.items()
             if k.startswith("proxy_")}
    if proxy:
        out["proxy"] = proxy
    return out or None


def calibration_count(detectors: int, clean: int, false_alarm: float,
                      confidence: float | None, size: int | None = None) -> int:
    """How many of ``clean`` images calibrate ``detectors`` input detectors: ``size``, by
    default the fewest the rate and confidence need (:func:`goodnet.detector.calibration_size`);
    refused if fewer than that or more than half of the images (the rest fit the detectors)."""
    needed = calibration_size(detectors, false_alarm, confidence)
    size = needed if size is None else size
    if size < needed:
        raise GoodnetError(f"--calibration {size} cannot calibrate {detectors} "
                           f"detector(s) at a false-alarm rate of {false_alarm:g} with "
                           f"{confidence:g} confidence: it takes at least {needed} clean "
                           "images")
    if size > clean // 2:
        raise GoodnetError(f"calibrating {detectors} detector(s) at a false-alarm rate of "
                           f"{false_alarm:g} takes {size} clean images, more than half of "
                           f"the {clean} given: give more clean data (--clean-amount), a "
                           "larger --false-alarm or fewer detectors")
    return size


def calibration_split(clean: ImageData, detectors: int, false_alarm: float,
                      confidence: float | None, size: int | None = None, seed: int = 0
                      ) -> tuple[ImageData, ImageData]:
    """(the images that calibrate ``detectors`` input detectors, the clean images they fit
    on), split off ``clean`` (stratified, with ``seed``; their number:
    :func:`calibration_count`). The repair uses both: it does not touch the original model,
    whose scores the detectors calibrate."""
    size = calibration_count(detectors, len(clean), false_alarm, confidence, size)
    return split_clean(clean, size, seed=seed)


def _screens(model: nn.Module, clean: ImageData | None, detectors: Sequence[str],
             false_alarm: float, confidence: float | None, calibration: int | None, seed: int,
             clean_caveat: str | None, name: str) -> list[tuple[Screen, nn.Module]]:
    """The GoodNets' detectors, fitted on the original model and calibrated on images split off
    ``clean`` (see :func:`repair`), with the warning where ``clean_caveat`` says why the model
    may have trained on them."""
    if clean is None:
        raise GoodnetError("input detectors calibrate on clean data: give clean data")
    calibration_images, fit = calibration_split(clean, len(detectors), false_alarm,
                                                confidence, calibration, seed)
    if clean_caveat is not None:
        warnings.warn(f"{name} may have trained on the clean images ({clean_caveat}): if "
                      "it did, the detectors' false-alarm rate on new inputs can exceed "
                      "--false-alarm", UserWarning, stacklevel=3)
    return list(calibrated_screens(model, {d: {} for d in detectors}, fit,
                                   calibration_images, false_alarm, confidence))


def repair(
    model: nn.Module,
    card: ModelCard,
    extras: Mapping[str, torch.Tensor],
    defense: Defense[Any],
    clean: ImageData | None,
    *,
    test: ImageData | None = None, poisoned: ImageData | None = None,
    detectors: Sequence[str] = (), disagree: bool = True, false_alarm: float = 0.01,
    confidence: float | None = 0.95, calibration: int | None = None, seed: int = 0,
    clean_caveat: str | None = None, name: str = "the model", label: str | None = None,
    curve_limit: int = 2000, verdict: str | None = None, regrowth: int = 0,
    progress: bool = False,
) -> RepairRun:
    """Repair ``model`` with ``defense`` on ``clean``; measure it on ``test`` (the card's attack).

    Args:
        model, card, extras: the model to repair (never modified), its card (its classes,
            its attack) and the tensors saved beside it (an attack's learned trigger).
        clean: the defender's clean data (None for a data-free defense without detectors).
        test, poisoned: test data for the figures (None: nothing measured), and
            already-triggered test images labelled with their targets (``bd_test.h5``).
        detectors, disagree: the GoodNets' input detectors (registry names; fitted on the
            original model, calibrated on ``calibration`` images split off ``clean`` with
            ``seed``, by default the fewest needed) and whether they keep the lab's check.
        false_alarm, confidence: the share of clean inputs the detectors together may flag,
            and the chance it holds on new inputs (None: on average).
        clean_caveat: why it is not known that ``model`` never trained on ``clean`` (None
            where it is): with detectors, a warning names the model as ``name``.
        label, curve_limit, progress: the defense as the record names it (default: its
            registry name), test images measured per curve step (0: none), progress bars.
        verdict: the scanner that judges the repaired model on ``clean`` (None: no verdict).
        regrowth: epochs of the regrowth check (:func:`regrow`; 0: none).
    """
    started = time.perf_counter()
    screens = _screens(model, clean, detectors, false_alarm, confidence, calibration, seed,
                       clean_caveat, name) if detectors else []
    if poisoned is not None and test is None:
        raise GoodnetError("poisoned test images need clean test data too")
    attack = attack_from_card(card, dict(extras), test) if test is not None else None
    report = repair_and_measure(
        model, defense, clean, test, attack, curve_limit=curve_limit, progress=progress,
        poisoned=poisoned, num_classes=card.spec.num_classes, screens=screens,
        disagree=disagree)
    judged = None if verdict is None else judge(report.result.model, clean, scanner=verdict,
                                                seed=seed, progress=progress)
    regrown = (regrowth, regrow(report.result.model, clean, test, attack, regrowth,
                                progress=progress)) if regrowth else None
    return RepairRun(report, screens, disagree, label or defense.name, started, judged,
                     regrown)


def regrow(model: nn.Module, clean: ImageData | None, test: ImageData | None, attack: Any,
           epochs: int, *, progress: bool = False) -> Metrics:
    """A repaired ``model``'s metrics on ``test`` after ``epochs`` of ``goodnet finetune``'s
    fine-tuning on ``clean`` (its defaults: lr 0.01, batch 64, seed 0; a copy is trained, and a
    masked model keeps its masks): a backdoor that fine-tuning brings back was only hidden."""
    if clean is None or test is None:
        raise GoodnetError("the regrowth check needs clean data and test data")
    tuned = copy.deepcopy(model)
    train(tuned, clean, finetune_config(epochs), progress=progress)
    return evaluate(tuned.eval(), test, attack)


def write_repair(out: Path, run: RepairRun, model: nn.Module, card: ModelCard,
                 record: RepairRecord | None = None) -> list[Path]:
    """Write the repaired models, their GoodNets, ``curve.csv``, ``curve.png``, the reversed
    triggers of a scanning defense and ``repair.json`` (``record``, default
    :meth:`RepairRun.outcome`) into ``out``; returns the paths written."""
    out = Path(out)
    report, result = run.report, run.result
    record = record or run.outcome()
    written = []
    notes = {"defense": result.defense, "settings": result.settings}
    for name, variant in result.variants.items():
        tag = name.replace("/", "-")
        variant_card = dataclasses.replace(
            card, notes={**card.notes, "repair": {**notes, "variant": name}},
            metrics=metrics_record(report.variants.get(name)) or {},
            training=forget_held_out(card.training))
        written.append(save_model(out / f"repaired-{tag}.safetensors", variant, variant_card))
        goodnet_card = dataclasses.replace(
            variant_card, metrics=metrics_record(report.goodnets.get(name)) or {})
        goodnet = GoodNet(model, variant, run.screens, disagree=run.disagree)
        written.append(save_model(out / f"goodnet-{tag}.safetensors", goodnet, goodnet_card))
    if result.curve:
        write_text_atomic(out / "curve.csv", curve_csv(result.curve))
        written.append(out / "curve.csv")
        written.append(plot_curve(out / "curve.png", result))
    if result.scan is not None and result.scan.triggers:
        written.append(save_triggers(out / "triggers.safetensors", result.scan))
        written.append(plot_triggers(out / "triggers.png", result.scan))
    write_text_atomic(out / "repair.json", json.dumps(record.record(), indent=2, default=str))
    written.append(out / "repair.json")
    return written
