"""Prune: the CSAW-HackML lab's pruning defense (the pruning half of Liu, Dolan-Gavitt & Garg,
"Fine-Pruning: Defending Against Backdooring Attacks on Deep Neural Networks", RAID 2018,
arXiv:1805.12185).

Channels of one layer (by default the last convolution) are ranked once by their mean
activation over the clean data, after ReLU, averaged over images and positions; they are
pruned in increasing order, one at a time, and the clean-data accuracy is measured after each.
For each accuracy-drop budget X (absolute points: 0.02 is two points) pruning stops when the
clean accuracy has dropped by more than X, and the repaired model is the last one within the
budget (``rule="within"``, the default: a budget is the most accuracy the defender will give
up). The lab handout keeps the first model *at or beyond* the drop ("stop pruning once the
validation accuracy drops at least X % below the original; this will be B'"): ``rule="lab"``
gives that model, one channel further. One ranking and one pass serve every X. Defaults:
X = 2, 4, 10 and 30 %, the lab's.

The lab's network (``deepid``) ranks the channels of ``conv_3`` by their mean at ``pool_3``
(after ReLU and max-pooling) and prunes by zeroing the convolution's kernel: use
``layer="conv_3", rank_layer="pool_3", semantics="keep-bias"`` for its exact numbers. goodnet's
default masks the whole channel (``semantics="channel"``) after BatchNorm when there is one, so
neither a bias nor BN's shift survives pruning (see ``goodnet.masking``). Departure from the
authors' code: activations come from the clean data only (their script uses the test set), and
no channel count is fixed in advance (theirs prunes 48 of 60).

With ``recover_epochs > 0`` (off by default; not in the lab) every budget's model is fine-tuned
on the clean data with its masks held (see :mod:`goodnet.defenses.channel_masks`); the budgets
are still judged before recovery, so a larger ``max_drop`` is how to prune more and win accuracy
back. The recovered points' clean-data accuracy is on the data they were tuned on.

With ``select="proxy"`` (issue 17; the default ``"budget"`` is the lab's rule above) each
budget's model is instead the prefix, among those within the budget, on which Neural Cleanse's
reversed trigger has the lowest ASR on the clean data (ties: fewer channels; see
:mod:`goodnet.defenses.proxy`). The trigger is reversed and its ASR measured on all of the
clean data: prune holds nothing out. A number given as ``select`` is the old name of
``max_drop``, read as such with a warning.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn
from tqdm.auto import tqdm

from goodnet.activations import mean_activation
from goodnet.data.dataset import ImageData
from goodnet.defenses.base import Curve, Defense, Point, Repaired, Steps, clean_or_blank
from goodnet.defenses.channel_masks import Recovery, recover_variants
from goodnet.defenses.proxy import Proxy, choose_by_proxy, proxy_extra, reversed_proxy
from goodnet.errors import GoodnetError
from goodnet.masking import MaskSet, applied, channel_count, get_layer, mask_points, masked

RULES = ("within", "lab")
SELECTIONS = ("budget", "proxy")


@dataclass(frozen=True)
class PruneConfig:
    """Settings of the lab's pruning.

    Attributes:
        layer: the layer whose channels are masked; None: the last convolution (its BatchNorm
            when one follows it).
        rank_layer: where the mean activation is measured; None: ``layer``, after ReLU.
        max_drops: accuracy-drop budgets X, in absolute fractions (0.04 = 4 points): one
            repaired model each.
        max_drop: the budget whose model is ``result.model`` (added to ``max_drops`` if it is
            not there; a number given as ``select`` is read as this, with a warning); None: 0.04
            if it is a budget, else the first.
        semantics: "channel" (the whole channel is removed) or "keep-bias" (the lab's: the
            kernel is zeroed, the bias or BN shift kept).
        rule: "within" (the last model within the budget) or "lab" (the first beyond it).
        select: "budget" (each budget's model is the one ``rule`` gives) or "proxy" (the prefix
            within the budget with the lowest ASR of Neural Cleanse's reversed trigger).
        recover_epochs: fine-tune every budget's model this many epochs on the clean data with
            its masks held (see :func:`goodnet.defenses.channel_masks.recover_pruned`); 0: none.
        recover_lr, recover_batch_size: the recovery's SGD learning rate and batch size.
        seed: fixes the recovery's batch order.
    """

    layer: str | None = None
    rank_layer: str | None = None
    max_drops: tuple[float, ...] = (0.02, 0.04, 0.10, 0.30)
    max_drop: float | None = None
    semantics: str = "channel"
    rule: str = "within"
    select: str | float = "budget"
    recover_epochs: int = 0
    recover_lr: float = 0.01
    recover_batch_size: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        if self.select not in SELECTIONS:
            old = _number(self.select)
            if old is None:
                raise GoodnetError(f"prune select must be one of {SELECTIONS}, got "
                                   f"{self.select!r}")
            warnings.warn("prune: setting 'select' is now called 'max_drop' when it is a number "
                          "(select now takes 'budget' or 'proxy'); the old use will be removed "
                          "in a later version", FutureWarning, stacklevel=3)
            if self.max_drop is not None:
                raise GoodnetError("prune: give max_drop or its old name select, not both")
            object.__setattr__(self, "max_drop", old)
            object.__setattr__(self, "select", "budget")
        if self.select == "proxy" and self.rule != "within":
            raise GoodnetError("prune: select='proxy' chooses within each budget; it takes "
                               "rule='within'")
        if self.rule not in RULES:
            raise GoodnetError(f"prune rule must be one of {RULES}, got {self.rule!r}")
        drops = tuple(float(x) for x in self.max_drops)
        if not drops:
            raise GoodnetError("prune needs at least one accuracy-drop budget")
        chosen = self.max_drop
        if chosen is None:
            chosen = 0.04 if 0.04 in drops else drops[0]
        if float(chosen) not in drops:
            drops = tuple(sorted((*drops, float(chosen))))
        object.__setattr__(self, "max_drops", drops)
        object.__setattr__(self, "max_drop", float(chosen))
        if any(not 0 < x < 1 for x in self.max_drops):
            raise GoodnetError(f"accuracy-drop budgets must lie in (0, 1), got {self.max_drops}")
        self.recovery()

    def recovery(self) -> Recovery:
        return Recovery(self.recover_epochs, self.recover_lr, self.recover_batch_size, self.seed)


def _number(value: object) -> float | None:
    """``value`` as a number if it is one or spells one (the old ``select``), else None."""
    if isinstance(value, bool):
        return None
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


def default_layer(model: nn.Module, clean: ImageData | None) -> str:
    """Where to prune when no layer is named: the last convolution's mask point."""
    points = mask_points(model, clean_or_blank(model, clean))
    if not points:
        raise GoodnetError("the model has no convolution to prune; name a layer")
    return list(points.values())[-1]


def pruning_order(model: nn.Module, clean: ImageData, layer: str, rank_layer: str | None
                  ) -> torch.Tensor:
    """Channels of ``layer`` in increasing order of mean clean activation."""
    activation = mean_activation(model, rank_layer or layer, clean, relu=True)
    if len(activation) != channel_count(get_layer(model, layer)):
        raise GoodnetError(f"{rank_layer} has {len(activation)} channels, {layer} has "
                           f"{channel_count(get_layer(model, layer))}: rank on a layer of the "
                           "same width")
    return torch.argsort(activation, stable=True)


def prefix_mask(order: torch.Tensor, count: int, layer: str, semantics: str) -> MaskSet:
    """Masks pruning the first ``count`` channels of ``order`` in ``layer``."""
    mask = torch.ones(len(order))
    mask[order[:count]] = 0
    return MaskSet({layer: mask}, semantics)


def prune_curve(
    model: nn.Module, clean: ImageData, layer: str, order: torch.Tensor, semantics: str,
    steps: Steps, progress: bool = False, proxy: Proxy | None = None,
) -> list[Point]:
    """Clean accuracy (with ``proxy``, its ASR on the clean data; with an evaluation, test CA
    and ASR) after pruning each prefix of ``order``; point 0 is the unpruned model."""
    work = copy.deepcopy(model)
    points = []
    for count in tqdm(range(len(order) + 1), disable=not progress, desc="pruning", leave=False):
        with applied(work, prefix_mask(order, count, layer, semantics)):
            channel = int(order[count - 1]) if count else None
            points.append(steps.measure(work, clean, count, count, extra=(
                ("channel", channel), *proxy_extra(work, clean, proxy))))
    return points


def pruned_count(points: list[Point], drop: float, rule: str = "within") -> int:
    """How many channels the budget ``drop`` prunes: up to the last prefix before the clean
    accuracy has dropped by more than ``drop`` ("within"), or the first prefix at least ``drop``
    below the original ("lab"); every channel if the budget is never exceeded."""
    base = _accuracy(points[0])
    for count, point in enumerate(points[1:], start=1):
        loss = base - _accuracy(point)
        if rule == "within" and loss > drop + 1e-12:
            return count - 1
        if rule == "lab" and loss >= drop - 1e-12:
            return count
    return len(points) - 1


def _accuracy(point: Point) -> float:
    assert point.clean_data_accuracy is not None  # measured with clean data
    return point.clean_data_accuracy


class Prune(Defense[PruneConfig]):
    """Prune channels in increasing order of mean clean activation, one model per budget."""

    name = "prune"
    paper = "Liu et al., RAID 2018, arXiv:1805.12185 (CSAW-HackML lab)"
    Config = PruneConfig
    quick: ClassVar[Mapping[str, Any]] = {}

    def run(self, model: nn.Module, clean: ImageData | None, steps: Steps,
            progress: bool) -> Repaired:
        assert clean is not None
        cfg = self.config
        layer = cfg.layer or default_layer(model, clean)
        get_layer(model, layer)
        order = pruning_order(model, clean, layer, cfg.rank_layer)
        proxy = reversed_proxy(model, clean, cfg.seed, progress) if cfg.select == "proxy" \
            else None
        points = prune_curve(model, clean, layer, order, cfg.semantics, steps, progress, proxy)
        variants: dict[str, nn.Module] = {}
        variant_masks: dict[str, MaskSet] = {}
        counts = {}
        for drop in cfg.max_drops:
            count = (pruned_count(points, drop, cfg.rule) if proxy is None
                     else choose_by_proxy(points, drop))
            key = f"{drop:g}"
            variant_masks[key] = prefix_mask(order, count, layer, cfg.semantics)
            variants[key] = masked(model, variant_masks[key])
            counts[key] = count
        chosen = f"{cfg.max_drop:g}"
        curve = Curve("pruned", tuple(points), tuple(counts.items()))
        notes = {"layer": layer, "order": order.tolist(), "pruned": counts,
                 **(proxy.notes() if proxy is not None else {})}
        if cfg.recover_epochs > 0:  # measured on the data it was recovered on: no held-out part
            variants, curve, losses = recover_variants(model, variant_masks, curve, clean, clean,
                                                       cfg.recovery(), steps, progress)
            notes["recovery_loss"] = dict(losses)
        return Repaired(
            model=variants[chosen], curve=curve, masks=variant_masks[chosen], variants=variants,
            variant_masks=variant_masks, chosen=chosen, notes=notes,
        )
