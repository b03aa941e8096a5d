"""The safetensors format: a JSON header of named tensors, then their raw little-endian bytes.

Layout: an unsigned 64-bit little-endian header length ``N``, ``N`` bytes of JSON (an object
``{"conv1.weight": {"dtype": "F32", "shape": [4, 3, 3, 3], "data_offsets": [0, 432]}, ...}``
with an optional ``"__metadata__"`` object of strings), then the data area; offsets count
from the start of the data area. Keys are plain names: a dot (``layer2.0.conv1.bias``) is
part of the name, not a path.

The whole header is checked when the file is opened, before any tensor is allocated: its
length is bounded (:data:`MAX_HEADER_BYTES`, and the file's size), the JSON is an object,
every entry has a known dtype, a shape of non-negative integers and ``data_offsets`` inside
the data area holding exactly ``itemsize x prod(shape)`` bytes, and no two tensors share
bytes. Tensors are then read at their offsets, one at a time (never the whole file), or a
block of rows at a time for streaming (:meth:`SafetensorsReader.rows`, the ``.npy`` reader's
:class:`~convcli.io.npy.NpyRows`).
float16 and bfloat16 are read as float32 (the engine computes in float32 or float64), with a
:class:`~convcli.errors.ConvcliNotice`.

Hyperparameters are entries of ``__metadata__`` named like them (``stride``, ``padding``,
...; values as JSON text, ``"[2, 2]"``, or a word, ``"same"``); :class:`SafetensorsWriter`
writes them so.

This is a reader of convcli's own rather than the ``safetensors`` package: the package's
numpy loader reads the whole file and allocates every tensor, has no bfloat16 in numpy, and
would add a dependency for a format this small; here every problem of the header is one
:class:`~convcli.errors.DataError` naming it, raised before any allocation.
"""

from __future__ import annotations

import io
import itertools
import json
import os
import struct
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

import numpy as np

from convcli.errors import ConvcliNotice, DataError
from convcli.hparams import FILE_KEYS
from convcli.io.npy import NpyRows
from convcli.io.reader import (
    MAX_HPARAM_SIZE,
    Hparams,
    Reader,
    Shape,
    Writer,
    canonical_hparams,
    plain,
    reason,
)
from convcli.units import format_size

#: A header longer than this is refused before it is parsed. Real headers of models with
#: thousands of tensors take a few hundred KB; parsing takes about 15 bytes per header byte
#: (a 16 MiB header of 220,000 tensors: 245 MB peak), so the format's own 100 MB would
#: allow about 1.4 GB before any check.
MAX_HEADER_BYTES = 16 * 2**20
METADATA = "__metadata__"

