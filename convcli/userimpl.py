"""Checking a user's own ``conv_forward`` / ``conv_backward`` (``gradcheck --impl FILE.py``).

The user's file defines the classic exercise's functions::

    conv_forward(A_prev, W, b, hparameters) -> (Z, cache)
    conv_backward(dZ, cache) -> (dA_prev, dW, db)

with A_prev ``(n, H, W, Cin)``, W ``(f, f, Cin, Cout)``, b ``(1, 1, 1, Cout)``,
``hparameters = {"stride": s, "pad": p}`` and Z, dZ ``(n, Ho, Wo, Cout)``, all float64.

For each configuration the user's forward is compared with convcli's engine, and the user's
backward both with numerical gradients of the user's own forward (exhaustive mode) and with
the engine's backward. Whatever the user's code does wrong — raising, wrong shapes or types,
NaN, wrong values — becomes a failed configuration with a one-line reason, never a crash.
The user's file is executed, never modified (no bytecode is written beside it).
"""

from __future__ import annotations

import contextlib
import importlib.util
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from convcli.engine import conv_backward, conv_forward
from convcli.errors import DataError, InputFileError
from convcli.gradcheck import GradcheckResult, Tolerance, gradcheck
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
        return ConvSpec(stride=self.stride, padding=self.pad)

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


@dataclass
class UserImpl:
    """The user's two functions, loaded from ``path``."""

    path: Path
    forward: object
    backward: object


@dataclass
class ConfigResult:
    """The verdict for one configuration; ``error`` is the one-line reason when it failed."""

    config: Config
    reasons: list[str] = field(default_factory=list)
    check: GradcheckResult | None = None

    @property
    def passed(self) -> bool:
        return not self.reasons

    @property
    def error(self) -> str | None:
        return "; ".join(self.reasons) or None


class _UserFailure(Exception):
    """Raised inside a check when the user's code misbehaved; the message is the reason."""


def load_impl(path) -> UserImpl:
    """Execute the user's file and return its ``conv_forward`` and ``conv_backward``.

    Raises
    ------
    InputFileError
        If the file is missing or unreadable.
    DataError
        If executing it raises, or it does not define both functions.
    """
    path = Path(path)
    if not path.is_file():
        raise InputFileError(
            f"{path}: no such file" if not path.exists() else f"{path}: not a file"
        )
    spec = importlib.util.spec_from_file_location(f"convcli_user_impl_{abs(hash(path))}", path)
    if spec is None or spec.loader is None:
        raise DataError(f"{path}: cannot be loaded as a Python file")
    module = importlib.util.module_from_spec(spec)
    saved_path, saved_bytecode = list(sys.path), sys.dont_write_bytecode
    sys.path.insert(0, str(path.resolve().parent))
    sys.dont_write_bytecode = True
    try:
        with contextlib.redirect_stdout(sys.stderr):
            spec.loader.exec_module(module)
    except (Exception, SystemExit) as error:
        raise DataError(f"{path}: running it raised {_describe(error, path)}") from None
    finally:
        sys.path[:] = saved_path
        sys.dont_write_bytecode = saved_bytecode
    missing = [
        name
        for name in ("conv_forward", "conv_backward")
        if not callable(getattr(module, name, None))
    ]
    if missing:
        raise DataError(
            f"{path} defines no {' and no '.join(missing)}; expected conv_forward(A_prev, W, b, "
            "hparameters) -> (Z, cache) and conv_backward(dZ, cache) -> (dA_prev, dW, db)"
        )
    return UserImpl(path=path, forward=module.conv_forward, backward=module.conv_backward)


def _describe(error: BaseException, path: Path) -> str:
    """``TypeError: message (impl.py line 12)``, citing the deepest frame in the user's file."""
    line = None
    for frame in traceback.extract_tb(error.__traceback__):
        if Path(frame.filename).resolve() == path.resolve():
            line = frame.lineno
    where = f" ({path.name} line {line})" if line is not None else ""
    message = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"{type(error).__name__}{': ' + message if message else ''}{where}"


def _call(impl: UserImpl, name: str, *args):
    """Call a user function on copies of the arrays, turning any exception into a reason."""
    function = impl.forward if name == "conv_forward" else impl.backward
    copies = [a.copy() if isinstance(a, np.ndarray) else a for a in args]
    try:
        with contextlib.redirect_stdout(sys.stderr):
            return function(*copies)
    except Exception as error:
        raise _UserFailure(f"{name} raised {_describe(error, impl.path)}") from None


def _array(value, what: str, shape: tuple, allow: tuple = ()) -> np.ndarray:
    try:
        array = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise _UserFailure(f"{what} is a {type(value).__name__}, not a numeric array") from None
    if array.shape != shape and array.shape not in allow:
        raise _UserFailure(f"{what} has shape {array.shape}, expected {shape}")
    bad = ~np.isfinite(array)
    if bad.any():
        first = [int(i) for i in np.argwhere(bad)[0]]
        raise _UserFailure(f"{what} has {int(bad.sum())} NaN/Inf values (first at {first})")
    return array.reshape(shape)


def _mismatch(what: str, got: np.ndarray, want: np.ndarray, tolerance: Tolerance) -> str | None:
    error = np.abs(got - want)
    allowed = tolerance.atol + tolerance.rtol * np.maximum(np.abs(got), np.abs(want))
    wrong = error > allowed
    if not wrong.any():
        return None
    worst = np.unravel_index(np.argmax(error - allowed), got.shape)
    index = [int(i) for i in worst]
    return (
        f"{what} differs from convcli's engine at {int(wrong.sum())}/{got.size} elements "
        f"(worst at {index}: {got[worst]:.6g}, expected {want[worst]:.6g})"
    )


