"""Atomic file writing: a temporary file in the destination's folder, then ``os.replace``.

Readers see either the old file or the complete new one, never a partial write, and
concurrent writers of one path each use their own temporary file (the last rename wins).
Temporary files are hidden, sit next to the destination (so the rename never crosses a
file system) and carry :data:`TMP_MARK` followed by the writer's process id, a tag of its
host and a random token, so leftovers of a killed writer can be recognised and removed
(:func:`remove_dead_temps`: at once when the writer ran on this host and its process is
gone, after a day otherwise). They are created with ``open``, so the final file's
permissions follow the umask.

:func:`preallocate` reserves a file's blocks before it is filled through a memory map, so
a full disk is an ``OSError(ENOSPC)`` at that point rather than a ``SIGBUS`` mid-write.

:func:`write_via` hands the temporary path to a callback, for writers that take a file
name (``nibabel.save``, ``torch.save``, ``numpy.lib.format.open_memmap``);
:func:`write_bytes` and :func:`write_text` cover the common cases. Errors (``OSError``
included) propagate unchanged after the temporary file is removed; mapping them to the
app's exit codes is the caller's business.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import secrets
import shutil
import socket
import time
from pathlib import Path
from typing import Callable

TMP_MARK = ".tmp-"
# .tmp-<pid>-<host tag>-<random>; older writers used .tmp-<pid>-<random> (no host tag)
_TMP_RE = re.compile(re.escape(TMP_MARK) + r"(\d+)-(?:([0-9a-f]{6})-)?[0-9a-f]+")


def host_tag() -> str:
    """Six hex digits naming this host (and container), part of every temporary name.

    Process ids only mean something on the host that issued them: a writer on another
    node of a cluster sharing the output folder must not be declared dead.
    """
    return hashlib.sha1(socket.gethostname().encode()).hexdigest()[:6]


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
        ``.<name>.tmp-<pid>-<host>-<hex>``, or ``.tmp-<pid>-<host>-<hex>.<name>`` with
        ``keep_suffix``.
    """
    path = Path(path)
    token = f"{TMP_MARK}{os.getpid()}-{host_tag()}-{secrets.token_hex(4)}"
    name = f"{token}.{path.name}" if keep_suffix else f".{path.name}{token}"
    return path.with_name(name)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except OSError:
        return True
    return True


def writer_gone(tmp) -> bool:
    """Whether the process that created temporary file ``tmp`` is known to be dead.

    Only a writer of this host (same host tag) can be checked; for others, and for names
    without a tag, the answer is ``False`` (unknown).
    """
    match = _TMP_RE.search(Path(tmp).name)
    if match is None or match.group(2) != host_tag():
        return False
    pid = int(match.group(1))
    return pid != os.getpid() and not _process_alive(pid)


def remove_dead_temps(folder, max_age_s: float = 86400.0) -> int:
    """Delete temporary files of dead writers in ``folder``.

    Parameters
    ----------
    folder : path-like
        Folder to clean (not recursive).
    max_age_s : float
        Temporary files whose writer cannot be checked (another host) are removed once
        they are older than this.

    Returns
    -------
    int
        Files removed.
    """
    removed = 0
    now = time.time()
    for tmp in Path(folder).glob(f"*{TMP_MARK}*"):
        try:
            if writer_gone(tmp) or now - tmp.stat().st_mtime > max_age_s:
                tmp.unlink()
                removed += 1
        except OSError:
            pass  # another job removed or renamed it meanwhile
    return removed


def no_space_error(folder, needed_bytes: int) -> OSError:
    """An ``OSError(ENOSPC)`` whose text names ``folder`` and the space needed and free."""
    try:
        free = shutil.disk_usage(folder).free
        free_text = f", {_megabytes(free)} free"
    except OSError:
        free_text = ""
    return OSError(errno.ENOSPC, f"no space left in {folder}: needs "
                                 f"{_megabytes(needed_bytes)}{free_text}")


def _megabytes(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def preallocate(path, size: int) -> None:
    """Reserve ``size`` bytes of blocks for the existing file ``path``.

    A file filled through a memory map (or written sparsely) gets its blocks only when
    pages are flushed; on a full disk that is a ``SIGBUS`` that kills the process without a
    word. Reserving them first turns it into an ``OSError(ENOSPC)`` here.

    Raises
    ------
    OSError
        ``ENOSPC`` (its text names the folder and the space needed) or another error of the
        file system. Platforms without ``posix_fallocate`` are skipped.
    """
    if not hasattr(os, "posix_fallocate") or size <= 0:
        return
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, int(size))
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise no_space_error(Path(path).parent, int(size)) from exc
        if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            raise
    finally:
        os.close(fd)


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