#: safetensors dtype -> numpy dtype as stored (little-endian); bfloat16 is stored as its
#: 16 bits.
DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"),
    "U32": np.dtype("<u4"),
    "U16": np.dtype("<u2"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
#: Dtypes whose size is known but that convcli does not read (8-bit floats, complex).
UNREADABLE = {"F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "C64": 8}
#: Dtypes read as float32, by the name said in the notice.
UPCAST = {"F16": "float16", "BF16": "bfloat16"}
#: numpy dtype kind and size -> safetensors dtype, for writing.
CODES = {(dtype.kind, dtype.itemsize): code for code, dtype in DTYPES.items() if code != "BF16"}


class Entry:
    """One tensor of the header: its dtype code, shape and byte range in the data area."""

    __slots__ = ("begin", "code", "end", "shape")

    def __init__(self, code: str, shape: Shape, begin: int, end: int) -> None:
        self.code = code
        self.shape = shape
        self.begin = begin
        self.end = end


def _itemsize(code: str) -> int:
    return DTYPES[code].itemsize if code in DTYPES else UNREADABLE[code]


def _check_entry(where: str, key: str, value: object, data_bytes: int) -> Entry:
    """One header entry, checked; ``data_bytes`` is the size of the data area."""
    name = f"{where}: tensor {key!r}"
    if not isinstance(value, dict):
        raise DataError(f"{name}: its header entry is not an object")
    missing = [field for field in ("dtype", "shape", "data_offsets") if field not in value]
    if missing:
        raise DataError(f"{name}: its header entry has no {', '.join(missing)}")
    code, shape, offsets = value["dtype"], value["shape"], value["data_offsets"]
    if not isinstance(code, str) or (code not in DTYPES and code not in UNREADABLE):
        known = ", ".join([*DTYPES, *UNREADABLE])
        raise DataError(f"{name}: unknown dtype {str(code)[:40]!r} (known: {known})")
    if not isinstance(shape, list) or not all(_count(size) for size in shape):
        raise DataError(f"{name}: shape must be a list of non-negative integers")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(_count(offset) for offset in offsets)
    ):
        raise DataError(f"{name}: data_offsets must be two non-negative integers [begin, end]")
    begin, end = offsets
    if begin > end:
        raise DataError(f"{name}: data_offsets [{begin}, {end}] begin after they end")
    if end > data_bytes:
        raise DataError(
            f"{name}: data_offsets [{begin}, {end}] lie outside the data area ({data_bytes:,} "
            "bytes after the header; truncated or corrupt)"
        )
    needed = _itemsize(code)
    for size in shape:
        needed *= size
    if end - begin != needed:
        raise DataError(
            f"{name}: holds {end - begin:,} bytes but dtype {code} and shape {shape} need "
            f"{needed:,}"
        )
    return Entry(code, tuple(shape), begin, end)


def _count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def read_header(handle: IO[bytes], where: str) -> tuple[dict[str, Entry], dict[str, str], int]:
    """Check the header of an open safetensors file; nothing beyond the header is read.

    Returns
    -------
    (entries, metadata, data_start)
        Key -> :class:`Entry`; the ``__metadata__`` strings; the offset of the data area.

    Raises
    ------
    DataError
        Naming the first problem: a header length above :data:`MAX_HEADER_BYTES` or past the
        end of the file, JSON that is malformed (a name given twice too) or not an object, an
        entry without dtype, shape or data_offsets, an unknown dtype, offsets outside the data
        area or in the wrong order, a byte count other than ``itemsize x prod(shape)``,
        overlapping tensors.
    """
    size = os.fstat(handle.fileno()).st_size
    handle.seek(0)
    prefix = handle.read(8)
    if len(prefix) < 8:
        raise DataError(f"{where}: too short for a safetensors header ({size} bytes)")
    (length,) = struct.unpack("<Q", prefix)
    if length > MAX_HEADER_BYTES:
        raise DataError(
            f"{where}: safetensors header length {length:,} bytes is over the "
            f"{format_size(MAX_HEADER_BYTES)} limit (corrupt or hostile file)"
        )
    if length > size - 8:
        raise DataError(
            f"{where}: safetensors header length {length:,} bytes runs past the end of the "
            f"file ({size:,} bytes; truncated or corrupt)"
        )
    text = handle.read(length)
    try:
        header = json.loads(text, object_pairs_hook=_unique)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError
        raise DataError(f"{where}: safetensors header is not valid JSON ({reason(exc)})") from exc
    if not isinstance(header, dict):
        raise DataError(f"{where}: safetensors header is not a JSON object")
    metadata = header.pop(METADATA, None)
    metadata = {} if metadata is None else metadata  # null: no metadata; [] or "" is malformed
    if not isinstance(metadata, dict) or not all(
        isinstance(value, str) for value in metadata.values()
    ):
        raise DataError(f"{where}: {METADATA} must be an object of strings")
    data_bytes = size - 8 - length
    entries = {key: _check_entry(where, key, value, data_bytes) for key, value in header.items()}
    _check_overlaps(where, entries)
    return entries, metadata, 8 + length


def _unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object, refusing a name given twice (the second would hide the first)."""
    result: dict[str, Any] = {}
    for name, value in pairs:
        if name in result:
            raise ValueError(f"the name {name[:80]!r} is given twice")
        result[name] = value
    return result


def _check_overlaps(where: str, entries: Mapping[str, Entry]) -> None:
    ranges = sorted((e.begin, e.end, key) for key, e in entries.items() if e.end > e.begin)
    for (_, end, first), (begin, _, second) in itertools.pairwise(ranges):
        if begin < end:
            a, b = entries[first], entries[second]
            raise DataError(
                f"{where}: tensors {first!r} and {second!r} overlap (bytes {a.begin}-{a.end} "
                f"and {b.begin}-{b.end} of the data area)"
            )


class SafetensorsReader(Reader):
    """A ``.safetensors`` file held open (its header checked once) until :meth:`close`."""

    format = "safetensors"
    label = "safetensors"

    def __init__(
        self,
        path: Path,
        handle: io.BufferedReader,
        entries: dict[str, Entry],
        metadata: dict[str, str],
        data_start: int,
    ) -> None:
        super().__init__(path)
        self._handle: io.BufferedReader | None = handle
        self._entries = entries
        self._metadata = metadata
        self._data_start = data_start

    @classmethod
    def sniff(cls, path: Path, head: bytes) -> bool:
        """A header length, then ``{``: the first byte of the JSON header."""
        if len(head) < 8:
            return False
        try:
            with open(path, "rb") as handle:
                handle.seek(8)
                return handle.read(1) == b"{"
        except OSError:
            return False

    @classmethod
    def open(cls, path: Path) -> SafetensorsReader:
        handle = open(path, "rb")  # noqa: SIM115 - closed by close() or below
        try:
            entries, metadata, start = read_header(handle, str(path))
            return cls(path, handle, entries, metadata, start)
        except BaseException:
            handle.close()
            raise

    def _entry(self, key: str) -> Entry:
        entry = self._entries.get(key)
        if entry is None:
            raise DataError(f"{self.path}: no tensor '{key}'; it {self.describe()}")
        return entry

    def list_keys(self) -> list[str]:
        return list(self._entries)

    def header(self, key: str) -> tuple[Shape, np.dtype]:
        """Shape, and the dtype the tensor is read in (float32 for float16 and bfloat16)."""
        entry = self._entry(key)
        if entry.code in UNREADABLE:
            raise DataError(
                f"{self.where(key)}: dtype {entry.code}, which convcli does not read "
                "(convert it to F32 or F64)"
            )
        dtype = np.dtype(np.float32) if entry.code in UPCAST else DTYPES[entry.code]
        return entry.shape, dtype.newbyteorder("=") if dtype.byteorder == "<" else dtype

    def stored_dtype(self, key: str) -> str | None:
        """``"float16"`` or ``"bfloat16"`` for tensors read as float32; None otherwise."""
        return UPCAST.get(self._entry(key).code)

    def stored_bytes(self, key: str) -> int | None:
        """None: every tensor's byte count was checked against its shape on opening."""
        self._entry(key)
        return None

    def metadata(self) -> dict[str, str]:
        return dict(self._metadata)

    def rows(self, key: str) -> NpyRows | None:
        """Rows of a tensor read at their offsets, as a C-order ``.npy``'s are; None for
        float16/bfloat16 (converted on reading) and 0-d tensors."""
        entry = self._entry(key)
        if self._handle is None:
            raise DataError(f"{self.path}: file is closed")
        if entry.code not in DTYPES or entry.code in UPCAST or not entry.shape:
            return None
        start = self._data_start + entry.begin
        return NpyRows(
            self._handle.fileno(), start, entry.shape, DTYPES[entry.code], self.where(key)
        )

    def streaming_hint(self, key: str) -> str:
        if self.stored_dtype(key) is not None:
            return "store it as float32 to stream it (float16 and bfloat16 are converted whole)"
        return super().streaming_hint(key)

    def read_array(self, key: str) -> np.ndarray:
        entry = self._entry(key)
        self.header(key)  # refuses unreadable dtypes
        if self._handle is None:
            raise DataError(f"{self.path}: file is closed")
        raw = np.empty(entry.end - entry.begin, dtype=np.uint8)
        self._handle.seek(self._data_start + entry.begin)
        view = raw.data
        done = 0
        while done < raw.size:
            count = self._handle.readinto(view[done:])
            if not count:
                raise DataError(
                    f"{self.where(key)}: the file ends before the tensor's data "
                    "(truncated after it was opened)"
                )
            done += count
        array = raw.view(DTYPES[entry.code]).reshape(entry.shape)
        if entry.code not in UPCAST:
            return array
        warnings.warn(
            f"{self.where(key)} is stored as {UPCAST[entry.code]}; read as float32",
            ConvcliNotice,
            stacklevel=2,
        )
        if entry.code == "F16":
            return array.astype(np.float32)
        return (array.astype(np.uint32) << 16).view(np.float32)

    def hparams(self, near_key: str | None = None) -> Hparams:
        """``__metadata__`` entries named like hyperparameters, as JSON values or words."""
        entries = {}
        for name, text in self._metadata.items():
            if name not in FILE_KEYS:
                continue
            origin = f"{self.path} {METADATA} entry '{name}'"
            entries[name] = (_metadata_value(origin, text), origin)
        return canonical_hparams(entries, f"{self.path} {METADATA}")

    def stat(self) -> os.stat_result:
        if self._handle is None:
            raise DataError(f"{self.path}: file is closed")
        return os.fstat(self._handle.fileno())

    def close(self) -> None:
        handle, self._handle = self._handle, None
        if handle is not None:
            handle.close()


def _metadata_value(origin: str, text: str) -> object:
    """A hyperparameter from its metadata text: JSON numbers or lists, else the word itself."""
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        return text
    if isinstance(value, list):
        if _leaves(value) > MAX_HPARAM_SIZE:
            raise DataError(
                f"{origin}: more than {MAX_HPARAM_SIZE} values; a hyperparameter must be a "
                "scalar or hold a few values"
            )
        return value
    return value if isinstance(value, (int, float, str)) else text


def _leaves(value: object) -> int:
    return sum(_leaves(item) for item in value) if isinstance(value, list) else 1


class SafetensorsWriter(Writer):
    """Tensors as a ``.safetensors`` file; hyperparameters in its ``__metadata__`` as JSON."""

    format = "safetensors"
    suffixes = (".safetensors",)

    @classmethod
    def check(
        cls, path: Path, tensors: Mapping[str, np.ndarray], attrs: Mapping[str, np.ndarray]
    ) -> None:
        for name, array in tensors.items():
            if name == METADATA:
                raise DataError(f"{path}: a tensor cannot be named {METADATA}")
            if (array.dtype.kind, array.dtype.itemsize) not in CODES:
                raise DataError(f"{path}: cannot store '{name}' of dtype {array.dtype}")

    @classmethod
    def write(
        cls, fd: int, temp: Path, tensors: Mapping[str, np.ndarray], attrs: Mapping[str, object]
    ) -> None:
        header: dict[str, Any] = {}
        if attrs:
            header[METADATA] = {
                name: value if isinstance(value, str) else json.dumps(plain(value))
                for name, value in attrs.items()
            }
        arrays = []
        offset = 0
        for name in sorted(tensors):
            array = np.ascontiguousarray(tensors[name])
            array = array.astype(array.dtype.newbyteorder("<"), copy=False)
            code = CODES[array.dtype.kind, array.dtype.itemsize]
            header[name] = {
                "dtype": code,
                "shape": list(array.shape),
                "data_offsets": [offset, offset + array.nbytes],
            }
            offset += array.nbytes
            arrays.append(array)
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)  # the data area starts 8-byte aligned
        with os.fdopen(fd, "wb", closefd=False) as handle:
            handle.write(struct.pack("<Q", len(text)) + text)
            for array in arrays:
                handle.write(array.reshape(-1).view(np.uint8).data)
            handle.flush()
            os.fsync(handle.fileno())
