"""Atomic file writing: a temporary file in the destination's folder, then ``os.replace``.

Readers see either the old file or the complete new one, never a partial write, and
concurrent writers of one path each use their own temporary file (the last rename wins).
Temporary files are hidden, sit next to the destination (so the rename never crosses a
file system) and carry :data:`TMP_MARK` followed by the writer's process id and a random
token, so leftovers of a killed writer can be recognised and removed. They are created
with ``open``, so the final file's permissions follow the umask.

:func:`write_via` hands the temporary path to a callback, for writers that take a file
name (``nibabel.save``, ``torch.save``, ``numpy.lib.format.open_memmap``);
:func:`write_bytes` and :func:`write_text` cover the common cases. Errors (``OSError``
included) propagate unchanged after the temporary file is removed; mapping them to the
app's exit codes is the caller's business.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Callable

TMP_MARK = ".tmp-"


def tmp_path(path, *, keep_suffix: bool = False) -> Path:
    """A unique hidden temporary path in the folder of ``path``.

    Parameters
    ----------
    path : path-like
        The destination.
    keep_suffix : bool
        End the temporary name with the destination's name (``.nii.gz`` stays last, so
        writers that pick the format from the extension write the same format).

    Returns
    -------
    pathlib.Path
        ``.<name>.tmp-<pid>-<hex>``, or ``.tmp-<pid>-<hex>.<name>`` with ``keep_suffix``.
    """
    path = Path(path)
    token = f"{TMP_MARK}{os.getpid()}-{secrets.token_hex(4)}"
    name = f"{token}.{path.name}" if keep_suffix else f".{path.name}{token}"
    return path.with_name(name)


def fsync_file(path) -> None:
    """Flush a file's data to stable storage.

    Parameters
    ----------
    path : path-like
        An existing file.
    """
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path) -> None:
    """Flush a folder's entries (a completed rename) to stable storage, where possible.

    Parameters
    ----------
    path : path-like
        The folder; platforms that cannot open or sync folders are silently skipped.
    """
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some platforms cannot open folders; the rename already happened
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_via(path, write: Callable[[Path], object], *, fsync: bool = True,
              keep_suffix: bool = False, mkdir: bool = True) -> Path:
    """Write ``path`` atomically through ``write(tmp)``, which creates the whole file.

    Parameters
    ----------
    path : path-like
        Destination.
    write : callable
        Called with the temporary path; must write the complete file there.
    fsync : bool
        Flush the temporary file to disk before the rename.
    keep_suffix : bool
        See :func:`tmp_path`.
    mkdir : bool
        Create the destination's folder (with parents) first.

    Returns
    -------
    pathlib.Path
        ``path``.

    Raises
    ------
    Exception
        Whatever ``write`` or the file system raise; the temporary file is removed.
    """
    path = Path(path)
    if mkdir:
        path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path(path, keep_suffix=keep_suffix)
    try:
        write(tmp)
        if fsync:
            fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_bytes(path, data: bytes, *, fsync: bool = True, mkdir: bool = True) -> Path:
    """Write ``data`` to ``path`` atomically.

    Parameters
    ----------
    path : path-like
        Destination.
    data : bytes
        The complete content.
    fsync, mkdir : bool
        See :func:`write_via`.

    Returns
    -------
    pathlib.Path
        ``path``.
    """
    return write_via(path, lambda tmp: Path(tmp).write_bytes(data), fsync=fsync, mkdir=mkdir)


def write_text(path, text: str, *, fsync: bool = True, mkdir: bool = True) -> Path:
    """Write ``text`` to ``path`` atomically, UTF-8 encoded.

    Parameters
    ----------
    path : path-like
        Destination.
    text : str
        The complete content (newlines written as given).
    fsync, mkdir : bool
        See :func:`write_via`.

    Returns
    -------
    pathlib.Path
        ``path``.
    """
    return write_bytes(path, text.encode("utf-8"), fsync=fsync, mkdir=mkdir)
