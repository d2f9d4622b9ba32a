"""SCALE-UP: prediction consistency under pixel scaling (Guo, Li, Chen, Guo & Liu, "SCALE-UP: An
Efficient Black-box Input-level Backdoor Detection via Analyzing Scaled Prediction Consistency",
ICLR 2023; reference code THUYimingLi/BackdoorBox ``core/defenses/SCALE_UP.py``, which the
authors' repository JunfengGo/SCALE-UP points to).

Multiplying a triggered image's pixels keeps the trigger's hold on the class; a clean image's
class drifts as its pixels saturate. Each input ``x`` is scaled by every factor ``n`` of
``scales`` and clipped to [0, 1] (image space, before the model's normalisation, as
BackdoorBox), and the score is the scaled prediction consistency: the share of scaled images
whose predicted class is the unscaled image's. Higher is more suspicious. Data-free.

Defaults: ``scales`` (3, 5, 7, 9, 11), BackdoorBox's. The authors' own code uses 1-11 with a
little uniform noise added first and counts the unscaled image among them; their decision
threshold (0.5 on the consistency) is replaced by :func:`goodnet.detectors.base.calibrate`.
BackdoorBox's data-limited variant (z-scoring by a clean mean and spread) is a monotone
rescaling and changes no ranking, so it is not here.

One addition, off by default: the consistency takes only ``len(scales) + 1`` values, and where
more than the requested false-alarm rate of clean images score 1, no threshold can keep the
rate and the calibrated detector flags nothing. ``soft=True`` scores instead the mean softmax
probability, over the scaled images, of the unscaled image's class: a continuous version of the
same consistency (goodnet's, not the paper's).

Cost: ``len(scales) + 1`` forward passes per input (6).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from goodnet.data.dataset import ImageData
from goodnet.detectors.base import Detection, InputDetector
from goodnet.errors import GoodnetError


@dataclass(frozen=True)
class ScaleUpConfig:
    """Settings of SCALE-UP (defaults: BackdoorBox's).

    Attributes:
        scales: the factors pixels are multiplied by (each above 1).
        soft: score by the mean probability of the unscaled class instead of the share of
            scaled images predicted as it.
    """

    scales: tuple[float, ...] = (3.0, 5.0, 7.0, 9.0, 11.0)
    soft: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "scales", tuple(float(s) for s in self.scales))
        if not self.scales or any(not s > 1 for s in self.scales):
            raise GoodnetError("scale-up: scales must be factors above 1")


class ScaleUpDetection(Detection):
    """The scaled prediction consistency of each input."""

    def __init__(self, model: nn.Module, scales: tuple[float, ...], soft: bool) -> None:
        super().__init__(model)
        self.scales = scales
        self.soft = soft

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = self.model(x).argmax(1)
        total = torch.zeros_like(base, dtype=torch.float32)
        for scale in self.scales:
            out = self.model((x * scale).clamp(0, 1))
            if self.soft:
                total += out.softmax(1).gather(1, base.unsqueeze(1)).squeeze(1)
            else:
                total += (out.argmax(1) == base).float()
        return total / len(self.scales)


class ScaleUp(InputDetector[ScaleUpConfig]):
    """Flag inputs whose predicted class survives scaling their pixels up."""

    name = "scale-up"
    paper = "Guo et al., ICLR 2023"
    Config = ScaleUpConfig
    quick: ClassVar[Mapping[str, Any]] = {}
    needs_clean = False

    def fit(self, model: nn.Module, clean: ImageData | None) -> Detection:
        return ScaleUpDetection(model, self.config.scales, self.config.soft)
