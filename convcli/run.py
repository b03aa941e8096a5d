"""One forward or backward run, in memory or streamed: the library behind ``forward``/``backward``.

:func:`run_forward` and :func:`run_backward` take the tensors of a layer (:class:`RunInputs`:
x, w, b and dz in the spec's layout), a :class:`~convcli.spec.ConvSpec` and
:class:`RunOptions`, and return a :class:`RunResult` holding every tensor with its role,
origin and summary statistics.

There is one pipeline. The batch is cut into blocks of images along its first axis and each
block goes through the same steps: read (and check for NaN/Inf), forward, upstream gradient,
backward, statistics, output rows; dw and db are summed over the blocks. A run whose tensors
are all in memory is one block. When x (or dz) is left on disk (a row source such as
:class:`~convcli.io.loading.DatasetRef`), the run is *streamed*: blocks are sized so that
they take half the workspace (:func:`convcli.memory.chunk_images`), each input file is read
through one handle and checked after every block to be the version that was loaded
(:meth:`~convcli.io.loading.OpenDataset.verify`), statistics are merged block by block
(:class:`~convcli.stats.RunningStats`) and the output rows go to an HDF5 file as they are
computed (through a temporary file renamed into place, as every output).

:func:`run_gradcheck` and :func:`run_impl_check` are the library behind ``gradcheck``.
"""

from __future__ import annotations

import contextlib
import os
import time
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from convcli.check import Tolerance, gradcheck
from convcli.check.adapters import Adapter
from convcli.check.gradients import DEFAULT_SAMPLES
from convcli.check.numgrad import DEFAULT_MAX_PASSES
from convcli.check.userimpl import Config, LayerArrays, check_impl, impl_config, load_impl
from convcli.check.userproc import DEFAULT_TIMEOUT, MAX_TIMEOUT
from convcli.engine.fast import DEFAULT_WORKSPACE, conv_backward, conv_forward, scratch_bytes
from convcli.engine.operands import (
    bias_shapes,
    check_finite,
    check_float_dtype,
    w_to_last,
    x_to_last,
)
from convcli.engine.reference import conv_backward_reference, conv_forward_reference
from convcli.errors import ConvcliNotice, HyperparameterError, ShapeError, UsageError
from convcli.hparams import build_spec
from convcli.io.loading import DatasetRef, FileIdentity, Headers, Loaded
from convcli.io.writing import (
    Hdf5Output,
    atomic_output,
    check_target,
    output_format,
    write_tensors,
)
from convcli.memory import (
    block_bytes,
    check_disk,
    check_memory,
    chunk_images,
    gradcheck_needs,
    in_memory_run_needs,
    nbytes,
    streamed_run_needs,
)
from convcli.spec import ConvSpec, Geometry
from convcli.stats import RunningStats, summarize

ENGINES = {
    "fast": (conv_forward, conv_backward),
    "reference": (conv_forward_reference, conv_backward_reference),
}
UPSTREAMS = ("z", "ones", "random")
Progress = Callable[[int, int], None]


class OpenRows(Protocol):
    """A row source held open for a whole run (see :class:`RowSource`)."""

    def read(self, start: int, stop: int) -> np.ndarray: ...

    def verify(self) -> None: ...

    def __enter__(self) -> OpenRows: ...

    def __exit__(self, *exc_info: object) -> None: ...


@runtime_checkable
class RowSource(Protocol):
    """A batch-sized tensor left on disk and read in blocks of its first axis.

    :class:`~convcli.io.loading.DatasetRef` is one. ``open(name)`` holds the file open for
    the run; its ``read(start, stop)`` returns rows ``start:stop`` and ``verify()`` refuses
    a file that changed since it was loaded. Indexing reads a part (for slices).
    """

    @property
    def shape(self) -> tuple[int, ...]: ...

    @property
    def dtype(self) -> np.dtype: ...

    @property
    def origin(self) -> str: ...

    def open(self, name: str | None = None) -> OpenRows: ...

    def __getitem__(self, index: Any) -> np.ndarray: ...


Batch = np.ndarray | RowSource  # x or dz: in memory, or rows on disk


