"""Sparse fine-pruning: fine-tuning under a moving channel mask (the project report goodnet grew
from; the prune-and-regrow rule of SET, Mocanu et al., "Scalable training of artificial neural
networks with adaptive sparse connectivity inspired by network science", Nature Communications
2018, arXiv:1707.04780, applied to channels).

A random ``fraction`` of one layer's channels starts masked. Each round trains one epoch on the
clean data with the mask fixed, then scores every channel by its magnitude, measured without the
mask (a mask is not surgery: a masked channel keeps its weights, so its magnitude stays
comparable), prunes the lowest-scoring active channels (a ``regrow`` share of the masked count,
at least one) and regrows as many masked channels chosen at random, so the masked share stays at
``fraction``. After the last round, the final mask is the ``fraction`` of channels with the
lowest magnitude: exploration shapes the fine-tuning, magnitude decides what stays pruned. A
backdoor channel dormant on clean data keeps scoring low and ends pruned; a useful channel
masked by chance recovers while it is unmasked.

Defaults: 30 % of the channels (the report's X; it sweeps 10-50 %), 10 rounds, a regrow share of
0.3 (SET's ζ), magnitude by mean activation (``score="activation"``; ``"weight"`` uses the L2
norm of each channel's kernel instead), fine-tuning with SGD lr 0.01, momentum 0.9, weight decay
5e-4 (as fine-pruning). The report's code re-selects the lowest-activation channels each round
and lets training revive the rest; SET's random regrowth keeps the exploration the issue asks
for. Without an evaluation, the curve holds the clean-data accuracy per round; with one, also
test CA and ASR.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from goodnet.activations import mean_activation
from goodnet.data.dataset import ImageData
from goodnet.defenses.base import Curve, Defense, Repaired, Steps
from goodnet.defenses.prune import default_layer
from goodnet.errors import GoodnetError
from goodnet.masking import MaskSet, channel_count, get_layer, masked
from goodnet.train import TrainConfig, train

SCORES = ("activation", "weight")


@dataclass(frozen=True)
class SparseFinePruningConfig:
    """Settings of sparse fine-pruning.

    Attributes:
        layer: the layer masked; None: the last convolution (its BatchNorm when one follows).
        fraction: share of the layer's channels masked at any time.
        rounds: train-prune-regrow rounds (one clean-data epoch each).
        regrow: share of the masked channels swapped each round.
        score: "activation" (mean clean activation) or "weight" (kernel L2 norm).
        semantics: "channel" or "keep-bias" (see ``goodnet.masking``).
        lr: fine-tuning learning rate.
        batch_size: fine-tuning batch size.
        seed: fixes the initial mask, the regrowth and the training order.
    """

    layer: str | None = None
    fraction: float = 0.3
    rounds: int = 10
    regrow: float = 0.3
    score: str = "activation"
    semantics: str = "channel"
    lr: float = 0.01
    batch_size: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 < self.fraction < 1 or not 0 <= self.regrow <= 1 or self.rounds < 1:
            raise GoodnetError("sparse fine-pruning: fraction in (0, 1), regrow in [0, 1], "
                               "rounds >= 1")
        if self.score not in SCORES:
            raise GoodnetError(f"sparse fine-pruning: score must be one of {SCORES}")


def channel_scores(model: nn.Module, layer: str, clean: ImageData, score: str) -> torch.Tensor:
    """Magnitude of each channel: mean clean activation, or the L2 norm of its weights."""
    if score == "weight":
        weight = get_layer(model, layer).weight
        assert isinstance(weight, torch.Tensor)
        weight = weight.detach()
        return (weight.flatten(1).norm(dim=1) if weight.ndim > 1 else weight.abs()).cpu()
    return mean_activation(model, layer, clean, relu=True)


class SparseFinePruning(Defense[SparseFinePruningConfig]):
    """Fine-tune under a channel mask that prunes low-magnitude channels and regrows others."""

    name = "sparse-fine-pruning"
    paper = "project report; Mocanu et al. 2018 (SET), arXiv:1707.04780"
    Config = SparseFinePruningConfig
    quick: ClassVar[Mapping[str, Any]] = {"rounds": 2, "lr": 1e-3}

    def run(self, model: nn.Module, clean: ImageData | None, steps: Steps,
            progress: bool) -> Repaired:
        assert clean is not None
        cfg = self.config
        layer = cfg.layer or default_layer(model, clean)
        width = channel_count(get_layer(model, layer))
        count = max(1, round(cfg.fraction * width))
        swap = min(count, width - count, max(1, round(cfg.regrow * count))) if cfg.regrow else 0
        generator = torch.Generator().manual_seed(cfg.seed)
        pruned = torch.randperm(width, generator=generator)[:count]
        work = masked(model, self._mask(pruned, width, layer))
        points = [steps.measure(work, clean, 0, len(pruned))]
        for round_number in range(1, cfg.rounds + 1):
            train(work, clean, TrainConfig(epochs=1, batch_size=cfg.batch_size, lr=cfg.lr,
                                           momentum=0.9, weight_decay=5e-4, schedule="constant",
                                           seed=cfg.seed + round_number), progress=progress)
            with work.unmasked() as bare:
                scores = channel_scores(bare, layer, clean, cfg.score)
            if round_number == cfg.rounds:
                pruned = torch.argsort(scores, stable=True)[:count].sort().values
            else:
                active = torch.ones(width, dtype=torch.bool)
                active[pruned] = False
                active_ids = torch.nonzero(active).flatten()
                weakest = active_ids[torch.argsort(scores[active_ids], stable=True)[:swap]]
                revived = pruned[torch.randperm(len(pruned), generator=generator)[:swap]]
                pruned = torch.cat([pruned[~torch.isin(pruned, revived)], weakest]).sort().values
            work.set_masks(self._mask(pruned, width, layer))
            points.append(steps.measure(work, clean, round_number, len(pruned)))
        work.eval()
        curve = Curve("round", tuple(points), (("final", len(points) - 1),))
        return Repaired(
            model=work, curve=curve, masks=work.masks, variants={"final": work},
            variant_masks={"final": work.masks}, chosen="final",
            notes={"layer": layer, "pruned_channels": pruned.tolist()},
        )

    def _mask(self, pruned: torch.Tensor, width: int, layer: str) -> MaskSet:
        mask = torch.ones(width)
        mask[pruned] = 0
        return MaskSet({layer: mask}, self.config.semantics)
