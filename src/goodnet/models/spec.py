"""What a model is: its architecture name and the arguments that build it.

A :class:`ModelSpec` is all a model card needs to rebuild a network before its weights are
loaded; nothing is ever executed from a file to construct a model.
"""

from __future__ import annotations

import contextlib
import math
import numbers
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from goodnet.bounds import (  # noqa: F401 - the bounds' old home re-exports them
    MAX_CHANNELS,
    MAX_CLASSES,
    MAX_NORMALIZATION,
    MAX_PIXELS,
    MAX_SIDE,
    MIN_STD,
    check_input_size,
    is_int,
)
from goodnet.errors import GoodnetError


@dataclass(frozen=True)
class ModelSpec:
    """Architecture and input description of a classifier.

    Every goodnet model takes pixels in [0, 1], ``(N, C, H, W)``. Input normalisation lives in
    the model: the input is multiplied by ``pixel_scale`` (255 for networks trained on raw
    pixels, such as the CSAW-HackML lab's), then standardised with ``mean`` and ``std`` (per
    channel, in the units after scaling).

    Attributes:
        arch: a key of ``goodnet.MODELS``.
        num_classes: number of outputs.
        in_channels: image channels (1 for greyscale, 3 for colour).
        height: input height in pixels.
        width: input width in pixels.
        mean: per-channel mean subtracted after scaling (one value per channel).
        std: per-channel standard deviation divided by after scaling.
        pixel_scale: factor applied to [0, 1] inputs before standardising.
        graph: for ``arch="graph"`` (``"keras"`` in older cards), the imported layer graph as
            JSON (see :mod:`goodnet.models.keras_graph`); empty for the other architectures.
    """

    arch: str
    num_classes: int = 10
    in_channels: int = 1
    height: int = 28
    width: int = 28
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    pixel_scale: float = 1.0
    graph: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.arch, str) or not isinstance(self.graph, str):
            raise GoodnetError("a model's arch and graph must be strings")
        object.__setattr__(self, "mean", _finite_tuple("mean", self.mean))
        object.__setattr__(self, "std", _finite_tuple("std", self.std))
        object.__setattr__(self, "pixel_scale", _finite("pixel_scale", self.pixel_scale))
        # Normalize runs in float32: values must keep its outputs finite for pixels in [0, 1].
        if not 0 < self.pixel_scale <= MAX_NORMALIZATION:
            raise GoodnetError(f"pixel_scale must lie in (0, {MAX_NORMALIZATION:g}], got "
                               f"{self.pixel_scale!r:.40}")
        if any(abs(m) > MAX_NORMALIZATION for m in self.mean) or any(
                not MIN_STD <= s <= MAX_NORMALIZATION for s in self.std):
            raise GoodnetError(f"mean must lie within ±{MAX_NORMALIZATION:g} and std in "
                               f"[{MIN_STD:g}, {MAX_NORMALIZATION:g}]; got mean "
                               f"{self.mean!r:.60}, std {self.std!r:.60}")
        if not is_int(self.num_classes) or not 2 <= self.num_classes <= MAX_CLASSES:
            raise GoodnetError(f"a classifier needs 2 to {MAX_CLASSES:,} classes (an integer), "
                               f"got {self.num_classes!r}")
        check_input_size(self.in_channels, self.height, self.width, f"{self.arch} model")
        for name in ("num_classes", "in_channels", "height", "width"):
            object.__setattr__(self, name, int(getattr(self, name)))
        if len(self.mean) != self.in_channels or len(self.std) != self.in_channels:
            raise GoodnetError(
                f"mean and std need one value per input channel ({self.in_channels}), "
                f"got {len(self.mean)} and {len(self.std)}"
            )
        if any(s <= 0 for s in self.std) or self.pixel_scale <= 0:
            raise GoodnetError("std and pixel_scale must be positive")

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one input image."""
        return self.in_channels, self.height, self.width


def _finite(name: str, value: Any) -> float:
    number = float("nan")
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        with contextlib.suppress(OverflowError):
            number = float(value)
    if not math.isfinite(number):
        raise GoodnetError(f"{name} must be a finite number, got {value!r:.40}")
    return number


def _finite_tuple(name: str, values: Any) -> tuple[float, ...]:
    if not isinstance(values, (tuple, list)):
        raise GoodnetError(f"{name} must be a list of numbers, got {values!r:.40}")
    return tuple(_finite(name, v) for v in values)


class Normalize(nn.Module):
    """Scale [0, 1] pixels and standardise them per channel (the first layer of every model)."""

    mean: torch.Tensor  # buffers
    std: torch.Tensor

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        shape = (1, spec.in_channels, 1, 1)
        self.register_buffer("mean", torch.tensor(spec.mean).view(shape))
        self.register_buffer("std", torch.tensor(spec.std).view(shape))
        self.pixel_scale = spec.pixel_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x * self.pixel_scale - self.mean) / self.std
