"""ANP: Adversarial Neuron Pruning (Wu & Wang, "Adversarial Neuron Pruning Purifies Backdoored
Deep Models", NeurIPS 2021, arXiv:2110.14430; reference code csdongxian/ANP_backdoor
``optimize_mask_cifar.py`` and ``prune_neuron_cifar.py``).

Backdoor neurons are the ones whose small perturbation most easily breaks the network. ANP
learns a mask per channel that keeps the network accurate *under* adversarial neuron
perturbation: each iteration draws multiplicative noise on every channel's weight part (δ) and
shift (ξ) uniformly in [-ε, ε] (ε: ``noise_eps``), takes one signed ascent step of size ε on the
clean loss, then updates the masks (SGD, ``mask_lr`` 0.2, momentum 0.9, clipped to [0, 1]) on
``natural_weight · loss(clean) + (1 - natural_weight) · loss(perturbed)``. After 2000 iterations
of batch 128 (sampled with replacement from the clean data) the original model's channels with
low masks are pruned. Defaults are the reference code's: noise_eps 0.4, one noise step,
natural_weight 0.2, mask_lr 0.2, 2000 iterations, batch 128; BatchNorm in training mode while
masks are learned (on a copy).

Masks and noise sit on the mask point of every convolution (:mod:`goodnet.defenses.channel_masks`):
BatchNorm's γ (masked and perturbed) and β (perturbed), as the reference's
``NoisyBatchNorm2d``; on a network without BatchNorm, the convolution's output channel and bias,
as the ANP author advises for such networks (csdongxian/ANP_backdoor#2). With
``hidden_linear=True`` (the default), the neurons of fully connected layers before the output
are masked and perturbed too (the reference's ``NoisyBatchNorm1d`` does this for networks with
BatchNorm in the head; goodnet does it for every hidden linear layer).

Departures, each a setting:

- **Choosing what to prune** (``select="clean"``, default). The reference sweeps thresholds and
  logs test metrics for the user to read; BackdoorBench keeps the threshold with the lowest
  *test* ASR (BackdoorBench issue #35), which a defender cannot know. goodnet holds out 20 % of
  the clean data from mask learning and takes the largest threshold that keeps the held-out
  accuracy within ``max_drop``. ``select="threshold"`` (0.2, the paper's) and
  ``select="count"`` (prune by number, as the reference's ``--pruning-by number``) are there,
  and ``select="proxy"``: the threshold within ``max_drop`` with the lowest ASR of Neural
  Cleanse's reversed trigger (:mod:`goodnet.defenses.proxy`).
- **Noise projection** (``project=False``, the reference's). The reference never projects the
  noise back into [-ε, ε] after its ascent step, so it can reach ±2·ε; the paper's
  algorithm projects. ``project=True`` does.
- **Recovery** (``recover_epochs=0``, off). With ``recover_epochs > 0`` the chosen pruning is
  fine-tuned on the mask-learning part of the clean data with its masks held, to win back the
  clean accuracy pruning cost (not in the paper; see :mod:`goodnet.defenses.channel_masks`).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from goodnet.data.dataset import ImageData
from goodnet.defenses.channel_masks import (
    LearnableMasks,
    MaskDefense,
    MaskSettings,
    frozen,
)
from goodnet.errors import GoodnetError
from goodnet.models import channels_last, model_device


@dataclass(frozen=True)
class ANPConfig(MaskSettings):
    """Settings of ANP (defaults: the reference code's).

    Attributes:
        noise_eps: noise budget (relative perturbation of each channel).
        noise_steps: signed ascent steps on the noise per iteration (step size
            noise_eps / noise_steps).
        natural_weight: weight of the unperturbed loss.
        mask_lr: mask learning rate (SGD, momentum 0.9).
        iterations: mask updates.
        batch_size: clean images per update, drawn with replacement.
        project: clip the noise to [-noise_eps, noise_eps] after each ascent step (the paper;
            the code does not).
        semantics: "keep-bias" (mask γ, keep β: the reference) or "channel".
        hidden_linear: also mask the neurons of fully connected layers before the output.
        select, threshold, count, thresholds, max_drop, select_share: how much to prune (see
            :class:`goodnet.defenses.channel_masks.Choice`).
        seed: fixes the sampling, the noise and the held-out split.
        recover_epochs, recover_lr, recover_batch_size: fine-tune the chosen pruning with its
            masks held (0 epochs: no recovery; see
            :class:`goodnet.defenses.channel_masks.MaskSettings`).
    """

    renamed: ClassVar[dict[str, str]] = {"alpha": "natural_weight", "lr": "mask_lr",
                                         "eps": "noise_eps", "steps": "noise_steps"}

    noise_eps: float = 0.4
    noise_steps: int = 1
    natural_weight: float = 0.2
    mask_lr: float = 0.2
    iterations: int = 2000
    batch_size: int = 128
    project: bool = False

    def __post_init__(self) -> None:
        if (self.noise_eps < 0 or self.noise_steps < 1 or self.iterations < 0
                or self.batch_size < 1):
            raise GoodnetError("anp: noise_eps >= 0, noise_steps >= 1, iterations >= 0, "
                               "batch size >= 1")
        if not 0 <= self.natural_weight <= 1:
            raise GoodnetError("anp: natural_weight must lie in [0, 1]")
        super().__post_init__()


def learn_masks(model: nn.Module, data: ImageData, layers: list[str], cfg: ANPConfig,
                progress: bool = False) -> dict[str, torch.Tensor]:
    """ANP's masks on ``layers``, learned on a copy of ``model`` under adversarial noise."""
    work = copy.deepcopy(model).train()
    device = model_device(work)
    generator = torch.Generator().manual_seed(cfg.seed)
    with frozen(work), channels_last(work), \
            LearnableMasks(work, layers, cfg.semantics, noise=True) as masks:
        mask_optimizer = torch.optim.SGD(masks.mask_parameters(), lr=cfg.mask_lr, momentum=0.9)
        noise_optimizer = torch.optim.SGD(masks.noise_parameters(),
                                          lr=cfg.noise_eps / cfg.noise_steps)
        for _ in tqdm(range(cfg.iterations), disable=not progress, desc="anp", leave=False):
            index = torch.randint(len(data), (cfg.batch_size,), generator=generator)
            x, y = data.get(index)
            x, y = x.to(device), y.to(device)
            if cfg.noise_eps > 0:
                masks.reset_noise(cfg.noise_eps, generator)
                masks.perturb = True
                for _step in range(cfg.noise_steps):
                    noise_optimizer.zero_grad(set_to_none=True)
                    (-F.cross_entropy(work(x), y)).backward()
                    for parameter in masks.noise_parameters():
                        if parameter.grad is not None:
                            parameter.grad = torch.sign(parameter.grad)
                    noise_optimizer.step()
                    if cfg.project:
                        with torch.no_grad():
                            for parameter in masks.noise_parameters():
                                parameter.clamp_(-cfg.noise_eps, cfg.noise_eps)
            mask_optimizer.zero_grad(set_to_none=True)
            robust: torch.Tensor | float = 0.0
            if cfg.noise_eps > 0:
                masks.perturb = True
                robust = F.cross_entropy(work(x), y)
            masks.perturb = False
            natural = F.cross_entropy(work(x), y)
            (cfg.natural_weight * natural + (1 - cfg.natural_weight) * robust).backward()
            mask_optimizer.step()
            masks.clip()
        return masks.values()


class ANP(MaskDefense[ANPConfig]):
    """Learn masks robust to adversarial neuron noise; prune the channels left low."""

    name = "anp"
    paper = "Wu & Wang, NeurIPS 2021, arXiv:2110.14430"
    Config = ANPConfig
    quick: ClassVar[Mapping[str, Any]] = {"iterations": 20, "batch_size": 32}

    def learn(self, model: nn.Module, data: ImageData, layers: list[str], progress: bool
              ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return learn_masks(model, data, layers, self.config, progress), {}
