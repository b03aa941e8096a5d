"""The fast conv engine: im2col + one GEMM per tile, the batch processed in memory-bounded tiles
on several threads.

Layout as the :class:`~convcli.spec.ConvSpec` says (channels last by default): x
``(n, *spatial, Cin)``, w ``(*kernel, Cin/groups, Cout)``, z and dz ``(n, *out, Cout)``, with 1
to 3 spatial axes; channels-first arrays are converted on the way in and out
(:mod:`convcli.engine.operands`). Output sizes from :func:`convcli.spec.output_size`.

How it works. :mod:`convcli.engine.tiling` cuts the batch into *tiles* (blocks of images, or
blocks of output rows of one image when one image is too big) sized to stay in the CPU cache
and never above the ``workspace`` budget, and builds each tile's patch matrix;
:mod:`convcli.engine.kernels` does the arithmetic: one matrix product (batched over groups) per
tile forward (at stride 1 where it pays, :attr:`~convcli.engine.tiling.Plan.shifted`, one
GEMM per kernel row on shifted views of a copy along kw only, accumulated in the tile);
backward, one GEMM per tile for dw and ``dcols = dz @ wᵀ`` scattered back into dx, or, at
stride 1 with zero padding, dx as a convolution of dz with the flipped weights. Depthwise
layers use one einsum per tile instead of a GEMM (forward and dw), and, with zero padding
and one output channel per input channel, get dx as depthwise correlations of dz, one per
residue of the stride (:func:`~convcli.engine.kernels.dx_phases`). There is no Python loop
over images, output pixels or channels: the loops are over tiles, kernel taps, phases and
blocks of a row. Scratch memory
(patch matrices, padded buffers, group transposes) stays under ``workspace`` bytes, except
that one output row of one image is the smallest tile. This module drives the tiles: the
two public calls, the worker threads, and BLAS's own threads.

Threads and ownership. Tiles run on several worker threads; no two tiles that run at the same
time ever write the same memory:

- every worker has its own :class:`~convcli.engine.tiling.Plan`, with its own scratch
  buffers (lent by ``_SCRATCH``, never shared) and, in the backward pass, its own dw
  accumulator; the accumulators are summed once, after all tiles;
- a forward tile writes only its own output rows of z (tiles partition the output); a
  depthwise dx phase is such a forward pass, whose output rows are its own residue's
  positions of dx (phases partition dx and run one after another);
- a backward tile first adds its patch gradients into its own padded buffer, then folds that
  buffer into dx (:meth:`~convcli.engine.tiling.Plan.add_interior`): into the input rows
  under its receptive fields and, for reflect/replicate/circular padding, the rows its border
  copies came from. Those rows overlap the rows of neighbouring row tiles of the same image.
  The tiles are therefore grouped into *waves* (:meth:`~convcli.engine.tiling.Plan.waves`): a
  greedy colouring of the row blocks by the exact set of dx rows each one folds into
  (computed by the same function the fold uses), so that the tiles of one wave own disjoint
  (image, row) sets. :func:`_run_plans` runs the waves one after another; inside a wave each
  dx element has exactly one writer. Blocks of whole images never overlap and form a single
  wave.

Because the waves fix the order in which contributions reach each dx element, dx is the same
bit for bit whatever the number of threads, given the same tiles (each worker gets
``workspace / threads`` of scratch, so the tiling depends on both).

Transposed convolutions (``ConvSpec(transposed=True)``) reuse these passes on their *adjoint*
(:meth:`~convcli.spec.Geometry.adjoint`, the convolution they are the input gradient of):
forward is the adjoint's dx for upstream x, dx the adjoint's forward pass of dz, and dw the
adjoint's dw with dz as its input and x as its upstream gradient — same tiles, waves and
workspace bound.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Any

import numpy as np
import numpy.typing as npt

from convcli.engine.kernels import (
    channel_sums,
    depthwise_backward,
    depthwise_forward,
    depthwise_row_weights,
    dx_convolution,
    dx_phases,
    grouped_matmul,
    is_depthwise,
    merged_row_bytes,
    shifted_forward,
    transposed_conv,
    weights_by_group,
    weights_from_groups,
)
from convcli.engine.operands import (
    ConvCache,
    Index,
    finish_gradients,
    prepare,
    prepare_upstream,
    x_from_last,
)
from convcli.engine.tiling import Plan, Tile, deal, is_pointwise, scratch_bound
from convcli.errors import UsageError
from convcli.spec import ConvSpec, Geometry

DEFAULT_WORKSPACE = 256 * 2**20  # bytes

#: What runs one tile: ``work(plan, tile)``, writing only what the tile owns.
Work = Callable[[Plan, Tile], None]


def conv_forward(
    x: npt.ArrayLike,
    w: npt.ArrayLike,
    b: npt.ArrayLike | None = None,
    spec: ConvSpec | None = None,
    *,
    workspace: int = DEFAULT_WORKSPACE,
    threads: int | None = None,
) -> tuple[np.ndarray, ConvCache]:
    """Convolve x with w and add b (or, with ``spec.transposed``, the transposed convolution).

    Parameters
    ----------
    x : ndarray of shape (n, *spatial, Cin), or (n, Cin, *spatial) when channels first
    w : ndarray of shape (*kernel, Cin / groups, Cout), or (Cout, Cin / groups, *kernel);
        transposed: (*kernel, Cout / groups, Cin), or (Cin, Cout / groups, *kernel)
    b : None or ndarray of shape (Cout,) or broadcastable against z, e.g. (1, 1, 1, Cout)
    spec : ConvSpec, default ``ConvSpec()`` (stride 1, no padding, channels last)
        With ``transposed=True`` z is the gradient with respect to the input of the
        convolution with the same hyperparameters, weights and upstream x; its sizes are
        :func:`convcli.spec.transposed_output_size`.
    workspace : int
        Budget in bytes for all scratch buffers together (default 256 MiB).
    threads : int, optional
        Tiles processed in parallel. Default: the number of threads NumPy's BLAS uses.

    Returns
    -------
    z : ndarray of shape (n, *out, Cout) in the spec's layout, dtype float32 or float64 (the
        wider of the inputs)
    cache : ConvCache for :func:`conv_backward`
    """
    spec = spec if spec is not None else ConvSpec()
    operands = prepare(x, w, b, spec)
    x_last, w_last, bias, geometry = operands.x, operands.w, operands.b, operands.geometry
    workspace = check_workspace(workspace)
    threads = check_threads(threads)
    if geometry.transposed:
        # the adjoint convolution's dx, with x as its upstream gradient
        adjoint = geometry.adjoint()
        z, _ = _gradients(
            None, w_last, extend(x_last, adjoint), adjoint, workspace, threads, need_dw=False
        )
        assert z is not None  # need_dx
        if bias is not None:
            z += bias
    else:
        z = _forward(x_last, w_last, bias, geometry, workspace, threads)
    cache = ConvCache(
        x=x_last,
        w=w_last,
        b_shape=operands.b_shape,
        spec=spec,
        geometry=geometry,
        workspace=workspace,
        threads=threads,
    )
    return x_from_last(z, geometry.layout), cache


def conv_backward(
    dz: npt.ArrayLike, cache: ConvCache
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Gradients of a scalar loss L with respect to x, w and b, given dz = dL/dz.

    Parameters
    ----------
    dz : ndarray of the shape of z: (n, *out, Cout), or (n, Cout, *out) when channels first
    cache : ConvCache from :func:`conv_forward` (a convolution or a transposed one)

    Returns
    -------
    dx : ndarray of the shape of x
    dw : ndarray of the shape of w
    db : ndarray in the shape b was given, or None when the forward pass had no bias

    Notes
    -----
    For a transposed convolution, dx is the adjoint convolution of dz (the same w and
    hyperparameters) and dw that convolution's weight gradient with the roles of its input
    (dz) and upstream gradient (x) swapped.
    """
    dz_last, dtype = prepare_upstream(dz, cache)
    geometry = cache.geometry
    x = cache.x.astype(dtype, copy=False)
    w = cache.w.astype(dtype, copy=False)
    if geometry.transposed:
        adjoint = geometry.adjoint()
        dx_adjoint = _forward(dz_last, w, None, adjoint, cache.workspace, cache.threads)
        crop: Index = (slice(None), *(slice(0, size) for size in geometry.in_sizes))
        dx: np.ndarray | None = dx_adjoint[crop]
        dw: np.ndarray | None
        _, dw = _gradients(
            dz_last,
            w,
            extend(x, adjoint),
            adjoint,
            cache.workspace,
            cache.threads,
            need_dx=False,
        )
    else:
        dx, dw = _gradients(x, w, dz_last, geometry, cache.workspace, cache.threads)
    assert dx is not None  # both asked for
    assert dw is not None
    db = channel_sums(dz_last) if cache.b_shape is not None else None
    return finish_gradients(dx, dw, db, cache)


