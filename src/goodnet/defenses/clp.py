"""CLP: Channel Lipschitzness-based Pruning, data-free (Zheng, Tang, Li & Liu, "Data-free
Backdoor Removal based on Channel Lipschitzness", ECCV 2022, arXiv:2208.03111; reference code
rkteddy/channel-Lipschitzness-based-pruning ``defense.py``).

A backdoor channel reacts strongly to a small trigger: its upper bound on the channel
Lipschitz constant (UCLC) is large. For each convolution and each output channel k, UCLC_k is
the largest singular value of the channel's kernel reshaped to (in-channels, kh·kw), scaled by
the BatchNorm that follows, |γ_k / σ_k|. Within each layer, channels whose UCLC exceeds
``mean + u · std`` (unbiased std) are pruned; u = 3 by default, the paper's. No data is used.

Faithful to the reference: the per-layer threshold, the spectral norm, and pruning by zeroing
BatchNorm's γ *and* β, so a pruned channel outputs exactly 0 before the ReLU
(``semantics="channel"`` on the BatchNorm, goodnet's hook mask rather than weight surgery).

Departures, documented:

- **Pairing a convolution with its BatchNorm.** The reference pairs each BatchNorm with the last
  convolution *registered* before it, which mispairs pre-activation ResNets (the reference's
  issue #2) and fails on networks without BatchNorm (issue #5). goodnet pairs them by the order
  layers *run* in (:func:`goodnet.masking.mask_points`): a convolution whose output goes straight
  into a BatchNorm of its width is scaled by it; any other convolution is scored on its kernel
  alone and masked on its own output (its bias then masked too), which is how CLP works on
  ``deepid`` and other networks without BatchNorm.
- ``σ_k = sqrt(running_var + eps)``, what BatchNorm divides by; the reference omits eps.
- No data is needed: ``CLP().repair(model)`` and ``goodnet repair --defense clp`` run without
  clean data (one blank input of the model's ``input_shape`` finds the layer order). Clean
  data, when given, is used only for that and, as for every defense, to report accuracy; ``u``
  is fixed. The curve holds, for each u in ``sweep``, the channels pruned and (with an
  evaluation) test CA and ASR, for reporting only, as BackdoorBench's CLP logs.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from goodnet.data.dataset import ImageData
from goodnet.defenses.base import Curve, Defense, Repaired, Steps, clean_or_blank
from goodnet.defenses.channel_masks import sweep_points
from goodnet.errors import GoodnetError
from goodnet.masking import MaskSet, get_layer, mask_points, masked


@dataclass(frozen=True)
class CLPConfig:
    """Settings of CLP.

    Attributes:
        u: channels with UCLC above mean + u·std of their layer are pruned.
        sweep: values of u for the reported curve (none affects the result).
    """

    u: float = 3.0
    sweep: tuple[float, ...] = (0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 5.0, 6.0, 8.0, 10.0)

    def __post_init__(self) -> None:
        if not torch.isfinite(torch.tensor(self.u)):
            raise GoodnetError("clp: u must be a finite number")
        object.__setattr__(self, "sweep", tuple(float(u) for u in self.sweep))


@torch.no_grad()
def channel_lipschitz(conv: nn.Conv2d, norm: nn.BatchNorm2d | None) -> torch.Tensor:
    """UCLC of each output channel of ``conv``: the spectral norm of its kernel, (in-channels,
    kh·kw), times |γ/σ| of the BatchNorm that normalises it (if any)."""
    weight = conv.weight.detach().float().cpu()
    kernels = weight.reshape(weight.shape[0], weight.shape[1], -1)
    lipschitz = torch.linalg.svdvals(kernels)[:, 0]
    if norm is not None:
        scale = norm.weight.detach().float().cpu() if norm.weight is not None \
            else torch.ones(norm.num_features)
        assert norm.running_var is not None  # BatchNorm with running statistics
        sigma = torch.sqrt(norm.running_var.float().cpu() + norm.eps)
        lipschitz = lipschitz * (scale / sigma).abs()
    return lipschitz


def clp_masks(scores: dict[str, torch.Tensor], u: float) -> dict[str, torch.Tensor]:
    """Per layer: 0 where the score exceeds mean + u·std of that layer, else 1."""
    masks = {}
    for name, score in scores.items():
        limit = score.mean() + u * (score.std() if len(score) > 1 else 0.0)
        masks[name] = (score <= limit).float()
    return masks


def lipschitz_scores(model: nn.Module, example: torch.Tensor) -> dict[str, torch.Tensor]:
    """UCLC of every convolution's channels, keyed by where its mask goes."""
    scores = {}
    for conv_name, point in mask_points(model, example).items():
        conv = get_layer(model, conv_name)
        norm = get_layer(model, point) if point != conv_name else None
        assert isinstance(conv, nn.Conv2d)
        assert norm is None or isinstance(norm, nn.BatchNorm2d)
        scores[point] = channel_lipschitz(conv, norm)
    if not scores:
        raise GoodnetError("clp: the model has no convolution")
    return scores


class CLP(Defense[CLPConfig]):
    """Prune channels with an outlying channel Lipschitz bound, without data."""

    name = "clp"
    paper = "Zheng et al., ECCV 2022, arXiv:2208.03111"
    Config = CLPConfig
    quick: ClassVar[Mapping[str, Any]] = {}
    needs_clean = False

    def run(self, model: nn.Module, clean: ImageData | None, steps: Steps,
            progress: bool) -> Repaired:
        """Data-free: ``clean`` may be None (the model's ``input_shape`` then gives the blank
        input that finds the layer order)."""
        cfg = self.config
        scores = lipschitz_scores(model, clean_or_blank(model, clean))
        masks = MaskSet(clp_masks(scores, cfg.u), "channel")
        values = sorted(set(cfg.sweep) | {cfg.u}, reverse=True)
        points = sweep_points(model, [(u, clp_masks(scores, u)) for u in values], "channel",
                              clean, steps)
        repaired = masked(model, masks)
        name = f"u={cfg.u:g}"
        curve = Curve("u", tuple(points), ((name, values.index(cfg.u)),))
        pruned = {k: v for k, v in masks.pruned().items() if v}
        return Repaired(
            model=repaired, curve=curve, masks=masks, variants={name: repaired},
            variant_masks={name: masks}, chosen=name,
            notes={"pruned_channels": pruned, "pruned_count": sum(len(v) for v in pruned.values()),
                   "layers": list(scores)},
        )
