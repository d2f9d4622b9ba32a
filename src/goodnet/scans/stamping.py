"""The trigger Neural Cleanse and K-Arm optimise: a mask ``m`` (1, H, W) and a pattern ``p``
(C, H, W) in [0, 1], stamped as ``(1 - m)·x + m·p``, both kept in tanh space (the reference
code's parametrisation, bolunwang/backdoor ``visualizer.py``).
"""

from __future__ import annotations

import torch

EPSILON = 1e-7  # keeps tanh space away from ±1 (the reference's K.epsilon())
IMAGES_PER_PASS = 128  # stamped images per forward pass (classes are chunked to stay below)


def squash(w: torch.Tensor) -> torch.Tensor:
    """Unconstrained weights as values in [0, 1] (tanh space)."""
    return torch.tanh(w) / (2 - EPSILON) + 0.5


def stamp(x: torch.Tensor, mask: torch.Tensor, pattern: torch.Tensor) -> torch.Tensor:
    """``x`` (B, C, H, W) stamped with each of ``k`` triggers: (k·B, C, H, W), class-major."""
    stamped = (1 - mask).unsqueeze(1) * x.unsqueeze(0) + (mask * pattern).unsqueeze(1)
    return stamped.flatten(0, 1)


def random_start(classes: int, shape: tuple[int, int, int], generator: torch.Generator,
                 device: torch.device, rows: list[int] | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """The unsquashed weights of a random mask and pattern per class (of ``rows`` only, drawn
    as among all ``classes``), to optimise."""
    channels, height, width = shape
    start_mask = torch.rand(classes, 1, height, width, generator=generator)
    start_pattern = torch.rand(classes, channels, height, width, generator=generator)
    if rows is not None:
        start_mask, start_pattern = start_mask[rows], start_pattern[rows]
    # The inverse of squash, so that the random start is the mask and pattern in [0, 1].
    mask_w = torch.atanh((start_mask - 0.5) * (2 - EPSILON)).to(device).requires_grad_()
    pattern_w = torch.atanh((start_pattern - 0.5) * (2 - EPSILON)).to(device).requires_grad_()
    return mask_w, pattern_w
