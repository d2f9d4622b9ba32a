"""Unlearn a reversed trigger for every class (issue 29, item 1): Neural Cleanse's unlearning
without its outlier test.

Neural Cleanse (Wang et al., IEEE S&P 2019; :mod:`goodnet.defenses.nc`) reverse-engineers a
trigger towards each class, flags the classes whose trigger is an outlier of small norm (anomaly
index above 2), and unlearns only those. On the zoo it flags a class on about half the models
and returns the others unchanged, backdoor included (issue 29: 1 to 3 of 20 rows repaired). The
reversed triggers are found either way; only the test decides whether they are used. This
defense unlearns all of them: a copy of the model is fine-tuned on the clean data in which
``unlearn_share`` of the images carry a reversed trigger, the stamped images split evenly among
the classes, each keeping its true label. A backdoor whose trigger Neural Cleanse recovers is
unlearned whether or not its norm stands out; a clean class's trigger (a small universal
adversarial patch) is unlearned too, which costs little accuracy and some robustness gained.

Settings: ``scan`` holds the reverse-engineering settings (the ``nc`` scanner's, with their
defaults; a nested setting, ``-p 'scan={epochs: 4}'``); the unlearning settings are NC's with its
defaults (``unlearn_share`` 0.2, ``unlearn_epochs`` 10, ``unlearn_lr`` 0.01, batch 256, SGD with
momentum 0.9, weight decay 5e-4, cosine schedule; see :mod:`goodnet.defenses.nc` for their
sources and departures). The scan's verdict is kept in the result (``scan``), so a user sees
which classes Neural Cleanse would have flagged.

What it cannot do: a trigger that a patch mask cannot express (WaNet's warp, Input-aware's
per-image patterns, a low-frequency perturbation) is reversed only as the nearest patch, and
unlearning that patch need not remove the backdoor; BTI-DBF's generator of trigger-like
transformations (``btidbf``, :mod:`goodnet.defenses.btidbf`) is the issue's answer to that.
Its time is Neural Cleanse's, which grows with the number of classes (about 35 s for 10
classes of the small CNN here). On a model of more than 100 classes the scan pre-selects
candidate classes (K-Arm, :mod:`goodnet.scans.karm`) and fully reverses only those and a random
reference sample; this defense then unlearns those classes' triggers alone (the others' are
warm-up triggers, random half-image masks) and watches their success on the scan's clean images.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import nn

from goodnet.data.dataset import ImageData
from goodnet.defenses.base import Defense, Point, Repaired, Steps
from goodnet.defenses.nc import frozen_detect, unlearned, unlearning_config, unlearning_data
from goodnet.errors import GoodnetError
from goodnet.scans.nc import NCScanConfig, scan_data


@dataclass(frozen=True)
class UnlearnConfig:
    """Settings of reversed-trigger unlearning for every class.

    Attributes:
        scan: the reverse-engineering settings (the ``nc`` scanner's).
        unlearn_share: share of the clean data stamped with a reversed trigger.
        unlearn_epochs: fine-tuning epochs.
        unlearn_lr: fine-tuning learning rate (SGD, momentum 0.9, weight decay 5e-4, cosine).
        unlearn_batch_size: fine-tuning batch size.
        seed: fixes the stamped images and the batch order (the scan has its own seed).
        flagged_share: where Neural Cleanse flags classes, this share of the clean data is
            stamped with the flagged triggers (as ``nc`` unlearns them; its 0.2), and
            ``unlearn_share`` more with every class's; 0 (the default): every class's alone.
    """

    added: ClassVar[dict[str, Any]] = {"flagged_share": 0.0}

    scan: NCScanConfig = NCScanConfig()  # noqa: RUF009 (frozen: one shared instance is safe)
    unlearn_share: float = 0.2
    unlearn_epochs: int = 10
    unlearn_lr: float = 0.01
    unlearn_batch_size: int = 256
    seed: int = 0
    flagged_share: float = 0.0

    def __post_init__(self) -> None:
        if not 0 < self.unlearn_share <= 1 or not 0 <= self.flagged_share < 1:
            raise GoodnetError("unlearn: unlearn_share must be in (0, 1] and flagged_share in "
                               "[0, 1)")
        if min(self.unlearn_epochs, self.unlearn_batch_size) < 1 or not self.unlearn_lr > 0:
            raise GoodnetError("unlearn: unlearn_epochs, unlearn_batch_size and unlearn_lr "
                               "must be positive")


class Unlearn(Defense[UnlearnConfig]):
    """Reverse-engineer a trigger per class (Neural Cleanse) and unlearn every one of them."""

    name = "unlearn"
    paper = "Wang et al., IEEE S&P 2019 (NC's unlearning, every class; goodnet, issue 29)"
    Config = UnlearnConfig
    quick: ClassVar[Mapping[str, Any]] = {"scan": {"epochs": 1}, "unlearn_epochs": 1}

    def run(self, model: nn.Module, clean: ImageData | None, steps: Steps,
            progress: bool) -> Repaired:
        assert clean is not None
        cfg = self.config
        work = copy.deepcopy(model).eval()
        scan = frozen_detect(work, clean, cfg.scan, progress)
        triggers = list(scan.triggers)
        notes = {"norms": [t.norm for t in triggers], "anomaly_index": list(scan.scores),
                 "success": [t.success for t in triggers], "flagged": list(scan.targets)}
        flagged = [triggers[k] for k in scan.targets]
        watched = None
        if scan.fully_reversed:  # K-Arm's pre-selection: the others' triggers are warm-ups
            watched = list(scan.fully_reversed)
            triggers = [triggers[k] for k in watched]
            notes["fully_reversed"] = watched
        if cfg.flagged_share > 0 and flagged:  # NC's unlearning, and every class besides
            data = unlearning_data(clean, flagged, cfg.flagged_share, cfg.seed,
                                   more=(triggers, cfg.unlearn_share))
        else:
            data = unlearning_data(clean, triggers, cfg.unlearn_share, cfg.seed)
        notes["unlearning_images"] = sum(len(g.indices) for g in data.groups)
        points: list[Point] = [steps.measure(model, clean, 0, None)]
        return unlearned(work, clean, data, scan, watched, points, steps,
                         unlearning_config(cfg), notes, progress,
                         probe=scan_data(clean, cfg.scan))

