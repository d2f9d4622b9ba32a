"""Reading HDF5 files that may be hostile: nothing outside the file, nothing it does not store.

Every HDF5 reader in goodnet (Keras models and weights, the CSAW-HackML data) opens files
through :func:`open_hdf5` and reads datasets through :func:`read`.

**Nothing outside the file.** HDF5 lets a file point elsewhere: a dataset's bytes may live in
another file named by path (external storage), a virtual dataset maps datasets of other files,
an external link names an object in another file, and a soft link names one by path. h5py
follows them all when reading, so a model file could copy ``/etc/passwd`` or
``/proc/self/environ`` into the model goodnet writes. When it opens a file, :func:`open_hdf5`
walks its whole tree, before any dataset is read, and refuses the file if any link is not a hard
link, any dataset is external or virtual, or any dataset uses a filter other than deflate,
shuffle and Fletcher-32 (HDF5 would look for any other filter as a plugin library).

**Nothing it does not store.** A dataset may declare far more than the file holds: a chunked
dataset that was never written stores nothing and reads as its fill value. :func:`read` refuses
a dataset whose declared size exceeds what the file stores for it: all of it when it is not
compressed; at most :data:`MAX_DEFLATE_RATIO` times its compressed size (deflate's largest
possible expansion) when it is, so that no genuine file is refused and a file of a few kilobytes
never makes goodnet allocate more than a few megabytes. Datasets must therefore be written in
full: a partly written uncompressed dataset is refused.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from goodnet.errors import GoodnetError
from goodnet.paths import require_regular_file

SIGNATURE = b"\x89HDF\r\n\x1a\n"
MAX_FILE_BYTES = 4 * 1024**3
MAX_OBJECTS = 100_000
# deflate cannot expand its input more than 1032-fold (RFC 1951: at most 258 bytes out of two
# bits in); zeros compressed with gzip level 9 reach about 1030.
MAX_DEFLATE_RATIO = 1032
# A chunk is decompressed whole; one larger than its dataset must still be small.
MAX_SPARE_CHUNK_BYTES = 2**20
FILTERS = {h5py.h5z.FILTER_DEFLATE: "deflate", h5py.h5z.FILTER_SHUFFLE: "shuffle",
           h5py.h5z.FILTER_FLETCHER32: "fletcher32"}
# What h5py and HDF5 raise on a damaged file.
H5_ERRORS = (OSError, KeyError, ValueError, TypeError, RuntimeError, IndexError)


def is_hdf5(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a regular file that starts with the HDF5 signature (a named pipe or
    a device is never opened)."""
    try:
        if not Path(path).is_file():
            return False
        with open(path, "rb") as handle:
            return handle.read(8) == SIGNATURE
    except OSError:
        return False


@contextlib.contextmanager
def _reading(path: Path, what: str = "") -> Iterator[None]:
    """Turn what h5py raises on a damaged file into one line naming the file."""
    try:
        yield
    except H5_ERRORS as error:
        detail = (str(error).splitlines() or [type(error).__name__])[0][:200]
        raise GoodnetError(f"{path}: cannot read{what} as HDF5 ({detail})") from None


@contextlib.contextmanager
def open_hdf5(path: str | os.PathLike[str]) -> Iterator[h5py.File]:
    """``path`` opened read-only, once its whole tree has been checked (see the module)."""
    path = require_regular_file(path)
    if path.stat().st_size > MAX_FILE_BYTES:
        raise GoodnetError(f"{path}: larger than {MAX_FILE_BYTES // 1024**3} GiB; refused")
    if not is_hdf5(path):
        raise GoodnetError(f"{path}: cannot read as HDF5 (not an HDF5 file)")
    with _reading(path):
        handle = h5py.File(path, "r")
    try:
        with _reading(path):
            _check_tree(handle, path)
        yield handle
    finally:
        handle.close()


def _check_tree(handle: h5py.File, path: Path) -> None:
    """Refuse any link but a hard link and any external, virtual or oddly filtered dataset."""
    seen = {h5py.h5o.get_info(handle.id).addr}
    stack: list[tuple[str, Any]] = [("", handle.id)]
    count = 0
    while stack:
        prefix, group = stack.pop()
        for raw in group:
            name = f"{prefix}/{raw.decode('utf-8', 'replace')}"
            count += 1
            if count > MAX_OBJECTS:
                raise GoodnetError(f"{path}: more than {MAX_OBJECTS:,} HDF5 objects; refused")
            kind = group.links.get_info(raw).type
            if kind != h5py.h5l.TYPE_HARD:
                what = {h5py.h5l.TYPE_SOFT: "a soft link",
                        h5py.h5l.TYPE_EXTERNAL: "an external link"}.get(kind, "a link")
                raise GoodnetError(f"{path}: {name} is {what}; goodnet reads only objects "
                                   "stored in the file itself; refused")
            child = h5py.h5o.open(group, raw)
            if isinstance(child, h5py.h5g.GroupID):
                address = h5py.h5o.get_info(child).addr
                if address not in seen:
                    seen.add(address)
                    stack.append((name, child))
            elif isinstance(child, h5py.h5d.DatasetID):
                _check_dataset(child, name, path)


def _check_dataset(dataset: Any, name: str, path: Path) -> None:
    plist = dataset.get_create_plist()
    if plist.get_layout() == h5py.h5d.VIRTUAL:
        raise GoodnetError(f"{path}: {name} is a virtual dataset (its data lives in other "
                           "files); refused")
    if plist.get_external_count():
        raise GoodnetError(f"{path}: {name} keeps its data in another file (external "
                           "storage); refused")
    for index in range(plist.get_nfilters()):
        code = plist.get_filter(index)[0]
        if code not in FILTERS:
            raise GoodnetError(f"{path}: {name} is stored with HDF5 filter {code}, which goodnet "
                               f"does not read (only {', '.join(FILTERS.values())}); refused")


def child(group: h5py.Group, name: str, path: Path) -> Any:
    """``group[name]`` (a group or a dataset), or None when there is none."""
    with _reading(path):
        return group.get(name)


def attribute(item: h5py.HLObject, name: str, path: Path) -> Any:
    """The attribute ``name`` of a group or dataset, or None when there is none."""
    with _reading(path):
        return item.attrs.get(name)


def check_stored(dataset: h5py.Dataset, path: Path) -> None:
    """Refuse a dataset that declares more than the file stores for it (see the module)."""
    with _reading(path):
        declared = dataset.size * dataset.dtype.itemsize
        stored = min(dataset.id.get_storage_size(), path.stat().st_size)
        plist = dataset.id.get_create_plist()
        filters = {plist.get_filter(i)[0] for i in range(plist.get_nfilters())}
        chunks = dataset.chunks
    ratio = MAX_DEFLATE_RATIO if h5py.h5z.FILTER_DEFLATE in filters else 1
    if declared > ratio * stored:
        raise GoodnetError(
            f"{path}: dataset '{dataset.name}' declares {dataset.dtype} {dataset.shape} "
            f"({declared:,} bytes) but the file stores {stored:,} bytes of it; refused")
    if chunks and math.prod(chunks) * dataset.dtype.itemsize > max(declared,
                                                                    MAX_SPARE_CHUNK_BYTES):
        raise GoodnetError(f"{path}: dataset '{dataset.name}' declares chunks {chunks} larger "
                           "than itself; refused")


def read(dataset: h5py.Dataset, path: Path) -> np.ndarray:
    """All of ``dataset``, once :func:`check_stored` has passed."""
    check_stored(dataset, path)
    with _reading(path, f" dataset '{dataset.name}'"):
        return np.asarray(dataset[()])
