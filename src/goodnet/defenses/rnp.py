"""RNP: Reconstructive Neuron Pruning (Li, Lyu, Ma, Koren, Lyu, Li & Jiang, "Reconstructive
Neuron Pruning for Backdoor Defense", ICML 2023, arXiv:2305.14876; reference code
bboylyg/RNP ``main.py``).

1. **Unlearning.** A copy of the model is trained by gradient *ascent* on the clean data
   (SGD lr 0.01, momentum 0.9, weight decay 5e-4, multi-step schedule at epochs 10 and 20) until
   its clean accuracy falls to ``clean_threshold`` (0.2, the code's default; the paper says
   0.1), at most 20 epochs. Clean features are erased first; backdoor features survive.
2. **Recovering.** On the unlearned copy, only per-channel masks in [0, 1] are learned (SGD,
   ``mask_lr`` 0.2, momentum 0.9, loss scaled by ``mask_loss_scale`` 0.2, ``mask_epochs`` 20,
   masks clipped after each step) to bring clean accuracy back. Channels that carry the
   backdoor are not needed for that and their masks fall.
3. **Pruning.** The *original* model's channels whose mask is low are pruned.

Masks sit on the mask point of every convolution (its BatchNorm when there is one, else the
convolution itself, so ``deepid`` and other networks without BatchNorm work; see
:mod:`goodnet.defenses.channel_masks`). The reference masks and prunes BatchNorm's scale γ only
and keeps the shift β: ``semantics="keep-bias"`` (the default, faithful); ``"channel"`` prunes
the whole channel.

Departures, each a setting (``reference=True`` restores the reference code's behaviour):

- **Stopping rule** (``stop="step"``, default). The reference checks the running training
  accuracy once per epoch; with 1 % of MNIST (five batches an epoch) the ascent can fall from
  99 % to chance inside one epoch, and a recovering step cannot bring a collapsed network back.
  goodnet measures clean accuracy after every step (on the mask-learning data, BatchNorm in
  training mode as the ascent sees it, without touching its running statistics), and when a step
  overshoots below ``overshoot`` × ``clean_threshold`` it undoes the step and retries it with
  half the learning rate (up to ``backtracks`` times), so unlearning stops inside the window the
  paper intends. ``stop="epoch"`` is the reference's rule.
- **Gradient clipping** (``clip_norm=20``). The reference calls ``clip_grad_norm_(max_norm=20)``
  before ``backward()``, where it clips nothing; goodnet clips after ``backward()``, which is
  what the call meant. ``reference=True`` sets no clipping.
- **If the threshold is never reached**, the reference crashes (no checkpoint is written);
  goodnet keeps the last unlearned state and records ``reached: false`` in the notes.
- **Choosing what to prune** (``select="clean"``, default). The reference sweeps thresholds and
  prints test metrics for the user to pick from; the paper reports a fixed threshold of 0.2.
  goodnet holds out 20 % of the clean data from unlearning and recovering and takes the largest
  threshold that keeps the held-out accuracy within ``max_drop`` (see
  :mod:`goodnet.defenses.channel_masks`); ``select="threshold"`` uses a fixed one,
  ``select="count"`` a number of channels, and ``select="proxy"`` the threshold within
  ``max_drop`` with the lowest ASR of Neural Cleanse's reversed trigger
  (:mod:`goodnet.defenses.proxy`).
- **Fully connected neurons** (``hidden_linear=True``). The reference networks (ResNet-18,
  VGG) end in global pooling and one linear layer, so masking BatchNorm channels reaches every
  hidden unit. On a network with a fully connected head (``small_cnn``, ``deepid``), the ascent
  does much of its damage in that head, which convolution masks cannot undo: on the MNIST
  BadNet small CNN recovering with convolution masks only brought clean accuracy back to 48 %
  and zeroed 46 of the last convolution's 64 channels; with the head's neurons masked as well,
  to 84 %. goodnet masks (and may prune) the outputs of every linear layer but the last;
  ``hidden_linear=False`` masks convolutions only. For networks like the reference's the two
  are the same.
- No data augmentation (the reference uses CIFAR crop and flip); pass augmented data if wanted.
- **Recovery** (``recover_epochs=0``, off). With ``recover_epochs > 0`` the chosen pruning is
  fine-tuned on the mask-learning part of the clean data with its masks held, to win back the
  clean accuracy pruning cost (not in the paper; see :mod:`goodnet.defenses.channel_masks`).
  It trains the weights; ``mask_epochs`` is the mask learning of step 2.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from goodnet.data.dataset import ImageData, batches
from goodnet.defenses.channel_masks import (
    LearnableMasks,
    MaskDefense,
    MaskSettings,
    frozen,
)
from goodnet.errors import GoodnetError
from goodnet.models import channels_last, model_device

STOPS = ("step", "epoch")


@dataclass(frozen=True)
class RNPConfig(MaskSettings):
    """Settings of RNP (defaults: the reference code's, with goodnet's robust unlearning).

    Attributes:
        clean_threshold: unlearning stops when clean accuracy is at or below this.
        unlearn_lr, momentum, weight_decay: SGD for the ascent.
        unlearn_epochs: at most this many epochs of ascent.
        milestones: epochs at which the ascent's lr is divided by 10.
        batch_size: for unlearning and recovering.
        stop: "step" (check after every step, with backtracking) or "epoch" (the reference).
        overshoot: a step ending below ``overshoot × clean_threshold`` is retried at half the lr.
        backtracks: at most this many halvings per step.
        clip_norm: gradient-norm clipping during the ascent (None: none, as the reference).
        mask_lr, mask_epochs: mask learning (SGD, momentum 0.9) of step 2.
        mask_loss_scale: the mask-learning loss is scaled by this.
        semantics: "keep-bias" (mask γ, keep β: the reference) or "channel".
        hidden_linear: also mask the neurons of fully connected layers before the output.
        select, threshold, count, thresholds, max_drop, select_share: how much to prune (see
            :class:`goodnet.defenses.channel_masks.Choice`).
        seed: fixes batch order and the held-out split.
        recover_epochs, recover_lr, recover_batch_size: fine-tune the chosen pruning with its
            masks held (0 epochs: no recovery; see
            :class:`goodnet.defenses.channel_masks.MaskSettings`).
        reference: use the reference code's unlearning (per-epoch stop, no clipping).
    """

    renamed: ClassVar[dict[str, str]] = {
        "unlearning_lr": "unlearn_lr", "unlearning_epochs": "unlearn_epochs",
        "recovering_lr": "mask_lr", "recovering_epochs": "mask_epochs",
        "alpha": "mask_loss_scale"}

    clean_threshold: float = 0.2
    unlearn_lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    unlearn_epochs: int = 20
    milestones: tuple[int, ...] = (10, 20)
    batch_size: int = 128
    stop: str = "step"
    overshoot: float = 0.75
    backtracks: int = 8
    clip_norm: float | None = 20.0
    mask_lr: float = 0.2
    mask_epochs: int = 20
    mask_loss_scale: float = 0.2
    reference: bool = False

    def __post_init__(self) -> None:
        if self.reference:
            object.__setattr__(self, "stop", "epoch")
            object.__setattr__(self, "clip_norm", None)
        if self.stop not in STOPS:
            raise GoodnetError(f"rnp: stop must be one of {STOPS}, got {self.stop!r}")
        if not 0 < self.clean_threshold < 1 or not 0 < self.overshoot <= 1:
            raise GoodnetError("rnp: clean_threshold in (0, 1), overshoot in (0, 1]")
        if self.unlearn_epochs < 1 or self.mask_epochs < 0 or self.batch_size < 1:
            raise GoodnetError("rnp: epochs and batch size must be positive")
        object.__setattr__(self, "milestones", tuple(int(m) for m in self.milestones))
        super().__post_init__()


@torch.no_grad()
def _train_mode_accuracy(model: nn.Module, data: ImageData, batch_size: int) -> float:
    """Accuracy with BatchNorm using batch statistics (as the ascent sees the model), leaving
    the running statistics untouched."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    tracked = [m.num_batches_tracked.clone() if m.num_batches_tracked is not None else None
               for m in norms]
    device = model_device(model)
    hits = 0
    try:
        for m in norms:
            m.momentum = 0.0
        model.train()
        for x, y in batches(data, batch_size, device=device):
            hits += int((model(x).argmax(1) == y).sum())
    finally:
        for m, momentum, count in zip(norms, momenta, tracked, strict=True):
            m.momentum = momentum
            if count is not None and m.num_batches_tracked is not None:
                m.num_batches_tracked.copy_(count)
    return hits / len(data)


