"""Networks of your own PyTorch class, named on the command line.

``goodnet import model.pt --arch mypkg.nets:MyNet``: the class named on the command line is
imported from the user's installed code (never a name from a file: importing runs the module),
instantiated with the keyword arguments given with ``--arch-arg KEY=VALUE`` (Python literals,
read with :func:`ast.literal_eval`, never run as code; none by default), given the weights-only
checkpoint (read as :mod:`goodnet.importers.checkpoint` reads any), and traced through PyTorch's
ONNX exporter into goodnet's layer graph (architecture ``graph``), converted as an ONNX file is
(:mod:`goodnet.importers.onnx`). The saved model reloads without the class, and its card
records the class and its arguments. The converted network must give the class's outputs
(checked on random inputs).
"""

from __future__ import annotations

import ast
import io
import keyword
import math
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import torch

from goodnet.artifacts import LoadedModel, ModelCard
from goodnet.errors import GoodnetError
from goodnet.importers.base import ImportOptions, is_own_class
from goodnet.importers.checkpoint import read_checkpoint
from goodnet.importers.onnx import OPSET, PIXEL_SCALE, convert_onnx, parse_onnx
from goodnet.models import Normalize, load_class


def class_args_from_text(pairs: Sequence[str]) -> dict[str, Any]:
    """``["KEY=VALUE", ...]`` (the command line's ``--arch-arg``) as constructor keyword
    arguments: each value a Python literal read by :func:`ast.literal_eval` (numbers, strings,
    booleans, None, and tuples, lists and dicts of them), never evaluated as code."""
    args: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        key = key.strip()
        if not sep:
            raise GoodnetError(f"--arch-arg {pair!r:.60} is not of the form KEY=VALUE")
        if key in args:
            raise GoodnetError(f"--arch-arg {key} is given twice")
        try:
            args[key] = ast.literal_eval(raw.strip())
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
            raise GoodnetError(f"--arch-arg {key[:60]}: {raw.strip()!r:.60} is not a Python "
                               "literal (a number, a quoted string, True/False, None, or a "
                               "list or tuple of them); it is never run as code") from None
    check_class_args(args)
    return args


def check_class_args(args: Mapping[str, Any]) -> dict[str, Any]:
    """``args`` checked as keyword arguments a model card can record: identifier keys, values
    that JSON holds (tuples become lists). Returns the JSON form."""
    def jsonable(value: Any, key: str) -> Any:
        if value is None or isinstance(value, bool | int | str):
            return value
        if isinstance(value, float) and math.isfinite(value):
            return value
        if isinstance(value, list | tuple):
            return [jsonable(v, key) for v in value]
        if isinstance(value, dict) and all(isinstance(k, str) for k in value):
            return {k: jsonable(v, key) for k, v in value.items()}
        raise GoodnetError(f"--arch-arg {key}: {type(value).__name__} values are not supported "
                           "(numbers, strings, booleans, None, lists, tuples)")

    out: dict[str, Any] = {}
    for key, value in args.items():
        if not isinstance(key, str) or not key.isidentifier() or keyword.iskeyword(key):
            raise GoodnetError(f"--arch-arg {key!r:.60}: the name must be a Python identifier")
        out[key] = jsonable(value, key)
    return out


