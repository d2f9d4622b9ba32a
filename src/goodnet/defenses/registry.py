"""The ``DEFENSES`` registry itself, below every defense.

:mod:`goodnet.defenses` lists the defenses (the one list, in its ``__init__``) into this dict; a
defense that runs other defenses (:class:`~goodnet.defenses.sequence.Sequence`) looks them up
here, so it never imports the package that imports it. Once :mod:`goodnet.defenses` is imported
(importing this module imports it first), the dict holds every registered defense.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, cast

from goodnet.defenses.base import Defense
from goodnet.errors import GoodnetError
from goodnet.methods import make_method

DEFENSES: dict[str, type[Defense[Any]]] = {}


def defense_class(name: str) -> type[Defense[Any]]:
    """The registered defense called ``name``, or a clear error listing them."""
    if name not in DEFENSES:
        raise GoodnetError(f"unknown defense {name!r}; choose from {', '.join(DEFENSES)}")
    return DEFENSES[name]


def make_defense(name: str, settings: Mapping[str, Any] | None = None, *,
                 text: bool = False) -> Defense[Any]:
    """Build a registered defense from its name and settings (plain values, as in a grid file
    or a model card; ``text=True``: command-line text, converted by each setting's type).

    Unknown settings are refused rather than ignored; a renamed setting still works under its
    old name, with a warning.
    """
    return cast(Defense[Any], make_method(DEFENSES, "defense", name, settings, text=text))
