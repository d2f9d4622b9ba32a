"""GoodNet: the CSAW-HackML lab's detector, built from a BadNet and its repaired version, and
the input-level detectors a user calibrates to a false-alarm rate (issue 18).

For each input the GoodNet answers ``N``, an extra class meaning "judged poisoned", when one of
its checks fires, and the repaired model's class otherwise. The checks:

- **disagreement** (the lab's, on by default): the original and the repaired model's top classes
  differ. A backdoor that the repair removed makes the two disagree on triggered inputs, and a
  repair that kept clean accuracy makes them agree on clean ones; its false-alarm rate is
  whatever the two happen to disagree on.
- **detectors** (:mod:`goodnet.detectors`, each fitted on the *original* model, where a trigger
  still works): a detector fires when its score exceeds its threshold. :func:`calibrated` sets
  every threshold from clean images held out from the repair, for a false-alarm rate the user
  chooses, split evenly between the detectors (so together they stay within it).

The output is a score vector over ``N + 1`` classes whose argmax is that answer: the repaired
model's softmax (with 0 for class N) where no check fires, and the unit vector of class N where
one does. It is built from plain tensor operations, so it exports to ONNX.

A GoodNet file is a model file of kind ``goodnet``: the GoodNet splits itself into what the
storage layer saves (:meth:`GoodNet.file_parts`) and is rebuilt from what it loads
(:meth:`GoodNet.from_file`), so that :mod:`goodnet.artifacts` never imports this module;
``goodnet.load_model`` (:mod:`goodnet.model_files`) calls :meth:`GoodNet.from_file`.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from goodnet.artifacts import PARTS, FileParts, LoadedParts
from goodnet.data.dataset import ImageData
from goodnet.detectors import DEFAULT_DETECTORS as _DEFAULT_DETECTORS
from goodnet.errors import GoodnetError

if TYPE_CHECKING:
    from goodnet.detectors.base import Detection


@dataclass(frozen=True)
class Screen:
    """A detector as a GoodNet uses it: which one, with what settings, and its threshold.

    Attributes:
        detector: the registry name (``goodnet.detectors.DETECTORS``).
        settings: its settings, as plain values.
        threshold: a score above this answers N.
        false_alarm: the false-alarm rate the threshold was calibrated for (this detector's
            share of the GoodNet's).
        calibration_images: how many clean images calibrated it.
        confidence: the probability the rate holds with, over calibration sets (None: on
            average; :func:`goodnet.detectors.calibrate`).
    """

    detector: str
    settings: dict[str, Any] = field(default_factory=dict)
    threshold: float = float("inf")
    false_alarm: float = 0.0
    calibration_images: int = 0
    confidence: float | None = None

    def record(self) -> dict[str, Any]:
        return {"detector": self.detector, "settings": dict(self.settings),
                "threshold": self.threshold, "false_alarm": self.false_alarm,
                "calibration_images": self.calibration_images, "confidence": self.confidence}


class GoodNet(nn.Module):
    """``N + 1`` outputs: the repaired model's class, or ``N`` where a check fires (see the
    module docstring). The models are copied; the caller's are never modified.

    Args:
        original: the backdoored model.
        repaired: its repaired version.
        screens: detectors with their thresholds, each with its fitted detection.
        disagree: also answer N where the two models' top classes differ.
    """

    def __init__(self, original: nn.Module, repaired: nn.Module,
                 screens: Sequence[tuple[Screen, nn.Module]] = (), disagree: bool = True
                 ) -> None:
        super().__init__()
        self.original = copy.deepcopy(original).eval()
        self.repaired = copy.deepcopy(repaired).eval()
        self.screens = tuple(screen for screen, _ in screens)
        names = [screen.detector for screen in self.screens]
        if len(set(names)) != len(names):
            raise GoodnetError(f"a GoodNet takes each detector once, got {names}")
        self.detections = nn.ModuleDict({s.detector: d for s, d in screens})
        self.disagree = disagree

    def screened(self) -> list[tuple[Screen, Detection]]:
        """Each screen with its fitted detection."""
        return [(s, cast("Detection", self.detections[s.detector])) for s in self.screens]

    def flags(self, x: torch.Tensor, repaired_logits: torch.Tensor | None = None
              ) -> torch.Tensor:
        """Whether each input of ``x`` is answered N."""
        second = self.repaired(x) if repaired_logits is None else repaired_logits
        flagged = torch.zeros_like(second[:, 0], dtype=torch.bool)
        if self.disagree:  # not in place: ONNX has no in-place or
            flagged = flagged | (self.original(x).argmax(1) != second.argmax(1))
        for screen, detection in self.screened():
            flagged = flagged | (detection(x) > screen.threshold)
        return flagged

    def scores(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each detector's score for each input of ``x``."""
        return {screen.detector: detection(x) for screen, detection in self.screened()}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        second = self.repaired(x)
        flagged = self.flags(x, second).unsqueeze(1)
        scores = F.pad(second.softmax(1), (0, 1))
        poisoned = F.one_hot(torch.full_like(second.argmax(1), second.shape[1]),
                             second.shape[1] + 1).to(scores.dtype)
        return torch.where(flagged, poisoned, scores)

    def file_parts(self) -> FileParts:
        """What a GoodNet file holds (:func:`goodnet.artifacts.save_model`): both models, its
        checks in the card (``notes["goodnet"]``: the disagreement flag and each detector's
        name, settings and threshold) and what its detectors learned from data
        (``extra/detector/<name>/<tensor>``)."""
        original, repaired = PARTS["goodnet"]
        extras = {f"detector/{screen.detector}/{name}": tensor
                  for screen, detection in self.screened()
                  for name, tensor in detection.tensors().items()}
        checks = {"disagree": self.disagree, "screens": [s.record() for s in self.screens]}
        return FileParts("goodnet", {original: self.original, repaired: self.repaired}, extras,
                         {"goodnet": checks})

    @classmethod
    def from_file(cls, parts: LoadedParts, source: object) -> GoodNet:
        """A GoodNet from what its file holds (:func:`goodnet.artifacts.load_parts`): its two
        models, and the checks its card lists, each detector restored from its tensors (a file
        from before the detectors has only the disagreement check). Errors name ``source``."""
        from goodnet.detectors import make_detector

        checks = parts.card.notes.get("goodnet", {"disagree": True, "screens": []})
        if not isinstance(checks, dict) or not isinstance(checks.get("disagree"), bool) or \
                not isinstance(checks.get("screens"), list):
            raise GoodnetError(f"{source}: the card's goodnet checks are malformed")
        original, repaired = (parts.models[prefix] for prefix in PARTS["goodnet"])
        screens = []
        for record in checks["screens"]:
            try:
                confidence = record.get("confidence")  # absent from files before issue 27
                screen = Screen(str(record["detector"]), dict(record["settings"]),
                                float(record["threshold"]), float(record["false_alarm"]),
                                int(record["calibration_images"]),
                                None if confidence is None else float(confidence))
            except (KeyError, TypeError, ValueError):
                raise GoodnetError(f"{source}: a malformed detector record in the card") \
                    from None
            prefix = f"detector/{screen.detector}/"
            tensors = {k[len(prefix):]: v for k, v in parts.extras.items()
                       if k.startswith(prefix)}
            try:
                detection = make_detector(screen.detector, screen.settings).restore(original,
                                                                                    tensors)
            except GoodnetError as error:
                raise GoodnetError(f"{source}: {error}") from None
            screens.append((screen, detection))
        known = {f"detector/{s.detector}/" for s, _ in screens}
        stray = [k for k in parts.extras if k.startswith("detector/")
                 and not any(k.startswith(p) for p in known)]
        if stray:
            raise GoodnetError(f"{source}: detector tensor {stray[0]!r} belongs to no detector")
        return cls(original, repaired, screens, disagree=checks["disagree"])

    @property
    def reject_class(self) -> int:
        """The index of the extra "poisoned" class (``N``)."""
        for module in reversed(list(self.original.modules())):
            if isinstance(module, nn.Linear):
                return module.out_features
        raise AttributeError("cannot tell the number of classes of the original model")


