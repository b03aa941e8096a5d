"""Checking a user's own convolution (a forward, and a backward if given) from a Python file.

The file's functions follow one of the signatures of :mod:`convcli.check.adapters`
(``classic``: ``conv_forward(A_prev, W, b, hparameters) -> (Z, cache)`` and
``conv_backward(dZ, cache) -> (dA_prev, dW, db)``, NHWC; ``cs231n``: the ``_naive`` or
``_fast`` pair, NCHW; ``callable``: named functions taking keyword hyperparameters, any
rank). Here every array is channels last: x ``(n, *spatial, Cin)``, w ``(*kernel,
Cin/groups, Cout)``, b ``(Cout,)``, z and g ``(n, *out, Cout)``, float64; the adapter converts
to and from the user's layout. The suite (:data:`SUITE` and :data:`EXTRA`, filtered by
:func:`suite_for`) follows what the signature can express.

Each configuration gets three verdicts: ``forward_vs_engine`` (the user's z against convcli's
engine), ``backward_vs_numeric`` (the user's backward against numerical gradients of the
user's *own* forward, see :mod:`convcli.check.numgrad`) and ``backward_vs_engine``, plus a one-line
diagnosis naming the function to fix (a forward-only file gets the first alone), and hints
for classic mistakes (:func:`trap_hints`). The child also checks that the user's code leaves
its inputs unchanged and that the backward gives the same gradients when called twice on the
same cache. The user's code runs in a child process, one per
configuration (:mod:`convcli.check.userproc`); whatever it does wrong — raising anything, exiting,
crashing, hanging, running out of memory, wrong shapes or types, NaN, wrong values — becomes
a failed configuration with a one-line reason, never a crash or an exit code of the user's
choosing. The user's file is executed, never modified (no bytecode is written beside it).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from convcli.check.adapters import (
    ADAPTERS,
    Adapter,
    Binding,
    callable_adapter,
    detect,
    known_names,
)
from convcli.check.numgrad import (
    DEFAULT_MAX_PASSES,
    NumericUnavailable,
    SampledGradients,
    numeric_gradients,
    sampled_gradients,
)
from convcli.check.tolerance import ElementErrors, Tolerance, compare_elements
from convcli.check.userproc import DEFAULT_TIMEOUT, UserCodeError, UserProcess
from convcli.engine.fast import conv_backward, conv_forward
from convcli.errors import DataError, InputFileError, UsageError
from convcli.spec import ConvSpec, in_layout

Step = int | tuple[int, ...]  # a stride or dilation: every axis, or one per axis
Pad = int | str | tuple[tuple[int, int], ...]  # one for every side, a form, or per axis


@dataclass(frozen=True)
class Config:
    """One configuration: x ``(n, *spatial, Cin)`` (channels last), the kernel's spatial
    sizes, Cout, groups, and stride and dilation as one integer (every axis) or one per
    axis; pad is one integer (the same on every side), "same" / "valid", or ``(before,
    after)`` per axis."""

    shape: tuple[int, ...]
    kernel: tuple[int, ...]
    cout: int
    stride: Step = 1
    pad: Pad = 0
    dilation: Step = 1
    groups: int = 1

    @property
    def n(self) -> int:
        return self.shape[0]

    @property
    def cin(self) -> int:
        return self.shape[-1]

    @property
    def rank(self) -> int:
        """The number of spatial axes."""
        return len(self.shape) - 2

    def w_shape(self) -> tuple[int, ...]:
        """w's shape, channels last: ``(*kernel, Cin/groups, Cout)``."""
        return (*self.kernel, self.cin // self.groups, self.cout)

    def spec(self) -> ConvSpec:
        """The configuration's hyperparameters as a :class:`~convcli.spec.ConvSpec`."""
        return ConvSpec(
            stride=self.stride, padding=self.pad, dilation=self.dilation, groups=self.groups
        )

    def needs(self) -> set[str]:
        """What an adapter must express for this configuration (see Adapter.features)."""
        needs = {"dilation"} if self.dilation != 1 else set()
        if any(isinstance(v, tuple) for v in (self.stride, self.pad, self.dilation)):
            needs.add("per_axis")
        if self.groups != 1:
            needs.add("groups")
        if len(set(self.kernel)) > 1:
            needs.add("nonsquare")
        if isinstance(self.pad, str):
            needs.add("padding_forms")
        return needs

    def user_shape(self, layout: str = "nhwc") -> tuple[int, ...]:
        """x's shape in ``layout`` (``shape`` is channels last)."""
        geometry = self.spec().geometry(self.shape, self.w_shape())
        return replace(geometry, layout=layout).user_shapes()["x"]

    def to_json(self, layout: str = "nhwc") -> dict:
        """The same keys as an engine check's config (resolved per-axis values); x's shape
        in ``layout``, the user's."""
        return {
            "shape": list(self.user_shape(layout)),
            "kernel": list(self.kernel),
            "cout": self.cout,
            "stride": list(self.spec().per_axis(self.rank)[0]),
            "dilation": list(self.spec().per_axis(self.rank)[1]),
            "groups": self.groups,
            "padding_mode": "zeros",
            "layout": layout,
            "pad": self.spec().geometry(self.shape, self.w_shape()).hparams()["padding"],
        }


def _c(n, h, w, cin, kernel, cout, stride, pad) -> Config:
    return Config(shape=(n, h, w, cin), kernel=(kernel, kernel), cout=cout, stride=stride, pad=pad)


# pad 0, 1, 2; stride 1, 2, 3; kernels 1, 2, 3; square and non-square inputs; batch 1 and > 1;
# Cin != Cout; output sizes from 1 up. The classic exercise's layer is the last one.
SUITE = (
    _c(n=1, h=3, w=3, cin=1, kernel=1, cout=1, stride=1, pad=0),
    _c(n=2, h=5, w=5, cin=3, kernel=3, cout=4, stride=1, pad=1),
    _c(n=2, h=4, w=6, cin=2, kernel=2, cout=3, stride=2, pad=0),
    _c(n=3, h=7, w=5, cin=3, kernel=3, cout=2, stride=3, pad=2),
    _c(n=1, h=3, w=3, cin=2, kernel=3, cout=5, stride=1, pad=0),
    _c(n=2, h=6, w=4, cin=4, kernel=2, cout=2, stride=2, pad=1),
    _c(n=2, h=5, w=7, cin=2, kernel=1, cout=3, stride=2, pad=2),
    _c(n=1, h=2, w=5, cin=1, kernel=2, cout=2, stride=3, pad=1),
    _c(n=2, h=9, w=9, cin=2, kernel=3, cout=3, stride=3, pad=0),
    _c(n=1, h=3, w=4, cin=2, kernel=2, cout=3, stride=1, pad=2),
    _c(n=4, h=8, w=8, cin=3, kernel=3, cout=8, stride=2, pad=1),
    _c(n=10, h=4, w=4, cin=3, kernel=2, cout=8, stride=2, pad=2),
)

# what only some signatures can express: non-square kernels, dilation, groups, 1-D and 3-D
EXTRA = (
    Config(shape=(2, 5, 6, 2), kernel=(1, 3), cout=3, stride=1, pad=1),
    Config(shape=(1, 6, 5, 3), kernel=(3, 2), cout=2, stride=2, pad=0),
    Config(shape=(2, 7, 7, 2), kernel=(3, 3), cout=3, stride=1, pad=2, dilation=2),
    Config(shape=(2, 5, 5, 4), kernel=(3, 3), cout=6, stride=1, pad=1, groups=2),
    Config(shape=(1, 4, 4, 3), kernel=(2, 2), cout=3, stride=2, pad=0, groups=3),
    Config(shape=(2, 9, 3), kernel=(3,), cout=2, stride=2, pad=1),
    Config(shape=(2, 6, 5, 2), kernel=(3, 2), cout=3, stride=2, pad="same"),
    Config(shape=(1, 5, 6, 2), kernel=(3, 3), cout=2, stride=1, pad="valid"),
    Config(shape=(1, 4, 3, 5, 2), kernel=(2, 2, 3), cout=2, stride=1, pad=1),
)


def suite_for(adapter: Adapter) -> tuple[Config, ...]:
    """The configurations of SUITE and EXTRA that ``adapter`` can express (its ranks and
    features; without a stride or padding keyword, only stride 1 or pad 0)."""
    return tuple(c for c in SUITE + EXTRA if _expressible(adapter, c))


def _expressible(adapter: Adapter, config: Config) -> bool:
    accepted = adapter.accepted
    return (
        config.rank in adapter.ranks
        and config.needs() <= adapter.features
        and (config.stride == 1 or "stride" in accepted)
        and (config.pad in (0, "valid") or "padding" in accepted)
    )


CHECKS = ("forward_vs_engine", "backward_vs_numeric", "backward_vs_engine")
GRADIENTS = ("dx", "dw", "db")  # roles; each signature names them (Binding.name)


@dataclass(frozen=True)
class UserImpl:
    """The user's file, known to load, bound to a signature (its functions' names).

    ``binding.backward`` is None for a file that defines only a forward (a forward-only
    check). :attr:`suite` is what the signature can express.
    """

    path: Path
    binding: Binding

    @property
    def forward_only(self) -> bool:
        return self.binding.backward is None

    @property
    def suite(self) -> tuple[Config, ...]:
        return suite_for(self.binding.adapter)

    @property
    def functions(self) -> tuple[str, str]:
        """The names to blame in diagnoses: (forward, backward)."""
        return self.binding.forward, self.binding.backward or "backward"


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
    forward_only: bool = False
    numeric_skipped: bool = False
    hints: list[str] = field(default_factory=list)
    layout: str = "nhwc"  # the user's: shapes and indices are reported in it

    @property
    def passed(self) -> bool:
        required = [CHECKS[0]] if self.forward_only else list(CHECKS)
        if self.numeric_skipped:
            required.remove("backward_vs_numeric")
        return self.error is None and all(self.checks[c].passed is True for c in required)

    def to_json(self) -> dict:
        return {
            "config": self.config.to_json(self.layout),
            "passed": self.passed,
            "error": self.error,
            "diagnosis": self.diagnosis,
            "checks": {name: check.to_json() for name, check in self.checks.items()},
            "output": self.output,
            "forward_passes": self.forward_passes,
            "forward_only": self.forward_only,
            "hints": self.hints,
        }


def split_impl(text: str) -> tuple[Path, tuple[str, ...]]:
    """``FILE.py`` or ``FILE.py:FORWARD[,BACKWARD]`` as (path, function names or ())."""
    head, colon, tail = str(text).rpartition(":")
    if colon and head and tail and not Path(text).exists() and "/" not in tail:
        names = tuple(n.strip() for n in tail.split(","))
        if 1 <= len(names) <= 2 and all(n.isidentifier() for n in names):
            return Path(head), names
        raise UsageError(
            f"{{param}} {text!r}: expected FILE.py:FORWARD or FILE.py:FORWARD,BACKWARD "
            "(Python names)",
            param="impl",
        )
    return Path(text), ()


def load_impl(
    path,
    *,
    timeout: float = DEFAULT_TIMEOUT,
    signature: str | None = None,
    layout: str = "nhwc",
) -> UserImpl:
    """Check that the user's file runs (in a child process) and bind it to a signature.

    ``path`` is ``FILE.py`` (the signature is detected from the names the file defines, or
    is ``signature``) or ``FILE.py:FORWARD[,BACKWARD]`` (the ``callable`` signature, arrays
    in ``layout``: "nhwc" channels last or "nchw" channels first).

    Raises
    ------
    InputFileError
        If the file is missing or unreadable.
    UsageError
        If ``signature`` is unknown, or does not fit the form of ``path``.
    DataError
        If running it raises, exits, crashes or hangs, or it defines none of the signature's
        functions.
    """
    path, functions = split_impl(str(path))
    if signature is not None and signature not in ADAPTERS:
        detect(set(), signature)  # raises the UsageError naming the signatures
    if functions and signature not in (None, "callable"):
        raise UsageError(
            f"{{param}} {signature!r}: function names after the file mean 'callable'",
            param="signature",
        )
    if not path.is_file():
        raise InputFileError(
            f"{path}: no such file" if not path.exists() else f"{path}: not a file"
        )
    with UserProcess(path, timeout=timeout, wanted=functions or known_names()) as process:
        try:
            process.start()
        except UserCodeError as error:
            raise DataError(_named(path, str(error))) from None
        if functions:
            forward, backward = functions[0], functions[1] if len(functions) > 1 else None
            missing = [name for name in functions if name not in process.defined]
            if missing:
                raise DataError(f"{path} defines no function {' and no '.join(missing)}")
            adapter = callable_adapter(layout, process.keywords.get(forward, ()))
            return UserImpl(path=path, binding=Binding(adapter, forward, backward))
        try:
            name, forward, backward = detect(process.defined, signature)
        except ValueError as error:
            raise DataError(f"{path} {error}") from None
    return UserImpl(path=path, binding=Binding(ADAPTERS[name], forward, backward))


def _named(path: Path, message: str) -> str:
    """The child's message, naming the file as the user did."""
    resolved = str(path.resolve())  # the child names the file by its full path
    if message.startswith(resolved):
        return str(path) + message[len(resolved) :]
    return message if message.startswith(str(path)) else f"{path}: {message}"


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


def _locate(comparison: Comparison, role: str, failed_mask: np.ndarray, cout: int) -> None:
    """Fill ``comparison.where`` for z, dw, db (per output channel) and dx's first part."""
    if comparison.passed:
        return
    if role in ("dw", "db"):
        comparison.where = _channels(comparison.failures_per_channel, cout, "output channel")
        return
    total, label = (
        (cout, "output channel") if role == "z" else (failed_mask.shape[-1], "input channel")
    )
    comparison.where = _channels(comparison.failures_per_channel, total, label)
    if failed_mask.ndim == 4:
        comparison.where += ", " + _pixels(np.any(failed_mask, axis=(0, 3)))


def _in_user_order(checks: dict[str, Check], binding: Binding) -> None:
    """Worst elements' indices (channels last) in the user's layout."""
    which = {binding.name(role): ("w" if role == "dw" else "x") for role in ("z", "dx", "dw")}
    for check in checks.values():
        for name, comparison in check.tensors.items():
            for row in comparison.worst:
                if name in which:
                    row["index"] = list(
                        in_layout(row["index"], which[name], binding.adapter.layout)
                    )


def _compare_sampled(names, user_grads, sampled, tolerance, cout) -> dict[str, Comparison]:
    """The user's dx, dw, db at the sampled elements against their central differences."""
    tensors = {}
    for name, role, mine in zip(names, GRADIENTS, user_grads, strict=True):
        mine = np.asarray(mine, np.float64)
        chosen = sampled.indices[role]
        got, want = mine.reshape(-1)[chosen], sampled.values[role]
        errors = compare_elements(got, want, tolerance)
        comparison = _comparison(name, got, want, errors)
        comparison.worst = [
            {
                **row,
                "index": [int(i) for i in np.unravel_index(chosen[row["index"][0]], mine.shape)],
            }
            for row in comparison.worst
        ]
        channels = chosen % mine.shape[-1]  # channels last: the last axis
        failing = np.bincount(channels[errors.failed], minlength=mine.shape[-1])
        comparison.failures_per_channel = {c: int(k) for c, k in enumerate(failing) if k}
        if not comparison.passed:
            label = "output channel" if role != "dx" else "input channel"
            total = cout if role != "dx" else mine.shape[-1]
            comparison.where = _channels(comparison.failures_per_channel, total, label)
        tensors[name] = comparison
    return tensors


def _compare_all(names, roles, got, want, tolerance, cout) -> dict[str, Comparison]:
    tensors = {}
    for name, role, mine, reference in zip(names, roles, got, want, strict=True):
        mine, reference = _float64_pair(mine, reference)
        errors = compare_elements(mine, reference, tolerance)
        comparison = _comparison(name, mine, reference, errors)
        _locate(comparison, role, errors.failed, cout)
        tensors[name] = comparison
    return tensors


@dataclass(frozen=True)
class LayerArrays:
    """A given layer's x ``(n, *spatial, Cin)``, w ``(*kernel, Cin/groups, Cout)``, b
    ``(Cout,)`` and optionally g (dz, ``(n, *out, Cout)``), channels last, float64; checked
    instead of random arrays."""

    x: np.ndarray
    w: np.ndarray
    b: np.ndarray
    g: np.ndarray | None = None


class _Run:
    """The state of one configuration's check (inputs, engine results, the child process)."""

    def __init__(
        self,
        process: UserProcess,
        impl: UserImpl,
        config: Config,
        seed: int,
        tolerance: Tolerance,
        arrays: LayerArrays | None = None,
    ):
        self.process, self.config, self.tolerance = process, config, tolerance
        self.binding = impl.binding
        self.hparams = impl.binding.adapter.hparams(
            config.stride, config.pad, config.dilation, config.groups
        )
        rng = np.random.default_rng(seed)
        if arrays is None:
            arrays = LayerArrays(
                rng.standard_normal(config.shape),
                rng.standard_normal(config.w_shape()),
                rng.standard_normal(config.cout),
            )
        self.x, self.w, self.b = arrays.x, arrays.w, arrays.b
        self.z, self.cache = conv_forward(self.x, self.w, self.b, config.spec())
        self.g = rng.standard_normal(self.z.shape) if arrays.g is None else arrays.g
        self.engine = conv_backward(self.g, self.cache)
        self.names = [impl.binding.name(role) for role in GRADIENTS]
        self.z_dtype = "float64"  # the dtype of the user's z, once known

    def forward(self, x, w, b):
        return self.process.forward(self.binding, self.hparams, x, w, b, self.z.shape)

    def backward(self, g):
        return self.process.backward(self.binding, self.hparams, g, self.x, self.w, self.b)

    def locate_contributions(self, check: Check, references) -> None:
        """Name the output channels whose contribution to dx is wrong.

        ``references(c)`` is the reference dx for upstream g kept in output channel c
        only; the user's backward is called with the same g.
        """
        comparison = check.tensors.get(self.names[0])
        cout = self.config.cout
        if comparison is None or comparison.passed or cout == 1:
            return
        wrong = []
        for c in range(cout):
            reference = references(c)
            if reference is None:
                return
            if self.tolerance.fails(self.backward(_only_channel(self.g, c))[0], reference).any():
                wrong.append(c)
        if wrong:
            comparison.where = f"{comparison.where}; {_contributions(wrong, cout)}"

    def numeric(self, seed: int, max_passes: int):
        """Numerical gradients of the user's forward at every element (NumericUnavailable
        when they cannot be trusted: a float32 z, a rank other than 2)."""
        self._check_numeric_dtype()
        return numeric_gradients(
            self.forward,
            self.x,
            self.w,
            self.b,
            self.g,
            eps=self.tolerance.eps,
            seed=seed,
            max_passes=max_passes,
        )

    def sampled(self, seed: int, samples: int):
        """Central differences of the user's forward at ``samples`` elements per tensor."""
        self._check_numeric_dtype()
        return sampled_gradients(
            self.forward,
            self.x,
            self.w,
            self.b,
            self.g,
            samples=samples,
            eps=self.tolerance.eps,
            seed=seed,
        )

    def _check_numeric_dtype(self) -> None:
        forward, z = self.binding.forward, self.binding.name("z")
        if self.z_dtype != "float64":
            raise NumericUnavailable(
                f"{forward} returns {self.z_dtype} {z}, whose rounding swamps central "
                "differences; return float64 to check the gradients numerically"
            )


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
    nondet_tol: float = 0.0,
    arrays: LayerArrays | None = None,
    samples: int | None = None,
) -> ConfigResult:
    """Run the checks of one configuration in a fresh child process (``process``, if
    given, must be a new one, perhaps launched already; it is closed here); never raises for
    the user's mistakes (they become the result's ``error``). ``arrays`` replace the random
    inputs (their shapes must be the configuration's). A forward-only file gets the forward
    check alone; ``max_passes`` 0 skips the numerical check, and ``samples`` replaces it by
    central differences at that many sampled elements of each of x, w and b."""
    tolerance = tolerance or Tolerance()
    checks = {name: Check(passed=None) for name in CHECKS}
    result = ConfigResult(config=config, checks=checks, forward_only=impl.forward_only)
    problems: list[str] = []
    unrepeatable: list[str] = []
    if process is None:
        process = _process(impl, timeout, max_memory)
    with process:
        run = _Run(process, impl, config, seed, tolerance, arrays)
        try:
            process.start()
            user_z = run.forward(run.x, run.w, run.b)
            run.z_dtype = process.dtypes.get("z", "float64")
            checks["forward_vs_engine"] = Check(
                passed=None,
                tensors=_compare_all(
                    [impl.binding.name("z")], ["z"], [user_z], [run.z], tolerance, config.cout
                ),
            )
            if impl.forward_only:
                for name in CHECKS[1:]:
                    checks[name] = Check(passed=None, reason="forward only: no backward given")
            else:
                unrepeatable = _check_backward(
                    run, result, problems, nondet_tol, seed, (max_passes, samples)
                )
        except UserCodeError as failure:
            problems.insert(0, str(failure))
        result.output = process.output()
    _in_user_order(checks, impl.binding)
    result.layout = impl.binding.adapter.layout
    for check in checks.values():
        if check.tensors and check.reason is None:
            check.passed = not check.failing()
    problems += _failures(checks)
    result.error = "; ".join(problems) or None
    result.diagnosis = diagnose(checks, problems[0] if problems else None, impl.functions)
    result.hints = trap_hints(result, impl.binding) + result.hints
    if unrepeatable:
        result.diagnosis = (
            f"{impl.functions[1]} is not repeatable: called twice on the same inputs it returned "
            f"different {', '.join(unrepeatable)}; " + result.diagnosis
        )
    return result


