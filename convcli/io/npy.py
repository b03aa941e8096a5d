"""The ``.npy`` format: one unnamed array (key ``""``), read with ``allow_pickle=False``.

:func:`npy_header` also reads the headers of the members of an ``.npz``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import IO

import numpy as np

from convcli.errors import DataError
from convcli.io.reader import CONTENT_ERRORS, Reader, Shape, reason

NPY_MAGIC = b"\x93NUMPY"


def npy_header(handle: IO[bytes]) -> tuple[Shape, np.dtype]:
    """Shape and dtype from an open ``.npy`` stream positioned at its start; no data is read.

    The stream is left at the first byte of the data.
    """
    version = np.lib.format.read_magic(handle)
    if version == (1, 0):
        shape, _, dtype = np.lib.format.read_array_header_1_0(handle)
    else:
        shape, _, dtype = np.lib.format.read_array_header_2_0(handle)
    return tuple(shape), dtype


class NpyReader(Reader):
    """A ``.npy`` file. It is not held open: every call opens its path again.

    Rows are not streamed (:meth:`~convcli.io.reader.Reader.rows` is None): a ``.npy`` is
    loaded whole, within the memory guard.
    """

    format = "npy"
    label = ".npy"

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

    def read_array(self, key: str) -> np.ndarray:
        if key:
            raise DataError(
                f"{self.path}: a .npy file holds one unnamed array; refer to it as "
                f"{self.path} without ':{key}'"
            )
        try:
            return np.load(self.path, allow_pickle=False)
        except CONTENT_ERRORS as exc:
            raise DataError(f"{self.path}: cannot read .npy array ({reason(exc)})") from exc

    def stat(self) -> os.stat_result:
        return os.stat(self.path)

    def close(self) -> None:
        pass

    def where(self, key: str) -> str:
        return str(self.path)

    def describe(self) -> str:
        return f"holds one unnamed array {self._info('')}"
