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
    "input-aware": InputAware,
    "low-frequency": LowFrequency,
    "label-consistent": LabelConsistent,
    "adaptive-blend": AdaptiveBlend,
    "multi-target": MultiTarget,
}

DEFAULT_ATTACK = "badnets"

# Names the attacks had before every registry spelt its names in kebab-case: they still work
# everywhere a name is read (the command line, grids, model cards), and they stay the names that
# stored keys hash and zoo folders carry (:func:`storage_name`), so no cached model or result is
# orphaned by the rename.
ATTACK_ALIASES: dict[str, str] = {
    "input_aware": "input-aware",
    "low_frequency": "low-frequency",
    "label_consistent": "label-consistent",
    "adaptive_blend": "adaptive-blend",
    "multi_target": "multi-target",
}
_STORED = {new: old for old, new in ATTACK_ALIASES.items()}

__all__ = ["ATTACKS", "ATTACK_ALIASES", "DEFAULT_ATTACK", "Attack", "BadNets", "BadNetsConfig",
           "Component", "PatchTrigger", "PoisonedData", "attack_class", "attack_name",
           "make_attack", "storage_name"]


def attack_name(name: str) -> str:
    """The registered name of the attack called ``name`` (an old name resolved), or a clear
    error listing them."""
    name = ATTACK_ALIASES.get(name, name)
    if name not in ATTACKS:
        raise GoodnetError(f"unknown attack {name!r}; choose from {sorted(ATTACKS)}")
    return name


def attack_class(name: str) -> type[Attack[Any]]:
    """The registered attack called ``name`` (or an old name of it), or a clear error listing
    them."""
    return ATTACKS[attack_name(name)]


def storage_name(name: str) -> str:
    """The name under which stored keys and zoo folders know the attack ``name``: the first
    name it was registered under (any other text is returned as it is)."""
    name = ATTACK_ALIASES.get(name, name)
    return _STORED.get(name, name)


def make_attack(
    name: str,
    settings: Mapping[str, Any] | None,
    image_shape: tuple[int, int, int],
    num_classes: int,
    state: dict[str, torch.Tensor] | None = None,
    *,
    text: bool = False,
    warn: bool = True,
) -> Attack[Any]:
    """Build a registered attack from its name and settings (as in a model card; ``text=True``:
    command-line text; ``warn=False``: stored settings, read without warnings for old names).

    Unknown settings are refused rather than ignored, so a typo cannot silently fall back to a
    default. ``state`` restores a learned trigger (``Attack.state_dict()``, as saved beside a
    model's weights).
    """
    cls = attack_class(name)
    attack = cls(build_settings(cls.Config, settings, cls.name, text=text, warn=warn),
                 image_shape, num_classes)
    if state is not None:
        attack.load_state_dict(state)
    return attack