DISAGREE = "disagree"  # the lab's check, named beside the detectors on the command line

# ``goodnet repair --detect`` with no names (goodnet.detectors.DEFAULT_DETECTORS), kept
# importable here, where it was first defined.
DEFAULT_DETECTORS = _DEFAULT_DETECTORS


def calibration_size(detectors: int, false_alarm: float, confidence: float | None = None
                     ) -> int:
    """The fewest clean images that can calibrate ``detectors`` detectors sharing a false-alarm
    rate of ``false_alarm`` (each at ``false_alarm / detectors``), on average or with
    ``confidence`` (see :func:`goodnet.detectors.calibrate`)."""
    from goodnet.detectors.base import calibration_needed

    if not 0 < false_alarm < 1:
        raise GoodnetError(f"the false-alarm rate must lie in (0, 1), got {false_alarm:g}")
    return calibration_needed(false_alarm / detectors, confidence)


def calibrated_screens(original: nn.Module, detectors: Mapping[str, Any],
                       fit_data: ImageData | None, calibration: ImageData,
                       false_alarm: float = 0.01, confidence: float | None = None
                       ) -> list[tuple[Screen, Detection]]:
    """Detectors (registry name → settings) fitted on ``fit_data`` with the original model and
    calibrated on ``calibration`` (clean images held out from fitting) so that, together, they
    answer N on at most ``false_alarm`` of fresh clean inputs, on average or with
    ``confidence``: each gets ``false_alarm / len(detectors)``."""
    from goodnet.detectors import calibrate, make_detector

    if not detectors:
        raise GoodnetError("calibrating needs at least one detector")
    share = false_alarm / len(detectors)
    screens: list[tuple[Screen, Detection]] = []
    for name, settings in detectors.items():
        detector = make_detector(name, settings)
        detection = detector.detect(original, fit_data)
        threshold = calibrate(detection.scores(calibration), share, confidence)
        screens.append((Screen(name, _settings(detector.config), threshold, share,
                               len(calibration), confidence), detection))
    return screens


def calibrated(original: nn.Module, repaired: nn.Module, detectors: Mapping[str, Any],
               fit_data: ImageData | None, calibration: ImageData, false_alarm: float = 0.01,
               disagree: bool = False, confidence: float | None = None) -> GoodNet:
    """A GoodNet with :func:`calibrated_screens`; ``disagree`` adds the lab's check, whose
    false alarms are not calibrated (off by default here)."""
    return GoodNet(original, repaired,
                   calibrated_screens(original, detectors, fit_data, calibration, false_alarm,
                                      confidence),
                   disagree=disagree)


def _settings(config: Any) -> dict[str, Any]:
    """A detector's settings as plain values (lists, not tuples: they go to JSON)."""
    return {k: list(v) if isinstance(v, tuple) else v
            for k, v in dataclasses.asdict(config).items()}
