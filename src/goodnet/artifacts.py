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

A file holds one model, or several under the prefixes its card's ``kind`` names (:data:`PARTS`:
a GoodNet file holds ``original.*`` and ``repaired.*``). This module is the storage layer and
imports no model class above the architectures: a model of several parts saves itself through
the :class:`Composite` protocol (``file_parts``), and :func:`load_parts` returns a file's parts
without building what they make up. :func:`load_model` here reads plain model files;
``goodnet.load_model`` (:mod:`goodnet.model_files`, above this module and the GoodNet) reads
files of every kind.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import struct
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Protocol, runtime_checkable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_bytes
from torch import nn

from goodnet.errors import GoodnetError
from goodnet.models import ModelSpec, build_model
from goodnet.paths import require_regular_file, require_writable_target
from goodnet.version import __version__

CARD_KEY = "goodnet.card"
FORMAT = "goodnet-model"
FORMAT_VERSION = 1
EXTRA_PREFIX = "extra/"
# What a file of each kind holds: its models' prefixes ("": a plain model's names as they are).
PARTS: dict[str, tuple[str, ...]] = {"model": ("",), "goodnet": ("original", "repaired")}
KINDS = tuple(PARTS)
MAX_HEADER_BYTES = 100 * 2**20
# How deeply a card's JSON may nest: goodnet's own cards nest about 5 levels (notes of a
# repair); a bound keeps every later walk of the card (printing, saving it again) shallow.
MAX_CARD_DEPTH = 32


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
        """A card from its JSON, every field checked for its type (nothing else is trusted).

        NaN and infinities are refused everywhere but in ``metrics``, where NaN records a
        figure that is not defined (no poisoned inputs, say).
        """
        try:
            body = json.loads(text)
        except json.JSONDecodeError as error:
            raise GoodnetError(f"{source}: the model card is not valid JSON ({error})") from None
        except RecursionError:
            raise GoodnetError(f"{source}: the model card nests too deep to read") from None
        if not isinstance(body, dict) or body.get("format") != FORMAT:
            raise GoodnetError(f"{source}: not a goodnet model card")
        version = body.get("format_version")
        if not isinstance(version, int) or isinstance(version, bool) or \
                version != FORMAT_VERSION:
            raise GoodnetError(
                f"{source}: model card version {version!r:.40} is not supported "
                f"by goodnet {__version__} (reads version {FORMAT_VERSION})"
            )
        _check_json(body, source)
        known = {f.name for f in dataclasses.fields(cls)}
        fields = {k: v for k, v in body.items() if k in known}
        spec_fields = {f.name for f in dataclasses.fields(ModelSpec)}
        spec = fields.get("spec")
        if not isinstance(spec, dict) or not set(spec) <= spec_fields or "arch" not in spec:
            raise GoodnetError(f"{source}: the model card's architecture entry is malformed")
        _check_card_fields(fields, source)
        try:
            fields["spec"] = ModelSpec(**spec)
        except GoodnetError as error:
            raise GoodnetError(f"{source}: {error}") from None
        return cls(**fields)


# The type of each card field besides ``spec`` (checked by _check_card_fields).
_OPTIONAL_STRINGS = ("data",)
_MAPPINGS = ("metrics", "training", "notes")


def _check_json(body: Any, source: str) -> None:
    """Refuse nesting past MAX_CARD_DEPTH and non-finite numbers outside ``metrics``."""
    stack: list[tuple[Any, tuple[str, ...]]] = [(body, ())]
    while stack:
        value, where = stack.pop()
        if len(where) > MAX_CARD_DEPTH:
            raise GoodnetError(f"{source}: the model card nests deeper than {MAX_CARD_DEPTH} "
                               "levels")
        if isinstance(value, float) and not math.isfinite(value) and not (
                where[:1] == ("metrics",) and math.isnan(value)):
            raise GoodnetError(f"{source}: the model card's {'.'.join(where)[:80]} is {value}, "
                               "not a finite number")
        if isinstance(value, dict):
            stack.extend((v, (*where, str(k))) for k, v in value.items())
        elif isinstance(value, list):
            stack.extend((v, (*where, str(i))) for i, v in enumerate(value))


def _is_figure(value: Any) -> bool:
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))