def extend(x: np.ndarray, adjoint: Geometry) -> np.ndarray:
    """A transposed convolution's input x (n, *in_sizes, Cin) as the upstream gradient of its
    adjoint (n, *adjoint.out_sizes, Cin): zeros appended where an output_padding at least the
    stride makes the adjoint's output longer; x itself otherwise."""
    missing = [out - size for out, size in zip(adjoint.out_sizes, x.shape[1:-1], strict=True)]
    if not any(missing):
        return x
    return np.pad(x, [(0, 0), *((0, m) for m in missing), (0, 0)])


def _forward(
    x: np.ndarray,
    w: np.ndarray,
    bias: np.ndarray | None,
    geometry: Geometry,
    workspace: int,
    threads: int | None,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """z (n, *out, Cout) of a convolution, all channels last: x (n, *spatial, Cin),
    w (*kernel, Cin/g, Cout), bias (Cout,) or None.

    ``out``, for depthwise layers only: a writable (possibly strided) view of that shape
    to write z into; each tile computes its rows in a scratch tile (counted by
    :meth:`~convcli.engine.tiling.Plan.tile_bytes`) and copies them there."""
    assert out is None or is_depthwise(geometry)
    z = np.empty(geometry.out_shape, dtype=x.dtype) if out is None else out
    if is_pointwise(geometry) and x.flags.c_contiguous:  # one GEMM, no scratch
        with _blas_limited(_worker_count(threads)):
            np.matmul(
                x.reshape(-1, geometry.cin),
                w.reshape(geometry.cin, -1),
                out=z.reshape(-1, geometry.cout),
            )
        if bias is not None:
            z += bias
        return z
    w_groups = weights_by_group(w, geometry)
    w_rows = w.reshape(-1, geometry.kernel[-1] * w.shape[-2], geometry.cout)  # for shifted tiles
    row_weights = depthwise_row_weights(geometry, w) if is_depthwise(geometry) else None

    def work(plan: Plan, tile: Tile) -> None:
        if out is None:
            z_tile = plan.output_rows(z, tile)
        else:
            target = z[tile.images, tile.rows]
            z_tile = plan.buffer("z_tile", (target.size // geometry.cout, geometry.cout))
        if plan.depthwise:
            depthwise_forward(plan, x, w, tile, z_tile, row_weights)
        elif plan.shifted:
            shifted_forward(plan, x, w_rows, tile, z_tile)
        else:
            grouped_matmul(plan.im2col(x, tile), w_groups, z_tile)
        if bias is not None:
            z_tile += bias  # while the tile is in cache
        if out is not None:
            target[...] = z_tile.reshape(target.shape)

    _for_each_tile(geometry, x.dtype, workspace, threads, backward=False, work=work)
    return z


def _gradients(
    x: np.ndarray | None,
    w: np.ndarray,
    dz: np.ndarray,
    geometry: Geometry,
    workspace: int,
    threads: int | None,
    *,
    need_dx: bool = True,
    need_dw: bool = True,
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(dx, dw) of a convolution, all channels last: x (n, *spatial, Cin) (None when dw is
    not needed), w (*kernel, Cin/g, Cout), dz (n, *out, Cout); a gradient not asked for is
    None. The dtype is dz's."""
    dtype = dz.dtype
    x_shape = (geometry.n, *geometry.in_sizes, geometry.cin)
    if is_pointwise(geometry) and dz.flags.c_contiguous and (x is None or x.flags.c_contiguous):
        return _pointwise_gradients(x if need_dw else None, w, dz, need_dx, threads)
    # dx as convolutions of dz, when it is: one (stride 1), or one per phase (depthwise)
    phases = dx_phases(geometry) if need_dx else None
    transposed = transposed_conv(geometry, w) if need_dx and phases is None else None
    # stride 1: one phase, whose output is dx; else each phase's output is copied in
    whole = phases is not None and len(phases) == 1 and {s.step for s in phases[0].dx} == {1}
    dx = np.zeros(x_shape, dtype=dtype) if need_dx and transposed is None and not whole else None
    scatter = dx if phases is None else None  # dx from patch gradients, tile by tile
    source = x if need_dw else None
    if is_depthwise(geometry):
        work, dw_shape = _depthwise_backward_work(source, w, dz, scatter), w.shape
    else:
        w_groups = weights_by_group(w, geometry)
        work, dw_shape = _gemm_backward_work(source, w_groups, dz, scatter), w_groups.shape
    dw = None
    if need_dw or scatter is not None:
        plans = _for_each_tile(
            geometry,
            dtype,
            workspace,
            threads,
            backward=scatter is not None,
            work=work,
            dw_shape=dw_shape if need_dw else None,
        )
        if need_dw:
            dw = _sum_accumulators(plans)
            if not is_depthwise(geometry):
                dw = weights_from_groups(dw, geometry)
    if transposed is not None:
        w_flipped, spec_t = transposed
        dx, _ = conv_forward(dz, w_flipped, None, spec_t, workspace=workspace, threads=threads)
    for phase in phases or ():
        rows: Index = (slice(None), *phase.dz)
        w_phase = w[np.ix_(*phase.taps)]
        phase_geometry = phase.spec.geometry(dz[rows].shape, w_phase.shape)
        if whole:
            dx = _forward(dz[rows], w_phase, None, phase_geometry, workspace, threads)
        else:
            assert dx is not None  # need_dx
            into: Index = (slice(None), *phase.dx)
            _forward(dz[rows], w_phase, None, phase_geometry, workspace, threads, out=dx[into])
    return dx, dw


def _pointwise_gradients(
    x: np.ndarray | None, w: np.ndarray, dz: np.ndarray, need_dx: bool, threads: int | None
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(dx, dw) of a pointwise layer (:func:`~convcli.engine.tiling.is_pointwise`), one GEMM
    each on the C-contiguous x (n, *spatial, Cin) and dz (n, *spatial, Cout) as matrices of
    pixels; dw is skipped when x is None, dx unless ``need_dx``. w is (1, ..., 1, Cin, Cout)."""
    cin, cout = w.shape[-2], w.shape[-1]
    dz_matrix = dz.reshape(-1, cout)
    w_matrix = w.reshape(cin, cout).astype(dz.dtype, copy=False)
    dx = dw = None
    with _blas_limited(_worker_count(threads)):
        if need_dx:
            dx = np.empty((*dz.shape[:-1], cin), dtype=dz.dtype)
            np.matmul(dz_matrix, w_matrix.T, out=dx.reshape(-1, cin))
        if x is not None:
            dw = np.matmul(x.reshape(-1, cin).T, dz_matrix).reshape(w.shape)
    return dx, dw


def _gemm_backward_work(
    x: np.ndarray | None, w_groups: np.ndarray, dz: np.ndarray, dx: np.ndarray | None
) -> Work:
    """A tile's dw (into its plan's accumulator) by one GEMM unless ``x`` is None, and, unless
    ``dx`` is None, its patch gradients scattered into dx (n, *spatial, Cin)."""
    g, _, cout_group = w_groups.shape
    w_groups_t = np.ascontiguousarray(w_groups.transpose(0, 2, 1))

    def work(plan: Plan, tile: Tile) -> None:
        dz_tile = plan.output_rows(dz, tile)
        dz_groups = dz_tile.reshape(-1, g, cout_group).transpose(1, 0, 2)
        if x is not None:
            assert plan.dw is not None  # set by _run_plans when dw is asked for
            cols = plan.im2col(x, tile)
            plan.dw += np.matmul(cols.transpose(0, 2, 1), dz_groups)
        if dx is not None:
            dcols = np.matmul(dz_groups, w_groups_t, out=plan.dcols(tile))
            plan.col2im(dcols, dx, tile)

    return work


def _depthwise_backward_work(
    x: np.ndarray | None, w: np.ndarray, dz: np.ndarray, dx: np.ndarray | None
) -> Work:
    """A depthwise tile's dw (into its plan's accumulator, unless ``x`` is None) and dx
    (unless None), by per-tap kernels."""

    def work(plan: Plan, tile: Tile) -> None:
        depthwise_backward(plan, x, w, plan.output_rows(dz, tile), tile, dx, plan.dw)

    return work


def _sum_accumulators(plans: Sequence[Plan]) -> np.ndarray:
    """The workers' dw accumulators summed, in worker order."""
    dw = plans[0].dw
    assert dw is not None  # _run_plans sets every accumulator when given dw_shape
    for plan in plans[1:]:
        dw += plan.dw
    return dw


def check_workspace(workspace: object) -> int:
    """Validate a scratch budget in bytes (a positive int).

    Raises
    ------
    UsageError
        With ``param="workspace"``.
    """
    if isinstance(workspace, bool) or not isinstance(workspace, (int, np.integer)) or workspace < 1:
        raise UsageError(
            f"{{param}} must be a positive number of bytes, got {workspace!r}", param="workspace"
        )
    return int(workspace)


def check_threads(threads: object) -> int | None:
    """Validate a worker count: None (as many as BLAS threads) or a positive int.

    Raises
    ------
    UsageError
        With ``param="threads"``.
    """
    if threads is None:
        return None
    if isinstance(threads, bool) or not isinstance(threads, (int, np.integer)) or threads < 1:
        raise UsageError(
            f"{{param}} must be a positive number of workers or None, got {threads!r}",
            param="threads",
        )
    return int(threads)


def scratch_bytes(
    geometry: Geometry, dtype: npt.DTypeLike, workspace: int, threads: int | None = None
) -> int:
    """An upper bound in bytes of the scratch memory a call will use (for memory estimates).

    ``threads`` as for :func:`conv_forward`; see :func:`convcli.engine.tiling.scratch_bound`.
    A transposed convolution's tiles are those of its adjoint convolution. At stride 1 the
    backward pass computes dx as a convolution of dz (Cout in, Cin out), whose tiles may
    need more scratch than the forward's: the bound is the larger of the two.
    """
    if geometry.transposed:
        geometry = geometry.adjoint()
    workers = _worker_count(threads)
    bound = scratch_bound(geometry, dtype, workspace, workers)
    bound += merged_row_bytes(geometry, np.dtype(dtype), workers)
    g = geometry.groups
    spec = dx_convolution(geometry)
    if spec is not None:
        dz_shape = (geometry.n, *geometry.out_sizes, geometry.cout)
        dx_geometry = spec.geometry(dz_shape, (*geometry.kernel, geometry.cout // g, geometry.cin))
        dx_bound = scratch_bound(dx_geometry, dtype, workspace, workers, passes=(False,))
        bound = max(bound, dx_bound)
    for phase in dx_phases(geometry) or ():
        dz_sizes = [rows.stop - rows.start for rows in phase.dz]
        w_shape = (*(len(taps) for taps in phase.taps), 1, geometry.cin)
        phase_geometry = phase.spec.geometry((geometry.n, *dz_sizes, geometry.cout), w_shape)
        phase_bound = scratch_bound(phase_geometry, dtype, workspace, workers, passes=(False,))
        phase_bound += merged_row_bytes(phase_geometry, np.dtype(dtype), workers)
        bound = max(bound, phase_bound)
    return bound


# -- scratch kept between calls ---------------------------------------------------------------


class _ScratchPool:
    """Scratch buffers kept between calls, so repeated convolutions do not pay for fresh
    pages each time. Each call borrows sets of buffers and gives them back; concurrent calls
    never share one. A kept buffer is at most one tile's scratch (the workspace bounds it)."""

    def __init__(self, keep: int = 4):
        self._free: list[dict[tuple[str, np.dtype], np.ndarray]] = []
        self._keep = keep
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def lend(self, plans: Sequence[Plan]) -> Iterator[None]:
        """Give every plan a set of buffers for the ``with`` block, then take them back."""
        with self._lock:
            for plan in plans:
                plan.buffers = self._free.pop() if self._free else {}
        try:
            yield
        finally:
            with self._lock:
                for plan in plans:
                    if len(self._free) < self._keep:
                        self._free.append(plan.buffers)
                    plan.buffers = {}


_SCRATCH = _ScratchPool()


# -- tiles in parallel -----------------------------------------------------------------------

_pool: dict[str, Any] = {}
_pool_lock = threading.Lock()


def _blas_controller() -> Any:
    """threadpoolctl's controller of NumPy's BLAS (created once, after NumPy is loaded)."""
    with _pool_lock:
        if "controller" not in _pool:
            from threadpoolctl import ThreadpoolController

            _pool["controller"] = ThreadpoolController()
        return _pool["controller"]


def blas_threads() -> int:
    """How many threads NumPy's BLAS uses now (1 when no BLAS library is found)."""
    controller = _blas_controller()
    counts = [lib.num_threads for lib in controller.lib_controllers if lib.user_api == "blas"]
    return max(counts, default=1)


def blas_libraries() -> list[dict[str, Any]]:
    """The BLAS libraries NumPy has loaded, as threadpoolctl sees them.

    Returns
    -------
    list of dict
        Per library: ``internal_api`` (``"openblas"``, ``"mkl"``, ``"blis"``), ``version``,
        ``threading_layer`` (``"pthreads"``, ``"openmp"``, ...) and ``num_threads`` now.
    """
    controller = _blas_controller()
    return [
        {
            "internal_api": lib.internal_api,
            "version": lib.version,
            "threading_layer": getattr(lib, "threading_layer", None),
            "num_threads": lib.num_threads,
        }
        for lib in controller.lib_controllers
        if lib.user_api == "blas"
    ]


def _worker_count(threads: int | None) -> int:
    """Worker threads for a call: ``threads``, or as many as BLAS uses; at least 1."""
    return max(1, int(threads) if threads is not None else blas_threads())


def _executor(workers: int) -> ThreadPoolExecutor:
    """One thread pool per worker count, kept for the process (never shut down under a
    caller that may still be submitting to it)."""
    with _pool_lock:
        executors: dict[int, ThreadPoolExecutor] = _pool.setdefault("executors", {})
        if workers not in executors:
            executors[workers] = ThreadPoolExecutor(
                max_workers=workers, thread_name_prefix="convcli"
            )
        return executors[workers]


# One call at a time runs tiles in parallel: each such call already uses every worker, and
# threadpoolctl lets only the thread that lowered OpenBLAS's thread count raise it again, so
# the limit must be set and restored by one thread at a time. Calls from a user's own threads
# queue here.
_PARALLEL = threading.Lock()


def _for_each_tile(
    geometry: Geometry,
    dtype: npt.DTypeLike,
    workspace: int,
    threads: int | None,
    *,
    backward: bool,
    work: Work,
    dw_shape: tuple[int, ...] | None = None,
) -> list[Plan]:
    """Run ``work(plan, tile)`` for every tile, on ``threads`` workers (default: BLAS threads).

    Each worker has its own plan (scratch buffers, and a dw accumulator of ``dw_shape`` when
    given) and gets an equal share of the workspace. Returns the plans, worker by worker.
    """
    workers = _worker_count(threads)
    plans = [
        Plan(geometry, dtype, max(1, workspace // workers), backward=backward, workers=workers)
        for _ in range(workers)
    ]
    with _SCRATCH.lend(plans):
        return _run_plans(plans, work, dw_shape, dtype)


def _run_plans(
    plans: list[Plan],
    work: Work,
    dw_shape: tuple[int, ...] | None,
    dtype: npt.DTypeLike,
) -> list[Plan]:
    """Run the tiles wave by wave (:meth:`~convcli.engine.tiling.Plan.waves`), one plan per
    worker; inside a wave the tiles are dealt to the workers in consecutive runs
    (:func:`~convcli.engine.tiling.deal`).

    With several workers, BLAS runs one thread per worker for the duration, so the cores are
    not oversubscribed. When a tile raises (or the caller is interrupted), the other workers
    stop after their current tile and the call raises once they all have.
    """
    workers = len(plans)
    if dw_shape is not None:
        for plan in plans:
            plan.dw = np.zeros(dw_shape, dtype=dtype)
    waves = plans[0].waves()
    if workers == 1 or max(len(wave) for wave in waves) < 2:
        with _blas_limited(workers):
            for wave in waves:
                for tile in wave:
                    work(plans[0], tile)
        return plans

    failed = threading.Event()  # a tile raised, or the caller was interrupted: stop early

    def run(plan: Plan, share: list[Tile]) -> None:
        for tile in share:
            if failed.is_set():
                return
            try:
                work(plan, tile)
            except BaseException:
                failed.set()
                raise

    executor = _executor(workers)
    with _PARALLEL, _blas_controller().limit(limits=1, user_api="blas"):
        for wave in waves:  # a wave ends before the next begins: its tiles own their writes
            shares = deal(wave, workers)
            futures = [executor.submit(run, plans[k], shares[k]) for k in range(workers)]
            try:
                for future in futures:
                    future.result()
            except BaseException:  # the others stop after their tile, and are waited for:
                failed.set()  # none may write the buffers given back, or run on BLAS
                wait(futures)  # threads restored, after the call has raised
                raise
    return plans


@contextlib.contextmanager
def _blas_limited(threads: int) -> Iterator[None]:
    """BLAS on at most ``threads`` threads for the block, when it uses more now (one such
    block at a time, see ``_PARALLEL``): one worker means one core, not one worker calling
    a multi-threaded BLAS on small tiles."""
    if blas_threads() <= threads:
        yield
        return
    with _PARALLEL, _blas_controller().limit(limits=threads, user_api="blas"):
        yield
