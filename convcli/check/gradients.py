"""Gradient checking: analytic dx, dw, db against central differences of forward passes.

The scalar checked is ``L = Σ z ⊙ g`` for a fixed upstream gradient ``g`` (shape of z), so
the analytic gradients are ``backward(g)``. Everything runs in float64 and is reported in the
caller's layout: x NHWC ``(n, H, W, Cin)``, w HWIO ``(kh, kw, Cin/groups, Cout)`` (channels
first: NCHW, OIHW; 1-D and 3-D alike), b ``(Cout,)``. Elements pass under the one rule of
:mod:`convcli.check.tolerance`.

Modes
-----
Each mode is a strategy: a function of one :class:`CheckSetup` returning the verdicts,
beside a function giving the forward passes it plans, chosen from :data:`STRATEGIES`.

exhaustive
    Every element of x, w and b, perturbed in groups whose effects on z cannot overlap
    (:mod:`convcli.check.exhaustive`); the number of forward passes does not grow with n, H, W.
sample
    ``samples`` random elements per tensor, each perturbed alone (2 passes each).
fast
    ``probes`` random directions per tensor: ``vᵀ J u`` from two forward passes against
    ``⟨backward(v), u⟩``, with fresh random ``u`` and ``v`` per probe (as PyTorch's fast mode).
auto
    exhaustive when its work — planned forward passes times the cost of one, see
    :func:`auto_mode` — is at most ``AUTO_MAX_WORK``, otherwise sample + fast. Chosen from
    sizes alone, never from timing, so a rerun chooses the same mode.

The random upstream gradient, samples and probes come from a generator of their own seeded
with ``seed``; the caller's global NumPy state is never used.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from convcli.check.exhaustive import exhaustive_numeric, exhaustive_passes
from convcli.check.tolerance import DEFAULT_TOLERANCE, Tolerance, compare_elements
from convcli.engine.fast import conv_backward, conv_forward
from convcli.engine.operands import check_finite, w_from_last, w_to_last, x_from_last, x_to_last
from convcli.errors import DataError, NonFiniteError, UsageError
from convcli.spec import ConvSpec, Geometry

DEFAULT_SAMPLES = 64
DEFAULT_PROBES = 8
# auto: exhaustive when passes * (multiply-adds per pass + PASS_OVERHEAD) <= AUTO_MAX_WORK.
# PASS_OVERHEAD is a pass's fixed cost counted in multiply-adds. On the README's 2-core machine
# the fast engine takes about 0.25 ns per float64 multiply-add and 0.3 ms per pass, so the
# budget is about 5 s there. Sizes, not timings: every machine and every run choose alike.
AUTO_MAX_WORK = 2 * 10**10
PASS_OVERHEAD = 10**6
# Any mode: a check whose planned work exceeds MAX_WORK (about four minutes on that machine)
# is refused before it starts, naming the estimate (absurd --samples/--probes counts).
MAX_WORK = 50 * AUTO_MAX_WORK
MODES = ("auto", "exhaustive", "sample", "fast")

# forward(x, w, b) -> z ; backward(g, x, w, b) -> (dx, dw, db), all float64 arrays.
ForwardFn = Callable[[np.ndarray, np.ndarray, "np.ndarray | None"], np.ndarray]
BackwardFn = Callable[..., tuple]
Progress = Callable[[int, int], None]


@dataclass
class TensorCheck:
    """The verdict for one gradient (dx, dw or db), in the caller's layout.

    ``abs_errors`` holds |analytic - numeric| in the tensor's shape when every element was
    checked (NaN elsewhere in sample mode; None in fast mode, where probes are not elements);
    ``failed`` the elements outside the tolerance (booleans, same shape, or None). ``probes``
    holds the fast mode's verdict beside a sample check (mode sample+fast).
    """

    name: str
    shape: tuple
    checked: int
    total: int
    max_abs_err: float
    max_rel_err: float
    passed: bool
    unit: str = "elements"
    worst: list[dict] = field(default_factory=list)
    failures_per_channel: dict[int, int] = field(default_factory=dict)
    abs_errors: np.ndarray | None = None
    failed: np.ndarray | None = None
    probes: TensorCheck | None = None
    layout: str = "nhwc"

    def to_json(self) -> dict:
        """The verdict as JSON values (non-finite errors become None)."""
        return {
            "checked": self.checked,
            "total": self.total,
            "unit": self.unit,
            "max_abs_err": _json_float(self.max_abs_err),
            "max_rel_err": _json_float(self.max_rel_err),
            "passed": self.passed,
            "worst": [{k: _json_float(v) for k, v in row.items()} for row in self.worst],
            "failures_per_channel": {str(k): v for k, v in self.failures_per_channel.items()},
            "probes": None if self.probes is None else self.probes.to_json(),
        }

    def error_map(self) -> tuple[np.ndarray, str] | None:
        """|error| over the two spatial axes for the channel with most failures (or the worst).

        dx: max over the batch for input channel c -> (H, W). dw: max over input channels for
        output channel c -> (kh, kw). None when no element-wise errors were computed.
        """
        if self.abs_errors is None or len(self.shape) != 4 or np.isnan(self.abs_errors).all():
            return None
        errors = np.nan_to_num(self.abs_errors, nan=0.0)
        if self.name == "dx":
            errors = x_to_last(errors, self.layout)
        elif self.name == "dw":
            errors = w_to_last(errors, self.layout)
        channel = self._worst_channel(errors)
        if self.name == "dx":
            return errors[..., channel].max(axis=0), f"|error| of dx over (H, W), channel {channel}"
        return (
            errors[..., channel].max(axis=2),
            f"|error| of {self.name} over (kh, kw), output channel {channel}",
        )

    def _worst_channel(self, errors: np.ndarray) -> int:
        if self.failures_per_channel:
            failures = self.failures_per_channel
            return max(failures, key=lambda channel: failures[channel])
        per_channel = errors.reshape(-1, errors.shape[-1]).max(axis=0)
        return int(np.argmax(per_channel))


def _json_float(value):
    """NaN and infinities become None (JSON has no NaN); other values pass through."""
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


@dataclass
class GradcheckResult:
    """All tensors' verdicts (``"dx"``, ``"dw"``, ``"db"``) plus how the check was run.

    ``mode`` is the mode that ran (``"sample+fast"`` when auto chose both); ``notes`` says
    why auto chose it.
    """

    mode: str
    forward_passes: int
    tensors: dict[str, TensorCheck]
    seconds: float
    tolerance: Tolerance
    notes: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        """Whether every tensor passed."""
        return all(check.passed for check in self.tensors.values())


# ---------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------


def gradcheck(
    x,
    w,
    b,
    spec: ConvSpec,
    *,
    upstream: np.ndarray | None = None,
    mode: str = "auto",
    samples: int = DEFAULT_SAMPLES,
    probes: int = DEFAULT_PROBES,
    seed: int = 0,
    tolerance: Tolerance = DEFAULT_TOLERANCE,
    forward: ForwardFn | None = None,
    backward: BackwardFn | None = None,
    progress: Progress | None = None,
) -> GradcheckResult:
    """Check ``backward`` against central differences of ``forward``.

    Parameters
    ----------
    x : ndarray (n, *spatial, Cin), or (n, Cin, *spatial) when ``spec.layout`` is "nchw"
        Converted to float64 (the caller says so to the user when that upcasts).
    w : ndarray (*kernel, Cin/groups, Cout), or (Cout, Cin/groups, *kernel) channels first
    b : ndarray (Cout,), or None
    spec : ConvSpec
        The convolution; its geometry groups the perturbations in exhaustive mode.
    upstream : ndarray shaped like z, optional
        g in L = Σ z ⊙ g. Default: standard normal from ``seed``.
    mode : "auto", "exhaustive", "sample" or "fast"
    samples, probes : int
        Elements per tensor in sample mode; random directions per tensor in fast mode.
    seed : int
        Seeds the check's own generator (upstream, samples, probes).
    tolerance : Tolerance
        The step and the pass rule.
    forward, backward : callables, optional
        ``forward(x, w, b) -> z`` and ``backward(g, x, w, b) -> (dx, dw, db)`` in the layout
        of ``spec``. Default: convcli's fast engine. Used to check another implementation.
    progress : callable(done, total), optional
        Called after every forward pass.

    Raises
    ------
    UsageError
        For an unknown ``mode`` (``param="mode"``); for a check whose planned work exceeds
        ``MAX_WORK`` (``param`` the count or mode that makes it so).
    NonFiniteError
        When x, w, b or upstream hold NaN or Inf, or z overflows to ±Inf.
    """
    if mode not in MODES:
        raise UsageError(f"{{param}} {mode!r}: choose from {', '.join(MODES)}", param="mode")
    x, w, b, g_given = _float64(x, w, b, upstream)
    geometry = spec.geometry(x.shape, w.shape)  # shapes first, then values
    for name, value in (("x", x), ("w", w), ("b", b), ("dz", g_given)):
        if value is not None:
            check_finite(name, value, allowable=False)
    rng = np.random.default_rng(seed)
    g = rng.standard_normal(geometry.user_out_shape) if g_given is None else g_given
    # Work channels last (perturbation groups follow spatial axes); call the functions in the
    # caller's layout; report in the caller's layout.
    layout = geometry.layout
    forward_cl, backward_cl = _channels_last(*_functions(spec, forward, backward), layout)
    counter = _Counter(forward_cl, progress)
    start = time.perf_counter()
    notes = []
    resolved = mode
    if mode == "auto":
        resolved, note = auto_mode(geometry, b is not None)
        notes.append(note)
    setup = CheckSetup(
        forward=counter,
        backward=backward_cl,
        x=x_to_last(x, layout),
        w=w_to_last(w, layout),
        b=b,
        g=x_to_last(g, layout),
        geometry=geometry,
        tolerance=tolerance,
        samples=samples,
        probes=probes,
        rng=rng,
    )
    strategy = STRATEGIES[resolved]
    counter.total = strategy.passes(setup)
    check_work(setup, resolved, counter.total)
    check_step_visible(setup.operands, tolerance.eps)
    check_no_overflow(conv_forward(x, w, b, spec)[0])  # the data's z, by the engine
    checks = strategy.check(setup)
    return GradcheckResult(
        mode=resolved,
        forward_passes=counter.calls,
        tensors=checks,
        seconds=time.perf_counter() - start,
        tolerance=tolerance,
        notes=notes,
    )


def _float64(x, w, b, upstream):
    """x, w, b (flattened) and upstream as float64 arrays (b and upstream may be None)."""
    x = np.asarray(x, dtype=np.float64)
    w = np.asarray(w, dtype=np.float64)
    b = None if b is None else np.asarray(b, dtype=np.float64).reshape(-1)
    g = None if upstream is None else np.asarray(upstream, dtype=np.float64)
    return x, w, b, g


def _functions(
    spec: ConvSpec, forward: ForwardFn | None, backward: BackwardFn | None
) -> tuple[ForwardFn, BackwardFn]:
    """The functions to check: the caller's, or convcli's fast engine where None."""

    def engine_forward(x_, w_, b_):
        return conv_forward(x_, w_, b_, spec)[0]

    def engine_backward(g_, x_, w_, b_):
        return conv_backward(g_, conv_forward(x_, w_, b_, spec)[1])

    return (
        engine_forward if forward is None else forward,
        engine_backward if backward is None else backward,
    )


def _channels_last(forward: ForwardFn, backward: BackwardFn, layout: str):
    """forward/backward taking and returning channels-last arrays, calling the originals in
    the caller's layout."""
    if layout != "nchw":
        return forward, backward

    def forward_cl(x, w, b):
        return x_to_last(
            np.asarray(forward(x_from_last(x, layout), w_from_last(w, layout), b)), layout
        )

    def backward_cl(g, x, w, b):
        dx, dw, db = backward(
            x_from_last(g, layout), x_from_last(x, layout), w_from_last(w, layout), b
        )
        return x_to_last(np.asarray(dx), layout), w_to_last(np.asarray(dw), layout), db

    return forward_cl, backward_cl


