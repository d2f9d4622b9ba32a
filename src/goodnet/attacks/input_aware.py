"""Input-aware dynamic backdoor (Nguyen & Tran, "Input-Aware Dynamic Backdoor Attack", NeurIPS
2020, arXiv:2010.08138).

Every input gets its own trigger: a generator G draws a pattern from the image and a mask
generator M says where to paste it, ``x' = x + (G(x) − x) ⊙ thr(M(x))`` with
``thr(m) = tanh(20m − 10)/2 + 1/2``. M is trained first to produce sparse (density 0.032) and
diverse masks; then G is trained jointly with a classifier so that patterns fire the backdoor,
with a diversity loss that keeps different inputs' patterns apart. "Cross" items, an image
carrying the pattern and mask generated from *another* image with its own label kept, teach the
network that a trigger only works on the image it was made for.

Architecture and defaults from the official code (VinAIResearch/input-aware-backdoor-attack-
release) for MNIST: generators with 16 initial channels and two down/up-sampling steps,
Conv-BN-ReLU blocks, bilinear upsampling; λ_div = 1, λ_norm = 100, mask density 0.032, attack and
cross rates 0.1 each, Adam (lr 0.01, betas 0.5/0.9) for G and M, SGD (lr 0.01, momentum 0.9,
weight decay 5e-4) for the classifier, target 0.

Departures, for a CPU budget: the mask generator trains for ``mask_epochs`` (official 25) and G
for ``generator_epochs`` (official 600, jointly with the victim) on at most ``fit_items`` images,
against a surrogate classifier; G and M are then frozen and the victim is trained by ordinary
poisoning with fixed attack and cross items. G's gradients are zeroed every step (the official
code never zeroes them, so they accumulate across batches). With few training steps (a small
data set) M can fall into the saturated zone of ``thr``, where every mask is 0 and no gradient
flows back: the trigger then changes nothing and the attack silently fails. goodnet checks the
fitted masks and, when their mean is below a quarter of ``mask_density``, starts M again from
new initial weights (at most ``MASK_TRIES`` times, then refuses with an error).

Randomness: G's and M's initial weights (PyTorch's default initialisation, drawn from a
generator seeded with the fitting seed), the fitting data's order and the cross items' other
images (a generator seeded from the poisoning seed) all come from explicit generators; torch's
global generator is never touched.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from goodnet.attacks.base import SingleTargetAttack
from goodnet.attacks.poison import PoisonGroup, choose_indices
from goodnet.data.dataset import ImageData, batches
from goodnet.errors import GoodnetError
from goodnet.models import build_model, spec_for_data

EPSILON = 1e-7
MASK_TRIES = 4


@dataclass(frozen=True)
class InputAwareConfig:
    """Settings of an Input-aware dynamic attack.

    Attributes:
        target: target class.
        mode: "all-to-one" or "all-to-all".
        poison_rate: fraction of the training set given its own trigger and relabelled.
        cross_rate: fraction given another image's trigger, label kept.
        mask_density: target share of pixels the mask covers.
        lambda_div: weight of the diversity losses.
        lambda_norm: weight of the mask-density loss.
        mask_epochs: epochs of mask-generator training.
        generator_epochs: epochs of joint generator and surrogate training.
        fit_items: training images used to fit the generators.
    """

    target: int = 0
    mode: str = "all-to-one"
    poison_rate: float = 0.1
    cross_rate: float = 0.1
    mask_density: float = 0.032
    lambda_div: float = 1.0
    lambda_norm: float = 100.0
    mask_epochs: int = 2
    generator_epochs: int = 2
    fit_items: int = 10_000


def _block(cin: int, cout: int, relu: bool = True) -> list[nn.Module]:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, 3, padding=1),
                               nn.BatchNorm2d(cout, momentum=0.05)]
    return [*layers, nn.ReLU()] if relu else layers


class Generator(nn.Sequential):
    """The official MNIST generator: 16→32 channels down, 32→16 up, output in [0, 1].

    Its initial weights are PyTorch's defaults (convolutions: weights and biases uniform in
    ±1/√fan_in; BatchNorm: scale 1, shift 0), drawn from ``generator``.
    """

    def __init__(self, in_channels: int, out_channels: int, generator: torch.Generator) -> None:
        with torch.device("meta"):  # shapes only: the default initialisation's draws come below
            super().__init__(
                *_block(in_channels, 16), *_block(16, 16), nn.MaxPool2d(2),
                *_block(16, 32), *_block(32, 32), nn.MaxPool2d(2),
                *_block(32, 32),
                nn.Upsample(scale_factor=2, mode="bilinear"), *_block(32, 32), *_block(32, 16),
                nn.Upsample(scale_factor=2, mode="bilinear"), *_block(16, 16),
                *_block(16, out_channels, relu=False),
            )
        self.to_empty(device="cpu")
        with torch.no_grad():
            for layer in self:
                if isinstance(layer, nn.Conv2d):
                    bound = 1 / math.sqrt(layer.weight[0].numel())
                    layer.weight.uniform_(-bound, bound, generator=generator)
                    if layer.bias is not None:
                        layer.bias.uniform_(-bound, bound, generator=generator)
                elif isinstance(layer, nn.BatchNorm2d):
                    layer.reset_parameters()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        out = super().forward(x)
        if out.shape[-2:] != size:  # sizes not divisible by 4 come back a little smaller
            out = F.interpolate(out, size=size, mode="bilinear")
        return torch.tanh(out) / (2 + EPSILON) + 0.5


def threshold(mask: torch.Tensor) -> torch.Tensor:
    return torch.tanh(20 * mask - 10) / (2 + EPSILON) + 0.5


def _rms(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a - b).pow(2).flatten(1).mean(1).sqrt()


class DynamicTrigger:
    """Paste G's pattern through M's mask; the pattern and mask may come from other images."""

    def __init__(self, generator: Generator, mask: Generator) -> None:
        self.generator, self.mask = generator.eval(), mask.eval()

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, source: torch.Tensor | None = None) -> torch.Tensor:
        source = x if source is None else source
        self.generator.to(x.device)
        self.mask.to(x.device)
        pattern = self.generator(source)
        return (x + (pattern - x) * threshold(self.mask(source))).clamp(0, 1)


class InputAware(SingleTargetAttack[InputAwareConfig]):
    """Per-input triggers from a trained generator, with cross-trigger items."""

    name = "input-aware"
    Config = InputAwareConfig
    quick: ClassVar[Mapping[str, Any]] = {}
    paper = "Nguyen & Tran, NeurIPS 2020, arXiv:2010.08138"
    needs_fit = True

    def validate(self) -> None:
        super().validate()
        if not 0 <= self.config.cross_rate < 1 or min(self.image_shape[1:]) < 8:
            raise GoodnetError("input_aware: cross_rate in [0, 1) and images of at least 8×8")

    def build_trigger(self) -> DynamicTrigger:
        channels = self.image_shape[0]
        weights = torch.Generator().manual_seed(0)
        return DynamicTrigger(Generator(channels, channels, weights),
                              Generator(channels, 1, weights))

    def fit(self, train: ImageData, seed: int = 0, *, progress: bool = False) -> None:
        self.check_data(train)
        cfg = self.config
        generator = torch.Generator().manual_seed(seed)
        if len(train) > cfg.fit_items:
            train = train.subset(torch.randperm(len(train), generator=generator)[:cfg.fit_items])
        weights = torch.Generator().manual_seed(seed)
        channels = self.image_shape[0]
        mask_net = self._fit_live_mask(train, generator, weights)
        pattern_net = Generator(channels, channels, weights)
        self._fit_generator(pattern_net, mask_net, train, generator, seed)
        self.trigger = DynamicTrigger(pattern_net.requires_grad_(False), mask_net)
        self.fitted = True

    def _pairs(
        self, data: ImageData, generator: torch.Generator
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        second = torch.randperm(len(data), generator=generator)
        for x1, y1 in batches(data, 128, shuffle=True, generator=generator):
            x2, _ = data.get(second[torch.randint(0, len(data), (len(x1),), generator=generator)])
            yield x1, y1, x2

    def _fit_live_mask(self, data: ImageData, generator: torch.Generator,
                       weights: torch.Generator) -> Generator:
        """A fitted mask generator whose masks are not all zero (see the module docstring); its
        initial weights, new at each try, are drawn from ``weights``."""
        probe, _ = data.get(torch.arange(min(len(data), 256)))
        for _ in range(MASK_TRIES):
            mask_net = Generator(self.image_shape[0], 1, weights)
            self._fit_mask(mask_net, data, generator)
            mask_net.eval().requires_grad_(False)
            with torch.no_grad():
                density = threshold(mask_net(probe)).mean().item()
            if density >= self.config.mask_density / 4:
                return mask_net
        raise GoodnetError(f"input_aware: the mask generator collapsed to empty masks {MASK_TRIES} "
                           f"times (mask density {density:.4f}); give it more images or "
                           "mask_epochs")

    def _fit_mask(self, mask_net: Generator, data: ImageData, generator: torch.Generator) -> None:
        cfg = self.config
        optimizer = torch.optim.Adam(mask_net.parameters(), lr=0.01, betas=(0.5, 0.9))
        mask_net.train()
        for _ in range(cfg.mask_epochs):
            for x1, _, x2 in self._pairs(data, generator):
                m1, m2 = threshold(mask_net(x1)), threshold(mask_net(x2))
                diversity = (_rms(x1, x2) / (_rms(m1, m2) + EPSILON)).mean()
                density = F.relu(m1 - cfg.mask_density).mean()
                loss = cfg.lambda_norm * density + cfg.lambda_div * diversity
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()

    def _fit_generator(self, pattern_net: Generator, mask_net: Generator, data: ImageData,
                       generator: torch.Generator, seed: int) -> None:
        cfg = self.config
        classifier = build_model(spec_for_data("small_cnn", data), seed=seed)
        opt_c = torch.optim.SGD(classifier.parameters(), lr=0.01, momentum=0.9,
                                weight_decay=5e-4)
        opt_g = torch.optim.Adam(pattern_net.parameters(), lr=0.01, betas=(0.5, 0.9))
        classifier.train()
        pattern_net.train()
        for _ in range(cfg.generator_epochs):
            for x1, y1, x2 in self._pairs(data, generator):
                n_bd = max(1, int(cfg.poison_rate * len(x1)))
                n_cross = int(cfg.cross_rate * len(x1))
                patterns = pattern_net(x1[:n_bd])
                bd = x1[:n_bd] + (patterns - x1[:n_bd]) * threshold(mask_net(x1[:n_bd]))
                cross_src = x2[n_bd:n_bd + n_cross]
                cross_patterns = pattern_net(cross_src)
                rows = slice(n_bd, n_bd + n_cross)
                cross = x1[rows] + (cross_patterns - x1[rows]) * threshold(mask_net(cross_src))
                inputs = torch.cat([bd, cross, x1[n_bd + n_cross:]])
                labels = torch.cat([self.target(y1[:n_bd]), y1[n_bd:]])
                loss = F.cross_entropy(classifier(inputs), labels)
                pairs = min(n_bd, n_cross)
                if pairs:
                    diversity = (_rms(x1[:pairs], cross_src[:pairs])
                                 / (_rms(patterns[:pairs], cross_patterns[:pairs]) + EPSILON))
                    loss = loss + cfg.lambda_div * diversity.mean()
                opt_c.zero_grad(set_to_none=True)
                opt_g.zero_grad(set_to_none=True)
                loss.backward()
                opt_c.step()
                opt_g.step()

    def poison_groups(self, train: ImageData, generator: torch.Generator) -> list[PoisonGroup]:
        poisoned = super().poison_groups(train, generator)
        taken = torch.zeros(len(train), dtype=torch.bool)
        taken[poisoned[0].indices] = True
        cross = choose_indices(torch.nonzero(~taken).flatten(),
                               round(self.config.cross_rate * len(train)), generator)
        trigger = self.trigger
        assert isinstance(trigger, DynamicTrigger)
        draws = torch.Generator().manual_seed(int(torch.randint(1 << 62, (1,),
                                                                generator=generator)))

        def cross_transform(x: torch.Tensor, _index: torch.Tensor) -> torch.Tensor:
            others, _ = train.get(torch.randint(0, len(train), (len(x),), generator=draws))
            return trigger(x, others.to(x.device))

        return [*poisoned, PoisonGroup("cross", cross, cross_transform, None)]

    def state_dict(self) -> dict[str, torch.Tensor]:
        self.require_fitted()
        trigger = self.trigger
        assert isinstance(trigger, DynamicTrigger)
        state = {f"generator.{k}": v for k, v in trigger.generator.state_dict().items()}
        state.update({f"mask.{k}": v for k, v in trigger.mask.state_dict().items()})
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        trigger = self.build_trigger()
        for prefix, net in (("generator.", trigger.generator), ("mask.", trigger.mask)):
            part = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            expected = net.state_dict()
            if set(part) != set(expected) or any(part[k].shape != expected[k].shape
                                                 for k in expected):
                raise GoodnetError("input_aware: the saved generator does not match this "
                                   "image shape")
            net.load_state_dict(part)
        self.trigger = DynamicTrigger(trigger.generator.requires_grad_(False),
                                      trigger.mask.requires_grad_(False))
        self.fitted = True
