"""Saving and loading models safely: safetensors weights plus a JSON card, written atomically.

A goodnet model is one ``.safetensors`` file. Its tensors are the model's ``state_dict`` (and,
under ``extra/``, tensors a defense saves beside the weights, such as channel masks); its header
metadata holds the model card as JSON under the key ``goodnet.card``: the architecture and its
arguments (a :class:`ModelSpec`), the attack description if any, metrics, training settings,
seed and goodnet version. Any safetensors reader can list the tensors and read the card.

Loading never unpickles and never executes anything from the file: the header is parsed as
JSON, the architecture is looked up by name in ``goodnet.MODELS``, and each tensor must match
the shape the architecture expects. Declared sizes are checked against the file before
anything is allocated.

Writing is atomic: the bytes go to a temporary file in the destination folder, are flushed to
disk, and the file is renamed over the destination, so a crash leaves either the previous file
or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import struct
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_bytes
from torch import nn

from goodnet.errors import GoodnetError
from goodnet.models import ModelSpec, build_model
from goodnet.version import __version__

CARD_KEY = "goodnet.card"
FORMAT = "goodnet-model"
FORMAT_VERSION = 1
EXTRA_PREFIX = "extra/"
KINDS = ("model", "goodnet")
GOODNET_PARTS = ("original", "repaired")
MAX_HEADER_BYTES = 100 * 2**20
# Bounds on a spec read from a file, so a hostile card cannot make us allocate a huge network.
MAX_CLASSES = 100_000
MAX_SIDE = 4096
MAX_CHANNELS = 64


@dataclass(frozen=True)
class ModelCard:
    """Everything known about a saved model besides its weights.

    Attributes:
        spec: architecture and input description.
        attack: the attack it was trained with (``Attack.describe()``), or None if clean.
        metrics: figures measured on it (``clean_accuracy``, ``attack_success_rate``, ...).
        training: training settings and timings.
        data: the data it was trained on.
        seed: the seed of the run that produced it.
        goodnet_version: the goodnet version that wrote it.
        notes: anything else a producer wants to record (defense results, provenance).
        kind: "model", or "goodnet" for a detector holding an original and a repaired model.
    """

    spec: ModelSpec
    attack: dict[str, Any] | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    data: str | None = None
    seed: int | None = None
    goodnet_version: str = __version__
    notes: dict[str, Any] = field(default_factory=dict)
    kind: str = "model"

    def to_json(self) -> str:
        body = {"format": FORMAT, "format_version": FORMAT_VERSION, **dataclasses.asdict(self)}
        return json.dumps(body, sort_keys=True, allow_nan=True)

    @classmethod
    def from_json(cls, text: str, source: str = "card") -> ModelCard:
        try:
            body = json.loads(text)
        except json.JSONDecodeError as error:
            raise GoodnetError(f"{source}: the model card is not valid JSON ({error})") from None
        if not isinstance(body, dict) or body.get("format") != FORMAT:
            raise GoodnetError(f"{source}: not a goodnet model card")
        if body.get("format_version") != FORMAT_VERSION:
            raise GoodnetError(
                f"{source}: model card version {body.get('format_version')!r} is not supported "
                f"by goodnet {__version__} (reads version {FORMAT_VERSION})"
            )
        known = {f.name for f in dataclasses.fields(cls)}
        fields = {k: v for k, v in body.items() if k in known}
        spec_fields = {f.name for f in dataclasses.fields(ModelSpec)}
        spec = fields.get("spec")
        if not isinstance(spec, dict) or not set(spec) <= spec_fields or "arch" not in spec:
            raise GoodnetError(f"{source}: the model card's architecture entry is malformed")
        try:
            fields["spec"] = ModelSpec(**spec)
            card = cls(**fields)
        except (TypeError, ValueError) as error:
            raise GoodnetError(f"{source}: malformed model card ({error})") from None
        _check_bounds(card.spec, source)
        if card.kind not in KINDS:
            raise GoodnetError(f"{source}: unknown model kind {card.kind!r}")
        return card


def _check_bounds(spec: ModelSpec, source: str) -> None:
    numbers = (spec.num_classes, spec.in_channels, spec.height, spec.width)
    if not all(isinstance(n, int) for n in numbers):
        raise GoodnetError(f"{source}: the model card's sizes must be integers")
    if (spec.num_classes > MAX_CLASSES or spec.in_channels > MAX_CHANNELS
            or max(spec.height, spec.width) > MAX_SIDE):
        raise GoodnetError(f"{source}: the model card declares an implausibly large model")


class LoadedModel(NamedTuple):
    """A model read from a file, with its card and any extra tensors saved beside it."""

    model: nn.Module
    card: ModelCard
    extras: dict[str, torch.Tensor]


def _umask() -> int:
    """The process's umask (read without changing it where /proc allows)."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success, move it over ``path`` atomically.

    On any failure the temporary file is removed and ``path`` is left as it was. The file ends
    with the permissions the umask gives a new file, as ``open`` would make it.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(handle)
    except OSError as error:
        raise GoodnetError(f"cannot write {path}: {error.strerror or error}") from None
    temp_path = Path(temp)
    try:
        yield temp_path
        with open(temp_path, "rb+") as written:
            os.fsync(written.fileno())
        # mkstemp makes the file private (0600); give it the mode any new file would have.
        os.chmod(temp_path, 0o666 & ~_umask())
        os.replace(temp_path, path)
    except OSError as error:
        raise GoodnetError(f"cannot write {path}: {error.strerror or error}") from None
    finally:
        temp_path.unlink(missing_ok=True)
    with contextlib.suppress(OSError):  # make the rename durable where the platform allows
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)


