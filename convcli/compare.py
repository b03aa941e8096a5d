"""Saved results against convcli's: the library behind ``convcli compare``.

:func:`run_compare` takes a layer's inputs (:class:`~convcli.run.RunInputs`: x, w, b and
optionally dz, in the spec's layout) and the results someone else computed for it (z, dx,
dw, db in the same layout; db ``(Cout,)`` or any shape of Cout elements), computes convcli's
own results in float64 and compares each tensor given under the accumulation rule of
:func:`convcli.check.tolerance.accumulation_tolerance`. A tensor that fails is handed to
:func:`convcli.check.diagnosis.diagnose`, which names the usual mistake that explains it.

dx, dw and db depend on the upstream gradient: ``inputs.dz`` when given, else dz = z
(convcli's z, the gradient of the loss ½‖z‖², as ``backward`` does by default).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

import numpy as np

from convcli.check.diagnosis import TENSORS, Diagnosis, Setup, diagnose
from convcli.check.gradients import TensorCheck
from convcli.check.tolerance import (
    RESULT_DTYPES,
    Tolerance,
    accumulation_tolerance,
    compare_elements,
    finite_max,
)
from convcli.engine.fast import DEFAULT_WORKSPACE, scratch_bytes
from convcli.engine.operands import check_finite, check_float_dtype
from convcli.errors import DataError, DtypeError, UsageError
from convcli.io.tensorfile import ALIASES
from convcli.memory import check_memory, nbytes
from convcli.run import RunInputs
from convcli.spec import ConvSpec, Geometry

UPSTREAM_DEFAULT = "dz = z (convcli's z: the gradient of the loss ½‖z‖²)"


@dataclass(frozen=True)
class TensorComparison:
    """The verdict on one of the user's tensors.

    Attributes
    ----------
    check : TensorCheck
        As gradcheck reports a tensor (:meth:`TensorCheck.to_json` is the same shape); its
        ``worst`` rows hold ``index``, ``yours``, ``expected`` and ``abs_err``. For a
        result of the wrong shape nothing is checked (``checked`` 0, errors NaN).
    dtype : str
        The user's dtype, float32 or float64.
    reduction : int
        K, the products summed into one element (see the tolerance rule).
    tolerance : Tolerance
        rtol and atol applied (the scale is Σ|terms|).
    origin : str
        Where the tensor came from, e.g. ``"run.npz:out"``.
    shape : tuple of int
        The user's shape (``check.shape`` is convcli's).
    diagnosis : Diagnosis or None
        For a failing tensor, what explains it (None for a passing one).
    """

    check: TensorCheck
    dtype: str
    reduction: int
    tolerance: Tolerance
    origin: str
    shape: tuple[int, ...]
    diagnosis: Diagnosis | None = None

    @property
    def passed(self) -> bool:
        return self.check.passed

    def to_json(self) -> dict:
        """gradcheck's tensor entry plus dtype, reduction, tolerance, origin, diagnosis."""
        return {
            **self.check.to_json(),
            "shape": list(self.shape),
            "expected_shape": list(self.check.shape),
            "dtype": self.dtype,
            "reduction": self.reduction,
            "tolerance": {"rtol": self.tolerance.rtol, "atol": self.tolerance.atol},
            "origin": self.origin,
            "diagnosis": None if self.diagnosis is None else self.diagnosis.to_json(),
        }


@dataclass(frozen=True)
class CompareRun:
    """Every tensor compared (in the order z, dx, dw, db), the layer and the upstream rule."""

    tensors: dict[str, TensorComparison]
    hparams: dict
    upstream: str | None
    seconds: float
    notices: tuple[str, ...] = field(default_factory=tuple)

    @property
    def passed(self) -> bool:
        """Whether every tensor given matches convcli's."""
        return all(t.passed for t in self.tensors.values())


class NoResultsError(DataError):
    """No result tensor was given: the message lists every name looked for."""

    def __init__(self) -> None:
        looked = "; ".join(f"{role} ({', '.join(ALIASES[role])})" for role in TENSORS)
        super().__init__(f"no result to compare: looked for {looked}", param="z")