def forward_multiply_adds(geometry: Geometry) -> int:
    """Multiply-adds of one forward pass: ``n · ∏out · Cout · ∏kernel · Cin/groups``
    (transposed: ``n · ∏in · Cin · ∏kernel · Cout/groups``)."""
    if geometry.transposed:
        return forward_multiply_adds(geometry.adjoint())
    return (
        geometry.n
        * math.prod(geometry.out_sizes)
        * geometry.cout
        * math.prod(geometry.kernel)
        * (geometry.cin // geometry.groups)
    )


def auto_mode(geometry: Geometry, has_bias: bool) -> tuple[str, str]:
    """The mode ``auto`` resolves to, and a one-line note saying why.

    ``"exhaustive"`` when ``passes · (multiply-adds per pass + PASS_OVERHEAD)`` is at most
    ``AUTO_MAX_WORK``, where passes is :func:`~convcli.check.exhaustive.exhaustive_passes`;
    otherwise ``"sample+fast"``. Only sizes go in — never a measured time — so the same layer
    always gets the same mode.
    """
    passes = exhaustive_passes(geometry, has_bias)
    per_pass = forward_multiply_adds(geometry)
    work = passes * (per_pass + PASS_OVERHEAD)
    sizes = f"{passes} forward passes of {per_pass:.3g} multiply-adds each"
    if work <= AUTO_MAX_WORK:
        return "exhaustive", f"auto chose exhaustive ({sizes})"
    return "sample+fast", (
        f"auto chose sample + fast: exhaustive would need {sizes}, work "
        f"{work:.2g} > {AUTO_MAX_WORK:.2g} (mode exhaustive checks every element anyway)"
    )


def check_work(setup: CheckSetup, mode: str, passes: int) -> None:
    """Refuse a check of ``passes`` forward passes whose work (as for :func:`auto_mode`)
    exceeds ``MAX_WORK``; the error names the count or mode responsible (exit 2).

    Raises
    ------
    UsageError
        ``param`` is ``"probes"``, ``"samples"`` or ``"mode"``.
    """
    per_pass = forward_multiply_adds(setup.geometry)
    work = passes * (per_pass + PASS_OVERHEAD)
    if work <= MAX_WORK:
        return
    if mode == "exhaustive":
        param, value = "mode", "exhaustive"
    elif mode == "fast" or (mode == "sample+fast" and _fast_passes(setup) > passes // 2):
        param, value = "probes", str(setup.probes)
    else:
        param, value = "samples", str(setup.samples)
    raise UsageError(
        f"{{param}} {value}: the check would need {passes:,} forward passes of {per_pass:.3g} "
        f"multiply-adds each (work {work:.2g}, more than the limit {MAX_WORK:.2g}, about "
        f"{MAX_WORK // AUTO_MAX_WORK * 5 // 60} minutes on a 2-core machine)",
        param=param,
    )


def check_step_visible(operands: dict[str, np.ndarray], eps: float) -> None:
    """Refuse operands (by gradient name: ``dx`` -> x, ...) whose largest magnitude is so
    large that float64 cannot represent it plus the step ``eps``: its perturbation would be
    rounded away (``spacing(max |t|) >= eps``) and no numerical gradient could be measured.

    Raises
    ------
    DataError
        ``param="eps"``; exit 65.
    """
    for name, operand in operands.items():
        largest = float(np.max(np.abs(operand))) if operand.size else 0.0
        spacing = float(np.spacing(largest))
        if spacing >= eps:
            raise DataError(
                f"{name[1:]} holds values up to {largest:.3g}, where float64 values are "
                f"{spacing:.3g} apart: a step of {{param}} {eps:g} is rounded away, so "
                "gradients cannot be checked on data this large",
                param="eps",
            )


def check_no_overflow(z: np.ndarray) -> None:
    """Refuse data whose forward output ``z`` (any shape and layout; indices are reported
    in it) overflows to ±Inf in float64: its
    gradients cannot be measured, so no verdict on them would mean anything.

    Raises
    ------
    NonFiniteError
        Not allowable (gradient checks need finite values); exit 65.
    """
    finite = np.isfinite(z)
    if finite.all():
        return
    first = [int(i) for i in np.argwhere(~finite)[0]]
    raise NonFiniteError(
        f"z overflows to inf in float64 at {z.size - int(finite.sum())} of {z.size} elements "
        f"(first at {first}): x, w and b are too large to check gradients on",
        allowable=False,
    )


class _Counter:
    """Wraps the forward function to count passes and report progress."""

    def __init__(self, forward: ForwardFn, progress: Progress | None):
        self.forward = forward
        self.progress = progress
        self.calls = 0
        self.total = 0

    def __call__(self, x, w, b) -> np.ndarray:
        z = np.asarray(self.forward(x, w, b), dtype=np.float64)
        self.calls += 1
        if self.progress is not None:
            self.progress(self.calls, max(self.total, self.calls))
        return z


# ---------------------------------------------------------------------------------------------
# The modes: strategies of one signature, chosen from a table
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CheckSetup:
    """What every mode works on: channels-last float64 operands and the functions to check.

    Attributes
    ----------
    forward : callable(x, w, b) -> z
        Counts its calls; channels last.
    backward : callable(g, x, w, b) -> (dx, dw, db)
        Channels last.
    x : ndarray (n, *spatial, Cin); w : ndarray (*kernel, Cin/groups, Cout); b : (Cout,) or None
    g : ndarray (n, *out, Cout)
        The upstream gradient.
    geometry : Geometry
        Its ``layout`` is the caller's, in which verdicts are reported.
    tolerance : Tolerance
    samples, probes : int
    rng : numpy.random.Generator
        The check's own generator (never NumPy's global state).
    """

    forward: ForwardFn
    backward: BackwardFn
    x: np.ndarray
    w: np.ndarray
    b: np.ndarray | None
    g: np.ndarray
    geometry: Geometry
    tolerance: Tolerance
    samples: int
    probes: int
    rng: np.random.Generator

    @property
    def layout(self) -> str:
        """The caller's layout, "nhwc" or "nchw"."""
        return self.geometry.layout

    @property
    def operands(self) -> dict[str, np.ndarray]:
        """The tensors checked, by their gradient's name: ``dx`` -> x, ``dw`` -> w, ``db`` -> b."""
        return {"dx": self.x, "dw": self.w} | ({} if self.b is None else {"db": self.b})

    def to_user(self, name: str, array: np.ndarray) -> np.ndarray:
        """A channels-last array shaped like operand ``name``, in the caller's layout."""
        if name == "dx":
            return x_from_last(array, self.layout)
        if name == "dw":
            return w_from_last(array, self.layout)
        return array

    def perturbed(self, name: str, step: np.ndarray) -> tuple[list, list]:
        """Arguments ``(x, w, b)`` of two forward passes with operand ``name`` ± ``step``."""
        position = ("dx", "dw", "db").index(name)
        plus, minus = [self.x, self.w, self.b], [self.x, self.w, self.b]
        target = self.operands[name]
        plus[position], minus[position] = target + step, target - step
        return plus, minus

    def analytic(self, g: np.ndarray) -> dict[str, np.ndarray]:
        """``backward(g, x, w, b)`` as float64 arrays by name (``db`` flat, when there is b)."""
        dx, dw, db = self.backward(g, self.x, self.w, self.b)
        grads = {"dx": np.asarray(dx, np.float64), "dw": np.asarray(dw, np.float64)}
        if self.b is not None:
            grads["db"] = np.asarray(db, np.float64).reshape(-1)
        return grads


Checks = Callable[[CheckSetup], dict[str, TensorCheck]]
Passes = Callable[[CheckSetup], int]


@dataclass(frozen=True)
class Strategy:
    """One mode: ``check(setup)`` gives the verdicts by name, ``passes(setup)`` the forward
    passes it plans (the total shown by progress)."""

    check: Checks
    passes: Passes


def _tensor_check(
    name: str,
    analytic: np.ndarray,
    numeric: np.ndarray,
    tolerance: Tolerance,
    layout: str,
    unchecked: np.ndarray | None = None,
) -> TensorCheck:
    """The verdict on one gradient from element-wise values in the caller's layout;
    ``unchecked`` (booleans, same shape) marks elements not checked (equal values there)."""
    if analytic.shape != numeric.shape:
        raise ValueError(f"{name} has shape {analytic.shape}, expected {numeric.shape}")
    errors = compare_elements(analytic, numeric, tolerance)
    worst = [
        {
            "index": [int(i) for i in np.unravel_index(flat, analytic.shape)],
            "analytic": float(analytic.flat[flat]),
            "numeric": float(numeric.flat[flat]),
            "abs_err": float(errors.abs_errors.flat[flat]),
        }
        for flat in errors.order
    ]
    channel_axis = {"dx": 1, "dw": 0}.get(name, -1) if layout == "nchw" else -1
    by_channel = np.moveaxis(errors.failed, channel_axis, -1)
    per_channel = by_channel.reshape(-1, by_channel.shape[-1]).sum(axis=0)
    abs_errors = errors.abs_errors
    if unchecked is not None:
        abs_errors = np.where(unchecked, np.nan, abs_errors)
    return TensorCheck(
        name=name,
        shape=analytic.shape,
        checked=int(analytic.size if unchecked is None else analytic.size - unchecked.sum()),
        total=int(analytic.size),
        max_abs_err=errors.max_abs,
        max_rel_err=errors.max_rel,
        passed=not errors.failed.any(),
        worst=worst,
        failures_per_channel={int(c): int(k) for c, k in enumerate(per_channel) if k},
        abs_errors=abs_errors,
        failed=errors.failed,
        layout=layout,
    )


def exhaustive_checks(setup: CheckSetup) -> dict[str, TensorCheck]:
    """Mode exhaustive: every element, perturbed in groups (:mod:`convcli.check.exhaustive`)."""
    analytic = setup.analytic(setup.g)
    numeric = exhaustive_numeric(
        setup.forward, setup.g, setup.x, setup.w, setup.b, setup.geometry, setup.tolerance.eps
    )
    return {
        name: _tensor_check(
            name,
            setup.to_user(name, analytic[name]),
            setup.to_user(name, numeric[name]),
            setup.tolerance,
            setup.layout,
        )
        for name in setup.operands
    }


def sample_checks(setup: CheckSetup) -> dict[str, TensorCheck]:
    """Mode sample: ``setup.samples`` random elements per tensor, each perturbed alone."""
    analytic = setup.analytic(setup.g)
    checks = {}
    eps = setup.tolerance.eps
    for name, target in setup.operands.items():
        picked = setup.rng.choice(target.size, size=min(setup.samples, target.size), replace=False)
        numeric = analytic[name].copy()  # unchecked elements compare equal, then are masked out
        for flat in picked:
            step = np.zeros_like(target)
            step.flat[flat] = eps
            plus, minus = setup.perturbed(name, step)
            difference = setup.forward(*plus) - setup.forward(*minus)
            numeric.flat[flat] = np.vdot(difference, setup.g) / (2 * eps)
        unchecked = np.ones(target.shape, dtype=bool)
        unchecked.flat[picked] = False
        checks[name] = _tensor_check(
            name,
            setup.to_user(name, analytic[name]),
            setup.to_user(name, numeric),
            setup.tolerance,
            setup.layout,
            unchecked=setup.to_user(name, unchecked),
        )
    return checks


def fast_checks(setup: CheckSetup) -> dict[str, TensorCheck]:
    """Mode fast: ``setup.probes`` random projections ``vᵀ J u`` per tensor against
    ``⟨backward(v), u⟩``; the rule's scale is ``Σ |backward(v) ⊙ u|``."""
    operands = setup.operands
    rows: dict[str, list[tuple[float, float, float]]] = {name: [] for name in operands}
    eps = setup.tolerance.eps
    for _ in range(setup.probes):
        v = setup.rng.standard_normal(setup.geometry.out_shape)  # channels last, like x and w
        analytic = setup.analytic(v)
        for name, array in operands.items():
            u = setup.rng.standard_normal(array.shape)
            plus, minus = setup.perturbed(name, eps * u)
            numeric = np.vdot(setup.forward(*plus) - setup.forward(*minus), v) / (2 * eps)
            products = analytic[name] * u
            rows[name].append((products.sum(), numeric, np.abs(products).sum()))
    checks = {}
    for name, array in operands.items():
        a, n_, scale = np.array(rows[name], dtype=np.float64).T
        errors = compare_elements(a, n_, setup.tolerance, scale=scale)
        worst = [
            {
                "probe": int(i),
                "analytic": float(a[i]),
                "numeric": float(n_[i]),
                "abs_err": float(errors.abs_errors[i]),
            }
            for i in errors.order
        ]
        checks[name] = TensorCheck(
            name=name,
            shape=setup.to_user(name, array).shape,
            checked=setup.probes,
            total=setup.probes,
            unit="probes",
            max_abs_err=errors.max_abs,
            max_rel_err=errors.max_rel,
            passed=not errors.failed.any(),
            worst=worst,
            layout=setup.layout,
        )
    return checks


def sample_and_fast_checks(setup: CheckSetup) -> dict[str, TensorCheck]:
    """What auto does for big layers: sample checks, each with its fast probes beside it."""
    checks = sample_checks(setup)
    for name, probes in fast_checks(setup).items():
        checks[name].probes = probes
        checks[name].passed = checks[name].passed and probes.passed
    return checks


def _sample_passes(setup: CheckSetup) -> int:
    return sum(2 * min(setup.samples, a.size) for a in setup.operands.values())


def _fast_passes(setup: CheckSetup) -> int:
    return 2 * setup.probes * len(setup.operands)


STRATEGIES: dict[str, Strategy] = {
    "exhaustive": Strategy(
        exhaustive_checks, lambda setup: exhaustive_passes(setup.geometry, setup.b is not None)
    ),
    "sample": Strategy(sample_checks, _sample_passes),
    "fast": Strategy(fast_checks, _fast_passes),
    "sample+fast": Strategy(
        sample_and_fast_checks, lambda setup: _sample_passes(setup) + _fast_passes(setup)
    ),
}