def _check_backward(
    run: _Run,
    result: ConfigResult,
    problems: list[str],
    nondet_tol: float,
    seed: int,
    numeric_plan: tuple[int, int | None],
) -> list[str]:
    """The backward checks of one configuration; the names of the gradients that differ
    between two calls on the same cache by more than ``nondet_tol``."""
    checks, tolerance, cout = result.checks, run.tolerance, run.config.cout
    backward = run.binding.backward
    user_grads = run.backward(run.g)
    unrepeatable = [
        run.binding.name(role)
        for role in GRADIENTS
        if run.process.repeat.get(role, 0.0) > nondet_tol
    ]
    if unrepeatable:
        largest = max(run.process.repeat.values())
        problems.append(
            f"{backward} returned different {', '.join(unrepeatable)} when called again on the "
            f"same inputs (largest difference {largest:.3g}, allowed {nondet_tol:g}; does it keep "
            "values between calls, such as an accumulator that is never reset?)"
        )
    checks["backward_vs_engine"] = Check(
        passed=None,
        tensors=_compare_all(run.names, GRADIENTS, user_grads, run.engine, tolerance, cout),
    )
    shift = _shifted_by(user_grads[0], run.engine[0], tolerance)
    if shift:
        name = run.binding.name("dx")
        result.hints.append(
            f"{name} is the right gradient moved by {shift} pixel{'s' * (shift > 1)}: check "
            "the slice that removes the padding (it starts at pad, not 0)"
        )
    run.locate_contributions(
        checks["backward_vs_engine"],
        lambda c: conv_backward(_only_channel(run.g, c), run.cache)[0],
    )
    passes, samples = numeric_plan
    if passes <= 0:
        result.numeric_skipped = True
        checks["backward_vs_numeric"] = Check(passed=None, reason="not run (fast mode)")
        return unrepeatable
    try:
        numeric = run.sampled(seed, samples) if samples is not None else run.numeric(seed, passes)
    except NumericUnavailable as unavailable:
        checks["backward_vs_numeric"] = Check(passed=None, reason=str(unavailable))
        problems.append(f"numerical gradients not checked: {unavailable}")
        return unrepeatable
    result.forward_passes = numeric.forward_passes
    if isinstance(numeric, SampledGradients):
        checks["backward_vs_numeric"] = Check(
            passed=None, tensors=_compare_sampled(run.names, user_grads, numeric, tolerance, cout)
        )
        return unrepeatable
    checks["backward_vs_numeric"] = Check(
        passed=None,
        tensors=_compare_all(
            run.names, GRADIENTS, user_grads, (numeric.dx, numeric.dw, numeric.db), tolerance, cout
        ),
    )
    by_cout = numeric.dx_by_cout
    run.locate_contributions(
        checks["backward_vs_numeric"],
        lambda c: None if by_cout is None else by_cout[..., c],
    )
    return unrepeatable


