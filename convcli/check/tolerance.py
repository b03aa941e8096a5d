"""The one tolerance rule of every check: when two values count as equal, and how errors are read.

A value ``got`` passes against a reference ``want`` when

    ``|got - want| <= atol + rtol · scale``,  with ``scale = max(|got|, |want|)`` by default,

and NaN never passes. :func:`gradcheck <convcli.check.gradients.gradcheck>` applies it to
analytic against numerical gradients (and, in fast mode, to random projections, whose scale
is ``Σ |analytic ⊙ u|``), :mod:`convcli.check.userimpl` to a user's tensors against the
engine's, and a sweep passes its :class:`Tolerance` on to gradcheck.

Why the defaults can be tight: z is linear in x, in w and in b separately, so a central
difference has no truncation error at all, only rounding error of about ``u · |z| / eps``
(u the float64 unit roundoff). That lets the default step be large (``DEFAULT_EPS = 1e-3``)
and the tolerances small.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from convcli.errors import UsageError

DEFAULT_EPS = 1e-3
DEFAULT_RTOL = 1e-6
DEFAULT_ATOL = 1e-8
WORST = 5  # elements (or probes) shown per failing tensor


@dataclass(frozen=True)
class Tolerance:
    """Per element: pass when ``|a - n| <= atol + rtol * max(|a|, |n|)``; eps is the step.

    Parameters
    ----------
    eps : float
        Step of the central differences, ``(f(t + eps) - f(t - eps)) / 2eps``; finite, > 0.
    rtol, atol : float
        Relative and absolute tolerance of the rule above; finite, >= 0.

    Raises
    ------
    UsageError
        For a value that is not a finite real number in its range (NaN, ±Inf, negative,
        a zero step, a string or a bool), with ``param`` the field's name.
    """

    eps: float = DEFAULT_EPS
    rtol: float = DEFAULT_RTOL
    atol: float = DEFAULT_ATOL

    def __post_init__(self) -> None:
        for name, positive in (("eps", True), ("rtol", False), ("atol", False)):
            object.__setattr__(self, name, _checked(name, getattr(self, name), positive))

    def exceeded(self, abs_errors: np.ndarray, scale: np.ndarray) -> np.ndarray:
        """Booleans, same shape: where ``abs_errors > atol + rtol * scale`` (NaN counts)."""
        return ~(abs_errors <= self.atol + self.rtol * scale)

    def fails(self, got: np.ndarray, want: np.ndarray) -> np.ndarray:
        """Booleans, same shape: elements where ``got`` and ``want`` differ by more than
        allowed (NaN fails). Arrays of one shape, any layout."""
        return self.exceeded(np.abs(got - want), np.maximum(np.abs(got), np.abs(want)))


def _checked(name: str, value: object, positive: bool) -> float:
    """``value`` as a float when it is a finite real number, > 0 (``positive``) or >= 0."""
    bound = "> 0" if positive else ">= 0"
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise UsageError(f"{{param}} {value!r}: expected a finite number {bound}", param=name)
    number = float(value)
    if not math.isfinite(number):
        raise UsageError(f"{{param}} {number}: must be a finite number {bound}", param=name)
    if number < 0 or (positive and number == 0):
        raise UsageError(f"{{param}} {number:g}: must be {bound}", param=name)
    return number


DEFAULT_TOLERANCE = Tolerance()


@dataclass(frozen=True)
class ElementErrors:
    """What :func:`compare_elements` found; every array has the compared arrays' shape.

    Attributes
    ----------
    abs_errors : ndarray of float64
        ``|got - want|``.
    rel_errors : ndarray of float64
        ``abs_errors / scale``, 0 where the scale is 0.
    failed : ndarray of bool
        Elements outside the tolerance (NaN fails).
    order : ndarray of int, 1-D
        Flat indices of at most ``worst`` elements to show: failing ones first, each group
        by |error| from the largest (NaN counts as largest).
    """

    abs_errors: np.ndarray
    rel_errors: np.ndarray
    failed: np.ndarray
    order: np.ndarray

    @property
    def max_abs(self) -> float:
        """The largest absolute error (NaN if any is NaN, 0 for no elements)."""
        return finite_max(self.abs_errors)

    @property
    def max_rel(self) -> float:
        """The largest relative error (NaN if any is NaN, 0 for no elements)."""
        return finite_max(self.rel_errors)


def compare_elements(
    got: np.ndarray,
    want: np.ndarray,
    tolerance: Tolerance,
    *,
    scale: np.ndarray | None = None,
    worst: int = WORST,
) -> ElementErrors:
    """The one element-wise comparison, under ``tolerance``.

    Parameters
    ----------
    got, want : ndarray of float64, one shape (any layout)
        The values checked and their reference.
    tolerance : Tolerance
    scale : ndarray of float64, same shape, optional
        What ``rtol`` multiplies; default ``max(|got|, |want|)``.
    worst : int
        How many elements :attr:`ElementErrors.order` names.
    """
    abs_errors = np.abs(got - want)
    if scale is None:
        scale = np.maximum(np.abs(got), np.abs(want))
    failed = tolerance.exceeded(abs_errors, scale)
    rel = np.divide(abs_errors, scale, out=np.zeros_like(abs_errors), where=scale > 0)
    magnitude = np.nan_to_num(abs_errors, nan=np.inf).ravel()
    order = np.lexsort((magnitude, failed.ravel()))[::-1][:worst]
    return ElementErrors(abs_errors=abs_errors, rel_errors=rel, failed=failed, order=order)


def finite_max(values: np.ndarray) -> float:
    """The largest of ``values`` as a float: NaN when any is NaN, 0.0 when there are none."""
    if values.size == 0:
        return 0.0
    if np.isnan(values).any():
        return float("nan")
    return float(values.max())


# -- saved results against convcli's: the accumulation rule ---------------------------------

ACCUMULATION_FACTOR = 2.0  # c in rtol = c · eps(dtype) · sqrt(K)
RESULT_DTYPES = ("float32", "float64")


def accumulation_tolerance(
    dtype: np.dtype | str, reduction: int, *, rtol: float | None = None, atol: float | None = None
) -> Tolerance:
    """The tolerance for a result computed in ``dtype`` as sums of ``reduction`` products.

    A result element is a sum of K = ``reduction`` rounded products (z: kh·kw·Cin/groups
    and the bias; dx: Cout/groups·kh·kw; dw and db: n·Ho·Wo). Whatever the order of
    summation, its rounding error stays, with high probability, below about
    ``sqrt(K) · eps · Σ|terms|`` (the probabilistic bound of Higham and Mary, 2019), so an
    element passes when

        ``|yours - convcli's| <= atol + rtol · Σ|terms|``,
        ``rtol = ACCUMULATION_FACTOR · eps(dtype) · sqrt(K)``,
        ``atol = K · tiny(dtype)`` (the smallest normal number: sums of underflowing terms),

    and the caller passes ``Σ|terms|`` as the scale of :func:`compare_elements` (computed by
    the engine on |x|, |w|, |dz|). The factor covers the final rounding to ``dtype`` and
    convcli's own float64 error. ``rtol``/``atol`` given replace the computed values.

    Parameters
    ----------
    dtype : numpy.dtype or str
        float32 or float64, the dtype of the result checked.
    reduction : int
        K, the number of products summed into one element (at least 1).
    rtol, atol : float, optional
        Replacements, validated as :class:`Tolerance` fields.
    """
    info = np.finfo(np.dtype(dtype))
    count = max(int(reduction), 1)
    return Tolerance(
        rtol=ACCUMULATION_FACTOR * float(info.eps) * math.sqrt(count) if rtol is None else rtol,
        atol=count * float(info.tiny) if atol is None else atol,
    )
