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
- No data is needed: ``goodnet repair --defense clp`` runs without ``--clean`` (one blank
  input of the model's shape finds the layer order). Clean data, when given, is used only for
  that and, as for every defense, to report accuracy; ``u`` is fixed. The curve holds, for each
  u in ``sweep``, the channels pruned and (with an evaluation) test CA and ASR, for reporting
  only, as BackdoorBench's CLP logs.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from goodnet.data.dataset import ImageData
from goodnet.defenses.base import Defense, Evaluation, RepairResult
from goodnet.defenses.channel_masks import masks_key
from goodnet.errors import GoodnetError
from goodnet.masking import MaskSet, applied, get_layer, mask_points, masked
from goodnet.metrics import clean_accuracy, predict


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
        scores[point] = channel_lipschitz(conv, norm)
    if not scores:
        raise GoodnetError("clp: the model has no convolution")
    return scores


class CLP(Defense):
    """Prune channels with an outlying channel Lipschitz bound, without data."""

    name = "clp"
    paper = "Zheng et al., ECCV 2022, arXiv:2208.03111"
    Config = CLPConfig
    needs_clean = False

    def repair(self, model: nn.Module, clean: ImageData | None, *,
               evaluation: Evaluation | None = None, progress: bool = False,
               example: torch.Tensor | None = None) -> RepairResult:
        """Data-free: ``clean`` may be None if ``example`` (one input) is given."""
        start = time.perf_counter()
        cfg = self.config
        if example is None:
            if clean is None:
                raise GoodnetError("clp needs one input to find the layer order: give clean "
                                   "data or an example")
            example, _ = clean.get(torch.arange(1))
        scores = lipschitz_scores(model, example)
        masks = MaskSet(clp_masks(scores, cfg.u), "channel")
        curve = self._curve(model, scores, clean, evaluation)
        repaired = masked(model, masks)
        name = f"u={cfg.u:g}"
        pruned = {k: v for k, v in masks.pruned().items() if v}
        return RepairResult(
            defense=self.name, settings=self.settings(), model=repaired, masks=masks,
            variants={name: repaired}, variant_masks={name: masks}, chosen=name, curve=curve,
            seconds=time.perf_counter() - start,
            notes={"pruned_channels": pruned, "pruned_count": sum(len(v) for v in pruned.values()),
                   "layers": list(scores)},
        )

    def _curve(self, model: nn.Module, scores: dict[str, torch.Tensor],
               clean: ImageData | None, evaluation: Evaluation | None) -> list[dict[str, Any]]:
        work = copy.deepcopy(model)
        curve = []
        seen: dict[tuple, dict[str, Any]] = {}  # values of u that prune alike: measured once
        for u in sorted(set(self.config.sweep) | {self.config.u}, reverse=True):
            masks = clp_masks(scores, u)
            key = masks_key(masks)
            if key not in seen:
                with applied(work, MaskSet(masks, "channel")):
                    record: dict[str, Any] = {
                        "pruned": int(sum(int((m == 0).sum()) for m in masks.values()))}
                    if clean is not None:
                        record["clean_data_accuracy"] = clean_accuracy(predict(work, clean),
                                                                       clean.labels)
                    if evaluation is not None:
                        metrics = evaluation.measure(work)
                        record["test_ca"] = metrics.clean_accuracy
                        record["test_asr"] = metrics.attack_success_rate
                seen[key] = record
            curve.append({"u": u, **seen[key]})
        return curve
