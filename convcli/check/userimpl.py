"""Checking a user's own ``conv_forward`` / ``conv_backward``, defined in a Python file.

The user's file defines the classic exercise's functions::

    conv_forward(A_prev, W, b, hparameters) -> (Z, cache)
    conv_backward(dZ, cache) -> (dA_prev, dW, db)

with A_prev ``(n, H, W, Cin)``, W ``(f, f, Cin, Cout)``, b ``(1, 1, 1, Cout)``,
``hparameters = {"stride": s, "pad": p}`` and Z, dZ ``(n, Ho, Wo, Cout)``, all float64.

Each configuration gets three verdicts: ``forward_vs_engine`` (the user's Z against convcli's
engine), ``backward_vs_numeric`` (the user's backward against numerical gradients of the
user's *own* forward, see :mod:`convcli.check.numgrad`) and ``backward_vs_engine``, plus a one-line
diagnosis naming the function to fix. The user's code runs in a child process, one per
configuration (:mod:`convcli.check.userproc`); whatever it does wrong — raising anything, exiting,
crashing, hanging, running out of memory, wrong shapes or types, NaN, wrong values — becomes
a failed configuration with a one-line reason, never a crash or an exit code of the user's
choosing. The user's file is executed, never modified (no bytecode is written beside it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from convcli.check.numgrad import DEFAULT_MAX_PASSES, NumericUnavailable, numeric_gradients
from convcli.check.tolerance import ElementErrors, Tolerance, compare_elements
from convcli.check.userproc import DEFAULT_TIMEOUT, UserCodeError, UserProcess
from convcli.engine.fast import conv_backward, conv_forward
from convcli.errors import DataError, InputFileError, UsageError
from convcli.spec import ConvSpec


@dataclass(frozen=True)
class Config:
    """One configuration: x (n, h, w, cin), kernel (k, k), cout, and the exercise's stride, pad."""

    n: int
    h: int
    w: int
    cin: int
    kernel: int
    cout: int
    stride: int
    pad: int

    def spec(self) -> ConvSpec:
        """The configuration's hyperparameters as a :class:`~convcli.spec.ConvSpec`."""
        return ConvSpec(stride=(self.stride,), padding=self.pad)

    def to_json(self) -> dict:
        """The same keys as an engine check's config (resolved per-axis values)."""
        return {
            "shape": [self.n, self.h, self.w, self.cin],
            "kernel": [self.kernel, self.kernel],
            "cout": self.cout,
            "stride": [self.stride, self.stride],
            "dilation": [1, 1],
            "groups": 1,
            "padding_mode": "zeros",
            "layout": "nhwc",
            "pad": [[self.pad, self.pad], [self.pad, self.pad]],
        }


# pad 0, 1, 2; stride 1, 2, 3; kernels 1, 2, 3; square and non-square inputs; batch 1 and > 1;
# Cin != Cout; output sizes from 1 up. The classic exercise's layer is the last one.
SUITE = (
    Config(n=1, h=3, w=3, cin=1, kernel=1, cout=1, stride=1, pad=0),
    Config(n=2, h=5, w=5, cin=3, kernel=3, cout=4, stride=1, pad=1),
    Config(n=2, h=4, w=6, cin=2, kernel=2, cout=3, stride=2, pad=0),
    Config(n=3, h=7, w=5, cin=3, kernel=3, cout=2, stride=3, pad=2),
    Config(n=1, h=3, w=3, cin=2, kernel=3, cout=5, stride=1, pad=0),
    Config(n=2, h=6, w=4, cin=4, kernel=2, cout=2, stride=2, pad=1),
    Config(n=2, h=5, w=7, cin=2, kernel=1, cout=3, stride=2, pad=2),
    Config(n=1, h=2, w=5, cin=1, kernel=2, cout=2, stride=3, pad=1),
    Config(n=2, h=9, w=9, cin=2, kernel=3, cout=3, stride=3, pad=0),
    Config(n=1, h=3, w=4, cin=2, kernel=2, cout=3, stride=1, pad=2),
    Config(n=4, h=8, w=8, cin=3, kernel=3, cout=8, stride=2, pad=1),
    Config(n=10, h=4, w=4, cin=3, kernel=2, cout=8, stride=2, pad=2),
)


