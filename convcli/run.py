"""One forward or backward run: the library behind ``convcli forward`` / ``convcli backward``.

Takes arrays (x, w, b, optional dz, in the spec's layout) and a :class:`ConvSpec`, runs an engine,
writes the outputs when asked (``out``), and returns a :class:`RunResult` holding every
tensor with its role, origin and summary statistics. When x is an HDF5 dataset left on disk
(:class:`~convcli.io.loading.DatasetRef`), the run streams it: see :mod:`convcli.streaming`.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field

import numpy as np

from convcli.engine.fast import DEFAULT_WORKSPACE, conv_backward, conv_forward, scratch_bytes
from convcli.engine.reference import conv_backward_reference, conv_forward_reference
from convcli.errors import ConvcliNotice, UsageError
from convcli.spec import ConvSpec, Geometry
from convcli.stats import summarize

ENGINES = {
    "fast": (conv_forward, conv_backward),
    "reference": (conv_forward_reference, conv_backward_reference),
}
UPSTREAMS = ("z", "ones", "random")


@dataclass
class Tensor:
    """A tensor in a run: its data, role ("input" or "output") and where it came from.

    ``array`` is an ndarray, or for a streamed tensor something indexable that reads from
    disk (or None when it was not kept); ``stats`` then holds its streamed summary.
    """

    array: object
    role: str
    origin: str
    stats: dict | None = None

    def summary(self) -> dict:
        """shape, dtype, mean, std, min, max (see :func:`convcli.stats.summarize`)."""
        if self.stats is None:
            self.stats = summarize(self.array)
        return self.stats


@dataclass
class RunResult:
    """Everything a run produced, in display order (inputs first)."""

    command: str
    engine: str
    hparams: dict
    tensors: dict[str, Tensor]
    seconds: float
    outputs: tuple[str, ...]
    notices: list[str] = field(default_factory=list)
    streamed: bool = False

    def arrays(self) -> dict:
        """Name -> data for ``--slice``: arrays, or readers of streamed tensors on disk."""
        return {name: t.array for name, t in self.tensors.items() if t.array is not None}


def engine_functions(name: str):
    """(forward, backward) of the engine called ``name``."""
    if name not in ENGINES:
        raise UsageError(f"unknown engine {name!r}; choose from {', '.join(ENGINES)}")
    return ENGINES[name]


def _is_streamed(arrays) -> bool:
    from convcli.io.loading import DatasetRef

    return isinstance(arrays.get("x"), DatasetRef)


def run_forward(
    arrays: dict,
    spec: ConvSpec,
    *,
    engine: str = "fast",
    origins: dict[str, str] | None = None,
    workspace: int = DEFAULT_WORKSPACE,
    threads: int | None = None,
    out=None,
    force: bool = False,
    protect=(),
    progress=None,
    allow_nonfinite: bool = False,
    max_memory: int | None = None,
) -> RunResult:
    """Run ``z = conv(x, w) + b``; ``arrays`` holds x, w and b in ``spec.layout``.

    x is ``(n, *spatial, Cin)`` and w ``(*kernel, Cin/groups, Cout)`` channels last, or
    ``(n, Cin, *spatial)`` and ``(Cout, Cin/groups, *kernel)`` channels first; every tensor
    of the result (z, and its statistics) is in the same layout.

    ``out``: a ``.npz`` or ``.h5`` path to write z and the hyperparameters to (atomically;
    an existing file only with ``force``; never one of ``protect``). NaN/Inf in the inputs
    are refused unless ``allow_nonfinite``; a run whose inputs, outputs and workspace would
    exceed ``max_memory`` bytes is refused before it starts.
    """
    if _is_streamed(arrays):
        from convcli.streaming import stream_run

        return stream_run(
            "forward",
            arrays,
            spec,
            engine=engine,
            origins=origins,
            workspace=workspace,
            threads=threads,
            out=out,
            force=force,
            protect=protect,
            progress=progress,
            allow_nonfinite=allow_nonfinite,
            max_memory=max_memory,
        )
    forward, _ = engine_functions(engine)
    origins = origins or {}
    _check_out(out, force, protect)
    _check_inputs(arrays, spec, workspace, max_memory, allow_nonfinite, backward=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvcliNotice)
        start = time.perf_counter()
        z, cache = forward(
            arrays["x"], arrays["w"], arrays.get("b"), spec, workspace=workspace, threads=threads
        )
        seconds = time.perf_counter() - start
    tensors = _inputs(arrays, ("x", "w", "b"), origins)
    tensors["z"] = Tensor(z, "output", "computed")
    result = RunResult(
        command="forward",
        engine=engine,
        hparams=cache.geometry.hparams(),
        tensors=tensors,
        seconds=seconds,
        outputs=("z",),
        notices=notices_of(caught),
    )
    _write(result, out, force, protect)
    return result


def run_backward(
    arrays: dict,
    spec: ConvSpec,
    *,
    engine: str = "fast",
    upstream: str = "z",
    seed: int | None = None,
    origins: dict[str, str] | None = None,
    workspace: int = DEFAULT_WORKSPACE,
    threads: int | None = None,
    out=None,
    force: bool = False,
    protect=(),
    progress=None,
    allow_nonfinite: bool = False,
    max_memory: int | None = None,
) -> RunResult:
    """Run forward then backward; dz is ``arrays["dz"]`` when present, else from ``upstream``.

    ``upstream``: ``"z"`` (dz = z, the loss ½‖z‖²), ``"ones"`` (loss Σz) or ``"random"``
    (standard normal, seeded by ``seed``). ``out``, ``allow_nonfinite`` and ``max_memory``
    as in :func:`run_forward`; ``out`` gets dx, dw, db.
    """
    if upstream not in UPSTREAMS:
        raise UsageError(f"--upstream {upstream!r}: choose from {', '.join(UPSTREAMS)}")
    if _is_streamed(arrays):
        from convcli.streaming import stream_run

        return stream_run(
            "backward",
            arrays,
            spec,
            engine=engine,
            upstream=upstream,
            seed=seed,
            origins=origins,
            workspace=workspace,
            threads=threads,
            out=out,
            force=force,
            protect=protect,
            progress=progress,
            allow_nonfinite=allow_nonfinite,
            max_memory=max_memory,
        )
    forward, backward = engine_functions(engine)
    origins = dict(origins or {})
    _check_out(out, force, protect)
    _check_inputs(arrays, spec, workspace, max_memory, allow_nonfinite, backward=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvcliNotice)
        start = time.perf_counter()
        z, cache = forward(
            arrays["x"], arrays["w"], arrays.get("b"), spec, workspace=workspace, threads=threads
        )
        dz = arrays.get("dz")
        if dz is None:
            dz = upstream_gradient(z, upstream, np.random.default_rng(seed))
            origins["dz"] = upstream_origin(upstream, seed)
        dx, dw, db = backward(dz, cache)
        seconds = time.perf_counter() - start
    tensors = _inputs(arrays, ("x", "w", "b"), origins)
    tensors["z"] = Tensor(z, "output", "computed")
    tensors["dz"] = Tensor(np.asarray(dz), "input", origins.get("dz", "given"))
    for name, value in zip(("dx", "dw", "db"), (dx, dw, db), strict=True):
        if value is not None:
            tensors[name] = Tensor(value, "output", "computed")
    result = RunResult(
        command="backward",
        engine=engine,
        hparams=cache.geometry.hparams(),
        tensors=tensors,
        seconds=seconds,
        outputs=("dx", "dw") if db is None else ("dx", "dw", "db"),
        notices=notices_of(caught),
    )
    _write(result, out, force, protect)
    return result


def tensor_shapes(command: str, geometry: Geometry, b_shape: tuple | None) -> dict:
    """Shape of every tensor of a ``command`` run as the caller sees it, in display order.

    Both pipelines (in memory and streamed) take their shapes from here, in the spec's
    layout (:meth:`~convcli.spec.Geometry.user_shapes`), never from the engine's
    channels-last view. ``b_shape``: the shape b was given in, None without a bias.
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


