"""Mahalanobis: distance of an input's features to the clean features of the class it is given
(Lee, Lee, Lee & Shin, "A Simple Unified Framework for Detecting Out-of-Distribution Samples
and Adversarial Attacks", NeurIPS 2018, arXiv:1807.03888; reference code pokaxpoka/
deep_Mahalanobis_detector ``lib_generation.py`` ``sample_estimator`` and
``get_Mahalanobis_score``). Used as a backdoor input detector because triggered inputs are
sent to the target class by features that clean images of that class do not have: the
separation that activation clustering (Chen et al., 2018) and spectral signatures (Tran et al.,
NeurIPS 2018) find in poisoned training data, and that Beatrix (Ma et al., NDSS 2023) scores per
class with Gram matrices.

From the clean data the detector takes, at the input of the model's last linear layer (the
penultimate features), the mean of each class and one covariance shared by all classes (the
pooled within-class covariance: ``sample_estimator``). An input's score is its squared
Mahalanobis distance to the mean of the class the model predicts for it. Higher is more
suspicious. One forward pass per input.

Departures, documented:

- **The predicted class's mean**, not the closest class mean: the reference detects inputs far
  from every class (out-of-distribution data); a triggered input is close to being a member of
  the target class in the logits and far from its clean members in the features, so goodnet
  measures it against the class the model gives it.
- **One layer, no input preprocessing.** The reference adds a small gradient step towards the
  closest class (``magnitude``) and combines several layers with a logistic regression fitted
  on out-of-distribution examples; a defender has none (nor poisoned examples), so goodnet scores
  the penultimate layer alone, with no gradient step.
- **Shrinkage.** With a few hundred clean images the pooled covariance of a wide layer is
  singular or nearly so (the reference fits on a whole training set). goodnet shrinks it towards
  a multiple of the identity by the Ledoit-Wolf formula (Ledoit & Wolf, 2004, as
  ``sklearn.covariance.ledoit_wolf_shrinkage``), chosen from the clean data alone; the
  reference uses the empirical covariance (``sklearn.covariance.EmpiricalCovariance``, a
  pseudo-inverse).
- A class with no clean image is measured against the mean of all clean features.

The layer is the model's classifier (the last fully connected layer whose width is the
model's number of outputs) unless ``layer`` names another fully connected layer.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from goodnet.data.dataset import ImageData, batches
from goodnet.detectors.base import Detection, InputDetector
from goodnet.errors import GoodnetError
from goodnet.masking import classifier_layer, get_linear
from goodnet.models import model_device


@dataclass(frozen=True)
class MahalanobisConfig:
    """Settings of the Mahalanobis detector.

    Attributes:
        layer: the fully connected layer whose input is the feature space (default: the
            classifier, the last one as wide as the model's outputs).
    """

    layer: str | None = None

    def __post_init__(self) -> None:
        if self.layer is not None and not self.layer:
            raise GoodnetError("mahalanobis: layer must be a layer's name or null")


class MahalanobisDetection(Detection):
    """The squared Mahalanobis distance of each input's features to its predicted class's
    clean mean."""

    def __init__(self, model: nn.Module, layer: str, means: torch.Tensor,
                 precision: torch.Tensor) -> None:  # means (classes, d), precision (d, d)
        super().__init__(model)
        self.layer = layer
        device = model_device(self.model)
        self.register_buffer("means", means.to(device))
        self.register_buffer("precision", precision.to(device))

    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the layer's input, flattened; the model's logits) for a batch."""
        captured: list[torch.Tensor] = []
        handle = self.model.get_submodule(self.layer).register_forward_hook(
            lambda _module, inputs, _output: captured.append(inputs[0]))
        try:
            logits = self.model(x)
        finally:
            handle.remove()
        if not captured:
            raise GoodnetError(f"mahalanobis: layer {self.layer!r} takes no part in the model's "
                               "forward pass")
        return captured[0].flatten(1), logits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features, logits = self.features(x)
        centred = features - self.get_buffer("means")[logits.argmax(1)]
        return ((centred @ self.get_buffer("precision")) * centred).sum(1)


def ledoit_wolf(centred: torch.Tensor) -> torch.Tensor:
    """The Ledoit-Wolf shrunk covariance of rows ``centred`` (already centred), in float64."""
    x = centred.double()
    n, p = x.shape
    sample = x.T @ x / n
    mu = torch.trace(sample) / p
    squared = x.pow(2)
    beta = (squared.T @ squared).sum() / n - (sample.pow(2)).sum()
    beta = beta / (p * n)
    delta = (sample - mu * torch.eye(p, dtype=x.dtype, device=x.device)).pow(2).sum() / p
    beta = torch.minimum(beta, delta)
    shrinkage = 0.0 if float(delta) == 0 else float(beta / delta)
    return (1 - shrinkage) * sample + shrinkage * mu * torch.eye(p, dtype=x.dtype, device=x.device)


class Mahalanobis(InputDetector[MahalanobisConfig]):
    """Flag inputs whose features lie far from the clean features of their predicted class."""

    name = "mahalanobis"
    paper = "Lee et al., NeurIPS 2018, arXiv:1807.03888"
    Config = MahalanobisConfig
    quick: ClassVar[Mapping[str, Any]] = {}

    @torch.no_grad()
    def fit(self, model: nn.Module, clean: ImageData | None) -> Detection:
        assert clean is not None
        if len(clean) < 2:
            raise GoodnetError("mahalanobis needs at least two clean images")
        detection = MahalanobisDetection(model, "", torch.zeros(0), torch.zeros(0))  # the copy
        device = model_device(detection.model)
        example, _ = clean.get(torch.arange(min(2, len(clean))))
        detection.layer = self.config.layer or classifier_layer(
            detection.model, example.to(device), "mahalanobis", "-p layer=")
        get_linear(detection.model, detection.layer, "mahalanobis")
        feats, labels = [], []
        classes = 0
        for x, y in batches(clean, 256, device=device):
            f, logits = detection.features(x)
            feats.append(f.double().cpu())
            labels.append(y.cpu())
            classes = logits.shape[1]
        features, label = torch.cat(feats), torch.cat(labels)
        if label.min() < 0 or label.max() >= classes:
            raise GoodnetError(f"mahalanobis: clean labels must be classes 0-{classes - 1} of the "
                               f"model's {classes} outputs")
        means = features.mean(0).repeat(classes, 1)  # a class with no clean image: the mean of all
        for c in label.unique().tolist():
            means[c] = features[label == c].mean(0)
        precision = torch.linalg.pinv(ledoit_wolf(features - means[label]), hermitian=True)
        detection.means = means.float().to(device)
        detection.precision = precision.float().to(device)
        return detection

    def restore(self, model: nn.Module, tensors: dict[str, torch.Tensor]) -> Detection:
        means, precision = tensors.get("means"), tensors.get("precision")
        if set(tensors) != {"means", "precision"} or means is None or precision is None or \
                means.ndim != 2 or tuple(precision.shape) != (means.shape[1], means.shape[1]):
            raise GoodnetError(f"mahalanobis: expected means (classes, d) and precision (d, d), "
                               f"got {({k: tuple(v.shape) for k, v in tensors.items()})}")
        classes, width = means.shape
        if self.config.layer is not None:
            layer = get_linear(model, self.config.layer, "mahalanobis")
            name = self.config.layer if layer.in_features == width else None
        else:  # the layer fit chose: the last fully connected one with this input and output
            found = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)
                     and m.in_features == width and m.out_features == classes]
            name = found[-1] if found else None
        if name is None:
            raise GoodnetError(f"mahalanobis: the model has no fully connected layer taking "
                               f"{width} features to match the saved means")
        if not (torch.isfinite(means).all() and torch.isfinite(precision).all()):
            raise GoodnetError("mahalanobis: means and precision must be finite numbers")
        return MahalanobisDetection(model, name, means.float(), precision.float()).eval()
