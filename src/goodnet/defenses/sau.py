"""SAU: Shared Adversarial Unlearning (Wei, Zhang, Zha & Wu, "Shared Adversarial Unlearning:
Backdoor Mitigation by Unlearning Shared Adversarial Examples", NeurIPS 2023, arXiv:2307.10562;
reference code SCLBD/BackdoorBench ``defense/sau.py`` with its ``Shared_PGD`` attack, and
``config/defense/sau/config.yaml``).

A backdoored model's trigger is, within a norm ball, an adversarial perturbation that sends
inputs to one class. SAU searches each clean batch for *shared* adversarial examples: a PGD
perturbation that fools both the frozen backdoored model and the model being repaired, sending
both to the same wrong class. The PGD loss is ``beta_adv · L_adv + beta_shared · L_share``:
``L_adv`` is minus the cross-entropy of the true label, over the examples not yet fooling each
model (off its own clean prediction); ``L_share`` the Jensen-Shannon divergence between the two
models' outputs, over the examples not yet shared; a batch stops early once every example is
shared. The model is then trained on ``lambda_clean · CE(clean) + lambda_adv · CE(perturbed) +
lambda_shared · L_sar``, where ``L_sar`` is ``-log(1 - p(ŷ_ref | x + δ))`` on every perturbed
example that fools the backdoored model (its prediction ``ŷ_ref`` is neither the label nor its
clean prediction): the repaired model learns not to share the backdoored model's mistakes.

Defaults, from the reference's ``config.yaml`` (CIFAR-10): L∞ ball of radius 0.2, 5 PGD steps of
0.2 (signed gradient), start at the ball's corner (``pgd_init`` "max": +0.2 everywhere),
``beta_adv`` 0.01, ``beta_shared`` 1; ``lambda_clean`` 1, ``lambda_adv`` 0 (the reference's
adversarial-training term is off by default), ``lambda_shared`` 1; one unlearning step per batch;
Adam (0.9, 0.999), no weight decay, constant rate (the reference builds a cosine schedule but
never steps it); the model stays in eval mode throughout, BatchNorm statistics
frozen (the reference's ``train_mode`` off; ``train_mode`` turns it on for the unlearning
forward pass, as there).

The budget's scale. The reference adds the perturbation to the de-normalised image and
normalises again (its ``get_perturbed_image``), so its ``trigger_norm`` 0.2 is already in [0, 1]
pixel units. goodnet models take [0, 1] images and normalise inside, so the same 0.2 is added to
the image directly: the same ball, no conversion. As in the reference, the perturbed image is not
clipped to [0, 1] (``clip`` turns clipping on).

Departures, documented:

- **Epochs, batch size and learning rate** (settings). The reference runs 100 rounds
  (``n_rounds``; 20 on Tiny-ImageNet) over 5 % of the training set in batches of 256: about
  1000 Adam steps of 1e-4 on CIFAR-10. Each batch costs some twelve forward-backward passes (5
  PGD steps through both models, then the update), so on goodnet's 600 clean images a
  one-minute budget on two CPU cores holds about 5 epochs: 15 steps at the reference's batch,
  where the shared-adversarial rate on the clean data barely moves on a blend model (0.93 to
  0.88 in 8 epochs, while the clean data's accuracy fell to 0.90). Defaults here: ``epochs`` 5,
  ``batch_size`` 32 (19 steps an epoch, the same compute) and ``lr`` 1e-3 (so that steps × lr,
  0.095, is near the reference's 0.1). Chosen on the clean data alone (MNIST BadNets and Blend
  small CNNs, 1 % split): on Blend at lr 1e-4 the shared rate after 5 epochs was still 0.29
  and the clean data's accuracy 0.96; at 1e-3, 0.15 and 0.99 after 4 epochs.
- **Random start.** The reference's "random" start draws U[0, 1) and clips to the ball (nearly
  the "max" start for 0.2); here "random" is uniform in [-eps, eps] per pixel (projected onto
  the L1 / L2 ball), drawn from ``seed``. The default "max" start has no randomness.
- **Randomness** (batch order, random starts) comes from ``seed`` alone.

The curve holds the clean-data accuracy before repair (epoch 0) and after each epoch; nothing
is chosen from it: SAU's result is the model after the last epoch ("unlearned").
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from goodnet.data.dataset import ImageData, batches
from goodnet.defenses.base import Curve, Defense, Point, Repaired, Steps
from goodnet.errors import GoodnetError
from goodnet.models import channels_last, model_device

NORMS = ("linf", "l2", "l1")
STARTS = ("max", "min", "zero", "random")


@dataclass(frozen=True)
class SAUConfig:
    """Settings of SAU (defaults: the reference's ``config.yaml``, but for the epochs, batch
    size and learning rate: see the module's docstring).

    Attributes:
        epochs: unlearning passes over the clean data (the reference's ``n_rounds``).
        lr: Adam learning rate (constant, no weight decay).
        batch_size: images per batch.
        eps: radius of the perturbation ball, in [0, 1] pixel units (``trigger_norm``).
        norm: the ball's norm: "linf", "l2" or "l1".
        pgd_steps: PGD steps per batch (``adv_steps``).
        pgd_step_size: size of each signed-gradient step (``adv_lr``).
        pgd_init: where PGD starts: "max" (+eps), "min" (-eps), "zero" or "random".
        beta_adv: weight of the PGD's adversarial term (``beta_1``).
        beta_shared: weight of the PGD's sharing (Jensen-Shannon) term (``beta_2``).
        lambda_clean: weight of the clean cross-entropy (``lmd_1``).
        lambda_adv: weight of the cross-entropy on perturbed inputs (``lmd_2``).
        lambda_shared: weight of the shared adversarial risk (``lmd_3``).
        train_mode: run the unlearning forward pass in training mode (BatchNorm statistics
            updated); off in the reference.
        clip: clip perturbed images to [0, 1] (the reference does not).
        seed: fixes the batch order and random starts.
    """

    epochs: int = 5
    lr: float = 1e-3
    batch_size: int = 32
    eps: float = 0.2
    norm: str = "linf"
    pgd_steps: int = 5
    pgd_step_size: float = 0.2
    pgd_init: str = "max"
    beta_adv: float = 0.01
    beta_shared: float = 1.0
    lambda_clean: float = 1.0
    lambda_adv: float = 0.0
    lambda_shared: float = 1.0
    train_mode: bool = False
    clip: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        weights = (self.beta_adv, self.beta_shared, self.lambda_clean, self.lambda_adv,
                   self.lambda_shared)
        checks = [
            (self.epochs >= 1 and self.batch_size >= 1 and self.pgd_steps >= 1,
             "epochs, batch size and PGD steps must be positive"),
            (math.isfinite(self.lr) and self.lr > 0, "lr must be > 0"),
            (math.isfinite(self.eps) and self.eps > 0, "eps must be > 0"),
            (math.isfinite(self.pgd_step_size) and self.pgd_step_size > 0,
             "PGD step size must be > 0"),
            (self.norm in NORMS, f"norm must be one of {NORMS}"),
            (self.pgd_init in STARTS, f"pgd_init must be one of {STARTS}"),
            (all(math.isfinite(w) and w >= 0 for w in weights), "weights must be finite, >= 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise GoodnetError(f"sau: {message}")


def frozen_copy(model: nn.Module) -> nn.Module:
    """The backdoored model as the fixed reference: a copy in eval mode, no gradients."""
    reference = copy.deepcopy(model).eval()
    reference.requires_grad_(False)
    return reference


def shared_examples(pred: torch.Tensor, pred_ref: torch.Tensor, clean_pred: torch.Tensor,
                    clean_pred_ref: torch.Tensor) -> torch.Tensor:
    """Which perturbed examples are shared adversarial examples: both models moved off their
    clean answers (``clean_pred``, ``clean_pred_ref``), to the same class."""
    return (pred != clean_pred) & (pred_ref != clean_pred_ref) & (pred == pred_ref)


def project(delta: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    """``delta`` brought back into the ball of radius ``eps`` (per example)."""
    if norm == "linf":
        return delta.clamp(-eps, eps)
    flat = delta.flatten(1)
    size = flat.norm(p=2 if norm == "l2" else 1, dim=1).clamp_min(1e-12)
    return delta * (eps / size).clamp(max=1.0).view(-1, *[1] * (delta.dim() - 1))


def _perturb(x: torch.Tensor, delta: torch.Tensor, clip: bool) -> torch.Tensor:
    return (x + delta).clamp(0, 1) if clip else x + delta


def shared_pgd(model: nn.Module, reference: nn.Module, x: torch.Tensor, y: torch.Tensor,
               cfg: SAUConfig, generator: torch.Generator) -> torch.Tensor:
    """A perturbation of ``x`` (in [0, 1] pixel units) that both models' predictions leave,
    for the same class (the reference's ``Shared_PGD.attack``)."""
    with torch.no_grad():
        clean_pred, clean_pred_ref = model(x).argmax(1), reference(x).argmax(1)
    if cfg.pgd_init == "random":
        start = (torch.rand(x.shape, generator=generator) * 2 - 1) * cfg.eps
    else:
        start = torch.full(x.shape, {"max": cfg.eps, "min": -cfg.eps, "zero": 0.0}[cfg.pgd_init])
    delta = project(start.to(x.device, x.dtype), cfg.eps, cfg.norm)
    n = len(y)
    for _ in range(cfg.pgd_steps):
        delta.requires_grad_(True)
        x_adv = _perturb(x, delta, cfg.clip)
        logits, logits_ref = model(x_adv), reference(x_adv)
        pred, pred_ref = logits.argmax(1), logits_ref.argmax(1)
        shared = shared_examples(pred, pred_ref, clean_pred, clean_pred_ref)
        # Push up the true class's loss where each model is not yet fooled ...
        adv = -((F.cross_entropy(logits, y, reduction="none") * (pred == clean_pred)).sum()
                + (F.cross_entropy(logits_ref, y, reduction="none")
                   * (pred_ref == clean_pred_ref)).sum()) / (2 * n)
        # ... and pull the two models' outputs together where they do not yet share.
        p, q = F.softmax(logits, 1).clamp_min(1e-8), F.softmax(logits_ref, 1).clamp_min(1e-8)
        mix = (p + q) / 2
        js = 0.5 * (p * (p.log() - mix.log()) + q * (q.log() - mix.log())).sum(1)
        loss = cfg.beta_adv * adv + cfg.beta_shared * (js * ~shared).sum() / n
        (grad,) = torch.autograd.grad(loss, delta)
        delta = project(delta.detach() - cfg.pgd_step_size * grad.sign(), cfg.eps, cfg.norm)
        if bool(shared.all()):  # as the reference: checked before this step's update
            break
    return delta.detach()


def shared_risk(per_logits: torch.Tensor, pred_ref: torch.Tensor,
                fooled_ref: torch.Tensor) -> torch.Tensor:
    """The relaxed shared adversarial risk, ``-log(1 - p(pred_ref | x + δ))`` summed over the
    examples that fool the reference (``fooled_ref``), divided by the batch size. As the
    reference, the mean of two equal forms that differ numerically, clamped at 0.1 %/99.9 %."""
    p = F.softmax(per_logits, 1)
    hit = F.one_hot(pred_ref, p.shape[1]).to(p.dtype)
    pos, neg = (p * hit).sum(1), (p * (1 - hit)).sum(1)
    risk = -(torch.log(1e-6 + neg.clamp(max=0.999)) + torch.log(1 + 1e-6 - pos.clamp(min=0.001)))
    return (risk * fooled_ref).sum() / (2 * len(pred_ref))


class SAU(Defense[SAUConfig]):
    """Unlearn the adversarial examples the model shares with its backdoored original."""

    name = "sau"
    paper = "Wei et al., NeurIPS 2023, arXiv:2307.10562"
    Config = SAUConfig
    quick: ClassVar[Mapping[str, Any]] = {"epochs": 1, "batch_size": 50}

    def run(self, model: nn.Module, clean: ImageData | None, steps: Steps,
            progress: bool) -> Repaired:
        assert clean is not None
        cfg = self.config
        work = copy.deepcopy(model).eval()
        reference = frozen_copy(model)
        points: list[Point] = [steps.measure(reference, clean, 0, None)]
        params = [p for p in work.parameters() if p.requires_grad]
        if not params:
            raise GoodnetError("sau: the model has no trainable parameters")
        optimizer = torch.optim.Adam(params, lr=cfg.lr, betas=(0.9, 0.999), weight_decay=0.0)
        generator = torch.Generator().manual_seed(cfg.seed)
        device = model_device(work)
        keys = ("loss", "clean_loss", "adversarial_loss", "shared_loss", "fooled_reference",
                "shared")
        notes: dict[str, list[float]] = {k: [] for k in keys}
        fork = [device.index or 0] if device.type == "cuda" else []
        with channels_last(work), channels_last(reference), torch.random.fork_rng(fork):
            torch.manual_seed(cfg.seed)  # anything on the global generator (dropout in train mode)
            for epoch in range(1, cfg.epochs + 1):
                sums = dict.fromkeys(keys, 0.0)
                for x, y in batches(clean, cfg.batch_size, shuffle=True, generator=generator,
                                    device=device):
                    for key, value in self._step(work, reference, x, y, optimizer,
                                                 generator).items():
                        sums[key] += value * len(y)
                for key in keys:
                    notes[key].append(sums[key] / len(clean))
                points.append(steps.measure(work.eval(), clean, epoch, None))
        work.eval()
        curve = Curve("epoch", tuple(points), (("unlearned", len(points) - 1),))
        return Repaired(model=work, curve=curve, variants={"unlearned": work},
                        chosen="unlearned", notes=dict(notes))

    def _step(self, work: nn.Module, reference: nn.Module, x: torch.Tensor, y: torch.Tensor,
              optimizer: torch.optim.Optimizer, generator: torch.Generator) -> dict[str, float]:
        """One batch: find the shared adversarial examples, take one unlearning step."""
        cfg = self.config
        work.eval()
        delta = shared_pgd(work, reference, x, y, cfg, generator)
        x_adv = _perturb(x, delta, cfg.clip)
        with torch.no_grad():
            clean_pred_ref = reference(x).argmax(1)
            pred_ref = reference(x_adv).argmax(1)
        work.train(cfg.train_mode)
        logits, per_logits = work(torch.cat([x, x_adv])).split(len(y))
        work.eval()
        fooled_ref = (pred_ref != y) & (pred_ref != clean_pred_ref)
        clean_loss = F.cross_entropy(logits, y)
        adversarial_loss = F.cross_entropy(per_logits, y)
        shared_loss = shared_risk(per_logits, pred_ref, fooled_ref)
        loss = (cfg.lambda_clean * clean_loss + cfg.lambda_adv * adversarial_loss
                + cfg.lambda_shared * shared_loss)
        if not torch.isfinite(loss):
            raise GoodnetError(f"sau: the unlearning loss diverged ({loss.item()}); lower lr")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        shared = fooled_ref & (per_logits.argmax(1) == pred_ref)
        return {"loss": loss.item(), "clean_loss": clean_loss.item(),
                "adversarial_loss": adversarial_loss.item(), "shared_loss": shared_loss.item(),
                "fooled_reference": fooled_ref.float().mean().item(),
                "shared": shared.float().mean().item()}
