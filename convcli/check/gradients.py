"""Gradient checking: analytic dx, dw, db against central differences of forward passes.

The scalar checked is ``L = Σ z ⊙ g`` for a fixed upstream gradient ``g`` (shape of z), so
the analytic gradients are ``backward(g)``. Everything runs in float64. Layout as everywhere:
x NHWC ``(n, H, W, Cin)``, w HWIO ``(kh, kw, Cin/groups, Cout)``, b ``(Cout,)``.

Modes
-----
exhaustive
    Every element of x, w and b. Elements whose effects on z cannot overlap are perturbed
    together in one pair of forward passes and each one's difference is read back from its
    own region of z: input pixels whose rows (columns) are a receptive-field span apart,
    in every image and every channel group at once; the weights ``w[i, j, c, :]`` of all
    output channels at once; all biases at once. The number of forward passes is
    ``2 · (span_h · span_w · Cin/groups + kh · kw · Cin/groups + 1)``, independent of n, H, W.
sample
    ``samples`` random elements per tensor, each perturbed alone (2 passes each).
fast
    ``probes`` random directions per tensor: ``vᵀ J u`` from two forward passes against
    ``⟨backward(v), u⟩``, with fresh random ``u`` and ``v`` per probe (as PyTorch's fast mode).
auto
    exhaustive when its work — planned forward passes times the cost of one, see
    :func:`auto_mode` — is at most ``AUTO_MAX_WORK``, otherwise sample + fast. Chosen from
    sizes alone, never from timing, so a rerun chooses the same mode.

Why central differences are so accurate here: z is linear in x, in w and in b separately,
so the central difference has no truncation error at all; only rounding error remains,
about ``u · |z| / eps``. That lets the default ``eps`` be large (1e-3) and the default
tolerances tight (see :data:`DEFAULT_RTOL`, :data:`DEFAULT_ATOL`).
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from convcli.engine.operands import w_from_last, w_to_last, x_from_last, x_to_last
from convcli.errors import UsageError
from convcli.spec import ConvSpec, Geometry, padding_source

DEFAULT_EPS = 1e-3
DEFAULT_RTOL = 1e-6
DEFAULT_ATOL = 1e-8
DEFAULT_SAMPLES = 64
DEFAULT_PROBES = 8
# auto: exhaustive when passes * (multiply-adds per pass + PASS_OVERHEAD) <= AUTO_MAX_WORK.
# PASS_OVERHEAD is a pass's fixed cost counted in multiply-adds. On the README's 2-core machine
# the fast engine takes about 0.25 ns per float64 multiply-add and 0.3 ms per pass, so the
# budget is about 5 s there. Sizes, not timings: every machine and every run choose alike.
AUTO_MAX_WORK = 2 * 10**10
PASS_OVERHEAD = 10**6
MODES = ("auto", "exhaustive", "sample", "fast")
WORST = 5

# forward(x, w, b) -> z ; backward(g, x, w, b) -> (dx, dw, db), all float64 arrays.
ForwardFn = Callable[[np.ndarray, np.ndarray, "np.ndarray | None"], np.ndarray]
BackwardFn = Callable[..., tuple]
Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class Tolerance:
    """Per element: pass when ``|a - n| <= atol + rtol * max(|a|, |n|)``; eps is the step."""

    eps: float = DEFAULT_EPS
    rtol: float = DEFAULT_RTOL
    atol: float = DEFAULT_ATOL

    def fails(self, got: np.ndarray, want: np.ndarray) -> np.ndarray:
        """Elements where ``got`` and ``want`` differ by more than allowed (NaN fails)."""
        allowed = self.atol + self.rtol * np.maximum(np.abs(got), np.abs(want))
        return ~(np.abs(got - want) <= allowed)


@dataclass
class TensorCheck:
    """The verdict for one gradient (dx, dw or db).

    ``abs_errors`` holds |analytic - numeric| in the tensor's shape when every element was
    checked (NaN elsewhere in sample mode; None in fast mode, where probes are not elements).
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
            return max(self.failures_per_channel, key=self.failures_per_channel.get)
        per_channel = errors.reshape(-1, errors.shape[-1]).max(axis=0)
        return int(np.argmax(per_channel))