def _shifted_by(got: np.ndarray, want: np.ndarray, tolerance: Tolerance) -> int:
    """The s in 1..3 such that ``got`` is ``want`` moved by s along every spatial axis
    (either way; arrays ``(n, *spatial, C)``), or 0."""
    spatial = got.ndim - 2
    for s in range(1, 4):
        if any(size <= s for size in got.shape[1:-1]):
            break
        inner = (slice(None),) + (slice(s, None),) * spatial
        outer = (slice(None),) + (slice(None, -s),) * spatial
        for a, b in ((got[inner], want[outer]), (got[outer], want[inner])):
            if not tolerance.fails(a, b).any() and tolerance.fails(got, want).any():
                return s
    return 0


def trap_hints(result: ConfigResult, binding: Binding) -> list[str]:
    """Hints for the classic mistakes a result shows: ``float()`` of a one-element array
    (NumPy 2 refuses it), db divided by the batch size or by every output position, dw wrong
    in one output channel only."""
    hints = []
    if result.error and "converted to Python scalars" in result.error:
        hints.append(
            "float() or int() of an array with dimensions (such as b of shape (1, 1, 1, 1)) "
            "fails on NumPy 2: use b.item() or index down to one element"
        )
    engine = result.checks["backward_vs_engine"]
    db = engine.tensors.get(binding.name("db"))
    if db is not None and not db.passed and db.failed == db.checked:
        ratios = {round(row["expected"] / row["yours"], 6) for row in db.worst if row["yours"]}
        n, positions = result.config.n, _positions(result.config)
        if ratios == {float(n)} and n > 1:
            hints.append(f"{db.name} is the right value divided by the batch size n = {n}: sum it")
        elif len(ratios) == 1 and ratios == {float(n * positions)}:
            hints.append(f"{db.name} is a mean over the images and positions: sum it instead")
    dw = engine.tensors.get(binding.name("dw"))
    if dw is not None and len(dw.failures_per_channel) == 1 and result.config.cout > 1:
        (channel,) = dw.failures_per_channel
        hints.append(
            f"{dw.name} is wrong in output channel {channel} only: check the loop over output "
            "channels (the index of that channel, or a write that overwrites it)"
        )
    return hints