CHECKS = ("forward_vs_engine", "backward_vs_numeric", "backward_vs_engine")
GRADIENTS = ("dA_prev", "dW", "db")


@dataclass(frozen=True)
class UserImpl:
    """The user's file, known to load and to define both functions."""

    path: Path


@dataclass
class Comparison:
    """One tensor of the user's against a reference (the engine's, or numerical gradients)."""

    name: str
    passed: bool
    checked: int
    failed: int
    max_abs_err: float
    max_rel_err: float
    worst: list[dict]
    failures_per_channel: dict[int, int]
    where: str | None = None

    def to_json(self) -> dict:
        return {
            "passed": self.passed,
            "checked": self.checked,
            "failed": self.failed,
            "max_abs_err": self.max_abs_err,
            "max_rel_err": self.max_rel_err,
            "worst": self.worst,
            "failures_per_channel": {str(k): v for k, v in self.failures_per_channel.items()},
            "where": self.where,
        }


@dataclass
class Check:
    """One verdict: ``passed`` is None when it could not run (``reason`` says why)."""

    passed: bool | None
    tensors: dict[str, Comparison] = field(default_factory=dict)
    reason: str | None = None

    def to_json(self) -> dict:
        return {
            "passed": self.passed,
            "reason": self.reason,
            "tensors": {name: t.to_json() for name, t in self.tensors.items()},
        }

    def failing(self) -> list[Comparison]:
        return [t for t in self.tensors.values() if not t.passed]


@dataclass
class ConfigResult:
    """The verdicts for one configuration.

    ``error`` is one line listing what is wrong (None when it passes); ``diagnosis`` one line
    saying which function to fix; ``output`` what the user's code printed (truncated).
    """

    config: Config
    checks: dict[str, Check]
    error: str | None = None
    diagnosis: str = ""
    output: str = ""
    forward_passes: int = 0

    @property
    def passed(self) -> bool:
        return self.error is None and all(c.passed is True for c in self.checks.values())

    def to_json(self) -> dict:
        return {
            "config": self.config.to_json(),
            "passed": self.passed,
            "error": self.error,
            "diagnosis": self.diagnosis,
            "checks": {name: check.to_json() for name, check in self.checks.items()},
            "output": self.output,
            "forward_passes": self.forward_passes,
        }


def load_impl(path, *, timeout: float = DEFAULT_TIMEOUT) -> UserImpl:
    """Check that the user's file runs (in a child process) and defines both functions.

    Raises
    ------
    InputFileError
        If the file is missing or unreadable.
    DataError
        If running it raises, exits, crashes or hangs, or it does not define both functions.
    """
    path = Path(path)
    if not path.is_file():
        raise InputFileError(
            f"{path}: no such file" if not path.exists() else f"{path}: not a file"
        )
    with UserProcess(path, timeout=timeout) as process:
        try:
            process.start()
        except UserCodeError as error:
            message = str(error)
            resolved = str(path.resolve())  # the child names the file by its full path
            if message.startswith(resolved):
                message = str(path) + message[len(resolved) :]
            elif not message.startswith(str(path)):
                message = f"{path}: {message}"
            raise DataError(message) from None
    return UserImpl(path=path)


def compare(name: str, got, want, tolerance: Tolerance) -> Comparison:
    """Element-wise comparison of the user's ``got`` with ``want`` under ``tolerance``.

    ``got`` : array-like, any shape with channels on the last axis; ``want`` : the same
    number of elements (reshaped to ``got``'s shape). Both are compared as float64.
    """
    got, want = _float64_pair(got, want)
    return _comparison(name, got, want, compare_elements(got, want, tolerance))


def _float64_pair(got, want) -> tuple[np.ndarray, np.ndarray]:
    got = np.asarray(got, np.float64)
    return got, np.asarray(want, np.float64).reshape(got.shape)


