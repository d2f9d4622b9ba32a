"""Repair a model and measure the outcome: the measuring half of :func:`goodnet.pipeline.repair`
(what ``goodnet repair``, the demo and the benchmarks run), and the curve's CSV and plot.

:func:`repair_and_measure` runs a defense on the defender's clean data, then measures the
original model, every repaired variant and the GoodNet built from each (the lab's detector), on
test data the defense never saw.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from goodnet.artifacts import atomic_path
from goodnet.attacks.base import Attack
from goodnet.data.dataset import ImageData
from goodnet.defenses.base import Curve, Defense, Evaluation, RepairResult
from goodnet.detector import GoodNet, Screen
from goodnet.errors import GoodnetError
from goodnet.metrics import (
    Metrics,
    Predictions,
    detector_predictions,
    evaluate,
    predict_all,
    score,
)

_ORIGINAL = "__original__"


@dataclass
class RepairReport:
    """A repair and the figures measured on it.

    Attributes:
        result: what the defense returned.
        original: the metrics of the model before repair.
        variants: metrics of each repaired variant, by name.
        goodnets: metrics of the GoodNet built from each variant (with detection rates).
        reject_class: the GoodNet's "poisoned" class, N.
    """

    result: RepairResult
    original: Metrics
    variants: dict[str, Metrics] = field(default_factory=dict)
    goodnets: dict[str, Metrics] = field(default_factory=dict)
    reject_class: int = 0

    def rows(self) -> list[tuple[str, Metrics]]:
        """(label, metrics) in display order: the original, then each variant and its GoodNet."""
        rows = [("BadNet (before repair)", self.original)]
        for name, metrics in self.variants.items():
            rows.append((f"{self.result.defense} {name}", metrics))
            if name in self.goodnets:
                rows.append((f"  GoodNet {name}", self.goodnets[name]))
        return rows


def _curve_evaluation(test: ImageData | None, attack: Attack | None,
                      poisoned: ImageData | None, curve_limit: int) -> Evaluation | None:
    """What the repair's curve is measured on: the first ``curve_limit`` test (and
    already-poisoned) images; None without test data or a curve."""
    if test is None or curve_limit <= 0:
        return None
    subset = test.subset(torch.arange(min(curve_limit, len(test)))) \
        if len(test) > curve_limit else test
    bad = poisoned.subset(torch.arange(min(curve_limit, len(poisoned)))) \
        if poisoned is not None and len(poisoned) > curve_limit else poisoned
    return Evaluation(subset, attack, poisoned=bad)


def repair_and_measure(
    model: nn.Module,
    defense: Defense,
    clean: ImageData | None,
    test: ImageData | None = None,
    attack: Attack | None = None,
    *,
    curve_limit: int = 2000,
    goodnets: bool = True,
    progress: bool = False,
    baseline: Predictions | None = None,
    poisoned: ImageData | None = None,
    num_classes: int | None = None,
    prepared: list | None = None,
    screens: Sequence[tuple[Screen, nn.Module]] = (),
    disagree: bool = True,
) -> RepairReport:
    """Repair ``model`` with ``defense`` on ``clean``; measure everything on ``test``.

    The original and every variant are measured in one pass over ``test``; a GoodNet with only
    the disagreement check is derived from its two models' predictions (exactly what running it
    gives), one with detectors is run. ``baseline`` (the original's predictions from
    :func:`goodnet.metrics.predict_all`) and ``prepared`` (``list(poisoned_batches(...))``)
    save redoing work when several defenses repair one model. ``poisoned`` adds
    already-triggered images labelled with their targets (CSAW-HackML's ``bd_test.h5``);
    ``clean`` may be None for a data-free defense, given ``num_classes``. The curve is measured
    on the first ``curve_limit`` test images (0: none), the final figures on all of them.
    """
    evaluation = _curve_evaluation(test, attack, poisoned, curve_limit)
    result = defense.repair(model, clean, evaluation=evaluation, progress=progress)
    if num_classes is None:
        if clean is None:
            raise GoodnetError("without clean data, give num_classes")
        num_classes = clean.num_classes
    if test is None:
        nan = float("nan")
        return RepairReport(result, Metrics(nan, nan, nan, 0, 0), reject_class=num_classes)
    models = {name: variant for name, variant in result.variants.items()}
    if baseline is None:
        models = {_ORIGINAL: model, **models}
    predictions = predict_all(models, test, attack, poisoned=poisoned, prepared=prepared)
    original = baseline if baseline is not None else predictions.pop(_ORIGINAL)
    report = RepairReport(result, score(original), reject_class=num_classes)
    for name in result.variants:
        report.variants[name] = score(predictions[name])
    if goodnets:
        _measure_goodnets(report, model, original, predictions, test, attack, poisoned,
                          screens, disagree)
    return report


def _measure_goodnets(report: RepairReport, model: nn.Module, original: Predictions,
                      predictions: dict[str, Predictions], test: ImageData,
                      attack: Attack | None, poisoned: ImageData | None,
                      screens: Sequence[tuple[Screen, nn.Module]], disagree: bool) -> None:
    """Each variant's GoodNet into ``report.goodnets``: run, where it has detectors (or lacks
    the disagreement check); otherwise derived from the two models' predictions."""
    result, num_classes = report.result, report.reject_class
    for name in result.variants:
        if screens or not disagree:
            goodnet = GoodNet(model, result.variants[name], screens, disagree=disagree)
            report.goodnets[name] = evaluate(goodnet, test, attack, reject_class=num_classes,
                                             poisoned=poisoned)
        else:
            report.goodnets[name] = score(
                detector_predictions(original, predictions[name], num_classes), num_classes)