@dataclass(frozen=True)
class Upstream:
    """How dz is made when none is given.

    ``mode``: ``"z"`` (dz = z, the loss ½‖z‖²), ``"ones"`` (the loss Σz) or ``"random"``
    (standard normal from a generator seeded with ``seed``). A generated dz's origin is this
    object (the command line shows it in its own words).
    """

    mode: str = "z"
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.mode not in UPSTREAMS:
            raise UsageError(
                f"{{param}} {self.mode!r}: choose from {', '.join(UPSTREAMS)}", param="upstream"
            )

    def generator(self) -> np.random.Generator:
        """A fresh generator for one run (seeded with ``seed``)."""
        return np.random.default_rng(self.seed)

    def gradient(self, z: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """dz for z (any shape; the dtype of z): z itself, ones, or standard normal from ``rng``.

        Called block by block with one ``rng``, it draws the same numbers as one call on the
        whole z.
        """
        if self.mode == "z":
            return z.copy()
        if self.mode == "ones":
            return np.ones_like(z)
        return rng.standard_normal(z.shape).astype(z.dtype)


@dataclass(frozen=True)
class RunOptions:
    """How to run: engine, budgets, output and checks (every field has a default).

    Attributes
    ----------
    engine : ``"fast"`` or ``"reference"``.
    workspace : scratch budget in bytes; a run whose x is bigger is streamed by the loader,
        and a streamed run keeps its blocks within half of it.
    threads : tiles processed in parallel by the fast engine (None: as many as BLAS threads).
    out : ``.npz`` or ``.h5`` path to write the outputs and hyperparameters to (atomically);
        HDF5 only for a streamed run.
    force : replace an existing ``out``.
    protect : files ``out`` must never be (the inputs).
    allow_nonfinite : run even when inputs hold NaN or Inf.
    max_memory : refuse, before it starts, a run estimated to need more bytes (None: no limit).
    upstream : how dz is made when none is given (backward).
    """

    engine: str = "fast"
    workspace: int = DEFAULT_WORKSPACE
    threads: int | None = None
    out: Path | None = None
    force: bool = False
    protect: tuple[Path, ...] = ()
    allow_nonfinite: bool = False
    max_memory: int | None = None
    upstream: Upstream = field(default_factory=Upstream)

    def __post_init__(self) -> None:
        engine_functions(self.engine)
        if self.out is not None:
            object.__setattr__(self, "out", Path(self.out))
        object.__setattr__(self, "protect", tuple(Path(p) for p in self.protect))


@dataclass(frozen=True, eq=False)  # arrays inside: compared by identity
class RunInputs:
    """The tensors of one run, in the spec's layout, and where each came from.

    Attributes
    ----------
    x : ndarray or RowSource
        ``(n, *spatial, Cin)`` channels last or ``(n, Cin, *spatial)`` channels first.
    w : ndarray
        ``(*kernel, Cin/groups, Cout)`` channels last or ``(Cout, Cin/groups, *kernel)``.
    b : ndarray, optional
        ``(Cout,)`` or broadcastable against z.
    dz : ndarray or RowSource, optional
        The upstream gradient, shape of z (backward only).
    origins : mapping of str to str
        Role -> where it came from (``"layer.h5:/x"``); "given" when absent (a row source
        names its own origin).
    """

    x: Batch
    w: np.ndarray
    b: np.ndarray | None = None
    dz: Batch | None = None
    origins: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def of(cls, arrays: Mapping[str, Any], origins: Mapping[str, str] | None = None) -> RunInputs:
        """From role -> array-like (``"x"``, ``"w"``, optional ``"b"``, ``"dz"``)."""

        def held(value: Any) -> Any:
            return value if value is None or isinstance(value, RowSource) else np.asarray(value)

        return cls(
            x=held(arrays["x"]),
            w=np.asarray(arrays["w"]),
            b=held(arrays.get("b")),
            dz=held(arrays.get("dz")),
            origins=dict(origins or {}),
        )

    @classmethod
    def from_loaded(cls, loaded: Loaded) -> RunInputs:
        """The tensors gathered from a command's files (:func:`convcli.io.loading.load_tensors`)."""
        return cls.of(loaded.arrays, loaded.origins)

    def given(self) -> dict[str, Batch]:
        """Role -> tensor for the tensors given, in the order x, w, b, dz."""
        values = {"x": self.x, "w": self.w, "b": self.b, "dz": self.dz}
        return {name: value for name, value in values.items() if value is not None}

    @property
    def streamed(self) -> bool:
        """True when x or dz is left on disk, to be read in blocks."""
        return isinstance(self.x, RowSource) or isinstance(self.dz, RowSource)

    def origin(self, name: str) -> str:
        """Where the tensor ``name`` came from."""
        value = self.given()[name]
        default = value.origin if isinstance(value, RowSource) else "given"
        return self.origins.get(name, default)


@dataclass(frozen=True, eq=False)  # arrays inside: compared by identity
class Tensor:
    """A tensor in a run: its data, role (``"input"`` or ``"output"``) and origin.

    ``array`` is an ndarray; for a streamed tensor, a :class:`RowSource` that reads it from
    disk, or None when it was not kept; ``stats`` then holds its streamed summary.
    ``origin`` is text (``"layer.h5:/x"``, ``"given"``, ``"computed"``) or, for a dz made
    by the run, the :class:`Upstream` that made it.
    """

    array: np.ndarray | RowSource | None
    role: str
    origin: str | Upstream
    stats: dict | None = None

    def summary(self) -> dict:
        """shape, dtype, nonfinite, mean, std, min, max (see :func:`convcli.stats.summarize`)."""
        return self.stats if self.stats is not None else self._summary

    @cached_property
    def _summary(self) -> dict:
        return summarize(np.asarray(self.array))


@dataclass(frozen=True, eq=False)  # arrays inside: compared by identity
class RunResult:
    """Everything a run produced: ``tensors`` in display order (inputs, then outputs).

    ``outputs`` names the tensors written to ``out``: ``("z",)`` forward, ``("dx", "dw")``
    or ``("dx", "dw", "db")`` backward. ``hparams`` are the resolved hyperparameters
    (:meth:`~convcli.spec.Geometry.hparams`); ``notices`` the distinct
    :class:`~convcli.errors.ConvcliNotice` messages raised on the way.
    """

    command: str
    engine: str
    hparams: dict
    tensors: dict[str, Tensor]
    seconds: float
    outputs: tuple[str, ...]
    notices: list[str] = field(default_factory=list)
    streamed: bool = False

    def arrays(self) -> dict[str, np.ndarray | RowSource]:
        """Name -> data for slices: arrays, or readers of streamed tensors on disk."""
        return {name: t.array for name, t in self.tensors.items() if t.array is not None}


def engine_functions(name: str) -> tuple[Callable[..., Any], Callable[..., Any]]:
    """(forward, backward) of the engine called ``name``."""
    if name not in ENGINES:
        raise UsageError(
            f"unknown {{param}} {name!r}; choose from {', '.join(ENGINES)}", param="engine"
        )
    return ENGINES[name]


def run_forward(
    inputs: RunInputs,
    spec: ConvSpec,
    options: RunOptions | None = None,
    progress: Progress | None = None,
) -> RunResult:
    """Run ``z = conv(x, w) + b`` on ``inputs`` (in ``spec.layout``); z is in the same layout.

    Parameters
    ----------
    inputs : RunInputs
        x ``(n, *spatial, Cin)`` and w ``(*kernel, Cin/groups, Cout)`` channels last, or
        ``(n, Cin, *spatial)`` and ``(Cout, Cin/groups, *kernel)`` channels first; b
        optional. float32/float64 (integers are computed in float64, with a notice).
    spec : ConvSpec
    options : RunOptions, optional
        ``out`` gets z and the hyperparameters.
    progress : callable, optional
        ``progress(done, total)`` after every block of images.

    Raises
    ------
    NonFiniteError
        NaN/Inf in an input, unless ``allow_nonfinite``.
    MemoryLimitError
        The run would need more than ``max_memory``; refused before it starts.
    DataError, UsageError, OutputError
        Bad tensors, options or output target (checked before any work).
    """
    return _run("forward", inputs, spec, options or RunOptions(), progress)


def run_backward(
    inputs: RunInputs,
    spec: ConvSpec,
    options: RunOptions | None = None,
    progress: Progress | None = None,
) -> RunResult:
    """Run forward, then backward for dz = ``inputs.dz`` (else made by ``options.upstream``).

    As :func:`run_forward`; dz has the shape of z, dx of x, dw of w and db of b (all in
    ``spec.layout``). ``out`` gets dx, dw and db.
    """
    return _run("backward", inputs, spec, options or RunOptions(), progress)


def tensor_shapes(
    command: str, geometry: Geometry, b_shape: tuple[int, ...] | None
) -> dict[str, tuple[int, ...]]:
    """Shape of every tensor of a ``command`` run as the caller sees it, in display order.

    Shapes are in the spec's layout (:meth:`~convcli.spec.Geometry.user_shapes`), never the
    engine's channels-last view. ``b_shape``: the shape b was given in, None without a bias.
    """
    user = geometry.user_shapes()
    shapes = {"x": user["x"], "w": user["w"]}
    if b_shape is not None:
        shapes["b"] = tuple(b_shape)
    shapes["z"] = user["z"]
    if command == "backward":
        shapes |= {"dz": user["z"], "dx": user["x"], "dw": user["w"]}
        if b_shape is not None:
            shapes["db"] = tuple(b_shape)
    return shapes


def check_shapes(
    command: str,
    shapes: Mapping[str, tuple[int, ...]],
    dtypes: Mapping[str, np.dtype],
    spec: ConvSpec,
) -> tuple[Geometry, dict[str, tuple[int, ...]]]:
    """Refuse, from shapes and dtypes alone, what a ``command`` run would refuse.

    Parameters
    ----------
    command : {"forward", "backward"}
    shapes : mapping of str to tuple of int
        ``x`` and ``w`` (required), ``b`` and ``dz`` (optional), in the spec's layout: x
        ``(n, *spatial, Cin)`` or ``(n, Cin, *spatial)``, b ``(Cout,)`` or broadcastable
        against z, dz the shape of z.
    dtypes : mapping of str to numpy.dtype
        The dtype of each tensor given (float32, float64 in any byte order, or integers).
    spec : ConvSpec

    Returns
    -------
    (Geometry, dict of str to tuple of int)
        The resolved geometry and :func:`tensor_shapes` of the run.

    Raises
    ------
    DtypeError, ShapeError, HyperparameterError
    """
    for name, dtype in dtypes.items():
        check_float_dtype(name, dtype)
    geometry = spec.geometry(tuple(shapes["x"]), tuple(shapes["w"]))
    b_shape = None if shapes.get("b") is None else tuple(shapes["b"])
    if b_shape is not None and b_shape not in bias_shapes(geometry):
        flat, full = bias_shapes(geometry)
        raise ShapeError(f"b has shape {b_shape}; expected {flat} or {full}")
    z_shape = geometry.user_shapes()["z"]
    dz_shape = None if shapes.get("dz") is None else tuple(shapes["dz"])
    if dz_shape is not None and dz_shape != z_shape:
        raise ShapeError(f"dz has shape {dz_shape}; the forward output z has shape {z_shape}")
    return geometry, tensor_shapes(command, geometry, b_shape)


def header_check(command: str, texts: Mapping[str, str | None]) -> Callable[[Headers], None]:
    """A ``check`` for :func:`~convcli.io.loading.load_tensors`: :func:`check_shapes` on the
    tensors' headers, with the spec the files' hyperparameters and ``texts`` (command-line
    hyperparameters, by library name; they win) give, before any data is read."""

    def check(headers: Headers) -> None:
        x = headers.shapes.get("x")
        spec = build_spec(headers.hparams, texts, None if x is None else len(x) - 2).spec
        check_shapes(command, headers.shapes, headers.dtypes, spec)

    return check


def expected_shapes(
    command: str, inputs: RunInputs, spec: ConvSpec, has_out: bool
) -> dict[str, tuple[int, ...] | None]:
    """Shape of every tensor a run will have, before running it (for checking slices).

    A tensor that a streamed run does not keep (and cannot read back) maps to None: z
    (forward: unless written to an output file) and dx without an output file, and dz when
    it is made block by block.
    """
    b = inputs.b
    geometry = spec.geometry(tuple(inputs.x.shape), tuple(inputs.w.shape))
    shapes: dict[str, tuple[int, ...] | None] = dict(
        tensor_shapes(command, geometry, None if b is None else tuple(b.shape))
    )
    if inputs.streamed:
        dropped = {
            "z": command == "backward" or not has_out,
            "dz": inputs.dz is None,
            "dx": not has_out,
        }
        for name, gone in dropped.items():
            if gone and name in shapes:
                shapes[name] = None
    return shapes


def notices_of(caught: Iterable[warnings.WarningMessage]) -> list[str]:
    """Distinct ConvcliNotice messages among caught warnings, in order."""
    messages = [str(w.message) for w in caught if issubclass(w.category, ConvcliNotice)]
    return list(dict.fromkeys(messages))


# -- the pipeline --------------------------------------------------------------------------


@dataclass(frozen=True)
class _Plan:
    """A checked run: its shapes, its blocks of images and the engine's budget."""

    command: str
    geometry: Geometry
    shapes: dict[str, tuple[int, ...]]
    blocks: tuple[tuple[int, int], ...]
    engine_workspace: int
    streamed: bool

    @property
    def backward(self) -> bool:
        return self.command == "backward"

    @property
    def written(self) -> str:
        """The batch-sized output written to the output file."""
        return "dx" if self.backward else "z"


def _run(
    command: str,
    inputs: RunInputs,
    spec: ConvSpec,
    options: RunOptions,
    progress: Progress | None,
) -> RunResult:
    forward, backward = engine_functions(options.engine)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvcliNotice)
        plan = _plan(command, inputs, spec, options)
        sink: _Sink = _StreamedSink(plan, options) if plan.streamed else _KeptSink(plan, options)
        with contextlib.ExitStack() as stack:
            sink.open(stack)
            rows = _open_rows(stack, inputs, options)
            start = time.perf_counter()
            totals = _Totals()
            rng = options.upstream.generator()
            for number, (first, stop) in enumerate(plan.blocks, start=1):
                x = rows["x"].read(first, stop)
                sink.add("x", x, first, stop)
                z, cache = forward(
                    x,
                    inputs.w,
                    inputs.b,
                    spec,
                    workspace=plan.engine_workspace,
                    threads=options.threads,
                )
                sink.add("z", z, first, stop)
                if plan.backward:
                    dz_rows = rows.get("dz")
                    if dz_rows is not None:
                        dz = dz_rows.read(first, stop)
                    else:
                        dz = options.upstream.gradient(z, rng)
                    sink.add("dz", dz, first, stop)
                    dx, dw, db = backward(dz, cache)
                    sink.add("dx", dx, first, stop)
                    totals.add(dw, db)
                if progress is not None:
                    progress(number, len(plan.blocks))
                for opened in rows.values():  # after every block, so after the last too
                    opened.verify()
            seconds = time.perf_counter() - start
            sink.finish(totals.arrays(), plan.geometry.hparams())
    return RunResult(
        command=command,
        engine=options.engine,
        hparams=plan.geometry.hparams(),
        tensors=_tensors(plan, inputs, options, sink, totals),
        seconds=seconds,
        outputs=("z",) if not plan.backward else ("dx", *totals.arrays()),
        notices=notices_of(caught),
        streamed=plan.streamed,
    )


