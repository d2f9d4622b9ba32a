"""PyTorch checkpoints (``.pt``, ``.pth``, ``.ckpt``) read without running what they carry.

A checkpoint is a pickle, and a pickle can name any function to call while it loads (a model
file that runs ``os.system`` when opened is one line of ``__reduce__``). goodnet reads a
checkpoint only through ``torch.load(..., weights_only=True)``, PyTorch's restricted unpickler,
which rebuilds tensors and plain containers and refuses every other global *before* calling it;
goodnet turns that refusal into a one-line error naming the global. Before that:

- only the zip format of PyTorch >= 1.6 is read: its entries' sizes are checked against the
  file (an entry that would inflate past :data:`MAX_BYTES`, or far beyond the file's size, is
  refused before anything is decompressed). The legacy format streams storages of sizes the
  pickle declares, which cannot be bounded before allocation; it is refused with the way out
  (re-save it with ``torch.save``, or convert it to safetensors where you trust it).
- what comes out must be a mapping of names to tensors (a ``state_dict``), possibly wrapped
  as ``{"state_dict": ...}``, ``{"model": ...}`` and the like; DataParallel's ``module.``
  prefixes are stripped. Every tensor must be a dense CPU array of real numbers whose storage
  holds every element it shows (a pickle can view one stored value as a 10⁶×10⁶ matrix), checked
  before any value is read; then its values must be finite
  (:func:`goodnet.artifacts.check_weights`).

:func:`import_checkpoint` loads such a state dict onto a goodnet architecture (the names must
match: goodnet's ``preact_resnet18`` uses BackdoorBench's names) and returns a model with its
card, ready to save as safetensors. A checkpoint of your own network class is read the same way
and loaded by :mod:`goodnet.importers.own_class`.
"""

from __future__ import annotations

import os
import pickle
import re
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch

from goodnet.artifacts import LoadedModel, ModelCard, check_weights
from goodnet.errors import GoodnetError
from goodnet.importers.base import ImportOptions, is_own_class
from goodnet.models import MODELS, ModelSpec, build_model, fixed_archs, is_graph
from goodnet.paths import require_regular_file

MAX_BYTES = 8 * 2**30
_WRAPPERS = ("state_dict", "model_state_dict", "model", "net", "module", "weights")
SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".tar")


