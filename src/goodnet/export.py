"""Export a goodnet model, a repaired model or a GoodNet to ONNX.

Channel masks are folded into the weights first (:func:`goodnet.masking.bake`, exact for either
semantics), so the exported graph is a plain network. The graph takes ``image``, a float batch
``(N, C, H, W)`` of pixels in [0, 1] (normalisation is inside, as in every goodnet model), and
gives ``scores`` ``(N, classes)``: logits, or for a GoodNet ``N + 1`` scores whose argmax is its
answer. The batch size is dynamic. Uses PyTorch's TorchScript-based exporter, which needs no
package beyond PyTorch; the file is written atomically.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

from goodnet.artifacts import ModelCard, atomic_path
from goodnet.detector import GoodNet
from goodnet.errors import GoodnetError
from goodnet.masking import Masked, bake

OPSET = 17


def exportable(model: nn.Module) -> nn.Module:
    """``model`` with every channel mask folded into its weights (a copy; eval mode)."""
    if isinstance(model, Masked):
        with model.unmasked() as bare:  # bake the weights, not a copy that still has hooks
            return bake(bare, model.masks).eval()
    if isinstance(model, GoodNet):  # detectors hold plain copies of the original: kept as they are
        return GoodNet(exportable(model.original), exportable(model.repaired), model.screened(),
                       disagree=model.disagree).eval()
    return model.eval()


def export_onnx(model: nn.Module, card: ModelCard, path: str | Path) -> Path:
    """Write ``model`` (input shape from ``card``) as an ONNX file at ``path``."""
    path = Path(path)
    plain = exportable(model).cpu()
    example = torch.rand(2, *card.spec.input_shape)
    with atomic_path(path) as temp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(plain, (example,), str(temp), dynamo=False, opset_version=OPSET,
                              input_names=["image"], output_names=["scores"],
                              dynamic_axes={"image": {0: "batch"}, "scores": {0: "batch"}})
        except Exception as error:  # the exporter's own errors, reported in one line
            raise GoodnetError(f"ONNX export failed: {type(error).__name__}: {error}") from None
    return path