def _plan(command: str, inputs: RunInputs, spec: ConvSpec, options: RunOptions) -> _Plan:
    """Check everything that can be checked before any work; cut the batch into blocks.

    In order: the output target, dtypes, NaN/Inf in the tensors held in memory (streamed
    rows are checked as they are read), shapes and hyperparameters, memory.
    """
    streamed = inputs.streamed
    _check_out(inputs, options)
    given = inputs.given()
    for name, value in given.items():
        check_float_dtype(name, value.dtype)
    if not options.allow_nonfinite:
        for name, value in given.items():
            if not isinstance(value, RowSource):
                check_finite(name, value)
    considered = {name: v for name, v in given.items() if command == "backward" or name != "dz"}
    geometry, shapes = check_shapes(
        command,
        {name: tuple(value.shape) for name, value in considered.items()},
        {name: value.dtype for name, value in considered.items()},
        spec,
    )
    dtype = compute_dtype(value.dtype for name, value in given.items() if name != "dz")
    backward = command == "backward"
    workspace = options.workspace
    if streamed:
        weights = inputs.w.nbytes + (0 if inputs.b is None else inputs.b.nbytes)
        per_block = chunk_images(geometry, dtype, workspace, backward)
        block = block_bytes(geometry, dtype, per_block, backward)
        check_memory(
            streamed_run_needs(weight_bytes=weights, workspace=workspace, block_bytes=block),
            options.max_memory,
        )
        engine_workspace = max(1, workspace - workspace // 2)
    else:
        needs = in_memory_run_needs(
            geometry,
            dtype,
            input_bytes=sum(np.asarray(value).nbytes for value in given.values()),
            scratch=scratch_bytes(geometry, dtype, workspace, options.threads),
            backward=backward,
        )
        check_memory(needs, options.max_memory)
        per_block, engine_workspace = max(1, geometry.n), workspace
    if options.out is not None:
        check_disk(options.out, _output_bytes(command, shapes, dtype))
    blocks = tuple((i, min(i + per_block, geometry.n)) for i in range(0, geometry.n, per_block))
    return _Plan(command, geometry, shapes, blocks or ((0, 0),), engine_workspace, streamed)


def _output_bytes(
    command: str, shapes: Mapping[str, tuple[int, ...]], dtype: np.dtype
) -> dict[str, int]:
    """The tensors written to the output file, by name: z (forward) or dx, dw, db."""
    written = ("z",) if command == "forward" else ("dx", "dw", "db")
    return {name: nbytes(shapes[name], dtype) for name in written if name in shapes}


def compute_dtype(dtypes: Iterable[np.dtype]) -> np.dtype:
    """The dtype the engine computes in (integers count as float64)."""
    floats = [np.float64 if np.dtype(d).kind in "iu" else np.dtype(d) for d in dtypes]
    return np.result_type(*floats)


def _check_out(inputs: RunInputs, options: RunOptions) -> None:
    """Refuse a bad output target before any work is done."""
    out = options.out
    if out is None:
        return
    if output_format(out) != "hdf5" and inputs.streamed:
        name = "x" if isinstance(inputs.x, RowSource) else "dz"
        raise UsageError(
            f"{{param}} {out}: {name} is streamed from disk (larger than the workspace), so "
            "outputs are written chunk by chunk to HDF5; use {param} FILE.h5",
            param="out",
        )
    check_target(out, force=options.force, protect=options.protect)


class _Rows:
    """Blocks of x or dz: slices of an array, or reads through an open row source (checked
    for NaN/Inf as they are read, and for a changed file after every block)."""

    def __init__(self, name: str, data: np.ndarray | OpenRows, check: bool):
        self.name = name
        self.data = data
        self.check = check

    def read(self, start: int, stop: int) -> np.ndarray:
        if isinstance(self.data, np.ndarray):
            return self.data[start:stop]
        rows = self.data.read(start, stop)
        if self.check:
            check_finite(f"{self.name} (images {start}-{stop - 1})", rows, offset=start)
        return rows

    def verify(self) -> None:
        if not isinstance(self.data, np.ndarray):
            self.data.verify()


def _open_rows(
    stack: contextlib.ExitStack, inputs: RunInputs, options: RunOptions
) -> dict[str, _Rows]:
    """x and dz as blocks; each row source is opened once, for the whole run."""
    rows = {}
    for name, value in (("x", inputs.x), ("dz", inputs.dz)):
        if value is None:
            continue
        data = stack.enter_context(value.open(name)) if isinstance(value, RowSource) else value
        rows[name] = _Rows(name, data, check=not options.allow_nonfinite)
    return rows


class _Totals:
    """dw and db summed over the blocks."""

    def __init__(self) -> None:
        self.dw: np.ndarray | None = None
        self.db: np.ndarray | None = None

    def add(self, dw: np.ndarray, db: np.ndarray | None) -> None:
        self.dw = dw if self.dw is None else self.dw + dw
        if db is not None:
            self.db = db if self.db is None else self.db + db

    def arrays(self) -> dict[str, np.ndarray]:
        """``{"dw", "db"}`` as far as computed (none for a forward run)."""
        return {name: a for name, a in (("dw", self.dw), ("db", self.db)) if a is not None}


class _Sink(Protocol):
    """Where the batch-sized tensors of a run go, block by block."""

    def open(self, stack: contextlib.ExitStack) -> None: ...

    def add(self, name: str, rows: np.ndarray, start: int, stop: int) -> None: ...

    def finish(self, totals: Mapping[str, np.ndarray], hparams: dict) -> None: ...

    def tensor(
        self, name: str, role: str, origin: str | Upstream, source: Any = None
    ) -> Tensor: ...


class _KeptSink:
    """In memory: blocks are kept (one block: the engine's array itself); the output file,
    if any, is written at the end (:func:`~convcli.io.writing.write_tensors`)."""

    def __init__(self, plan: _Plan, options: RunOptions):
        self.plan = plan
        self.options = options
        self.blocks: dict[str, list[np.ndarray]] = {}

    def open(self, stack: contextlib.ExitStack) -> None:
        pass

    def add(self, name: str, rows: np.ndarray, start: int, stop: int) -> None:
        self.blocks.setdefault(name, []).append(rows)

    def finish(self, totals: Mapping[str, np.ndarray], hparams: dict) -> None:
        out = self.options.out
        if out is not None:
            outputs = {self.plan.written: self._array(self.plan.written), **totals}
            write_tensors(
                out, outputs, hparams, force=self.options.force, protect=self.options.protect
            )

    def tensor(self, name: str, role: str, origin: str | Upstream, source: Any = None) -> Tensor:
        array = self._array(name) if source is None else source
        return Tensor(np.asarray(array), role, origin)

    def _array(self, name: str) -> np.ndarray:
        blocks = self.blocks[name]
        return blocks[0] if len(blocks) == 1 else np.concatenate(blocks)


class _StreamedSink:
    """Streamed: statistics merged block by block, the written output's rows going straight
    into the HDF5 output file (a temporary file until the run succeeds)."""

    def __init__(self, plan: _Plan, options: RunOptions):
        self.plan = plan
        self.out = options.out
        self.stats: dict[str, RunningStats] = {}
        self.output: Hdf5Output | None = None

    def open(self, stack: contextlib.ExitStack) -> None:
        if self.out is not None:
            fd, _ = stack.enter_context(atomic_output(self.out))
            self.output = stack.enter_context(Hdf5Output(fd))

    def add(self, name: str, rows: np.ndarray, start: int, stop: int) -> None:
        if name not in self.stats:
            self.stats[name] = RunningStats(self.plan.shapes[name], rows.dtype)
        self.stats[name].update(rows)
        if self.output is not None and name == self.plan.written:
            # a full disk raises here, stopping the run at the first block it cannot hold
            self.output.write_rows(name, self.plan.shapes[name], start, rows)

    def finish(self, totals: Mapping[str, np.ndarray], hparams: dict) -> None:
        if self.output is not None:
            for name, array in totals.items():
                self.output.create(name, array)
            self.output.attrs(hparams)

    def tensor(self, name: str, role: str, origin: str | Upstream, source: Any = None) -> Tensor:
        if source is None and name == self.plan.written:
            source = self._written()
        return Tensor(source, role, origin, self.stats[name].summary())

    def _written(self) -> DatasetRef | None:
        """The written output, read back from the output file (once it is in place)."""
        if self.out is None:
            return None
        name = self.plan.written
        stats = self.stats[name]
        return DatasetRef(
            path=self.out.resolve(),
            key=f"/{name}",
            shape=stats.shape,
            dtype=stats.dtype,
            origin=f"{self.out}:/{name}",
            identity=FileIdentity.of(self.out.stat()),
        )


def _tensors(
    plan: _Plan, inputs: RunInputs, options: RunOptions, sink: _Sink, totals: _Totals
) -> dict[str, Tensor]:
    """Every tensor of the run, in display order: x, w, b, z, then dz, dx, dw, db."""
    tensors = {"x": sink.tensor("x", "input", inputs.origin("x"), inputs.x)}
    tensors["w"] = Tensor(inputs.w, "input", inputs.origin("w"))
    if inputs.b is not None:
        tensors["b"] = Tensor(inputs.b, "input", inputs.origin("b"))
    tensors["z"] = sink.tensor("z", "output", "computed")
    if plan.backward:
        if inputs.dz is not None:
            tensors["dz"] = sink.tensor("dz", "input", inputs.origin("dz"), inputs.dz)
        else:
            tensors["dz"] = sink.tensor("dz", "input", options.upstream)
        tensors["dx"] = sink.tensor("dx", "output", "computed")
        for name, array in totals.arrays().items():
            tensors[name] = Tensor(array, "output", "computed")
    return tensors


# -- gradient checks -----------------------------------------------------------------------


@dataclass
class GradcheckRun:
    """One or more gradient checks, as the ``gradcheck`` command reports them.

    ``results`` holds ``(config, GradcheckResult or None, error or None)`` per configuration;
    for a user implementation, ``impl_results`` holds a
    :class:`~convcli.check.userimpl.ConfigResult` each.
    """

    mode: str
    results: list
    seconds: float
    notices: list[str] = field(default_factory=list)
    impl: str | None = None
    impl_results: list = field(default_factory=list)
    tolerance: Tolerance | None = (
        None  # of a user-implementation run (engine checks carry their own)
    )
    signature: str | None = None  # of a user-implementation run: classic, cs231n or callable
    forward_only: bool = False

    @property
    def hints(self) -> list[str]:
        """Hints for classic mistakes, each once per run (user-implementation runs)."""
        return list(dict.fromkeys(h for result in self.impl_results for h in result.hints))

    @property
    def passed(self) -> bool:
        return all(
            error is None and check is not None and check.passed for _, check, error in self.results
        ) and all(result.passed for result in self.impl_results)

    @property
    def forward_passes(self) -> int:
        return sum(check.forward_passes for _, check, _ in self.results if check is not None) + sum(
            result.forward_passes for result in self.impl_results
        )


def run_gradcheck(
    inputs: RunInputs,
    spec: ConvSpec,
    *,
    upstream: Upstream | None = None,
    progress: Progress | None = None,
    max_memory: int | None = None,
    **options: Any,
) -> GradcheckRun:
    """Gradient-check convcli's engine on x, w, b (and dz if given), in float64.

    ``inputs`` are in memory, in ``spec.layout`` (see :class:`RunInputs`). g (the upstream
    gradient) is ``inputs.dz`` when given, else made by ``upstream`` (default: random, seed
    None); the check's own random choices are seeded with ``upstream.seed`` (0 when None).
    A check estimated to need more than ``max_memory`` bytes
    (:func:`~convcli.memory.gradcheck_needs`) is refused before it starts. ``options`` go to
    :func:`convcli.check.gradcheck` (mode, samples, probes, tolerance).
    """
    upstream = upstream or Upstream("random")
    if inputs.streamed:
        raise UsageError("gradcheck needs x and dz in memory, not read from disk in blocks")
    x = np.asarray(inputs.x)
    geometry = spec.geometry(tuple(x.shape), tuple(np.shape(inputs.w)))
    given = sum(np.asarray(value).nbytes for value in inputs.given().values())
    scratch = scratch_bytes(geometry, np.dtype(np.float64), DEFAULT_WORKSPACE)
    check_memory(gradcheck_needs(geometry, input_bytes=given, scratch=scratch), max_memory)
    notices = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvcliNotice)
        z, cache = conv_forward(x, inputs.w, inputs.b, spec)
    notices += notices_of(caught)
    if cache.dtype != np.float64:
        notices.append(f"gradcheck runs in float64: inputs upcast from {cache.dtype}")
    geometry = cache.geometry
    g = inputs.dz
    if g is None:
        g = upstream.gradient(z.astype(np.float64), upstream.generator())
    elif np.shape(g) != geometry.user_out_shape:
        raise ShapeError(
            f"dz has shape {np.shape(g)}; the forward output z has shape {geometry.user_out_shape}"
        )
    b = inputs.b
    start = time.perf_counter()
    check = gradcheck(  # in the caller's layout; float64 (cache.x is channels last)
        x.astype(np.float64, copy=False),
        np.asarray(inputs.w, dtype=np.float64),
        None if b is None else np.asarray(b).reshape(-1),
        spec,
        upstream=np.asarray(g, dtype=np.float64),
        seed=0 if upstream.seed is None else upstream.seed,
        progress=progress,
        **options,
    )
    hparams = geometry.hparams()
    config = {
        "shape": list(x.shape),  # as given (channels first for nchw)
        "kernel": list(geometry.kernel),
        "cout": geometry.cout,
        **{k: v for k, v in hparams.items() if k != "padding"},
        "pad": hparams["padding"],
    }
    return GradcheckRun(
        mode=check.mode,
        results=[(config, check, None)],
        seconds=time.perf_counter() - start,
        notices=notices + check.notes,
    )


