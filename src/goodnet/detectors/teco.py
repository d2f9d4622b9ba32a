"""TeCo: test-time corruption robustness consistency (Liu, Yang, Chen, Xu, Dong & Li, "Detecting
Backdoors During the Inference Stage Based on Corruption Robustness Consistency", CVPR 2023;
reference code CGCL-codes/TeCo ``BackdoorBench-v1.0-merge/defense/teco/teco.py`` L201-320, and
BackdoorBench ``detection_infer/teco.py``; corruptions from bethgelab/imagecorruptions
``corruptions.py``).

A clean image gives way to every kind of corruption at about the same severity; a triggered one
holds its target under some corruptions and loses it early under others. For each corruption
type the reference records the first severity (1-5) at which the predicted class changes from
the uncorrupted prediction (6 if it never does), and the score is the standard deviation of
those severities over the types (population, ``np.std``). Higher is more suspicious. Data-free.

Departures, documented:

- **Seven corruption types, not fifteen.** The reference uses the 15 ImageNet-C types through
  the ``imagecorruptions`` package (which needs 32×32 images or larger, and image files for
  frost). goodnet implements, in plain tensor operations with the package's severity constants:
  gaussian noise (σ .08-.38), shot noise (c 60-3), impulse noise (amount .03-.27), contrast
  (c .4-.05), brightness (c .1-.5), pixelate (c .6-.25) and defocus blur (disk radius 3-10,
  alias blur .1-.5). A standard deviation over 7 values is on another scale than over 15, so
  thresholds do not carry over; :func:`goodnet.detectors.base.calibrate` sets them.
- **Fixed noise.** The package draws fresh noise for every image; goodnet draws one noise field
  per noise type (of the image's shape, from ``seed``) when the detector is made, and uses it for
  every input, so a score does not depend on its batch and the detection exports to ONNX. Shot
  noise ``Poisson(x·c)/c`` is taken as its normal approximation ``x + sqrt(x/c)·z``.
- **Independent corruptions.** The reference code corrupts its image list in place, so each
  severity and type is applied on top of all the earlier ones (a bug: the paper corrupts the
  input); goodnet corrupts each copy of the input once.
- Corruptions act on [0, 1] pixels; the package works on 0-255 integers and truncates.

Cost: 1 + 7 × 5 = 36 forward passes per input.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from goodnet.data.dataset import ImageData
from goodnet.detectors.base import Detection, InputDetector
from goodnet.errors import GoodnetError
from goodnet.methods import clean_or_blank

NEVER = 6  # the reference's --max: a type that never changes the prediction
GAUSSIAN = (0.08, 0.12, 0.18, 0.26, 0.38)
SHOT = (60.0, 25.0, 12.0, 5.0, 3.0)
IMPULSE = (0.03, 0.06, 0.09, 0.17, 0.27)
CONTRAST = (0.4, 0.3, 0.2, 0.1, 0.05)
BRIGHTNESS = (0.1, 0.2, 0.3, 0.4, 0.5)
PIXELATE = (0.6, 0.5, 0.4, 0.3, 0.25)
DEFOCUS = ((3, 0.1), (4, 0.5), (6, 0.5), (8, 0.5), (10, 0.5))
TYPES = ("gaussian_noise", "shot_noise", "impulse_noise", "contrast", "brightness", "pixelate",
         "defocus_blur")


@dataclass(frozen=True)
class TeCoConfig:
    """Settings of TeCo.

    Attributes:
        corruptions: the corruption types used (of the seven goodnet implements).
        seed: draws the fixed noise fields.
    """

    corruptions: tuple[str, ...] = TYPES
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "corruptions", tuple(self.corruptions))
        unknown = [c for c in self.corruptions if c not in TYPES]
        if unknown or len(self.corruptions) < 2 or len(set(self.corruptions)) != len(
                self.corruptions):
            raise GoodnetError(f"teco: corruptions must be two or more distinct of {TYPES}")


def _disk(radius: int, alias_blur: float) -> torch.Tensor:
    """imagecorruptions' defocus kernel: a normalised disk, blurred by a small Gaussian."""
    size = 8 if radius <= 8 else radius
    axis = torch.arange(-size, size + 1, dtype=torch.float32)
    disk = ((axis[:, None] ** 2 + axis[None, :] ** 2) <= radius ** 2).float()
    disk /= disk.sum()
    k = 3 if radius <= 8 else 5
    g = torch.exp(-torch.arange(-(k // 2), k // 2 + 1, dtype=torch.float32) ** 2
                  / (2 * alias_blur ** 2))
    g = (g[:, None] * g[None, :]) / (g.sum() ** 2)
    blurred = F.conv2d(disk[None, None], g[None, None], padding=k // 2)[0, 0]
    return blurred / blurred.sum()


def _pixelate(size: int, factor: float) -> torch.Tensor:
    """The ``(size, size)`` matrix that averages a line of ``size`` pixels into
    ``int(size · factor)`` boxes, each pixel weighted by its overlap (PIL's BOX filter), and
    spreads them back by nearest neighbour at pixel centres (PIL's NEAREST): imagecorruptions'
    pixelate, one axis at a time."""
    small = max(1, int(size * factor))
    down = torch.zeros(small, size)
    step = size / small
    for j in range(small):
        start, end = j * step, (j + 1) * step
        for k in range(int(start), min(size, int(torch.tensor(end).ceil()))):
            down[j, k] = max(0.0, min(end, k + 1) - max(start, k)) / step
    up = torch.zeros(size, small)
    centres = ((torch.arange(size) + 0.5) * small / size).floor().long().clamp(max=small - 1)
    up[torch.arange(size), centres] = 1.0  # PIL's NEAREST samples at pixel centres
    return up @ down


class TeCoDetection(Detection):
    """The spread of the severities at which each corruption type first changes the class."""

    def __init__(self, model: nn.Module, corruptions: tuple[str, ...], shape: tuple[int, ...],
                 seed: int) -> None:
        super().__init__(model)
        self.corruptions = corruptions
        generator = torch.Generator().manual_seed(seed)
        self.register_buffer("gaussian", torch.randn(shape, generator=generator))
        self.register_buffer("shot", torch.randn(shape, generator=generator))
        self.register_buffer("impulse", torch.rand(shape, generator=generator))
        self.register_buffer("salt", (torch.rand(shape, generator=generator) < 0.5).float())
        channels = shape[0]  # one depthwise kernel per channel, made now (ONNX: a constant)
        self.kernels = [_disk(r, a).expand(channels, 1, -1, -1).contiguous() for r, a in DEFOCUS]
        self.pixelate = [(_pixelate(shape[-2], c), _pixelate(shape[-1], c)) for c in PIXELATE]

    def tensors(self) -> dict[str, torch.Tensor]:
        """Nothing to save: the noise fields are drawn again from the seed and the shape."""
        return {}

    def _corrupt(self, kind: str, severity: int, x: torch.Tensor) -> torch.Tensor:
        i = severity - 1
        if kind == "gaussian_noise":
            return (x + GAUSSIAN[i] * self.get_buffer("gaussian")).clamp(0, 1)
        if kind == "shot_noise":
            return (x + (x / SHOT[i]).sqrt() * self.get_buffer("shot")).clamp(0, 1)
        if kind == "impulse_noise":
            hit = (self.get_buffer("impulse") < IMPULSE[i]).float()
            return x * (1 - hit) + self.get_buffer("salt") * hit
        if kind == "contrast":
            mean = x.mean(dim=(2, 3), keepdim=True)
            return ((x - mean) * CONTRAST[i] + mean).clamp(0, 1)
        if kind == "brightness":  # HSV value + c, hue and saturation kept
            value = x.amax(dim=1, keepdim=True)
            raised = (value + BRIGHTNESS[i]).clamp(max=1)
            return torch.where(value > 0, x * raised / value.clamp_min(1e-12), raised)
        if kind == "pixelate":  # box down, nearest up, as matrices (ONNX: any ratio)
            rows, cols = self.pixelate[i]
            return rows.to(x.device, x.dtype) @ x @ cols.to(x.device, x.dtype).T
        weight = self.kernels[i].to(x.device, x.dtype)  # defocus_blur
        pad = weight.shape[-1] // 2
        padded = F.pad(x, (pad, pad, pad, pad), mode="reflect") if pad < min(x.shape[-2:]) \
            else F.pad(x, (pad, pad, pad, pad), mode="replicate")
        return F.conv2d(padded, weight, groups=weight.shape[0]).clamp(0, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = self.model(x).argmax(1)
        first = []
        for kind in self.corruptions:
            # arithmetic, not full_like: the ONNX graph must keep the batch size dynamic
            flip_at = base * 0 + NEVER
            for severity in range(5, 0, -1):  # the smallest flipping severity wins
                flipped = self.model(self._corrupt(kind, severity, x)).argmax(1) != base
                flip_at = torch.where(flipped, base * 0 + severity, flip_at)
            first.append(flip_at.float())
        return torch.stack(first, 1).std(dim=1, unbiased=False)


class TeCo(InputDetector[TeCoConfig]):
    """Flag inputs whose class gives way to different corruptions at very different severities."""

    name = "teco"
    paper = "Liu et al., CVPR 2023"
    Config = TeCoConfig
    quick: ClassVar[Mapping[str, Any]] = {}
    needs_clean = False

    def fit(self, model: nn.Module, clean: ImageData | None) -> Detection:
        shape = tuple(clean_or_blank(model, clean).shape[1:])
        return TeCoDetection(model, self.config.corruptions, shape, self.config.seed)
