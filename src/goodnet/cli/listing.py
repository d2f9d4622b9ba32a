"""``goodnet list``: the data sets, architectures and methods on offer.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Mapping
from typing import Any

from goodnet.attacks import ATTACKS
from goodnet.cli.options import Commands, describe_defense
from goodnet.data import DATASETS
from goodnet.defenses import DEFENSES, MANY_CLASSES, recommended
from goodnet.detectors import DEFAULT_DETECTORS, DETECTORS
from goodnet.models import MODELS
from goodnet.scans import SCANNERS


def cmd_list(args: argparse.Namespace) -> int:
    print("data sets:     " + ", ".join(DATASETS) + "  (or a path: .npz, .h5, IDX folder, "
          "CIFAR-10 folder, image folder)")
    print("architectures: " + ", ".join(MODELS))
    print("attacks:")
    for name, attack in ATTACKS.items():
        print(f"  {name:<12} {attack.paper}\n  {'':<12} {defaults(attack.Config)}")
    _list_methods("defenses:", DEFENSES, data_note=False)
    print(f"recommended repair (goodnet repair without --defense): "
          f"{describe_defense(recommended())}; above {MANY_CLASSES} classes: "
          f"{describe_defense(recommended(MANY_CLASSES + 1))}")
    _list_methods("scanners (goodnet scan):", SCANNERS)
    _list_methods("input detectors (goodnet repair --detect; also 'disagree', the lab's check):",
                  DETECTORS)
    print(f"default detectors (goodnet repair --detect with no names): "
          f"{', '.join(DEFAULT_DETECTORS)}")
    return 0


def _list_methods(title: str, registry: Mapping[str, Any], data_note: bool = True) -> None:
    """A registry's methods, each with its paper (and whether it needs clean data) and its
    settings' defaults."""
    print(title)
    for name, method in registry.items():
        data = (" (clean data)" if method.needs_clean else " (data-free)") if data_note else ""
        print(f"  {name:<20} {method.paper}{data}\n  {'':<20} {defaults(method.Config)}")


def defaults(config: type) -> str:
    """A settings class's defaults as ``name=value`` pairs; nested settings as ``{name:
    value, ...}``, the way ``-p`` takes them."""
    return ", ".join(f"{f.name}={_shown(f.default)}" for f in dataclasses.fields(config))


def _shown(value: Any) -> str:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        inner = ", ".join(f"{f.name}: {_shown(getattr(value, f.name))}"
                          for f in dataclasses.fields(value))
        return "{" + inner + "}"
    return str(value)


def add_list(sub: Commands) -> None:
    listing = sub.add_parser("list", help="data sets, architectures, attacks, defenses and "
                                          "scanners on offer")
    listing.set_defaults(func=cmd_list)

