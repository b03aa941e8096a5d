"""Gathering the tensors of one command from its data file and per-role references.

Roles (x, w, b, dz) are found by name (:data:`~convcli.io.tensorfile.ALIASES`) in the data file
or taken from explicit references (``PATH`` or ``PATH:KEY``, one per role); hyperparameters
come from the data file (or the file x came from). Big tensors of a format that can read rows
(:meth:`convcli.io.reader.Reader.rows`; HDF5 and C-order ``.npy``) can be left on disk as
:class:`DatasetRef` for streaming, and a memory guard refuses, before reading, tensors that
would not fit.
Errors about one role carry ``param=`` the role's name (``"x"``, ``"w"``, ...).

w and b may also come from a layer of a framework's file, by the layer's name (``layer``) or
as the file's only layer when no tensor is called w (:mod:`convcli.io.layers`); the layout
the framework's names imply becomes the ``layout`` hyperparameter unless the file sets one.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from convcli.errors import DataError, UsageError
from convcli.hparams import DEFAULTS
from convcli.io import tensorfile
from convcli.io.detect import parse_ref, regular_file_size
from convcli.io.layers import Layer
from convcli.io.reader import Hparams, RowReader, Shape
from convcli.io.tensorfile import ALIASES, TensorFile, layer_listing, origin_text
from convcli.memory import nbytes

_IDENTITY_LABELS = (
    ("device", "device"),
    ("inode", "inode"),
    ("size", "size"),
    ("mtime_ns", "modification time"),
    ("ctime_ns", "status-change time"),
)


@dataclass(frozen=True)
class FileIdentity:
    """What tells one version of a file from another without reading it (from ``stat``).

    A file replaced under the same name has another device or inode; one written in place
    has another size or modification / status-change time (to the filesystem's timestamp
    resolution: a same-size rewrite within one clock tick of the last change is not seen).
    """

    device: int
    inode: int
    size: int
    mtime_ns: int
    ctime_ns: int

    @classmethod
    def of(cls, status: os.stat_result) -> FileIdentity:
        return cls(
            device=status.st_dev,
            inode=status.st_ino,
            size=status.st_size,
            mtime_ns=status.st_mtime_ns,
            ctime_ns=status.st_ctime_ns,
        )

    def differences(self, other: FileIdentity) -> list[str]:
        """Names of what differs between ``self`` and ``other`` (empty: the same version)."""
        return [
            label for key, label in _IDENTITY_LABELS if getattr(self, key) != getattr(other, key)
        ]


@dataclass(frozen=True)
class DatasetRef:
    """An array left on disk, read in blocks of its first axis (for streaming).

    Any format whose reader can read rows (:meth:`convcli.io.reader.Reader.rows`) can be
    referred to; the format is detected again when the file is opened.

    Attributes
    ----------
    path : pathlib.Path
        The file (resolved).
    key : str
        The array inside it (HDF5: its dataset path).
    shape : tuple of int
        The array's shape; its first axis is the one read in blocks (the batch, n).
    dtype : numpy.dtype
        The dtype its rows are read in (the file's, in native byte order).
    origin : str
        Where it is, for messages: ``"file.h5:/key"``.
    identity : FileIdentity
        The version of the file whose shape and dtype these are; every read checks that it
        still reads that version (see :class:`OpenDataset`).
    """

    path: Path
    key: str
    shape: tuple[int, ...]
    dtype: np.dtype
    origin: str
    identity: FileIdentity

    @property
    def nbytes(self) -> int:
        """Bytes of the whole array in memory (Python ints: no overflow)."""
        return nbytes(self.shape, self.dtype)

    def open(self, name: str | None = None) -> OpenDataset:
        """Open the file once for many reads (a whole streamed run); use as a context manager.

        ``name`` (e.g. ``"x"``) starts error messages; the origin text when None.
        """
        return OpenDataset(self, name or self.origin)

    def read(self, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` of the first axis, in memory: ``(stop - start, *shape[1:])``."""
        return self[start:stop]

    def __getitem__(self, index: Any) -> np.ndarray:
        """Any basic index (``ref[0, ..., -1]``), read through a freshly opened, verified file."""
        with self.open() as dataset:
            rows = dataset[index]
            dataset.verify()
        return rows


class OpenDataset:
    """A :class:`DatasetRef`'s file held open: reads through one handle, then :meth:`verify`.

    Opening refuses a file that is no longer the version the reference was made from; call
    :meth:`verify` after the last read so that a file replaced or written to meanwhile is
    refused rather than mixed into a result.

    Raises
    ------
    DataError
        On opening or :meth:`verify`, when the file changed; on reading, unreadable content.
    InputFileError
        On opening, when the file is missing or unreadable.
    """

    def __init__(self, ref: DatasetRef, name: str) -> None:
        self.ref = ref
        self.name = name
        self._file = tensorfile.open_tensor_file(ref.path)
        try:
            self.verify()
            rows = self._file.rows(ref.key)
            if rows is None:
                raise DataError(
                    f"{ref.origin}: a {self._file.format} file cannot be read in blocks of rows"
                )
            self._rows: RowReader = rows
        except BaseException:
            self._file.close()
            raise

    def read(self, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` of the first axis, in memory: ``(stop - start, *shape[1:])``."""
        return self._rows.read(start, stop)

    def __getitem__(self, index: Any) -> np.ndarray:
        """Any basic index of the array (``[start:stop]``, ``[0, ..., -1]``), in memory."""
        return self._rows[index]

    def verify(self) -> None:
        """Refuse (DataError) if the open file or the file now at the path is another version."""
        expected = self.ref.identity
        changed = expected.differences(FileIdentity.of(self._file.stat()))
        try:
            at_path = FileIdentity.of(os.stat(self.ref.path))
        except OSError:
            changed.append("path (the file is gone)")
        else:
            changed += [what for what in expected.differences(at_path) if what not in changed]
        if changed:
            raise DataError(
                f"{self.name}: {self.ref.path} changed while it was read ({', '.join(changed)} "
                "differ from when it was opened), so a result would mix two versions of it; "
                "run again once the file is no longer being changed"
            )

    def close(self) -> None:
        """Close the file (safe to call twice)."""
        self._file.close()

    def __enter__(self) -> OpenDataset:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


@dataclass
class Loaded:
    """Tensors and hyperparameters gathered from the command's files.

    Attributes
    ----------
    arrays : dict of str to numpy.ndarray or DatasetRef
        Role (``"x"``, ``"w"``, ``"b"``, ``"dz"``) -> array, only for roles that were found;
        a :class:`DatasetRef` for tensors left on disk (see ``lazy_above``).
    origins : dict of str to str
        Role -> where it came from, e.g. ``"run.h5:/A_prev"``.
    hparams : dict of str to (object, str)
        Canonical hyperparameter name -> (raw value, origin), see :meth:`TensorFile.hparams`.
    sources : list of pathlib.Path
        Resolved path of every file read (an output must not overwrite any of them).
    layer : Layer, optional
        The layer w and b came from, when they were found by a framework's names.
    layout_note : str, optional
        Set when that layer's names implied a layout other than the default (PyTorch's nchw):
        a notice for a caller that did not choose the layout itself.
    """

    arrays: dict[str, np.ndarray | DatasetRef] = field(default_factory=dict)
    origins: dict[str, str] = field(default_factory=dict)
    hparams: Hparams = field(default_factory=dict)
    sources: list[Path] = field(default_factory=list)
    layer: Layer | None = None
    layout_note: str | None = None


@dataclass(frozen=True)
class Headers:
    """What the files say about the gathered tensors before any of their data is read.

    Attributes
    ----------
    shapes : dict of str to tuple of int
        Role -> declared shape, in the file's layout (x ``(n, *spatial, Cin)`` channels last,
        ``(n, Cin, *spatial)`` channels first; w, b, dz likewise).
    dtypes : dict of str to numpy.dtype
        Role -> declared dtype (byte order as stored).
    hparams : dict of str to (object, str)
        As :attr:`Loaded.hparams`.
    origins : dict of str to str
        Role -> where it is, e.g. ``"run.h5:/A_prev"``.
    """

    shapes: dict[str, Shape]
    dtypes: dict[str, np.dtype]
    hparams: Hparams
    origins: dict[str, str]


class _FileCache:
    """Opens each distinct file once and closes them all at the end."""

    def __init__(self, stack: contextlib.ExitStack, allow_sparse: bool = False) -> None:
        self._stack = stack
        self._allow_sparse = allow_sparse
        self._files: dict[Path, TensorFile] = {}

    def open(self, path: str | os.PathLike[str]) -> TensorFile:
        regular_file_size(path)  # a missing path or a link loop fails here, not in resolve()
        resolved = Path(path).resolve()
        if resolved not in self._files:
            opened = tensorfile.open_tensor_file(path, allow_sparse=self._allow_sparse)
            self._files[resolved] = self._stack.enter_context(opened)
        return self._files[resolved]

    @property
    def sources(self) -> list[Path]:
        return list(self._files)


def load_tensors(
    data: str | os.PathLike[str] | None,
    refs: Mapping[str, str | None],
    required: Iterable[str],
    optional: Iterable[str] = (),
    *,
    lazy_above: int | None = None,
    lazy_roles: Iterable[str] = ("x", "dz"),
    max_bytes: int | None = None,
    allow_sparse: bool = False,
    check: Callable[[Headers], None] | None = None,
    layer: str | None = None,
) -> Loaded:
    """Gather the tensors a command needs from a data file and/or explicit references.

    Parameters
    ----------
    data : str or os.PathLike or None
        Data file (``.npz`` or HDF5) searched by name with :meth:`TensorFile.find`.
    refs : mapping of role to str or None
        Explicit references per role (``PATH`` or ``PATH:KEY``); an explicit reference wins
        over the data file.
    required : iterable of str
        Roles that must be found, e.g. ``("x", "w")``.
    optional : iterable of str
        Roles that may be absent, e.g. ``("b", "dz")``.
    lazy_above : int, optional
        Tensors of ``lazy_roles`` larger than this many bytes, in a format that can read
        rows (HDF5, C-order ``.npy``), are not read: they come back as :class:`DatasetRef`,
        to be streamed.
    lazy_roles : iterable of str
        Roles that may be left on disk (the batch-sized ones).
    max_bytes : int, optional
        Memory guard: refuse, before reading, tensors whose declared sizes add up to more
        (the error has ``param="max_memory"``).
    allow_sparse : bool
        Read tensors whose headers declare far more data than their files store (refused
        by default with :class:`~convcli.errors.SparseDataError`, ``param="allow_sparse"``).
    check : callable, optional
        Called with the :class:`Headers` once every role is located and before any tensor
        data is read, to refuse shapes and dtypes that do not fit (by raising).
    layer : str, optional
        Take w and b from the layer of this name (:meth:`TensorFile.layers`: PyTorch
        ``NAME.weight``/``NAME.bias``, Keras 3 ``layers/NAME/vars/0|1``, Keras 2
        ``NAME/kernel:0``/``bias:0``) in the data file, or without one in the file of w.
        Without it, a file with no tensor called w and one such layer uses that layer.
        The layout its names imply (PyTorch: nchw) is the ``layout`` hyperparameter unless
        the file stores one.

    Every role's header is checked (truncation, missing filters, data in other files,
    sparse or bomb datasets) before the first tensor is read.

    Returns
    -------
    Loaded
        Arrays in memory, their origins, hyperparameters and the files read. Every file is
        closed before this returns.

    Raises
    ------
    InputFileError
        A referenced file is missing or unreadable.
    UsageError
        A required role has neither a data file nor a reference (``param=`` the role), or
        ``layer`` is given without a file to look in (``param="layer"``).
    DataError
        A required role is found nowhere, a name is ambiguous, a key is missing, the data
        file is a ``.npy``, or content is unreadable; no layer called ``layer``, or several
        layers and no ``layer`` (``param="layer"``; the message lists the layers).
    """
    lazy_roles = tuple(lazy_roles)
    with contextlib.ExitStack() as stack:
        cache = _FileCache(stack, allow_sparse)
        keys, loaded = _gather(cache, data, refs, required, optional, layer)
        if check is not None:
            check(_headers(keys, loaded))
        for tensor_file, key in keys.values():
            tensor_file.check_readable(key)
        for role, (tensor_file, key) in keys.items():
            remaining = None if max_bytes is None else max_bytes - _in_memory(loaded.arrays)
            loaded.arrays[role] = _read_or_refer(
                tensor_file, key, lazy_above if role in lazy_roles else None, remaining
            )
        loaded.sources = cache.sources
    return loaded


def read_headers(
    data: str | os.PathLike[str] | None,
    refs: Mapping[str, str | None],
    required: Iterable[str],
    optional: Iterable[str] = (),
    *,
    layer: str | None = None,
) -> Headers:
    """What :func:`load_tensors` would gather, from the files' headers alone: no tensor data
    is read (so nothing is checked that only reading would find).

    Parameters as for :func:`load_tensors`; raises as it does when a role cannot be found.
    """
    with contextlib.ExitStack() as stack:
        return _headers(*_gather(_FileCache(stack), data, refs, required, optional, layer))


def _gather(
    cache: _FileCache,
    data: str | os.PathLike[str] | None,
    refs: Mapping[str, str | None],
    required: Iterable[str],
    optional: Iterable[str],
    layer: str | None,
) -> tuple[dict[str, tuple[TensorFile, str]], Loaded]:
    """The file and key of every role found, and a :class:`Loaded` without arrays (origins,
    hyperparameters, the layer w and b came from)."""
    required = tuple(required)
    loaded = Loaded()
    keys: dict[str, tuple[TensorFile, str]] = {}
    data_file = _open_data_file(cache, data) if data is not None else None
    roles = (*required, *(r for r in optional if r not in required))
    chosen = _choose_layer(cache, data_file, refs, layer) if "w" in roles else None
    for role in roles:
        found = _locate(cache, data_file, role, refs.get(role), role in required, chosen)
        if found is not None:
            keys[role] = found
    loaded.origins = {role: origin_text(file, key) for role, (file, key) in keys.items()}
    loaded.hparams = _hparams_for(data_file, keys.get("x"))
    if chosen is not None:
        _imply_layout(loaded, *chosen)
    return keys, loaded


def _headers(keys: Mapping[str, tuple[TensorFile, str]], loaded: Loaded) -> Headers:
    """The shapes and dtypes the files declare for ``keys``, with ``loaded``'s origins and
    hyperparameters."""
    headers = {role: file.shape_dtype(key) for role, (file, key) in keys.items()}
    return Headers(
        shapes={role: shape for role, (shape, _) in headers.items()},
        dtypes={role: dtype for role, (_, dtype) in headers.items()},
        hparams=loaded.hparams,
        origins=dict(loaded.origins),
    )


def _in_memory(arrays: Mapping[str, np.ndarray | DatasetRef]) -> int:
    return sum(a.nbytes for a in arrays.values() if isinstance(a, np.ndarray))


def _read_or_refer(
    tensor_file: TensorFile, key: str, lazy_above: int | None, max_bytes: int | None = None
) -> np.ndarray | DatasetRef:
    """The array, or a DatasetRef for one larger than ``lazy_above`` bytes that can stream."""
    if lazy_above is not None:
        ref = _stream_ref(tensor_file, key)
        if ref is not None and ref.shape and ref.nbytes > lazy_above and ref.dtype.kind in "fiu":
            tensor_file.check_readable(key)  # no absurd header, no data in other files
            return ref
    return tensor_file.read(key, max_bytes=max_bytes)


def _stream_ref(tensor_file: TensorFile, key: str) -> DatasetRef | None:
    """A reference to ``key`` on disk, if its format can read rows (None otherwise)."""
    if tensor_file.rows(key) is None:  # the format cannot read rows
        return None
    shape, dtype = tensor_file.shape_dtype(key)
    return DatasetRef(
        path=tensor_file.path.resolve(),
        key=key,
        shape=shape,
        dtype=dtype if dtype.names is not None else dtype.newbyteorder("="),  # rows come native
        origin=origin_text(tensor_file, key),
        identity=FileIdentity.of(tensor_file.stat()),
    )


def _open_data_file(cache: _FileCache, data: str | os.PathLike[str]) -> TensorFile:
    data_file = cache.open(data)
    if data_file.format == "npy":
        raise DataError(
            f"{data}: a .npy file holds one unnamed array, so it cannot supply tensors by "
            "name; pass it as the file of one tensor, e.g. {param} " + f"{data}",
            param="x",
        )
    return data_file


def _choose_layer(
    cache: _FileCache,
    data_file: TensorFile | None,
    refs: Mapping[str, str | None],
    layer: str | None,
) -> tuple[TensorFile, Layer] | None:
    """The layer w and b come from, and its file; None when they are found otherwise.

    The file searched is the data file, or the file of a w reference without a key. Without
    ``layer``, a layer is used only when w is not named by a key, and its file holds no
    tensor named as w and exactly one layer.
    """
    source = data_file
    w_ref = refs.get("w")
    if w_ref:
        path, key = parse_ref(w_ref)
        if key is not None and layer is None:
            return None  # w is named: b is found as usual
        if key is not None:
            raise UsageError(
                "{param} " + f"{layer!r} picks w and b by the layer's names, and w is named as "
                f"well ({w_ref}): give one of the two",
                param="layer",
            )
        source = cache.open(path) if key is None else data_file
    if layer is not None:
        if source is None:
            raise UsageError(
                "{param} " + f"{layer!r} names a layer in a file: pass a data file holding it",
                param="layer",
            )
        return source, source.layer(layer)
    if source is None or source.format == "npy" or source.find("w") is not None:
        return None
    if w_ref and source is not data_file and len(source.tensor_keys()) == 1:
        return None  # a file of one tensor: that is w
    layers = source.layers()
    if len(layers) == 1:
        return source, next(iter(layers.values()))
    if len(layers) > 1:
        raise DataError(
            f"{source.path} holds the weights of {len(layers)} layers; say which with "
            "{param} NAME; " + layer_listing(source, layers),
            param="layer",
        )
    return None


def _imply_layout(loaded: Loaded, tensor_file: TensorFile, layer: Layer) -> None:
    """Record the chosen layer, and the layout its names imply unless the file sets one."""
    loaded.layer = layer
    layout = layer.scheme.layout
    if "layout" in loaded.hparams:
        return
    where = f"{tensor_file.path} ({layer.scheme.name} names: {layer.weight})"
    loaded.hparams["layout"] = (layout, where)
    if layout != DEFAULTS["layout"]:
        loaded.layout_note = (
            f"layer {layer.name} of {tensor_file.path}: {layer.describe()}; "
            f"{layer.scheme.name} names, so layout {layout} "
            "(x (n, C, *spatial), w (Cout, Cin/groups, *kernel))"
        )


def _locate(
    cache: _FileCache,
    data_file: TensorFile | None,
    role: str,
    ref: str | None,
    required: bool,
    chosen: tuple[TensorFile, Layer] | None = None,
) -> tuple[TensorFile, str] | None:
    """File and key holding ``role``, or None for an optional role found nowhere.

    ``chosen``: the layer w and b come from (unless a reference with a key names them).
    """
    by_layer = _layer_key(chosen, role)
    if ref:
        path, key = parse_ref(ref)
        tensor_file = cache.open(path)
        if key is None and by_layer is not None and by_layer[0] is tensor_file:
            return by_layer
        return tensor_file, (key if key is not None else _default_key(tensor_file, role))
    if chosen is not None and role in ("w", "b"):
        return by_layer  # a layer without a bias has none, whatever else the file holds
    if data_file is not None:
        key = data_file.find(role)
        if key is not None:
            return data_file, key
        if required:
            raise DataError(
                f"no {role} found in {data_file.path} (looked for {', '.join(ALIASES[role])}); "
                f"it {data_file.describe()}; pass {{param}} FILE:KEY",
                param=role,
            )
        return None
    if required:
        raise UsageError(f"no {role} given: pass a data file or {{param}} FILE[:KEY]", param=role)
    return None


def _layer_key(chosen: tuple[TensorFile, Layer] | None, role: str) -> tuple[TensorFile, str] | None:
    """File and key of ``role`` (w or b) in the chosen layer, when it has one."""
    if chosen is None or role not in ("w", "b"):
        return None
    tensor_file, layer = chosen
    key = layer.weight if role == "w" else layer.bias
    return None if key is None else (tensor_file, key)


def _default_key(tensor_file: TensorFile, role: str) -> str:
    """Key to use for a reference without ``:KEY``: the only array, or the one named for role."""
    if tensor_file.format == "npy":
        return ""
    tensors = tensor_file.tensor_keys()
    if len(tensors) == 1:
        return tensors[0]
    key = tensor_file.find(role)
    if key is None:
        raise DataError(
            f"{{param}} {tensor_file.path}: the file holds {len(tensors)} arrays and none is "
            f"named {', '.join(ALIASES[role])}; pass {{param}} {tensor_file.path}:KEY; "
            f"it {tensor_file.describe()}",
            param=role,
        )
    return key


def _hparams_for(data_file: TensorFile | None, x_found: tuple[TensorFile, str] | None) -> Hparams:
    """Hyperparameters from the data file, else from the file x came from."""
    if data_file is not None:
        near = x_found[1] if x_found and x_found[0] is data_file else None
        return data_file.hparams(near_key=near)
    if x_found is not None:
        return x_found[0].hparams(near_key=x_found[1])
    return {}
