"""The registry of file formats: one line per reader and per writer.

To add a format, write its module (a :class:`~convcli.io.reader.Reader` subclass and, if
convcli may write it, a :class:`~convcli.io.reader.Writer` subclass) and list it here.
Detection tries readers in this order, so formats recognised by their first bytes alone
come before those that look further into the file.
"""

from __future__ import annotations

from convcli.io.hdf5 import Hdf5Reader, Hdf5Writer
from convcli.io.npy import NpyReader
from convcli.io.npz import NpzReader, NpzWriter
from convcli.io.reader import Reader, Writer
from convcli.io.safetensors import SafetensorsReader, SafetensorsWriter

READERS: tuple[type[Reader], ...] = (NpyReader, NpzReader, Hdf5Reader, SafetensorsReader)
WRITERS: tuple[type[Writer], ...] = (NpzWriter, Hdf5Writer, SafetensorsWriter)


def reader_for(fmt: str) -> type[Reader]:
    """The reader class of format ``fmt`` (``"npy"``, ``"npz"``, ``"hdf5"``, ``"safetensors"``)."""
    return next(reader for reader in READERS if reader.format == fmt)


def spoken_list(items: list[str]) -> str:
    """``"a, b or c"``."""
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} or {items[-1]}"
