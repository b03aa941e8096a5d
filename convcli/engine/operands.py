"""Checking and converting the arrays handed to an engine (shared by both engines).

Layout: x NHWC ``(n, H, W, Cin)``, w HWIO ``(kh, kw, Cin / groups, Cout)``,
b ``None``, ``(Cout,)`` or ``(1, 1, 1, Cout)``, dz ``(n, Ho, Wo, Cout)``.

Dtype rule: float32 and float64 are kept; mixed inputs compute in the wider; integer
inputs are converted to float64 with a :class:`~convcli.errors.ConvcliNotice` warning;
every other dtype (bool, complex, float16, strings, objects, ...) is refused.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

from convcli.errors import ConvcliNotice, DtypeError, NonFiniteError, ShapeError
from convcli.spec import ConvSpec, Geometry

ACCEPTED_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))


def check_finite(name: str, array, *, offset: int = 0, allowable: bool = True) -> None:
    """Refuse NaN or ±Inf in ``array`` (``offset`` shifts the first index, for chunks).

    Raises
    ------
    NonFiniteError
        With the count and the index of the first bad value; ``allowable`` says whether the
        caller could choose to run anyway (``allow_nonfinite``).
    """
    array = np.asarray(array)
    if array.dtype.kind not in "fc":
        return
    finite = np.isfinite(array)
    if finite.all():
        return
    bad = array.size - int(np.count_nonzero(finite))
    first = [int(i) for i in np.argwhere(~finite)[0]]
    if first:
        first[0] += offset
    raise NonFiniteError(f"{name} has {bad} NaN/Inf values (first at {first})", allowable=allowable)


def check_float_dtype(name: str, dtype) -> None:
    """Refuse, without converting anything, a dtype that :func:`as_float_array` would refuse."""
    dtype = np.dtype(dtype)
    if dtype not in ACCEPTED_FLOATS and dtype.kind not in "iu":
        raise DtypeError(
            f"{name} has dtype {dtype}; convcli computes in float32 or float64 "
            "(integers are converted to float64)"
        )


def as_float_array(name: str, array) -> np.ndarray:
    """Return ``array`` as a float32/float64 ndarray, converting integers to float64.

    Raises
    ------
    DtypeError
        For any dtype other than float32, float64 or an integer type.
    """
    array = np.asarray(array)
    if array.dtype in ACCEPTED_FLOATS:
        return array
    if array.dtype.kind in "iu":
        warnings.warn(
            f"{name} has integer dtype {array.dtype}; converted to float64",
            ConvcliNotice,
            stacklevel=3,
        )
        return array.astype(np.float64)
    raise DtypeError(
        f"{name} has dtype {array.dtype}; convcli computes in float32 or float64 "
        "(integers are converted to float64)"
    )


@dataclass(frozen=True)
class ConvCache:
    """What ``conv_backward`` needs from ``conv_forward``.

    Attributes
    ----------
    x : ndarray of shape (n, H, W, Cin), C-contiguous, dtype ``dtype``
    w : ndarray of shape (kh, kw, Cin / groups, Cout), dtype ``dtype``
    b_shape : shape ``b`` was given in (``None`` when there was no bias)
    spec : the ConvSpec used
    geometry : resolved shapes and padding
    workspace : scratch-memory budget in bytes (the fast engine only)
    threads : tiles processed in parallel (None: as many as BLAS threads; fast engine only)
    """

    x: np.ndarray
    w: np.ndarray
    b_shape: tuple | None
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


def bias_shapes(geometry: Geometry) -> tuple[tuple, tuple]:
    """The shapes b may have: (Cout,) or broadcastable against z in the caller's layout."""
    ones = (1,) * geometry.rank
    full = (1, geometry.cout, *ones) if geometry.layout == "nchw" else (1, *ones, geometry.cout)
    return (geometry.cout,), full


def prepare(x, w, b, spec: ConvSpec | None):
    """Validate and convert forward operands to the engines' channels-last form.

    Returns
    -------
    x : C-contiguous ndarray (n, *spatial, Cin) in the compute dtype
    w : C-contiguous ndarray (*kernel, Cin / groups, Cout) in the compute dtype
    b : ndarray (Cout,) in the compute dtype, or None
    b_shape : the shape b was given in, or None
    geometry : :class:`~convcli.spec.Geometry`
    """
    spec = ConvSpec() if spec is None else spec
    x = as_float_array("x", x)
    w = as_float_array("w", w)
    geometry = spec.geometry(x.shape, w.shape)
    b_shape = None
    if b is not None:
        b = as_float_array("b", b)
        b_shape = b.shape
        if b.shape not in bias_shapes(geometry):
            flat, full = bias_shapes(geometry)
            raise ShapeError(f"b has shape {b.shape}; expected {flat} or {full}")
    dtype = np.result_type(*(a for a in (x, w, b) if a is not None))
    x = np.ascontiguousarray(x_to_last(x, spec.layout), dtype=dtype)
    w = np.ascontiguousarray(w_to_last(w, spec.layout), dtype=dtype)
    if b is not None:
        b = np.ascontiguousarray(b.reshape(-1), dtype=dtype)
    return x, w, b, b_shape, geometry


def prepare_upstream(dz, cache: ConvCache):
    """Validate dz (shape of z, caller's layout) and return it channels last, and the dtype.

    The backward pass computes in the wider of the forward dtype and dz's dtype.
    """
    dz = as_float_array("dz", dz)
    expected = cache.geometry.user_out_shape
    if dz.shape != expected:
        raise ShapeError(f"dz has shape {dz.shape}; the forward output z has shape {expected}")
    dtype = np.result_type(dz, cache.dtype)
    return np.ascontiguousarray(x_to_last(dz, cache.geometry.layout), dtype=dtype), dtype


def finish_gradients(dx, dw, db, cache: ConvCache):
    """Channels-last gradients back in the caller's layout, db in the shape b was given."""
    layout = cache.geometry.layout
    return x_from_last(dx, layout), w_from_last(dw, layout), shape_bias_grad(db, cache.b_shape)


def shape_bias_grad(db: np.ndarray, b_shape: tuple | None) -> np.ndarray | None:
    """Return db (Cout,) in the shape b was given in (None when there was no bias)."""
    return None if b_shape is None else db.reshape(b_shape)
