"""SEAM: selective amnesia (Zhu, Tang, Tang, Wang & Tang, "Selective Amnesia: On Efficient,
High-Fidelity and Blind Suppression of Backdoor Effects in Trojaned Machine Learning Models",
IEEE S&P 2023, arXiv:2212.04687; reference code TDteach/SEAM ``seam.py``, by the second author).

Two phases on the defender's clean data, on a copy of the model. **Forget**: train on clean
images with random wrong labels until the model has forgotten its task, the backdoor with it
(catastrophic forgetting; the paper's NTK analysis argues that random labels forget an unknown
backdoor most). **Recover**: train on the clean images with their true labels; the main task
comes back fast from the features the forgetting left, the backdoor, which no image here
exercises, does not.

Defaults and rules, from the reference code (``make_config`` and ``train``):

- **Random labels**: each batch draws, for each image, a label uniformly among the classes
  other than its own (fresh at every step).
- **Forget**: Adam, ``lr`` 3e-5, weight decay 5e-5, batch 32; stops after the first epoch whose
  held-out accuracy is below ``2 / K`` (``forget_accuracy``; K the number of classes), at most
  ``epochs`` epochs (300).
- **Recover**: Adam with betas (0.5, 0.9), ``recover_lr`` 5e-4, weight decay 5e-5, batch 32;
  a patience of 10 (``recover_patience``) spent by each epoch whose held-out accuracy is above
  0.92 (``recover_accuracy``) or, after epoch 50, below the best so far by more than 0.001;
  stops when it is spent, at most ``recover_epochs`` epochs (300).

Departures, documented:

- **What the stop rules read.** The reference measures its stop rules on the test set. goodnet
  holds ``select_share`` (a tenth) of the clean data out, stratified, measures the rules on it
  and trains both phases on the rest; nothing reads test data.
- **Forget set.** The reference forgets on 0.1 % of the training set and recovers on 10 %,
  drawn separately. goodnet forgets on ``forget_share`` of the data it trains on (all of it by
  default: a hundredth of 1 % of MNIST is six images) and recovers on all of it.
- **The result.** The reference reports the recovery epoch with the best test accuracy minus
  test ASR, a choice made on test and poisoned data; goodnet's result is the model after the
  last recovery epoch.
- **Randomness** comes from ``seed`` alone: the held-out split, the batch order and the random
  labels (dropout, if any, inside a forked RNG).

The curve holds the held-out accuracy before training (epoch 0) and after each epoch of both
phases, numbered on, each point naming its phase; "forgotten" marks the last forgetting epoch,
"recovered" (the result) the last recovery epoch.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from goodnet.data.dataset import ImageData, batches, split_clean
from goodnet.defenses.base import Curve, Defense, Point, Repaired, Steps
from goodnet.errors import GoodnetError
from goodnet.models import channels_last, model_device

PLATEAU_AFTER = 50  # recovery epochs after which a fall from the best accuracy spends patience
PLATEAU_SLACK = 1e-3  # how far below the best that fall must be (the reference's)


@dataclass(frozen=True)
class SEAMConfig:
    """Settings of SEAM (defaults: the reference code's, but the forget set; see the module).

    Attributes:
        lr: Adam learning rate of the forgetting phase.
        epochs: most forgetting epochs.
        forget_accuracy: forgetting stops after the first epoch whose held-out accuracy is
            below this; None: twice chance, ``2 / K``.
        forget_share: share of the training part of the clean data forgotten on (stratified).
        recover_lr: Adam learning rate of the recovery phase (betas 0.5, 0.9).
        recover_epochs: most recovery epochs.
        recover_accuracy: each recovery epoch whose held-out accuracy is above this spends
            one unit of patience.
        recover_patience: recovery stops once this many epochs have spent patience.
        weight_decay: Adam's L2 penalty, both phases.
        batch_size: batch size, both phases.
        select_share: share of the clean data held out for the stop rules.
        seed: fixes the held-out split, the batch order and the random labels.
    """

    lr: float = 3e-5
    epochs: int = 300
    forget_accuracy: float | None = None
    forget_share: float = 1.0
    recover_lr: float = 5e-4
    recover_epochs: int = 300
    recover_accuracy: float = 0.92
    recover_patience: int = 10
    weight_decay: float = 5e-5
    batch_size: int = 32
    select_share: float = 0.1
    seed: int = 0

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.recover_epochs < 1 or self.batch_size < 1:
            raise GoodnetError("seam: epochs, recover_epochs and batch size must be positive")
        if not all(math.isfinite(v) and v > 0 for v in (self.lr, self.recover_lr)):
            raise GoodnetError("seam: lr and recover_lr must be positive")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise GoodnetError("seam: weight decay must be >= 0")
        if self.forget_accuracy is not None and not 0 < self.forget_accuracy <= 1:
            raise GoodnetError("seam: forget_accuracy must lie in (0, 1]")
        if not 0 <= self.recover_accuracy <= 1 or self.recover_patience < 1:
            raise GoodnetError("seam: recover_accuracy must lie in [0, 1], patience >= 1")
        if not 0 < self.forget_share <= 1 or not 0 < self.select_share < 1:
            raise GoodnetError("seam: forget_share must lie in (0, 1], select_share in (0, 1)")


def wrong_labels(labels: torch.Tensor, num_classes: int,
                 generator: torch.Generator) -> torch.Tensor:
    """For each label, one of the other ``num_classes - 1`` classes, uniformly (as the
    reference: a draw in ``[0, K - 1)`` moved up by one from the true label on)."""
    drawn = torch.randint(0, num_classes - 1, labels.shape, generator=generator)
    return drawn + (drawn >= labels.cpu()).long()


def train_epoch(model: nn.Module, data: ImageData, optimizer: torch.optim.Optimizer,
                batch_size: int, generator: torch.Generator, forget: bool) -> float:
    """One epoch of cross-entropy on ``data`` (random wrong labels when ``forget``).

    Returns:
        The epoch's mean loss.
    """
    device = model_device(model)
    model.train()
    total = 0.0
    for x, y in batches(data, batch_size, shuffle=True, generator=generator):
        if forget:
            y = wrong_labels(y, data.num_classes, generator)
        x, y = x.to(device), y.to(device)
        loss = F.cross_entropy(model(x), y)
        if not torch.isfinite(loss):
            raise GoodnetError(f"seam: the loss diverged ({loss.item()}); lower the lr")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += loss.item() * len(y)
    model.eval()
    return total / len(data)


class RecoveryStop:
    """The reference's recovery stop: patience spent by each epoch above the accuracy
    threshold, or, after :data:`PLATEAU_AFTER` epochs, below the best so far."""

    def __init__(self, threshold: float, patience: int) -> None:
        self.threshold, self.patience, self.best = threshold, patience, 0.0

    def __call__(self, epoch: int, accuracy: float) -> bool:
        """Whether recovery stops after epoch ``epoch`` (1-based) with ``accuracy``."""
        self.best = max(self.best, accuracy)
        if accuracy > self.threshold or (
                epoch > PLATEAU_AFTER + 1 and accuracy < self.best - PLATEAU_SLACK):
            self.patience -= 1
        return self.patience <= 0


class SEAM(Defense[SEAMConfig]):
    """Forget everything with random labels, then recover the task with true ones."""

    name = "seam"
    paper = "Zhu et al., IEEE S&P 2023"
    Config = SEAMConfig
    quick: ClassVar[Mapping[str, Any]] = {"epochs": 3, "recover_epochs": 3, "lr": 1e-3,
                                            "batch_size": 32, "select_share": 0.2}

    def run(self, model: nn.Module, clean: ImageData | None, steps: Steps,
            progress: bool) -> Repaired:
        assert clean is not None
        cfg = self.config
        held, learn = split_clean(clean, cfg.select_share, seed=cfg.seed)
        forget_set = learn if cfg.forget_share == 1 else split_clean(
            learn, cfg.forget_share, seed=cfg.seed)[0]
        work = copy.deepcopy(model).eval()
        if not any(p.requires_grad for p in work.parameters()):
            raise GoodnetError("seam: the model has no trainable parameters")
        threshold = cfg.forget_accuracy or 2 / clean.num_classes
        points: list[Point] = [steps.measure(work, held, 0, None)]
        generator = torch.Generator().manual_seed(cfg.seed)
        device = model_device(work)
        with channels_last(work), torch.random.fork_rng(
                devices=[device.index or 0] if device.type == "cuda" else []):
            torch.manual_seed(cfg.seed)  # dropout's draws, inside the fork
            forget = self._phase(work, forget_set, held, steps, points, generator, True,
                                 lambda _epoch, accuracy: accuracy < threshold)
            forgotten = copy.deepcopy(work)
            marks = [("forgotten", len(points) - 1)]
            recover = self._phase(work, learn, held, steps, points, generator, False,
                                  RecoveryStop(cfg.recover_accuracy, cfg.recover_patience))
        marks.append(("recovered", len(points) - 1))
        return Repaired(
            model=work, curve=Curve("epoch", tuple(points), tuple(marks)),
            variants={"forgotten": forgotten, "recovered": work}, chosen="recovered",
            notes={"forget_loss": forget, "recover_loss": recover,
                   "forget_epochs": len(forget), "recover_epochs": len(recover),
                   "forget_accuracy": threshold, "held_out": len(held)})

    def _phase(self, work: nn.Module, data: ImageData, held: ImageData, steps: Steps,
               points: list[Point], generator: torch.Generator, forget: bool,
               stop: Any) -> list[float]:
        """Train until ``stop(epoch, held-out accuracy)`` or the phase's last epoch; each
        epoch's point is appended to ``points``. Returns the epochs' losses."""
        cfg = self.config
        params = [p for p in work.parameters() if p.requires_grad]
        if forget:
            optimizer = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        else:
            optimizer = torch.optim.Adam(params, lr=cfg.recover_lr, betas=(0.5, 0.9),
                                         weight_decay=cfg.weight_decay)
        phase = "forget" if forget else "recover"
        losses: list[float] = []
        for epoch in range(1, (cfg.epochs if forget else cfg.recover_epochs) + 1):
            losses.append(train_epoch(work, data, optimizer, cfg.batch_size, generator, forget))
            point = steps.measure(work, held, len(points), None, extra=(("phase", phase),))
            points.append(point)
            assert point.clean_data_accuracy is not None
            if stop(epoch, point.clean_data_accuracy):
                break
        return losses