def unlearn(model: nn.Module, data: ImageData, cfg: RNPConfig) -> tuple[nn.Module, dict]:
    """A copy of ``model`` trained by gradient ascent on ``data`` until its clean accuracy is at
    or below ``cfg.clean_threshold``; returns it and a log of the ascent."""
    work = copy.deepcopy(model).train().to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    device = model_device(work)
    optimizer = torch.optim.SGD(work.parameters(), lr=cfg.unlearn_lr, momentum=cfg.momentum,
                                weight_decay=cfg.weight_decay)
    schedule = torch.optim.lr_scheduler.MultiStepLR(optimizer, list(cfg.milestones), gamma=0.1)
    generator = torch.Generator().manual_seed(cfg.seed)
    log: dict[str, Any] = {"steps": 0, "backtracks": 0, "accuracy": [], "reached": False}
    for _epoch in range(cfg.unlearn_epochs + (1 if cfg.stop == "epoch" else 0)):
        hits = seen = 0
        for x, y in batches(data, cfg.batch_size, shuffle=True, generator=generator,
                            device=device):
            if cfg.stop == "epoch":
                output = _ascent_step(work, optimizer, x, y, cfg.clip_norm)
                hits += int((output.argmax(1) == y).sum())
                seen += len(y)
                log["steps"] += 1
                continue
            accuracy = _backtracking_step(work, optimizer, x, y, data, cfg, log)
            log["steps"] += 1
            log["accuracy"].append(round(accuracy, 4))
            if accuracy <= cfg.clean_threshold:
                log["reached"] = True
                return work.to(memory_format=torch.contiguous_format), log
        if cfg.stop == "epoch":
            accuracy = hits / max(seen, 1)
            log["accuracy"].append(round(accuracy, 4))
            if accuracy <= cfg.clean_threshold:
                log["reached"] = True
                return work.to(memory_format=torch.contiguous_format), log
        schedule.step()
    return work.to(memory_format=torch.contiguous_format), log


