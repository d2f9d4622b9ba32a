"""Channel masks: applied to a named layer's output through hooks, reversible, saved beside the
weights, folded into the weights only on export.

A mask is a vector of per-channel factors in [0, 1] for one layer (a ``Conv2d``, a
``BatchNorm2d``, or a ``Linear`` for neuron masks). Two semantics:

- ``"channel"`` (the sound default): the layer's whole output channel is multiplied by the mask,
  ``y_c · m_c``. Put it on the BatchNorm that follows a convolution (``mask_point`` finds it), so
  BN's shift cannot bring a pruned channel back. A pruned channel outputs 0.
- ``"keep-bias"`` (the references' semantics): only the weight part is masked and the layer's
  bias or BatchNorm shift is kept, ``(y_c − b_c) · m_c + b_c``. On a convolution this is the
  CSAW-HackML lab's pruning (zero the kernel, keep the bias: the channel outputs ReLU(b_c)); on a
  BatchNorm it is RNP's and ANP's (zero the scale γ, keep the shift β: the channel outputs
  ReLU(β_c) for every input). A "pruned" channel then still carries a constant.

A mask set may also hold per-channel **upper bounds** for some layers (MM-BM's activation
bounds, :mod:`goodnet.defenses.mm_bm`): the hook then clamps the layer's output, after its mask,
to ``min(y_c, z_c)``. On a layer a ReLU follows, with ``z_c ≥ 0``, that is the same as bounding
the activation after the ReLU. Bounds are saved beside the masks (``bound/<layer>``); a file
without them loads as before. A clamp is not linear: :func:`bake` refuses a set with bounds.

Masks never modify the caller's model: :func:`masked` returns a copy with hooks installed,
:func:`bake` folds masks into a copy's weights (exactly, for either semantics) for export.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import cast

import torch
from torch import nn

from goodnet.errors import GoodnetError

SEMANTICS = ("channel", "keep-bias")
# The keys under which a mask set's tensors are saved beside the weights (``extra/<prefix>…``).
MASK_PREFIX, BOUND_PREFIX = "mask/", "bound/"
MASKABLE = (nn.Conv2d, nn.BatchNorm2d, nn.Linear)


def channel_count(layer: nn.Module) -> int:
    if isinstance(layer, nn.Conv2d):
        return layer.out_channels
    if isinstance(layer, nn.BatchNorm2d):
        return layer.num_features
    if isinstance(layer, nn.Linear):
        return layer.out_features
    raise GoodnetError(f"cannot mask a {type(layer).__name__}: only Conv2d, BatchNorm2d, Linear")


def get_layer(model: nn.Module, name: str) -> nn.Module:
    """The named layer, or a clear error listing the maskable layers."""
    try:
        layer = model.get_submodule(name)
    except AttributeError:
        options = ", ".join(n for n, m in model.named_modules() if isinstance(m, MASKABLE))
        raise GoodnetError(f"the model has no layer {name!r}; maskable layers: {options}") \
            from None
    channel_count(layer)
    return layer


def get_linear(model: nn.Module, name: str, who: str) -> nn.Linear:
    """The named fully connected layer, or a one-line error naming ``who`` asked."""
    try:
        layer = model.get_submodule(name)
    except AttributeError:
        raise GoodnetError(f"{who}: the model has no layer {name!r}") from None
    if not isinstance(layer, nn.Linear):
        raise GoodnetError(f"{who}: {name!r} is not a fully connected layer")
    return layer


def classifier_layer(model: nn.Module, example: torch.Tensor, who: str, option: str) -> str:
    """The name of the last fully connected layer whose output size is the model's (run on
    ``example``); ``option`` is how the user names another."""
    with torch.no_grad():
        outputs = model.eval()(example).shape[-1]
    heads = [name for name, m in model.named_modules()
             if isinstance(m, nn.Linear) and m.out_features == outputs]
    if not heads:
        raise GoodnetError(f"{who}: no fully connected layer produces the model's outputs; name "
                           f"the classifier layer with {option}")
    return heads[-1]


def _broadcast(vector: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
    return vector.view(1, -1, *([1] * (output.ndim - 2)))


@dataclass(frozen=True)
class MaskSet:
    """Masks for several layers, and how they apply; optionally upper bounds on some layers'
    outputs.

    Attributes:
        masks: layer name → per-channel factors in [0, 1].
        semantics: "channel" or "keep-bias" (see the module docstring).
        bounds: layer name → per-channel upper bounds, applied after the layer's mask (if any)
            as ``min(y_c, z_c)``; empty for a plain mask set. A bounded layer may be any named
            module (a ReLU run once, a residual block), not only a maskable one.
    """

    masks: Mapping[str, torch.Tensor]
    semantics: str = "channel"
    bounds: Mapping[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.semantics not in SEMANTICS:
            raise GoodnetError(f"mask semantics must be one of {SEMANTICS}, got {self.semantics!r}")
        clean = {}
        for name, mask in self.masks.items():
            mask = torch.as_tensor(mask, dtype=torch.float32).detach().flatten()
            if not torch.isfinite(mask).all() or mask.min() < 0 or mask.max() > 1:
                raise GoodnetError(f"mask of {name!r} must hold values in [0, 1]")
            clean[name] = mask
        object.__setattr__(self, "masks", clean)
        bounds = {}
        for name, bound in self.bounds.items():
            bound = torch.as_tensor(bound, dtype=torch.float32).detach().flatten()
            if not torch.isfinite(bound).all():
                raise GoodnetError(f"upper bounds of {name!r} must be finite")
            bounds[name] = bound
        object.__setattr__(self, "bounds", bounds)

    def pruned(self) -> dict[str, list[int]]:
        """Channels whose factor is 0, per layer."""
        return {name: torch.nonzero(m == 0).flatten().tolist() for name, m in self.masks.items()}

    def to_tensors(self) -> dict[str, torch.Tensor]:
        """For saving beside the weights (``mask/<layer>``, ``bound/<layer>``)."""
        return {**{MASK_PREFIX + name: mask for name, mask in self.masks.items()},
                **{BOUND_PREFIX + name: bound for name, bound in self.bounds.items()}}

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor], semantics: str) -> MaskSet:
        def under(prefix: str) -> dict[str, torch.Tensor]:
            return {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}
        return cls(under(MASK_PREFIX), semantics, under(BOUND_PREFIX))


def is_mask_tensor(key: str) -> bool:
    """Whether an extra tensor's key is a mask set's (a mask or an upper bound)."""
    return key.startswith((MASK_PREFIX, BOUND_PREFIX))


def _hook(mask: torch.Tensor | None, semantics: str, layer: nn.Module,
          bound: torch.Tensor | None = None, name: str = ""):
    def apply(_module: nn.Module, _inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        if mask is not None:
            output = _masked_output(output, mask, semantics, layer)
        if bound is not None:
            if output.ndim < 2 or output.shape[1] != len(bound):
                raise GoodnetError(f"upper bounds of {name!r} have {len(bound)} entries, the "
                                   f"layer outputs shape {tuple(output.shape)}")
            output = torch.minimum(output, _broadcast(bound.to(output.device, output.dtype),
                                                      output))
        return output
    return apply


def _masked_output(output: torch.Tensor, mask: torch.Tensor, semantics: str,
                   layer: nn.Module) -> torch.Tensor:
    factor = _broadcast(mask.to(output.device, output.dtype), output)
    if semantics == "keep-bias":
        # conv/linear bias or BN shift β: what "keep-bias" keeps
        shift = cast("torch.Tensor | None", layer.bias)
        if shift is not None:
            shift = _broadcast(shift, output)
            return (output - shift) * factor + shift
    return output * factor


def _bounded_layer(model: nn.Module, name: str) -> nn.Module:
    """A layer that takes upper bounds: any named module (a ReLU run once, a block), its output's
    width checked when it runs."""
    try:
        return model.get_submodule(name)
    except AttributeError:
        return get_layer(model, name)  # raises the clear error listing the layers


def _checked_layer(model: nn.Module, name: str, vector: torch.Tensor, what: str) -> nn.Module:
    layer = get_layer(model, name)
    if channel_count(layer) != len(vector):
        raise GoodnetError(f"{what} of {name!r} has {len(vector)} entries, the layer has "
                           f"{channel_count(layer)} channels")
    return layer


@contextlib.contextmanager
def applied(model: nn.Module, masks: MaskSet) -> Iterator[nn.Module]:
    """Install ``masks`` (and their bounds) on ``model`` for the duration of a ``with`` block,
    then remove them."""
    handles = []
    try:
        for name in [*masks.masks, *(n for n in masks.bounds if n not in masks.masks)]:
            mask, bound = masks.masks.get(name), masks.bounds.get(name)
            layer = _bounded_layer(model, name) if mask is None else get_layer(model, name)
            for vector, what in ((mask, "mask"), (bound, "upper bounds")):
                if vector is not None and isinstance(layer, MASKABLE):
                    _checked_layer(model, name, vector, what)
            handles.append(layer.register_forward_hook(
                _hook(mask, masks.semantics, layer, bound, name)))
        yield model
    finally:
        for handle in handles:
            handle.remove()


class Masked(nn.Module):
    """A copy of a model with masks installed as hooks (the original stays untouched).

    The masks can be read (``.masks``) and replaced (:meth:`set_masks`); ``masked.model`` is the
    underlying copy, whose weights fine-tuning may change while the masks stay fixed.
    """

    def __init__(self, model: nn.Module, masks: MaskSet) -> None:
        super().__init__()
        self.model = copy.deepcopy(model)
        self.masks = masks
        self._stack = contextlib.ExitStack()
        self._stack.enter_context(applied(self.model, masks))

    @contextlib.contextmanager
    def unmasked(self) -> Iterator[nn.Module]:
        """The underlying model with the masks lifted for the duration of a ``with`` block."""
        self._stack.close()
        try:
            yield self.model
        finally:
            self._stack = contextlib.ExitStack()
            self._stack.enter_context(applied(self.model, self.masks))

    def set_masks(self, masks: MaskSet) -> None:
        self._stack.close()
        self._stack = contextlib.ExitStack()
        self._stack.enter_context(applied(self.model, masks))
        self.masks = masks

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def __deepcopy__(self, memo: dict) -> Masked:
        with self.unmasked() as bare:  # copy the weights, not the installed hooks
            return Masked(bare, self.masks)


def masked(model: nn.Module, masks: MaskSet) -> Masked:
    """``model`` (copied) with ``masks`` applied."""
    return Masked(model, masks)


@torch.no_grad()
def bake(model: nn.Module, masks: MaskSet) -> nn.Module:
    """A copy of ``model`` with ``masks`` folded into its weights (for export); exact for both
    semantics: "channel" scales the layer's weight and bias, "keep-bias" its weight only.

    ``model`` must be a plain network, not one with masks installed (for a :class:`Masked`, bake
    ``masked.model`` inside ``masked.unmasked()``); a model with forward hooks is refused."""
    if any(m._forward_hooks for m in model.modules()):
        raise GoodnetError("bake a plain model: this one has hooks (masks?) installed")
    if masks.bounds:
        raise GoodnetError("upper bounds (a clamp) cannot be folded into the weights; save the "
                           "model with its bounds instead")
    baked = copy.deepcopy(model)
    for name, mask in masks.masks.items():
        layer = get_layer(baked, name)
        weight = cast(torch.Tensor, layer.weight)
        bias = cast("torch.Tensor | None", layer.bias)
        factor = mask.to(weight.device, weight.dtype)
        weight.mul_(factor.view(-1, *([1] * (weight.ndim - 1))))
        if masks.semantics == "channel" and bias is not None:
            bias.mul_(factor)
    return baked


def mask_points(model: nn.Module, example: torch.Tensor) -> dict[str, str]:
    """Where to mask each convolution: conv name → the BatchNorm that normalises its output
    (when the next layer run is a BatchNorm of the same width), else the conv itself.

    Found by running ``example`` through the model and recording the order layers execute in,
    so it works for any architecture without naming conventions.
    """
    order: list[tuple[str, nn.Module]] = []
    handles = [m.register_forward_hook(lambda mod, _i, _o, n=n: order.append((n, mod)))
               for n, m in model.named_modules() if isinstance(m, MASKABLE)]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(example)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    points = {}
    for i, (name, module) in enumerate(order):
        if not isinstance(module, nn.Conv2d):
            continue
        following = order[i + 1] if i + 1 < len(order) else None
        if (following is not None and isinstance(following[1], nn.BatchNorm2d)
                and following[1].num_features == module.out_channels):
            points[name] = following[0]
        else:
            points[name] = name
    return points
