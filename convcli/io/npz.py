"""The ``.npz`` format: a zip of ``.npy`` members; small members named like hyperparameters
(``stride``, ``pad``, ...; :data:`~convcli.hparams.FILE_KEYS`) hold the layer's hyperparameters.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

import numpy as np

from convcli.errors import DataError
from convcli.hparams import FILE_KEYS
from convcli.io.npy import npy_header
from convcli.io.reader import (
    CONTENT_ERRORS,
    CONVERT_PYTORCH,
    Hparams,
    Reader,
    Shape,
    Writer,
    canonical_hparams,
    check_hparam_header,
    plain,
    reason,
)

ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06")


def _refuse_pytorch(path: Path, names: list[str]) -> None:
    """A zip holding ``data.pkl`` is a PyTorch checkpoint (``torch.save``): a pickle, refused."""
    pickled = next((n for n in names if n == "data.pkl" or n.endswith("/data.pkl")), None)
    if pickled is not None:
        raise DataError(
            f"{path}: a PyTorch checkpoint (a zip holding {pickled}, a pickle); {CONVERT_PYTORCH}"
        )


class NpzReader(Reader):
    """An ``.npz`` file held open (its zip directory read once) until :meth:`close`."""

    format = "npz"
    label = ".npz"

    def __init__(self, path: Path, npz: Any, stream: IO[bytes]) -> None:
        super().__init__(path)
        self._npz: Any = npz
        self._stream: IO[bytes] | None = stream

    @classmethod
    def sniff(cls, path: Path, head: bytes) -> bool:
        return head.startswith(ZIP_MAGICS)

    @classmethod
    def open(cls, path: Path) -> NpzReader:
        # the stream is ours so that it is closed even if numpy fails
        stream = open(path, "rb")  # noqa: SIM115 - closed by close() or below
        try:
            npz = np.load(stream, allow_pickle=False)
            _refuse_pytorch(path, npz.zip.namelist())
            return cls(path, npz, stream)
        except BaseException:
            stream.close()
            raise

    def _open_npz(self) -> Any:
        if self._npz is None:
            raise DataError(f"{self.path}: file is closed")
        return self._npz

    def list_keys(self) -> list[str]:
        names = self._open_npz().zip.namelist()
        return [name[: -len(".npy")] for name in names if name.endswith(".npy")]

    def tensor_keys(self) -> list[str]:
        return [key for key in self.keys() if key not in FILE_KEYS]

    def header(self, key: str) -> tuple[Shape, np.dtype]:
        if key not in self.keys():
            raise DataError(f"{self.path}: no entry '{key}'; it {self.describe()}")
        with self._open_npz().zip.open(key + ".npy") as handle:
            return npy_header(handle)

    def stored_bytes(self, key: str) -> int | None:
        zip_file = self._open_npz().zip
        info = zip_file.getinfo(key + ".npy")
        with zip_file.open(info) as handle:
            npy_header(handle)
            return int(info.file_size) - handle.tell()

    def packed_bytes(self, key: str) -> int | None:
        """The member's compressed size in the zip (its size when stored uncompressed)."""
        return int(self._open_npz().zip.getinfo(key + ".npy").compress_size)

    def read_array(self, key: str) -> np.ndarray:
        if key not in self.keys():
            raise DataError(f"{self.path}: no entry '{key}'; it {self.describe()}")
        try:
            return np.asarray(self._open_npz()[key])
        except CONTENT_ERRORS as exc:
            raise DataError(f"{self.where(key)}: cannot read ({reason(exc)})") from exc

    def hparams(self, near_key: str | None = None) -> Hparams:
        """Scalar or small (at most 16 values) numeric or text members named like hyperparameters.

        ``near_key`` is not used: an npz has one set of hyperparameters.
        """
        entries = {}
        for key in self.keys():
            if key not in FILE_KEYS:
                continue
            origin = f"{self.path} entry '{key}'"
            try:
                shape, dtype = self.shape_dtype(key)
            except CONTENT_ERRORS as exc:
                raise DataError(f"{origin}: cannot read ({reason(exc)})") from exc
            check_hparam_header(origin, shape, dtype)
            entries[key] = (plain(self.read(key)), origin)
        return canonical_hparams(entries, f"{self.path}")

    def stat(self) -> os.stat_result:
        if self._stream is None:
            raise DataError(f"{self.path}: file is closed")
        return os.fstat(self._stream.fileno())

    def close(self) -> None:
        npz, stream = self._npz, self._stream
        self._npz = self._stream = None
        try:
            if npz is not None:
                npz.close()
        finally:
            if stream is not None:
                stream.close()


class NpzWriter(Writer):
    """Tensors and hyperparameters as members of one ``.npz`` (uncompressed)."""

    format = "npz"
    suffixes = (".npz",)

    @classmethod
    def check(
        cls, path: Path, tensors: Mapping[str, np.ndarray], attrs: Mapping[str, np.ndarray]
    ) -> None:
        for name in attrs:
            if name in tensors:
                raise DataError(f"{path}: '{name}' is given both as a tensor and an attribute")

    @classmethod
    def write(
        cls, fd: int, temp: Path, tensors: Mapping[str, np.ndarray], attrs: Mapping[str, object]
    ) -> None:
        members = {**tensors, **{name: np.asarray(value) for name, value in attrs.items()}}
        with os.fdopen(fd, "wb", closefd=False) as handle:
            savez: Any = np.savez  # looked up here: member names are free-form keywords
            savez(handle, **members)
            handle.flush()
            os.fsync(handle.fileno())