def _ascent_step(work: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor,
                 y: torch.Tensor, clip_norm: float | None) -> torch.Tensor:
    """One step of gradient ascent on the cross-entropy of ``(x, y)``; returns the outputs."""
    optimizer.zero_grad(set_to_none=True)
    output = work(x)
    (-F.cross_entropy(output, y)).backward()
    if clip_norm is not None:
        nn.utils.clip_grad_norm_(work.parameters(), clip_norm)
    optimizer.step()
    return output.detach()


def _backtracking_step(work: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor,
                       y: torch.Tensor, data: ImageData, cfg: RNPConfig, log: dict[str, Any]
                       ) -> float:
    """One ascent step, taken again from where it began with half the learning rate (up to
    ``cfg.backtracks`` times, counted in ``log``) while it sends the clean accuracy below
    ``cfg.overshoot`` times the threshold; returns the clean accuracy after it."""
    floor = cfg.overshoot * cfg.clean_threshold
    saved = (copy.deepcopy(work.state_dict()), copy.deepcopy(optimizer.state_dict()))
    lr = optimizer.param_groups[0]["lr"]
    for attempt in range(cfg.backtracks + 1):
        _ascent_step(work, optimizer, x, y, cfg.clip_norm)
        accuracy = _train_mode_accuracy(work, data, cfg.batch_size)
        if accuracy >= floor or attempt == cfg.backtracks:
            break
        work.load_state_dict(saved[0])
        optimizer.load_state_dict(saved[1])
        for group in optimizer.param_groups:
            group["lr"] = lr / 2 ** (attempt + 1)
        log["backtracks"] += 1
    for group in optimizer.param_groups:
        group["lr"] = lr
    return accuracy


def recover(unlearned: nn.Module, data: ImageData, layers: list[str], cfg: RNPConfig
            ) -> dict[str, torch.Tensor]:
    """Masks on ``layers`` of the unlearned model, learned to restore clean accuracy."""
    work = copy.deepcopy(unlearned).train()
    device = model_device(work)
    generator = torch.Generator().manual_seed(cfg.seed + 1)
    with frozen(work), channels_last(work), LearnableMasks(work, layers, cfg.semantics) as masks:
        optimizer = torch.optim.SGD(masks.mask_parameters(), lr=cfg.mask_lr, momentum=0.9)
        for _epoch in range(cfg.mask_epochs):
            for x, y in batches(data, cfg.batch_size, shuffle=True, generator=generator,
                                device=device):
                optimizer.zero_grad(set_to_none=True)
                (cfg.mask_loss_scale * F.cross_entropy(work(x), y)).backward()
                optimizer.step()
                masks.clip()
        return masks.values()


class RNP(MaskDefense[RNPConfig]):
    """Unlearn on clean data, learn masks that recover it, prune the channels left low."""

    name = "rnp"
    paper = "Li et al., ICML 2023, arXiv:2305.14876"
    Config = RNPConfig
    quick: ClassVar[Mapping[str, Any]] = {"unlearn_epochs": 2, "mask_epochs": 2,
                                            "batch_size": 64}

    def learn(self, model: nn.Module, data: ImageData, layers: list[str], progress: bool
              ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        unlearned, log = unlearn(model, data, self.config)
        return recover(unlearned, data, layers, self.config), {"unlearning": log}


__all__ = ["RNP", "RNPConfig", "recover", "unlearn"]