@dataclass(frozen=True)
class ImplLayer:
    """The one layer to check a user's implementation on, instead of the suite.

    Either generated (``shape`` ``(n, *spatial, Cin)`` in ``spec.layout``, ``kernel`` sizes,
    ``cout``) or given (``inputs``: x, w, optional b and dz in ``spec.layout``, as loaded from a
    data file); ``spec`` holds the hyperparameters.
    """

    spec: ConvSpec
    shape: tuple[int, ...] | None = None
    kernel: tuple[int, ...] | None = None
    cout: int | None = None
    inputs: RunInputs | None = None


IMPL_MODES = {
    "auto": DEFAULT_MAX_PASSES,
    "exhaustive": DEFAULT_MAX_PASSES,
    "sample": DEFAULT_MAX_PASSES,
    "fast": 0,
}


def run_impl_check(
    path: str | os.PathLike[str],
    configs: Iterable[Any] | None = None,
    *,
    seed: int | None = None,
    progress: Progress | None = None,
    tolerance: Tolerance | None = None,
    timeout: float | None = None,
    max_memory: int | None = None,
    signature: str | None = None,
    layout: str = "nhwc",
    layer: ImplLayer | None = None,
    mode: str = "auto",
    nondet_tol: float = 0.0,
    samples: int = DEFAULT_SAMPLES,
) -> GradcheckRun:
    """Check the user's functions in ``path`` (``FILE.py`` or ``FILE.py:FORWARD[,BACKWARD]``,
    see :func:`~convcli.check.userimpl.load_impl` for ``signature`` and ``layout``) on
    ``configs`` (default: what the signature can express,
    :func:`~convcli.check.userimpl.suite_for`) or on ``layer``, each configuration in its own
    child process limited to ``timeout`` seconds and ``max_memory`` bytes.

    ``mode`` "auto" or "exhaustive" checks the backward against numerical gradients of the
    user's forward at every element; "sample" at ``samples`` random elements of each of x,
    w and b (two forward passes each); "fast" leaves that check out (the engine comparisons
    and the extra checks remain). ``nondet_tol``: the largest difference allowed between two
    backward calls on the same inputs (0: bit-identical).
    """
    timeout = DEFAULT_TIMEOUT if timeout is None else timeout
    if not 0 < timeout <= MAX_TIMEOUT:
        raise UsageError(
            f"{{param}} {timeout:g}: must be a number of seconds > 0 and at most {MAX_TIMEOUT:,}",
            param="timeout",
        )
    if mode not in IMPL_MODES:
        raise UsageError(
            f"{{param}} {mode!r}: checking a user's implementation takes {', '.join(IMPL_MODES)}",
            param="mode",
        )
    if mode == "sample" and not 1 <= 6 * samples <= IMPL_MODES["sample"]:
        raise UsageError(
            f"{{param}} {samples}: sampling calls the forward twice per element of x, w and b; "
            f"allowed: 1 to {IMPL_MODES['sample'] // 6:,} elements per tensor",
            param="samples",
        )
    if not (0 <= nondet_tol < float("inf")):
        raise UsageError(f"{{param}} {nondet_tol:g}: must be >= 0", param="nondet_tol")
    if layer is not None and layer.spec.transposed:
        raise HyperparameterError(
            "a user's implementation is checked as a convolution, and this layer is a "
            "transposed convolution (transposed = 1); check it with convcli's engine instead",
            param="transposed",
        )
    impl = load_impl(path, timeout=timeout, signature=signature, layout=layout)
    arrays = None
    if layer is not None:
        configs, arrays = _impl_layer(layer, impl.binding.adapter)
    tolerance = tolerance or Tolerance()
    start = time.perf_counter()
    results = check_impl(
        impl,
        configs,
        seed=0 if seed is None else seed,
        tolerance=tolerance,
        timeout=timeout,
        max_memory=max_memory,
        progress=progress,
        nondet_tol=nondet_tol,
        max_passes=IMPL_MODES[mode],
        arrays=arrays,
        samples=samples if mode == "sample" else None,
    )
    return GradcheckRun(
        mode=mode if mode in ("fast", "sample") else "exhaustive",
        results=[],
        seconds=time.perf_counter() - start,
        impl=str(path),
        impl_results=results,
        tolerance=tolerance,
        signature=impl.binding.adapter.name,
        forward_only=impl.forward_only,
    )