def _comparison(name: str, got: np.ndarray, want: np.ndarray, errors: ElementErrors) -> Comparison:
    worst = [
        {
            "index": [int(i) for i in np.unravel_index(flat, got.shape)],
            "yours": float(got.flat[flat]),
            "expected": float(want.flat[flat]),
            "abs_err": float(errors.abs_errors.flat[flat]),
        }
        for flat in errors.order
        if errors.failed.flat[flat]
    ]
    per_channel = errors.failed.reshape(-1, got.shape[-1]).sum(axis=0)
    return Comparison(
        name=name,
        passed=not errors.failed.any(),
        checked=int(got.size),
        failed=int(errors.failed.sum()),
        max_abs_err=errors.max_abs,
        max_rel_err=errors.max_rel,
        worst=worst,
        failures_per_channel={int(c): int(k) for c, k in enumerate(per_channel) if k},
    )


def _channels(failures: dict, total: int, label: str) -> str:
    channels = sorted(failures)
    if len(channels) == total and total > 1:
        return f"in every {label}"
    if len(channels) == 1:
        return f"in {label} {channels[0]}" + (" only" if total > 1 else "")
    return f"in {label}s {', '.join(map(str, channels))}"


def _pixels(mask: np.ndarray) -> str:
    """Where in (H, W) the failures are: every pixel, a border, a grid of rows x columns."""
    h, w = mask.shape
    if mask.all():
        return "at every pixel"
    rows, cols = np.any(mask, axis=1), np.any(mask, axis=0)
    for width in range(1, (min(h, w) + 1) // 2):
        frame = np.ones_like(mask)
        frame[width : h - width, width : w - width] = False
        if np.array_equal(mask, frame):
            return f"in a border {width} pixel{'s' if width > 1 else ''} wide"
    if np.array_equal(mask, rows[:, None] & cols[None, :]):
        rows_text = (
            "every row" if rows.all() else f"rows {', '.join(map(str, np.flatnonzero(rows)))}"
        )
        cols_text = (
            "every column" if cols.all() else f"columns {', '.join(map(str, np.flatnonzero(cols)))}"
        )
        return f"at {rows_text} x {cols_text}"
    return f"at {int(mask.sum())} of {h}x{w} pixels"


def _contributions(wrong: list[int], cout: int) -> str:
    if len(wrong) == cout:
        return "every output channel's contribution is wrong"
    if len(wrong) == 1:
        others = cout - 1
        return (
            f"the contribution of output channel {wrong[0]} is wrong (the other "
            f"{others} {'is' if others == 1 else 'are'} right)"
        )
    return f"the contributions of output channels {', '.join(map(str, wrong))} are wrong"


def _locate(comparison: Comparison, failed_mask: np.ndarray, cout: int) -> None:
    """Fill ``comparison.where`` for Z, dW, db (per output channel) and dA_prev's first part."""
    if comparison.passed:
        return
    if comparison.name in ("dW", "db"):
        comparison.where = _channels(comparison.failures_per_channel, cout, "output channel")
    elif comparison.name == "Z":
        comparison.where = (
            _channels(comparison.failures_per_channel, cout, "output channel")
            + ", "
            + _pixels(np.any(failed_mask, axis=(0, 3)))
        )
    else:
        cin = failed_mask.shape[-1]
        comparison.where = (
            _channels(comparison.failures_per_channel, cin, "input channel")
            + ", "
            + _pixels(np.any(failed_mask, axis=(0, 3)))
        )


def _compare_all(names, got, want, tolerance, cout) -> dict[str, Comparison]:
    tensors = {}
    for name, mine, reference in zip(names, got, want, strict=True):
        mine, reference = _float64_pair(mine, reference)
        errors = compare_elements(mine, reference, tolerance)
        comparison = _comparison(name, mine, reference, errors)
        _locate(comparison, errors.failed, cout)
        tensors[name] = comparison
    return tensors


class _Run:
    """The state of one configuration's check (inputs, engine results, the child process)."""

    def __init__(self, process: UserProcess, config: Config, seed: int, tolerance: Tolerance):
        self.process, self.config, self.tolerance = process, config, tolerance
        rng = np.random.default_rng(seed)
        self.x = rng.standard_normal((config.n, config.h, config.w, config.cin))
        self.w = rng.standard_normal((config.kernel, config.kernel, config.cin, config.cout))
        self.b = rng.standard_normal(config.cout)
        self.z, self.cache = conv_forward(self.x, self.w, self.b, config.spec())
        self.g = rng.standard_normal(self.z.shape)
        self.engine = conv_backward(self.g, self.cache)

    def forward(self, x, w, b):
        return self.process.forward(x, w, b, self.config.stride, self.config.pad, self.z.shape)

    def backward(self, g):
        return self.process.backward(g, self.x, self.w, self.b, self.config.stride, self.config.pad)

    def locate_contributions(self, check: Check, references) -> None:
        """Name the output channels whose contribution to dA_prev is wrong.

        ``references(c)`` is the reference dA_prev for upstream g kept in output channel c
        only; the user's backward is called with the same g.
        """
        comparison = check.tensors.get("dA_prev")
        cout = self.config.cout
        if comparison is None or comparison.passed or cout == 1:
            return
        wrong = []
        for c in range(cout):
            g = np.zeros_like(self.g)
            g[..., c] = self.g[..., c]
            reference = references(c)
            if reference is None:
                return
            if self.tolerance.fails(self.backward(g)[0], reference).any():
                wrong.append(c)
        if wrong:
            comparison.where = f"{comparison.where}; {_contributions(wrong, cout)}"


def check_config(
    impl: UserImpl,
    config: Config,
    *,
    seed: int = 0,
    tolerance: Tolerance | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    max_memory: int | None = None,
    max_passes: int = DEFAULT_MAX_PASSES,
    process: UserProcess | None = None,
) -> ConfigResult:
    """Run the three checks of one configuration in a fresh child process (``process``, if
    given, must be a new one, perhaps launched already; it is closed here); never raises for
    the user's mistakes (they become the result's ``error``)."""
    tolerance = tolerance or Tolerance()
    checks = {name: Check(passed=None) for name in CHECKS}
    result = ConfigResult(config=config, checks=checks)
    problems: list[str] = []
    unrepeatable: list[str] = []
    if process is None:
        process = UserProcess(impl.path, timeout=timeout, max_memory=max_memory)
    with process:
        run = _Run(process, config, seed, tolerance)
        try:
            process.start()
            user_z = run.forward(run.x, run.w, run.b)
            z_dtype = process.dtypes.get("Z", "float64")
            checks["forward_vs_engine"] = Check(
                passed=None, tensors=_compare_all(["Z"], [user_z], [run.z], tolerance, config.cout)
            )
            user_grads = run.backward(run.g)
            again = run.backward(run.g)  # a fresh forward, then backward, on the same inputs
            unrepeatable = [
                name
                for name, first, second in zip(GRADIENTS, user_grads, again, strict=True)
                if not np.array_equal(first, second)
            ]
            if unrepeatable:
                problems.append(
                    f"conv_backward returned different {', '.join(unrepeatable)} when called "
                    "again with the same inputs (does it keep values between calls, such as "
                    "an accumulator that is never reset?)"
                )
            checks["backward_vs_engine"] = Check(
                passed=None,
                tensors=_compare_all(GRADIENTS, user_grads, run.engine, tolerance, config.cout),
            )
            run.locate_contributions(
                checks["backward_vs_engine"],
                lambda c: conv_backward(_only_channel(run.g, c), run.cache)[0],
            )
            try:
                if z_dtype != "float64":
                    raise NumericUnavailable(
                        f"conv_forward returns {z_dtype} Z, whose rounding swamps central "
                        "differences; return float64 to check the gradients numerically"
                    )
                numeric = numeric_gradients(
                    run.forward,
                    run.x,
                    run.w,
                    run.b,
                    run.g,
                    eps=tolerance.eps,
                    seed=seed,
                    max_passes=max_passes,
                )
            except NumericUnavailable as unavailable:
                checks["backward_vs_numeric"] = Check(passed=None, reason=str(unavailable))
                problems.append(f"numerical gradients not checked: {unavailable}")
            else:
                result.forward_passes = numeric.forward_passes
                checks["backward_vs_numeric"] = Check(
                    passed=None,
                    tensors=_compare_all(
                        GRADIENTS,
                        user_grads,
                        (numeric.dx, numeric.dw, numeric.db),
                        tolerance,
                        config.cout,
                    ),
                )
                by_cout = numeric.dx_by_cout
                run.locate_contributions(
                    checks["backward_vs_numeric"],
                    lambda c: None if by_cout is None else by_cout[..., c],
                )
        except UserCodeError as failure:
            problems.insert(0, str(failure))
        result.output = process.output()
    for check in checks.values():
        if check.tensors and check.reason is None:
            check.passed = not check.failing()
    problems += _failures(checks)
    result.error = "; ".join(problems) or None
    result.diagnosis = diagnose(checks, problems[0] if problems else None)
    if unrepeatable:
        result.diagnosis = (
            f"conv_backward is not repeatable: called twice with the same inputs it returned "
            f"different {', '.join(unrepeatable)} (state kept between calls); " + result.diagnosis
        )
    return result


def _only_channel(g: np.ndarray, channel: int) -> np.ndarray:
    kept = np.zeros_like(g)
    kept[..., channel] = g[..., channel]
    return kept


def _summary(comparison: Comparison, reference: str) -> str:
    text = f"{comparison.name} {reference} at {comparison.failed}/{comparison.checked} elements"
    if comparison.worst:
        worst = comparison.worst[0]
        expected = "numerically" if reference == "wrong" else "expected"
        text += (
            f" (worst at {worst['index']}: {worst['yours']:.6g}, {expected} "
            f"{worst['expected']:.6g})"
        )
    return text


def _failures(checks: dict[str, Check]) -> list[str]:
    """One phrase per failing tensor, in the order of the checks."""
    phrases = []
    for name, reference in (
        ("forward_vs_engine", "differs from convcli's engine"),
        ("backward_vs_numeric", "wrong"),
        ("backward_vs_engine", "differs from convcli's engine"),
    ):
        phrases += [_summary(t, reference) for t in checks[name].failing()]
    return phrases


def _brief(comparison: Comparison, reference: str) -> str:
    where = f" ({comparison.where})" if comparison.where else ""
    counts = f"{comparison.failed}/{comparison.checked}"
    return f"{comparison.name} differs from {reference} at {counts} elements{where}"


def diagnose(checks: dict[str, Check], error: str | None) -> str:
    """One line saying which function is wrong, e.g. "conv_forward is wrong (...);
    conv_backward is the exact gradient of your conv_forward"."""
    forward, numeric, engine = (checks[name] for name in CHECKS)
    if forward.passed is None:
        return error or "conv_forward could not be checked"
    if forward.passed:
        first = "conv_forward is right"
    else:
        (z,) = forward.failing()
        first = f"conv_forward is wrong ({_brief(z, 'the engine')})"
    if engine.passed is None:
        return f"{first}; conv_backward could not be checked: {error}"
    if numeric.passed and engine.passed:
        return (
            "conv_forward and conv_backward are right"
            if forward.passed
            else (f"{first}; conv_backward is right")
        )
    if numeric.passed:
        if forward.passed:
            return f"{first}; conv_backward matches numerical gradients but not the engine's"
        return f"{first}; conv_backward is the exact gradient of your conv_forward"
    wrong_vs_engine = "; ".join(_brief(t, "the engine") for t in engine.failing())
    if numeric.passed is None:
        state = "right (it matches the engine)" if engine.passed else f"wrong ({wrong_vs_engine})"
        return f"{first}; conv_backward is {state}; {numeric.reason or error}"
    wrong = "; ".join(_brief(t, "numerical gradients") for t in numeric.failing())
    if engine.passed:
        return f"{first}; conv_backward is right (it matches the engine's gradients)"
    return f"{first}; conv_backward is wrong ({wrong})"


def check_impl(
    impl: UserImpl,
    configs=SUITE,
    *,
    seed: int = 0,
    tolerance: Tolerance | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    max_memory: int | None = None,
    progress=None,
) -> list[ConfigResult]:
    """Check every configuration, each in its own child process; ``progress(done, total)``.

    The next configuration's child is launched while one is being checked, so its start-up
    (Python and NumPy) overlaps the work instead of adding to it.
    """

    def launched() -> UserProcess:
        process = UserProcess(impl.path, timeout=timeout, max_memory=max_memory)
        process.launch()
        return process

    results: list[ConfigResult] = []
    upcoming = launched() if configs else None
    try:
        for number, config in enumerate(configs, start=1):
            process, upcoming = upcoming, launched() if number < len(configs) else None
            results.append(
                check_config(
                    impl,
                    config,
                    seed=seed + number,
                    tolerance=tolerance,
                    timeout=timeout,
                    max_memory=max_memory,
                    process=process,
                )
            )
            if progress is not None:
                progress(number, len(configs))
    finally:
        if upcoming is not None:
            upcoming.close()
    return results


def impl_config(shape, kernel, cout: int, spec: ConvSpec) -> Config:
    """The one configuration given by parameters, in the exercise's terms (square kernel,
    one integer stride and pad).

    Parameters
    ----------
    shape : sequence of int
        x's shape (n, H, W, Cin).
    kernel : sequence of int
        ``(f,)`` or ``(f, f)``.
    cout : int
    spec : ConvSpec
        Its stride and padding must be one integer each; dilation 1, groups 1, zero padding,
        channels last.

    Raises
    ------
    UsageError
        When the parameters ask for something the exercise's signature cannot express; its
        ``param`` names the first such parameter (shape, kernel, stride, padding, dilation,
        groups, padding_mode or layout).
    """
    if len(shape) != 4:
        raise UsageError(
            f"{{param}} has {len(shape)} values: {_NEEDS} a 2-D layer (n, H, W, Cin)",
            param="shape",
        )
    if len(kernel) == 2 and kernel[0] != kernel[1]:
        raise UsageError(
            f"{{param}} {_shown(tuple(kernel))}: {_NEEDS} square kernels (f, f, Cin, Cout); "
            "give one size",
            param="kernel",
        )
    stride, pad = _exercise_hparameters(spec)
    n, h, w, cin = shape
    config = Config(n=n, h=h, w=w, cin=cin, kernel=kernel[0], cout=cout, stride=stride, pad=pad)
    config.spec().geometry((n, h, w, cin), (kernel[0], kernel[0], cin, cout))
    return config


_NEEDS = "checking a user's implementation needs"
_EXERCISE = "the exercise's hparameters {'stride': s, 'pad': p}"


def _exercise_hparameters(spec: ConvSpec) -> tuple[int, int]:
    """``(stride, pad)`` of ``spec`` when the exercise's signature can express it."""
    stride_axes, dilation_axes = spec.per_axis(2)
    padding = spec.explicit_padding(2)
    pads = set() if isinstance(padding, str) else {v for pair in padding for v in pair}
    one_integer = f"{_NEEDS} one integer, as in {_EXERCISE}"
    if len(set(stride_axes)) != 1:
        raise UsageError(f"{{param}} {_shown(spec.stride)}: {one_integer}", param="stride")
    if len(pads) != 1:
        raise UsageError(f"{{param}} {_shown(spec.padding)}: {one_integer}", param="padding")
    unsupported = (  # (param, whether its value is unsupported, the value, the exercise's)
        ("dilation", set(dilation_axes) != {1}, spec.dilation, 1),
        ("groups", spec.groups != 1, spec.groups, 1),
        ("padding_mode", spec.padding_mode != "zeros", spec.padding_mode, "zeros"),
        ("layout", spec.layout != "nhwc", spec.layout, "nhwc"),
    )
    for param, bad, value, only in unsupported:
        if bad:
            raise UsageError(
                f"{{param}} {_shown(value)}: must be {_shown(only)} to check a user's "
                f"implementation ({_EXERCISE} have no {param})",
                param=param,
            )
    return int(stride_axes[0]), pads.pop()


def _shown(value) -> str:
    """A parameter's value as the user wrote it: ``2``, ``1,2``, ``'same'``."""
    if isinstance(value, tuple) and all(isinstance(v, int) for v in value):
        return ",".join(map(str, value))
    return repr(value) if isinstance(value, str) else str(value)
