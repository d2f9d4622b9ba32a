"""Backdoor attacks, one module each, through the ``ATTACKS`` registry.

Adding an attack is one module (an :class:`Attack` subclass with its settings dataclass) and one
line here.
"""

from __future__ import annotations

import dataclasses
import math
import typing
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

ATTACKS: dict[str, type[Attack]] = {
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

__all__ = ["ATTACKS", "Attack", "BadNets", "BadNetsConfig", "Component", "PatchTrigger",
           "PoisonedData", "make_attack"]


def make_attack(
    name: str,
    settings: dict[str, Any] | None,
    image_shape: tuple[int, int, int],
    num_classes: int,
    state: dict[str, torch.Tensor] | None = None,
) -> Attack:
    """Build a registered attack from its name and settings (as in a model card).

    Unknown settings are refused rather than ignored, so a typo cannot silently fall back to a
    default. ``state`` restores a learned trigger (``Attack.state_dict()``, as saved beside a
    model's weights).
    """
    if name not in ATTACKS:
        raise GoodnetError(f"unknown attack {name!r}; choose from {sorted(ATTACKS)}")
    cls = ATTACKS[name]
    settings = dict(settings or {})
    known = {f.name for f in dataclasses.fields(cls.Config)}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise GoodnetError(
            f"{name} has no setting {', '.join(unknown)}; its settings are {sorted(known)}"
        )
    hints = typing.get_type_hints(cls.Config)
    for key, value in settings.items():
        if not _fits(value, hints[key]):
            raise GoodnetError(f"{name}: setting {key} must be {_describe(hints[key])}, got "
                               f"{value!r:.40}")
        if isinstance(value, list):  # JSON has lists where the settings have tuples
            settings[key] = tuple(value)
    try:
        config = cls.Config(**settings)
    except TypeError as error:
        raise GoodnetError(f"{name}: bad settings ({error})") from None
    attack = cls(config, image_shape, num_classes)
    if state is not None:
        attack.load_state_dict(state)
    return attack


def _fits(value: Any, hint: Any) -> bool:
    """Whether a setting's value (from a card, a grid or the command line) has its type:
    an integer is no bool, a float is finite, a tuple is a list or tuple of its item type."""
    if typing.get_origin(hint) is tuple:
        item = typing.get_args(hint)[0]
        return isinstance(value, (list, tuple)) and all(_fits(v, item) for v in value)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        try:
            return math.isfinite(value)
        except OverflowError:  # an integer beyond any float
            return False
    if hint in (str, bool):
        return isinstance(value, hint)
    return True  # any other type is left to the attack's own validate()


def _describe(hint: Any) -> str:
    if typing.get_origin(hint) is tuple:
        item = typing.get_args(hint)[0]
        return "a list of " + {int: "integers", float: "finite numbers", str: "strings"}.get(
            item, str(item))
    return {int: "an integer", float: "a finite number", str: "a string",
            bool: "true or false"}.get(hint, str(hint))
