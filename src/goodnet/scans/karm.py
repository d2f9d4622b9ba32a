"""Neural Cleanse on many classes: candidate classes picked first, after K-Arm (Shen, Liu, Tao,
An, Xu, Cheng, Ma & Zhang, "Backdoor Scanning for Deep Neural Networks through K-Arm
Optimization", ICML 2021; reference code PurduePAML/K-ARM_Backdoor_Optimization,
``K_Arm_Scanner.py`` and ``main.py``). Issue 29, item 6.

Neural Cleanse (:mod:`goodnet.scans.nc`) reverse-engineers a trigger for every class, so its
time grows with their number: the lab's face network has 1283. On a model of more than
``preselect_above`` 100 classes, its step 1 becomes steps 1-4 here (:func:`select_arms` runs
1-3; :func:`goodnet.scans.nc.preselected_detect` runs 4 and 5):

1. **Arms.** Every class is an arm: a mask and a pattern, NC's objective
   ``CE + init_cost·|m|_1``, Adam (``trigger_lr``, betas 0.5, 0.9) from NC's random start.
2. **Warm-up** (K-Arm's ``warmup_rounds`` 2): every arm gets ``warmup_steps`` 2 steps.
3. **Bandit.** ``bandit_steps`` 512 more steps go, epsilon-greedily (K-Arm's
   ``epsilon_for_bandits`` 0.3), to the arms whose objective is smallest: with probability
   ``bandit_epsilon`` a step goes to an arm drawn at random, otherwise to the best arm not yet
   stepped in that round.
4. **Candidates.** The ``candidates`` 10 arms of smallest objective get NC's full reverse
   engineering (its settings and cost schedule, from its random start), and so do
   ``reference_classes`` 10 classes drawn at random among the others.
5. **Anomaly index.** The median and MAD are those of the reference classes' norms alone; every
   fully reversed class's index is ``(median - norm) / (1.4826·MAD)``. Why: the candidates are
   the classes most likely to be small-norm outliers, so a median over them is biased low; and
   norms after a short warm-up are larger than fully optimised ones, so a median over the
   warm-up norms would inflate every candidate's index. The reference classes are optimised
   exactly as the candidates are, and drawn at random, so their median and MAD estimate those a
   full scan would compute over all classes. The estimate is noisier than a full scan's (10
   norms, not 1283): a class is flagged at the same ``anomaly_threshold`` 2. On the planted
   120-class network of ``tests/test_karm.py`` (target 37) the target ranks first after the
   bandit and is flagged (index 9.0; 6.3 in a full scan of all 120 classes), but so are three
   clean candidates (2.2 to 3.1, where the full scan gives them 1.3 to 2.0): more false
   alarms than a full scan. More ``reference_classes`` narrow it at 6 passes each.

All of it runs on ``preselect_images`` 512 clean images (drawn with ``seed``;
:func:`goodnet.scans.nc.scan_data`): NC's 6 passes over 512 images are about the step budget
it was tuned for on the zoo's 600-image splits, and on the lab's 11,547 validation images one
class's full passes would take about two minutes on one core.

What the verdict carries: a trigger for every class, the fully reversed ones for the
candidates and reference classes (``fully_reversed``), the warm-up-and-bandit trigger for the
others, marked by a success of NaN (not measured: it would cost a pass over the data per class)
and an anomaly index of NaN (not comparable). The ``unlearn`` defense unlearns the fully
reversed triggers only (a warm-up trigger is a random half-image mask, no class's trigger); the
``nc`` defense unlearns the flagged ones as always.

Departures from K-Arm, documented:

- **The arms' value.** K-Arm greedily picks the arm maximising ``reg_down_vel + beta / |m|_1``
  among arms that reached the attack-success threshold. After a few steps from a random start
  on a CPU budget no arm has, so the value here is NC's objective at the arm's latest step
  (lower: better), which ranks arms by how easily a trigger moves images to them.
- **Steps, not rounds.** A K-Arm pull is a pass over the arm's data; here a step on one batch
  (``batch_size``), and each round steps ``128 / batch_size`` arms on the same batch (one
  forward pass), so ``bandit_steps`` counts arm-steps.
- **No pre-screening, no early stop per arm, no symmetric check**, and no decision bound on the
  norm (K-Arm's ``global_det_bound``): the decision is NC's anomaly index (step 5).
- Arms are not dropped explicitly; an arm the greedy rule passes over gets steps only from the
  random share.

Cost: ``classes × warmup_steps × batch_size`` stamped images for the warm-up, ``bandit_steps ×
batch_size`` for the bandit, and ``(candidates + reference_classes) × epochs ×
preselect_images`` for the full reverse engineering (forward and backward passes each); only
the warm-up grows with the classes. On the lab's DeepID (1283 classes, 11,547 clean images of
random faces) the default ``nc`` repair took 328 CPU seconds on one thread and ``unlearn``
(the scan and 10 unlearning epochs) 508 (``benchmarks/results/deepid_time``).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from goodnet.data.dataset import ImageData, batches
from goodnet.models import model_device
from goodnet.scans.stamping import IMAGES_PER_PASS, random_start, squash, stamp

BETAS = (0.5, 0.9)  # NC's and K-Arm's Adam
ADAM_EPS = 1e-8  # torch.optim.Adam's


class ArmSettings(Protocol):
    """The settings the arm selection reads (:class:`goodnet.scans.nc.NCScanConfig`'s)."""

    @property
    def batch_size(self) -> int: ...

    @property
    def trigger_lr(self) -> float: ...

    @property
    def init_cost(self) -> float: ...

    @property
    def seed(self) -> int: ...

    @property
    def warmup_steps(self) -> int: ...

    @property
    def bandit_steps(self) -> int: ...

    @property
    def bandit_epsilon(self) -> float: ...


@dataclass(frozen=True)
class Arms:
    """The arm selection's outcome.

    Attributes:
        ranked: every class, the smallest objective first.
        objective: per class, NC's objective at its latest step.
        steps: per class, the optimiser steps it got.
        mask, pattern: per class, its trigger after them (``(K, 1, H, W)``, ``(K, C, H, W)``).
    """

    ranked: list[int]
    objective: torch.Tensor
    steps: torch.Tensor
    mask: torch.Tensor
    pattern: torch.Tensor


class _Bandit:
    """Every class's trigger as an arm, stepped by Adam one chunk of arms at a time."""

    def __init__(self, model: nn.Module, data: ImageData, cfg: ArmSettings,
                 generator: torch.Generator) -> None:
        self.model, self.data, self.cfg, self.generator = model, data, cfg, generator
        device = model_device(model)
        classes = data.num_classes
        mask_w, pattern_w = random_start(classes, data.image_shape, generator, device)
        self.weights = [mask_w.detach(), pattern_w.detach()]
        self.moments = [(torch.zeros_like(w), torch.zeros_like(w)) for w in self.weights]
        self.steps = torch.zeros(classes, dtype=torch.long)
        self.objective = torch.full((classes,), math.inf)
        self.batches: Iterator[tuple[torch.Tensor, torch.Tensor]] = iter(())

    def batch(self) -> torch.Tensor:
        """The next batch of clean images (a new shuffled pass when one ends)."""
        for _ in range(2):
            for x, _ in self.batches:
                return x
            self.batches = iter(batches(self.data, self.cfg.batch_size, shuffle=True,
                                        generator=self.generator,
                                        device=model_device(self.model)))
        raise AssertionError("no clean images")  # check_clean refuses empty data

    def step(self, arms: list[int], x: torch.Tensor) -> None:
        """One Adam step of NC's objective for each of ``arms`` on the images ``x``."""
        rows = torch.tensor(arms)
        ws = [w[rows.to(w.device)].requires_grad_() for w in self.weights]
        mask, pattern = squash(ws[0]), squash(ws[1])
        targets = rows.to(x.device).repeat_interleave(len(x))
        logits = self.model(stamp(x, mask, pattern))
        ce = F.cross_entropy(logits, targets, reduction="none").view(len(arms), -1).mean(1)
        objective = ce + self.cfg.init_cost * mask.sum((1, 2, 3))
        objective.sum().backward()
        self.steps[rows] += 1
        self.objective[rows] = objective.detach().cpu()
        t = self.steps[rows].to(ws[0].device).float().view(-1, 1, 1, 1)
        b1, b2 = BETAS
        with torch.no_grad():
            for w, local, (m, v) in zip(self.weights, ws, self.moments, strict=True):
                where = rows.to(w.device)
                grad = local.grad
                assert grad is not None
                m[where] = b1 * m[where] + (1 - b1) * grad
                v[where] = b2 * v[where] + (1 - b2) * grad * grad
                # Adam with bias correction, per arm (each arm counts its own steps).
                denom = (v[where] / (1 - b2 ** t)).sqrt() + ADAM_EPS
                w[where] = local - self.cfg.trigger_lr * (m[where] / (1 - b1 ** t)) / denom


def select_arms(model: nn.Module, data: ImageData, cfg: ArmSettings,
                progress: bool = False) -> Arms:
    """Steps 1-3: the warm-up of every class's trigger and the epsilon-greedy bandit."""
    generator = torch.Generator().manual_seed(cfg.seed)
    bandit = _Bandit(model, data, cfg, generator)
    classes = data.num_classes
    chunk = max(1, IMAGES_PER_PASS // cfg.batch_size)
    for _ in tqdm(range(cfg.warmup_steps), disable=not progress, desc="k-arm: warm-up",
                  leave=False):
        x = bandit.batch()
        for first in range(0, classes, chunk):
            bandit.step(list(range(first, min(classes, first + chunk))), x)
    for _ in tqdm(range(math.ceil(cfg.bandit_steps / chunk)), disable=not progress,
                  desc="k-arm: bandit", leave=False):
        order = torch.argsort(bandit.objective, stable=True).tolist()
        chosen: list[int] = []
        while len(chosen) < min(chunk, classes):
            if float(torch.rand(1, generator=generator)) < cfg.bandit_epsilon:
                arm = int(torch.randint(classes, (1,), generator=generator))
            else:
                arm = next(k for k in order if k not in chosen)
            if arm not in chosen:
                chosen.append(arm)
        bandit.step(chosen, bandit.batch())
    with torch.no_grad():
        mask, pattern = (squash(w).cpu() for w in bandit.weights)
    ranked = torch.argsort(bandit.objective, stable=True).tolist()
    return Arms(ranked, bandit.objective, bandit.steps, mask, pattern)
