"""What every input-level detector shares (issue 18): the :class:`InputDetector` contract, the
:class:`Detection` it returns, and the calibration of a threshold to a false-alarm rate.

A model-level scanner (:mod:`goodnet.scans`) asks whether a model is backdoored; an input-level
detector asks whether one *input* carries a trigger. ``detector.detect(model, clean)`` learns
what the detector needs from a little clean data (STRIP's overlay images; nothing for a
data-free one) and returns a :class:`Detection`: a module that maps a batch of images (in
[0, 1], as every goodnet model takes them) to one score per image, higher for more suspicious.
It holds a copy of the model: the caller's is never modified.

A score becomes a decision through a threshold. :func:`calibrate` sets it from the scores of
clean images that took no part in fitting, for a false-alarm rate ``α`` the user chooses: the
``⌈(n + 1)(1 − α)⌉``-th smallest of the ``n`` clean scores, the split-conformal quantile. For
a fresh clean image drawn like the calibration images, the chance that its score passes that
threshold is at most ``α`` (and at least ``α − 1/(n + 1)`` when scores do not tie), whatever the
detector; so the rate is the user's, not a property of the detector. It needs
``n ≥ 1/α − 1`` images (99 for 1 %), and says so when there are fewer.

That rate holds on average over calibration sets; one calibration set can give more (with 99
images at 1 %, one in twenty gives over 3 %). With a ``confidence`` ``c``, :func:`calibrate`
takes instead the smallest order statistic ``k`` for which the rate on fresh images exceeds
``α`` with probability at most ``1 − c`` over calibration sets: that rate is
``1 − F(S₍ₖ₎)``, and ``F(S₍ₖ₎)`` is the ``k``-th smallest of ``n`` uniforms, so the chance is
``P(Binomial(n, 1 − α) ≥ k)`` (the training-conditional guarantee of split conformal
prediction, Vovk, ACML 2012). It needs ``n ≥ ln(1 − c) / ln(1 − α)`` images (299 for 1 % at
95 %), and the rate it gives is below ``α`` on most calibration sets. Both guarantees assume the
calibration images are drawn like the fresh ones: images the model trained on are not
(:mod:`goodnet.data.holdout`).
"""

from __future__ import annotations

import copy
import math
from abc import ABC, abstractmethod
from typing import TypeVar

import torch
from torch import nn

from goodnet.data.dataset import BatchSource, ImageData, batches
from goodnet.errors import GoodnetError
from goodnet.methods import Method, check_clean
from goodnet.models import model_device

C = TypeVar("C")


class Detection(nn.Module):
    """A fitted detector: ``forward(x)`` gives one score per image of ``x`` (``(B, C, H, W)``
    in [0, 1]), higher for more suspicious. Subclasses hold a frozen copy of the model."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    def train(self, mode: bool = True) -> Detection:
        """A detection stays in eval mode (its scores must not depend on the mode)."""
        super().train(False)
        return self

    def tensors(self) -> dict[str, torch.Tensor]:
        """What the detection learned from data, to save beside the model (its buffers, not
        the model's weights)."""
        return {name: buffer for name, buffer in self.named_buffers(recurse=False)}

    @torch.no_grad()
    def scores(self, data: BatchSource, batch_size: int = 256) -> torch.Tensor:
        """The score of every image of ``data``, in order, on the CPU."""
        device = model_device(self.model)
        out = [self(x).float().cpu() for x, _ in batches(data, batch_size, device=device)]
        return torch.cat(out) if out else torch.empty(0)


class InputDetector(Method[C], ABC):
    """An input-level backdoor detector. Subclasses set ``name``, ``paper`` and ``Config`` (a
    frozen settings dataclass) and implement :meth:`fit`; ``needs_clean = False`` marks one that
    learns nothing from clean data."""

    def detect(self, model: nn.Module, clean: ImageData | None = None) -> Detection:
        """The detection of ``model``, fitted on ``clean`` where the detector needs data."""
        if self.needs_clean:
            if clean is None:
                raise GoodnetError(f"{self.name} needs clean data")
            check_clean(clean)
        return self.fit(model, clean).eval()  # a data-free one reads at most its image shape

    @abstractmethod
    def fit(self, model: nn.Module, clean: ImageData | None) -> Detection:
        """The detector's work: a :class:`Detection` holding a copy of ``model``."""

    def restore(self, model: nn.Module, tensors: dict[str, torch.Tensor]) -> Detection:
        """The detection that :meth:`Detection.tensors` saved, on ``model`` (a file's tensors
        are untrusted: their names and shapes are checked)."""
        if tensors:
            raise GoodnetError(f"{self.name} saves no tensors, got {sorted(tensors)}")
        return self.fit(model, None).eval()


def calibrate(clean_scores: torch.Tensor, false_alarm: float,
              confidence: float | None = None) -> float:
    """The threshold a score must exceed to be flagged, for a false-alarm rate ``false_alarm``
    on fresh clean images: on average, the ``⌈(n + 1)(1 − false_alarm)⌉``-th smallest of the
    ``n`` clean scores; with ``confidence``, the order statistic that keeps the rate within
    ``false_alarm`` with that probability (see the module docstring)."""
    scores = torch.as_tensor(clean_scores, dtype=torch.float64).flatten()
    if not torch.isfinite(scores).all():
        raise GoodnetError("calibration scores must be finite numbers")
    n = len(scores)
    needed = calibration_needed(false_alarm, confidence)
    if n < needed:
        raise GoodnetError(f"{n} clean images cannot calibrate a false-alarm rate of "
                           f"{false_alarm:g}{_at(confidence)}: it takes at least {needed}")
    return float(torch.sort(scores).values[conformal_rank(n, false_alarm, confidence) - 1])


def _at(confidence: float | None) -> str:
    return "" if confidence is None else f" at {100 * confidence:g} % confidence"


def calibration_needed(false_alarm: float, confidence: float | None = None) -> int:
    """The fewest clean scores :func:`calibrate` can set a threshold from."""
    _check_rates(false_alarm, confidence)
    if confidence is None:
        return max(1, math.ceil(1 / false_alarm - 1 - 1e-9))
    return max(1, math.ceil(math.log1p(-confidence) / math.log1p(-false_alarm) - 1e-9))


def conformal_rank(n: int, false_alarm: float, confidence: float | None = None) -> int:
    """The rank (1 = smallest) of the calibration score that is the threshold; ``n + 1`` where
    ``n`` scores are too few."""
    _check_rates(false_alarm, confidence)
    if confidence is None:
        return math.ceil((n + 1) * (1 - false_alarm) - 1e-9)
    # The smallest k with P(Binomial(n, 1 − α) ≥ k) ≤ 1 − c: add the tail's terms from k = n
    # down while the tail stays within 1 − c.
    log_keep, log_alarm = math.log1p(-false_alarm), math.log(false_alarm)
    tail, rank = 0.0, n + 1
    for k in range(n, 0, -1):
        term = math.exp(math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)
                        + k * log_keep + (n - k) * log_alarm)
        if tail + term > 1 - confidence:
            break
        tail, rank = tail + term, k
    return rank


def _check_rates(false_alarm: float, confidence: float | None) -> None:
    if not 0 < false_alarm < 1:
        raise GoodnetError(f"the false-alarm rate must lie in (0, 1), got {false_alarm:g}")
    if confidence is not None and not 0 < confidence < 1:
        raise GoodnetError(f"the confidence must lie in (0, 1), got {confidence:g}")