def expected_shapes(command: str, arrays: dict, spec: ConvSpec, has_out: bool) -> dict:
    """Shape of every tensor a run will have, before running it (for checking --slice).

    A tensor that a streamed run does not keep (and cannot read back) maps to None: z and
    dx unless written to ``--out`` (forward's z), z in backward, and dz when it is made
    block by block from ``--upstream``.
    """
    x, w, b = arrays["x"], arrays["w"], arrays.get("b")
    geometry = spec.geometry(tuple(x.shape), tuple(np.shape(w)))
    shapes = tensor_shapes(command, geometry, None if b is None else np.shape(b))
    if _is_streamed(arrays):
        passed_through = {
            "z": command == "backward" or not has_out,
            "dz": arrays.get("dz") is None,
            "dx": not has_out,
        }
        for name, dropped in passed_through.items():
            if dropped and name in shapes:
                shapes[name] = None
    return shapes


def _check_inputs(arrays, spec, workspace, max_memory, allow_nonfinite, *, backward) -> None:
    """Refuse NaN/Inf inputs (unless allowed) and runs that would not fit in max_memory."""
    from convcli.engine.operands import check_finite, check_float_dtype
    from convcli.memory import check_memory, nbytes

    for name in ("x", "w", "b", "dz"):
        if arrays.get(name) is not None:
            check_float_dtype(name, np.asarray(arrays[name]).dtype)
    if not allow_nonfinite:
        for name in ("x", "w", "b", "dz"):
            if arrays.get(name) is not None:
                check_finite(name, arrays[name])
    x, w = np.asarray(arrays["x"]), np.asarray(arrays["w"])
    geometry = spec.geometry(x.shape, w.shape)
    dtype = np.result_type(*(np.float64 if a.dtype.kind in "iu" else a.dtype for a in (x, w)))
    needs = {
        "inputs": sum(np.asarray(a).nbytes for a in arrays.values() if a is not None),
        "outputs": nbytes(geometry.out_shape, dtype)
        * (2 if backward else 1),  # z (and dz when it is made)
        "workspace": scratch_bytes(geometry, dtype, workspace),
    }
    if backward:
        needs["gradients"] = nbytes(x.shape, dtype) + nbytes(w.shape, dtype)
    check_memory(needs, max_memory)


