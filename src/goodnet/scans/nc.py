"""Neural Cleanse as a scanner (Wang, Yao, Shan, Li, Viswanath, Zheng & Zhao, "Neural Cleanse:
Identifying and Mitigating Backdoor Attacks in Neural Networks", IEEE S&P 2019; reference code
bolunwang/backdoor ``visualizer.py`` and ``mad_outlier_detection.py``).

The detection half of the ``nc`` defense, run alone: for every class the smallest mask and
pattern that send the clean images to it are reverse-engineered, and a class whose mask's L1
norm is an outlier below the others (anomaly index ``(median - norm) / (1.4826 · MAD)`` above
``anomaly_threshold`` 2, the paper's) is flagged as a target. The work is
:func:`goodnet.defenses.nc.detect`, the very function the defense calls, so that a scan and an
``nc`` repair of the same model with the same settings reach the same verdict, bit for bit.

Defaults: the ``nc`` defense's (see :mod:`goodnet.defenses.nc` for their sources and its
departures from the reference: the step budget of 6 passes over the clean data instead of up to
1000, all classes optimised together, the cost starting at ``init_cost``).

Cost: ``epochs`` passes over the clean data, each stamping every image with every class's
trigger (classes × images forward and backward passes per pass), so it grows with the class
count; it needs clean data (a few hundred images). Prefer it when clean data is at hand and
the classes are few (up to a few dozen); without data, or with hundreds of classes, prefer the
data-free ``mm-bd``. Its statistic, ``score``, is the largest anomaly index (higher: more
suspicious); ``notes`` keep every class's mask norm and trigger success.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from torch import nn

from goodnet.data.dataset import ImageData
from goodnet.defenses.nc import NCConfig, detect
from goodnet.scans.base import Scanned, Scanner


@dataclass(frozen=True)
class NCScanConfig:
    """The reverse-engineering and detection settings of Neural Cleanse (the ``nc`` defense's,
    with the same defaults; the unlearning settings have no use in a scan).

    Attributes:
        epochs: reverse-engineering passes over the clean data (the budget).
        batch_size: images per reverse-engineering step.
        lr: Adam learning rate of the masks and patterns (betas 0.5, 0.9).
        init_cost: starting weight of the mask's L1 norm in the loss.
        cost_multiplier: the cost is multiplied by this after ``patience`` successful passes and
            divided by its 1.5th power after ``patience`` unsuccessful ones.
        patience: passes before the cost is changed.
        success_threshold: share of the clean data a trigger must send to its class to count.
        early_stop_patience: passes without a 1 % better norm before a class stops.
        anomaly_threshold: anomaly index above which a class is flagged.
        seed: fixes the starting masks and patterns and the batch orders.
    """

    epochs: int = NCConfig.epochs
    batch_size: int = NCConfig.batch_size
    lr: float = NCConfig.lr
    init_cost: float = NCConfig.init_cost
    cost_multiplier: float = NCConfig.cost_multiplier
    patience: int = NCConfig.patience
    success_threshold: float = NCConfig.success_threshold
    early_stop_patience: int = NCConfig.early_stop_patience
    anomaly_threshold: float = NCConfig.anomaly_threshold
    seed: int = NCConfig.seed

    def __post_init__(self) -> None:
        self.nc_config()  # the defense's settings check these values (errors start "nc:")

    def nc_config(self) -> NCConfig:
        """These settings as the ``nc`` defense's (its unlearning settings at their defaults)."""
        return NCConfig(**dataclasses.asdict(self))


class NCScanner(Scanner[NCScanConfig]):
    """Neural Cleanse: a trigger reverse-engineered per class, small-norm outliers flagged.

    Needs clean data; settings :class:`NCScanConfig`."""

    name = "nc"
    paper = "Wang et al., IEEE S&P 2019"
    Config = NCScanConfig

    def run(self, model: nn.Module, clean: ImageData | None, classes: int,
            progress: bool) -> Scanned:
        assert clean is not None  # needs_clean: Scanner.scan refuses a scan without data
        verdict = detect(model, clean, self.config.nc_config(), progress)
        return Scanned(verdict=verdict, score_name="anomaly index", notes={
            "norms": [t.norm for t in verdict.triggers],
            "success": [t.success for t in verdict.triggers]})
