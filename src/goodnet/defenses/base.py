"""What every defense is: settings in the constructor, ``repair(model, clean)`` for the work.

``repair`` never modifies the caller's model. It returns a :class:`RepairResult`: the repaired
model (a copy, usually with channel masks installed), the masks, named variants (one per
pruning budget, say), a per-step curve, and timings. A defense chooses everything it chooses
(how many channels, which threshold) from the clean data it is given. An optional
:class:`Evaluation` (test data and an attack) adds CA and ASR to the curve for reporting; no
defense reads it to make a decision, and the contract tests check that its presence changes
nothing.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, TypeVar

from torch import nn

from goodnet.attacks.base import Attack
from goodnet.data.dataset import ImageData
from goodnet.errors import GoodnetError
from goodnet.masking import MaskSet
from goodnet.methods import Method, ReversedTrigger, ScanVerdict, check_clean
from goodnet.methods import clean_or_blank as clean_or_blank
from goodnet.metrics import (
    Metrics,
    clean_accuracy,
    poisoned_batches,
    predict,
    predict_all,
    score,
)
from goodnet.models import model_device

# The reversed trigger's name before it moved to goodnet.methods with the scan verdict and the
# clean-data checks (shared with the scanners and the detectors, imported from here as well):
# not to be confused with an attack's trigger, goodnet.attacks.base.Trigger, a function.
Trigger = ReversedTrigger


@dataclass(frozen=True)
class Evaluation:
    """Test data and an attack to measure a repair with, for reporting only."""

    test: ImageData
    attack: Attack[Any] | None = None
    batch_size: int = 512
    poisoned: ImageData | None = None
    prepared: list = field(default_factory=list, compare=False, repr=False)

    def measure(self, model: nn.Module) -> Metrics:
        """CA, ASR and RA of ``model``; the poisoned inputs are made on the first call and kept
        (a curve measures many models on the same data)."""
        if not self.prepared:
            self.prepared.append(list(poisoned_batches(
                self.test, self.attack, self.batch_size, model_device(model), self.poisoned)))
        predictions = predict_all({"model": model}, self.test, self.attack,
                                  poisoned=self.poisoned, prepared=self.prepared[0])
        return score(predictions["model"])


@dataclass(frozen=True)
class Point:
    """One step of a repair's curve.

    Attributes:
        x: where on the curve's axis the step lies (channels pruned, round, threshold, u); None
            for the unpruned start of a threshold sweep.
        pruned: channels (or neurons) pruned at this step; None if the defense prunes none.
        clean_data_accuracy: accuracy on the defender's clean data (held-out part, where the
            defense holds some out); None when the defense ran without data.
        test_ca, test_asr: with an :class:`Evaluation`, the test figures (reporting only).
        label: what the step is when it is not a point of the sweep (``"fine-tuned"``).
        extra: anything else the defense records per step, as (name, value) pairs.
    """

    x: float | None
    pruned: int | None = None
    clean_data_accuracy: float | None = None
    test_ca: float | None = None
    test_asr: float | None = None
    label: str = ""
    extra: tuple[tuple[str, Any], ...] = ()

    def record(self, axis: str) -> dict[str, Any]:
        """The step as a flat record (a CSV row, a line of a results file)."""
        out: dict[str, Any] = {} if axis == "pruned" else {axis: self.x}
        out["pruned"] = self.pruned
        for key in ("clean_data_accuracy", "test_ca", "test_asr"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        if self.label:
            out["step"] = self.label
        out.update(self.extra)
        return out


AXES = {"pruned": "channels pruned", "round": "round", "threshold": "mask threshold",
        "u": "u (prune channels above mean + u·std of their layer)", "epoch": "epoch"}


@dataclass(frozen=True)
class Curve:
    """A repair's steps, in one typed form every reader uses.

    Attributes:
        axis: what ``Point.x`` is: a key of :data:`AXES` ("pruned", "round", "threshold", "u",
            "epoch").
        points: the steps, in order.
        marks: variant name → index of the point that variant is (every budget's model on a
            pruning curve; the chosen threshold on a sweep).
    """

    axis: str = "pruned"
    points: tuple[Point, ...] = ()
    marks: tuple[tuple[str, int], ...] = ()

    def __post_init__(self) -> None:
        if self.axis not in AXES:
            raise GoodnetError(f"a curve's axis must be one of {sorted(AXES)}, got {self.axis!r}")
        for name, index in self.marks:
            if not 0 <= index < len(self.points):
                raise GoodnetError(f"curve mark {name!r} points at step {index} of "
                                   f"{len(self.points)}")

    def __len__(self) -> int:
        return len(self.points)

    def __bool__(self) -> bool:
        return bool(self.points)

    @property
    def label(self) -> str:
        return AXES[self.axis]

    def mark(self, variant: str) -> Point | None:
        """The point variant ``variant`` is, if marked."""
        return next((self.points[i] for name, i in self.marks if name == variant), None)

    @property
    def by_step(self) -> bool:
        """Whether the curve goes by steps (rounds, epochs) rather than by how much is pruned;
        a sweep of thresholds or of u is drawn against the channels each prunes."""
        return self.axis in ("round", "epoch")

    def position(self, point: Point) -> float | None:
        """Where ``point`` lies when curves are drawn: its step, or the channels it prunes."""
        return point.x if self.by_step else point.pruned

    @property
    def position_label(self) -> str:
        return AXES[self.axis] if self.by_step else AXES["pruned"]

    def sweep(self) -> list[Point]:
        """The points on the axis (steps with a label, such as a fine-tuned model, left out)."""
        return [p for p in self.points if not p.label]

    def records(self) -> list[dict[str, Any]]:
        return [point.record(self.axis) for point in self.points]

    @classmethod
    def from_records(cls, records: list[dict[str, Any]] | None, axis: str | None = None,
                     marks: dict[str, int] | None = None) -> Curve:
        """The curve of a results file's records; ``axis`` None: found from the keys (files
        written before the axis was stored)."""
        records = [r for r in records or [] if isinstance(r, dict)]
        if axis is None:
            first = records[0] if records else {}
            axis = next((k for k in ("round", "threshold", "u", "epoch") if k in first),
                        "pruned")
        points = []
        for r in records:
            label = r.get("step") or ("fine-tuned" if r.get("fine_tuned") else "")
            points.append(Point(
                x=_number(r.get(axis)), pruned=_count(r.get("pruned")),
                clean_data_accuracy=_number(r.get("clean_data_accuracy")),
                test_ca=_number(r.get("test_ca")), test_asr=_number(r.get("test_asr")),
                label=str(label)))
        kept = tuple((str(k), v) for k, v in (marks or {}).items()
                     if isinstance(v, int) and 0 <= v < len(points))
        return cls(axis if axis in AXES else "pruned", tuple(points), kept)


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _count(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


@dataclass(frozen=True)
class Timings:
    """Where a repair's time went, in seconds.

    Attributes:
        repair: the defense's own work, the evaluation's time taken out.
        evaluation: time spent measuring test CA and ASR along the curve (reporting only).
    """

    repair: float = 0.0
    evaluation: float = 0.0


@dataclass
class RepairResult:
    """What a repair produced.

    Attributes:
        defense: the defense's registry name.
        settings: its settings, as a plain dict.
        model: the repaired model (the chosen variant).
        masks: the chosen model's channel masks, if the defense masks.
        variants: every repaired model the call produced, by name (for example one per
            accuracy-drop budget), each with its masks in ``variant_masks``.
        chosen: the name of the variant ``model`` is.
        curve: the repair's steps (:class:`Curve`).
        timings: the defense's time and, apart, the evaluation's (:class:`Timings`).
        pruned: the chosen model's pruned channels, layer → indices; None for a defense that
            prunes nothing by design. Filled from ``masks`` when not given.
        scan: a scanning defense's verdict on the model it was given.
        message: what the user should know about the outcome, in a sentence (a defense that
            pruned nothing says why); empty when there is nothing to say.
        notes: anything else worth keeping (rankings, thresholds, losses).
    """

    defense: str
    settings: dict[str, Any]
    model: nn.Module
    masks: MaskSet | None = None
    variants: dict[str, nn.Module] = field(default_factory=dict)
    variant_masks: dict[str, MaskSet] = field(default_factory=dict)
    chosen: str = ""
    curve: Curve = field(default_factory=Curve)
    timings: Timings = field(default_factory=Timings)
    pruned: dict[str, list[int]] | None = None
    scan: ScanVerdict | None = None
    message: str = ""
    notes: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.pruned is None and self.masks is not None:
            self.pruned = {k: v for k, v in self.masks.pruned().items() if v}
        if not self.variants:
            self.variants = {self.chosen or "repaired": self.model}
            self.chosen = self.chosen or "repaired"
        if self.masks is not None and not self.variant_masks:
            self.variant_masks = {self.chosen: self.masks}

    @property
    def seconds(self) -> float:
        """The defense's time (the evaluation's taken out)."""
        return self.timings.repair

    @property
    def pruned_count(self) -> int | None:
        """How many channels the chosen model prunes (None: the defense prunes none)."""
        return None if self.pruned is None else sum(len(v) for v in self.pruned.values())

    def pruned_in(self, variant: str) -> int | None:
        """How many channels variant ``variant`` prunes."""
        masks = self.variant_masks.get(variant)
        if masks is None:
            return self.pruned_count if variant == self.chosen else None
        return sum(len(v) for v in masks.pruned().values())

    @property
    def chosen_point(self) -> Point | None:
        return self.curve.mark(self.chosen)


class Steps:
    """Measures the steps of a repair's curve: the one place a defense measures a model.

    A defense calls :meth:`measure` with a model (masks applied) and its clean data; with an
    evaluation, test CA and ASR are added for reporting. The evaluation is private to this
    object: a defense decides from the clean-data accuracy alone.
    """

    def __init__(self, evaluation: Evaluation | None) -> None:
        self._evaluation = evaluation
        self.evaluation_seconds = 0.0  # time spent in the evaluation, kept out of the repair's

    def measure(self, model: nn.Module, clean: ImageData | None, x: float | None,
                pruned: int | None, *, label: str = "",
                extra: tuple[tuple[str, Any], ...] = ()) -> Point:
        accuracy = None
        if clean is not None:
            accuracy = clean_accuracy(predict(model, clean), clean.labels)
        test_ca = test_asr = None
        if self._evaluation is not None:
            start = time.perf_counter()
            try:
                metrics = self._evaluation.measure(model)
            finally:
                self.evaluation_seconds += time.perf_counter() - start
            test_ca, test_asr = metrics.clean_accuracy, metrics.attack_success_rate
        return Point(x, pruned, accuracy, test_ca, test_asr, label, extra)


@dataclass(frozen=True)
class Repaired:
    """What a defense's :meth:`Defense.run` returns; :meth:`Defense.repair` adds the name,
    settings and timings."""

    model: nn.Module
    curve: Curve = field(default_factory=Curve)
    masks: MaskSet | None = None
    variants: dict[str, nn.Module] = field(default_factory=dict)
    variant_masks: dict[str, MaskSet] = field(default_factory=dict)
    chosen: str = ""
    pruned: dict[str, list[int]] | None = None
    scan: ScanVerdict | None = None
    message: str = ""
    notes: dict[str, Any] = field(default_factory=dict)


C = TypeVar("C")


class Defense(Method[C], ABC):
    """A repair method. Subclasses set ``name``, ``paper`` and ``Config`` (a frozen settings
    dataclass) and implement :meth:`run`; ``needs_clean = False`` marks a data-free defense
    (``clean`` may then be None)."""

    def repair(self, model: nn.Module, clean: ImageData | None = None, *,
               evaluation: Evaluation | None = None, progress: bool = False) -> RepairResult:
        """A repaired copy of ``model``, chosen using ``clean`` only (``evaluation`` adds test
        figures to the curve, for reporting). The caller's model is not modified."""
        if clean is None:
            if self.needs_clean:
                raise GoodnetError(f"{self.name} needs clean data")
        else:
            check_clean(clean)
        steps = Steps(evaluation)
        start = time.perf_counter()
        out = self.run(model, clean, steps, progress)
        total = time.perf_counter() - start
        evaluated = steps.evaluation_seconds
        return RepairResult(
            defense=self.name, settings=self.settings(), model=out.model, masks=out.masks,
            variants=dict(out.variants), variant_masks=dict(out.variant_masks),
            chosen=out.chosen, curve=out.curve,
            timings=Timings(max(0.0, total - evaluated), evaluated), pruned=out.pruned,
            scan=out.scan, message=out.message, notes=dict(out.notes))

    @abstractmethod
    def run(self, model: nn.Module, clean: ImageData | None, steps: Steps,
            progress: bool) -> Repaired:
        """The defense's work: a repaired copy of ``model`` from ``clean``; every model it
        measures along the way goes through ``steps``."""

    def settings(self) -> dict[str, Any]:
        return dataclasses.asdict(self.config)  # type: ignore[call-overload]


def trainable_copy(model: nn.Module, name: str) -> tuple[nn.Module, list[nn.Parameter]]:
    """A copy of ``model`` in eval mode and its trainable parameters, refused in one line
    (naming defense ``name``) when it has none."""
    work = copy.deepcopy(model).eval()
    params = [p for p in work.parameters() if p.requires_grad]
    if not params:
        raise GoodnetError(f"{name}: the model has no trainable parameters")
    return work, params