def _positions(config: Config) -> int:
    """Output positions per image (the product of the output sizes)."""
    return int(np.prod(config.spec().geometry(config.shape, config.w_shape()).out_sizes))


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


def diagnose(
    checks: dict[str, Check],
    error: str | None,
    functions: tuple[str, str] = ("conv_forward", "conv_backward"),
) -> str:
    """One line saying which function is wrong, e.g. "conv_forward is wrong (...);
    conv_backward is the exact gradient of your conv_forward"; ``functions`` are the
    user's (forward, backward) names."""
    forward, numeric, engine = (checks[name] for name in CHECKS)
    fwd, bwd = functions
    if forward.passed is None:
        return error or f"{fwd} could not be checked"
    if forward.passed:
        first = f"{fwd} is right"
    else:
        (z,) = forward.failing()
        first = f"{fwd} is wrong ({_brief(z, 'the engine')})"
    if engine.passed is None:
        if engine.reason is not None:  # forward only
            return f"{first} (forward only: no backward checked)"
        return f"{first}; {bwd} could not be checked: {error}"
    if numeric.passed and engine.passed:
        return f"{fwd} and {bwd} are right" if forward.passed else f"{first}; {bwd} is right"
    if numeric.passed:
        if forward.passed:
            return f"{first}; {bwd} matches numerical gradients but not the engine's"
        return f"{first}; {bwd} is the exact gradient of your {fwd}"
    wrong_vs_engine = "; ".join(_brief(t, "the engine") for t in engine.failing())
    if numeric.passed is None:
        state = "right (it matches the engine)" if engine.passed else f"wrong ({wrong_vs_engine})"
        return f"{first}; {bwd} is {state}; {numeric.reason or error}"
    wrong = "; ".join(_brief(t, "numerical gradients") for t in numeric.failing())
    if engine.passed:
        return f"{first}; {bwd} is right (it matches the engine's gradients)"
    return f"{first}; {bwd} is wrong ({wrong})"


