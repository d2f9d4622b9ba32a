"""Clean accuracy, attack success rate and robust accuracy, streamed in batches.

Conventions (BackdoorBench's):
- clean accuracy (CA): clean test inputs classified as their true class;
- attack success rate (ASR): poisoned test inputs classified as the attack's target, counted
  only over inputs whose true class is not the target (all-to-one) — an input of the target
  class "succeeds" without any backdoor;
- robust accuracy (RA): the same poisoned inputs classified as their true class.

The rates are pure functions of predictions. :func:`predict_all` streams a test set once through
one or several models (each poisoned batch is made once and shared between them) and keeps the
top-1 predictions; :func:`score` turns them into :class:`Metrics`; :func:`evaluate` does both for
one model. :func:`detector_predictions` derives the lab's GoodNet answers from its two models'
predictions, so a GoodNet costs no extra forward pass to measure.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from goodnet.attacks.base import Attack
from goodnet.data.dataset import BatchSource, ImageData, batches
from goodnet.models import channels_last, model_device


def _rate(hits: torch.Tensor) -> float:
    return int(hits.sum()) / hits.numel() if hits.numel() else float("nan")


def clean_accuracy(predictions: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of clean inputs predicted as their label (NaN for no inputs)."""
    return _rate(predictions == labels)


def attack_success_rate(predictions: torch.Tensor, targets: torch.Tensor) -> float:
    """Fraction of poisoned, eligible inputs predicted as the attack's target."""
    return _rate(predictions == targets)


