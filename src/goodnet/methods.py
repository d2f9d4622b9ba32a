"""What every method shares, below the three families: defenses (repairs), scanners (a verdict on
the model) and input detectors (a verdict on each input).

- :class:`Method` and :func:`make_method`: a method of a registry, its settings (a frozen
  dataclass) given to the constructor, built from plain values the one way
  (:func:`goodnet.settings.build_settings`).
- :class:`ReversedTrigger` and :class:`ScanVerdict`: what a model-level scan concludes, and the
  trigger it reverse-engineers per class. A verdict reads the same whether a scanner made it or
  a repair that scans first (Neural Cleanse's).
- :func:`check_clean` and :func:`clean_or_blank`: the checks and the first input every method
  takes from the clean data.

:mod:`goodnet.defenses`, :mod:`goodnet.scans` and :mod:`goodnet.detectors` import these from
here and nothing here imports them; scanners and detectors import nothing from the defenses
(``tests/test_architecture.py`` checks both).

Two things are called a trigger. An attack's trigger (:data:`goodnet.attacks.base.Trigger`) is a
function that stamps images, the attack's own. A :class:`ReversedTrigger` is a mask and a pattern
that a defense or a scanner found by optimisation, for one class, with the statistics that class
is judged by. ``goodnet.defenses.base.Trigger`` is the reversed one, kept under that name for
code written before this module.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, TypeVar

import torch
from torch import nn

from goodnet.data.dataset import ImageData
from goodnet.errors import GoodnetError
from goodnet.models import model_device
from goodnet.settings import build_settings

M = TypeVar("M")


class Method(Generic[M]):
    """What every method of a registry (a defense, a scanner, an input detector) is: a
    ``name``, the ``paper`` it follows, its ``Config`` (a frozen settings dataclass), whether it
    ``needs_clean`` data, its ``quick`` settings, and its settings given to the constructor
    (default: the Config's).

    ``quick`` holds settings (plain values, as ``make_method`` takes them; empty: the defaults
    already are) under which the method runs in seconds on the tests' tiny networks; the contract
    tests build every registered method with them, so a new method declares its own and no test
    needs an edit. They are for tests, not for results.
    """

    name: ClassVar[str]
    paper: ClassVar[str]
    Config: ClassVar[type[Any]]
    quick: ClassVar[Mapping[str, Any]]
    needs_clean: ClassVar[bool] = True

    def __init__(self, config: M | None = None) -> None:
        if config is None:
            config = self.Config()
        if not isinstance(config, self.Config):
            raise GoodnetError(f"{self.name} takes a {self.Config.__name__}, got {config!r}")
        self.config: M = config


def make_method(registry: Mapping[str, type[Method[Any]]], family: str, name: str,
                settings: Mapping[str, Any] | None = None, *, text: bool = False
                ) -> Method[Any]:
    """The method ``name`` of ``registry`` (a ``family``: "defense", "scanner", ...) built from
    its settings (plain values; ``text=True``: command-line text). Unknown methods and unknown
    settings are refused with the known ones listed."""
    if name not in registry:
        raise GoodnetError(f"unknown {family} {name!r}; choose from {', '.join(registry)}")
    cls = registry[name]
    return cls(build_settings(cls.Config, settings, name, text=text))


@dataclass(frozen=True, eq=False)
class ReversedTrigger:
    """A trigger reverse-engineered for one class: ``x' = (1 - mask) · x + mask · pattern``.

    Attributes:
        target: the class the trigger sends inputs to.
        mask: ``(1, H, W)``, values in [0, 1].
        pattern: ``(C, H, W)``, values in [0, 1] (image space, before the model's
            normalisation).
        norm: the mask's L1 norm (the statistic Neural Cleanse compares across classes).
        success: share of the clean inputs (of other classes) the trigger sends to ``target``.
    """

    target: int
    mask: torch.Tensor
    pattern: torch.Tensor
    norm: float
    success: float

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """Stamp the trigger on images ``x`` (``(B, C, H, W)``, [0, 1])."""
        mask = self.mask.to(x.device, x.dtype)
        return (1 - mask) * x + mask * self.pattern.to(x.device, x.dtype)


@dataclass(frozen=True)
class ScanVerdict:
    """What a backdoor scan concluded about the model (a scanner's, or a scanning defense's).

    Attributes:
        backdoored: whether the scan judges the model backdoored.
        targets: the suspected target classes.
        score: the scan's statistic (an anomaly index, say).
        threshold: the value of ``score`` above which it says "backdoored".
        scores: the statistic per class, in class order (an anomaly index each), where the scan
            has one.
        triggers: the reverse-engineered trigger of each class, in class order, where the scan
            makes them.
        fully_reversed: where the scan reverse-engineered only some classes in full (Neural
            Cleanse with K-Arm's pre-selection), those classes; the others' triggers are
            barely optimised (their success NaN, not measured) and their scores NaN. Empty:
            every class's trigger is fully reversed.
    """

    backdoored: bool
    targets: tuple[int, ...] = ()
    score: float = float("nan")
    threshold: float = float("nan")
    scores: tuple[float, ...] = ()
    triggers: tuple[ReversedTrigger, ...] = ()
    fully_reversed: tuple[int, ...] = ()


def clean_or_blank(model: nn.Module, clean: ImageData | None) -> torch.Tensor:
    """One input to trace ``model``'s layer order with, on the model's device: the first clean
    image, or (data-free) a blank input of the model's shape."""
    if clean is not None:
        return clean.get(torch.arange(1))[0].to(model_device(model))
    # The model's own shape, or that of the network a wrapper (masks, a GoodNet) holds.
    shape: tuple[int, ...] | None = next(
        (tuple(getattr(m, "input_shape")) for m in model.modules()  # noqa: B009
         if hasattr(m, "input_shape")), None)
    if shape is None:
        raise GoodnetError("without clean data the model's input shape is unknown: give clean "
                           "data, or set model.input_shape = (C, H, W)")
    return torch.zeros(1, *shape, device=model_device(model))


def check_clean(clean: ImageData) -> None:
    """Refuse clean data a defense cannot learn anything from."""
    if len(clean) == 0:
        raise GoodnetError(f"{clean.name}: the clean data is empty")
    if len(clean.labels.unique()) < 2:
        raise GoodnetError(f"{clean.name}: the clean data holds a single class; a defense needs "
                           "several to measure accuracy")