def _check_card_fields(fields: dict[str, Any], source: str) -> None:
    """Every field of a card read from a file has the type the card declares."""

    def refuse(name: str, expected: str) -> None:
        raise GoodnetError(f"{source}: the model card's {name} must be {expected}, got "
                           f"{fields[name]!r:.60}")

    for name in _MAPPINGS:
        if name in fields and not isinstance(fields[name], dict):
            refuse(name, "a JSON object")
    for name, value in fields.get("metrics", {}).items():
        figures = value.values() if isinstance(value, dict) else [value]  # per_trigger: a dict
        if not all(_is_figure(figure) for figure in figures):
            raise GoodnetError(f"{source}: the model card's metrics must be numbers, "
                               f"{name!r:.40} is {value!r:.40}")
    for name in _OPTIONAL_STRINGS:
        if fields.get(name) is not None and not isinstance(fields[name], str):
            refuse(name, "a string")
    seed = fields.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        refuse("seed", "an integer")
    if "goodnet_version" in fields and not isinstance(fields["goodnet_version"], str):
        refuse("goodnet_version", "a string")
    if "kind" in fields and (not isinstance(fields["kind"], str) or fields["kind"] not in KINDS):
        refuse("kind", f"one of {KINDS}")
    attack = fields.get("attack")
    if attack is not None and not (
            isinstance(attack, dict) and isinstance(attack.get("name"), str)
            and isinstance(attack.get("config", {}), (dict, type(None)))):
        refuse("attack", 'null or {"name": <string>, "config": <object>}')


class LoadedModel(NamedTuple):
    """A model read from a file, with its card and any extra tensors saved beside it."""

    model: nn.Module
    card: ModelCard
    extras: dict[str, torch.Tensor]


class LoadedParts(NamedTuple):
    """What a file holds, before anything is built from it (:func:`load_parts`).

    Attributes:
        models: each model by its prefix (:data:`PARTS` of the card's kind), on the CPU.
        card: the model card.
        extras: the extra tensors saved beside the weights, under their names less ``extra/``.
    """

    models: dict[str, nn.Module]
    card: ModelCard
    extras: dict[str, torch.Tensor]


class FileParts(NamedTuple):
    """What a model of several parts saves (:class:`Composite`).

    Attributes:
        kind: the card's kind (a key of :data:`PARTS`).
        models: its models, by the prefixes of that kind.
        extras: tensors it saves beside the weights (under ``extra/``).
        notes: entries it adds to the card's notes.
    """

    kind: str
    models: dict[str, nn.Module]
    extras: dict[str, torch.Tensor]
    notes: dict[str, Any]