def robust_accuracy(predictions: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of poisoned, eligible inputs still predicted as their true label."""
    return _rate(predictions == labels)


@torch.no_grad()
def predict(model: nn.Module, data: BatchSource, batch_size: int = 512) -> torch.Tensor:
    """Top-1 predictions of ``model`` on ``data``, in eval mode (the mode is restored)."""
    was_training = model.training
    model.eval()
    try:
        device = model_device(model)
        with channels_last(model):
            outputs = [model(x).argmax(1).cpu()
                       for x, _ in batches(data, batch_size, device=device)]
    finally:
        model.train(was_training)
    return torch.cat(outputs) if outputs else torch.empty(0, dtype=torch.long)


@dataclass(frozen=True)
class Metrics:
    """CA, ASR and RA of a model, with the number of inputs behind each.

    For an attack with several triggers, ASR and RA are the means over its triggers and
    ``per_trigger`` holds each trigger's ASR. For a detector with a reject class (a GoodNet),
    ``detection_rate`` is the share of poisoned inputs answered with it and ``false_alarm_rate``
    the share of clean inputs answered with it (NaN otherwise).
    """

    clean_accuracy: float
    attack_success_rate: float
    robust_accuracy: float
    n_clean: int
    n_poisoned: int
    per_trigger: dict[str, float] = field(default_factory=dict)
    detection_rate: float = float("nan")
    false_alarm_rate: float = float("nan")


POISONED_DATA = "poisoned data"


@dataclass(frozen=True)
class Predictions:
    """Top-1 predictions of one model on a test set and on its poisoned versions.

    Attributes:
        labels: the clean inputs' true labels.
        clean: the predictions on the clean inputs.
        poisoned: per trigger (name → (predictions, true labels, attack targets)), over the
            inputs that trigger is eligible for.
    """

    labels: torch.Tensor
    clean: torch.Tensor
    poisoned: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


Batch = tuple[torch.Tensor, "torch.Tensor | None",
              list[tuple[str, torch.Tensor, torch.Tensor, torch.Tensor]]]


@torch.no_grad()
def poisoned_batches(test: BatchSource, attack: Attack | None, batch_size: int = 512,
                     device: torch.device | None = None, poisoned: ImageData | None = None
                     ) -> Iterator[Batch]:
    """``(x, y, [(trigger, x_poisoned, true labels, targets), ...])`` per batch of ``test``:
    each trigger applied to the batch's eligible rows; then ``poisoned``'s already-triggered
    images, as batches with ``y`` None under the trigger ``"poisoned data"`` (true labels -1)."""
    components = attack.components() if attack is not None else []
    for x, y in batches(test, batch_size, device=device):
        triggered = []
        for component in components:
            eligible = component.eligible(y)
            if not eligible.any():
                continue
            y_true = y[eligible]
            triggered.append((component.name, component.trigger(x[eligible]), y_true,
                              component.target(y_true)))
        yield x, y, triggered
    if poisoned is not None:
        for x, target in batches(poisoned, batch_size, device=device):
            yield x, None, [(POISONED_DATA, x, torch.full_like(target, -1), target)]


@torch.no_grad()
def predict_all(
    models: Mapping[str, nn.Module], test: BatchSource, attack: Attack | None = None,
    batch_size: int = 512, poisoned: ImageData | None = None,
    prepared: list[Batch] | None = None,
) -> dict[str, Predictions]:
    """Predictions of every model on ``test`` and on its eligible inputs poisoned by ``attack``.

    One pass over ``test``; every batch, and each of its poisoned versions, is made once and
    classified by each model in eval mode (modes are restored). The models must share a device.
    ``poisoned``, a set of already-triggered images whose labels are the attack's targets (the
    CSAW-HackML ``bd_test.h5`` layout), is classified too, as the trigger ``"poisoned data"``;
    their true classes are unknown, so it adds nothing to robust accuracy. ``prepared``, the
    batches :func:`poisoned_batches` made once (``list(poisoned_batches(...))``), saves making
    the poisoned inputs again when the same test set is measured many times.
    """
    if not models:
        return {}
    names = [c.name for c in attack.components()] if attack is not None else []
    labels: list[torch.Tensor] = []
    clean: dict[str, list[torch.Tensor]] = {name: [] for name in models}
    by_trigger: dict[str, dict[str, list[list[torch.Tensor]]]] = {
        name: {trigger: [[], [], []] for trigger in names} for name in models}
    if poisoned is not None:
        for name in models:
            by_trigger[name][POISONED_DATA] = [[], [], []]
    device = model_device(next(iter(models.values())))
    source = prepared if prepared is not None else poisoned_batches(
        test, attack, batch_size, device, poisoned)
    with _evaluating(models):
        for x, y, triggered in source:
            x = x.to(device)
            if y is not None:
                labels.append(y.cpu())
                for name, model in models.items():
                    clean[name].append(model(x).argmax(1).cpu())
            for trigger, x_poisoned, y_true, target in triggered:
                x_poisoned = x_poisoned.to(device)
                for name, model in models.items():
                    parts = by_trigger[name][trigger]
                    parts[0].append(model(x_poisoned).argmax(1).cpu())
                    parts[1].append(y_true.cpu())
                    parts[2].append(target.cpu())
    return _concatenated(labels, clean, by_trigger)


@contextlib.contextmanager
def _evaluating(models: Mapping[str, nn.Module]) -> Iterator[None]:
    """The models in eval mode and channels-last layout; their modes are put back after."""
    modes = {name: model.training for name, model in models.items()}
    try:
        for model in models.values():
            model.eval()
        with contextlib.ExitStack() as stack:
            for model in models.values():
                stack.enter_context(channels_last(model))
            yield
    finally:
        for name, model in models.items():
            model.train(modes[name])


def _concatenated(labels: list[torch.Tensor], clean: dict[str, list[torch.Tensor]],
                  by_trigger: dict[str, dict[str, list[list[torch.Tensor]]]]
                  ) -> dict[str, Predictions]:
    """Each model's :class:`Predictions` from the per-batch answers collected."""
    empty = torch.empty(0, dtype=torch.long)

    def cat(parts: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat(parts) if parts else empty

    all_labels = cat(labels)
    return {name: Predictions(all_labels, cat(clean[name]),
                              {trigger: (cat(p), cat(t), cat(g))
                               for trigger, (p, t, g) in by_trigger[name].items()})
            for name in clean}


def detector_predictions(original: Predictions, repaired: Predictions,
                         reject_class: int) -> Predictions:
    """The GoodNet's answers from its two models' answers: the shared class where they agree,
    ``reject_class`` where they do not (exactly :class:`goodnet.detector.GoodNet`'s argmax)."""

    def combine(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
        return torch.where(first == second, second, torch.full_like(second, reject_class))

    return Predictions(
        original.labels, combine(original.clean, repaired.clean),
        {name: (combine(first, repaired.poisoned[name][0]), truth, target)
         for name, (first, truth, target) in original.poisoned.items()})


def score(predictions: Predictions, reject_class: int | None = None) -> Metrics:
    """CA, ASR, RA (and, with ``reject_class``, detection and false-alarm rates) of
    ``predictions``. For several triggers, ASR and RA are the means over the triggers."""
    nan = float("nan")
    clean = predictions.clean
    groups = [group for group in predictions.poisoned.values() if len(group[0])]
    asr = [attack_success_rate(p, target) for p, _, target in groups]
    ra = [robust_accuracy(p, truth) for p, truth, _ in groups if (truth >= 0).any()]
    n_poisoned = sum(len(p) for p, _, _ in groups)
    detected = (sum(int((p == reject_class).sum()) for p, _, _ in groups)
                if reject_class is not None else 0)
    return Metrics(
        clean_accuracy=clean_accuracy(clean, predictions.labels),
        attack_success_rate=sum(asr) / len(asr) if asr else nan,
        robust_accuracy=sum(ra) / len(ra) if ra else nan,
        n_clean=len(clean),
        n_poisoned=n_poisoned,
        per_trigger=({name: attack_success_rate(p, target)
                      for name, (p, _, target) in predictions.poisoned.items() if len(p)}
                     if len(predictions.poisoned) > 1 else {}),
        detection_rate=(detected / n_poisoned
                        if reject_class is not None and n_poisoned else nan),
        false_alarm_rate=(int((clean == reject_class).sum()) / len(clean)
                          if reject_class is not None and len(clean) else nan),
    )


def evaluate(
    model: nn.Module, test: BatchSource, attack: Attack | None = None, batch_size: int = 512,
    reject_class: int | None = None, poisoned: ImageData | None = None,
) -> Metrics:
    """CA on ``test``, and ASR and RA on its eligible inputs poisoned by ``attack`` (and ASR on
    ``poisoned``, already-triggered images labelled with their targets).

    One pass over ``test``; each batch is classified clean and, for each of the attack's
    triggers, its eligible rows poisoned and classified. Without an attack, ASR and RA are NaN.
    With ``reject_class`` (a detector's "poisoned" answer), also the detection and false-alarm
    rates.
    """
    predictions = predict_all({"model": model}, test, attack, batch_size, poisoned)
    return score(predictions["model"], reject_class)


def percent(value: float) -> str:
    """A rate as a percentage in a fixed width; a dash for NaN (not measured)."""
    return "    –  " if math.isnan(value) else f"{100 * value:6.2f} %"


def metrics_table(rows: Sequence[tuple[str, Metrics]]) -> str:
    """CA, ASR and RA of each (label, metrics) row, with the detection and false-alarm rates
    when any row has them."""
    width = max(len("model"), *(len(name) for name, _ in rows))
    detection = any(not math.isnan(m.detection_rate) for _, m in rows)
    header = f"  {'model':<{width}}  {'CA':>8}  {'ASR':>8}  {'RA':>8}"
    if detection:
        header += f"  {'detected':>8}  {'false alarm':>11}"
    lines = [header]
    for name, m in rows:
        line = (f"  {name:<{width}}  {percent(m.clean_accuracy)}  "
                f"{percent(m.attack_success_rate)}  {percent(m.robust_accuracy)}")
        if detection:
            line += f"  {percent(m.detection_rate)}     {percent(m.false_alarm_rate)}"
        lines.append(line.rstrip())
    return "\n".join(lines)


def auroc(positives: Sequence[float], negatives: Sequence[float]) -> float:
    """The probability that a random positive scores above a random negative (ties: half), the
    area under the ROC curve; NaN without both kinds."""
    if not len(positives) or not len(negatives):
        return math.nan
    pos = torch.as_tensor(positives, dtype=torch.float64)
    neg = torch.as_tensor(negatives, dtype=torch.float64)
    wins = 0.0
    for first in range(0, len(pos), 1024):  # bounded memory: 1024 × len(negatives) at a time
        part = pos[first:first + 1024, None]
        wins += float((part > neg).sum()) + 0.5 * float((part == neg).sum())
    return wins / (len(pos) * len(neg))


def roc_points(positives: Sequence[float], negatives: Sequence[float]
               ) -> list[tuple[float, float]]:
    """(false-positive rate, true-positive rate) at every threshold, from (0, 0) to (1, 1)."""
    points = [(0.0, 0.0)]
    for threshold in sorted(set(positives) | set(negatives), reverse=True):
        points.append((sum(n >= threshold for n in negatives) / len(negatives),
                       sum(p >= threshold for p in positives) / len(positives)))
    points.append((1.0, 1.0))
    return points