def _process(impl: UserImpl, timeout: float, max_memory: int | None) -> UserProcess:
    wanted = [n for n in (impl.binding.forward, impl.binding.backward) if n is not None]
    return UserProcess(impl.path, timeout=timeout, max_memory=max_memory, wanted=wanted)


def check_impl(
    impl: UserImpl,
    configs=None,
    *,
    seed: int = 0,
    tolerance: Tolerance | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    max_memory: int | None = None,
    progress=None,
    nondet_tol: float = 0.0,
    max_passes: int = DEFAULT_MAX_PASSES,
    arrays: LayerArrays | None = None,
    samples: int | None = None,
) -> list[ConfigResult]:
    """Check every configuration (default: ``impl.suite``), each in its own child process;
    ``progress(done, total)``. ``arrays`` (with one configuration) replace the random
    inputs; see :func:`check_config` for the other options.

    The next configuration's child is launched while one is being checked, so its start-up
    (Python and NumPy) overlaps the work instead of adding to it.
    """
    configs = impl.suite if configs is None else tuple(configs)

    def launched() -> UserProcess:
        process = _process(impl, timeout, max_memory)
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
                    nondet_tol=nondet_tol,
                    max_passes=max_passes,
                    arrays=arrays,
                    samples=samples,
                )
            )
            if progress is not None:
                progress(number, len(configs))
    finally:
        if upcoming is not None:
            upcoming.close()
    return results


