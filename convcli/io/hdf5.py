"""The HDF5 format: datasets reached through hard links only, hyperparameters as attributes.

Soft and external links, external storage and virtual datasets can point into other files,
so they are never followed or read. Hyperparameters are attributes of the root group,
overridden by those of each group on the way to the dataset holding x. Datasets can be read
a block of rows at a time (:meth:`Hdf5Reader.rows`), which is what streaming uses.
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

import h5py
import numpy as np

from convcli.errors import DataError
from convcli.hparams import FILE_KEYS
from convcli.io.reader import (
    CONTENT_ERRORS,
    Hparams,
    Reader,
    Shape,
    Writer,
    canonical_hparams,
    check_hparam_header,
    native,
    plain,
    reason,
    signals_held,
)

HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"

#: Names of HDF5 filters by id: the built-in ones and the registered plugins met most often
#: (https://github.com/HDFGroup/hdf5_plugins/blob/master/docs/RegisteredFilterPlugins.md).
FILTER_NAMES = {
    1: "deflate (gzip)",
    2: "shuffle",
    3: "Fletcher32 checksum",
    4: "SZIP",
    5: "N-bit",
    6: "scale-offset",
    305: "LZO",
    307: "BZIP2",
    32000: "LZF",
    32001: "Blosc",
    32004: "LZ4",
    32008: "Bitshuffle",
    32013: "ZFP",
    32015: "Zstandard",
    32017: "SZ",
    32026: "Blosc2",
}
FLETCHER32 = 3


class Hdf5Reader(Reader):
    """An HDF5 file held open (read-only, through h5py) until :meth:`close`."""

    format = "hdf5"
    label = "HDF5"

    def __init__(self, path: Path, h5: h5py.File) -> None:
        super().__init__(path)
        self._h5: h5py.File | None = h5

    @classmethod
    def sniff(cls, path: Path, head: bytes) -> bool:
        """The signature at offset 0, or after a user block (offset 512, 1024, ...)."""
        if head.startswith(HDF5_MAGIC):
            return True
        try:
            return bool(h5py.is_hdf5(str(path)))
        except (OSError, ValueError):
            return False

    @classmethod
    def open(cls, path: Path) -> Hdf5Reader:
        return cls(path, h5py.File(path, "r"))

    def _root(self) -> h5py.File:
        if self._h5 is None:
            raise DataError(f"{self.path}: file is closed")
        return self._h5

    def where(self, key: str) -> str:
        return f"{self.path}:/{key.lstrip('/')}"

    def list_keys(self) -> list[str]:
        """Paths (no leading ``/``) of every dataset reachable through hard links."""
        root = self._root()
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

    def dataset(self, key: str) -> h5py.Dataset:
        """The dataset at ``key`` (leading ``/`` optional), reached through hard links only.

        Raises
        ------
        DataError
            No such dataset, a group, or a soft or external link on the way.
        """
        node = self._root()
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

    def header(self, key: str) -> tuple[Shape, np.dtype]:
        dataset = self.dataset(key)
        return tuple(dataset.shape or ()), dataset.dtype

    def stored_bytes(self, key: str) -> int | None:
        """None (HDF5 checks its own storage); refuses virtual and external datasets, and
        datasets that need a filter this HDF5 library does not have (named by id and name)."""
        dataset = self.dataset(key)
        missing = [(code, name) for code, name in _filters(dataset) if not _available(code)]
        if missing:
            needed = ", ".join(f"{code} ({name})" for code, name in missing)
            raise DataError(
                f"{self.where(key)}: compressed with HDF5 filter {needed}, which this HDF5 "
                "library does not have; install a plugin providing it (e.g. the hdf5plugin "
                "package) or save the data without it"
            )
        if dataset.is_virtual:
            raise DataError(
                f"{self.where(key)}: is a virtual dataset, which reads other files; refused"
            )
        if dataset.external:
            raise DataError(
                f"{self.where(key)}: keeps its data in external files "
                f"({', '.join(str(e[0]) for e in dataset.external)}); refused"
            )
        return None

    def packed_bytes(self, key: str) -> int | None:
        """Bytes allocated to the dataset in the file (chunks written, compressed), capped by
        the file's size; 0 for a dataset never written (it reads as its fill value)."""
        stored = int(self.dataset(key).id.get_storage_size())
        return min(stored, self.stat().st_size)

    def read_array(self, key: str) -> np.ndarray:
        dataset = self.dataset(key)
        try:
            value = dataset[()]
        except CONTENT_ERRORS as exc:
            raise read_failure(dataset, self.where(key), exc) from exc
        if isinstance(value, h5py.Empty):
            raise DataError(f"{self.where(key)}: empty dataset (no data space)")
        return native(np.asarray(value))

    def rows(self, key: str) -> Hdf5Rows:
        """Blocks of rows of ``key`` (checked first: no virtual or external data)."""
        self.stored_bytes(key)
        return Hdf5Rows(self.dataset(key), self.where(key))

    def hparams(self, near_key: str | None = None) -> Hparams:
        """Attributes of the root group, overridden by each group down to ``near_key``'s.

        Parameters
        ----------
        near_key : str, optional
            Key of the x dataset; without it only the root's attributes count.
        """
        found: Hparams = {}
        try:
            for group_path in _group_chain(near_key):
                found.update(self._attr_hparams(group_path))
        except DataError:
            raise
        except CONTENT_ERRORS as exc:
            raise DataError(
                f"{self.path}: cannot read its attributes (corrupt file: {reason(exc)})"
            ) from exc
        return found

    def _attr_hparams(self, group_path: str) -> Hparams:
        group = self._hard_group(group_path)
        if group is None:
            return {}
        entries = {}
        for name in group.attrs:
            if name not in FILE_KEYS:
                continue
            origin = f"{self.path} attribute '{name}' on {group_path}"
            try:
                header = group.attrs.get_id(name)
                check_hparam_header(origin, tuple(header.shape or ()), header.dtype)
                value = group.attrs[name]
            except DataError:
                raise
            except CONTENT_ERRORS as exc:
                raise DataError(f"{origin}: cannot read ({reason(exc)})") from exc
            entries[name] = (None if isinstance(value, h5py.Empty) else plain(value), origin)
        return canonical_hparams(entries, f"{self.path} (on {group_path})")

    def _hard_group(self, group_path: str) -> h5py.Group | None:
        """The group at ``group_path`` if reached through hard links only (else None: a soft
        or external link is never followed, not even to read attributes)."""
        node: h5py.Group = self._root()
        for part in (part for part in group_path.split("/") if part):
            if not isinstance(node.get(part, getlink=True), h5py.HardLink):
                return None
            child = node[part]
            if not isinstance(child, h5py.Group):
                return None
            node = child
        return node

    def stat(self) -> os.stat_result:
        return os.fstat(self._root().id.get_vfd_handle())

    def close(self) -> None:
        h5, self._h5 = self._h5, None
        if h5 is not None:
            h5.close()


