"""Writing results: atomically, never over an input, never over a file unless forced.

:func:`write_tensors` picks the format's writer by the target's extension
(:data:`~convcli.io.formats.WRITERS`). Every file convcli writes goes to a ``.convcli-*``
temporary file in the target's folder, is flushed and fsynced, then renamed over the target;
on any failure the temporary file is removed, so an existing target is either replaced whole
or left byte-for-byte unchanged. Errors about the target carry ``param=`` the caller's name
for it (``"out"`` by default).
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import numpy as np

from convcli.errors import DataError, OutputError, OutputExistsError, UsageError
from convcli.io.formats import WRITERS, spoken_list
from convcli.io.hdf5 import Hdf5Output, write_hdf5_attrs
from convcli.io.reader import Writer, reason, signals_held

__all__ = [
    "TEMP_PREFIX",
    "Hdf5Output",
    "atomic_output",
    "check_target",
    "output_format",
    "write_hdf5_attrs",
    "write_tensors",
]

TEMP_PREFIX = ".convcli-"


def write_tensors(
    path: str | os.PathLike[str],
    tensors: Mapping[str, np.ndarray],
    attrs: Mapping[str, object],
    *,
    force: bool = False,
    protect: Iterable[str | os.PathLike[str]] = (),
    param: str = "out",
) -> None:
    """Write arrays and attributes atomically to ``.npz``, HDF5 or safetensors (format from
    the extension).

    Parameters
    ----------
    path : str or os.PathLike
        Target ending in ``.npz``, ``.h5``, ``.hdf5`` or ``.safetensors``.
    tensors : mapping of str to numpy.ndarray
        Name -> array, any shape (e.g. ``z`` of shape ``(n, Ho, Wo, Cout)``). HDF5: datasets
        at the root; npz: members; safetensors: tensors.
    attrs : mapping of str to object
        Int, float, str or (nested) lists of them, e.g.
        ``{"stride": [2, 2], "padding": [[2, 2], [2, 2]], "groups": 1}``. HDF5: root
        attributes; npz: extra members; safetensors: ``__metadata__`` entries (JSON text).
        They read back through :meth:`TensorFile.hparams`.
    force : bool
        Overwrite an existing target.
    protect : iterable of path
        Input files that must never be overwritten.
    param : str
        The caller's name for ``path``, carried by the errors about it (``error.param``).

    Raises
    ------
    UsageError
        Unknown extension.
    OutputExistsError
        Target exists and ``force`` is false.
    OutputError
        Target is an input file, is not a regular file, its folder is missing or not
        writable, or writing fails with an OS error.
    DataError
        An array or attribute holds Python objects, or an npz name is used twice.

    Notes
    -----
    The file is written to a ``.convcli-*`` temporary file in the same folder, flushed,
    fsynced and renamed over the target, so an existing target is either replaced whole or
    left byte-for-byte unchanged; the temporary file is removed on any failure.
    """
    path = Path(path)
    writer = _writer_for(path, param)
    check_target(path, force=force, protect=protect, param=param)
    arrays = {name: _numeric_array(path, name, value) for name, value in tensors.items()}
    attr_arrays = {name: _numeric_array(path, name, value) for name, value in attrs.items()}
    writer.check(path, arrays, attr_arrays)
    with atomic_output(path) as (fd, temp):
        writer.write(fd, temp, arrays, attrs)


def _writer_for(path: Path, param: str) -> type[Writer]:
    suffix = path.suffix.lower()
    for writer in WRITERS:
        if suffix in writer.suffixes:
            return writer
    known = spoken_list([s for writer in WRITERS for s in writer.suffixes])
    raise UsageError(f"{{param}} must end in {known}, got {path}", param=param)


def output_format(path: str | os.PathLike[str], param: str = "out") -> str:
    """The format written to ``path``, from its extension: ``"npz"``, ``"hdf5"`` or
    ``"safetensors"``.

    Raises
    ------
    UsageError
        For an extension no writer handles (``param=`` as given).
    """
    return _writer_for(Path(path), param).format


def check_target(
    path: Path, *, force: bool, protect: Iterable[str | os.PathLike[str]], param: str = "out"
) -> None:
    """Refuse inputs, existing files without ``force``, special files and bad folders.

    Raises
    ------
    OutputExistsError
        ``path`` exists and ``force`` is false.
    OutputError
        ``path`` is one of ``protect``, a directory or another non-regular file, or its
        folder is missing or not writable.
    """
    for source in protect:
        if _same_file(path, Path(source)):
            raise OutputError(f"{path}: refusing to write over input file {source}", param=param)
    info = _status(path, param)
    if info is not None and stat.S_ISDIR(info.st_mode):
        raise OutputError(f"{path}: is a directory", param=param)
    if os.path.lexists(path):
        if not force:
            raise OutputExistsError(f"{path} exists", param=param)
        if info is None or not stat.S_ISREG(info.st_mode):
            raise OutputError(f"{path}: exists and is not a regular file", param=param)
    folder = path.parent
    folder_info = _status(folder, param)
    if folder_info is None or not stat.S_ISDIR(folder_info.st_mode):
        raise OutputError(f"{path}: folder {folder} does not exist", param=param)
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputError(f"{path}: folder {folder} is not writable", param=param)


def _status(path: Path, param: str) -> os.stat_result | None:
    """``stat`` of ``path`` (links followed); None if it (or a folder on the way) is absent.

    A symbolic-link loop or a name longer than the file system allows is an OutputError.
    """
    try:
        return os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:
        raise OutputError(
            f"{path}: cannot be written ({exc.strerror or exc})", param=param
        ) from None


def _same_file(first: Path, second: Path) -> bool:
    with contextlib.suppress(OSError):
        if os.path.samefile(first, second):
            return True
    try:
        return first.resolve() == second.resolve()
    except (OSError, RuntimeError):  # a symbolic-link loop (RuntimeError before Python 3.13)
        return False


def _numeric_array(path: Path, name: str, value: object) -> np.ndarray:
    array = np.asarray(value)
    if array.dtype.hasobject:
        raise DataError(f"{path}: cannot store '{name}': it holds Python objects")
    return array


@contextlib.contextmanager
def atomic_output(path: Path) -> Iterator[tuple[int, Path]]:
    """Yield ``(fd, temp_path)`` of a new temporary file beside ``path``.

    The caller writes the file through ``fd``, which is closed here (a caller that opens
    the path by name instead must not close it). On success the file gets the target's
    permission bits, is fsynced and renamed over ``path``; on any exception (a Ctrl-C or
    SIGTERM too) it is removed and the exception re-raised (an OSError as
    :class:`OutputError`). Checks of the target are the caller's (see :func:`check_target`).
    """
    mode = _target_mode(path)
    fd, temp = -1, None
    try:
        with signals_held():  # a Ctrl-C or SIGTERM is raised once temp is known, so removed
            try:
                fd, name = tempfile.mkstemp(prefix=TEMP_PREFIX, suffix=path.suffix, dir=path.parent)
            except OSError as exc:
                raise OutputError(
                    f"{path}: cannot create a file in {path.parent} ({reason(exc)})"
                ) from exc
            temp = Path(name)
        yield fd, temp
        os.close(fd)
        fd = -1
        _fsync_path(temp)
        os.chmod(temp, mode)
        os.replace(temp, path)
    except BaseException as exc:
        if fd >= 0:
            with contextlib.suppress(OSError):
                os.close(fd)
        if temp is not None:
            with contextlib.suppress(OSError):
                temp.unlink()
        if isinstance(exc, OSError) and not isinstance(exc, OutputError):
            raise OutputError(f"{path}: cannot write ({reason(exc)})") from exc
        raise
    _fsync_folder(path.parent)


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
