"""Read tensors and hyperparameters from ``.npy``, ``.npz`` and HDF5 files, and write results.

A *tensor reference* is ``PATH`` or ``PATH:KEY`` (``run.h5:/layer1/W``; the leading ``/`` of
an HDF5 path is optional). Files are recognised by their content, never by their extension.

Roles name the tensors of a convolution layer (activations NHWC, weights HWIO):

==== ========================== ==========================================
role shape                      names looked for (:data:`ALIASES`)
==== ========================== ==========================================
x    ``(n, H, W, Cin)``         ``x``, ``X``, ``A_prev``, ``input``
w    ``(kh, kw, Cin/g, Cout)``  ``w``, ``W``, ``weight``, ``weights``
b    ``(Cout,)`` or broadcast   ``b``, ``bias``
dz   ``(n, Ho, Wo, Cout)``      ``dz``, ``dZ``, ``grad_output``
==== ========================== ==========================================

This module never prints: problems are raised as :mod:`convcli.errors` types
(:class:`~convcli.errors.InputFileError` for a missing or unreadable path,
:class:`~convcli.errors.DataError` for content that cannot be used,
:class:`~convcli.errors.OutputError` and :class:`~convcli.errors.UsageError` when writing).
Arrays are always loaded with ``allow_pickle=False``.
"""

from __future__ import annotations

import math
import os
import stat
import tokenize
import zipfile
import zlib
from collections.abc import Mapping
from pathlib import Path

import h5py
import numpy as np

from convcli.errors import DataError, InputFileError
from convcli.hparams import FILE_KEYS, HPARAMS

ALIASES = {
    "x": ("x", "X", "A_prev", "input"),
    "w": ("w", "W", "weight", "weights"),
    "b": ("b", "bias"),
    "dz": ("dz", "dZ", "grad_output"),
}

NPY_MAGIC = b"\x93NUMPY"
ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06")
HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
MAX_HPARAM_SIZE = 16
MAX_LISTED = 20

# What numpy, zipfile and h5py raise on truncated, corrupt or unsupported content.
_CONTENT_ERRORS = (
    ValueError,
    OSError,
    EOFError,
    KeyError,
    TypeError,
    RuntimeError,
    SyntaxError,
    tokenize.TokenError,  # a .npy header numpy cannot tokenize
    zipfile.BadZipFile,
    zlib.error,
)


# ---------------------------------------------------------------------------------------------
# Format detection and references
# ---------------------------------------------------------------------------------------------


def detect_format(path) -> str:
    """Tell a tensor file's format from its first bytes.

    Parameters
    ----------
    path : str or os.PathLike
        File to inspect. Only regular files are opened, so a FIFO or device never blocks.

    Returns
    -------
    str
        ``"npy"``, ``"npz"`` or ``"hdf5"``.

    Raises
    ------
    InputFileError
        If the path is missing, a directory, not a regular file, or not readable.
    DataError
        If the file is empty or its content is none of the three formats.
    """
    path = Path(path)
    size = _regular_file_size(path)
    if size == 0:
        raise DataError(f"{path}: empty file (expected .npy, .npz or HDF5 content)")
    head = _read_head(path, len(HDF5_MAGIC))
    if head.startswith(NPY_MAGIC):
        return "npy"
    if head.startswith(ZIP_MAGICS):
        return "npz"
    if head.startswith(HDF5_MAGIC) or _is_hdf5_with_user_block(path):
        return "hdf5"
    raise DataError(f"{path}: not a .npy, .npz or HDF5 file (first bytes {head!r})")


def _regular_file_size(path: Path) -> int:
    """Size in bytes of ``path``, after checking (without opening) that it is a regular file."""
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


def _read_head(path: Path, count: int) -> bytes:
    """First ``count`` bytes of a regular file."""
    try:
        with open(path, "rb") as handle:
            return handle.read(count)
    except PermissionError:
        raise InputFileError(f"{path}: no read permission") from None
    except OSError as exc:
        raise InputFileError(f"{path}: cannot read ({exc.strerror or exc})") from exc