def run_compare(
    inputs: RunInputs,
    results: Mapping[str, np.ndarray],
    spec: ConvSpec,
    *,
    origins: Mapping[str, str] | None = None,
    rtol: float | None = None,
    atol: float | None = None,
    max_memory: int | None = None,
    diagnose_failures: bool = True,
) -> CompareRun:
    """Compare the user's ``results`` with convcli's float64 results for ``inputs``.

    Parameters
    ----------
    inputs : RunInputs
        x ``(n, *spatial, Cin)`` (``(n, Cin, *spatial)`` channels first), w, b, dz in
        memory, in ``spec.layout``; float32 or float64.
    results : mapping of str to ndarray
        Some of ``"z"`` (shape of z), ``"dx"`` (of x), ``"dw"`` (of w), ``"db"`` (Cout
        elements), float32 or float64, in ``spec.layout``.
    spec : ConvSpec
    origins : mapping of str to str, optional
        Where each result came from (shown in reports).
    rtol, atol : float, optional
        Replace the rule's tolerances (the scale stays Σ|terms|).
    max_memory : int, optional
        Refuse, before any work, a comparison estimated to need more bytes.
    diagnose_failures : bool
        Try the usual mistakes on failing tensors (:mod:`convcli.check.diagnosis`).

    Raises
    ------
    DataError
        No result given (``param="z"``); a result holding NaN or Inf is compared, not
        refused (it fails).
    DtypeError
        A result that is not float32 or float64 (``param`` its name).
    """
    start = time.perf_counter()
    given = {name: results[name] for name in TENSORS if results.get(name) is not None}
    if not given:
        raise NoResultsError()
    for name, value in given.items():
        if np.asarray(value).dtype.name not in RESULT_DTYPES:
            raise DtypeError(
                f"{{param}} is {np.asarray(value).dtype}: compare reads float32 or float64 results",
                param=name,
            )
    if inputs.streamed:
        raise UsageError("compare needs x and dz in memory, not read from disk in blocks")
    setup = _setup(inputs, spec)
    geometry = spec.geometry(setup.x.shape, setup.w.shape)
    _check_memory(geometry, inputs, given, max_memory)
    ours = setup.compute()
    scales = setup.absolute().compute()
    origins = origins or {}
    compared: dict[str, TensorComparison] = {}
    for name, value in given.items():
        array = np.asarray(value)
        reduction = reduction_size(name, geometry, setup.b is not None)
        tolerance = accumulation_tolerance(array.dtype, reduction, rtol=rtol, atol=atol)
        got = _as_expected(name, array.astype(np.float64), ours[name].shape)
        compared[name] = TensorComparison(
            check=_check(name, got, ours[name], scales[name], tolerance, spec.layout),
            dtype=array.dtype.name,
            reduction=reduction,
            tolerance=tolerance,
            origin=origins.get(name, name),
            shape=tuple(array.shape),
        )
    if diagnose_failures:
        compared = _with_diagnoses(compared, given, setup)
    gradients = any(name != "z" for name in given)
    return CompareRun(
        tensors=compared,
        hparams=geometry.hparams(),
        upstream=(inputs.origins.get("dz", "dz") if inputs.dz is not None else UPSTREAM_DEFAULT)
        if gradients
        else None,
        seconds=time.perf_counter() - start,
    )


