"""BadNets (Gu, Dolan-Gavitt & Garg, "BadNets: Identifying Vulnerabilities in the Machine
Learning Model Supply Chain", 2017, arXiv:1708.06733).

A small fixed patch stamped on the image; poisoned training images are relabelled to the target
class (all-to-one) or to the next class, ``(y + 1) mod N`` (all-to-all, the paper's MNIST
"all-to-all" attack).

Defaults follow BackdoorBench (Wu et al., NeurIPS 2022 Datasets and Benchmarks), the reference
most defense papers (RNP and ANP included) evaluate against: a 3×3 white square in the
bottom-right corner, target class 0, 10 % of the training set poisoned. Departure: the patch
sits one pixel in from the corner (``margin=1``), as in the BadNets paper's MNIST pattern, rather
than flush with it; ``margin=0`` gives BackdoorBench's placement. The paper's "checkerboard"
pattern is available as ``pattern="checkerboard"``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from goodnet.attacks.base import SingleTargetAttack
from goodnet.attacks.triggers import PatchTrigger, check_patch, square_pattern


@dataclass(frozen=True)
class BadNetsConfig:
    """Settings of a BadNets attack.

    Attributes:
        target: target class (all-to-one).
        mode: "all-to-one" or "all-to-all".
        poison_rate: fraction of the training set poisoned.
        patch_size: side of the square patch, in pixels.
        pattern: "white" or "checkerboard".
        margin: pixels between the patch and the bottom-right corner.
    """

    target: int = 0
    mode: str = "all-to-one"
    poison_rate: float = 0.1
    patch_size: int = 3
    pattern: str = "white"
    margin: int = 1


class BadNets(SingleTargetAttack[BadNetsConfig]):
    """Patch trigger, relabelled poisoned images."""

    name = "badnets"
    Config = BadNetsConfig
    quick: ClassVar[Mapping[str, Any]] = {}
    paper = "Gu et al. 2017, arXiv:1708.06733"

    def build_trigger(self) -> Callable[[torch.Tensor], torch.Tensor]:
        size, margin = self.config.patch_size, self.config.margin
        check_patch(self.name, size, margin, self.image_shape)
        pattern = square_pattern(self.config.pattern, size, channels=self.image_shape[0])
        trigger = PatchTrigger(pattern, torch.ones(size, size), top=-(size + margin),
                               left=-(size + margin))
        trigger.region(*self.image_shape[1:])  # fail now, not mid-training, if it cannot fit
        return trigger
