"""What every scanner shares: the :class:`Scanner` contract and the :class:`ScanReport` it returns.

A scanner answers the question a stranger's model raises before any repair: is it backdoored,
and towards which class? It looks at the model alone (data-free scanners) or at the model and a
little clean data, never at poisoned data, and never modifies the model. Its verdict is a
:class:`~goodnet.methods.ScanVerdict` (the same record Neural Cleanse's repair fills), so a
verdict reads the same whether a scan or a repair made it.

Every scanner states its model-level ``score`` so that higher is more suspicious, and the
``threshold`` above which it says "backdoored": a benchmark can then rank models by score (ROC)
whatever the scanner.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from torch import nn

from goodnet.data.dataset import ImageData
from goodnet.errors import GoodnetError
from goodnet.methods import Method, ScanVerdict, check_clean, clean_or_blank
from goodnet.models import model_device

C = TypeVar("C")


@dataclass(frozen=True)
class Scanned:
    """What a scanner's :meth:`Scanner.run` returns.

    Attributes:
        verdict: backdoored or not, the suspected targets, the model-level score (higher: more
            suspicious) and its threshold, the per-class statistic, reversed triggers if any.
        score_name: what ``verdict.score`` is ("anomaly index", "-log10 p", ...).
        images: per class, the input the scanner optimised for it, where it makes one (MM-BD's
            maximum-margin input), in class order; empty otherwise.
        notes: anything else worth keeping (per-class norms, fitted parameters, ...).
    """

    verdict: ScanVerdict
    score_name: str
    images: tuple[torch.Tensor, ...] = ()
    notes: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ScanReport:
    """A scan's result: the verdict and how it was reached.

    Attributes:
        scanner: the scanner's registry name.
        settings: its settings, as a plain dict.
        verdict: see :class:`Scanned`.
        score_name: what ``verdict.score`` is.
        classes: the model's number of outputs.
        clean_images: how many clean images the scan used (0: data-free).
        seconds: the scan's wall time.
        images: see :class:`Scanned`.
        notes: see :class:`Scanned`.
    """

    scanner: str
    settings: dict[str, Any]
    verdict: ScanVerdict
    score_name: str
    classes: int
    clean_images: int
    seconds: float
    images: tuple[torch.Tensor, ...] = ()
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def backdoored(self) -> bool:
        return self.verdict.backdoored

    @property
    def targets(self) -> tuple[int, ...]:
        return self.verdict.targets


def count_classes(model: nn.Module, example: torch.Tensor) -> int:
    """The model's number of outputs, from one forward pass."""
    with torch.no_grad():
        out = model(example)
    if out.dim() != 2:
        raise GoodnetError(f"the model's output has shape {tuple(out.shape)}; a scan needs one "
                           "score per class")
    return int(out.shape[1])


class Scanner(Method[C], ABC):
    """A backdoor detector at the model level. Subclasses set ``name``, ``paper`` and ``Config``
    (a frozen settings dataclass) and implement :meth:`run`; ``needs_clean = False`` marks a
    data-free scanner (``clean`` may then be None, and is ignored if given)."""

    def scan(self, model: nn.Module, clean: ImageData | None = None, *,
             progress: bool = False) -> ScanReport:
        """Scan a copy of ``model`` (the caller's model, its weights and its mode, are left as
        they were)."""
        if self.needs_clean:
            if clean is None:
                raise GoodnetError(f"{self.name} needs clean data")
            check_clean(clean)
        else:
            clean = None
        work = copy.deepcopy(model).eval()
        for p in work.parameters():
            p.requires_grad_(False)
        example = clean_or_blank(work, clean).to(model_device(work))
        try:
            classes = count_classes(work, example)
        except RuntimeError as error:
            raise GoodnetError(f"the data does not fit the model: {error}") from None
        if classes < 2:
            raise GoodnetError(f"the model has {classes} output; a scan needs at least 2 classes")
        if clean is not None and clean.num_classes != classes:
            raise GoodnetError(f"{clean.name} has {clean.num_classes} classes, the model "
                               f"{classes} outputs")
        start = time.perf_counter()
        out = self.run(work, clean, classes, progress)
        return ScanReport(
            scanner=self.name, settings=dataclasses.asdict(self.config),  # type: ignore[call-overload]
            verdict=out.verdict, score_name=out.score_name, classes=classes,
            clean_images=0 if clean is None else len(clean),
            seconds=time.perf_counter() - start, images=out.images, notes=dict(out.notes))

    @abstractmethod
    def run(self, model: nn.Module, clean: ImageData | None, classes: int,
            progress: bool) -> Scanned:
        """The scanner's work on ``model`` (a copy in eval mode, parameters frozen)."""