def reduction_size(name: str, geometry: Geometry, has_bias: bool) -> int:
    """K for ``name``: z kh·kw·Cin/groups (+1 for the bias), dx Cout/groups·kh·kw, dw and
    db n·Ho·Wo (products summed into one element).

    A transposed layer's z sums only the taps that land on its position: along an axis at
    most ``ceil(k / (stride / gcd(stride, dilation)))`` of the k (taps land ``dilation``
    apart, inputs ``stride``), times Cin/groups; its dw sums over n·H·W (x's pixels)."""
    taps = int(np.prod(geometry.kernel))
    if name == "z":
        if geometry.transposed:
            taps = math.prod(
                -(-k // (s // math.gcd(s, d)))
                for k, s, d in zip(geometry.kernel, geometry.stride, geometry.dilation, strict=True)
            )
        return taps * geometry.cin // geometry.groups + int(has_bias)
    if name == "dx":
        return taps * geometry.cout // geometry.groups
    if name == "dw" and geometry.transposed:
        return geometry.n * int(np.prod(geometry.in_sizes))
    return geometry.n * int(np.prod(geometry.out_sizes))


def _setup(inputs: RunInputs, spec: ConvSpec) -> Setup:
    return Setup(
        _float64("x", inputs.x),
        _float64("w", inputs.w),
        None if inputs.b is None else _float64("b", inputs.b),
        None if inputs.dz is None else _float64("dz", inputs.dz),
        spec,
    )


def _float64(name: str, value: object) -> np.ndarray:
    """An input as float64, refusing other dtypes than floats and ints, and NaN/Inf."""
    array = np.asarray(value)
    check_float_dtype(name, array.dtype)
    check_finite(name, array, allowable=False)
    return array.astype(np.float64)


def _check_memory(
    geometry: Geometry, inputs: RunInputs, given: Mapping[str, np.ndarray], max_memory: int | None
) -> None:
    """Refuse before work: convcli's results and their |·| twins, the candidates' results."""
    shapes = geometry.user_shapes()
    one_set = sum(nbytes(shapes[k], np.float64) for k in ("x", "w")) + 2 * nbytes(
        geometry.out_shape, np.float64
    )
    check_memory(
        {
            "inputs": sum(np.asarray(v).nbytes for v in inputs.given().values()),
            "results": sum(np.asarray(v).nbytes for v in given.values()),
            "float64 copies": one_set,
            "convcli's results": 2 * one_set,
            "diagnosis": 3 * one_set,
            "workspace": scratch_bytes(geometry, np.dtype(np.float64), DEFAULT_WORKSPACE),
        },
        max_memory,
    )


def _as_expected(name: str, got: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """db of Cout elements in any broadcast shape, e.g. ``(1, 1, 1, Cout)``, as ``(Cout,)``."""
    if name == "db" and got.size == int(np.prod(shape)) and got.ndim != len(shape):
        return got.reshape(shape)
    return got


def _check(
    name: str,
    got: np.ndarray,
    want: np.ndarray,
    scale: np.ndarray,
    tolerance: Tolerance,
    layout: str,
) -> TensorCheck:
    """gradcheck's verdict shape for ``got`` against ``want`` (float64, one layout)."""
    if got.shape != want.shape:
        return TensorCheck(
            name=name,
            shape=want.shape,
            checked=0,
            total=int(want.size),
            max_abs_err=float("nan"),
            max_rel_err=float("nan"),
            passed=False,
            layout=layout,
        )
    errors = compare_elements(got, want, tolerance, scale=scale)
    worst = [
        {
            "index": [int(i) for i in np.unravel_index(flat, got.shape)],
            "yours": float(got.flat[flat]),
            "expected": float(want.flat[flat]),
            "abs_err": float(errors.abs_errors.flat[flat]),
        }
        for flat in errors.order
    ]
    channel_axis = 1 if layout == "nchw" and name in ("z", "dx") else -1
    if name == "dw":
        channel_axis = 0 if layout == "nchw" else -1
    by_channel = np.moveaxis(errors.failed, channel_axis, -1)
    per_channel = by_channel.reshape(-1, by_channel.shape[-1]).sum(axis=0)
    return TensorCheck(
        name=name,
        shape=want.shape,
        checked=int(got.size),
        total=int(got.size),
        max_abs_err=finite_max(errors.abs_errors),
        max_rel_err=finite_max(errors.rel_errors),
        passed=not errors.failed.any(),
        worst=worst,
        failures_per_channel={int(c): int(k) for c, k in enumerate(per_channel) if k},
        abs_errors=errors.abs_errors,
        failed=errors.failed,
        layout=layout,
    )


def _with_diagnoses(
    compared: dict[str, TensorComparison], given: Mapping[str, np.ndarray], setup: Setup
) -> dict[str, TensorComparison]:
    failing = {
        name: np.asarray(given[name], dtype=np.float64)
        for name, comparison in compared.items()
        if not comparison.passed
    }
    if not failing:
        return compared
    found = diagnose(
        {
            name: _as_expected(name, value, compared[name].check.shape)
            for name, value in failing.items()
        },
        setup,
        {name: compared[name].tolerance for name in failing},
    )
    return {name: replace(c, diagnosis=found.get(name)) for name, c in compared.items()}
