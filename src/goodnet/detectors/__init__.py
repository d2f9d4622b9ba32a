"""Input-level backdoor detectors, one module each, through the ``DETECTORS`` registry (issue
18).

``make_detector(name, settings).detect(model, clean)`` returns a
:class:`~goodnet.detectors.base.Detection`, a module scoring each input (higher: more
suspicious); :func:`~goodnet.detectors.base.calibrate` turns clean scores into the threshold for
a chosen false-alarm rate. Adding a detector is one module (an :class:`InputDetector` subclass
with its settings dataclass and a ``fit`` method) and one line here.

Beside the registry, as in every registry package, ``DEFAULT_DETECTORS`` names what runs when the
user names no detector (``goodnet repair --detect`` with no names): registered detectors, at
their default settings, the same for every model.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, cast

from goodnet.detectors.base import Detection, InputDetector, calibrate
from goodnet.detectors.mahalanobis import Mahalanobis, MahalanobisConfig
from goodnet.detectors.scale_up import ScaleUp, ScaleUpConfig
from goodnet.detectors.strip import STRIP, STRIPConfig
from goodnet.detectors.teco import TeCo, TeCoConfig
from goodnet.methods import make_method

DETECTORS: dict[str, type[InputDetector[Any]]] = {
    "mahalanobis": Mahalanobis,
    "scale-up": ScaleUp,
    "strip": STRIP,
    "teco": TeCo,
}

# ``goodnet repair --detect`` with no names: the set the rule of BENCHMARKS.md ("The default
# GoodNet's detectors") picked over the small-CNN zoo, once, for every model.
DEFAULT_DETECTORS: tuple[str, ...] = ("mahalanobis",)


def make_detector(name: str, settings: Mapping[str, Any] | None = None, *,
                  text: bool = False) -> InputDetector[Any]:
    """Build a registered detector from its name and settings (plain values; ``text=True``:
    command-line text). Unknown detectors and settings are refused."""
    return cast(InputDetector[Any], make_method(DETECTORS, "detector", name, settings,
                                               text=text))


__all__ = [
    "DEFAULT_DETECTORS",
    "DETECTORS",
    "STRIP",
    "Detection",
    "InputDetector",
    "Mahalanobis",
    "MahalanobisConfig",
    "STRIPConfig",
    "ScaleUp",
    "ScaleUpConfig",
    "TeCo",
    "TeCoConfig",
    "calibrate",
    "make_detector",
]