def impl_config(shape, kernel, cout: int, spec: ConvSpec, adapter: Adapter | None = None) -> Config:
    """The one configuration given by parameters, in terms a signature can express.

    Parameters
    ----------
    shape : sequence of int
        x's shape, channels last: ``(n, *spatial, Cin)``.
    kernel : sequence of int
        One size, or one per spatial axis.
    cout : int
    spec : ConvSpec
        Stride, padding and dilation must be one integer each (symmetric padding), zero
        padding; dilation and groups other than 1 only for an adapter that has them. Its
        layout is not used (``shape`` is channels last).
    adapter : Adapter, optional
        The signature (default: classic).

    Raises
    ------
    UsageError
        When the parameters ask for something the signature cannot express; its ``param``
        names the first such parameter (shape, kernel, stride, padding, dilation, groups or
        padding_mode).
    """
    adapter = adapter or ADAPTERS["classic"]
    rank = len(shape) - 2
    if rank not in adapter.ranks:
        axes = " or ".join(f"{r}-D" for r in adapter.ranks)
        raise UsageError(
            f"{{param}} has {len(shape)} values: the {adapter.name} signature takes {axes} "
            "layers only",
            param="shape",
        )
    kernel = tuple(kernel) * rank if len(kernel) == 1 else tuple(kernel)
    if len(set(kernel)) > 1 and "nonsquare" not in adapter.features:
        raise UsageError(
            f"{{param}} {_shown(kernel)}: the {adapter.name} signature takes square kernels "
            "only; give one size",
            param="kernel",
        )
    stride, pad, dilation = _expressed(spec, rank, adapter, tuple(shape[1:-1]), kernel)
    config = Config(
        shape=tuple(shape),
        kernel=kernel,
        cout=cout,
        stride=stride,
        pad=pad,
        dilation=dilation,
        groups=spec.groups,
    )
    config.spec().geometry(config.shape, config.w_shape())
    return config


