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

from convcli.errors import ConvcliNotice, DtypeError, ShapeError
from convcli.spec import ConvSpec, Geometry

ACCEPTED_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))


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


def prepare(x, w, b, spec: ConvSpec | None):
    """Validate and convert forward operands.

    Returns
    -------
    x : C-contiguous ndarray (n, H, W, Cin) in the compute dtype
    w : C-contiguous ndarray (kh, kw, Cin / groups, Cout) in the compute dtype
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
        if b.shape not in ((geometry.cout,), (1,) * (len(geometry.kernel) + 1) + (geometry.cout,)):
            raise ShapeError(
                f"b has shape {b.shape}; expected ({geometry.cout},) or (1, 1, 1, {geometry.cout})"
            )
    dtype = np.result_type(*(a for a in (x, w, b) if a is not None))
    x = np.ascontiguousarray(x, dtype=dtype)
    w = np.ascontiguousarray(w, dtype=dtype)
    if b is not None:
        b = np.ascontiguousarray(b.reshape(-1), dtype=dtype)
    return x, w, b, b_shape, geometry


def prepare_upstream(dz, cache: ConvCache):
    """Validate dz (n, Ho, Wo, Cout) against the forward pass and return it and the compute dtype.

    The backward pass computes in the wider of the forward dtype and dz's dtype.
    """
    dz = as_float_array("dz", dz)
    expected = cache.geometry.out_shape
    if dz.shape != expected:
        raise ShapeError(f"dz has shape {dz.shape}; the forward output z has shape {expected}")
    dtype = np.result_type(dz, cache.dtype)
    return np.ascontiguousarray(dz, dtype=dtype), dtype


def shape_bias_grad(db: np.ndarray, b_shape: tuple | None) -> np.ndarray | None:
    """Return db (Cout,) in the shape b was given in (None when there was no bias)."""
    return None if b_shape is None else db.reshape(b_shape)
