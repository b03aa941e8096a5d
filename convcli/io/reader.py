"""The interface every file format's reader and writer implements, and what they share.

A format is one module (:mod:`~convcli.io.npy`, :mod:`~convcli.io.npz`,
:mod:`~convcli.io.hdf5`, :mod:`~convcli.io.safetensors`) with a :class:`Reader` subclass
(and, for output formats, a :class:`Writer` subclass), listed once in
:mod:`convcli.io.formats`. Readers answer from headers where they can (keys, shape, dtype,
stored bytes) and read data only in :meth:`Reader.read_array` and through
:meth:`Reader.rows`; they never unpickle.

Reader methods may raise what numpy, zipfile and h5py raise on damaged content
(:data:`CONTENT_ERRORS`); :class:`~convcli.io.tensorfile.TensorFile` turns those into
:class:`~convcli.errors.DataError`. Messages that only a format can word well (a missing
HDF5 dataset, a filter that is not available) are raised by the reader as ``DataError``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import tokenize
import zipfile
import zlib
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, ClassVar, Protocol

import numpy as np

from convcli.errors import DataError, SparseDataError
from convcli.hparams import HPARAMS
from convcli.memory import nbytes
from convcli.units import format_size

MAX_LISTED = 20
#: What to do with a PyTorch checkpoint (a pickle), said when one is refused.
CONVERT_PYTORCH = (
    "convcli never unpickles; convert it with safetensors.torch.save_file("
    "model.state_dict(), 'weights.safetensors') and pass that file"
)
#: The most values a hyperparameter entry or attribute may hold (a 3-D padding has 6).
MAX_HPARAM_SIZE = 16

#: A dataset declaring more than this many times the bytes the file stores for it is refused
#: (unless the caller allows sparse data): real data rarely compresses beyond ~100x, and
#: deflate cannot exceed ~1032x, so more means a never-written (fill-value) dataset or a bomb.
SPARSE_RATIO = 1000
#: Declared sizes up to this are never refused as sparse: reading them costs little.
SPARSE_FLOOR = 16 * 2**20

#: What numpy, zipfile and h5py raise on truncated, corrupt or unsupported content.
CONTENT_ERRORS: tuple[type[BaseException], ...] = (
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

#: Found hyperparameters: canonical name -> (plain value, origin text).
Hparams = dict[str, tuple[object, str]]
Shape = tuple[int, ...]


_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """Hold SIGINT and SIGTERM until the block ends, then let them act.

    Around calls into a C library that calls back into Python (HDF5 writing through
    :class:`~convcli.io.hdf5.Hdf5Output`'s stream) and around steps that must not be cut in
    two (a temporary file created and registered for removal): the ``KeyboardInterrupt`` of
    a Ctrl-C is then raised after the block, never inside a callback where the library
    would take it for a failed write. The signals' Python handlers are swapped for one that
    notes them; afterwards the old handlers are back and each noted signal is raised again.
    Only the main thread handles signals; elsewhere this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    noted: list[int] = []
    handlers = {signum: signal.getsignal(signum) for signum in _STOP_SIGNALS}
    swapped = [signum for signum, handler in handlers.items() if handler is not None]
    try:
        for signum in swapped:
            signal.signal(signum, lambda number, frame: noted.append(number))
        yield
    finally:
        for signum in swapped:
            signal.signal(signum, handlers[signum])
        for number in dict.fromkeys(noted):
            signal.raise_signal(number)


def reason(exc: BaseException) -> str:
    """One line describing ``exc`` for an error message (its first line, else its type)."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


class RowReader(Protocol):
    """Rows of one array read on demand: blocks of its first axis, or any basic index."""

    def read(self, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` of the first axis: shape ``(stop - start, *shape[1:])``."""
        ...

    def __getitem__(self, index: Any) -> np.ndarray: ...


class Reader(ABC):
    """One open file of one format.

    Keys name the arrays: npz member names (without ``.npy``), HDF5 dataset paths without
    the leading ``/`` (``"layer1/W"``), ``""`` for the single unnamed array of a ``.npy``.
    Subclasses implement the abstract hooks; this class adds the sorted, cached key list,
    header errors as :class:`~convcli.errors.DataError` and :meth:`describe`.

    Attributes
    ----------
    format : str
        Short name: ``"npy"``, ``"npz"``, ``"hdf5"``.
    label : str
        Name in messages: ``".npy"``, ``".npz"``, ``"HDF5"``.
    path : pathlib.Path
        The file, as it was given.
    """

    format: ClassVar[str]
    label: ClassVar[str]

    def __init__(self, path: Path) -> None:
        self.path = path
        self._keys: list[str] | None = None

    # -- hooks of each format ---------------------------------------------------------------

    @classmethod
    @abstractmethod
    def sniff(cls, path: Path, head: bytes) -> bool:
        """True if a regular file whose first bytes are ``head`` is of this format."""

    @classmethod
    @abstractmethod
    def open(cls, path: Path) -> Reader:
        """Open ``path`` (known to be of this format); may raise :data:`CONTENT_ERRORS`."""

    @abstractmethod
    def list_keys(self) -> list[str]:
        """Every array in the file, in any order."""

    @abstractmethod
    def header(self, key: str) -> tuple[Shape, np.dtype]:
        """Shape and dtype of ``key`` from its header only (no data is read)."""

    @abstractmethod
    def stored_bytes(self, key: str) -> int | None:
        """Bytes of data the file really holds for ``key``; None when not knowable.

        Raises :class:`~convcli.errors.DataError` for arrays that must never be read
        (HDF5 data kept in other files).
        """

    def packed_bytes(self, key: str) -> int | None:
        """Bytes the file spends on ``key``'s data, compressed or not (at most the file's
        size); None when the format stores data as declared (checked by :meth:`stored_bytes`).
        """
        return None

    @abstractmethod
    def read_array(self, key: str) -> np.ndarray:
        """Load ``key`` into memory (checks of the header are the caller's)."""

    @abstractmethod
    def stat(self) -> os.stat_result:
        """``fstat`` of the file being read (``stat`` of its path if it is not held open)."""

    @abstractmethod
    def close(self) -> None:
        """Release the file (safe to call twice)."""

    def hparams(self, near_key: str | None = None) -> Hparams:
        """Hyperparameters stored in the file (none unless the format overrides this)."""
        return {}

    def stored_dtype(self, key: str) -> str | None:
        """The dtype in the file when it differs from :meth:`header`'s (a reader that
        converts on reading: safetensors' ``"bfloat16"`` read as float32); else None."""
        return None

    def metadata(self) -> dict[str, str]:
        """Free-form text the file stores about itself (safetensors' ``__metadata__``)."""
        return {}

    def rows(self, key: str) -> RowReader | None:
        """A reader of ``key``'s rows without loading it whole; None if the format cannot."""
        return None

    def streaming_hint(self, key: str) -> str:
        """What would let ``key`` be streamed instead of loaded whole, for messages."""
        return "store it in HDF5 or as a .npy to stream it"

    def where(self, key: str) -> str:
        """Where an array is, for messages: ``"run.npz:W"`` (formats may override)."""
        return f"{self.path}:{key}"

    def tensor_keys(self) -> list[str]:
        """:meth:`keys` without entries that hold hyperparameters rather than tensors."""
        return self.keys()

    # -- shared -----------------------------------------------------------------------------

    def keys(self) -> list[str]:
        """Every array in the file, sorted (cached after the first call)."""
        if self._keys is None:
            try:
                self._keys = sorted(self.list_keys())
            except CONTENT_ERRORS as exc:
                raise DataError(
                    f"{self.path}: cannot list its contents (corrupt file: {reason(exc)})"
                ) from exc
        return list(self._keys)

    def shape_dtype(self, key: str) -> tuple[Shape, np.dtype]:
        """:meth:`header`, with damaged headers raised as :class:`~convcli.errors.DataError`."""
        try:
            return self.header(key)
        except DataError:
            raise
        except CONTENT_ERRORS as exc:
            raise DataError(f"{self.where(key)}: unreadable header ({reason(exc)})") from exc

    def declared_bytes(self, key: str, allow_sparse: bool = False) -> int:
        """Check what the header of ``key`` declares before any data is read; return its bytes.

        Refuses object dtypes, a declared size the file cannot hold (an absurd header, or a
        compressed member that would expand beyond its declared length), what the format
        refuses in :meth:`stored_bytes` (HDF5 data kept in other files, a missing filter),
        and, unless ``allow_sparse``, a declared size above :data:`SPARSE_FLOOR` and more
        than :data:`SPARSE_RATIO` times what the file stores for it
        (:class:`~convcli.errors.SparseDataError`).
        """
        shape, dtype = self.shape_dtype(key)
        if dtype.hasobject:
            raise DataError(
                f"{self.where(key)}: holds Python objects; convcli never unpickles data"
            )
        declared = nbytes(shape, dtype)
        try:
            available = self.stored_bytes(key)
            packed = None if allow_sparse else self.packed_bytes(key)
        except DataError:
            raise
        except CONTENT_ERRORS as exc:
            raise DataError(f"{self.where(key)}: unreadable header ({reason(exc)})") from exc
        if available is not None and declared > available:
            raise DataError(
                f"{self.where(key)}: header declares shape {shape} {dtype} ({declared:,} bytes) "
                f"but only {available:,} bytes of data follow (truncated or corrupt)"
            )
        if packed is not None and declared > max(SPARSE_FLOOR, SPARSE_RATIO * packed):
            raise SparseDataError(
                f"{self.where(key)}: declares shape {shape} {dtype} ({format_size(declared)}) but "
                f"the file stores {format_size(packed)} of it, over {SPARSE_RATIO}x less (data "
                "never written, or compressed beyond what real data allows); refused before "
                "reading"
            )
        return declared

    def read(self, key: str, allow_sparse: bool = False) -> np.ndarray:
        """Load one array after :meth:`declared_bytes`; refuse objects and strings.

        Returns
        -------
        numpy.ndarray
            The array, with the file's shape and dtype, in native byte order (``>f8`` data
            comes back as native float64).
        """
        self.declared_bytes(key, allow_sparse)
        array = self.read_array(key)
        if array.dtype.hasobject:
            raise DataError(f"{self.where(key)}: holds Python objects or strings, not numbers")
        return native(array)

    def describe(self) -> str:
        """Short listing for error messages, from headers only.

        Returns
        -------
        str
            E.g. ``"holds: A_prev (10, 4, 4, 3) float64, W (2, 2, 3, 8) float64, pad ()"``.
        """
        keys = self.keys()
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


class Writer(ABC):
    """How one output format stores named arrays and hyperparameters.

    :func:`convcli.io.writing.write_tensors` checks the target, validates the arrays and
    hands the writer a temporary file that it renames into place afterwards.

    Attributes
    ----------
    format : str
        Short name, as :attr:`Reader.format`.
    suffixes : tuple of str
        Lower-case extensions that select this writer (``(".h5", ".hdf5")``).
    """

    format: ClassVar[str]
    suffixes: ClassVar[tuple[str, ...]]

    @classmethod
    def check(
        cls, path: Path, tensors: Mapping[str, np.ndarray], attrs: Mapping[str, np.ndarray]
    ) -> None:
        """Refuse (DataError) what this format cannot store, before any file is created."""
        return None

    @classmethod
    @abstractmethod
    def write(
        cls, fd: int, temp: Path, tensors: Mapping[str, np.ndarray], attrs: Mapping[str, object]
    ) -> None:
        """Write the file at ``temp`` (its descriptor ``fd`` is open for writing).

        ``tensors`` are numeric arrays; ``attrs`` are hyperparameters as given (int, float,
        str or nested lists), already checked to hold no Python objects. Write through
        ``fd`` and leave it open: the caller closes it, fsyncs and renames the file.
        """


def canonical_hparams(entries: Mapping[str, tuple[object, str]], where: str) -> Hparams:
    """Map file names (``pad``, ``strides``) to canonical ones, refusing two in one place.

    Parameters
    ----------
    entries : mapping of str to (object, str)
        File name -> (value, origin) as found in one place (an npz, one HDF5 group).
    where : str
        That place, for the message.
    """
    result: Hparams = {}
    for hparam in HPARAMS:
        present = [name for name in hparam.file_keys if name in entries]
        if len(present) > 1:
            raise DataError(
                f"{where}: both {' and '.join(repr(n) for n in present)} are given; keep one"
            )
        if present:
            result[hparam.name] = entries[present[0]]
    return result


def check_hparam_header(origin: str, shape: Shape, dtype: np.dtype) -> None:
    """Refuse, before reading it, a stored hyperparameter that cannot be one: structured
    (compound) values, or more than :data:`MAX_HPARAM_SIZE` of them.

    Parameters
    ----------
    origin : str
        Where it is, for the message (``"run.h5 attribute 'stride' on /"``).
    shape, dtype
        Its header: any shape, any dtype; numbers and strings pass.
    """
    if dtype.names is not None or dtype.kind not in "biufSUO":
        kind = "compound" if dtype.names is not None else dtype.name
        raise DataError(
            f"{origin}: holds {kind} values; a "
            "hyperparameter must be a number, a list of numbers or a word"
        )
    count = 1
    for size in shape:
        count *= int(size)
    if count > MAX_HPARAM_SIZE:
        raise DataError(
            f"{origin}: an array of {count} values; a hyperparameter must be a scalar or hold "
            f"at most {MAX_HPARAM_SIZE} values"
        )


def native(array: np.ndarray) -> np.ndarray:
    """``array`` in native byte order (a copy only when it is byte-swapped); dtype kept."""
    if array.dtype.isnative or array.dtype.names is not None:
        return array
    return array.astype(array.dtype.newbyteorder("="))


def plain(value: object) -> object:
    """Convert numpy scalars/arrays and bytes to plain Python (int, float, str, lists)."""
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, (np.ndarray, np.generic)):
        return plain(value.tolist())
    if isinstance(value, (list, tuple)):
        return [plain(item) for item in value]
    return value
