"""Any one tensor file: :class:`TensorFile`, :func:`open_tensor_file`, :func:`read_tensor`.

:func:`open_tensor_file` detects the format by content (:mod:`convcli.io.detect`) and opens
the reader registered for it (:mod:`convcli.io.formats`); :class:`TensorFile` adds what is
the same for every format: tensors found by role name (:data:`ALIASES`), and the memory
guard that refuses, from the header and before allocating, an array larger than allowed.

Roles name the tensors of a convolution layer (shown channels-last; channels-first files
hold the same tensors with the channel axis second):

==== ============================== ==========================================
role shape                          names looked for (:data:`ALIASES`)
==== ============================== ==========================================
x    ``(n, *spatial, Cin)``         ``x``, ``X``, ``A_prev``, ``input``
w    ``(*kernel, Cin/g, Cout)``     ``w``, ``W``, ``weight``, ``weights``
b    ``(Cout,)`` or broadcast       ``b``, ``bias``
dz   ``(n, *out_spatial, Cout)``    ``dz``, ``dZ``, ``grad_output``
z    ``(n, *out_spatial, Cout)``    ``z``, ``Z``, ``y``, ``out``, ``output``
dx   shape of x                     ``dx``, ``dA_prev``, ``grad_input``
dw   shape of w                     ``dw``, ``dW``, ``grad_weight``
db   ``(Cout,)``                    ``db``, ``grad_bias``
==== ============================== ==========================================

This module never prints: problems are raised as :mod:`convcli.errors` types
(:class:`~convcli.errors.InputFileError` for a missing or unreadable path,
:class:`~convcli.errors.DataError` for content that cannot be used). Arrays are always
loaded with ``allow_pickle=False``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from convcli.errors import DataError, InputFileError
from convcli.io.detect import detect_format, parse_ref
from convcli.io.formats import reader_for
from convcli.io.layers import SCHEMES, Layer, find_layers
from convcli.io.reader import CONTENT_ERRORS, Hparams, Reader, RowReader, Shape, reason
from convcli.units import format_size

ALIASES = {
    "x": ("x", "X", "A_prev", "input"),
    "w": ("w", "W", "weight", "weights"),
    "b": ("b", "bias"),
    "dz": ("dz", "dZ", "grad_output"),
    # results someone else computed, read by ``compare``
    "z": ("z", "Z", "y", "out", "output"),
    "dx": ("dx", "dA_prev", "grad_input"),
    "dw": ("dw", "dW", "grad_weight"),
    "db": ("db", "grad_bias"),
}


def open_tensor_file(path: str | os.PathLike[str], *, allow_sparse: bool = False) -> TensorFile:
    """Open a ``.npy``, ``.npz``, HDF5 or safetensors file (format found by content).

    ``allow_sparse``: read arrays that declare far more data than the file stores (see
    :meth:`TensorFile.check_readable`); refused by default.

    Returns
    -------
    TensorFile
        Use it as a context manager, or call :meth:`TensorFile.close`.

    Raises
    ------
    InputFileError
        Missing path, directory, special file, no read permission, or an HDF5 file locked
        by a writer.
    DataError
        Empty, unrecognised, truncated or corrupt content; a safetensors header that does
        not hold together; a PyTorch checkpoint (a pickle, never read).
    """
    path = Path(path)
    fmt = detect_format(path)
    try:
        return TensorFile(reader_for(fmt).open(path), allow_sparse=allow_sparse)
    except DataError:
        raise  # worded by the reader (a PyTorch checkpoint, a bad safetensors header)
    except CONTENT_ERRORS as exc:
        if fmt == "hdf5" and "unable to lock file" in str(exc).lower():
            raise InputFileError(
                f"{path}: locked by another process that is writing it (HDF5 file locking); "
                "try again when it is done"
            ) from exc
        raise DataError(f"{path}: cannot read {fmt} file ({reason(exc)})") from exc


def read_tensor(
    source: str | os.PathLike[str], key: str | None = None, *, allow_sparse: bool = False
) -> np.ndarray:
    """Read one array from a ``.npy``, ``.npz``, HDF5 or safetensors file.

    Parameters
    ----------
    source : str or os.PathLike
        A path, or (as a str) a reference ``PATH:KEY`` such as ``"run.h5:/layer1/W"``.
    key : str, optional
        The array inside the file; wins over a key in ``source``. Without one, the file must
        hold a single tensor (a ``.npy``, or an npz/HDF5 file with one array besides its
        hyperparameters).
    allow_sparse : bool
        Read an array whose header declares far more data than the file stores.

    Returns
    -------
    numpy.ndarray
        The array with the file's shape and dtype (any shape; numeric dtypes only), in
        native byte order.

    Raises
    ------
    InputFileError
        The file is missing, not a regular file or unreadable.
    DataError
        Unknown or ambiguous key, Python objects, or damaged content.
    """
    path, ref_key = parse_ref(source) if isinstance(source, str) else (Path(source), None)
    key = key if key is not None else ref_key
    with open_tensor_file(path, allow_sparse=allow_sparse) as tensor_file:
        if key is None:
            tensors = tensor_file.tensor_keys()
            if len(tensors) != 1:
                raise DataError(
                    f"{path}: the file holds {len(tensors)} arrays; say which one "
                    f"(PATH:KEY or a key); it {tensor_file.describe()}"
                )
            key = tensors[0]
        return tensor_file.read(key)


class TensorFile:
    """An open tensor file: the arrays it holds and the hyperparameters stored with them.

    Keys name the arrays: npz member names (without ``.npy``), HDF5 dataset paths without the
    leading ``/`` (``"layer1/W"``), and ``""`` for the single unnamed array of a ``.npy``.

    Attributes
    ----------
    path : pathlib.Path
        The file, as it was given.
    format : str
        ``"npy"``, ``"npz"``, ``"hdf5"`` or ``"safetensors"``.
    reader : convcli.io.reader.Reader
        The format's reader, for what is particular to one format.
    allow_sparse : bool
        Whether arrays declaring far more data than the file stores may be read.
    """

    def __init__(self, reader: Reader, *, allow_sparse: bool = False) -> None:
        self.reader = reader
        self.allow_sparse = allow_sparse
        self.path = reader.path
        self.format = reader.format

    # -- lifetime ---------------------------------------------------------------------------

    def close(self) -> None:
        """Close the file (safe to call twice)."""
        self.reader.close()

    def __enter__(self) -> TensorFile:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"TensorFile({str(self.path)!r}, format={self.format!r})"

    def stat(self) -> os.stat_result:
        """``fstat`` of the open file: the one being read, even if its path now names another.

        A ``.npy`` is not held open, so for it this is the ``stat`` of its path.
        """
        return self.reader.stat()

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
        return self.reader.keys()

    def tensor_keys(self) -> list[str]:
        """:meth:`keys` without the npz entries that store hyperparameters (``stride``, ...)."""
        return self.reader.tensor_keys()

    def describe(self) -> str:
        """Short listing for error messages, e.g. ``"holds: W (2, 2, 3, 8) float64, pad ()"``."""
        return self.reader.describe()

    def shape_dtype(self, key: str) -> tuple[Shape, np.dtype]:
        """Shape and dtype of one array, from its header only (DataError if unreadable)."""
        return self.reader.shape_dtype(key)

    def origin(self, key: str) -> str:
        """Where an array is: ``"x.npy"``, ``"run.npz:W"`` or ``"run.h5:/layer1/W"``."""
        return self.reader.where(key)

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
            object/string arrays, a size above ``max_bytes`` (``param="max_memory"``), or
            truncated/corrupt content.
        """
        self.check_readable(key, max_bytes)
        return self.reader.read(key, self.allow_sparse)

    def check_readable(self, key: str, max_bytes: int | None = None) -> int:
        """Check what the header of ``key`` declares before any data is read; return its bytes.

        Refuses object dtypes, a declared size the file cannot hold (an absurd header, or a
        compressed member that would expand beyond its declared length), a size above
        ``max_bytes`` (the memory left of the caller's ``max_memory``), HDF5 datasets stored
        outside the file (external storage, virtual datasets) or needing a filter that is not
        installed, and, unless :attr:`allow_sparse`, a declared size over 16 MiB that is more
        than 1000 times what the file stores for it
        (:class:`~convcli.errors.SparseDataError`: a never-written dataset or a bomb).
        """
        declared = self.reader.declared_bytes(key, self.allow_sparse)
        if max_bytes is not None and declared > max_bytes:
            shape, dtype = self.shape_dtype(key)
            raise DataError(
                f"{self.origin(key)}: needs {format_size(declared)} ({shape} {dtype}), more "
                f"than the memory guard allows ({format_size(max_bytes)} left of {{param}}); "
                f"raise {{param}}, or {self.reader.streaming_hint(key)}",
                param="max_memory",
            )
        return declared

    def rows(self, key: str) -> RowReader | None:
        """Rows of ``key`` read on demand, or None when the format cannot read rows."""
        return self.reader.rows(key)

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
        matches = [key for key in self.tensor_keys() if key.rsplit("/", 1)[-1] in names]
        if len(matches) > 1:
            raise DataError(
                f"ambiguous: {self.path} holds several candidates for {role}: "
                + ", ".join(sorted(matches))
            )
        return matches[0] if matches else None

    def layers(self) -> dict[str, Layer]:
        """Convolution layers whose weights the file holds under a framework's names.

        Returns
        -------
        dict of str to Layer
            Layer name -> its weight and bias keys and naming scheme
            (:func:`convcli.io.layers.find_layers`), for weights with 3 to 5 axes.
        """
        return find_layers(self.tensor_keys(), lambda key: len(self.shape_dtype(key)[0]))

    def layer(self, name: str) -> Layer:
        """The layer called ``name`` (see :meth:`layers`).

        Raises
        ------
        DataError
            ``param="layer"``: no layer of that name (the message lists the layers found).
        """
        layers = self.layers()
        if name not in layers:
            raise DataError(
                f"{{param}} {name!r}: {self.path} holds no such layer; "
                + layer_listing(self, layers),
                param="layer",
            )
        return layers[name]

    # -- hyperparameters --------------------------------------------------------------------

    def hparams(self, near_key: str | None = None) -> Hparams:
        """Hyperparameters stored in the file, not validated.

        HDF5: attributes of the root group, overridden by those of each group on the way to
        ``near_key`` (the group holding x). NPZ: scalar or small (<= 16 elements) entries.
        NPY: none.

        Parameters
        ----------
        near_key : str, optional
            Key of the x dataset; only used for HDF5.

        Returns
        -------
        dict
            Canonical name (``"stride"``, ``"padding"``, ...; see :mod:`convcli.hparams`) ->
            ``(value, origin)``, the value as plain Python (int, float, str, nested lists)
            and the origin as text such as ``"run.h5 attribute 'pad' on /layer1"``.

        Raises
        ------
        DataError
            If one place holds two names of one hyperparameter (``pad`` and ``padding``),
            or an entry cannot be read.
        """
        return self.reader.hparams(near_key)


MAX_LISTED = 24


def layer_listing(tensor_file: TensorFile, layers: dict[str, Layer]) -> str:
    """``"its layers: conv1, conv2"`` for messages (at most :data:`MAX_LISTED` names)."""
    if not layers:
        schemes = ", ".join(scheme.name for scheme in SCHEMES)
        return f"no layer weights named as {schemes} save them; it {tensor_file.describe()}"
    names = list(layers)
    more = f" and {len(names) - MAX_LISTED} more" if len(names) > MAX_LISTED else ""
    return f"its layers: {', '.join(names[:MAX_LISTED])}{more}"


def origin_text(tensor_file: TensorFile, key: str) -> str:
    """Where an array came from: ``"x.npy"``, ``"run.npz:W"`` or ``"run.h5:/layer1/W"``."""
    return tensor_file.origin(key)
