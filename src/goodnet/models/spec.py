"""What a model is: its architecture name and the arguments that build it.

A :class:`ModelSpec` is all a model card needs to rebuild a network before its weights are
loaded; nothing is ever executed from a file to construct a model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

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
        graph: for ``arch="keras"``, the imported layer graph as JSON (see
            :mod:`goodnet.models.keras_graph`); empty for built-in architectures.
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
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))
        if self.num_classes < 2:
            raise GoodnetError(f"a classifier needs at least 2 classes, got {self.num_classes}")
        if self.in_channels < 1 or self.height < 1 or self.width < 1:
            raise GoodnetError(
                f"bad input shape {(self.in_channels, self.height, self.width)} for {self.arch}"
            )
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


class Normalize(nn.Module):
    """Scale [0, 1] pixels and standardise them per channel (the first layer of every model)."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        shape = (1, spec.in_channels, 1, 1)
        self.register_buffer("mean", torch.tensor(spec.mean).view(shape))
        self.register_buffer("std", torch.tensor(spec.std).view(shape))
        self.pixel_scale = spec.pixel_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x * self.pixel_scale - self.mean) / self.std
