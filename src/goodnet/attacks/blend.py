"""Blend (Chen, Liu, Li, Lu & Song, "Targeted Backdoor Attacks on Deep Learning Systems Using
Data Poisoning", 2017, arXiv:1712.05526).

The "blended injection" strategy: a key pattern is mixed into the whole image,
``x' = (1 − α)·x + α·k``, and poisoned images are relabelled to the target.

Defaults: blend ratio α = 0.2 for poisoning and for testing, 10 % of the training set
poisoned, target 0 (BackdoorBench's defaults; Chen et al. poison with α = 0.2 and test with
α = 0.2 or higher). The key pattern is uniform random noise, one of the paper's two keys; the
other, the Hello Kitty image that BackdoorBench uses, is not shipped with goodnet: pass any
image file with ``pattern=<path>``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from goodnet.attacks.base import SingleTargetAttack
from goodnet.attacks.poison import fixed
from goodnet.attacks.triggers import BlendTrigger, blend_key


@dataclass(frozen=True)
class BlendConfig:
    """Settings of a Blend attack.

    Attributes:
        target: target class (all-to-one).
        mode: "all-to-one" or "all-to-all".
        poison_rate: fraction of the training set poisoned.
        blend_ratio: blend ratio of poisoned training images.
        test_blend_ratio: blend ratio at test time.
        pattern: "noise" (uniform noise drawn with ``pattern_seed``) or an image file.
        pattern_seed: seed of the noise pattern.
    """

    renamed: ClassVar[dict[str, str]] = {"alpha": "blend_ratio", "test_alpha": "test_blend_ratio"}

    target: int = 0
    mode: str = "all-to-one"
    poison_rate: float = 0.1
    blend_ratio: float = 0.2
    test_blend_ratio: float = 0.2
    pattern: str = "noise"
    pattern_seed: int = 0


class Blend(SingleTargetAttack[BlendConfig]):
    """Full-image blended key pattern, relabelled poisoned images."""

    name = "blend"
    Config = BlendConfig
    quick: ClassVar[Mapping[str, Any]] = {}
    paper = "Chen et al. 2017, arXiv:1712.05526"

    def build_trigger(self) -> Callable[[torch.Tensor], torch.Tensor]:
        cfg = self.config
        return BlendTrigger(blend_key(cfg.pattern, self.image_shape, cfg.pattern_seed),
                            cfg.test_blend_ratio)

    def training_transform(self) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        assert isinstance(self.trigger, BlendTrigger)
        return fixed(BlendTrigger(self.trigger.pattern, self.config.blend_ratio))
