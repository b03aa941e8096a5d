"""The ``.npy`` format: one unnamed array (key ``""``), read with ``allow_pickle=False``.

:func:`npy_header` also reads the headers of the members of an ``.npz``. A C-order ``.npy``
can be read a block of rows at a time (:class:`NpyRows`, for streaming): each block is read
at its offset in the file into a fresh buffer, so that memory held stays one block whatever
the file's size (a memory map kept open would hold, resident, every page read so far).
"""

from __future__ import annotations

import operator
import os
from pathlib import Path
from typing import IO, Any

import numpy as np

from convcli.errors import DataError
from convcli.io.reader import CONTENT_ERRORS, Reader, Shape, native, reason

NPY_MAGIC = b"\x93NUMPY"


def npy_header(handle: IO[bytes]) -> tuple[Shape, np.dtype]:
    """Shape and dtype from an open ``.npy`` stream positioned at its start; no data is read.

    The stream is left at the first byte of the data.

    Raises
    ------
    ValueError
        Also for a shape with a negative dimension, which numpy's header parser accepts.
    """
    shape, dtype, _, _ = npy_layout(handle)
    return shape, dtype


def npy_layout(handle: IO[bytes]) -> tuple[Shape, np.dtype, bool, int]:
    """Shape, dtype, Fortran order and the data's offset, from an open ``.npy`` at its start."""
    version = np.lib.format.read_magic(handle)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(handle)
    else:
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(handle)
    if any(size < 0 for size in shape):
        raise ValueError(f"shape {tuple(shape)} has a negative dimension")
    return tuple(shape), dtype, bool(fortran), handle.tell()


class NpyReader(Reader):
    """A ``.npy`` file. Headers and whole-array reads open its path again on every call.

    :meth:`rows` reads a C-order array a block of rows at a time through one handle, opened
    on first use and held until :meth:`close` (:meth:`stat` is then that handle's). A
    Fortran-order array is not streamed (each row is scattered over the whole file): it is
    loaded whole, within the memory guard.
    """

    format = "npy"
    label = ".npy"

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self._handle: IO[bytes] | None = None

    @classmethod
    def sniff(cls, path: Path, head: bytes) -> bool:
        return head.startswith(NPY_MAGIC)

    @classmethod
    def open(cls, path: Path) -> NpyReader:
        return cls(path)

    def list_keys(self) -> list[str]:
        return [""]

    def header(self, key: str) -> tuple[Shape, np.dtype]:
        with open(self.path, "rb") as handle:
            return npy_header(handle)

    def stored_bytes(self, key: str) -> int | None:
        with open(self.path, "rb") as handle:
            npy_header(handle)
            return os.fstat(handle.fileno()).st_size - handle.tell()

    def _check_key(self, key: str) -> None:
        if key:
            raise DataError(
                f"{self.path}: a .npy file holds one unnamed array; refer to it as "
                f"{self.path} without ':{key}'"
            )

    def fortran_order(self) -> bool:
        """True when the array is stored column-major (not streamable)."""
        with open(self.path, "rb") as handle:
            return npy_layout(handle)[2]

    def streaming_hint(self, key: str) -> str:
        if self.fortran_order():
            return (
                "save it in C order (numpy.ascontiguousarray) to stream it: a .npy in "
                "Fortran order cannot be read a block of rows at a time"
            )
        return super().streaming_hint(key)

    def rows(self, key: str) -> NpyRows | None:
        """Rows of the array read at their offsets; None for a Fortran-order array."""
        self._check_key(key)
        if self._handle is None:
            self._handle = open(self.path, "rb", buffering=0)  # noqa: SIM115 (held until close)
        self._handle.seek(0)
        try:
            shape, dtype, fortran, offset = npy_layout(self._handle)
        except CONTENT_ERRORS as exc:
            raise DataError(f"{self.path}: unreadable header ({reason(exc)})") from exc
        if fortran or not shape or dtype.hasobject:
            return None
        return NpyRows(self._handle.fileno(), offset, shape, dtype, str(self.path))

    def read_array(self, key: str) -> np.ndarray:
        self._check_key(key)
        try:
            return np.load(self.path, allow_pickle=False)
        except CONTENT_ERRORS as exc:
            raise DataError(f"{self.path}: cannot read .npy array ({reason(exc)})") from exc

    def stat(self) -> os.stat_result:
        if self._handle is not None:
            return os.fstat(self._handle.fileno())
        return os.stat(self.path)

    def close(self) -> None:
        handle, self._handle = self._handle, None
        if handle is not None:
            handle.close()

    def where(self, key: str) -> str:
        return str(self.path)

    def describe(self) -> str:
        return f"holds one unnamed array {self._info('')}"


class NpyRows:
    """The rows of a C-order ``.npy`` array, read with ``os.preadv`` at their file offsets.

    Parameters
    ----------
    fd : int
        An open descriptor of the file (owned by the caller, e.g. :class:`NpyReader`).
    offset : int
        Byte offset of the first element.
    shape : tuple of int
        The array's shape ``(n, *rest)``; rows are blocks of its first axis.
    dtype : numpy.dtype
        The stored dtype (either byte order); rows come back in native byte order.
    where : str
        The file, for messages.
    """

    def __init__(self, fd: int, offset: int, shape: Shape, dtype: np.dtype, where: str) -> None:
        self._fd = fd
        self._offset = offset
        self.shape = tuple(shape)
        self._dtype = dtype
        self._where = where
        self._row_bytes = dtype.itemsize * int(np.prod(self.shape[1:], dtype=object))

    def read(self, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` of the first axis: shape ``(stop - start, *shape[1:])``.

        Raises
        ------
        DataError
            When the file ends before the rows do (truncated since its header was read).
        """
        block = np.empty((max(stop - start, 0), *self.shape[1:]), dtype=self._dtype)
        view = memoryview(block.reshape(-1).view(np.uint8).data)
        position = self._offset + start * self._row_bytes
        done = 0
        while done < len(view):
            try:
                count = os.preadv(self._fd, [view[done:]], position + done)
            except OSError as exc:
                raise DataError(f"{self._where}: cannot read ({reason(exc)})") from exc
            if count == 0:
                raise DataError(
                    f"{self._where}: the file ends before rows {start}:{stop} of its array "
                    "(truncated or corrupt)"
                )
            done += count
        return native(block)

    def __getitem__(self, index: Any) -> np.ndarray:
        """Any basic index (ints, slices, ``...``), read a row at a time, native byte order."""
        first, rest = _split_first(index if isinstance(index, tuple) else (index,), self.shape)
        in_row = (0, *rest)
        if isinstance(first, slice):
            picked = [self.read(i, i + 1)[in_row] for i in range(self.shape[0])[first]]
            if picked:
                return np.stack(picked)
            empty = np.broadcast_to(np.zeros((), self._dtype.newbyteorder("=")), self.shape)
            whole = (first, *rest)
            return np.array(empty[whole])
        row = range(self.shape[0])[operator.index(first)]
        return self.read(row, row + 1)[in_row]


def _split_first(index: tuple, shape: Shape) -> tuple[Any, tuple]:
    """``index`` as (what it picks on the first axis, the index of the other axes)."""
    if not index:
        return slice(None), ()
    head, rest = index[0], index[1:]
    if head is Ellipsis:
        explicit = sum(item is not Ellipsis for item in rest)
        if explicit < len(shape):  # the ellipsis covers the first axis
            return slice(None), (Ellipsis, *rest)
        return _split_first(rest, shape)
    return head, rest