def _json_float(value):
    """NaN and infinities become None (JSON has no NaN); other values pass through."""
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


@dataclass
class GradcheckResult:
    """All tensors' verdicts plus how the check was run."""

    mode: str
    forward_passes: int
    tensors: dict[str, TensorCheck]
    seconds: float
    tolerance: Tolerance
    notes: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
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
    tolerance: Tolerance = Tolerance(),
    forward: ForwardFn | None = None,
    backward: BackwardFn | None = None,
    progress: Progress | None = None,
) -> GradcheckResult:
    """Check ``backward`` against central differences of ``forward``.

    Parameters
    ----------
    x : ndarray (n, H, W, Cin); w : ndarray (kh, kw, Cin/groups, Cout); b : None or (Cout,)
        Converted to float64 (the caller says so to the user when that upcasts).
    spec : ConvSpec
        Gives the geometry used to group perturbations in exhaustive mode.
    upstream : ndarray (n, Ho, Wo, Cout), optional
        g in L = Σ z ⊙ g. Default: standard normal from ``seed``.
    mode : "auto", "exhaustive", "sample" or "fast"
    forward, backward : callables, optional
        ``forward(x, w, b) -> z`` and ``backward(g, x, w, b) -> (dx, dw, db)``. Default:
        convcli's fast engine. Used to check another implementation.
    progress : callable(done, total), optional
        Called after every forward pass.
    """
    from convcli.engine.fast import conv_backward, conv_forward

    if mode not in MODES:
        raise UsageError(f"--mode {mode!r}: choose from {', '.join(MODES)}")
    x = np.asarray(x, dtype=np.float64)
    w = np.asarray(w, dtype=np.float64)
    b = None if b is None else np.asarray(b, dtype=np.float64).reshape(-1)
    geometry = spec.geometry(x.shape, w.shape)
    from convcli.engine.operands import check_finite

    for name, value in (("x", x), ("w", w), ("b", b), ("dz", upstream)):
        if value is not None:
            check_finite(name, value, allowable=False)
    if forward is None:

        def forward(x_, w_, b_):
            return conv_forward(x_, w_, b_, spec)[0]

    if backward is None:

        def backward(g_, x_, w_, b_):
            return conv_backward(g_, conv_forward(x_, w_, b_, spec)[1])

    layout = geometry.layout
    user_shapes = {"dx": x.shape, "dw": w.shape, "db": None if b is None else b.shape}
    rng = np.random.default_rng(seed)
    g = (
        rng.standard_normal(geometry.user_out_shape)
        if upstream is None
        else np.asarray(upstream, np.float64)
    )
    # Work channels last (perturbation groups follow spatial axes); call the functions in the
    # caller's layout; report in the caller's layout.
    forward, backward = _channels_last(forward, backward, layout)
    x, w, g = x_to_last(x, layout), w_to_last(w, layout), x_to_last(g, layout)
    counter = _Counter(forward, progress)
    start = time.perf_counter()
    notes = []
    resolved = mode
    if mode == "auto":
        resolved, note = auto_mode(geometry, b is not None)
        notes.append(note)
    names = ["dx", "dw"] + ([] if b is None else ["db"])
    counter.total = counter.calls + _planned_passes(resolved, geometry, x, w, b, samples, probes)

    checks: dict[str, TensorCheck] = {}
    to_user = {"dx": lambda a: x_from_last(a, layout), "dw": lambda a: w_from_last(a, layout)}
    to_user["db"] = lambda a: a
    if resolved == "exhaustive":
        analytic = _analytic(backward, g, x, w, b)
        numeric = _exhaustive_numeric(counter, g, x, w, b, geometry, tolerance.eps)
        for name in names:
            checks[name] = _compare_elements(
                name,
                to_user[name](analytic[name]),
                to_user[name](numeric[name]),
                tolerance,
                layout,
            )
    if resolved in ("sample", "sample+fast"):
        analytic = _analytic(backward, g, x, w, b)
        for name in names:
            checks[name] = _sample_check(
                counter,
                name,
                g,
                x,
                w,
                b,
                analytic[name],
                samples,
                rng,
                tolerance,
                to_user[name],
                layout,
            )
    for check in checks.values():
        check.layout = layout
    if resolved in ("fast", "sample+fast"):
        fast = _fast_checks(counter, backward, x, w, b, geometry, probes, rng, tolerance)
        for name in names:
            fast[name].shape = user_shapes[name]
            if name in checks:
                checks[name].probes = fast[name]
                checks[name].passed = checks[name].passed and fast[name].passed
            else:
                checks[name] = fast[name]
    return GradcheckResult(
        mode=resolved,
        forward_passes=counter.calls,
        tensors=checks,
        seconds=time.perf_counter() - start,
        tolerance=tolerance,
        notes=notes,
    )


