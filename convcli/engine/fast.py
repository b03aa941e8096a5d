"""The fast conv engine: im2col + one GEMM per tile, batch processed in memory-bounded tiles.

Layout: x NHWC ``(n, H, W, Cin)``, w HWIO ``(kh, kw, Cin / groups, Cout)``,
z and dz ``(n, Ho, Wo, Cout)``; output sizes from :func:`convcli.spec.output_size`.

How it works. A *tile* is a block of images, or, when one image is too big, a block of
output rows of one image. Tiles are sized to stay in the CPU cache (``TILE_BYTES``) and
never above the ``workspace`` budget. For each tile:

1. the input rows it needs are copied into a small zero-padded buffer (skipped when there is
   no padding), so every kernel tap reads valid memory;
2. a strided *view* of that buffer shows every receptive field, ``(images, rows, Wo, kh, kw,
   Cin)``, and one ``np.copyto`` turns it into the patch matrix ``cols`` of shape
   ``(groups, tile_pixels, kh·kw·Cin/groups)``;
3. one matrix product (batched over groups) gives the tile's output.

The backward pass rebuilds ``cols`` per tile, accumulates ``dw`` with one GEMM, and scatters
``dcols = dz @ wᵀ`` back into a padded ``dx`` buffer with one strided add per kernel tap.
Depthwise layers (one input channel per group), where a GEMM would have an inner dimension of
1, use per-tap multiply-adds on the strided view instead.

There is no Python loop over images, output pixels or channels: the loops are over tiles and
kernel taps. Scratch memory (patch matrices, padded buffers, group transposes) stays under
``workspace`` bytes, except that one output row of one image is the smallest tile.

Threads and ownership. Tiles run on several worker threads; no two tiles that run at the same
time ever write the same memory:

- every worker has its own scratch buffers (lent by ``_SCRATCH``, never shared) and, in the
  backward pass, its own dw accumulator; the accumulators are summed once, after all tiles;
- a forward tile writes only its own output rows of z (tiles partition the output);
- a backward tile first adds its patch gradients into its own padded buffer, then folds that
  buffer into dx (:meth:`_Plan._add_interior`): into the input rows under its receptive
  fields and, for reflect/replicate/circular padding, the rows its border copies came from.
  Those rows overlap the rows of neighbouring row tiles of the same image. The tiles are
  therefore grouped into *waves* (:meth:`_Plan.waves`): a greedy colouring of the row blocks
  by the exact set of dx rows each one folds into (computed by the same function the fold
  uses), so that the tiles of one wave own disjoint (image, row) sets. Waves run one after
  another; inside a wave each dx element has exactly one writer. Blocks of whole images
  never overlap and form a single wave.

Because the waves fix the order in which contributions reach each dx element, dx is the same
bit for bit whatever the number of threads, given the same tiles (each worker gets
``workspace / threads`` of scratch, so the tiling depends on both).
"""

from __future__ import annotations

import contextlib
import itertools
import math
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from numpy.lib.stride_tricks import as_strided

from convcli.engine.operands import (
    ConvCache,
    finish_gradients,
    prepare,
    prepare_upstream,
    x_from_last,
)
from convcli.errors import UsageError
from convcli.spec import ConvSpec, Geometry, padding_source

DEFAULT_WORKSPACE = 256 * 2**20  # bytes
TILE_BYTES = 4 * 2**20  # target scratch per tile: patch matrices that stay in L2/L3


def conv_forward(
    x,
    w,
    b=None,
    spec: ConvSpec | None = None,
    *,
    workspace: int = DEFAULT_WORKSPACE,
    threads: int | None = None,
):
    """Convolve x with w and add b.

    Parameters
    ----------
    x : ndarray of shape (n, H, W, Cin)
    w : ndarray of shape (kh, kw, Cin / groups, Cout)
    b : None or ndarray of shape (Cout,) or (1, 1, 1, Cout)
    spec : ConvSpec, default ``ConvSpec()`` (stride 1, no padding)
    workspace : int
        Budget in bytes for all scratch buffers together (default 256 MiB).
    threads : int, optional
        Tiles processed in parallel. Default: the number of threads NumPy's BLAS uses.

    Returns
    -------
    z : ndarray of shape (n, Ho, Wo, Cout), dtype float32 or float64 (the wider of the inputs)
    cache : ConvCache for :func:`conv_backward`
    """
    spec = spec if spec is not None else ConvSpec()
    x, w, b, b_shape, geometry = prepare(x, w, b, spec)
    workspace = check_workspace(workspace)
    z = np.empty(geometry.out_shape, dtype=x.dtype)
    w_groups = _weights_by_group(w, geometry)

    def work(plan: _Plan, tile: _Tile) -> None:
        z_tile = plan.output_rows(z, tile)
        if plan.depthwise:
            plan.depthwise_forward(x, w, tile, z_tile)
        else:
            _grouped_matmul(plan.im2col(x, tile), w_groups, z_tile)
        if b is not None:
            z_tile += b  # while the tile is in cache

    _for_each_tile(geometry, x.dtype, workspace, threads, backward=False, work=work)
    cache = ConvCache(
        x=x,
        w=w,
        b_shape=b_shape,
        spec=spec,
        geometry=geometry,
        workspace=workspace,
        threads=threads,
    )
    return x_from_last(z, geometry.layout), cache


