"""Neural Cleanse's detection (Wang, Yao, Shan, Li, Viswanath, Zheng & Zhao, "Neural Cleanse:
Identifying and Mitigating Backdoor Attacks in Neural Networks", IEEE S&P 2019; reference code
bolunwang/backdoor ``visualizer.py`` and ``mad_outlier_detection.py``, and BackdoorBench's
``defense/nc.py`` with ``config/defense/nc/config.yaml``), as the ``nc`` scanner.

1. **Reverse engineering.** For every class ``k`` a mask ``m`` (1, H, W) and a pattern ``p``
   (C, H, W), both in [0, 1] and in image space, minimise
   ``CE(model((1 - m)·x + m·p), k) + cost·|m|_1`` on the clean data. Both live in tanh space
   (``v = tanh(w) / (2 - eps) + 0.5``) and are optimised with Adam (``trigger_lr`` 0.1, betas
   (0.5, 0.9)), batch 32, from a random start. The cost starts at ``init_cost`` 1e-3 and follows the
   reference schedule, decided once per pass over the data: after ``patience`` 5 passes whose
   attack success reaches ``success_threshold`` 0.99 it is multiplied by ``cost_multiplier``
   1.5, after 5 passes below it divided by 1.5**1.5. The smallest-norm mask of a pass that
   reached the threshold is kept (the last one if none did); a class stops early once the cost
   has moved both ways and the best norm has not improved by 1 % in 25 passes.
2. **Outlier detection.** The anomaly index of class ``k`` is ``(median - norm_k) / MAD``, with
   ``MAD = 1.4826 · median(|norm - median|)``; a class is flagged when its index exceeds
   ``anomaly_threshold`` 2. Only norms below the median can be flagged (the index is negative
   above it).

Steps 1 and 2 are :func:`detect`. The ``nc`` defense (:mod:`goodnet.defenses.nc`) calls it
before it unlearns the flagged triggers, so that a scan and an ``nc`` repair of the same model
with the same settings reach the same verdict, bit for bit; its detection settings are these,
with these defaults.

Departures, documented:

- **Step budget.** The reference runs up to 1000 passes of 1000 images per class (BackdoorBench
  80 on CIFAR-10, 10 in its generic ``config.yaml``). On a 1 % split (600 images) a repair must
  fit in about a minute on two cores, so ``epochs`` (reverse-engineering passes over the clean
  data, all classes) is 6. Why 6: on five MNIST / Fashion-MNIST zoo models (badnets, blend,
  trojannn, wanet) the class with the smallest reversed mask no longer changed after the 4th
  pass on the clean data; the norms themselves keep shrinking (all classes alike) for 10-15
  passes, so anomaly indices near the threshold can still move, and a larger budget is closer
  to the reference. With 6 passes the cost schedule (patience 5) changes the cost at most once.
- **All classes in one pass.** The masks and patterns of all classes are stacked and optimised
  together; each class's loss depends only on its own mask and pattern and Adam is
  element-wise, so this is the per-class objective exactly, with one batch order shared by all
  classes. Each class keeps its own cost schedule and early stop.
- **Cost starts at ``init_cost``**, as in BackdoorBench; the original visualizer starts at 0 and
  sets ``init_cost`` after ``patience`` successful passes, which a short budget cannot spare.

Cost: ``epochs`` passes over the clean data, each stamping every image with every class's
trigger (classes × images forward and backward passes per pass), so it grows with the class
count; it needs clean data (a few hundred images). Prefer it when clean data is at hand and
the classes are few (up to a few dozen); without data, prefer the data-free ``mm-bd``. On a
model of more than ``preselect_above`` 100 classes it first picks ``candidates`` 10 classes
with K-Arm's arm selection and reverses only those and ``reference_classes`` 10 random others
in full, on ``preselect_images`` 512 clean images (:mod:`goodnet.scans.karm`, issue 29 item 6:
the lab's 1283-class face network); at or below 100 classes nothing changes. Its statistic,
``score``, is the largest anomaly index (higher: more suspicious); ``notes`` keep every class's
mask norm and trigger success.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from goodnet.data.dataset import ImageData, batches
from goodnet.errors import GoodnetError
from goodnet.methods import ReversedTrigger, ScanVerdict
from goodnet.models import model_device
from goodnet.scans.base import Scanned, Scanner
from goodnet.scans.karm import select_arms
from goodnet.scans.stamping import IMAGES_PER_PASS, random_start, squash, stamp

CONSISTENCY = 1.4826  # MAD of a normal distribution's sample → its standard deviation

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class NCScanConfig:
    """The reverse-engineering and detection settings of Neural Cleanse (the ``nc`` defense
    takes the same, with the same defaults, and its unlearning settings besides).

    Attributes:
        epochs: reverse-engineering passes over the clean data (the budget).
        batch_size: images per reverse-engineering step.
        trigger_lr: Adam learning rate of the masks and patterns (betas 0.5, 0.9).
        init_cost: starting weight of the mask's L1 norm in the loss.
        cost_multiplier: the cost is multiplied by this after ``patience`` successful passes and
            divided by its 1.5th power after ``patience`` unsuccessful ones.
        patience: passes before the cost is changed.
        success_threshold: share of the clean data a trigger must send to its class to count.
        early_stop_patience: passes without a 1 % better norm before a class stops.
        anomaly_threshold: anomaly index above which a class is flagged.
        seed: fixes the starting masks and patterns and the batch orders.
        candidates: on a model of more than ``preselect_above`` classes, how many classes K-Arm's
            arm selection (:mod:`goodnet.scans.karm`) keeps for the full reverse engineering;
            0: every class, always (no pre-selection).
        preselect_above: the pre-selection runs only on models of more classes than this; at or
            below it every class is reverse-engineered, as before the pre-selection existed.
        warmup_steps: K-Arm's warm-up: optimiser steps every class's trigger gets before the
            bandit (one batch each).
        bandit_steps: the bandit's optimiser steps after the warm-up, one class each (rounded
            up to whole rounds of ``128 / batch_size`` classes).
        bandit_epsilon: the bandit's share of steps given to a class drawn at random.
        reference_classes: classes drawn at random among the others, reverse-engineered in full
            beside the candidates; their norms alone set the median and MAD of the anomaly
            index.
        preselect_images: clean images (drawn with ``seed``) the pre-selected reverse
            engineering uses, when there are more.
    """

    renamed: ClassVar[dict[str, str]] = {"lr": "trigger_lr"}
    # Added with the pre-selection (issue 29, item 6); at these values a model of at most 100
    # classes (every stored key's) is scanned bit for bit as before, so keys leave them out.
    added: ClassVar[dict[str, Any]] = {
        "candidates": 10, "preselect_above": 100, "warmup_steps": 2, "bandit_steps": 512,
        "bandit_epsilon": 0.3, "reference_classes": 10, "preselect_images": 512}

    epochs: int = 6
    batch_size: int = 32
    trigger_lr: float = 0.1
    init_cost: float = 1e-3
    cost_multiplier: float = 1.5
    patience: int = 5
    success_threshold: float = 0.99
    early_stop_patience: int = 25
    anomaly_threshold: float = 2.0
    seed: int = 0
    candidates: int = 10
    preselect_above: int = 100
    warmup_steps: int = 2
    bandit_steps: int = 512
    bandit_epsilon: float = 0.3
    reference_classes: int = 10
    preselect_images: int = 512

    def __post_init__(self) -> None:
        check_nc_settings(self)


def check_nc_settings(cfg: Any, counts: Sequence[int] = (), rates: Sequence[float] = (),
                   more: Sequence[tuple[bool, str]] = ()) -> None:
    """Refuse detection settings out of range, in one line starting "nc:".

    Args:
        cfg: settings with the fields of :class:`NCScanConfig` (the scanner's, or the ``nc``
            defense's).
        counts: the defense's unlearning epochs and batch sizes, checked with the detection
            ones (in the same sentence, as the same error).
        rates: the defense's unlearning learning rate, checked with the detection ones.
        more: the defense's own checks, (whether it holds, the error), after these.
    """
    checks = [
        (min(cfg.epochs, cfg.batch_size, cfg.patience, cfg.early_stop_patience, *counts) >= 1,
         "epochs, batch sizes and patiences must be positive"),
        # One wording for the scanner and the defense (a scan's errors were always the
        # defense's).
        (all(math.isfinite(v) and v > 0 for v in (cfg.trigger_lr, cfg.init_cost, *rates)),
         "trigger_lr, init_cost and unlearn_lr must be positive"),
        (math.isfinite(cfg.cost_multiplier) and cfg.cost_multiplier > 1,
         "cost_multiplier must be > 1"),
        (0 < cfg.success_threshold <= 1, "success_threshold must be in (0, 1]"),
        (math.isfinite(cfg.anomaly_threshold) and cfg.anomaly_threshold >= 0,
         "anomaly_threshold must be a finite number >= 0"),
        (min(cfg.candidates, cfg.preselect_above, cfg.bandit_steps) >= 0
         and min(cfg.warmup_steps, cfg.preselect_images) >= 1,
         "candidates, preselect_above and bandit_steps must be >= 0, warmup_steps and "
         "preselect_images positive"),
        (cfg.reference_classes >= 3, "reference_classes must be at least 3 (a median and MAD)"),
        (0 <= cfg.bandit_epsilon <= 1, "bandit_epsilon must be in [0, 1]"),
        *more,
    ]
    for ok, message in checks:
        if not ok:
            raise GoodnetError(f"nc: {message}")


@dataclass
class _Schedule:
    """One class's cost schedule and early stop, as the reference's ``Recorder``."""

    cost: float
    best: float = math.inf
    up: int = 0
    down: int = 0
    moved_up: bool = False
    moved_down: bool = False
    stale: int = 0
    best_seen: float = math.inf
    passes: int = 0
    done: bool = False

    def update(self, success: float, norm: float, cfg: NCScanConfig) -> bool:
        """Record one pass; True if the current mask is the best so far."""
        self.passes += 1
        improved = success >= cfg.success_threshold and norm < self.best
        if improved:
            self.best = norm
        if self.best < math.inf:
            self.stale = self.stale + 1 if self.best >= 0.99 * self.best_seen else 0
        self.best_seen = min(self.best_seen, self.best)
        if self.moved_up and self.moved_down and self.stale >= cfg.early_stop_patience:
            self.done = True
            return improved
        if success >= cfg.success_threshold:
            self.up, self.down = self.up + 1, 0
        else:
            self.up, self.down = 0, self.down + 1
        if self.up >= cfg.patience:
            self.up, self.cost, self.moved_up = 0, self.cost * cfg.cost_multiplier, True
        elif self.down >= cfg.patience:
            self.down, self.moved_down = 0, True
            self.cost /= cfg.cost_multiplier ** 1.5
        return improved


def reverse_engineer(model: nn.Module, clean: ImageData, cfg: NCScanConfig,
                     progress: bool = False, classes: Sequence[int] | None = None
                     ) -> list[ReversedTrigger]:
    """Every class's smallest trigger on ``clean`` (``model`` in eval mode, not modified);
    ``classes``: only these, in that order (each starts where it would among all classes)."""
    device = model_device(model)
    chosen = list(range(clean.num_classes)) if classes is None else list(classes)
    count = len(chosen)
    labels = torch.tensor(chosen, device=device)
    generator = torch.Generator().manual_seed(cfg.seed)
    mask_w, pattern_w = random_start(clean.num_classes, clean.image_shape, generator, device,
                                      None if classes is None else chosen)
    optimizer = torch.optim.Adam([mask_w, pattern_w], lr=cfg.trigger_lr, betas=(0.5, 0.9))
    schedules = [_Schedule(cfg.init_cost) for _ in range(count)]
    best_mask, best_pattern = squash(mask_w).detach(), squash(pattern_w).detach()
    reached = [False] * count
    for _ in tqdm(range(cfg.epochs), disable=not progress, desc="nc: reverse engineering",
                  leave=False):
        active = [k for k in range(count) if not schedules[k].done]
        if not active:
            break
        cost = torch.tensor([s.cost for s in schedules], device=device)
        hits, norm_sum, seen, steps = _one_pass(model, clean, cfg, generator, active, cost,
                                                (mask_w, pattern_w), optimizer, labels)
        with torch.no_grad():
            mask_now, pattern_now = squash(mask_w), squash(pattern_w)
        for k in active:
            if schedules[k].update(float(hits[k]) / seen, float(norm_sum[k]) / steps, cfg):
                best_mask[k], best_pattern[k], reached[k] = mask_now[k], pattern_now[k], True
            elif not reached[k]:  # no successful pass yet: keep the latest
                best_mask[k], best_pattern[k] = mask_now[k], pattern_now[k]
        if log.isEnabledFor(logging.DEBUG):
            log.debug("nc pass: success %s, best norms %s",
                      [round(float(hits[k]) / seen, 3) for k in range(count)],
                      [round(float(best_mask[k].sum()), 1) for k in range(count)])
    success = trigger_success(model, clean, best_mask, best_pattern, labels=chosen)
    return [ReversedTrigger(chosen[k], best_mask[k].cpu(), best_pattern[k].cpu(),
                            float(best_mask[k].sum()), success[k]) for k in range(count)]


def _one_pass(model: nn.Module, clean: ImageData, cfg: NCScanConfig,
              generator: torch.Generator, active: list[int], cost: torch.Tensor,
              weights: tuple[torch.Tensor, torch.Tensor], optimizer: torch.optim.Optimizer,
              labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """One pass over ``clean`` optimising the triggers of the ``active`` rows (a chunk of
    rows per forward pass; row ``i`` is class ``labels[i]``'s trigger); returns per row the
    triggered images sent to its class and the sum of its mask norms, and the images and
    steps of the pass."""
    mask_w, pattern_w = weights
    device = mask_w.device
    classes = len(cost)
    chunk = max(1, IMAGES_PER_PASS // cfg.batch_size)
    hits = torch.zeros(classes, device=device)
    norm_sum = torch.zeros(classes, device=device)
    seen = steps = 0
    for x, _ in batches(clean, cfg.batch_size, shuffle=True, generator=generator,
                        device=device):
        optimizer.zero_grad(set_to_none=True)
        for first in range(0, len(active), chunk):
            ks = torch.tensor(active[first:first + chunk], device=device)
            mask, pattern = squash(mask_w[ks]), squash(pattern_w[ks])
            logits = model(stamp(x, mask, pattern))
            targets = labels[ks].repeat_interleave(len(x))
            ce = F.cross_entropy(logits, targets, reduction="none").view(len(ks), -1)
            norms = mask.sum((1, 2, 3))
            (ce.mean(1) + cost[ks] * norms).sum().backward()
            hits[ks] += (logits.argmax(1) == targets).view(len(ks), -1).sum(1).float()
            norm_sum[ks] += norms.detach()
        optimizer.step()
        seen, steps = seen + len(x), steps + 1
    return hits, norm_sum, seen, steps


@torch.no_grad()
def trigger_success(model: nn.Module, clean: ImageData, mask: torch.Tensor,
                    pattern: torch.Tensor, classes: list[int] | None = None, *,
                    labels: Sequence[int] | None = None) -> list[float]:
    """Per row ``k`` of ``mask`` and ``pattern`` (of ``classes``, default all), the share of
    the clean images of other classes that trigger ``k`` sends to its class: ``labels[k]``
    (default ``k``)."""
    device = model_device(model)
    classes = list(range(len(mask))) if classes is None else classes
    rows = torch.tensor(classes, device=mask.device)  # the triggers may be on the CPU
    mask, pattern = mask[rows].to(device), pattern[rows].to(device)
    ks = rows.to(device) if labels is None else \
        torch.tensor(labels, device=device)[rows.to(device)]
    hits = torch.zeros(len(ks), device=device)
    others = torch.zeros(len(ks), device=device)
    chunk = max(1, IMAGES_PER_PASS // 32)
    for x, y in batches(clean, 32, device=device):
        for first in range(0, len(ks), chunk):
            part = slice(first, first + chunk)
            predicted = model(stamp(x, mask[part], pattern[part])).argmax(1).view(-1, len(x))
            eligible = y.unsqueeze(0) != ks[part].unsqueeze(1)
            hits[part] += ((predicted == ks[part].unsqueeze(1)) & eligible).sum(1).float()
            others[part] += eligible.sum(1).float()
    return [float(h / o) if o > 0 else 0.0 for h, o in zip(hits, others, strict=True)]


def anomaly_indices(norms: torch.Tensor, reference: torch.Tensor | None = None) -> torch.Tensor:
    """``(median - norm) / (1.4826 · MAD)`` per class (numpy's median, as the reference), the
    median and MAD taken over the ``reference`` norms (default: ``norms``)."""
    reference = norms if reference is None else reference
    median = torch.quantile(reference, 0.5)
    mad = CONSISTENCY * torch.quantile((reference - median).abs(), 0.5)
    if mad > 0:
        return (median - norms) / mad
    return torch.sign(median - norms) * torch.where(norms == median, 0.0, math.inf)


def detect(model: nn.Module, clean: ImageData, cfg: NCScanConfig,
           progress: bool = False) -> ScanVerdict:
    """Steps 1 and 2, what the scanner and the ``nc`` repair share: every class's reversed
    trigger on ``clean`` and the classes whose anomaly index exceeds ``anomaly_threshold``
    (``model`` in eval mode, its parameters frozen; not modified). On a model of more than
    ``preselect_above`` classes, K-Arm's pre-selection first (:mod:`goodnet.scans.karm`)."""
    if preselects(cfg, clean.num_classes):
        return preselected_detect(model, clean, cfg, progress)
    triggers = reverse_engineer(model, clean, cfg, progress)
    norms = torch.tensor([t.norm for t in triggers], dtype=torch.float64)
    index = anomaly_indices(norms)
    flagged = tuple(int(k) for k in torch.nonzero(index > cfg.anomaly_threshold).flatten())
    return ScanVerdict(backdoored=bool(flagged), targets=flagged, score=float(index.max()),
                       threshold=cfg.anomaly_threshold, scores=tuple(float(v) for v in index),
                       triggers=tuple(triggers))


def preselects(cfg: NCScanConfig, classes: int) -> bool:
    """Whether a scan of a model of ``classes`` classes pre-selects its candidates."""
    return classes > cfg.preselect_above and 0 < cfg.candidates < classes


def scan_data(clean: ImageData, cfg: NCScanConfig) -> ImageData:
    """The clean images the reverse engineering uses: all of them, or with the pre-selection
    at most ``preselect_images`` of them (drawn with ``seed``; the repairs measure the
    triggers' success on the same)."""
    if not preselects(cfg, clean.num_classes) or len(clean) <= cfg.preselect_images:
        return clean
    order = torch.randperm(len(clean), generator=torch.Generator().manual_seed(cfg.seed))
    return clean.subset(order[:cfg.preselect_images].sort().values)


def preselected_detect(model: nn.Module, clean: ImageData, cfg: NCScanConfig,
                       progress: bool = False) -> ScanVerdict:
    """Steps 1 and 2 on the candidates of K-Arm's arm selection and a random reference sample
    of classes, on :func:`scan_data` (the method, its steps 4 and 5, and why the median and MAD
    come from the reference classes alone: :mod:`goodnet.scans.karm`)."""
    data = scan_data(clean, cfg)
    arms = select_arms(model, data, cfg, progress)
    candidates = arms.ranked[:cfg.candidates]
    others = sorted(arms.ranked[cfg.candidates:])
    if len(others) < 3:
        raise GoodnetError(f"nc: {clean.num_classes} classes leave {len(others)} reference "
                           f"classes beside {cfg.candidates} candidates; at least 3 are needed "
                           "(lower candidates)")
    draw = torch.randperm(len(others), generator=torch.Generator().manual_seed(cfg.seed))
    reference = sorted(others[int(i)] for i in draw[:cfg.reference_classes])
    full = sorted(candidates + reference)
    reversed_ = {t.target: t for t in reverse_engineer(model, data, cfg, progress, full)}
    norms = torch.tensor([reversed_[k].norm for k in full], dtype=torch.float64)
    index = anomaly_indices(norms, torch.tensor([reversed_[k].norm for k in reference],
                                                dtype=torch.float64))
    scores = [math.nan] * clean.num_classes
    for k, value in zip(full, index.tolist(), strict=True):
        scores[k] = value
    # The other classes keep their warm-up-and-bandit trigger, its success not measured.
    triggers = tuple(
        reversed_[k] if k in reversed_ else
        ReversedTrigger(k, arms.mask[k], arms.pattern[k], float(arms.mask[k].sum()), math.nan)
        for k in range(clean.num_classes))
    flagged = tuple(k for k in full if scores[k] > cfg.anomaly_threshold)
    return ScanVerdict(backdoored=bool(flagged), targets=flagged, score=float(index.max()),
                       threshold=cfg.anomaly_threshold, scores=tuple(scores),
                       triggers=triggers, fully_reversed=tuple(full))


class NCScanner(Scanner[NCScanConfig]):
    """Neural Cleanse: a trigger reverse-engineered per class, small-norm outliers flagged.

    Needs clean data; settings :class:`NCScanConfig`."""

    name = "nc"
    paper = "Wang et al., IEEE S&P 2019"
    Config = NCScanConfig
    quick: ClassVar[Mapping[str, Any]] = {"epochs": 2}

    def run(self, model: nn.Module, clean: ImageData | None, classes: int,
            progress: bool) -> Scanned:
        assert clean is not None  # needs_clean: Scanner.scan refuses a scan without data
        verdict = detect(model, clean, self.config, progress)
        return Scanned(verdict=verdict, score_name="anomaly index", notes={
            "norms": [t.norm for t in verdict.triggers],
            "success": [t.success for t in verdict.triggers]})