def _check_out(out, force: bool, protect) -> None:
    """Refuse a bad --out before any work is done."""
    if out is not None:
        from pathlib import Path

        from convcli.io.writing import check_target, output_format

        output_format(Path(out))
        check_target(Path(out), force=force, protect=protect)


def _write(result: RunResult, out, force: bool, protect) -> None:
    if out is not None:
        from convcli.io.writing import write_tensors

        outputs = {name: result.tensors[name].array for name in result.outputs}
        write_tensors(out, outputs, result.hparams, force=force, protect=protect)


def upstream_origin(mode: str, seed: int | None) -> str:
    return f"--upstream {mode}" + (f" --seed {seed}" if mode == "random" else "")


def upstream_gradient(z: np.ndarray, mode: str, rng: np.random.Generator) -> np.ndarray:
    """dz for ``--upstream``: z itself, ones, or standard normal from ``rng`` (dtype of z).

    Streamed runs call this per chunk with one ``rng``, which draws the same numbers as one
    call on the whole z.
    """
    if mode == "z":
        return z.copy()
    if mode == "ones":
        return np.ones_like(z)
    return rng.standard_normal(z.shape).astype(z.dtype)


def _inputs(arrays, names, origins) -> dict[str, Tensor]:
    return {
        name: Tensor(np.asarray(arrays[name]), "input", origins.get(name, "given"))
        for name in names
        if arrays.get(name) is not None
    }


def notices_of(caught) -> list[str]:
    """Distinct ConvcliNotice messages among caught warnings, in order."""
    messages = [str(w.message) for w in caught if issubclass(w.category, ConvcliNotice)]
    return list(dict.fromkeys(messages))