def check_writable(path: str | os.PathLike[str]) -> None:
    """Fail now, before a long run, if ``path`` cannot be written later."""
    path = Path(path)
    if path.is_dir():
        raise GoodnetError(f"cannot write {path}: it is a folder")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path.parent):
            pass
    except OSError as error:
        raise GoodnetError(f"cannot write {path}: {error.strerror or error}") from None


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as temp:
        temp.write_bytes(data)


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    write_bytes_atomic(path, text.encode("utf-8"))


def save_model(
    path: str | os.PathLike[str],
    model: nn.Module,
    card: ModelCard,
    extras: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write ``model``'s weights, ``card`` and ``extras`` to one safetensors file, atomically.

    A masked model (``goodnet.masking.Masked``) is saved as its unmasked weights plus its masks
    (``extra/mask/<layer>``) and their semantics in the card; a :class:`GoodNet` as both of its
    models (``original.*``, ``repaired.*``).
    """
    from goodnet.detector import GoodNet

    extras = dict(extras or {})
    tensors: dict[str, torch.Tensor] = {}
    if isinstance(model, GoodNet):
        card = dataclasses.replace(card, kind="goodnet")
        parts = {"original": model.original, "repaired": model.repaired}
    else:
        parts = {"": model}
    for prefix, part in parts.items():
        part, masks = _unmask(part)
        if masks is not None:
            extras.update(masks.to_tensors())
            card = dataclasses.replace(card, notes={**card.notes,
                                                    "mask_semantics": masks.semantics})
        for name, tensor in part.state_dict().items():
            key = f"{prefix}.{name}" if prefix else name
            tensors[key] = tensor.detach().cpu().contiguous()
    for name, tensor in extras.items():
        tensors[EXTRA_PREFIX + name] = tensor.detach().cpu().contiguous()
    data = safetensors_bytes(tensors, metadata={CARD_KEY: card.to_json()})
    write_bytes_atomic(path, data)
    return Path(path)


def _unmask(model: nn.Module):
    from goodnet.masking import Masked

    if isinstance(model, Masked):
        return model.model, model.masks
    return model, None


def read_card(path: str | os.PathLike[str]) -> ModelCard:
    """The card of a saved model, without reading its weights."""
    path = Path(path)
    _check_header(path)
    with _open(path) as handle:
        metadata = handle.metadata() or {}
    if CARD_KEY not in metadata:
        raise GoodnetError(f"{path}: a safetensors file without a goodnet model card")
    return ModelCard.from_json(metadata[CARD_KEY], str(path))


def load_model(path: str | os.PathLike[str], device: str | torch.device = "cpu") -> LoadedModel:
    """Rebuild a saved model from its card and weights (nothing in the file is executed).

    Masks saved beside the weights are installed again (a ``Masked`` model comes back); a
    GoodNet file comes back as a :class:`GoodNet`.
    """
    from goodnet.detector import GoodNet
    from goodnet.masking import MaskSet, masked

    path = Path(path)
    card = read_card(path)
    prefixes = GOODNET_PARTS if card.kind == "goodnet" else ("",)
    with _open(path) as handle:
        names = set(handle.keys())
        extras = {name[len(EXTRA_PREFIX):]: handle.get_tensor(name) for name in sorted(names)
                  if name.startswith(EXTRA_PREFIX)}
        weight_names = {n for n in names if not n.startswith(EXTRA_PREFIX)}
        models = {p: _load_weights(handle, path, card, p, weight_names) for p in prefixes}
        unclaimed = weight_names - {n for p in prefixes for n in _claimed(models[p], p)}
        if unclaimed:
            raise GoodnetError(f"{path}: unexpected tensor {sorted(unclaimed)[0]!r} for "
                               f"{card.spec.arch}")
    mask_tensors = {k: v for k, v in extras.items() if k.startswith("mask/")}
    if mask_tensors:
        semantics = card.notes.get("mask_semantics", "channel")
        last = prefixes[-1]
        models[last] = masked(models[last], MaskSet.from_tensors(mask_tensors, semantics))
    if card.kind == "goodnet":
        model: nn.Module = GoodNet(models["original"], models["repaired"])
    else:
        model = models[""]
    model.eval()
    return LoadedModel(model.to(device), card, extras)


def _claimed(model: nn.Module, prefix: str) -> list[str]:
    return [f"{prefix}.{k}" if prefix else k for k in model.state_dict()]


def _load_weights(handle: Any, path: Path, card: ModelCard, prefix: str,
                  names: set[str]) -> nn.Module:
    model = build_model(card.spec)
    expected = model.state_dict()
    state: dict[str, torch.Tensor] = {}
    for name, reference in expected.items():
        key = f"{prefix}.{name}" if prefix else name
        if key not in names:
            raise GoodnetError(f"{path}: weights missing for {card.spec.arch}: {key}")
        shape = tuple(handle.get_slice(key).get_shape())
        if shape != tuple(reference.shape):
            raise GoodnetError(f"{path}: tensor {key!r} has shape {shape}, {card.spec.arch} "
                               f"expects {tuple(reference.shape)}")
        tensor = handle.get_tensor(key)
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise GoodnetError(f"{path}: tensor {key!r} holds NaN or infinite values")
        state[name] = tensor.to(reference.dtype)
    model.load_state_dict(state)
    return model


def _check_header(path: Path) -> None:
    """Refuse a file whose declared header cannot be a genuine safetensors header."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as file:
            prefix = file.read(8)
    except FileNotFoundError:
        raise GoodnetError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise GoodnetError(f"{path}: is a folder, expected a .safetensors model file") from None
    except OSError as error:
        raise GoodnetError(f"{path}: cannot read ({error.strerror or error})") from None
    if len(prefix) < 8:
        raise GoodnetError(f"{path}: too short to be a safetensors model file")
    (header_len,) = struct.unpack("<Q", prefix)
    if header_len > MAX_HEADER_BYTES or header_len + 8 > size:
        raise GoodnetError(
            f"{path}: not a safetensors model file (declared header of {header_len} bytes, "
            f"file of {size})"
        )


@contextlib.contextmanager
def _open(path: Path) -> Iterator[Any]:
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            yield handle
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        detail = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise GoodnetError(f"{path}: corrupt or truncated model file ({detail})") from None