def _is_hdf5_with_user_block(path: Path) -> bool:
    """True if h5py finds an HDF5 signature after a user block (offset 512, 1024, ...)."""
    try:
        return bool(h5py.is_hdf5(str(path)))
    except (OSError, ValueError):
        return False


def parse_ref(ref: str) -> tuple[Path, str | None]:
    """Split a tensor reference ``PATH`` or ``PATH:KEY``.

    If the whole string names an existing path it has no key; otherwise it is split at the
    last ``:``. An empty key (``"run.npz:"``) counts as no key.

    Parameters
    ----------
    ref : str
        The reference, e.g. ``"run.h5:/layer1/W"`` or ``"w.npy"``.

    Returns
    -------
    (pathlib.Path, str or None)
        The file and the key inside it, as written (HDF5 keys may keep a leading ``/``).
    """
    if os.path.lexists(ref) or ":" not in ref:
        return Path(ref), None
    path, _, key = ref.rpartition(":")
    return Path(path), (key or None)


def _basename(key: str) -> str:
    return key.rsplit("/", 1)[-1]


# ---------------------------------------------------------------------------------------------
# Reading one file
# ---------------------------------------------------------------------------------------------


def open_tensor_file(path) -> TensorFile:
    """Open a ``.npy``, ``.npz`` or HDF5 file (format found by content).

    Returns
    -------
    TensorFile
        Use it as a context manager, or call :meth:`TensorFile.close`.

    Raises
    ------
    InputFileError
        Missing path, directory, special file or no read permission.
    DataError
        Empty, unrecognised, truncated or corrupt content.
    """
    path = Path(path)
    fmt = detect_format(path)
    if fmt == "npy":
        return TensorFile(path, fmt)
    try:
        if fmt == "npz":
            return TensorFile(path, fmt, *_open_npz(path))
        return TensorFile(path, fmt, h5py.File(path, "r"))
    except _CONTENT_ERRORS as exc:
        if fmt == "hdf5" and "unable to lock file" in str(exc).lower():
            raise InputFileError(
                f"{path}: locked by another process that is writing it (HDF5 file locking); "
                "try again when it is done"
            ) from exc
        raise DataError(f"{path}: cannot read {fmt} file ({_reason(exc)})") from exc


def _open_npz(path: Path):
    """``(NpzFile, stream)``; the stream is ours so that it is closed even if numpy fails."""
    stream = open(path, "rb")  # noqa: SIM115 - closed by TensorFile.close or below
    try:
        return np.load(stream, allow_pickle=False), stream
    except BaseException:
        stream.close()
        raise