def _channels_last(forward, backward, layout: str):
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
    """Multiply-adds of one forward pass: ``n · ∏out · Cout · ∏kernel · Cin/groups``."""
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
    ``AUTO_MAX_WORK``, where passes is :func:`exhaustive_passes`; otherwise ``"sample+fast"``.
    Only sizes go in — never a measured time — so the same layer always gets the same mode.
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


def _planned_passes(mode, geometry, x, w, b, samples, probes) -> int:
    arrays = [x, w] + ([] if b is None else [b])
    passes = 0
    if mode == "exhaustive":
        passes += exhaustive_passes(geometry, b is not None)
    if mode in ("sample", "sample+fast"):
        passes += sum(2 * min(samples, a.size) for a in arrays)
    if mode in ("fast", "sample+fast"):
        passes += 2 * probes * len(arrays)
    return passes


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


def _analytic(backward, g, x, w, b) -> dict[str, np.ndarray]:
    dx, dw, db = backward(g, x, w, b)
    grads = {"dx": np.asarray(dx, np.float64), "dw": np.asarray(dw, np.float64)}
    if b is not None:
        grads["db"] = np.asarray(db, np.float64).reshape(-1)
    return grads


# ---------------------------------------------------------------------------------------------
# Exhaustive mode: grouped perturbations, read back per region of z
# ---------------------------------------------------------------------------------------------


def _feeds(axis: int, geometry: Geometry) -> list[set[int]]:
    """For each output position along ``axis``, the input positions that feed it (through
    any tap, after the padding mode maps padded positions back onto the input)."""
    size, k = geometry.in_sizes[axis], geometry.kernel[axis]
    s, d = geometry.stride[axis], geometry.dilation[axis]
    before = geometry.pads[axis][0]
    taps = np.arange(k) * d - before
    return [
        {int(i) for i in padding_source(o * s + taps, size, geometry.padding_mode) if i >= 0}
        for o in range(geometry.out_sizes[axis])
    ]


def _periods(geometry: Geometry) -> list[int]:
    """Per axis, the smallest spacing P such that no output is fed by two different inputs
    with the same position modulo P: inputs P apart can then be perturbed together. It is the
    receptive-field span d·(k - 1) + 1 for zero padding; wrapped or mirrored padding can
    need more."""
    periods = []
    for axis in range(geometry.rank):
        feeds = _feeds(axis, geometry)
        size = geometry.in_sizes[axis]
        span = geometry.dilation[axis] * (geometry.kernel[axis] - 1) + 1
        period = min(span, size)
        while period < size and any(len({i % period for i in f}) < len(f) for f in feeds):
            period += 1
        periods.append(period)
    return periods


def exhaustive_passes(geometry: Geometry, has_bias: bool) -> int:
    """Forward passes an exhaustive check of this geometry uses."""
    cin_group = geometry.cin // geometry.groups
    return 2 * (
        math.prod(_periods(geometry)) * cin_group
        + math.prod(geometry.kernel) * cin_group
        + int(has_bias)
    )