@runtime_checkable
class Composite(Protocol):
    """A model saved as several models in one file (a GoodNet, :mod:`goodnet.detector`): the
    storage layer saves it through this method, without importing its class."""

    def file_parts(self) -> FileParts:
        """Its kind, its models by prefix, the tensors and the card notes it saves."""
        ...


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
    path = require_writable_target(path)
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
        require_writable_target(path)  # still no device or pipe, just before the rename
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
    """Fail now, before a long run, if ``path`` cannot be written later (it must be a new path
    or a regular file: a device or a pipe is never replaced)."""
    path = require_writable_target(path)
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
    (``extra/mask/<layer>``, and any upper bounds, ``extra/bound/<layer>``) and their semantics
    in the card; a model of several parts (a
    :class:`Composite`: a GoodNet, :meth:`goodnet.detector.GoodNet.file_parts`) as each of its
    models under its prefix, with its kind and notes in the card and its extra tensors.
    """
    extras = dict(extras or {})
    tensors: dict[str, torch.Tensor] = {}
    if isinstance(model, Composite):
        saved = model.file_parts()
        if PARTS.get(saved.kind) != tuple(saved.models):
            raise ValueError(f"a {saved.kind!r} file holds the parts {PARTS.get(saved.kind)}, "
                             f"not {tuple(saved.models)}")
        card = dataclasses.replace(card, kind=saved.kind, notes={**card.notes, **saved.notes})
        parts = saved.models
        extras.update(saved.extras)
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


def load_parts(path: str | os.PathLike[str]) -> LoadedParts:
    """The models a saved file holds, rebuilt from its card and weights, with the card and the
    extra tensors (nothing in the file is executed); on the CPU, in evaluation mode.

    The architecture is first built on the meta device (no memory): every tensor of the file
    must have the shape it expects before the model is built and any weight is read, so the
    memory a file costs is bounded by its size. Masks saved beside the weights are installed
    again on the last part (a ``Masked`` model comes back).
    """
    from goodnet.masking import MaskSet, is_mask_tensor, masked

    path = Path(path)
    card = read_card(path)
    prefixes = PARTS[card.kind]
    expected = {name: tuple(tensor.shape) for name, tensor
                in build_model(card.spec, device="meta").state_dict().items()}
    with _open(path) as handle:
        names = set(handle.keys())
        for prefix in prefixes:
            _check_shapes(handle, path, card, prefix, expected, names)
        claimed = {_key(prefix, name) for prefix in prefixes for name in expected}
        unclaimed = {n for n in names if not n.startswith(EXTRA_PREFIX)} - claimed
        if unclaimed:
            raise GoodnetError(f"{path}: unexpected tensor {sorted(unclaimed)[0]!r} for "
                               f"{card.spec.arch}")
        extras = {name[len(EXTRA_PREFIX):]: _read(handle, name, path) for name in sorted(names)
                  if name.startswith(EXTRA_PREFIX)}
        models = {p: _load_weights(handle, path, card, p) for p in prefixes}
    mask_tensors = {k: v for k, v in extras.items() if is_mask_tensor(k)}
    for name, mask in mask_tensors.items():
        if mask.ndim != 1 or not mask.numel():
            raise GoodnetError(f"{path}: {name!r} must be a non-empty vector, got shape "
                               f"{tuple(mask.shape)}")
    if mask_tensors:
        semantics = card.notes.get("mask_semantics", "channel")
        last = prefixes[-1]
        models[last] = masked(models[last], MaskSet.from_tensors(mask_tensors, semantics))
    for model in models.values():
        model.eval()
    return LoadedParts(models, card, extras)


def load_model(path: str | os.PathLike[str], device: str | torch.device = "cpu") -> LoadedModel:
    """Rebuild a saved plain model (a ``Masked`` one where masks were saved beside its weights)
    from its card and weights, checked as :func:`load_parts` checks them.

    Raises:
        GoodnetError: for a GoodNet file too, which ``goodnet.load_model`` reads (this layer
            builds no GoodNet), and for any file it refuses.
    """
    parts = load_parts(path)
    if parts.card.kind != "model":
        raise GoodnetError(f"{path}: a {parts.card.kind} file (several models); read it with "
                           "goodnet.load_model")
    return LoadedModel(parts.models[""].to(device), parts.card, parts.extras)


def _key(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _check_shapes(handle: Any, path: Path, card: ModelCard, prefix: str,
                  expected: dict[str, tuple[int, ...]], names: set[str]) -> None:
    """Every tensor the architecture needs is in the file with its shape (nothing read)."""
    for name, shape in expected.items():
        key = _key(prefix, name)
        if key not in names:
            raise GoodnetError(f"{path}: weights missing for {card.spec.arch}: {key}")
        found = tuple(handle.get_slice(key).get_shape())
        if found != shape:
            raise GoodnetError(f"{path}: tensor {key!r} has shape {found}, {card.spec.arch} "
                               f"expects {shape}")


def _read(handle: Any, key: str, path: Path) -> torch.Tensor:
    tensor = handle.get_tensor(key)
    check_weights(key, tensor, path)
    return tensor


def _load_weights(handle: Any, path: Path, card: ModelCard, prefix: str) -> nn.Module:
    model = build_model(card.spec)
    state = {name: _read(handle, _key(prefix, name), path).to(reference.dtype)
             for name, reference in model.state_dict().items()}
    for name in ("normalize.mean", "normalize.std"):  # built from the card: they must agree
        if name in state and not torch.allclose(state[name], model.state_dict()[name]):
            raise GoodnetError(f"{path}: the stored input normalisation {name!r} disagrees "
                               "with the model card's mean and std")
    model.load_state_dict(state)
    return model


# Element types a weight may have; anything else (complex, quantized, float8, unsigned wider
# than a byte) is refused rather than converted.
WEIGHT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.uint8,
                 torch.int8, torch.int16, torch.int32, torch.int64, torch.bool)


def check_weights(name: str, tensor: torch.Tensor, source: object) -> None:
    """Refuse a tensor that is not a dense CPU array of real numbers holding every value it
    shows, or that holds NaN or infinities; its values are read only after the layout checks.

    A pickled checkpoint can view one stored float as a 10⁶×10⁶ matrix (zero strides): any
    computation over it would allocate terabytes, so a storage smaller than the element count
    is refused first.

    Raises:
        GoodnetError: naming ``source`` and the tensor ``name``.
    """
    where = f"{source}: tensor {name!r}"
    if tensor.layout != torch.strided:
        raise GoodnetError(f"{where} is sparse ({tensor.layout}); only dense weights are read")
    if tensor.is_quantized:
        raise GoodnetError(f"{where} is quantized ({tensor.dtype}); only float weights are read")
    if tensor.device.type != "cpu":
        raise GoodnetError(f"{where} is on the {tensor.device.type} device and holds no values")
    if tensor.is_complex():
        raise GoodnetError(f"{where} is complex ({tensor.dtype}); weights are real numbers")
    if tensor.dtype not in WEIGHT_DTYPES:
        raise GoodnetError(f"{where} has element type {tensor.dtype}, which goodnet does not "
                           "read")
    if tensor.numel():
        span = tensor.storage_offset() + 1 + sum(
            (size - 1) * stride for size, stride in zip(tensor.shape, tensor.stride(), strict=True))
        stored = tensor.untyped_storage().nbytes() // tensor.element_size()
        if stored < max(span, tensor.numel()):
            raise GoodnetError(f"{where} shows {tensor.numel():,} values from a storage of "
                               f"{stored:,}; refused before reading it")
    if tensor.is_floating_point() and not torch.isfinite(tensor).all():
        raise GoodnetError(f"{where} holds NaN or infinite values")


def _check_header(path: Path) -> None:
    """Refuse a file whose declared header cannot be a genuine safetensors header."""
    require_regular_file(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as file:
            prefix = file.read(8)
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
