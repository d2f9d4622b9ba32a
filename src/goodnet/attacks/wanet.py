"""WaNet (Nguyen & Tran, "WaNet – Imperceptible Warping-based Backdoor Attack", ICLR 2021,
arXiv:2102.10369).

The trigger is a smooth, fixed warping of the image. A ``k × k`` grid of random offsets in
[−1, 1], normalised by its mean absolute value, is upsampled (bicubic) to the image size; the
sampling grid is ``clip((identity + s · offsets / H) · grid_rescale, −1, 1)`` and the image is
resampled with ``grid_sample`` (bilinear, ``align_corners=True``). Poisoned images are
relabelled. In the paper's "noise mode", a further ``cross_ratio`` × as many images are warped
by the trigger grid plus fresh random noise (uniform in [−1, 1] / H per pixel) and keep their
label, so the network learns the exact warp rather than any warp.

Defaults from the official code (VinAIResearch/Warping-based_Backdoor_Attack-release):
k = 4, s = 0.5, grid_rescale = 1, cross_ratio = 2, poisoning rate 0.1, target 0. Departure:
the official code draws poisoned and noise items afresh in every batch; goodnet fixes them by
index for the whole run (the usual data-poisoning threat model, as in BackdoorBench), and draws
the noise afresh each time an item is read, from the noise trigger's own generator (seeded from
the poisoning seed: the same seed and the same reads give the same noise, and torch's global
generator is never touched).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from goodnet.attacks.base import SingleTargetAttack
from goodnet.attacks.poison import PoisonGroup, choose_indices
from goodnet.data.dataset import ImageData
from goodnet.errors import GoodnetError


@dataclass(frozen=True)
class WaNetConfig:
    """Settings of a WaNet attack.

    Attributes:
        target: target class (all-to-one).
        mode: "all-to-one" or "all-to-all".
        poison_rate: fraction of the training set warped and relabelled.
        k: side of the random control grid.
        s: warping strength.
        grid_rescale: scale of the sampling grid (1 leaves it as is).
        cross_ratio: noise-mode items per poisoned item (0 turns noise mode off).
        grid_seed: seed of the warping field.
    """

    target: int = 0
    mode: str = "all-to-one"
    poison_rate: float = 0.1
    k: int = 4
    s: float = 0.5
    grid_rescale: float = 1.0
    cross_ratio: float = 2.0
    grid_seed: int = 0


class WarpTrigger:
    """Resample images through a fixed sampling grid ``(1, H, W, 2)`` in [−1, 1].

    With ``noise``, every call adds fresh uniform noise in [−noise, noise] / H to the grid, drawn
    from the trigger's own generator seeded with ``seed``.
    """

    def __init__(self, grid: torch.Tensor, noise: float = 0.0, seed: int = 0) -> None:
        self.grid = grid
        self.noise = noise
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(self.grid.shape[1:3]) != tuple(x.shape[-2:]):
            raise GoodnetError(
                f"a warp for {tuple(self.grid.shape[1:3])} images cannot mark "
                f"{tuple(x.shape[-2:])} images"
            )
        grid = self.grid.to(x.device, x.dtype).expand(len(x), -1, -1, -1)
        if self.noise:
            height = x.shape[-2]
            jitter = torch.rand(grid.shape, generator=self.generator).to(x.device, x.dtype) * 2 - 1
            grid = (grid + self.noise * jitter / height).clamp(-1, 1)
        return F.grid_sample(x, grid, mode="bilinear", align_corners=True).clamp(0, 1)


def warping_grid(height: int, width: int, config: WaNetConfig) -> torch.Tensor:
    """The trigger's sampling grid, ``(1, H, W, 2)``, as the official code builds it."""
    generator = torch.Generator().manual_seed(config.grid_seed)
    offsets = torch.rand(1, 2, config.k, config.k, generator=generator) * 2 - 1
    offsets = offsets / offsets.abs().mean()
    noise_grid = F.interpolate(offsets, size=(height, width), mode="bicubic",
                               align_corners=True).permute(0, 2, 3, 1)
    rows = torch.linspace(-1, 1, height)
    cols = torch.linspace(-1, 1, width)
    y, x = torch.meshgrid(rows, cols, indexing="ij")
    identity = torch.stack((x, y), dim=2)[None]
    grid = (identity + config.s * noise_grid / height) * config.grid_rescale
    return grid.clamp(-1, 1)


class WaNet(SingleTargetAttack[WaNetConfig]):
    """Warping trigger with noise-mode regularisation."""

    name = "wanet"
    Config = WaNetConfig
    quick: ClassVar[Mapping[str, Any]] = {}
    paper = "Nguyen & Tran, ICLR 2021, arXiv:2102.10369"

    def validate(self) -> None:
        super().validate()
        if self.config.k < 2 or self.config.cross_ratio < 0 or self.config.s < 0:
            raise GoodnetError("wanet: k must be >= 2, s and cross_ratio >= 0")
        _, height, width = self.image_shape
        if self.config.k > min(height, width):  # a control grid finer than the image
            raise GoodnetError(f"wanet: a {self.config.k}×{self.config.k} control grid is finer "
                               f"than a {height}×{width} image")

    def build_trigger(self) -> Callable[[torch.Tensor], torch.Tensor]:
        return WarpTrigger(warping_grid(*self.image_shape[1:], self.config))

    def poison_groups(self, train: ImageData, generator: torch.Generator) -> list[PoisonGroup]:
        groups = super().poison_groups(train, generator)
        poisoned = groups[0].indices
        rest = torch.ones(len(train), dtype=torch.bool)
        rest[poisoned] = False
        count = round(self.config.cross_ratio * len(poisoned))
        if count:
            assert isinstance(self.trigger, WarpTrigger)
            cross = choose_indices(torch.nonzero(rest).flatten(), count, generator)
            seed = int(torch.randint(1 << 62, (1,), generator=generator))
            noisy = WarpTrigger(self.trigger.grid, noise=1.0, seed=seed)
            groups.append(PoisonGroup("noise", cross, lambda x, _i: noisy(x), None))
        return groups
