"""Low Frequency (Zeng, Park, Mao & Jia, "Rethinking the Backdoor Attacks' Triggers: A Frequency
Perspective", ICCV 2021, arXiv:2104.03413).

A smooth trigger that survives low-pass filtering and leaves no high-frequency artefact: a
targeted universal adversarial perturbation (Moosavi-Dezfooli et al., CVPR 2017) of a clean model,
smoothed by a Gaussian low-pass filter at every update and min-max normalised to [0, 0.2]. It
is added to the image; poisoning is as in BadNets.

Defaults from the authors' code (``Sec5_Smooth_Trigger``) and BackdoorBench's ``lf`` resource
scripts: 100 training images; for each image the perturbation does not yet fool, a targeted
DeepFool step (overshoot 0.02) is added, then the perturbation is Gaussian-smoothed (σ = 6
pixels, 30 taps, separable, zero padding) and normalised to [0, 0.2]; passes stop once 20 % of
the images are sent to the target (δ = 0.8) or after ``passes``; 10 % of the training set
poisoned, target 0. Departures: at most 5 passes and 50 DeepFool iterations per image
(BackdoorBench: 50 passes with early stopping, 200 iterations), to keep fitting to seconds; the
clean model is a surrogate (``surrogate.py``), and images are fed through its own normalisation
(BackdoorBench's issue #29 reports the fooling rate stuck at 0 when they are not).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from goodnet.attacks.base import SingleTargetAttack
from goodnet.attacks.surrogate import train_surrogate
from goodnet.attacks.triggers import AdditiveTrigger
from goodnet.data.dataset import ImageData
from goodnet.errors import GoodnetError


@dataclass(frozen=True)
class LowFrequencyConfig:
    """Settings of a Low Frequency attack.

    Attributes:
        target: target class.
        mode: "all-to-one" or "all-to-all".
        poison_rate: fraction of the training set poisoned.
        images: training images the universal perturbation is fitted on.
        amplitude: the perturbation is normalised to [0, amplitude].
        sigma: standard deviation of the Gaussian low-pass filter, in pixels.
        passes: at most this many passes over the images.
        fooling_rate: stop once this share of the images goes to the target.
        deepfool_steps: DeepFool iterations per image.
        overshoot: DeepFool's overshoot.
    """

    target: int = 0
    mode: str = "all-to-one"
    poison_rate: float = 0.1
    images: int = 100
    amplitude: float = 0.2
    sigma: float = 6.0
    passes: int = 5
    fooling_rate: float = 0.2
    deepfool_steps: int = 50
    overshoot: float = 0.02


def gaussian_smooth(v: torch.Tensor, sigma: float, taps: int = 30) -> torch.Tensor:
    """Separable Gaussian blur of ``(C, H, W)`` with zero padding, as the reference code does."""
    positions = torch.arange(taps, dtype=torch.float32) - (taps - 1) / 2
    kernel = torch.exp(-0.5 * (positions / sigma) ** 2)
    kernel = kernel / kernel.sum()
    channels = v.shape[0]
    pad = ((taps - 1) // 2, taps // 2)
    out = F.pad(v[None], (pad[0], pad[1], 0, 0))
    out = F.conv2d(out, kernel.view(1, 1, 1, -1).repeat(channels, 1, 1, 1), groups=channels)
    out = F.pad(out, (0, 0, pad[0], pad[1]))
    out = F.conv2d(out, kernel.view(1, 1, -1, 1).repeat(channels, 1, 1, 1), groups=channels)
    return out[0]


def targeted_deepfool(model: nn.Module, x: torch.Tensor, target: int, steps: int,
                      overshoot: float) -> tuple[torch.Tensor, bool]:
    """The smallest linearised step sending ``x`` (``(C, H, W)``) to ``target``; whether it got
    there within ``steps``."""
    total = torch.zeros_like(x)
    perturbed = x.clone()
    for _ in range(steps):
        perturbed.requires_grad_(True)
        logits = model(perturbed[None])[0]
        current = int(logits.argmax())
        if current == target:
            return (1 + overshoot) * total, True
        gap = logits[target] - logits[current]
        (grad,) = torch.autograd.grad(gap, perturbed)
        step = (gap.detach().abs() + 1e-4) / grad.pow(2).sum().clamp_min(1e-12) * grad
        total = total + step
        perturbed = (x + (1 + overshoot) * total).detach()
    return (1 + overshoot) * total, False


class LowFrequency(SingleTargetAttack[LowFrequencyConfig]):
    """A smooth universal perturbation as an additive trigger."""

    name = "low-frequency"
    Config = LowFrequencyConfig
    quick: ClassVar[Mapping[str, Any]] = {}
    paper = "Zeng et al., ICCV 2021, arXiv:2104.03413"
    needs_fit = True

    def build_trigger(self) -> Callable[[torch.Tensor], torch.Tensor]:
        return AdditiveTrigger(torch.zeros(self.image_shape))

    def fit(self, train: ImageData, seed: int = 0, *, progress: bool = False) -> None:
        self.check_data(train)
        model = train_surrogate(train, seed, progress=progress)
        generator = torch.Generator().manual_seed(seed)
        pool = torch.nonzero(train.labels != self.config.target).flatten()
        chosen = pool[torch.randperm(len(pool), generator=generator)[:self.config.images]]
        images, _ = train.get(chosen)
        self.trigger = AdditiveTrigger(self.universal(model, images, generator))
        self.fitted = True

    def universal(self, model: nn.Module, images: torch.Tensor,
                  generator: torch.Generator) -> torch.Tensor:
        cfg = self.config
        v = torch.zeros(self.image_shape)
        for _ in range(cfg.passes):
            for i in torch.randperm(len(images), generator=generator).tolist():
                x = images[i]
                with torch.no_grad():
                    fooled = int(model((x + v)[None]).argmax()) == cfg.target
                if fooled:
                    continue
                step, reached = targeted_deepfool(model, x + v, cfg.target, cfg.deepfool_steps,
                                                  cfg.overshoot)
                if reached:
                    v = v + gaussian_smooth(step, cfg.sigma)
                v = self.normalise(gaussian_smooth(v, cfg.sigma))
            with torch.no_grad():
                rate = (model((images + v).clamp(0, 1)).argmax(1) == cfg.target).float().mean()
            if rate >= cfg.fooling_rate:
                break
        return v

    def normalise(self, v: torch.Tensor) -> torch.Tensor:
        span = v.max() - v.min()
        if span <= 0:
            return torch.zeros_like(v)
        return (v - v.min()) / span * self.config.amplitude

    def state_dict(self) -> dict[str, torch.Tensor]:
        self.require_fitted()
        assert isinstance(self.trigger, AdditiveTrigger)
        return {"delta": self.trigger.delta.clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        delta = state.get("delta")
        if delta is None or tuple(delta.shape) != self.image_shape:
            raise GoodnetError(f"low_frequency: the saved trigger must be a {self.image_shape} "
                               "'delta'")
        self.trigger = AdditiveTrigger(delta.float().clamp(-1, 1))
        self.fitted = True
