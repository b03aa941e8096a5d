"""Which file is meant and what format it holds, before anything is read.

A *tensor reference* is ``PATH`` or ``PATH:KEY`` (``run.h5:/layer1/W``; the leading ``/`` of
an HDF5 path is optional; keys and paths may hold ``:``): :func:`parse_ref`. Only regular
files are opened (:func:`regular_file_size`), so a FIFO or device never blocks, and formats
are recognised by their content, never by their extension (:func:`detect_format`).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import NamedTuple

from convcli.errors import DataError, InputFileError
from convcli.io.formats import READERS, spoken_list
from convcli.io.reader import CONVERT_PYTORCH

#: Bytes read to recognise a format (the longest signature, HDF5's, has 8).
HEAD_BYTES = 8


class TensorRef(NamedTuple):
    """A parsed tensor reference: the file, and the key inside it (None: not given)."""

    path: Path
    key: str | None


def parse_ref(ref: str) -> TensorRef:
    """Split a tensor reference ``PATH`` or ``PATH:KEY``.

    If the whole string names an existing path it has no key; otherwise it is split at the
    ``:`` after the longest prefix that names an existing path, so keys may hold ``:``
    (Keras 2's ``run.h5:conv2d/kernel:0``) and so may file names (``run:2.npz:W``). When no
    prefix exists it is split at the last ``:`` (the error then names the missing file).
    An empty key (``"run.npz:"``) counts as no key.

    Parameters
    ----------
    ref : str
        The reference, e.g. ``"run.h5:/layer1/W"`` or ``"w.npy"``.

    Returns
    -------
    TensorRef
        ``(path, key)``, the key as written (HDF5 keys may keep a leading ``/``).
    """
    if os.path.lexists(ref) or ":" not in ref:
        return TensorRef(Path(ref), None)
    colons = [index for index, char in enumerate(ref) if char == ":"]
    split = next((i for i in reversed(colons) if os.path.lexists(ref[:i])), colons[-1])
    return TensorRef(Path(ref[:split]), ref[split + 1 :] or None)


def regular_file_size(path: str | os.PathLike[str]) -> int:
    """Size in bytes of ``path``, after checking (without opening it) that it is a regular file.

    Raises
    ------
    InputFileError
        Missing, a directory, a FIFO, socket or device, or not accessible.
    """
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise InputFileError(f"{path}: no such file") from None
    except NotADirectoryError:
        raise InputFileError(f"{path}: no such file (a parent is not a folder)") from None
    except PermissionError:
        raise InputFileError(f"{path}: permission denied") from None
    except OSError as exc:
        raise InputFileError(f"{path}: cannot access ({exc.strerror or exc})") from exc
    if stat.S_ISDIR(info.st_mode):
        raise InputFileError(f"{path}: is a directory, not a tensor file")
    if not stat.S_ISREG(info.st_mode):
        raise InputFileError(f"{path}: not a regular file (FIFO, socket or device)")
    return info.st_size


def read_head(path: Path, count: int = HEAD_BYTES) -> bytes:
    """First ``count`` bytes of a regular file (InputFileError if it cannot be read)."""
    try:
        with open(path, "rb") as handle:
            return handle.read(count)
    except PermissionError:
        raise InputFileError(f"{path}: no read permission") from None
    except OSError as exc:
        raise InputFileError(f"{path}: cannot read ({exc.strerror or exc})") from exc


def detect_format(path: str | os.PathLike[str]) -> str:
    """Tell a tensor file's format from its content.

    Parameters
    ----------
    path : str or os.PathLike
        File to inspect. Only regular files are opened, so a FIFO or device never blocks.

    Returns
    -------
    str
        The :attr:`~convcli.io.reader.Reader.format` of the first reader in
        :data:`~convcli.io.formats.READERS` that recognises it: ``"npy"``, ``"npz"``,
        ``"hdf5"`` or ``"safetensors"``.

    Raises
    ------
    InputFileError
        If the path is missing, a directory, not a regular file, or not readable.
    DataError
        If the file is empty or its content is none of the known formats.
    """
    path = Path(path)
    labels = spoken_list([reader.label for reader in READERS])
    if regular_file_size(path) == 0:
        raise DataError(f"{path}: empty file (expected {labels} content)")
    head = read_head(path)
    for reader in READERS:
        if reader.sniff(path, head):
            return reader.format
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        raise DataError(f"{path}: a Python pickle (a PyTorch checkpoint?); {CONVERT_PYTORCH}")
    raise DataError(f"{path}: not a {labels} file (first bytes {head!r})")
