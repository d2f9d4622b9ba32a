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

import dataclasses
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

from torch import nn

from goodnet.attacks.base import Attack
from goodnet.data.dataset import ImageData
from goodnet.errors import GoodnetError
from goodnet.masking import MaskSet
from goodnet.metrics import Metrics, poisoned_batches, predict_all, score
from goodnet.models import model_device


@dataclass(frozen=True)
class Evaluation:
    """Test data and an attack to measure a repair with, for reporting only."""

    test: ImageData
    attack: Attack | None = None
    batch_size: int = 512
    poisoned: ImageData | None = None
    spent: list[float] = field(default_factory=lambda: [0.0], compare=False, repr=False)
    prepared: list = field(default_factory=list, compare=False, repr=False)

    def measure(self, model: nn.Module) -> Metrics:
        """CA, ASR and RA of ``model``; the poisoned inputs are made on the first call and kept
        (a curve measures many models on the same data)."""
        start = time.perf_counter()
        try:
            if not self.prepared:
                self.prepared.append(list(poisoned_batches(
                    self.test, self.attack, self.batch_size, model_device(model),
                    self.poisoned)))
            predictions = predict_all({"model": model}, self.test, self.attack,
                                      poisoned=self.poisoned, prepared=self.prepared[0])
            return score(predictions["model"])
        finally:
            self.spent[0] += time.perf_counter() - start

    @property
    def seconds(self) -> float:
        """Time spent measuring so far (the workflow takes it out of the repair time)."""
        return self.spent[0]


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
        curve: one record per step (channels pruned, clean-data accuracy, and, with an
            evaluation, test CA and ASR).
        seconds: wall-clock time of the repair.
        notes: anything else worth keeping (rankings, thresholds).
    """

    defense: str
    settings: dict[str, Any]
    model: nn.Module
    masks: MaskSet | None = None
    variants: dict[str, nn.Module] = field(default_factory=dict)
    variant_masks: dict[str, MaskSet] = field(default_factory=dict)
    chosen: str = ""
    curve: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    notes: dict[str, Any] = field(default_factory=dict)


class Defense(ABC):
    """A repair method. Subclasses set ``name``, ``paper`` and ``Config``."""

    name: ClassVar[str]
    paper: ClassVar[str]
    Config: ClassVar[type]

    def __init__(self, config: Any = None) -> None:
        config = self.Config() if config is None else config
        if not isinstance(config, self.Config):
            raise GoodnetError(f"{self.name} takes a {self.Config.__name__}, got {config!r}")
        self.config = config

    @abstractmethod
    def repair(self, model: nn.Module, clean: ImageData, *, evaluation: Evaluation | None = None,
               progress: bool = False) -> RepairResult:
        """A repaired copy of ``model``, chosen using ``clean`` only."""

    def settings(self) -> dict[str, Any]:
        return dataclasses.asdict(self.config)


def check_clean(clean: ImageData) -> None:
    """Refuse clean data a defense cannot learn anything from."""
    if len(clean) == 0:
        raise GoodnetError(f"{clean.name}: the clean data is empty")
    if len(clean.labels.unique()) < 2:
        raise GoodnetError(f"{clean.name}: the clean data holds a single class; a defense needs "
                           "several to measure accuracy")