def _owner_matrices(axis: int, geometry: Geometry, period: int) -> list[np.ndarray]:
    """For each residue r: A[r][i, o] = 1 when input i (i % period == r) feeds output o.

    With the period from :func:`_periods`, at most one input of each residue feeds an output.
    """
    size, out = geometry.in_sizes[axis], geometry.out_sizes[axis]
    matrices = [np.zeros((size, out)) for _ in range(period)]
    for o, inputs in enumerate(_feeds(axis, geometry)):
        for i in inputs:
            matrices[i % period][i, o] = 1.0
    return matrices


def _exhaustive_numeric(counter, g, x, w, b, geometry: Geometry, eps: float) -> dict:
    """Central differences of every element of x, w, b (channels last), grouped."""
    rank, groups, cout = geometry.rank, geometry.groups, geometry.cout
    cin_group = geometry.cin // groups
    periods = _periods(geometry)
    owners = [_owner_matrices(a, geometry, p) for a, p in enumerate(periods)]

    def difference(xp, xm, wp, wm, bp, bm):
        return (counter(xp, wp, bp) - counter(xm, wm, bm)) / (2 * eps) * g

    numeric = {"dx": np.zeros_like(x), "dw": np.zeros_like(w)}
    step = np.zeros_like(x)
    for residues in itertools.product(*(range(p) for p in periods)):
        lattice = tuple(slice(r, None, p) for r, p in zip(residues, periods, strict=True))
        for channel in range(cin_group):
            channels = slice(channel, None, cin_group)  # this channel of every group
            step[...] = 0
            step[(slice(None), *lattice, channels)] = eps
            weighted = difference(x + step, x - step, w, w, b, b)
            spread = weighted.reshape(*weighted.shape[:-1], groups, cout // groups).sum(axis=-1)
            for axis, residue in enumerate(residues):  # (n, *out, g) -> (n, *in, g)
                spread = np.moveaxis(
                    np.tensordot(owners[axis][residue], spread, axes=([1], [1 + axis])), 0, 1 + axis
                )
            numeric["dx"][(slice(None), *lattice, channels)] = spread[(slice(None), *lattice)]
    w_step = np.zeros_like(w)
    every_output = tuple(range(rank + 1))
    for taps in itertools.product(*(range(k) for k in geometry.kernel)):
        for channel in range(cin_group):
            w_step[...] = 0
            w_step[(*taps, channel)] = eps
            weighted = difference(x, x, w + w_step, w - w_step, b, b)
            numeric["dw"][(*taps, channel)] = weighted.sum(axis=every_output)
    if b is not None:
        weighted = difference(x, x, w, w, b + eps, b - eps)
        numeric["db"] = weighted.sum(axis=every_output)
    return numeric


def compare_elements(got: np.ndarray, want: np.ndarray, tolerance: Tolerance, worst: int = WORST):
    """The one element-wise comparison: ``(abs_errors, rel_errors, failed, order)``.

    ``failed`` marks elements outside ``tolerance`` (NaN fails); ``order`` holds the flat
    indices of the ``worst`` elements to show, failing ones first, each group by |error|
    from the largest (NaN counts as largest). Arrays of the same shape, any layout.
    """
    abs_errors = np.abs(got - want)
    scale = np.maximum(np.abs(got), np.abs(want))
    failed = ~(abs_errors <= tolerance.atol + tolerance.rtol * scale)  # NaN fails
    rel = np.divide(abs_errors, scale, out=np.zeros_like(abs_errors), where=scale > 0)
    magnitude = np.nan_to_num(abs_errors, nan=np.inf).ravel()
    order = np.lexsort((magnitude, failed.ravel()))[::-1][:worst]
    return abs_errors, rel, failed, order


def _channel_axis(name: str, layout: str) -> int:
    if layout == "nchw" and name in ("dx", "dw"):
        return 1 if name == "dx" else 0
    return -1


def _compare_elements(
    name, analytic, numeric, tolerance: Tolerance, layout: str = "nhwc"
) -> TensorCheck:
    if analytic.shape != numeric.shape:
        raise ValueError(f"{name} has shape {analytic.shape}, expected {numeric.shape}")
    abs_errors, rel, failed, order = compare_elements(analytic, numeric, tolerance)
    worst = [
        {
            "index": [int(i) for i in np.unravel_index(flat, analytic.shape)],
            "analytic": float(analytic.flat[flat]),
            "numeric": float(numeric.flat[flat]),
            "abs_err": float(abs_errors.flat[flat]),
        }
        for flat in order
    ]
    by_channel = np.moveaxis(failed, _channel_axis(name, layout), -1)
    per_channel = by_channel.reshape(-1, by_channel.shape[-1]).sum(axis=0)
    return TensorCheck(
        name=name,
        shape=analytic.shape,
        checked=int(analytic.size),
        total=int(analytic.size),
        max_abs_err=_finite_max(abs_errors),
        max_rel_err=_finite_max(rel),
        passed=not failed.any(),
        worst=worst,
        failures_per_channel={int(c): int(k) for c, k in enumerate(per_channel) if k},
        abs_errors=abs_errors,
        failed=failed,
    )


def _finite_max(values: np.ndarray) -> float:
    if values.size == 0:
        return 0.0
    if np.isnan(values).any():
        return float("nan")
    return float(values.max())


# ---------------------------------------------------------------------------------------------
# Sample mode
# ---------------------------------------------------------------------------------------------


def _sample_check(
    counter, name, g, x, w, b, analytic, samples, rng, tolerance, to_user, layout
) -> TensorCheck:
    position = {"dx": 0, "dw": 1, "db": 2}[name]
    target = (x, w, b)[position]
    picked = rng.choice(target.size, size=min(samples, target.size), replace=False)
    numeric = analytic.copy()  # unchecked elements compare equal, then are masked out
    eps = tolerance.eps
    for flat in picked:
        step = np.zeros_like(target)
        step.flat[flat] = eps
        plus, minus = [x, w, b], [x, w, b]
        plus[position], minus[position] = target + step, target - step
        numeric.flat[flat] = np.vdot(counter(*plus) - counter(*minus), g) / (2 * eps)
    check = _compare_elements(name, to_user(analytic), to_user(numeric), tolerance, layout)
    unchecked = np.ones(target.shape, dtype=bool)
    unchecked.flat[picked] = False
    check.abs_errors[to_user(unchecked)] = np.nan
    check.checked = int(picked.size)
    return check


# ---------------------------------------------------------------------------------------------
# Fast mode: random projections
# ---------------------------------------------------------------------------------------------


def _fast_checks(counter, backward, x, w, b, geometry, probes, rng, tolerance) -> dict:
    arrays = {"dx": x, "dw": w} | ({} if b is None else {"db": b})
    rows = {name: [] for name in arrays}  # (analytic, numeric, scale) per probe
    eps = tolerance.eps
    for _ in range(probes):
        v = rng.standard_normal(geometry.out_shape)  # channels last, like x and w here
        analytic = _analytic(backward, v, x, w, b)
        for position, (name, array) in enumerate(arrays.items()):
            u = rng.standard_normal(array.shape)
            plus, minus = [x, w, b], [x, w, b]
            plus[position], minus[position] = array + eps * u, array - eps * u
            numeric = np.vdot(counter(*plus) - counter(*minus), v) / (2 * eps)
            products = analytic[name] * u
            rows[name].append((products.sum(), numeric, np.abs(products).sum()))
    checks = {}
    for name, array in arrays.items():
        a, n_, scale = np.array(rows[name], dtype=np.float64).T
        abs_errors = np.abs(a - n_)
        allowed = tolerance.atol + tolerance.rtol * scale
        failed = ~(abs_errors <= allowed)
        rel = np.divide(abs_errors, scale, out=np.zeros_like(abs_errors), where=scale > 0)
        worst = [
            {
                "probe": int(i),
                "analytic": float(a[i]),
                "numeric": float(n_[i]),
                "abs_err": float(abs_errors[i]),
            }
            for i in np.lexsort((abs_errors, failed))[::-1][:WORST]
        ]
        checks[name] = TensorCheck(
            name=name,
            shape=array.shape,
            checked=probes,
            total=probes,
            unit="probes",
            max_abs_err=_finite_max(abs_errors),
            max_rel_err=_finite_max(rel),
            passed=not failed.any(),
            worst=worst,
        )
    return checks