def _forward(impl: UserImpl, config: Config):
    """The user's forward as ``forward(x, w, b) -> z`` for gradcheck."""
    hparameters = {"stride": config.stride, "pad": config.pad}

    def forward(x, w, b):
        result = _call(impl, "conv_forward", x, w, b.reshape(1, 1, 1, -1), hparameters)
        if not isinstance(result, tuple) or len(result) != 2:
            raise _UserFailure("conv_forward must return a tuple (Z, cache)")
        z_shape = config.spec().geometry(x.shape, w.shape).out_shape
        return _array(result[0], "Z", z_shape)

    return forward


def _backward(impl: UserImpl, config: Config):
    """The user's backward as ``backward(g, x, w, b) -> (dx, dw, db)`` for gradcheck."""
    hparameters = {"stride": config.stride, "pad": config.pad}

    def backward(g, x, w, b):
        result = _call(impl, "conv_forward", x, w, b.reshape(1, 1, 1, -1), hparameters)
        if not isinstance(result, tuple) or len(result) != 2:
            raise _UserFailure("conv_forward must return a tuple (Z, cache)")
        grads = _call(impl, "conv_backward", g, result[1])
        if not isinstance(grads, tuple) or len(grads) != 3:
            raise _UserFailure("conv_backward must return a tuple (dA_prev, dW, db)")
        dx = _array(grads[0], "dA_prev", x.shape)
        dw = _array(grads[1], "dW", w.shape)
        db = _array(grads[2], "db", b.shape, allow=((1, 1, 1, b.size),))
        return dx, dw, db

    return backward


def check_config(
    impl: UserImpl, config: Config, *, seed: int = 0, tolerance: Tolerance | None = None
) -> ConfigResult:
    """Run every check of one configuration; never raises for the user's mistakes."""
    tolerance = tolerance or Tolerance()
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((config.n, config.h, config.w, config.cin))
    w = rng.standard_normal((config.kernel, config.kernel, config.cin, config.cout))
    b = rng.standard_normal(config.cout)
    spec = config.spec()
    z, cache = conv_forward(x, w, b, spec)
    g = rng.standard_normal(z.shape)
    result = ConfigResult(config=config)
    forward, backward = _forward(impl, config), _backward(impl, config)
    try:
        user_z = forward(x, w, b)
    except _UserFailure as failure:
        result.reasons.append(str(failure))
        return result
    reason = _mismatch("Z", user_z, z, tolerance)
    if reason:
        result.reasons.append(reason)
    try:
        user_grads = backward(g, x, w, b)
    except _UserFailure as failure:
        result.reasons.append(str(failure))
        return result
    engine_grads = conv_backward(g, cache)
    try:
        result.check = gradcheck(
            x,
            w,
            b,
            spec,
            upstream=g,
            mode="exhaustive",
            tolerance=tolerance,
            forward=forward,
            backward=backward,
        )
    except _UserFailure as failure:
        result.reasons.append(str(failure))
        return result
    for check, label, got, want in zip(
        result.check.tensors.values(),
        ("dA_prev", "dW", "db"),
        user_grads,
        engine_grads,
        strict=True,
    ):
        if not check.passed:
            worst = check.worst[0]
            result.reasons.append(
                f"{label} wrong at {int(check.failed.sum())}/{check.total} elements (worst at "
                f"{worst['index']}: {worst['analytic']:.6g}, numerically {worst['numeric']:.6g})"
            )
        else:
            reason = _mismatch(label, got, want.reshape(got.shape), tolerance)
            if reason:
                result.reasons.append(reason)
    return result


def check_impl(
    impl: UserImpl,
    configs=SUITE,
    *,
    seed: int = 0,
    tolerance: Tolerance | None = None,
    progress=None,
) -> list[ConfigResult]:
    """Check every configuration; ``progress(done, total)`` after each."""
    results = []
    for number, config in enumerate(configs, start=1):
        results.append(check_config(impl, config, seed=seed + number, tolerance=tolerance))
        if progress is not None:
            progress(number, len(configs))
    return results


def impl_config(shape, kernel, cout: int, spec: ConvSpec) -> Config:
    """The one configuration given by flags, in the exercise's terms (square kernel, int pad).

    Raises
    ------
    UsageError
        When the flags ask for something the exercise's signature cannot express.
    """
    from convcli.errors import UsageError

    if len(shape) != 4:
        raise UsageError("--impl checks 2-D layers: give --shape N,H,W,CIN")
    if len(kernel) == 2 and kernel[0] != kernel[1]:
        raise UsageError("--impl checks square kernels (f, f, Cin, Cout): give --kernel F")
    stride_axes, dilation_axes = spec.per_axis(2)
    stride = set(stride_axes)
    padding = spec.explicit_padding(2)
    pads = {v for pair in padding for v in pair} if padding != "same" else {None}
    if (
        len(stride) != 1
        or len(pads) != 1
        or None in pads
        or set(dilation_axes) != {1}
        or spec.groups != 1
        or spec.padding_mode != "zeros"
        or spec.layout != "nhwc"
    ):
        raise UsageError(
            "--impl checks the exercise's hparameters {'stride': s, 'pad': p}: give one integer "
            "--stride and --pad, and no --dilation, --groups, --padding-mode or --layout"
        )
    n, h, w, cin = shape
    config = Config(
        n=n, h=h, w=w, cin=cin, kernel=kernel[0], cout=cout, stride=stride.pop(), pad=pads.pop()
    )
    config.spec().geometry((n, h, w, cin), (kernel[0], kernel[0], cin, cout))
    return config
