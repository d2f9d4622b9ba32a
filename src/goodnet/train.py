"""The one training loop: backdoor training, clean training and fine-tuning all go through it.

Deterministic for a given ``seed``: the shuffling order and augmentation come from an explicit
``torch.Generator``; anything else drawing on PyTorch's global generator (dropout, say) runs
inside a forked RNG seeded from ``seed``, so the caller's global random state is untouched. The
device is the model's. Only parameters with ``requires_grad`` are trained, so a caller freezes
what it wants held fixed; channel masks (forward hooks) are not parameters and stay as they are.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from goodnet.data.dataset import BatchSource, batches
from goodnet.errors import GoodnetError
from goodnet.models import channels_last, model_device

log = logging.getLogger(__name__)

OPTIMIZERS = ("sgd", "adam")
SCHEDULES = ("constant", "cosine", "step")
AUGMENTATIONS = ("none", "crop", "crop-flip")


@dataclass(frozen=True)
class TrainConfig:
    """How to train.

    Attributes:
        epochs: passes over the data.
        batch_size: images per step.
        optimizer: "sgd" (with Nesterov-free momentum) or "adam".
        lr: peak learning rate.
        momentum: SGD momentum (ignored by Adam).
        weight_decay: L2 penalty.
        schedule: "constant", "cosine" (per step, to zero) or "step" (× ``gamma`` at each of
            ``milestones``, in epochs).
        milestones: epochs at which the "step" schedule decays.
        gamma: decay factor of the "step" schedule.
        warmup_epochs: linear warm-up from zero over this many epochs (fractions allowed).
        augment: "none", "crop" (random shifts of up to 4 pixels, zero padded) or "crop-flip"
            (also horizontal flips; for natural images, not digits).
        label_smoothing: cross-entropy label smoothing.
        seed: fixes shuffling, augmentation and any other randomness of training.
    """

    epochs: int = 2
    batch_size: int = 128
    optimizer: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    milestones: tuple[int, ...] = ()
    gamma: float = 0.1
    warmup_epochs: float = 0.0
    augment: str = "none"
    label_smoothing: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "milestones", tuple(int(m) for m in self.milestones))
        checks = [
            (self.optimizer in OPTIMIZERS, f"optimizer must be one of {OPTIMIZERS}"),
            (self.schedule in SCHEDULES, f"schedule must be one of {SCHEDULES}"),
            (self.augment in AUGMENTATIONS, f"augment must be one of {AUGMENTATIONS}"),
            (self.epochs >= 0, "epochs must be >= 0"),
            (self.batch_size >= 1, "batch size must be >= 1"),
            (self.lr > 0 and math.isfinite(self.lr), "learning rate must be positive"),
            (self.weight_decay >= 0, "weight decay must be >= 0"),
            (0 <= self.label_smoothing < 1, "label smoothing must be in [0, 1)"),
            (self.warmup_epochs >= 0, "warm-up epochs must be >= 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise GoodnetError(f"{message} (train settings: {self})")


@dataclass
class EpochRecord:
    """What happened in one epoch."""

    epoch: int
    loss: float
    accuracy: float
    lr: float
    seconds: float


@dataclass
class TrainHistory:
    """Per-epoch records of a training run."""

    epochs: list[EpochRecord] = field(default_factory=list)

    @property
    def seconds(self) -> float:
        return sum(e.seconds for e in self.epochs)


def _lr_factor(config: TrainConfig, step: int, steps_per_epoch: int) -> float:
    epoch = step / steps_per_epoch
    warm = config.warmup_epochs
    if warm > 0 and epoch < warm:
        return (step + 1) / (warm * steps_per_epoch)
    if config.schedule == "cosine":
        total = config.epochs * steps_per_epoch
        done = (step - warm * steps_per_epoch) / max(1.0, total - warm * steps_per_epoch)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, done)))
    if config.schedule == "step":
        return config.gamma ** sum(epoch >= m for m in config.milestones)
    return 1.0


def augment_batch(x: torch.Tensor, mode: str, generator: torch.Generator) -> torch.Tensor:
    """Random shifts by up to 4 pixels (zero padding) and, for "crop-flip", horizontal flips."""
    if mode == "none":
        return x
    n, _, h, w = x.shape
    pad = 4
    padded = F.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    rows = (dy.view(n, 1) + torch.arange(h).view(1, h)).to(x.device)
    cols = (dx.view(n, 1) + torch.arange(w).view(1, w)).to(x.device)
    batch = torch.arange(n, device=x.device).view(n, 1, 1)
    out = padded.permute(0, 2, 3, 1)[batch, rows.view(n, h, 1), cols.view(n, 1, w)]
    out = out.permute(0, 3, 1, 2).contiguous()
    if mode == "crop-flip":
        flip = (torch.rand(n, generator=generator) < 0.5).to(x.device)
        out[flip] = out[flip].flip(-1)
    return out


def make_optimizer(params: list[nn.Parameter], config: TrainConfig) -> torch.optim.Optimizer:
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum,
                           weight_decay=config.weight_decay)


def finetune_config(epochs: int = 5, lr: float = 0.01, batch_size: int = 64,
                    seed: int = 0) -> TrainConfig:
    """``goodnet finetune``'s training (the report's ``continue_training``): SGD with momentum
    0.9, weight decay 5e-4 and a cosine schedule; its defaults are the command's."""
    return TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, momentum=0.9,
                       weight_decay=5e-4, schedule="cosine", seed=seed)