def is_checkpoint(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` looks like a PyTorch checkpoint (by name, or by its zip or pickle
    start)."""
    path = Path(path)
    if path.suffix.lower() in (".safetensors", ".h5", ".hdf5", ".npz"):
        return False
    if path.suffix.lower() in SUFFIXES:
        return True
    if not path.is_file():  # a pipe or a device is never opened to sniff it
        return False
    try:
        with open(path, "rb") as handle:
            head = handle.read(4)
    except OSError:
        return False
    return head[:2] == b"\x80\x02" or head == b"PK\x03\x04"


def _check_zip(path: Path) -> None:
    size = path.stat().st_size
    try:
        with zipfile.ZipFile(path) as archive:
            entries = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError) as error:
        raise GoodnetError(f"{path}: not a readable PyTorch checkpoint ({error})") from None
    total = sum(entry.file_size for entry in entries)
    if total > MAX_BYTES or total > 64 * size + 2**20:
        raise GoodnetError(f"{path}: its entries would unpack to {total:,} bytes from a "
                           f"{size:,}-byte file; refused before allocating")
    names = [entry.filename for entry in entries]
    if not any(name.endswith("data.pkl") for name in names):
        raise GoodnetError(f"{path}: a zip file, but not a PyTorch checkpoint (no data.pkl)")
    if any(name.endswith("constants.pkl") or "/code/" in name for name in names):
        raise GoodnetError(f"{path}: a TorchScript archive (it carries code); export the "
                           "state dict with torch.save(model.state_dict(), ...) instead")


def read_checkpoint(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """The state dict in a checkpoint, read with the weights-only unpickler (nothing run)."""
    path = Path(path)
    if tuple(int(part) for part in re.findall(r"\d+", torch.__version__)[:2]) < (2, 10):
        raise GoodnetError(f"{path}: reading PyTorch checkpoints needs torch >= 2.10 (older "
                           "weights-only loaders have known bypasses); this is torch "
                           f"{torch.__version__}")
    require_regular_file(path)
    with open(path, "rb") as handle:
        head = handle.read(4)
    if head != b"PK\x03\x04":
        if head[:1] == b"\x80":
            raise GoodnetError(f"{path}: a legacy (before PyTorch 1.6) checkpoint, whose "
                               "storage sizes cannot be checked before loading; re-save it with "
                               "torch.save (zip format) where you trust it")
        raise GoodnetError(f"{path}: not a PyTorch checkpoint (no zip or pickle header)")
    _check_zip(path)
    try:
        with warnings.catch_warnings():  # torch's deprecation notes are not the user's concern
            warnings.simplefilter("ignore")
            loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        found = re.search(r"(?:GLOBAL|global)\s+([\w.]+)", str(error))
        what = f" names {found.group(1)}, which" if found else ""
        raise GoodnetError(f"{path}: refused: its pickle{what} could run code; only tensors "
                           "and plain containers are loaded (weights_only)") from None
    except (RuntimeError, EOFError, ValueError, KeyError, OSError, zipfile.BadZipFile,
            AttributeError, TypeError, IndexError, UnicodeDecodeError) as error:
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise GoodnetError(f"{path}: a damaged or foreign checkpoint ({first[:200]})") from None
    return state_dict_of(loaded, path)


def state_dict_of(loaded: Any, path: Path) -> dict[str, torch.Tensor]:
    """The name → tensor mapping inside what a checkpoint held."""
    for _ in range(3):  # {"state_dict": {...}}, {"model": {"state_dict": ...}}, ...
        if isinstance(loaded, dict) and not all(isinstance(v, torch.Tensor)
                                                for v in loaded.values()):
            inner = next((loaded[k] for k in _WRAPPERS if isinstance(loaded.get(k), dict)),
                         None)
            if inner is None:
                break
            loaded = inner
    if not isinstance(loaded, dict) or not loaded:
        raise GoodnetError(f"{path}: holds no state dict (a mapping of names to tensors)")
    state = {}
    for name, value in loaded.items():
        if not isinstance(name, str) or not isinstance(value, torch.Tensor):
            raise GoodnetError(f"{path}: entry {name!r} is not a named tensor; expected a "
                               "state dict")
        check_weights(name, value, path)
        state[name.removeprefix("module.")] = value
    return state


def _stored(state: dict[str, torch.Tensor], key: str, default: float, channels: int
            ) -> tuple[float, ...]:
    """The per-channel values a checkpoint stores under ``key`` (a goodnet model's own
    normalisation), or ``default`` for each channel when it stores none."""
    if key not in state:
        return (default,) * channels
    values = state[key].detach().flatten()
    if len(values) != channels or not torch.isfinite(values.double()).all():
        raise GoodnetError(f"{key} holds {len(values)} values; the input has {channels} "
                           "channels (give --mean and --std)")
    return tuple(float(v) for v in values.tolist())


def import_checkpoint(path: str | os.PathLike[str], *, arch: str,
                      input_shape: tuple[int, int, int] | None = None,
                      mean: tuple[float, ...] | None = None, std: tuple[float, ...] | None = None,
                      pixel_scale: float = 1.0) -> LoadedModel:
    """A PyTorch state dict as a goodnet model of architecture ``arch``.

    The classes come from the last 2-D weight, the channels from the first 4-D one;
    ``input_shape`` (default: those channels at 32×32, 28×28 for one channel) and the input
    normalisation (``mean``/``std`` in pixel units after ``pixel_scale``; default: the
    ``normalize.mean``/``normalize.std`` a goodnet model's own state dict carries, else 0/1: the
    network takes [0, 1] pixels) describe what the network was trained on.
    """
    path = Path(path)
    if arch not in MODELS or is_graph(arch):
        raise GoodnetError(f"unknown architecture {arch!r} for a checkpoint; choose from "
                           f"{sorted(fixed_archs())}")
    state = read_checkpoint(path)
    convs = [v for v in state.values() if v.ndim == 4]
    linears = [v for v in state.values() if v.ndim == 2]
    if not convs or not linears:
        raise GoodnetError(f"{path}: no convolution and linear weights to load")
    channels = int(convs[0].shape[1])
    c, h, w = input_shape or ((channels, 28, 28) if channels == 1 else (channels, 32, 32))
    mean = tuple(mean) if mean is not None else _stored(state, "normalize.mean", 0.0, c)
    std = tuple(std) if std is not None else _stored(state, "normalize.std", 1.0, c)
    if len(mean) != c or len(std) != c or any(s <= 0 for s in std):
        raise GoodnetError(f"mean and std need {c} values each (std > 0)")
    spec = ModelSpec(arch, int(linears[-1].shape[0]), c, h, w, mean, std, pixel_scale)
    own = build_model(spec, device="meta").state_dict()  # the shapes, nothing allocated
    normalize = ("normalize.mean", "normalize.std")
    missing = [k for k in own if k not in state and k not in normalize]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        detail = (f"missing {', '.join(missing[:3])}" if missing else "") + \
            ("; " if missing and unexpected else "") + \
            (f"unexpected {', '.join(unexpected[:3])}" if unexpected else "")
        raise GoodnetError(f"{path}: does not fit {arch} ({detail})")
    for key, value in own.items():
        if key in state and state[key].shape != value.shape:
            raise GoodnetError(f"{path}: {key} has shape {tuple(state[key].shape)}, {arch} "
                               f"needs {tuple(value.shape)}")
    model = build_model(spec)
    for key in normalize:  # the spec's normalisation, the stored one unless --mean/--std said
        state[key] = model.state_dict()[key]
    model.load_state_dict(state)
    model.eval()
    card = ModelCard(spec=spec, notes={"source": {"file": path.name, "format": "pytorch"}})
    return LoadedModel(model, card, {})


def takes(options: ImportOptions) -> bool:
    """Checkpoints load onto a goodnet architecture unless ``arch`` names your own class."""
    return not is_own_class(options.arch)


def load(path: Path, options: ImportOptions) -> LoadedModel:
    """A checkpoint onto the goodnet architecture ``options.arch`` names (which it needs: a
    checkpoint holds weights only)."""
    if options.arch is None:
        raise GoodnetError(f"{path}: a PyTorch checkpoint holds weights only; name the "
                           f"architecture to load it onto with --arch "
                           f"({', '.join(fixed_archs())}, or your own package.module:Class)")
    return import_checkpoint(path, arch=options.arch, input_shape=options.input_shape,
                             mean=options.mean, std=options.std,
                             pixel_scale=options.scale(1.0))