def conv_backward(dz, cache: ConvCache):
    """Gradients of a scalar loss L with respect to x, w and b, given dz = dL/dz.

    Parameters
    ----------
    dz : ndarray of shape (n, Ho, Wo, Cout)
    cache : ConvCache from :func:`conv_forward`

    Returns
    -------
    dx : ndarray of shape (n, H, W, Cin)
    dw : ndarray of shape (kh, kw, Cin / groups, Cout)
    db : ndarray in the shape b was given, or None when the forward pass had no bias
    """
    dz, dtype = prepare_upstream(dz, cache)
    geometry = cache.geometry
    x = cache.x.astype(dtype, copy=False)
    w = cache.w.astype(dtype, copy=False)
    w_groups = _weights_by_group(w, geometry)
    g, _, cout_group = w_groups.shape
    w_groups_t = np.ascontiguousarray(w_groups.transpose(0, 2, 1))
    transposed = _transposed_conv(geometry, w)  # dx as a convolution of dz, when it is one
    dx = None if transposed is not None else np.zeros(x.shape, dtype=dtype)

    def work(plan: _Plan, tile: _Tile) -> None:
        dz_tile = plan.output_rows(dz, tile)
        if plan.depthwise:
            plan.depthwise_backward(x, w, dz_tile, tile, dx, plan.dw)
            return
        cols = plan.im2col(x, tile)
        dz_groups = dz_tile.reshape(-1, g, cout_group).transpose(1, 0, 2)
        plan.dw += np.matmul(cols.transpose(0, 2, 1), dz_groups)
        if transposed is None:
            dcols = np.matmul(dz_groups, w_groups_t, out=plan.dcols(tile))
            plan.col2im(dcols, dx, tile)

    plans = _for_each_tile(
        geometry,
        dtype,
        cache.workspace,
        cache.threads,
        backward=transposed is None,
        work=work,
        dw_shape=w.shape if _is_depthwise(geometry) else w_groups.shape,
    )
    dw = plans[0].dw
    for plan in plans[1:]:
        dw += plan.dw
    if not _is_depthwise(geometry):
        dw = _weights_from_groups(dw, geometry)
    if transposed is not None:
        w_flipped, spec_t = transposed
        dx, _ = conv_forward(
            dz, w_flipped, None, spec_t, workspace=cache.workspace, threads=cache.threads
        )
    db = dz.sum(axis=tuple(range(dz.ndim - 1))) if cache.b_shape is not None else None
    return finish_gradients(dx, dw, db, cache)


def _transposed_conv(geometry: Geometry, w: np.ndarray):
    """For stride 1, dx is itself a convolution: of dz with w flipped in space and with its
    channel axes swapped, padded by ``dilation * (k - 1) - pad`` on each side. Returns
    ``(w', ConvSpec)`` for it when those pads are not negative, else None (then dx is
    gathered from the patch gradients instead).

    dx[h] = Σ_i dz[h + pad_top - i·d] · w[i], i.e. with i' = k - 1 - i a correlation of dz
    with w[k - 1 - i'] and padding d·(k - 1) - pad_top on top (likewise bottom, per axis).
    """
    if set(geometry.stride) != {1} or _is_depthwise(geometry) or geometry.padding_mode != "zeros":
        return None
    pads = tuple(
        (d * (k - 1) - lo, d * (k - 1) - hi)
        for d, k, (lo, hi) in zip(geometry.dilation, geometry.kernel, geometry.pads, strict=True)
    )
    if any(v < 0 for pair in pads for v in pair):
        return None
    g = geometry.groups
    nd = len(geometry.kernel)
    cin_g, cout_g = geometry.cin // g, geometry.cout // g
    flipped = w[(slice(None, None, -1),) * nd]  # (*kernel, Cin/g, Cout)
    # output channel (group k, co) of the forward pass is input channel k*Cout/g + co here
    grouped = flipped.reshape(*geometry.kernel, cin_g, g, cout_g)
    w_t = np.ascontiguousarray(np.swapaxes(grouped, -3, -1)).reshape(
        *geometry.kernel, cout_g, g * cin_g
    )
    return w_t, ConvSpec(stride=1, padding=pads, dilation=geometry.dilation, groups=g)


