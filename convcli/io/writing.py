"""Writing results: atomically, never over an input, never over a file without ``--force``.

Every file convcli writes goes to a ``.convcli-*`` temporary file in the target's folder,
is flushed and fsynced, then renamed over the target; on any failure the temporary file is
removed, so an existing target is either replaced whole or left byte-for-byte unchanged.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import h5py
import numpy as np

from convcli.errors import DataError, OutputError, UsageError

TEMP_PREFIX = ".convcli-"
WRITE_FORMATS = {".npz": "npz", ".h5": "hdf5", ".hdf5": "hdf5"}


def _reason(exc: BaseException) -> str:
    """One line describing ``exc`` for an error message."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def write_tensors(
    path,
    tensors: Mapping[str, np.ndarray],
    attrs: Mapping[str, object],
    *,
    force: bool = False,
    protect: Iterable = (),
    flag: str = "--out",
) -> None:
    """Write arrays and attributes atomically to ``.npz`` or HDF5 (format from the extension).

    Parameters
    ----------
    path : str or os.PathLike
        Target ending in ``.npz``, ``.h5`` or ``.hdf5``.
    tensors : mapping of str to numpy.ndarray
        Name -> array, any shape (e.g. ``z`` of shape ``(n, Ho, Wo, Cout)``). HDF5: datasets
        at the root; npz: members.
    attrs : mapping of str to object
        Int, float, str or (nested) lists of them, e.g.
        ``{"stride": [2, 2], "padding": [[2, 2], [2, 2]], "groups": 1}``. HDF5: root
        attributes; npz: extra members. They read back through :meth:`TensorFile.hparams`.
    force : bool
        Overwrite an existing target.
    protect : iterable of path
        Input files that must never be overwritten.

    Raises
    ------
    UsageError
        Unknown extension.
    OutputError
        Target exists without ``force``, is an input file, is not a regular file, its folder
        is missing or not writable, or writing fails with an OS error.
    DataError
        An array or attribute holds Python objects, or an npz name is used twice.

    Notes
    -----
    The file is written to a ``.convcli-*`` temporary file in the same folder, flushed,
    fsynced and renamed over the target, so an existing target is either replaced whole or
    left byte-for-byte unchanged; the temporary file is removed on any failure.
    """
    path = Path(path)
    fmt = output_format(path, flag)
    check_target(path, force=force, protect=protect)
    members = _writable(path, fmt, tensors, attrs)
    _atomic_write(path, fmt, members, attrs)


def output_format(path: Path, flag: str = "--out") -> str:
    fmt = WRITE_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise UsageError(f"{flag} must end in .npz, .h5 or .hdf5, got {path}")
    return fmt


def check_target(path: Path, *, force: bool, protect: Iterable) -> None:
    """Refuse inputs, existing files without ``force``, special files and bad folders."""
    for source in protect:
        if _same_file(path, Path(source)):
            raise OutputError(f"{path}: refusing to write over input file {source}")
    if path.is_dir():
        raise OutputError(f"{path}: is a directory")
    if os.path.lexists(path):
        if not force:
            raise OutputError(f"{path} exists; pass --force to overwrite")
        if not path.is_file():
            raise OutputError(f"{path}: exists and is not a regular file")
    folder = path.parent
    if not folder.is_dir():
        raise OutputError(f"{path}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputError(f"{path}: folder {folder} is not writable")


def _same_file(first: Path, second: Path) -> bool:
    with contextlib.suppress(OSError):
        if os.path.samefile(first, second):
            return True
    return first.resolve() == second.resolve()


def _writable(path: Path, fmt: str, tensors: Mapping, attrs: Mapping) -> dict[str, np.ndarray]:
    """Tensors (and, for npz, attributes) as arrays, refusing objects and clashing names."""
    members = {name: _numeric_array(path, name, value) for name, value in tensors.items()}
    for name, value in attrs.items():
        array = _numeric_array(path, name, value)
        if fmt == "npz":
            if name in members:
                raise DataError(f"{path}: '{name}' is given both as a tensor and an attribute")
            members[name] = array
    return members


def _numeric_array(path: Path, name: str, value) -> np.ndarray:
    array = np.asarray(value)
    if array.dtype.hasobject:
        raise DataError(f"{path}: cannot store '{name}': it holds Python objects")
    return array


def _atomic_write(path: Path, fmt: str, members: Mapping, attrs: Mapping) -> None:
    """Write to a temporary file next to ``path``, fsync it, then rename it over ``path``."""
    with atomic_output(path) as (fd, temp):
        if fmt == "npz":
            _write_npz(fd, members)
        else:
            os.close(fd)
            _write_hdf5(temp, members, attrs)


@contextlib.contextmanager
def atomic_output(path: Path) -> Iterator[tuple[int, Path]]:
    """Yield ``(fd, temp_path)`` of a new temporary file beside ``path``.

    The caller writes the file (and closes ``fd`` if it opens the path another way; an fd
    left open is closed here). On success the file gets the target's permission bits, is
    fsynced and renamed over ``path``; on any exception it is removed and the exception
    re-raised (an OSError as :class:`OutputError`). Checks of the target are the caller's
    (see :func:`check_target`).
    """
    mode = _target_mode(path)
    try:
        fd, temp_name = tempfile.mkstemp(prefix=TEMP_PREFIX, suffix=path.suffix, dir=path.parent)
    except OSError as exc:
        raise OutputError(f"{path}: cannot create a file in {path.parent} ({exc})") from exc
    temp = Path(temp_name)
    try:
        yield fd, temp
        with contextlib.suppress(OSError):
            os.close(fd)
        _fsync_path(temp)
        os.chmod(temp, mode)
        os.replace(temp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.close(fd)
        with contextlib.suppress(OSError):
            temp.unlink()
        if isinstance(exc, OSError) and not isinstance(exc, OutputError):
            raise OutputError(f"{path}: cannot write ({_reason(exc)})") from exc
        raise
    _fsync_folder(path.parent)


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_npz(fd: int, members: Mapping[str, np.ndarray]) -> None:
    with os.fdopen(fd, "wb") as handle:
        np.savez(handle, **members)
        handle.flush()
        os.fsync(handle.fileno())


def _write_hdf5(temp: Path, datasets: Mapping[str, np.ndarray], attrs: Mapping) -> None:
    with h5py.File(temp, "w") as h5:
        for name, array in datasets.items():
            h5.create_dataset(name, data=array)
        write_hdf5_attrs(h5, attrs)


def write_hdf5_attrs(h5: h5py.File, attrs: Mapping) -> None:
    """Store hyperparameters as root attributes that :meth:`TensorFile.hparams` reads back."""
    for name, value in attrs.items():
        h5.attrs[name] = _hdf5_attr(value)


def _hdf5_attr(value):
    """An attribute value h5py can store (numpy unicode arrays become variable-length str)."""
    if isinstance(value, str):
        return value
    array = np.asarray(value)
    if array.dtype.kind == "U":
        return array.astype(h5py.string_dtype())
    return array


def _target_mode(path: Path) -> int:
    """Permission bits for the new file: the old file's, else what the umask allows."""
    with contextlib.suppress(OSError):
        return stat.S_IMODE(os.stat(path).st_mode)
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _fsync_folder(folder: Path) -> None:
    """Make the rename durable where the platform allows it (best effort)."""
    with contextlib.suppress(OSError, AttributeError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
