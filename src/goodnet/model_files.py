"""Model files of every kind, read back: a plain model or a GoodNet (``goodnet.load_model``).

The storage layer, :mod:`goodnet.artifacts`, reads and writes the file format (safetensors
weights, the JSON card, the models a file of each ``kind`` holds) and imports no model class
above the architectures: a GoodNet saves itself through the ``Composite`` protocol, and
:func:`goodnet.artifacts.load_parts` returns a file's models without building what they make up.
This module stands above both and builds what the card's kind names: the plain model (a
``Masked`` one where masks were saved beside its weights), or a
:class:`~goodnet.detector.GoodNet` (:meth:`~goodnet.detector.GoodNet.from_file`).
"""

from __future__ import annotations

import os

import torch
from torch import nn

from goodnet.artifacts import LoadedModel, load_parts
from goodnet.detector import GoodNet


def load_model(path: str | os.PathLike[str], device: str | torch.device = "cpu") -> LoadedModel:
    """Rebuild a saved model of any kind from its card and weights; nothing in the file is
    executed, and every tensor is checked before it is read (:func:`goodnet.artifacts.load_parts`).

    Raises:
        GoodnetError: a file that is not a goodnet model file, or one that fails a check (one
            line naming the file).
    """
    parts = load_parts(path)
    if parts.card.kind == "goodnet":
        model: nn.Module = GoodNet.from_file(parts, path)
    else:
        model = parts.models[""]
    model.eval()
    return LoadedModel(model.to(device), parts.card, parts.extras)
