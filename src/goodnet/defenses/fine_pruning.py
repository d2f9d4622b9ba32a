"""Fine-pruning (Liu, Dolan-Gavitt & Garg, "Fine-Pruning: Defending Against Backdooring Attacks
on Deep Neural Networks", RAID 2018, arXiv:1805.12185).

Prune the last convolution's channels in increasing order of mean clean activation (as
:mod:`goodnet.defenses.prune`) until the clean accuracy has dropped by ``max_drop``, then
fine-tune the pruned network on the same clean data with the masks held fixed, so the remaining
channels relearn the task and lose the backdoor's hold.

Defaults: the pruning budget is 4 points (the paper stops pruning at a fixed drop in validation
accuracy; 4 % is the lab's middle budget); fine-tuning follows BackdoorBench's ``fp`` defense
(SGD, lr 0.01, momentum 0.9, weight decay 5e-4, cosine schedule) for 10 epochs over the clean
data, batch 64 (BackdoorBench: 100 epochs over 5 % of CIFAR-10 at batch 256; with 1 % of MNIST,
10 epochs are the same order of steps, about 100). The authors' code fixes the pruned count
(48 of 60 channels) and publishes no fine-tuning script; BackdoorBench chooses the pruning
amount on clean *test* accuracy, goodnet on the defender's clean data only.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import nn

from goodnet.data.dataset import ImageData
from goodnet.defenses.base import Curve, Defense, Repaired, Steps
from goodnet.defenses.prune import Prune, PruneConfig
from goodnet.errors import GoodnetError
from goodnet.train import TrainConfig, train


@dataclass(frozen=True)
class FinePruningConfig:
    """Settings of fine-pruning.

    Attributes:
        layer: the layer pruned; None: the last convolution (its BatchNorm when one follows).
        rank_layer: where activations are ranked; None: ``layer``, after ReLU.
        max_drop: stop pruning at this clean-accuracy drop (absolute fraction).
        semantics: "channel" or "keep-bias" (see ``goodnet.masking``).
        epochs: fine-tuning epochs over the clean data.
        lr: fine-tuning learning rate (SGD with momentum 0.9, cosine schedule).
        weight_decay: fine-tuning weight decay.
        batch_size: fine-tuning batch size.
        seed: fixes the fine-tuning order.
    """

    layer: str | None = None
    rank_layer: str | None = None
    max_drop: float = 0.04
    semantics: str = "channel"
    epochs: int = 10
    lr: float = 0.01
    weight_decay: float = 5e-4
    batch_size: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 < self.max_drop < 1 or self.epochs < 0:
            raise GoodnetError("fine-pruning: max_drop in (0, 1) and epochs >= 0")


class FinePruning(Defense[FinePruningConfig]):
    """Prune by clean activation, then fine-tune with the masks fixed."""

    name = "fine-pruning"
    paper = "Liu et al., RAID 2018, arXiv:1805.12185"
    Config = FinePruningConfig
    quick: ClassVar[Mapping[str, Any]] = {"epochs": 1}

    def run(self, model: nn.Module, clean: ImageData | None, steps: Steps,
            progress: bool) -> Repaired:
        assert clean is not None
        cfg = self.config
        pruned = Prune(PruneConfig(layer=cfg.layer, rank_layer=cfg.rank_layer,
                                   max_drops=(cfg.max_drop,), semantics=cfg.semantics)
                       ).run(model, clean, steps, progress)
        tuned = copy.deepcopy(pruned.model)
        history = train(tuned, clean, TrainConfig(
            epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr, momentum=0.9,
            weight_decay=cfg.weight_decay, schedule="cosine", seed=cfg.seed), progress=progress)
        tuned.eval()
        count = pruned.notes["pruned"][pruned.chosen]
        final = steps.measure(tuned, clean, count, count, label="fine-tuned",
                              extra=(("fine_tuned", True),))  # the column curve.csv had
        points = (*pruned.curve.points, final)
        curve = Curve("pruned", points, (("pruned", count), ("fine-tuned", len(points) - 1)))
        return Repaired(
            model=tuned, curve=curve, masks=pruned.masks,
            variants={"pruned": pruned.model, "fine-tuned": tuned},
            variant_masks={"pruned": pruned.masks, "fine-tuned": pruned.masks} if pruned.masks
            else {}, chosen="fine-tuned",
            notes={**pruned.notes, "fine_tuning_loss": [e.loss for e in history.epochs]},
        )
