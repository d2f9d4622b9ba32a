"""Backdoor attacks, one module each, through the ``ATTACKS`` registry.

Adding an attack is one module (an :class:`Attack` subclass with its settings dataclass) and one
line here.

Beside the registry, as in every registry package, ``DEFAULT_ATTACK`` names what runs when the
user names no attack (``goodnet attack`` without ``--attack``), at its default settings.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from goodnet.attacks.adaptive_blend import AdaptiveBlend
from goodnet.attacks.badnets import BadNets, BadNetsConfig
from goodnet.attacks.base import Attack, Component
from goodnet.attacks.blend import Blend
from goodnet.attacks.input_aware import InputAware
from goodnet.attacks.label_consistent import LabelConsistent
from goodnet.attacks.low_frequency import LowFrequency
from goodnet.attacks.multi_target import MultiTarget
from goodnet.attacks.poison import PoisonedData
from goodnet.attacks.sig import SIG
from goodnet.attacks.triggers import PatchTrigger
from goodnet.attacks.trojannn import TrojanNN
from goodnet.attacks.wanet import WaNet
from goodnet.errors import GoodnetError
from goodnet.settings import build_settings

ATTACKS: dict[str, type[Attack[Any]]] = {
    "badnets": BadNets,
    "blend": Blend,
    "trojannn": TrojanNN,
    "sig": SIG,
    "wanet": WaNet,
    "input_aware": InputAware,
    "low_frequency": LowFrequency,
    "label_consistent": LabelConsistent,
    "adaptive_blend": AdaptiveBlend,
    "multi_target": MultiTarget,
}

DEFAULT_ATTACK = "badnets"

__all__ = ["ATTACKS", "DEFAULT_ATTACK", "Attack", "BadNets", "BadNetsConfig", "Component",
           "PatchTrigger", "PoisonedData", "attack_class", "make_attack"]


def attack_class(name: str) -> type[Attack[Any]]:
    """The registered attack called ``name``, or a clear error listing them."""
    if name not in ATTACKS:
        raise GoodnetError(f"unknown attack {name!r}; choose from {sorted(ATTACKS)}")
    return ATTACKS[name]


def make_attack(
    name: str,
    settings: Mapping[str, Any] | None,
    image_shape: tuple[int, int, int],
    num_classes: int,
    state: dict[str, torch.Tensor] | None = None,
    *,
    text: bool = False,
) -> Attack[Any]:
    """Build a registered attack from its name and settings (as in a model card; ``text=True``:
    command-line text).

    Unknown settings are refused rather than ignored, so a typo cannot silently fall back to a
    default. ``state`` restores a learned trigger (``Attack.state_dict()``, as saved beside a
    model's weights).
    """
    cls = attack_class(name)
    attack = cls(build_settings(cls.Config, settings, name, text=text), image_shape, num_classes)
    if state is not None:
        attack.load_state_dict(state)
    return attack
