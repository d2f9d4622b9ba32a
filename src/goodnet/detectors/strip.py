"""STRIP: entropy of predictions on superimposed images (Gao, Xu, Wang, Chen, Ranasinghe & Nepal,
"STRIP: A Defence Against Trojan Attacks on Deep Neural Networks", ACSAC 2019,
arXiv:1902.06531; reference code garrisongys/STRIP ``STRIP_CIFAR10DeepArchit_Tb.ipynb``, and
BackdoorBench ``detection_infer/strip.py``).

A trigger keeps deciding the class whatever is blended over the image; a clean image's class is
unsettled by the blend. Each input ``x`` is superimposed with ``overlays`` clean images ``c_i``
as ``x + weight · c_i`` (no clipping: the notebook's ``cv2.addWeighted(x, 1, c, 1, 0)`` on float
images, and BackdoorBench's ``x + alpha · c`` called with alpha 1), the model's softmax entropy
is taken on each blend, and the input's entropy is their mean. Low entropy is suspicious, so
goodnet's score is minus the mean entropy (in nats, as BackdoorBench; the notebook's bits differ
by a constant factor and rank alike).

Defaults: ``overlays`` 100 and ``weight`` 1, both references'. The threshold is not the
notebook's (a normal fitted to clean entropies, cut at a 1 % false-rejection rate) nor
BackdoorBench's (the 10th percentile of clean entropies): it is set by
:func:`goodnet.detectors.base.calibrate` for the false-alarm rate the user chooses.

Departures, documented:

- **Fixed overlays.** The notebook draws fresh overlays for every input (from a training slice,
  with repeats); BackdoorBench draws once per batch of 128 from the clean set. goodnet draws the
  ``overlays`` images once, without repeats, from the clean data given to :meth:`STRIP.detect`
  (seeded by ``seed``), and blends every input with the same ones, so an input's score does not
  depend on its batch and the detection exports to ONNX. With fewer clean images than
  ``overlays``, all of them are used.
- Blending is in image space ([0, 1] pixels, before the model's normalisation), as the
  notebook; BackdoorBench blends normalised tensors.

Cost: ``overlays`` forward passes per input (100).
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
from goodnet.models import model_device

IMAGES_PER_PASS = 2048  # blended images per forward pass (inputs are chunked to stay below)


@dataclass(frozen=True)
class STRIPConfig:
    """Settings of STRIP (defaults: the references').

    Attributes:
        overlays: clean images blended over each input (N).
        weight: an overlay's weight in the blend ``x + weight · c``.
        seed: which clean images are the overlays.
    """

    overlays: int = 100
    weight: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.overlays < 1:
            raise GoodnetError("strip: overlays must be positive")
        if not 0 < self.weight <= 10:
            raise GoodnetError("strip: weight must lie in (0, 10]")


class STRIPDetection(Detection):
    """Minus the mean softmax entropy of the model over each input's blends."""

    def __init__(self, model: nn.Module, overlays: torch.Tensor, weight: float) -> None:
        super().__init__(model)
        self.register_buffer("overlays", overlays.to(model_device(self.model)))
        self.weight = weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.onnx.is_in_onnx_export():  # one graph for any batch size: no chunks
            return self._score(x)
        chunk = max(1, IMAGES_PER_PASS // len(self.get_buffer("overlays")))
        return torch.cat([self._score(x[first:first + chunk])
                          for first in range(0, len(x), chunk)])

    def _score(self, x: torch.Tensor) -> torch.Tensor:
        overlays = self.get_buffer("overlays")
        blends = x.unsqueeze(1) + self.weight * overlays.unsqueeze(0)
        probs = self.model(blends.flatten(0, 1)).softmax(1)
        # -p log p with 0 log 0 = 0, in plain operations (ONNX has no entr)
        entropy = -(probs * probs.clamp_min(1e-30).log()).sum(1)
        return -entropy.view(-1, overlays.shape[0]).mean(1)


class STRIP(InputDetector[STRIPConfig]):
    """Flag inputs whose predictions stay certain under superimposed clean images."""

    name = "strip"
    paper = "Gao et al., ACSAC 2019, arXiv:1902.06531"
    Config = STRIPConfig
    quick: ClassVar[Mapping[str, Any]] = {}

    def fit(self, model: nn.Module, clean: ImageData | None) -> Detection:
        assert clean is not None
        generator = torch.Generator().manual_seed(self.config.seed)
        chosen = torch.randperm(len(clean), generator=generator)[:self.config.overlays]
        overlays, _ = clean.get(chosen.sort().values)
        return STRIPDetection(model, overlays, self.config.weight)

    def restore(self, model: nn.Module, tensors: dict[str, torch.Tensor]) -> Detection:
        overlays = tensors.get("overlays")
        shape = getattr(model, "input_shape", None)
        if set(tensors) != {"overlays"} or overlays is None or overlays.ndim != 4 or not (
                1 <= len(overlays) <= self.config.overlays) or (
                shape is not None and tuple(overlays.shape[1:]) != tuple(shape)):
            raise GoodnetError(f"strip: expected overlays of shape (<= {self.config.overlays}, "
                               f"{shape}), got {({k: tuple(v.shape) for k, v in tensors.items()})}")
        if not torch.isfinite(overlays).all() or overlays.min() < 0 or overlays.max() > 1:
            raise GoodnetError("strip: overlays must be images in [0, 1]")
        return STRIPDetection(model, overlays.float(), self.config.weight).eval()