class Hdf5Rows:
    """One HDF5 dataset read a block at a time through its open file."""

    def __init__(self, dataset: h5py.Dataset, where: str) -> None:
        self._dataset = dataset
        self._where = where

    def read(self, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` of the first axis: shape ``(stop - start, *shape[1:])``."""
        return self[start:stop]

    def __getitem__(self, index: Any) -> np.ndarray:
        """Any basic index of the dataset, in memory and in native byte order."""
        try:
            return native(np.asarray(self._dataset[index]))
        except CONTENT_ERRORS as exc:
            raise read_failure(self._dataset, self._where, exc) from exc


def read_failure(dataset: h5py.Dataset, where: str, exc: BaseException) -> DataError:
    """What went wrong reading ``dataset``, in words: a failed Fletcher32 checksum or filter
    is corruption (missing filters are refused before reading, by ``stored_bytes``)."""
    filters = _filters(dataset)
    if filters and "filter" in str(exc).lower():
        if any(code == FLETCHER32 for code, _ in filters):
            return DataError(
                f"{where}: corrupt data: its Fletcher32 checksum does not match ({reason(exc)})"
            )
        names = ", ".join(name for _, name in filters)
        return DataError(f"{where}: corrupt data: the {names} filter failed ({reason(exc)})")
    return DataError(f"{where}: cannot read ({reason(exc)})")


def _filters(dataset: h5py.Dataset) -> list[tuple[int, str]]:
    """The dataset's filter pipeline: (id, name) per filter, in order."""
    plist = dataset.id.get_create_plist()
    found = []
    for index in range(plist.get_nfilters()):
        code, _, _, stored_name = plist.get_filter(index)
        stored = "".join(c for c in stored_name.decode("ascii", "replace") if c.isprintable())
        name = FILTER_NAMES.get(code) or stored[:40] or "unnamed"
        found.append((int(code), name))
    return found


def _available(code: int) -> bool:
    return bool(h5py.h5z.filter_avail(code))


class Hdf5Writer(Writer):
    """Tensors as datasets at the root, hyperparameters as root attributes."""

    format = "hdf5"
    suffixes = (".h5", ".hdf5")

    @classmethod
    def write(
        cls, fd: int, temp: Path, tensors: Mapping[str, np.ndarray], attrs: Mapping[str, object]
    ) -> None:
        with Hdf5Output(fd) as output:
            for name, array in tensors.items():
                output.create(name, array)
            output.attrs(attrs)


class Hdf5Output:
    """A new HDF5 file written through an open descriptor, safe against a full disk and
    against signals.

    HDF5 does not survive a failed write: its error stack floods stderr and closing the file
    afterwards can crash the process. So the library writes through a stream that never
    fails: the first ``OSError`` (``ENOSPC``, ``EFBIG``, ``EIO``) is kept and every later
    write is dropped, the file closes normally, and the kept error is raised by the method
    that met it (or when the context ends). Each call into HDF5 holds SIGINT and SIGTERM
    (:func:`~convcli.io.reader.signals_held`), so an interruption is raised between calls,
    never inside the library. After an error the file is incomplete: the caller removes it
    (:func:`convcli.io.writing.atomic_output` does, and owns and closes ``fd``).
    """

    def __init__(self, fd: int) -> None:
        self._stream = _KeepFirstError(fd)
        with signals_held():
            self._file = h5py.File(self._stream, "w")
        self.check()

    def create(self, name: str, array: np.ndarray) -> None:
        """Store ``array`` (any shape) as the dataset ``name`` at the root."""
        with signals_held():
            self._file.create_dataset(name, data=array)
        self.check()

    def write_rows(self, name: str, shape: tuple[int, ...], start: int, rows: np.ndarray) -> None:
        """Write ``rows`` (``(k, *shape[1:])``) at rows ``start:start + k`` of the dataset
        ``name``, created with ``shape`` and the rows' dtype on first use."""
        with signals_held():
            if name not in self._file:
                self._file.create_dataset(name, shape=shape, dtype=rows.dtype)
            self._file[name][start : start + len(rows)] = rows
        self.check()

    def attrs(self, attrs: Mapping[str, object]) -> None:
        """Store hyperparameters as root attributes (see :func:`write_hdf5_attrs`)."""
        with signals_held():
            write_hdf5_attrs(self._file, attrs)
        self.check()

    def check(self) -> None:
        """Raise the ``OSError`` of the first failed write, if any."""
        if self._stream.error is not None:
            raise self._stream.error

    def __enter__(self) -> Hdf5Output:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        try:
            with signals_held():
                self._file.close()
        except Exception:
            if self._stream.error is None and error is None:
                raise
        if error is None or isinstance(error, Exception):
            self.check()  # a failed write is the cause of whatever followed it


class _KeepFirstError(io.RawIOBase):
    """A file descriptor as HDF5's file object: positioned reads and writes; a write that
    fails is remembered in ``error`` and reported as done, and so are all later ones."""

    def __init__(self, fd: int) -> None:
        super().__init__()
        self._fd = fd
        self._position = 0
        self.error: OSError | None = None

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        data = os.pread(self._fd, len(view), self._position)
        view[: len(data)] = data
        self._position += len(data)
        return len(data)

    def write(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        if self.error is None:
            try:
                done = 0
                while done < len(view):
                    done += os.pwrite(self._fd, view[done:], self._position + done)
            except OSError as exc:
                self.error = exc
        self._position += len(view)
        return len(view)

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        if whence == os.SEEK_CUR:
            offset += self._position
        elif whence == os.SEEK_END:
            offset += os.fstat(self._fd).st_size
        self._position = offset
        return offset

    def tell(self) -> int:
        return self._position

    def truncate(self, size: int | None = None) -> int:
        size = self._position if size is None else size
        if self.error is None:
            try:
                os.ftruncate(self._fd, size)
            except OSError as exc:
                self.error = exc
        return size


def write_hdf5_attrs(h5: h5py.Group, attrs: Mapping[str, object]) -> None:
    """Store hyperparameters as attributes of ``h5`` that :meth:`Hdf5Reader.hparams` reads back.

    Parameters
    ----------
    h5 : h5py.Group
        Usually the root of a file open for writing.
    attrs : mapping of str to object
        Int, float, str or (nested) lists of them, e.g. ``{"stride": [2, 2], "groups": 1}``.
    """
    for name, value in attrs.items():
        h5.attrs[name] = _hdf5_attr(value)


def _hdf5_attr(value: object) -> Any:
    """An attribute value h5py can store (numpy unicode arrays become variable-length str)."""
    if isinstance(value, str):
        return value
    array = np.asarray(value)
    if array.dtype.kind == "U":
        return array.astype(h5py.string_dtype())
    return array


def _address(group: h5py.Group) -> int:
    """The object-header address of a group: the same for every hard link to it."""
    return int(h5py.h5o.get_info(group.id).addr)


def _group_chain(near_key: str | None) -> list[str]:
    """Groups from the root down to the one holding ``near_key``: ``["/", "/a", "/a/b"]``."""
    parts = [part for part in (near_key or "").strip("/").split("/") if part][:-1]
    return ["/"] + ["/" + "/".join(parts[: depth + 1]) for depth in range(len(parts))]
