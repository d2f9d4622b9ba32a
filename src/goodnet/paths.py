"""Paths goodnet reads from and writes to: regular files only.

Opening a named pipe for reading blocks until someone writes to it (``goodnet info fifo`` would
hang forever), a device such as ``/dev/zero`` reads without end, and a write that renames a new
file over ``/dev/null`` replaces the device node itself (as root). Every file goodnet opens by
path is checked here first.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from goodnet.errors import GoodnetError


def require_regular_file(path: str | os.PathLike[str]) -> Path:
    """``path`` as a :class:`Path`, if it names a regular file (links followed).

    Checked with ``os.stat`` before anything opens it, so a named pipe or a device is refused at
    once instead of blocking or reading without end.

    Raises:
        GoodnetError: no such file, a folder, or anything that is not a regular file.
    """
    path = Path(path)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise GoodnetError(f"{path}: no such file") from None
    except OSError as error:
        raise GoodnetError(f"{path}: cannot read ({error.strerror or error})") from None
    if stat.S_ISDIR(mode):
        raise GoodnetError(f"{path}: is a folder, expected a file")
    if not stat.S_ISREG(mode):
        raise GoodnetError(f"{path}: not a regular file (a pipe, socket or device); refused")
    return path


def require_writable_target(path: str | os.PathLike[str]) -> Path:
    """``path`` as a :class:`Path`, if writing a new file there replaces nothing but a regular
    file: it does not exist yet, or it is a regular file (links followed).

    Raises:
        GoodnetError: ``path`` is a folder, a pipe, a socket or a device.
    """
    path = Path(path)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return path
    except OSError as error:
        raise GoodnetError(f"cannot write {path}: {error.strerror or error}") from None
    if stat.S_ISDIR(mode):
        raise GoodnetError(f"cannot write {path}: it is a folder")
    if not stat.S_ISREG(mode):
        raise GoodnetError(f"cannot write {path}: not a regular file (a pipe, socket or "
                           "device); write to a regular file")
    return path