def _reason(exc: BaseException) -> str:
    """One line describing ``exc`` for an error message."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


class TensorFile:
    """An open tensor file: the arrays it holds and the hyperparameters stored with them.

    Keys name the arrays: npz member names (without ``.npy``), HDF5 dataset paths without the
    leading ``/`` (``"layer1/W"``), and ``""`` for the single unnamed array of a ``.npy``.

    Attributes
    ----------
    path : pathlib.Path
        The file, as it was given.
    format : str
        ``"npy"``, ``"npz"`` or ``"hdf5"``.
    """

    def __init__(self, path: Path, fmt: str, handle=None, stream=None):
        self.path = Path(path)
        self.format = fmt
        self._handle = handle
        self._stream = stream
        self._keys: list[str] | None = None

    # -- lifetime ---------------------------------------------------------------------------

    def close(self) -> None:
        """Close the npz zip and its file, or the HDF5 file (safe to call twice)."""
        handle, stream = self._handle, self._stream
        self._handle = self._stream = None
        try:
            if handle is not None:
                handle.close()
        finally:
            if stream is not None:
                stream.close()

    def __enter__(self) -> TensorFile:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"TensorFile({str(self.path)!r}, format={self.format!r})"

    def stat(self) -> os.stat_result:
        """``fstat`` of the open file: the one being read, even if its path now names another.

        A ``.npy`` is not held open, so for it this is the ``stat`` of its path.
        """
        if self.format == "hdf5":
            return os.fstat(self._open_handle().id.get_vfd_handle())
        if self.format == "npz":
            if self._stream is None:
                raise DataError(f"{self.path}: file is closed")
            return os.fstat(self._stream.fileno())
        return os.stat(self.path)

    # -- listing ----------------------------------------------------------------------------

    def keys(self) -> list[str]:
        """Every array in the file, sorted.

        Returns
        -------
        list of str
            For npz this includes hyperparameter entries such as ``stride``; for HDF5 it
            holds only datasets reached through hard links (soft and external links are not
            followed); for npy it is ``[""]``.
        """
        if self._keys is None:
            try:
                if self.format == "npy":
                    self._keys = [""]
                elif self.format == "npz":
                    self._keys = sorted(_npz_members(self._open_handle()))
                else:
                    self._keys = sorted(_hdf5_datasets(self._open_handle()))
            except _CONTENT_ERRORS as exc:
                raise DataError(
                    f"{self.path}: cannot list its contents (corrupt file: {_reason(exc)})"
                ) from exc
        return list(self._keys)

    def tensor_keys(self) -> list[str]:
        """:meth:`keys` without the npz entries that store hyperparameters (``stride``, ...)."""
        if self.format != "npz":
            return self.keys()
        return [key for key in self.keys() if key not in FILE_KEYS]

    def describe(self) -> str:
        """Short listing for error messages.

        Returns
        -------
        str
            E.g. ``"holds: A_prev (10, 4, 4, 3) float64, W (2, 2, 3, 8) float64, pad ()"``.
        """
        keys = self.keys()
        if self.format == "npy":
            return f"holds one unnamed array {self._info('')}"
        if not keys:
            return "holds no arrays"
        items = [f"{key} {self._info(key)}" for key in keys[:MAX_LISTED]]
        if len(keys) > MAX_LISTED:
            items.append(f"... and {len(keys) - MAX_LISTED} more")
        return "holds: " + ", ".join(items)

    def _info(self, key: str) -> str:
        """``"(shape) dtype"`` of one array, read from its header only."""
        try:
            shape, dtype = self.shape_dtype(key)
        except DataError:
            return "(unreadable)"
        return f"{shape} {dtype}"

    def shape_dtype(self, key: str) -> tuple[tuple[int, ...], np.dtype]:
        """Shape and dtype of one array, from its header only (no data is read).

        Raises
        ------
        DataError
            When the header cannot be read.
        """
        try:
            return self._header(key)
        except DataError:
            raise
        except _CONTENT_ERRORS as exc:
            raise DataError(f"{self._where(key)}: unreadable header ({_reason(exc)})") from exc

    def _header(self, key: str) -> tuple[tuple[int, ...], np.dtype]:
        if self.format == "npy":
            with open(self.path, "rb") as handle:
                return _npy_header(handle)
        if self.format == "npz":
            with self._open_handle().zip.open(key + ".npy") as handle:
                return _npy_header(handle)
        dataset = self._dataset(key)
        return tuple(dataset.shape or ()), dataset.dtype

    # -- reading ----------------------------------------------------------------------------

    def read(self, key: str, max_bytes: int | None = None) -> np.ndarray:
        """Load one array into memory.

        Parameters
        ----------
        key : str
            A name from :meth:`keys` (HDF5: leading ``/`` optional; npy: ``""``).
        max_bytes : int, optional
            Refuse (before allocating) an array whose declared size is larger.

        Returns
        -------
        numpy.ndarray
            The array, with the file's shape and dtype.

        Raises
        ------
        DataError
            Missing key (the message lists what the file holds), an HDF5 group or link,
            object/string arrays, or truncated/corrupt content.
        """
        self.check_readable(key, max_bytes)
        if self.format == "npy":
            array = self._read_npy(key)
        elif self.format == "npz":
            array = self._read_npz(key)
        else:
            array = self._read_hdf5(key)
        if array.dtype.hasobject:
            raise DataError(f"{self._where(key)}: holds Python objects or strings, not numbers")
        return array

    def check_readable(self, key: str, max_bytes: int | None = None) -> int:
        """Check what the header of ``key`` declares before any data is read; return its bytes.

        Refuses object dtypes, a declared size the file cannot hold (an absurd header, or a
        compressed member that would expand beyond its declared length), a size above
        ``max_bytes``, and HDF5 datasets stored outside the file (external storage, virtual
        datasets).
        """
        if self.format == "npz" and key not in self.keys():
            raise DataError(f"{self.path}: no entry '{key}'; it {self.describe()}")
        try:
            shape, dtype = self.shape_dtype(key)
        except DataError:
            raise
        except _CONTENT_ERRORS as exc:
            raise DataError(f"{self._where(key)}: unreadable header ({_reason(exc)})") from exc
        if dtype.hasobject:
            raise DataError(
                f"{self._where(key)}: holds Python objects; convcli never unpickles data"
            )
        declared = _nbytes(shape, dtype)
        available = self._stored_bytes(key)
        if available is not None and declared > available:
            raise DataError(
                f"{self._where(key)}: header declares shape {shape} {dtype} ({declared:,} bytes) "
                f"but only {available:,} bytes of data follow (truncated or corrupt)"
            )
        if max_bytes is not None and declared > max_bytes:
            from convcli.units import format_size

            raise DataError(
                f"{self._where(key)}: needs {format_size(declared)} ({shape} {dtype}), more than "
                f"the memory guard allows ({format_size(max_bytes)} left of --max-memory); "
                "raise --max-memory, or store it in HDF5 to stream it"
            )
        return declared

    def _stored_bytes(self, key: str) -> int | None:
        """Bytes of array data the file really holds for ``key`` (None when not knowable)."""
        if self.format == "npy":
            with open(self.path, "rb") as handle:
                _npy_header(handle)
                return os.fstat(handle.fileno()).st_size - handle.tell()
        if self.format == "npz":
            zip_file = self._open_handle().zip
            info = zip_file.getinfo(key + ".npy")
            with zip_file.open(info) as handle:
                _npy_header(handle)
                return info.file_size - handle.tell()
        dataset = self._dataset(key)
        if dataset.is_virtual:
            raise DataError(
                f"{self._where(key)}: is a virtual dataset, which reads other files; refused"
            )
        if dataset.external:
            raise DataError(
                f"{self._where(key)}: keeps its data in external files "
                f"({', '.join(str(e[0]) for e in dataset.external)}); refused"
            )
        return None

    def _read_npy(self, key: str) -> np.ndarray:
        if key:
            raise DataError(
                f"{self.path}: a .npy file holds one unnamed array; refer to it as "
                f"{self.path} without ':{key}'"
            )
        try:
            return np.load(self.path, allow_pickle=False)
        except _CONTENT_ERRORS as exc:
            raise DataError(f"{self.path}: cannot read .npy array ({_reason(exc)})") from exc

    def _read_npz(self, key: str) -> np.ndarray:
        if key not in self.keys():
            raise DataError(f"{self.path}: no entry '{key}'; it {self.describe()}")
        try:
            return self._open_handle()[key]
        except _CONTENT_ERRORS as exc:
            raise DataError(f"{self._where(key)}: cannot read ({_reason(exc)})") from exc

    def _read_hdf5(self, key: str) -> np.ndarray:
        dataset = self._dataset(key)
        try:
            value = dataset[()]
        except _CONTENT_ERRORS as exc:
            if "filter" in str(exc).lower():
                raise DataError(
                    f"{self._where(key)}: compressed with a filter this HDF5 library does not "
                    f"have ({_reason(exc)})"
                ) from exc
            raise DataError(f"{self._where(key)}: cannot read ({_reason(exc)})") from exc
        if isinstance(value, h5py.Empty):
            raise DataError(f"{self._where(key)}: empty dataset (no data space)")
        return np.asarray(value)

    def _dataset(self, key: str) -> h5py.Dataset:
        """The HDF5 dataset at ``key``, reached through hard links only."""
        node = self._open_handle()
        parts = [part for part in key.strip("/").split("/") if part]
        for depth, part in enumerate(parts):
            where = "/" + "/".join(parts[: depth + 1])
            if not isinstance(node, h5py.Group):
                raise DataError(f"{self.path}:{where}: no such dataset; it {self.describe()}")
            link = node.get(part, getlink=True)
            if link is None:
                raise DataError(f"{self.path}:{where}: no such dataset; it {self.describe()}")
            if not isinstance(link, h5py.HardLink):
                raise DataError(
                    f"{self.path}:{where}: is a soft or external link, which can point into "
                    "other files; refused (name the dataset itself)"
                )
            node = node[part]
        if not isinstance(node, h5py.Dataset):
            raise DataError(
                f"{self.path}:/{'/'.join(parts)}: is a group, not a dataset; it {self.describe()}"
            )
        return node

    def _where(self, key: str) -> str:
        """``file.h5:/layer1/W``-style text for one array."""
        return origin_text(self, key)

    def _open_handle(self):
        if self._handle is None:
            raise DataError(f"{self.path}: file is closed")
        return self._handle

    # -- roles ------------------------------------------------------------------------------

    def find(self, role: str) -> str | None:
        """Key of the tensor for ``role``, matched on the last path component.

        Parameters
        ----------
        role : {"x", "w", "b", "dz"}

        Returns
        -------
        str or None
            The one key whose basename is in ``ALIASES[role]`` (case-sensitive), or None.

        Raises
        ------
        DataError
            If several keys match.
        """
        names = ALIASES[role]
        matches = [key for key in self.tensor_keys() if _basename(key) in names]
        if len(matches) > 1:
            raise DataError(
                f"ambiguous: {self.path} holds several candidates for {role}: "
                + ", ".join(sorted(matches))
            )
        return matches[0] if matches else None

    # -- hyperparameters --------------------------------------------------------------------

    def hparams(self, near_key: str | None = None) -> dict[str, tuple[object, str]]:
        """Hyperparameters stored in the file, not validated.

        HDF5: attributes of the root group, overridden by those of each group on the way to
        ``near_key`` (the group holding x). NPZ: scalar or small (<= 16 elements) entries.

        Parameters
        ----------
        near_key : str, optional
            Key of the x dataset; only used for HDF5.

        Returns
        -------
        dict
            Canonical name (``"stride"``, ``"padding"``, ``"dilation"``, ``"groups"``) ->
            ``(value, origin)``, the value as plain Python (int, float, str, nested lists)
            and the origin as text such as ``"run.h5 attribute 'pad' on /layer1"``.

        Raises
        ------
        DataError
            If one place holds both ``pad`` and ``padding``, or an entry cannot be read.
        """
        if self.format == "npz":
            return self._npz_hparams()
        if self.format == "hdf5":
            found: dict[str, tuple[object, str]] = {}
            try:
                for group_path in _group_chain(near_key):
                    found.update(self._attr_hparams(group_path))
            except DataError:
                raise
            except _CONTENT_ERRORS as exc:
                raise DataError(
                    f"{self.path}: cannot read its attributes (corrupt file: {_reason(exc)})"
                ) from exc
            return found
        return {}

    def _npz_hparams(self) -> dict[str, tuple[object, str]]:
        entries = {}
        for key in self.keys():
            if key not in FILE_KEYS:
                continue
            origin = f"{self.path} entry '{key}'"
            try:
                shape, _ = self.shape_dtype(key)
            except _CONTENT_ERRORS as exc:
                raise DataError(f"{origin}: cannot read ({_reason(exc)})") from exc
            if math.prod(shape) > MAX_HPARAM_SIZE:
                raise DataError(
                    f"{origin} has shape {shape}; a hyperparameter must be a scalar or hold "
                    f"at most {MAX_HPARAM_SIZE} values"
                )
            entries[key] = (_plain(self.read(key)), origin)
        return _canonical(entries, f"{self.path}")

    def _attr_hparams(self, group_path: str) -> dict[str, tuple[object, str]]:
        group = self._open_handle().get(group_path)
        if not isinstance(group, h5py.Group):
            return {}
        entries = {}
        for name in group.attrs:
            if name not in FILE_KEYS:
                continue
            origin = f"{self.path} attribute '{name}' on {group_path}"
            try:
                value = group.attrs[name]
            except _CONTENT_ERRORS as exc:
                raise DataError(f"{origin}: cannot read ({_reason(exc)})") from exc
            entries[name] = (_plain(value), origin)
        return _canonical(entries, f"{self.path} (on {group_path})")


def origin_text(tensor_file: TensorFile, key: str) -> str:
    """Where an array came from: ``"x.npy"``, ``"run.npz:W"`` or ``"run.h5:/layer1/W"``."""
    if tensor_file.format == "npy":
        return str(tensor_file.path)
    if tensor_file.format == "hdf5":
        return f"{tensor_file.path}:/{key.lstrip('/')}"
    return f"{tensor_file.path}:{key}"


def _nbytes(shape, dtype) -> int:
    count = 1
    for size in shape:
        count *= int(size)
    return count * np.dtype(dtype).itemsize


def _npz_members(npz) -> list[str]:
    """Names of the ``.npy`` members of an open npz, without the suffix."""
    return [name[: -len(".npy")] for name in npz.zip.namelist() if name.endswith(".npy")]


def _hdf5_datasets(root: h5py.Group) -> list[str]:
    """Paths (no leading ``/``) of every dataset reachable from ``root`` through hard links."""
    found: list[str] = []
    seen = {_address(root)}
    pending: list[tuple[str, h5py.Group]] = [("", root)]
    while pending:
        prefix, group = pending.pop()
        for name in group:
            if not isinstance(group.get(name, getlink=True), h5py.HardLink):
                continue
            child = group[name]
            path = prefix + name
            if isinstance(child, h5py.Dataset):
                found.append(path)
            elif isinstance(child, h5py.Group) and _address(child) not in seen:
                seen.add(_address(child))
                pending.append((path + "/", child))
    return found


def _address(group: h5py.Group) -> int:
    """The object-header address of a group: the same for every hard link to it."""
    return h5py.h5o.get_info(group.id).addr


def _npy_header(handle) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype from an open ``.npy`` stream, without reading the data."""
    version = np.lib.format.read_magic(handle)
    if version == (1, 0):
        shape, _, dtype = np.lib.format.read_array_header_1_0(handle)
    else:
        shape, _, dtype = np.lib.format.read_array_header_2_0(handle)
    return tuple(shape), dtype


def _group_chain(near_key: str | None) -> list[str]:
    """HDF5 groups from the root down to the one holding ``near_key``: ``["/", "/a", "/a/b"]``."""
    parts = [part for part in (near_key or "").strip("/").split("/") if part][:-1]
    return ["/"] + ["/" + "/".join(parts[: depth + 1]) for depth in range(len(parts))]


def _canonical(entries: Mapping[str, tuple[object, str]], where: str) -> dict:
    """Map alias names to canonical ones, refusing two aliases of one name in one place."""
    result: dict[str, tuple[object, str]] = {}
    for hparam in HPARAMS:
        present = [name for name in hparam.file_keys if name in entries]
        if len(present) > 1:
            raise DataError(
                f"{where}: both {' and '.join(repr(n) for n in present)} are given; keep one"
            )
        if present:
            result[hparam.name] = entries[present[0]]
    return result


def _plain(value):
    """Convert numpy scalars/arrays and bytes to plain Python (int, float, str, lists)."""
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, (np.ndarray, np.generic)):
        return _plain(value.tolist())
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if isinstance(value, h5py.Empty):
        return None
    return value
