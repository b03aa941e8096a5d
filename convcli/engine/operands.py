"""Checking and converting the arrays handed to an engine (shared by both engines).

The caller's layout is the :class:`~convcli.spec.ConvSpec`'s: channels last x
``(n, *spatial, Cin)``, w ``(*kernel, Cin / groups, Cout)``, dz ``(n, *out, Cout)``, or
channels first x ``(n, Cin, *spatial)``, w ``(Cout, Cin / groups, *kernel)``, dz
``(n, Cout, *out)``; b is ``None``, ``(Cout,)`` or broadcastable against z. The engines work
channels last; :func:`prepare` and :func:`finish_gradients` convert on the way in and out.

Dtype rule: float32 and float64 are kept; mixed inputs compute in the wider; integer
inputs are converted to float64 with a :class:`~convcli.errors.ConvcliNotice` warning;
every other dtype (bool, complex, float16, strings, objects, ...) is refused.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from types import EllipsisType
from typing import TypeAlias

import numpy as np
import numpy.typing as npt

from convcli.errors import ConvcliNotice, DtypeError, NonFiniteError, ShapeError
from convcli.spec import ConvSpec, Geometry

ACCEPTED_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))

#: An index into an array, one entry per axis: ints, slices, ``...`` and integer arrays.
Index: TypeAlias = tuple["int | slice | EllipsisType | np.ndarray", ...]


def check_finite(
    name: str, array: npt.ArrayLike, *, offset: int = 0, allowable: bool = True
) -> None:
    """Refuse NaN or ±Inf in ``array`` (``offset`` shifts the first index, for chunks).

    Raises
    ------
    NonFiniteError
        With the count and the index of the first bad value; ``allowable`` says whether the
        caller could choose to run anyway (``allow_nonfinite``).
    """
    values = np.asarray(array)
    if values.dtype.kind not in "fc":
        return
    finite = np.isfinite(values)
    if finite.all():
        return
    bad = values.size - int(np.count_nonzero(finite))
    first = [int(i) for i in np.argwhere(~finite)[0]]
    if first:
        first[0] += offset
    raise NonFiniteError(f"{name} has {bad} NaN/Inf values (first at {first})", allowable=allowable)


def check_float_dtype(name: str, dtype: npt.DTypeLike) -> None:
    """Refuse, without converting anything, a dtype that :func:`as_float_array` would refuse."""
    resolved = np.dtype(dtype)
    if resolved.names is None and not resolved.isnative:
        resolved = resolved.newbyteorder("=")  # byte-swapped floats are read, made native
    if resolved not in ACCEPTED_FLOATS and resolved.kind not in "iu":
        raise DtypeError(
            f"{name} has dtype {resolved}; convcli computes in float32 or float64 "
            "(integers are converted to float64)"
        )


def as_float_array(name: str, array: npt.ArrayLike) -> np.ndarray:
    """Return ``array`` as a float32/float64 ndarray, converting integers to float64.

    Byte-swapped (big-endian on this machine) float32/float64 come back in native order,
    same dtype.

    Raises
    ------
    DtypeError
        For any dtype other than float32, float64 or an integer type.
    """
    values = np.asarray(array)
    if values.dtype.names is None and not values.dtype.isnative:
        values = values.astype(values.dtype.newbyteorder("="))
    if values.dtype in ACCEPTED_FLOATS:
        return values
    if values.dtype.kind in "iu":
        warnings.warn(
            f"{name} has integer dtype {values.dtype}; converted to float64",
            ConvcliNotice,
            stacklevel=3,
        )
        return values.astype(np.float64)
    raise DtypeError(
        f"{name} has dtype {values.dtype}; convcli computes in float32 or float64 "
        "(integers are converted to float64)"
    )


@dataclass(frozen=True)
class ConvCache:
    """What ``conv_backward`` needs from ``conv_forward``.

    Attributes
    ----------
    x : ndarray of shape (n, *spatial, Cin) (channels last), C-contiguous, dtype ``dtype``
    w : ndarray of shape (*kernel, Cin / groups, Cout) (transposed: (*kernel, Cout / groups,
        Cin)), dtype ``dtype``
    b_shape : shape ``b`` was given in (``None`` when there was no bias)
    spec : the ConvSpec used
    geometry : resolved shapes and padding
    workspace : scratch-memory budget in bytes (the fast engine only)
    threads : tiles processed in parallel (None: as many as BLAS threads; fast engine only)
    """

    x: np.ndarray
    w: np.ndarray
    b_shape: tuple[int, ...] | None
    spec: ConvSpec
    geometry: Geometry
    workspace: int
    threads: int | None = None

    @property
    def dtype(self) -> np.dtype:
        return self.x.dtype


def x_to_last(x: np.ndarray, layout: str) -> np.ndarray:
    """Activations (n, C, *spatial) -> (n, *spatial, C) when the layout is channels first."""
    return np.moveaxis(x, 1, -1) if layout == "nchw" else x


def x_from_last(x: np.ndarray, layout: str) -> np.ndarray:
    """Inverse of :func:`x_to_last` (a C-contiguous array in the caller's layout)."""
    return np.ascontiguousarray(np.moveaxis(x, -1, 1)) if layout == "nchw" else x


def w_to_last(w: np.ndarray, layout: str) -> np.ndarray:
    """Weights (Cout, Cin/g, *kernel) -> (*kernel, Cin/g, Cout) when channels first."""
    return np.moveaxis(w, (0, 1), (-1, -2)) if layout == "nchw" else w


def w_from_last(w: np.ndarray, layout: str) -> np.ndarray:
    """Inverse of :func:`w_to_last`."""
    return np.ascontiguousarray(np.moveaxis(w, (-1, -2), (0, 1))) if layout == "nchw" else w


def bias_shapes(geometry: Geometry) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The shapes b may have: (Cout,) or broadcastable against z in the caller's layout."""
    ones = (1,) * geometry.rank
    full = (1, geometry.cout, *ones) if geometry.layout == "nchw" else (1, *ones, geometry.cout)
    return (geometry.cout,), full


@dataclass(frozen=True)
class Operands:
    """Forward operands checked and converted to the engines' channels-last form.

    Attributes
    ----------
    x : C-contiguous ndarray (n, *spatial, Cin) in the compute dtype
    w : C-contiguous ndarray (*kernel, Cin / groups, Cout) in the compute dtype
    b : ndarray (Cout,) in the compute dtype, or None
    b_shape : the shape b was given in, or None
    geometry : :class:`~convcli.spec.Geometry`
    """

    x: np.ndarray
    w: np.ndarray
    b: np.ndarray | None
    b_shape: tuple[int, ...] | None
    geometry: Geometry


def prepare(
    x: npt.ArrayLike, w: npt.ArrayLike, b: npt.ArrayLike | None, spec: ConvSpec | None
) -> Operands:
    """Validate and convert forward operands (in the spec's layout) to channels last.

    The compute dtype is the wider of the operands' float dtypes (integers count as float64).

    Raises
    ------
    DtypeError, ShapeError, HyperparameterError
        For an unusable dtype, a bias of the wrong shape, or shapes that do not fit the spec.
    """
    spec = ConvSpec() if spec is None else spec
    x_in = as_float_array("x", x)
    w_in = as_float_array("w", w)
    geometry = spec.geometry(x_in.shape, w_in.shape)
    b_in = None
    if b is not None:
        b_in = as_float_array("b", b)
        if b_in.shape not in bias_shapes(geometry):
            flat, full = bias_shapes(geometry)
            raise ShapeError(f"b has shape {b_in.shape}; expected {flat} or {full}")
    dtype = np.result_type(*(a for a in (x_in, w_in, b_in) if a is not None))
    return Operands(
        x=np.ascontiguousarray(x_to_last(x_in, spec.layout), dtype=dtype),
        w=np.ascontiguousarray(w_to_last(w_in, spec.layout), dtype=dtype),
        b=None if b_in is None else np.ascontiguousarray(b_in.reshape(-1), dtype=dtype),
        b_shape=None if b_in is None else b_in.shape,
        geometry=geometry,
    )


def prepare_upstream(dz: npt.ArrayLike, cache: ConvCache) -> tuple[np.ndarray, np.dtype]:
    """Validate dz (shape of z, caller's layout) and return it channels last, and the dtype.

    The backward pass computes in the wider of the forward dtype and dz's dtype.
    """
    dz_in = as_float_array("dz", dz)
    expected = cache.geometry.user_out_shape
    if dz_in.shape != expected:
        raise ShapeError(f"dz has shape {dz_in.shape}; the forward output z has shape {expected}")
    dtype = np.result_type(dz_in, cache.dtype)
    return np.ascontiguousarray(x_to_last(dz_in, cache.geometry.layout), dtype=dtype), dtype


def finish_gradients(
    dx: np.ndarray, dw: np.ndarray, db: np.ndarray | None, cache: ConvCache
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Channels-last gradients back in the caller's layout, db in the shape b was given."""
    layout = cache.geometry.layout
    return x_from_last(dx, layout), w_from_last(dw, layout), shape_bias_grad(db, cache.b_shape)


def shape_bias_grad(db: np.ndarray | None, b_shape: tuple[int, ...] | None) -> np.ndarray | None:
    """Return db (Cout,) in the shape b was given in (None when there was no bias)."""
    return None if b_shape is None or db is None else db.reshape(b_shape)