class _ScratchPool:
    """Scratch buffers kept between calls, so repeated convolutions do not pay for fresh
    pages each time. Each call borrows sets of buffers and gives them back; concurrent calls
    never share one. A kept buffer is at most one tile's scratch (the workspace bounds it)."""

    def __init__(self, keep: int = 4):
        self._free: list[dict] = []
        self._keep = keep
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def lend(self, plans):
        with self._lock:
            for plan in plans:
                plan._buffers = self._free.pop() if self._free else {}
        try:
            yield
        finally:
            with self._lock:
                for plan in plans:
                    if len(self._free) < self._keep:
                        self._free.append(plan._buffers)
                    plan._buffers = {}


_SCRATCH = _ScratchPool()


# -- tiles in parallel -----------------------------------------------------------------------

_pool: dict = {}
_pool_lock = threading.Lock()


def _blas_controller():
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


def _executor(workers: int) -> ThreadPoolExecutor:
    """One thread pool per worker count, kept for the process (never shut down under a
    caller that may still be submitting to it)."""
    with _pool_lock:
        executors = _pool.setdefault("executors", {})
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


def _is_depthwise(geometry: Geometry) -> bool:
    return geometry.cin == geometry.groups and geometry.groups > 1


def _for_each_tile(geometry, dtype, workspace, threads, *, backward, work, dw_shape=None):
    """Run ``work(plan, tile)`` for every tile, on ``threads`` workers (default: BLAS threads).

    Each worker has its own plan (scratch buffers, and a dw accumulator for the backward
    pass) and gets an equal share of the workspace. Tiles run wave by wave
    (:meth:`_Plan.waves`); inside a wave they are dealt round-robin to the workers. With several
    workers, BLAS runs one thread per worker for the duration, so the cores are not
    oversubscribed.
    """
    workers = max(1, int(threads) if threads is not None else blas_threads())
    plans = [
        _Plan(geometry, dtype, max(1, workspace // workers), backward=backward)
        for _ in range(workers)
    ]
    with _SCRATCH.lend(plans):
        return _run_plans(plans, workers, work, dw_shape, dtype)


def _run_plans(plans, workers, work, dw_shape, dtype):
    if dw_shape is not None:
        for plan in plans:
            plan.dw = np.zeros(dw_shape, dtype=dtype)
    waves = plans[0].waves()
    if workers == 1 or max(len(wave) for wave in waves) < 2:
        for wave in waves:
            for tile in wave:
                work(plans[0], tile)
        return plans

    def run(plan: _Plan, share) -> None:
        for tile in share:
            work(plan, tile)

    executor = _executor(workers)
    with _PARALLEL, _blas_controller().limit(limits=1, user_api="blas"):
        for wave in waves:  # a wave ends before the next begins: its tiles own their writes
            futures = [executor.submit(run, plans[k], wave[k::workers]) for k in range(workers)]
            for future in futures:
                future.result()
    return plans


def scratch_bytes(geometry: Geometry, dtype, workspace: int, threads: int | None = None) -> int:
    """An upper bound of the scratch memory a call will use (for memory estimates)."""
    workers = max(1, int(threads) if threads is not None else blas_threads())
    plan = _Plan(geometry, dtype, max(1, workspace // workers), backward=True)
    one_tile = plan._tile_bytes(plan.images_per_tile, plan.rows_per_tile)
    return min(workspace, workers * one_tile) if one_tile <= workspace else workers * one_tile


def check_workspace(workspace) -> int:
    """Validate a scratch budget in bytes."""
    if isinstance(workspace, bool) or not isinstance(workspace, (int, np.integer)) or workspace < 1:
        raise UsageError(f"workspace must be a positive number of bytes, got {workspace!r}")
    return int(workspace)


def _weights_by_group(w: np.ndarray, geometry: Geometry) -> np.ndarray:
    """HWIO weights -> (groups, kh*kw*Cin/groups, Cout/groups), C-contiguous."""
    g = geometry.groups
    k_group = w.size // geometry.cout
    return np.ascontiguousarray(w.reshape(k_group, g, geometry.cout // g).transpose(1, 0, 2))


def _weights_from_groups(w_groups: np.ndarray, geometry: Geometry) -> np.ndarray:
    """Inverse of :func:`_weights_by_group`."""
    shape = (*geometry.kernel, geometry.cin // geometry.groups, geometry.cout)
    return np.ascontiguousarray(w_groups.transpose(1, 0, 2)).reshape(shape)


def _grouped_matmul(cols: np.ndarray, w_groups: np.ndarray, out: np.ndarray) -> None:
    """out (pixels, Cout) = cols (g, pixels, K) @ w_groups (g, K, Cout/g), groups side by side."""
    if w_groups.shape[0] == 1:
        np.matmul(cols[0], w_groups[0], out=out)
    else:
        pixels = out.shape[0]
        out.reshape(pixels, w_groups.shape[0], -1)[...] = np.matmul(cols, w_groups).transpose(
            1, 0, 2
        )


class _Tile:
    """A block of images (all output rows) or a block of output rows of one image."""

    __slots__ = ("images", "n_images", "n_rows", "rows")

    def __init__(self, n0: int, n1: int, r0: int, r1: int):
        self.images = slice(n0, n1)
        self.rows = slice(r0, r1)
        self.n_images = n1 - n0
        self.n_rows = r1 - r0


class _Plan:
    """Tiling of one convolution under a scratch budget, with buffers reused across tiles.

    Spatial axes are handled generically: the first one is split into row blocks, the
    others are always whole.
    """

    def __init__(self, geometry: Geometry, dtype, workspace: int, *, backward: bool):
        self.geometry = geometry
        self.dtype = np.dtype(dtype)
        g = geometry.groups
        self.cin_group = geometry.cin // g
        self.depthwise = self.cin_group == 1 and g > 1
        self.taps = int(np.prod(geometry.kernel))
        self.k_group = self.taps * self.cin_group
        self.spans = [
            d * (k - 1) + 1 for d, k in zip(geometry.dilation, geometry.kernel, strict=True)
        ]
        # padded extent needed along each spatial axis for the whole output
        self.extent = [
            (o - 1) * s + span
            for o, s, span in zip(geometry.out_sizes, geometry.stride, self.spans, strict=True)
        ]
        self.padded = any(lo or hi for lo, hi in geometry.pads)
        self.pointwise = (
            self.taps == 1 and set(geometry.stride) == {1} and not self.padded and g == 1
        )
        self.backward = backward
        self._choose_tiles(workspace)
        self._offsets = list(itertools.product(*(range(k) for k in geometry.kernel)))
        self._buffers: dict = {}  # (name, dtype) -> array; lent by _SCRATCH for one call
        self.dw: np.ndarray | None = None  # this worker's dw accumulator (backward)

    # -- sizing ----------------------------------------------------------------------------

    def _tile_bytes(self, images: int, rows: int) -> int:
        """Scratch bytes for a tile of ``images`` x ``rows`` output rows."""
        geometry = self.geometry
        rest_out = math.prod(geometry.out_sizes[1:])
        pixels = images * rows * rest_out
        in_rows = (rows - 1) * geometry.stride[0] + self.spans[0]
        padded_input = images * in_rows * math.prod(self.extent[1:]) * geometry.cin
        elements = 0
        if self.pointwise:
            elements += pixels * geometry.cout  # x is used in place; keep the z tile cache-sized
        elif not self.depthwise:
            elements += pixels * geometry.groups * self.k_group  # cols
            if geometry.groups > 1:
                elements += pixels * geometry.cout  # group transpose temporary
        else:
            elements += 2 * pixels * geometry.cout  # per-tap product and accumulator
        if self.padded or self.depthwise:
            elements += padded_input
        if self.backward:
            elements += elements  # dcols / dx buffer mirror the forward ones
        return elements * self.dtype.itemsize

    def _choose_tiles(self, workspace: int) -> None:
        """Whole images per tile when one fits the cache target, else blocks of rows."""
        geometry = self.geometry
        out_rows = geometry.out_sizes[0]
        budget = min(workspace, TILE_BYTES)
        per_image = max(1, self._tile_bytes(1, out_rows))
        if per_image <= budget:
            self.rows_per_tile = out_rows
            self.images_per_tile = max(1, min(geometry.n, budget // per_image))
        else:
            self.rows_per_tile = self._rows_fitting(budget)
            self.images_per_tile = 1

    def _rows_fitting(self, budget: int) -> int:
        rows = self.geometry.out_sizes[0]
        per_row = max(1, self._tile_bytes(1, 1))
        guess = max(1, min(rows, budget // per_row))
        while guess > 1 and self._tile_bytes(1, guess) > budget:
            guess -= 1
        return guess

    def waves(self) -> list[list[_Tile]]:
        """The tiles in waves whose dx footprints are pairwise disjoint (see the module
        docstring). Without a scatter into dx (forward, stride-1 backward) or with whole images
        per tile, no two tiles write the same memory: one wave."""
        tiles = list(self.tiles())
        if not self.backward or self.rows_per_tile == self.geometry.out_sizes[0]:
            return [tiles]
        occupied: list[np.ndarray] = []  # per wave, the dx rows its blocks fold into
        colour: dict[int, int] = {}  # first output row of a block -> its wave
        for tile in tiles[: len(tiles) // self.geometry.n]:  # the row blocks of one image
            rows = self.fold_rows(tile)
            wave = next((k for k, mask in enumerate(occupied) if not mask[rows].any()), None)
            if wave is None:
                wave = len(occupied)
                occupied.append(np.zeros(self.geometry.in_sizes[0], dtype=bool))
            occupied[wave][rows] = True
            colour[tile.rows.start] = wave
        waves: list[list[_Tile]] = [[] for _ in occupied]
        for tile in tiles:  # tiles of different images never share rows
            waves[colour[tile.rows.start]].append(tile)
        return waves

    def fold_rows(self, tile: _Tile) -> np.ndarray:
        """Indices along the first spatial axis of the dx rows :meth:`_add_interior` writes for
        this tile: the rows under its receptive fields, folded back as the padding mode says."""
        starts, lengths = self._input_window(tile)
        size = self.geometry.in_sizes[0]
        if self.geometry.padding_mode == "zeros":
            rows = _inside(starts[:1], lengths[:1], (size,))[0]
            return np.arange(rows.start, rows.stop)
        return np.unique(self._source_maps(starts[:1], lengths[:1], (size,))[0])

    def tiles(self):
        geometry = self.geometry
        out_rows = geometry.out_sizes[0]
        if self.rows_per_tile == out_rows:
            for n0 in range(0, geometry.n, self.images_per_tile):
                yield _Tile(n0, min(n0 + self.images_per_tile, geometry.n), 0, out_rows)
        else:
            for n0 in range(geometry.n):
                for r0 in range(0, out_rows, self.rows_per_tile):
                    yield _Tile(n0, n0 + 1, r0, min(r0 + self.rows_per_tile, out_rows))

    def _buffer(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        """A scratch array of ``shape``, carved from a buffer kept for the whole plan."""
        size = math.prod(shape)
        key = (name, self.dtype)
        buffer = self._buffers.get(key)
        if buffer is None or buffer.size < size:
            buffer = np.empty(size, dtype=self.dtype)
            self._buffers[key] = buffer
        return buffer[:size].reshape(shape)

    # -- tensors of a tile -----------------------------------------------------------------

    def output_rows(self, z: np.ndarray, tile: _Tile) -> np.ndarray:
        """z (n, Ho, ..., Cout) rows of this tile as a (pixels, Cout) view."""
        return z[tile.images, tile.rows].reshape(-1, z.shape[-1])  # contiguous: a view

    def _input_window(self, tile: _Tile):
        """Input index range per spatial axis that this tile's receptive fields cover."""
        geometry = self.geometry
        first_row = tile.rows.start * geometry.stride[0] - geometry.pads[0][0]
        starts = [first_row] + [-before for before, _ in geometry.pads[1:]]
        lengths = [(tile.n_rows - 1) * geometry.stride[0] + self.spans[0], *self.extent[1:]]
        return starts, lengths

    def _padded_input(self, x: np.ndarray, tile: _Tile, name: str = "padded") -> np.ndarray:
        """x values under this tile's receptive fields, zero where they fall in the padding.

        Returns an array (images, rows_in, *rest_in, Cin) whose index 0 along each spatial
        axis is input position ``start`` of :meth:`_input_window`. Without padding this is a
        view of x; otherwise a buffer whose padding is zeroed.
        """
        starts, lengths = self._input_window(tile)
        inside = _inside(starts, lengths, x.shape[1:-1])
        if not self.padded:
            return x[(tile.images, *inside)]
        buffer = self._buffer(name, (tile.n_images, *lengths, x.shape[-1]))
        if self.geometry.padding_mode != "zeros":  # gather the padding from x itself
            maps = self._source_maps(starts, lengths, x.shape[1:-1])
            buffer[...] = x[tile.images][(slice(None), *np.ix_(*maps))]
            return buffer
        target = _within_window(inside, starts, lengths)
        buffer[(slice(None), *target)] = x[(tile.images, *inside)]
        for region in _outside(target, lengths):
            buffer[(slice(None), *region)] = 0
        return buffer

    def _windows(self, padded: np.ndarray, tile: _Tile) -> np.ndarray:
        """Strided view (images, *out_tile, *kernel, Cin) of every receptive field."""
        geometry = self.geometry
        strides = padded.strides
        spatial = strides[1:-1]
        out_tile = (tile.n_rows, *geometry.out_sizes[1:])
        shape = (padded.shape[0], *out_tile, *geometry.kernel, padded.shape[-1])
        view_strides = (
            strides[0],
            *(st * s for st, s in zip(spatial, geometry.stride, strict=True)),
            *(st * d for st, d in zip(spatial, geometry.dilation, strict=True)),
            strides[-1],
        )
        return as_strided(padded, shape=shape, strides=view_strides, writeable=False)

    def im2col(self, x: np.ndarray, tile: _Tile) -> np.ndarray:
        """Patch matrix (g, pixels, kh*kw*Cin/g) of x (n, H, W, Cin) for this tile."""
        geometry = self.geometry
        g = geometry.groups
        if self.pointwise:  # 1x1, stride 1, no padding, one group: x itself is the matrix
            return x[tile.images, tile.rows].reshape(1, -1, geometry.cin)
        windows = self._windows(self._padded_input(x, tile), tile)
        # (images, *out, *kernel, g, Cin/g) -> (g, images, *out, *kernel, Cin/g)
        windows = windows.reshape(*windows.shape[:-1], g, self.cin_group)
        windows = np.moveaxis(windows, -2, 0)
        cols = self._buffer("cols", windows.shape)
        np.copyto(cols, windows)
        return cols.reshape(g, -1, self.k_group)

    def dcols(self, tile: _Tile) -> np.ndarray:
        """Scratch (g, pixels, K) for the patch gradients."""
        pixels = tile.n_images * tile.n_rows * math.prod(self.geometry.out_sizes[1:])
        return self._buffer("dcols", (self.geometry.groups, pixels, self.k_group))

    def col2im(self, dcols: np.ndarray, dx: np.ndarray, tile: _Tile) -> None:
        """Add the patch gradients dcols (g, pixels, K) into dx (n, H, W, Cin)."""
        geometry = self.geometry
        g = geometry.groups
        starts, lengths = self._input_window(tile)
        dx_padded = self._buffer("dx_padded", (tile.n_images, *lengths, geometry.cin))
        dx_padded[...] = 0
        windows = self._writable_windows(dx_padded, tile)
        windows = np.moveaxis(windows.reshape(*windows.shape[:-1], g, self.cin_group), -2, 0)
        patches = dcols.reshape(windows.shape)
        for offset in self._offsets:
            index = (Ellipsis, *offset, slice(None))
            windows[index] += patches[index]
        self._add_interior(dx_padded, dx, tile, starts, lengths)

    def _writable_windows(self, padded: np.ndarray, tile: _Tile) -> np.ndarray:
        view = self._windows(padded, tile)
        return as_strided(padded, shape=view.shape, strides=view.strides, writeable=True)

    def _source_maps(self, starts, lengths, sizes) -> list[np.ndarray]:
        """Per axis, the input index each position of a padded window reads."""
        mode = self.geometry.padding_mode
        return [
            padding_source(np.arange(start, start + length), size, mode)
            for start, length, size in zip(starts, lengths, sizes, strict=True)
        ]

    def _add_interior(self, padded, target, tile: _Tile, starts, lengths) -> None:
        """target[images] += padded, folded back onto the input (the adjoint of padding):
        zeros drop the padding; other modes add it onto the pixels it was copied from."""
        if self.geometry.padding_mode != "zeros":
            maps = self._source_maps(starts, lengths, target.shape[1:-1])
            np.add.at(target[tile.images], (slice(None), *np.ix_(*maps)), padded)
            return
        inside = _inside(starts, lengths, target.shape[1:-1])
        source = _within_window(inside, starts, lengths)
        target[(tile.images, *inside)] += padded[(slice(None), *source)]

    # -- depthwise (one input channel per group) --------------------------------------------

    def _depthwise_weights(self, w: np.ndarray) -> np.ndarray:
        """(kh, kw, 1, Cout) -> (taps, Cin, multiplier): output channel c*m + j reads input c."""
        g = self.geometry.groups
        return w.reshape(self.taps, g, self.geometry.cout // g)

    def depthwise_forward(self, x, w, tile: _Tile, out: np.ndarray) -> None:
        """out (pixels, Cout) = Σ over taps of window(tap) ⊙ w(tap), per channel."""
        g = self.geometry.groups
        windows = self._windows(self._padded_input(x, tile), tile)
        weights = self._depthwise_weights(w)
        acc = out.reshape(*windows.shape[: 1 + len(self.geometry.kernel)], g, -1)
        product = self._buffer("product", acc.shape)
        acc[...] = 0
        for tap, offset in enumerate(self._offsets):
            source = windows[(Ellipsis, *offset, slice(None))][..., None]
            np.multiply(source, weights[tap], out=product)
            acc += product

    def depthwise_backward(self, x, w, dz_tile, tile: _Tile, dx, dw) -> None:
        """Accumulate dw and dx for one tile of a depthwise layer."""
        g = self.geometry.groups
        windows = self._windows(self._padded_input(x, tile), tile)
        weights = self._depthwise_weights(w)
        dz_view = dz_tile.reshape(*windows.shape[: 1 + len(self.geometry.kernel)], g, -1)
        starts, lengths = self._input_window(tile)
        dx_padded = self._buffer("dx_padded", (tile.n_images, *lengths, self.geometry.cin))
        dx_padded[...] = 0
        dx_windows = self._writable_windows(dx_padded, tile)
        dw_taps = dw.reshape(self.taps, g, -1)
        product = self._buffer("product", dz_view.shape)
        spatial = tuple(range(1 + len(self.geometry.kernel)))
        for tap, offset in enumerate(self._offsets):
            index = (Ellipsis, *offset, slice(None))
            source = windows[index][..., None]
            np.multiply(source, dz_view, out=product)
            dw_taps[tap] += product.sum(axis=spatial)
            np.multiply(dz_view, weights[tap], out=product)
            dx_windows[index] += product.sum(axis=-1)
        self._add_interior(dx_padded, dx, tile, starts, lengths)


def _inside(starts, lengths, sizes) -> list[slice]:
    """Per axis, the part of [start, start + length) that lies in [0, size) (may be empty)."""
    slices = []
    for start, length, size in zip(starts, lengths, sizes, strict=True):
        lo = min(max(start, 0), size)
        slices.append(slice(lo, max(lo, min(start + length, size))))
    return slices


def _within_window(inside: list[slice], starts, lengths) -> tuple[slice, ...]:
    """The slices of :func:`_inside` in window coordinates (0 = ``start``), clamped to the window.

    When a window lies wholly in the padding its inside is empty; the clamp keeps the empty
    slice inside [0, length] so that :func:`_outside` then covers the whole window (an empty
    slice at a negative offset would count from the end and leave stale rows unzeroed).
    """
    return tuple(
        slice(min(max(sl.start - s, 0), n), min(max(sl.stop - s, 0), n))
        for sl, s, n in zip(inside, starts, lengths, strict=True)
    )


def _outside(inner: tuple[slice, ...], lengths) -> list[tuple[slice, ...]]:
    """Index tuples covering the parts of a box of ``lengths`` outside the ``inner`` box."""
    regions = []
    for axis, (sl, length) in enumerate(zip(inner, lengths, strict=True)):
        before = list(inner[:axis])
        after = [slice(None)] * (len(lengths) - axis - 1)
        if sl.start > 0:
            regions.append((*before, slice(0, sl.start), *after))
        if sl.stop < length:
            regions.append((*before, slice(sl.stop, length), *after))
    return regions