def curve_csv(curve: Curve) -> str:
    """The curve as CSV: one row per step, a column per field any step has."""
    records = curve.records()
    keys = sorted({k for record in records for k in record})
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=keys)
    writer.writeheader()
    writer.writerows(records)
    return buffer.getvalue()


def _mark_variants(axes: Any, result: RepairResult, x_of: Callable[[Any], Any]) -> None:
    """A vertical line at each variant's step of the curve, the chosen one in black (variants at
    one step share a line and a label)."""
    curve = result.curve
    marks: dict[float, list[str]] = {}
    for name, index in curve.marks:
        x = x_of(curve.points[index])
        if x is not None:
            marks.setdefault(float(x), []).append(
                f"chosen {name}" if name == result.chosen else name)
    for x, names in marks.items():
        chosen = any(name.startswith("chosen ") for name in names)
        axes.axvline(x, color="black" if chosen else "grey", alpha=0.6 if chosen else 0.4,
                     linewidth=0.8)
        axes.text(x, 2, ", ".join(names), rotation=90, fontsize=7,
                  color="black" if chosen else "grey")


def plot_curve(path: Path, result: RepairResult) -> Path:
    """Clean-data accuracy (and test CA and ASR, when measured) along the repair, as a PNG;
    for a data-free sweep with nothing measured, the channels pruned at each step."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    curve = result.curve
    figure, axes = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    sweep = curve.sweep()
    if sweep and all(p.clean_data_accuracy is None and p.test_ca is None for p in sweep):
        # data-free, nothing measured: the channels each value of the parameter prunes
        shown = sorted((p for p in sweep if p.x is not None), key=lambda p: float(p.x or 0))
        axes.plot([p.x or 0.0 for p in shown], [p.pruned or 0 for p in shown], "o-")
        axes.set_ylabel("channels pruned")
        axis_label, x_of = curve.label, (lambda p: p.x)
    else:  # along the steps: rounds, or channels pruned (however a sweep was parametrised)
        axis_label, x_of = curve.position_label, curve.position
        steps = sorted((p for p in sweep if x_of(p) is not None), key=lambda p: x_of(p) or 0)
        xs = [x_of(p) or 0.0 for p in steps]
        for key, label, style in (("clean_data_accuracy", "clean-data accuracy (defender)", "-"),
                                  ("test_ca", "test CA", "--"), ("test_asr", "test ASR", ":")):
            values = [getattr(p, key) for p in steps]
            if steps and all(v is not None for v in values):
                axes.plot(xs, [100 * v for v in values], style, label=label)
        axes.set_ylabel("%")
        axes.set_ylim(0, 101)
    _mark_variants(axes, result, x_of)
    axes.set_xlabel(axis_label)
    layers = result.notes.get("layers")
    where = result.notes.get("layer") or (f"{len(layers)} layers" if layers else "")
    axes.set_title(f"{result.defense} on {where}" if where else result.defense)
    if axes.get_legend_handles_labels()[0]:
        axes.legend(loc="center left", fontsize=8)
    figure.tight_layout()
    with atomic_path(path) as temp:
        figure.savefig(temp, format="png")
    plt.close(figure)
    return path