@dataclass(frozen=True)
class Hooks:
    """What a defense adds to the training loop (fine-tuning defenses such as FST).

    Attributes:
        penalty: a term added to each step's loss, given the step's (augmented) inputs; it
            may read the model's parameters or what forward hooks recorded.
        after_step: run after each optimiser step, without gradients (a projection, say).
        after_epoch: run after each epoch with its number (1-based), model in training mode.
        gradient_at: a context each step's forward and backward passes run in, left before
            the optimiser steps (PAM's shift of the weights towards the backdoored model's,
            :mod:`goodnet.defenses.pam`).
    """

    penalty: Callable[[torch.Tensor], torch.Tensor] | None = None
    after_step: Callable[[], None] | None = None
    after_epoch: Callable[[int], None] | None = None
    gradient_at: Callable[[], AbstractContextManager[None]] | None = None


def train(
    model: nn.Module, data: BatchSource, config: TrainConfig, *, progress: bool = False,
    hooks: Hooks | None = None,
) -> TrainHistory:
    """Train ``model`` in place on ``data`` with cross-entropy.

    Args:
        model: the network; its trainable parameters are those with ``requires_grad``.
        data: a data set or view (for example a poisoned one) serving ``(x, y)`` batches.
        config: the settings.
        progress: show a progress bar.
        hooks: a loss penalty, a step after each optimiser step, a call after each epoch.

    Returns:
        Loss, accuracy, learning rate and time per epoch.
    """
    with channels_last(model):
        return _train(model, data, config, progress, hooks or Hooks())


def _train(model: nn.Module, data: BatchSource, config: TrainConfig, progress: bool,
           hooks: Hooks) -> TrainHistory:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise GoodnetError("nothing to train: the model has no trainable parameters")
    if len(data) == 0:
        raise GoodnetError("cannot train on an empty data set")
    device = model_device(model)
    optimizer = make_optimizer(params, config)
    steps_per_epoch = math.ceil(len(data) / config.batch_size)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: _lr_factor(config, step, steps_per_epoch)
    )
    generator = torch.Generator().manual_seed(config.seed)
    history = TrainHistory()
    was_training = model.training
    model.train()
    fork_devices = [device.index or 0] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=fork_devices):
            torch.manual_seed(config.seed)
            for epoch in range(config.epochs):
                history.epochs.append(
                    _run_epoch(model, data, config, optimizer, scheduler, generator, device,
                               epoch, progress, hooks)
                )
                if hooks.after_epoch is not None:  # its randomness is not training's
                    with torch.random.fork_rng(devices=fork_devices):
                        hooks.after_epoch(epoch + 1)
                    model.train()
    finally:
        model.train(was_training)
    return history


def _backward(model: nn.Module, x: torch.Tensor, y: torch.Tensor, config: TrainConfig,
              hooks: Hooks, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One step's forward and backward passes: the logits and the (penalised) loss."""
    logits = model(x)
    loss = F.cross_entropy(logits, y, label_smoothing=config.label_smoothing)
    if hooks.penalty is not None:
        loss = loss + hooks.penalty(x)
    if not torch.isfinite(loss):
        raise GoodnetError(
            f"training diverged at epoch {epoch + 1} (loss {loss.item()}); "
            "lower the learning rate"
        )
    loss.backward()
    return logits, loss


def _run_epoch(
    model: nn.Module,
    data: BatchSource,
    config: TrainConfig,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    generator: torch.Generator,
    device: torch.device,
    epoch: int,
    progress: bool,
    hooks: Hooks,
) -> EpochRecord:
    start = time.perf_counter()
    total_loss, correct, seen = 0.0, 0, 0
    lr = optimizer.param_groups[0]["lr"]
    bar = tqdm(total=len(data), disable=not progress, unit="img", leave=False, mininterval=1.0,
               desc=f"epoch {epoch + 1}/{config.epochs}")
    with bar:
        for x, y in batches(data, config.batch_size, shuffle=True, generator=generator,
                            device=device):
            x = augment_batch(x, config.augment, generator)
            optimizer.zero_grad(set_to_none=True)
            with hooks.gradient_at() if hooks.gradient_at else contextlib.nullcontext():
                logits, loss = _backward(model, x, y, config, hooks, epoch)
            optimizer.step()
            if hooks.after_step is not None:
                with torch.no_grad():
                    hooks.after_step()
            lr = optimizer.param_groups[0]["lr"]
            scheduler.step()
            total_loss += loss.item() * len(y)
            correct += int((logits.argmax(1) == y).sum())
            seen += len(y)
            bar.update(len(y))
            bar.set_postfix(loss=f"{total_loss / seen:.3f}", acc=f"{correct / seen:.3f}",
                            refresh=False)
    record = EpochRecord(epoch + 1, total_loss / seen, correct / seen, lr,
                         time.perf_counter() - start)
    log.info("epoch %d: loss %.4f, accuracy %.4f, %.1f s", record.epoch, record.loss,
             record.accuracy, record.seconds)
    return record
