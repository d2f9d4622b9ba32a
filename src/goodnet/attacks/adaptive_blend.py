"""Adaptive-Blend (Qi, Xie, Li, Mahloujifar & Mittal, "Revisiting the Assumption of Latent
Separability for Backdoor Defenses", ICLR 2023).

An attack designed to defeat defenses that assume poisoned and clean samples separate in
latent space. The blend pattern is cut into ``pieces`` equal tiles; each poisoned training image
carries only a random ``1 − mask_rate`` share of the tiles, blended with a low ratio; a few
"cover" images carry a partial trigger too but keep their true label ("conservatism"). At test
time the whole pattern is blended with a higher ratio.

Defaults from the official code (Unispac/Circumventing-Backdoor-Defenses, ``adaptive_blend``):
16 pieces, mask rate 0.5, blend ratio 0.15 for poisoning (``blend_ratio``) and 0.2 at test time
(``test_blend_ratio``), poison rate 0.003 and cover rate 0.003 of the training set. The trigger
image ("hellokitty") is not shipped with goodnet: the default pattern is uniform noise; pass an
image file with ``pattern=<path>``.

Departure: poison and cover rates default to 0.01. The paper's 0.003 (150 CIFAR-10 images,
trained for many epochs) gives a 2-epoch MNIST CNN an ASR of 1.0 %; 0.01 gives 100 % and 0.03
99.9 %, with clean accuracy unchanged (seed 0). Set both to 0.003 for the paper's rates.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from goodnet.attacks.base import SingleTargetAttack
from goodnet.attacks.poison import PoisonGroup, choose_indices
from goodnet.attacks.triggers import BlendTrigger, blend_key
from goodnet.data.dataset import ImageData
from goodnet.errors import GoodnetError


@dataclass(frozen=True)
class AdaptiveBlendConfig:
    """Settings of an Adaptive-Blend attack.

    Attributes:
        target: target class.
        mode: "all-to-one" or "all-to-all".
        poison_rate: fraction of the training set poisoned and relabelled.
        cover_rate: fraction of the training set given a partial trigger, label kept.
        pieces: number of tiles the pattern is cut into (a square number).
        mask_rate: share of the tiles left out of each poisoned training image.
        blend_ratio: blend ratio of training images.
        test_blend_ratio: blend ratio at test time.
        pattern: "noise" (uniform noise from ``pattern_seed``) or an image file.
        pattern_seed: seed of the noise pattern.
    """

    renamed: ClassVar[dict[str, str]] = {"alpha": "blend_ratio", "test_alpha": "test_blend_ratio"}

    target: int = 0
    mode: str = "all-to-one"
    poison_rate: float = 0.01
    cover_rate: float = 0.01
    pieces: int = 16
    mask_rate: float = 0.5
    blend_ratio: float = 0.15
    test_blend_ratio: float = 0.2
    pattern: str = "noise"
    pattern_seed: int = 0


def tile_masks(height: int, width: int, pieces: int) -> torch.Tensor:
    """``(pieces, H, W)`` indicator masks of a ``√pieces × √pieces`` tiling of the image."""
    side = math.isqrt(pieces)
    rows = torch.div(torch.arange(height) * side, height, rounding_mode="floor")
    cols = torch.div(torch.arange(width) * side, width, rounding_mode="floor")
    tile = rows.view(-1, 1) * side + cols.view(1, -1)
    return (tile[None] == torch.arange(pieces).view(-1, 1, 1)).float()


class PartialBlend:
    """Blend, into each item, only the tiles that item was dealt (fixed per index)."""

    def __init__(self, pattern: torch.Tensor, alpha: float, tiles: torch.Tensor,
                 chosen: torch.Tensor, row_of: torch.Tensor) -> None:
        self.pattern, self.alpha, self.tiles = pattern, alpha, tiles
        self.chosen, self.row_of = chosen, row_of

    def __call__(self, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        kept = self.chosen[self.row_of[index]].float()  # (n, pieces)
        mask = torch.einsum("np,phw->nhw", kept, self.tiles)[:, None].to(x.device, x.dtype)
        weight = self.alpha * mask
        return x * (1 - weight) + self.pattern.to(x.device, x.dtype) * weight


class AdaptiveBlend(SingleTargetAttack[AdaptiveBlendConfig]):
    """Partial blended pattern, conservatively poisoned, with cover items."""

    name = "adaptive-blend"
    Config = AdaptiveBlendConfig
    quick: ClassVar[Mapping[str, Any]] = {}
    paper = "Qi et al., ICLR 2023"

    def validate(self) -> None:
        super().validate()
        cfg = self.config
        if cfg.pieces < 1 or math.isqrt(cfg.pieces) ** 2 != cfg.pieces:
            raise GoodnetError(f"adaptive_blend: pieces must be a square number, got {cfg.pieces}")
        _, height, width = self.image_shape
        if math.isqrt(cfg.pieces) > min(height, width):
            raise GoodnetError(f"adaptive_blend: {cfg.pieces} pieces do not fit a "
                               f"{height}×{width} image (at least a pixel each)")
        if not 0 <= cfg.mask_rate < 1 or not 0 <= cfg.cover_rate < 1:
            raise GoodnetError("adaptive_blend: mask_rate and cover_rate must be in [0, 1)")

    def build_trigger(self) -> Callable[[torch.Tensor], torch.Tensor]:
        cfg = self.config
        return BlendTrigger(blend_key(cfg.pattern, self.image_shape, cfg.pattern_seed),
                            cfg.test_blend_ratio)

    def poison_groups(self, train: ImageData, generator: torch.Generator) -> list[PoisonGroup]:
        cfg = self.config
        poisoned = super().poison_groups(train, generator)[0].indices
        rest = torch.ones(len(train), dtype=torch.bool)
        rest[poisoned] = False
        cover = choose_indices(torch.nonzero(rest).flatten(), round(cfg.cover_rate * len(train)),
                               generator)
        items = torch.cat([poisoned, cover])
        keep = cfg.pieces - round(cfg.mask_rate * cfg.pieces)
        scores = torch.rand(len(items), cfg.pieces, generator=generator)
        chosen = torch.zeros_like(scores, dtype=torch.bool)
        chosen.scatter_(1, scores.argsort(1)[:, :keep], True)
        row_of = torch.zeros(len(train), dtype=torch.long)
        row_of[items] = torch.arange(len(items))
        assert isinstance(self.trigger, BlendTrigger)
        blend = PartialBlend(self.trigger.pattern, cfg.blend_ratio,
                             tile_masks(*self.image_shape[1:], cfg.pieces), chosen, row_of)
        return [PoisonGroup("poison", poisoned, blend, self.target),
                PoisonGroup("cover", cover, blend, None)]
