"""Choosing a pruning by a reversed trigger (``select="proxy"`` in prune, RNP and ANP; issue 17).

A mask defense that chooses from clean accuracy alone is blind to the backdoor: it stops where
clean accuracy starts to fall, whether the backdoor is gone by then or not. A trigger
reverse-engineered by Neural Cleanse (:func:`goodnet.scans.nc.detect`) stands in for the
attack without any poisoned data: among the prunings that keep clean accuracy within the
defense's ``max_drop``, ``select="proxy"`` takes the one whose *proxy ASR* (the share of clean
images of other classes that the reversed trigger sends to its class) is lowest; ties go to the
smaller pruning, and the unpruned model is a candidate, so a pruning that does not lower the
proxy ASR is not made.

Which trigger: the flagged class with the largest anomaly index, or, when Neural Cleanse flags
no class, the class with the largest index all the same (the most suspicious one; the choice
then rests on a weaker signal, and the notes say so). The trigger is reversed on the data the
masks are learned on, at ``nc``'s default settings, and the proxy ASR is measured on the data the
choice is made on (RNP and ANP: the held-out part; prune: all of the clean data, which prune
does not split). Cost: one Neural Cleanse reverse engineering (about 30 s for the small CNN on
two cores), plus one stamped pass over the choice data per candidate pruning.

What it cannot do: a trigger that Neural Cleanse does not recover (a dynamic or sample-specific
one such as WaNet's or Input-aware's) gives a proxy unrelated to the real backdoor, and pruning
that breaks the reversed trigger need not break the real one.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from goodnet.data.dataset import ImageData, batches
from goodnet.defenses.base import Point
from goodnet.methods import ReversedTrigger
from goodnet.models import model_device
from goodnet.scans.nc import NCScanConfig, detect

EXTRA = "proxy_asr"  # the name of a point's proxy ASR in its extra fields


@dataclass(frozen=True)
class Proxy:
    """The reversed trigger a pruning is chosen by.

    Attributes:
        trigger: the trigger of the suspected class.
        flagged: whether Neural Cleanse flagged that class (False: no class was flagged, and the
            most suspicious one stands in).
        anomaly_index: the class's anomaly index.
    """

    trigger: ReversedTrigger
    flagged: bool
    anomaly_index: float

    def notes(self) -> dict[str, Any]:
        return {"proxy_class": self.trigger.target, "proxy_flagged": self.flagged,
                "proxy_anomaly_index": round(self.anomaly_index, 4),
                "proxy_norm": round(self.trigger.norm, 4)}


def reversed_proxy(model: nn.Module, clean: ImageData, seed: int = 0,
                   progress: bool = False) -> Proxy:
    """Neural Cleanse's reversed trigger of the most suspicious class of ``model`` on ``clean``
    (``model`` is not modified)."""
    work = copy.deepcopy(model).eval()
    for p in work.parameters():
        p.requires_grad_(False)
    verdict = detect(work, clean, NCScanConfig(seed=seed), progress)
    scores = torch.tensor(verdict.scores)
    scores = torch.where(torch.isnan(scores), torch.tensor(-torch.inf), scores)
    if verdict.targets:
        target = max(verdict.targets, key=lambda k: verdict.scores[k])
    else:
        target = int(torch.argmax(scores))
    return Proxy(verdict.triggers[target], bool(verdict.targets), float(scores[target]))


@torch.no_grad()
def proxy_asr(model: nn.Module, data: ImageData, trigger: ReversedTrigger, batch_size: int = 256
              ) -> float:
    """The share of ``data``'s images of classes other than the trigger's that ``model`` sends
    to the trigger's class once stamped; 0 if there are none."""
    was_training = model.training
    model.eval()
    hits = total = 0
    try:
        for x, y in batches(data, batch_size, device=model_device(model)):
            keep = y != trigger.target
            if keep.any():
                predicted = model(trigger.apply(x[keep])).argmax(1)
                hits += int((predicted == trigger.target).sum())
                total += int(keep.sum())
    finally:
        model.train(was_training)
    return hits / total if total else 0.0


def proxy_extra(model: nn.Module, data: ImageData | None, proxy: Proxy | None
                ) -> tuple[tuple[str, Any], ...]:
    """A point's extra field for its proxy ASR; none without a proxy."""
    if proxy is None or data is None:
        return ()
    return ((EXTRA, round(proxy_asr(model, data, proxy.trigger), 6)),)


def choose_by_proxy(points: list[Point], tolerance: float) -> int:
    """The index of the point with the lowest proxy ASR among those whose clean-data accuracy is
    at most ``tolerance`` below point 0's (the unpruned model, itself a candidate); ties: the
    earlier point (the smaller pruning). Reads the clean-data accuracy and the proxy ASR only."""
    base = points[0].clean_data_accuracy
    assert base is not None
    best, best_asr = 0, _proxy(points[0])
    for i, point in enumerate(points[1:], start=1):
        assert point.clean_data_accuracy is not None
        if base - point.clean_data_accuracy > tolerance + 1e-12:
            continue
        if _proxy(point) < best_asr - 1e-12:
            best, best_asr = i, _proxy(point)
    return best


def _proxy(point: Point) -> float:
    value = dict(point.extra).get(EXTRA)
    assert value is not None, "a point measured without the proxy"
    return float(value)