def _expressed(
    spec: ConvSpec, rank: int, adapter: Adapter, in_sizes: tuple[int, ...], kernel
) -> tuple[Step, Pad, Step]:
    """``(stride, pad, dilation)`` of ``spec`` as ``adapter`` takes them: one integer each
    (pad "same" or "valid" only with the "padding_forms" feature), or, with the "per_axis"
    feature, a tuple per axis where the axes differ (pad: ``(before, after)`` pairs).

    A padding word the adapter does not take ("same_lower" always, "same" without the
    "padding_forms" feature) is resolved for the layer's ``in_sizes`` and ``kernel``."""
    stride_axes, dilation_axes = spec.per_axis(rank)
    padding = spec.explicit_padding(rank)
    forms = ("same", "valid") if "padding_forms" in adapter.features else ()
    if isinstance(padding, str) and padding not in forms:
        padding = spec.resolve_padding(in_sizes, kernel)
    pads: set[int | str] = (
        {padding} if isinstance(padding, str) else {v for pair in padding for v in pair}
    )
    per_axis = "per_axis" in adapter.features
    one_integer = f"checking a user's implementation needs one integer, as in {_EXERCISE}"
    if len(set(stride_axes)) != 1 and not per_axis:
        raise UsageError(f"{{param}} {_shown(spec.stride)}: {one_integer}", param="stride")
    if len(pads) != 1 and not per_axis:
        raise UsageError(f"{{param}} {_shown(spec.padding)}: {one_integer}", param="padding")
    if len(set(dilation_axes)) != 1 and not per_axis:
        raise UsageError(f"{{param}} {_shown(spec.dilation)}: {one_integer}", param="dilation")
    wanted = {
        "stride": set(stride_axes) != {1},
        "padding": pads not in ({0}, {"valid"}),
        "dilation": set(dilation_axes) != {1},
        "groups": spec.groups != 1,
    }
    unsupported = [
        (param, value)
        for param, value in (
            ("dilation", spec.dilation),
            ("groups", spec.groups),
            ("stride", spec.stride),
            ("padding", spec.padding),
        )
        if wanted[param] and param not in adapter.accepted
    ]
    if spec.padding_mode != "zeros":
        unsupported.insert(0, ("padding_mode", spec.padding_mode))
    for param, value in unsupported:
        raise UsageError(
            f"{{param}} {_shown(value)}: the {adapter.name} signature has no {param} "
            f"(its functions take {', '.join(adapter.accepted) or 'no hyperparameters'})",
            param=param,
        )
    if len(pads) == 1:
        return _step(stride_axes), pads.pop(), _step(dilation_axes)
    if isinstance(padding, str):  # a form the adapter cannot take (refused above)
        raise UsageError(f"{{param}} {padding!r}: not resolved for this layer", param="padding")
    pairs = tuple((int(lo), int(hi)) for lo, hi in padding)
    return _step(stride_axes), pairs, _step(dilation_axes)


def _step(axes: tuple[int, ...]) -> Step:
    """One integer when every axis has it, else the tuple."""
    return int(axes[0]) if len(set(axes)) == 1 else tuple(int(a) for a in axes)


_EXERCISE = "the hparameters {'stride': s, 'pad': p}"


def _shown(value) -> str:
    """A parameter's value as the user wrote it: ``2``, ``1,2``, ``'same'``."""
    if isinstance(value, tuple) and all(isinstance(v, int) for v in value):
        return ",".join(map(str, value))
    return repr(value) if isinstance(value, str) else str(value)
