"""PAM: Path-Aware Minimization (Min, Qin, Zhang, Shen & Cheng, "Uncovering, Explaining, and
Mitigating the Superficial Safety of Backdoor Defense", NeurIPS 2024, arXiv:2410.09838;
reference code AISafety-HKUST/stable_backdoor_purification ``fine_tune/BTIDBF/sam.py``, class
``PAM``, used by ``fine_tune/BTIDBF/btidbfu.py``, ``unlearn_pam``, run by ``defense.sh``).

A purified model often sits close to the backdoored one, joined to it by a path of low clean
loss: a little more fine-tuning walks back along it and the backdoor returns. PAM is a
sharpness-aware step whose perturbation is not the gradient but that path: with ``w`` the
weights being trained and ``w_b`` the backdoored model's (a frozen copy), it shifts the weights
to ``w + e``, ``e = rho · (w_b − w) / ||w_b − w||`` (one L2 norm over all the trained
parameters, guarded by 1e-12), takes the gradient of the loss there, puts ``w`` back exactly
and lets the base optimiser step with that gradient. Minimising the loss at points towards the
backdoored model favours weights whose neighbourhood on the path is flat, so the update
moves away from the path back to the backdoor. Unlike SAM the shift needs no first gradient:
one forward and one backward pass per step, as in the reference.

Defaults, from the reference: ``rho`` 0.5 (``defense.sh``, ``--rho 0.5``; the ``PAM`` class's
own default 0.05 is never used there and ``cfg.py`` has none); the reference's base optimiser
(SGD lr 0.01, momentum 0.1, constant, 30 unlearning epochs per round) is the caller's here.
BatchNorm layers see the perturbed weights in the one training-mode pass and update their
running statistics from it, as in the reference, whose only forward pass is the perturbed one.

Departures, documented:

- **Which parameters.** The reference zips the model's parameters with the backdoored copy's
  in order and perturbs every one; goodnet pairs them by name and perturbs the trainable ones
  (``requires_grad``), the ones the optimiser moves; the norm is over those.
- **No adaptive variant.** The reference class has an ``adaptive`` flag (``e`` scaled by the
  squared weights) that its scripts never turn on; it is left out.
- **The loss and the base optimiser are the caller's.** The reference uses PAM on BTI-DBF's
  unlearning loss (clean images, a fifth of each batch stamped with a generated trigger, true
  labels); goodnet's FST uses it in its recovery phase (:mod:`goodnet.defenses.fst`,
  ``recover_optimizer="pam"``) on its own loss and optimiser.

Not a defense by itself: the reference defines PAM as an optimiser, and so is it used here.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn

from goodnet.errors import GoodnetError

PATH_EPS = 1e-12  # the reference's guard against a zero path (weights equal to the reference)


class PathAware:
    """PAM's shift of a model's trainable parameters towards frozen reference weights.

    Args:
        model: the network being trained; its trainable parameters are shifted.
        reference: the backdoored model, with the same parameter names; its weights are
            copied now, so later changes to it do not matter.
        rho: length of the shift (L2, over all the trainable parameters together); 0 gives
            the base optimiser's plain step.
    """

    def __init__(self, model: nn.Module, reference: nn.Module, rho: float = 0.5) -> None:
        if not rho >= 0:
            raise GoodnetError(f"pam: rho must be >= 0, not {rho}")
        ref = dict(reference.named_parameters())
        trained = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        missing = [name for name, p in trained if name not in ref or ref[name].shape != p.shape]
        if missing:
            raise GoodnetError(f"pam: the reference model has no parameter like {missing[0]!r}")
        self.params = [p for _, p in trained]
        self.reference = [ref[name].detach().clone().to(p.device, p.dtype) for name, p in trained]
        self.rho = rho

    def shift(self) -> list[torch.Tensor]:
        """``e = rho · (w_b − w) / ||w_b − w||`` for the current weights ``w``."""
        with torch.no_grad():
            path = [r - p for p, r in zip(self.params, self.reference, strict=True)]
            norm = torch.stack([d.norm() for d in path]).norm() if path else torch.tensor(0.0)
            scale = self.rho / (norm + PATH_EPS)
            return [d * scale for d in path]

    @contextlib.contextmanager
    def perturbed(self) -> Iterator[None]:
        """The weights at ``w + e`` inside, ``w`` exactly afterwards (also on an error): the
        step's forward and backward passes run inside, the optimiser steps after."""
        saved = [p.detach().clone() for p in self.params]
        try:
            with torch.no_grad():
                for p, e in zip(self.params, self.shift(), strict=True):
                    p.add_(e)
            yield
        finally:
            with torch.no_grad():
                for p, w in zip(self.params, saved, strict=True):
                    p.copy_(w)

    def step(self, loss_of: Callable[[], torch.Tensor],
             optimizer: torch.optim.Optimizer) -> torch.Tensor:
        """One PAM update: the gradient of ``loss_of()`` at ``w + e``, then ``optimizer``'s step
        from ``w`` with it.

        Returns:
            The loss at ``w + e`` (detached).
        """
        optimizer.zero_grad(set_to_none=True)
        with self.perturbed():
            loss = loss_of()
            if not torch.isfinite(loss):
                raise GoodnetError(f"pam: the loss diverged ({loss.item()}); lower lr or rho")
            loss.backward()
        optimizer.step()
        return loss.detach()