def _impl_layer(layer: ImplLayer, adapter: Adapter) -> tuple[list[Config], LayerArrays | None]:
    """The configuration of ``layer`` (channels last) and its arrays when given."""
    spec = layer.spec
    inputs = layer.inputs
    if inputs is None:
        if layer.shape is None or layer.kernel is None or layer.cout is None:
            raise UsageError("a layer needs a shape, kernel and cout, or its arrays")
        shape = tuple(x_to_last(np.empty(layer.shape, np.uint8), spec.layout).shape)
        config = impl_config(shape, layer.kernel, layer.cout, spec, adapter)
        return [config], None
    if inputs.streamed:
        raise UsageError("checking a user's implementation needs x in memory")
    x = x_to_last(np.asarray(inputs.x, dtype=np.float64), spec.layout)
    w = w_to_last(np.asarray(inputs.w, dtype=np.float64), spec.layout)
    rank = x.ndim - 2
    config = impl_config(x.shape, w.shape[:rank], int(w.shape[-1]), spec, adapter)
    geometry = config.spec().geometry(x.shape, config.w_shape())
    if tuple(w.shape) != config.w_shape():
        raise ShapeError(f"w has shape {w.shape}; x of shape {x.shape} needs {config.w_shape()}")
    b = np.zeros(config.cout) if inputs.b is None else np.asarray(inputs.b, np.float64)
    g = None
    if inputs.dz is not None:
        g = x_to_last(np.asarray(inputs.dz, dtype=np.float64), spec.layout)
        if g.shape != geometry.out_shape:
            raise ShapeError(f"dz has shape {g.shape}; z has shape {geometry.out_shape}")
    return [config], LayerArrays(x=x, w=w, b=b.reshape(-1), g=g)