def import_own_class(path: str | os.PathLike[str], *, arch: str,
                     class_args: Mapping[str, Any] | None = None,
                     input_shape: tuple[int, int, int] | None = None,
                     mean: tuple[float, ...] | None = None, std: tuple[float, ...] | None = None,
                     pixel_scale: float = PIXEL_SCALE) -> LoadedModel:
    """A checkpoint of the user's own network class ``arch`` (``package.module:Class``).

    The class is imported from the user's installed code and instantiated with the keyword
    arguments ``class_args`` (none by default; values that JSON holds, recorded in the card);
    the weights-only checkpoint is loaded into it, and it is traced into goodnet's layer graph
    (through PyTorch's ONNX exporter), so the saved model reloads without the class. The
    converted network must give the class's own outputs.
    """
    path = Path(path)
    class_args = dict(class_args or {})
    recorded = check_class_args(class_args)
    cls = load_class(arch)
    state = read_checkpoint(path)
    network = _instantiate(cls, arch, class_args, state, path)
    convs = [v for v in state.values() if v.ndim == 4]
    channels = int(convs[0].shape[1]) if convs else 3
    shape = input_shape or ((channels, 28, 28) if channels == 1 else (channels, 32, 32))
    loaded = convert_onnx(parse_onnx(_trace(network, arch, shape), f"{arch} (traced)"),
                          f"{arch} (traced)", pixel_scale=pixel_scale, mean=mean, std=std,
                          input_shape=shape)
    _check_outputs(network, loaded, arch, shape)
    card = ModelCard(spec=loaded.card.spec, notes={
        "source": {"file": path.name, "format": "pytorch", "class": arch,
                   "class_args": recorded,
                   "import_notes": [f"{arch} traced into goodnet's layer graph; the class is not "
                                    "needed to load this file",
                                    *loaded.card.notes["source"]["import_notes"]]}})
    return LoadedModel(loaded.model, card, {})


def _instantiate(cls: type[torch.nn.Module], arch: str, class_args: dict[str, Any],
                 state: dict[str, torch.Tensor], path: Path) -> torch.nn.Module:
    """The user's class built with ``class_args``, the checkpoint ``state`` loaded, in eval
    mode; what goes wrong in the user's code is reported in one line."""
    try:
        network = cls(**class_args)
    except Exception as error:  # the user's own constructor: report it in one line
        call = ", ".join(f"{k}={v!r}" for k, v in class_args.items())
        raise GoodnetError(f"{arch}({call}): {type(error).__name__}: {error}"[:300]) from None
    if not isinstance(network, torch.nn.Module):
        raise GoodnetError(f"{arch} is not a torch.nn.Module")
    try:
        network.load_state_dict(state)
    except RuntimeError as error:
        first = " ".join(str(error).split())[:300]
        raise GoodnetError(f"{path}: does not fit {arch} ({first})") from None
    network.eval()
    return network


def _trace(network: torch.nn.Module, arch: str, shape: tuple[int, int, int]) -> bytes:
    """The network traced on a ``shape`` input by PyTorch's ONNX exporter: the ONNX bytes."""
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            # a file object is accepted, though torch's stubs name only paths
            torch.onnx.export(network, (torch.zeros(1, *shape),), buffer,  # type: ignore[arg-type]
                              dynamo=False, opset_version=OPSET, input_names=["image"],
                              output_names=["scores"])
        except Exception as error:  # the user's own forward, or what the tracer refuses in it
            first = (str(error).splitlines() or [""])[0][:200]
            raise GoodnetError(f"{arch}: cannot be traced on a {shape} input "
                               f"({type(error).__name__}: {first})") from None
    return buffer.getvalue()


def _check_outputs(network: torch.nn.Module, loaded: LoadedModel, arch: str,
                   shape: tuple[int, int, int]) -> None:
    """Refuse the converted graph unless it gives the class's own outputs on random inputs."""
    x = torch.rand(4, *shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = network(cast(Normalize, loaded.model.normalize)(x))
        got = loaded.model(x)
    if not isinstance(expected, torch.Tensor) or expected.shape != got.shape or \
            not torch.allclose(got, expected, rtol=1e-4,
                               atol=(1e-4 * (1 + expected.abs().max())).item()):
        raise GoodnetError(f"{arch}: its traced graph does not reproduce its outputs (it may "
                           "branch on its input); not imported")


def takes(options: ImportOptions) -> bool:
    """A checkpoint goes into your own class when ``arch`` names one."""
    return is_own_class(options.arch)


def load(path: Path, options: ImportOptions) -> LoadedModel:
    """A checkpoint of the class ``options.arch`` names, built with ``options.arch_args``."""
    if options.arch is None:
        raise GoodnetError(f"{path}: name your network class with --arch package.module:Class")
    return import_own_class(path, arch=options.arch, class_args=options.arch_args,
                            input_shape=options.input_shape, mean=options.mean,
                            std=options.std, pixel_scale=options.scale(PIXEL_SCALE))