@dataclass
class GradcheckRun:
    """One or more gradient checks, as the ``gradcheck`` command reports them.

    ``results`` holds ``(config, GradcheckResult or None, error or None)`` per configuration;
    with ``--impl``, ``impl_results`` holds a :class:`~convcli.check.userimpl.ConfigResult` each.
    """

    mode: str
    results: list
    seconds: float
    notices: list[str] = field(default_factory=list)
    impl: str | None = None
    impl_results: list = field(default_factory=list)
    tolerance: object = None  # the Tolerance of an --impl run (engine checks carry their own)

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
    arrays: dict[str, np.ndarray],
    spec: ConvSpec,
    *,
    upstream: str = "random",
    seed: int | None = None,
    progress=None,
    **options,
) -> GradcheckRun:
    """Gradient-check convcli's engine on x, w, b (and dz if given), in float64.

    ``options`` go to :func:`convcli.check.gradients.gradcheck` (mode, samples, probes, tolerance).
    """
    from convcli.check.gradients import gradcheck

    if upstream not in UPSTREAMS:
        raise UsageError(f"--upstream {upstream!r}: choose from {', '.join(UPSTREAMS)}")
    notices = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvcliNotice)
        z, cache = conv_forward(arrays["x"], arrays["w"], arrays.get("b"), spec)
    notices += notices_of(caught)
    if cache.dtype != np.float64:
        notices.append(f"gradcheck runs in float64: inputs upcast from {cache.dtype}")
    geometry = cache.geometry
    g = arrays.get("dz")
    if g is None:
        g = upstream_gradient(z.astype(np.float64), upstream, np.random.default_rng(seed))
    elif np.shape(g) != geometry.user_out_shape:
        from convcli.errors import ShapeError

        raise ShapeError(
            f"dz has shape {np.shape(g)}; the forward output z has shape {geometry.user_out_shape}"
        )
    b = arrays.get("b")
    start = time.perf_counter()
    check = gradcheck(  # in the caller's layout; float64 (cache.x is channels last)
        np.asarray(arrays["x"], dtype=np.float64),
        np.asarray(arrays["w"], dtype=np.float64),
        None if b is None else np.asarray(b).reshape(-1),
        spec,
        upstream=np.asarray(g, dtype=np.float64),
        seed=0 if seed is None else seed,
        progress=progress,
        **options,
    )
    config = {
        "shape": list(np.shape(arrays["x"])),  # as given (channels first for nchw)
        "kernel": list(geometry.kernel),
        "cout": geometry.cout,
        **{k: v for k, v in geometry.hparams().items() if k != "padding"},
        "pad": geometry.hparams()["padding"],
    }
    return GradcheckRun(
        mode=check.mode,
        results=[(config, check, None)],
        seconds=time.perf_counter() - start,
        notices=notices + check.notes,
    )


def run_impl_check(
    path,
    configs=None,
    *,
    seed: int | None = None,
    progress=None,
    tolerance=None,
    timeout: float | None = None,
    max_memory: int | None = None,
) -> GradcheckRun:
    """Check the user's conv_forward/conv_backward in ``path`` on ``configs`` (default: SUITE),
    each configuration in its own child process limited to ``timeout`` seconds and
    ``max_memory`` bytes."""
    from convcli.check.tolerance import Tolerance
    from convcli.check.userimpl import SUITE, check_impl, load_impl
    from convcli.check.userproc import DEFAULT_TIMEOUT

    timeout = DEFAULT_TIMEOUT if timeout is None else timeout
    if not timeout > 0:
        raise UsageError(f"timeout {timeout}: must be > 0 seconds")
    impl = load_impl(path, timeout=timeout)
    start = time.perf_counter()
    results = check_impl(
        impl,
        SUITE if configs is None else configs,
        seed=0 if seed is None else seed,
        tolerance=tolerance or Tolerance(),
        timeout=timeout,
        max_memory=max_memory,
        progress=progress,
    )
    return GradcheckRun(
        mode="exhaustive",
        results=[],
        seconds=time.perf_counter() - start,
        impl=str(path),
        impl_results=results,
        tolerance=tolerance or Tolerance(),
    )
