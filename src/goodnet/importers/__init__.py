"""Model files of other formats, imported as goodnet models: the ``IMPORTERS`` registry.

One module per format, each with a cheap ``sniff`` (the file's name or first bytes) and a
``load`` that reads the file as data, never running anything it carries (SECURITY.md):

- ``keras``: Keras ``.h5``, a full model, or weights only onto a goodnet architecture;
- ``onnx``: an ONNX image classifier;
- ``checkpoint``: a PyTorch weights-only checkpoint onto a goodnet architecture;
- ``own_class``: a checkpoint of your own network class (``--arch package.module:Class``),
  the one importer that runs code: yours, never the file's.

Full Keras models, ONNX graphs and your own class become goodnet's layer-graph architecture,
``graph``. :func:`import_model` picks the first importer whose ``sniff`` knows the file and
that ``takes`` the options (a checkpoint goes to ``own_class`` when ``arch`` names a class);
:class:`ImportOptions` holds what the file does not say (``--arch``, ``--input-shape``, ...).
Adding a format is one module and one line here.

The hostile-file-safe HDF5 reader the Keras importer goes through stays at :mod:`goodnet.hdf5`:
the data layer reads the CSAW-HackML data files through it too, and stands below the importers.
"""

from __future__ import annotations

import os

from goodnet.artifacts import LoadedModel, ModelCard
from goodnet.errors import GoodnetError
from goodnet.importers import checkpoint, keras, onnx, own_class
from goodnet.importers.base import Importer, ImportOptions
from goodnet.models import is_graph
from goodnet.paths import require_regular_file

IMPORTERS: dict[str, Importer] = {
    "keras": Importer(keras.is_hdf5, keras.load),
    "onnx": Importer(onnx.is_onnx, onnx.load),
    "checkpoint": Importer(checkpoint.is_checkpoint, checkpoint.load, checkpoint.takes),
    "own_class": Importer(checkpoint.is_checkpoint, own_class.load, own_class.takes),
}

__all__ = ["IMPORTERS", "ImportOptions", "Importer", "find_importer", "import_model",
           "imported_as", "is_foreign"]


def find_importer(path: str | os.PathLike[str], options: ImportOptions | None = None
                  ) -> str | None:
    """The name of the importer that reads ``path`` with ``options``: the first whose ``sniff``
    knows the file and that takes the options; None for a file of no format here (a goodnet
    model file, say)."""
    options = options or ImportOptions()
    return next((name for name, importer in IMPORTERS.items()
                 if importer.sniff(path) and importer.takes(options)), None)


def is_foreign(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a model file of a format goodnet imports (and so not its own)."""
    return any(importer.sniff(path) for importer in IMPORTERS.values())


def import_model(path: str | os.PathLike[str], options: ImportOptions | None = None
                 ) -> LoadedModel:
    """The model file ``path``, of any format in :data:`IMPORTERS`, as a goodnet model with its
    card (``goodnet.save_model`` writes it as a goodnet file).

    Raises:
        GoodnetError: ``path`` is not a regular file, no importer knows it, or its importer
            refuses it (one line naming the file and the reason).
    """
    options = options or ImportOptions()
    path = require_regular_file(path)  # a pipe or a device would block or read without end
    name = find_importer(path, options)
    if name is None:
        raise GoodnetError(f"{path}: not a model file of a format goodnet imports "
                           f"({', '.join(IMPORTERS)})")
    return IMPORTERS[name].load(path, options)


def imported_as(card: ModelCard) -> str:
    """What an imported model is, in words: the architecture its weights loaded onto, or for a
    layer graph, where the graph came from (a traced class, an ONNX file, a Keras file)."""
    source = card.notes.get("source", {})
    if source.get("class"):
        return f"a traced PyTorch network ({source['class']})"
    if source.get("format") == "onnx":
        return "an ONNX graph"
    if is_graph(card.spec.arch):
        return "a Keras graph"
    return card.spec.arch
