"""Per-channel activation statistics of a named layer, streamed batch by batch.

Nothing of a data set's activations is kept but running sums, so memory does not grow with the
data. The statistic is taken on what the network computes from the layer's output: optionally
after ReLU (``relu=True``: the activation the next layer sees when a ReLU follows, as in the
CSAW-HackML lab, whose Keras convolutions have the ReLU built in) and after any masks installed
on the model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from goodnet.data.dataset import BatchSource, batches
from goodnet.masking import get_layer
from goodnet.models import model_device


@torch.no_grad()
def mean_activation(
    model: nn.Module, layer: str, data: BatchSource, *, relu: bool = True,
    batch_size: int = 512,
) -> torch.Tensor:
    """Mean of each output channel of ``layer`` over the images and spatial positions of
    ``data``, in eval mode (the mode is restored)."""
    try:
        module = model.get_submodule(layer)  # any layer: a pooling layer ranks too
    except AttributeError:
        get_layer(model, layer)  # raises the clear error listing the layers
        raise
    total: torch.Tensor | None = None
    count = 0

    def record(_module: nn.Module, _inputs: tuple, output: torch.Tensor) -> None:
        nonlocal total, count
        values = F.relu(output) if relu else output
        dims = [0, *range(2, values.ndim)]
        batch_sum = values.double().sum(dim=dims).cpu()
        total = batch_sum if total is None else total + batch_sum
        count += values.numel() // values.shape[1]

    was_training = model.training
    handle = module.register_forward_hook(record)
    try:
        model.eval()
        device = model_device(model)
        for x, _ in batches(data, batch_size, device=device):
            model(x)
    finally:
        handle.remove()
        model.train(was_training)
    if total is None:
        return torch.zeros(0)
    return (total / max(count, 1)).float()
