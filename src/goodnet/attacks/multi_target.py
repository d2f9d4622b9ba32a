"""Multi-trigger, multi-target BadNets, as in the CSAW-HackML 2020 competition.

The competition's "multi-trigger multi-target" BadNet answered a different target class for each
of several triggers (eyebrows, lipstick, sunglasses on faces). Here each trigger is a distinct
patch at its own position, and each sends any input to its own target; the poisoned share of
the training set is split evenly between the triggers. ASR is measured per trigger (on inputs
not already of that trigger's target) and reported as their mean.

Defaults: three 3×3 triggers (a white square in the bottom-right corner, a checkerboard in the
top-left, a white square in the top-right), targets 0, 1 and 2, 10 % of the training set
poisoned in all (BadNets' rate, split three ways).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from goodnet.attacks.base import Attack, Component
from goodnet.attacks.poison import PoisonGroup, choose_indices, fixed
from goodnet.attacks.triggers import PatchTrigger, check_patch, square_pattern
from goodnet.data.dataset import ImageData
from goodnet.errors import GoodnetError

CORNERS = {
    "bottom-right": lambda size, margin: (-(size + margin), -(size + margin)),
    "top-left": lambda size, margin: (margin, margin),
    "top-right": lambda size, margin: (margin, -(size + margin)),
    "bottom-left": lambda size, margin: (-(size + margin), margin),
}


@dataclass(frozen=True)
class MultiTargetConfig:
    """Settings of a multi-trigger multi-target attack (one entry per trigger in each tuple).

    Attributes:
        targets: target class of each trigger.
        patterns: "white" or "checkerboard", per trigger.
        positions: corner of each trigger: bottom-right, top-left, top-right or bottom-left.
        poison_rate: fraction of the training set poisoned, split evenly between triggers.
        patch_size: side of each square patch.
        margin: pixels between each patch and its corner.
    """

    targets: tuple[int, ...] = (0, 1, 2)
    patterns: tuple[str, ...] = ("white", "checkerboard", "white")
    positions: tuple[str, ...] = ("bottom-right", "top-left", "top-right")
    poison_rate: float = 0.1
    patch_size: int = 3
    margin: int = 1


def aimed(name: str, trigger: PatchTrigger, target: int) -> Component:
    """A trigger that sends every input to ``target``, tested on inputs of other classes."""

    def to_target(labels: torch.Tensor) -> torch.Tensor:
        return torch.full_like(labels, target)

    def eligible(labels: torch.Tensor) -> torch.Tensor:
        return labels != target

    return Component(name, trigger, to_target, eligible)


class MultiTarget(Attack[MultiTargetConfig]):
    """Several patch triggers, each with its own target class."""

    name = "multi-target"
    Config = MultiTargetConfig
    quick: ClassVar[Mapping[str, Any]] = {}
    paper = "CSAW-HackML 2020; Gu et al. 2017, arXiv:1708.06733"

    def validate(self) -> None:
        cfg = self.config
        if not len(cfg.targets) == len(cfg.patterns) == len(cfg.positions) >= 1:
            raise GoodnetError("multi_target: targets, patterns and positions need one entry "
                               "per trigger")
        for target in cfg.targets:
            self.check_class(target, "target class")
        unknown = sorted(set(cfg.positions) - set(CORNERS))
        if unknown or len(set(cfg.positions)) != len(cfg.positions):
            raise GoodnetError(f"multi_target: positions must be distinct corners of "
                               f"{sorted(CORNERS)}")
        if not 0 < cfg.poison_rate <= 1:
            raise GoodnetError(f"multi_target: poison rate must be in (0, 1], got "
                               f"{cfg.poison_rate}")
        check_patch(self.name, cfg.patch_size, cfg.margin, self.image_shape)

    def patches(self) -> list[PatchTrigger]:
        cfg = self.config
        triggers = []
        for pattern, position in zip(cfg.patterns, cfg.positions, strict=True):
            top, left = CORNERS[position](cfg.patch_size, cfg.margin)
            trigger = PatchTrigger(square_pattern(pattern, cfg.patch_size, self.image_shape[0]),
                                   torch.ones(cfg.patch_size, cfg.patch_size), top, left)
            trigger.region(*self.image_shape[1:])
            triggers.append(trigger)
        return triggers

    def build_trigger(self) -> Callable[[torch.Tensor], torch.Tensor]:
        self._patches = self.patches()
        return self._patches[0]

    def components(self) -> list[Component]:
        return [aimed(f"trigger{number}->{target}", trigger, target)
                for number, (trigger, target) in enumerate(zip(self._patches, self.config.targets,
                                                               strict=True))]

    def target(self, labels: torch.Tensor) -> torch.Tensor:
        return torch.full_like(labels, self.config.targets[0])

    def eligible(self, labels: torch.Tensor) -> torch.Tensor:
        return labels != self.config.targets[0]

    def poison_groups(self, train: ImageData, generator: torch.Generator) -> list[PoisonGroup]:
        total = round(self.config.poison_rate * len(train))
        free = torch.ones(len(train), dtype=torch.bool)
        groups = []
        for number, component in enumerate(self.components()):
            count = total // len(self._patches) + (number < total % len(self._patches))
            candidates = torch.nonzero(free & component.eligible(train.labels)).flatten()
            chosen = choose_indices(candidates, count, generator)
            free[chosen] = False
            groups.append(PoisonGroup(component.name, chosen, fixed(component.trigger),
                                      component.target))
        return groups
