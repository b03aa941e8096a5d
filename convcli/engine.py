"""The fast conv engine: im2col + one GEMM per tile, batch processed in memory-bounded tiles.

Layout: x NHWC ``(n, H, W, Cin)``, w HWIO ``(kh, kw, Cin / groups, Cout)``,
z and dz ``(n, Ho, Wo, Cout)``; output sizes from :func:`convcli.spec.output_size`.

How it works. A *tile* is a block of images, or, when one image is too big for the
budget, a block of output rows of one image. For each tile the patch matrix ``cols``
of shape ``(groups, tile_pixels, kh * kw * Cin/groups)`` is filled with one strided
copy per kernel offset (padding is never materialised: out-of-range taps are zeroed),
and a single (batched over groups) matrix product gives the tile's output. The backward
pass rebuilds ``cols`` per tile, accumulates ``dw`` with one GEMM and scatters
``dcols = dz @ wᵀ`` back into ``dx`` with one strided add per kernel offset.

There is no Python loop over images, output pixels or channels; the loops are over
kernel offsets and tiles. Scratch memory (``cols``, ``dcols``, group transposes) stays
under ``workspace`` bytes, except that one output row of one image is the smallest tile.
"""

from __future__ import annotations

import itertools

import numpy as np

from convcli.operands import ConvCache, prepare, prepare_upstream, shape_bias_grad
from convcli.spec import ConvSpec, Geometry

DEFAULT_WORKSPACE = 256 * 2**20  # bytes


def conv_forward(x, w, b=None, spec: ConvSpec | None = None, *, workspace: int = DEFAULT_WORKSPACE):
    """Convolve x with w and add b.

    Parameters
    ----------
    x : ndarray of shape (n, H, W, Cin)
    w : ndarray of shape (kh, kw, Cin / groups, Cout)
    b : None or ndarray of shape (Cout,) or (1, 1, 1, Cout)
    spec : ConvSpec, default ``ConvSpec()`` (stride 1, no padding)
    workspace : int
        Budget in bytes for scratch buffers (default 256 MiB).

    Returns
    -------
    z : ndarray of shape (n, Ho, Wo, Cout), dtype float32 or float64 (the wider of the inputs)
    cache : ConvCache for :func:`conv_backward`
    """
    x, w, b, b_shape, geometry = prepare(x, w, b, spec)
    workspace = _check_workspace(workspace)
    z = np.empty(geometry.out_shape, dtype=x.dtype)
    w_groups = _weights_by_group(w, geometry)
    plan = _Plan(geometry, x.dtype.itemsize, workspace, buffers=1)
    z_rows = z.reshape(geometry.n, geometry.out_sizes[0], -1)
    for tile in plan.tiles():
        cols = plan.im2col(x, tile)
        z_tile = z_rows[tile.images, tile.rows].reshape(-1, geometry.cout)
        _grouped_matmul(cols, w_groups, z_tile)
    if b is not None:
        z += b
    cache = ConvCache(
        x=x,
        w=w,
        b_shape=b_shape,
        spec=spec if spec is not None else ConvSpec(),
        geometry=geometry,
        workspace=workspace,
    )
    return z, cache


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
    w_groups = _weights_by_group(cache.w.astype(dtype, copy=False), geometry)
    g, k_group, cout_group = w_groups.shape
    dx = np.zeros(x.shape, dtype=dtype)
    dw_groups = np.zeros((g, k_group, cout_group), dtype=dtype)
    plan = _Plan(geometry, dtype.itemsize, cache.workspace, buffers=2)
    dz_rows = dz.reshape(geometry.n, geometry.out_sizes[0], -1)
    for tile in plan.tiles():
        cols = plan.im2col(x, tile)
        dz_tile = dz_rows[tile.images, tile.rows].reshape(-1, g, cout_group).transpose(1, 0, 2)
        dw_groups += np.matmul(cols.transpose(0, 2, 1), dz_tile)
        dcols = np.matmul(dz_tile, w_groups.transpose(0, 2, 1), out=plan.second_buffer(tile))
        plan.col2im(dcols, dx, tile)
    dw = _weights_from_groups(dw_groups, geometry)
    db = dz.sum(axis=tuple(range(dz.ndim - 1))) if cache.b_shape is not None else None
    return dx, dw, shape_bias_grad(db, cache.b_shape)


def _check_workspace(workspace) -> int:
    from convcli.errors import UsageError

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
    g, _k_group, _cout_group = w_groups.shape
    shape = (*geometry.kernel, geometry.cin // g, geometry.cout)
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


def _valid_outputs(lo: int, hi: int, offset: int, stride: int, size: int) -> tuple[int, int]:
    """Output positions o in [lo, hi) whose input position o*stride + offset is in [0, size)."""
    first = max(lo, -(offset // stride))
    last = min(hi, (size - 1 - offset) // stride + 1)
    return first, max(first, last)


class _Tile:
    """A block of images (all output rows) or a block of output rows of one image."""

    __slots__ = ("images", "n_images", "n_rows", "rows")

    def __init__(self, n0: int, n1: int, r0: int, r1: int):
        self.images = slice(n0, n1)
        self.rows = slice(r0, r1)
        self.n_images = n1 - n0
        self.n_rows = r1 - r0


class _Plan:
    """Tiling of one convolution under a scratch budget, with reusable buffers."""

    def __init__(self, geometry: Geometry, itemsize: int, workspace: int, buffers: int):
        self.geometry = geometry
        g = geometry.groups
        self.k_group = int(np.prod(geometry.kernel)) * geometry.cin // g
        out_rows, *out_rest = geometry.out_sizes
        self.row_pixels = int(np.prod(out_rest, dtype=np.int64))
        # Scratch per output row: `buffers` patch matrices, plus a (pixels, Cout) temporary
        # for the group transposes when groups > 1.
        per_row = self.row_pixels * (buffers * g * self.k_group + (geometry.cout if g > 1 else 0))
        rows_fit = max(1, workspace // max(1, per_row * itemsize))
        if rows_fit >= out_rows:
            self.images_per_tile = min(geometry.n, rows_fit // out_rows)
            self.rows_per_tile = out_rows
        else:
            self.images_per_tile = 1
            self.rows_per_tile = rows_fit
        pixels = self.images_per_tile * self.rows_per_tile * self.row_pixels
        size = g * pixels * self.k_group
        self._buffers = [np.empty(size, dtype=np.dtype(f"f{itemsize}")) for _ in range(buffers)]
        self._offsets = list(itertools.product(*(range(k) for k in geometry.kernel)))

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

    def _patch_shape(self, tile: _Tile) -> tuple[int, ...]:
        """(g, images, rows, *other output axes, *kernel, Cin/g) for this tile."""
        geometry = self.geometry
        g = geometry.groups
        return (
            g,
            tile.n_images,
            tile.n_rows,
            *geometry.out_sizes[1:],
            *geometry.kernel,
            geometry.cin // g,
        )

    def _patch_view(self, buffer: np.ndarray, tile: _Tile) -> np.ndarray:
        shape = self._patch_shape(tile)
        return buffer[: int(np.prod(shape))].reshape(shape)

    def _as_matrix(self, patches: np.ndarray) -> np.ndarray:
        return patches.reshape(self.geometry.groups, -1, self.k_group)

    def second_buffer(self, tile: _Tile) -> np.ndarray:
        return self._as_matrix(self._patch_view(self._buffers[1], tile))

    def _offset_regions(self, tile: _Tile, offset: tuple[int, ...]):
        """For one kernel offset: (output ranges per spatial axis, matching input slices)."""
        geometry = self.geometry
        bounds = [(tile.rows.start, tile.rows.stop)] + [(0, o) for o in geometry.out_sizes[1:]]
        ranges, sources = [], []
        for (lo, hi), k, s, d, (before, _), size in zip(
            bounds,
            offset,
            geometry.stride,
            geometry.dilation,
            geometry.pads,
            geometry.in_sizes,
            strict=True,
        ):
            shift = k * d - before
            first, last = _valid_outputs(lo, hi, shift, s, size)
            ranges.append((first, last, lo, hi))
            start = first * s + shift
            sources.append(
                slice(start, start + (last - first - 1) * s + 1, s) if last > first else slice(0, 0)
            )
        return ranges, sources

    def im2col(self, x: np.ndarray, tile: _Tile) -> np.ndarray:
        """Patch matrix (g, pixels, kh*kw*Cin/g) of x (n, H, W, Cin) for this tile."""
        geometry = self.geometry
        g = geometry.groups
        patches = self._patch_view(self._buffers[0], tile)
        x_groups = x.reshape(*x.shape[:-1], g, geometry.cin // g)
        nd = len(geometry.kernel)
        for offset in self._offsets:
            ranges, sources = self._offset_regions(tile, offset)
            target = patches[(slice(None), slice(None), *[slice(None)] * nd, *offset)]
            inner = tuple(slice(first - lo, last - lo) for first, last, lo, _ in ranges)
            source = x_groups[(tile.images, *sources)]  # (images, *valid, g, Cin/g)
            target[(slice(None), slice(None), *inner)] = np.moveaxis(source, -2, 0)
            for zero in _outside(ranges):
                target[(slice(None), slice(None), *zero)] = 0
        return self._as_matrix(patches)

    def col2im(self, dcols: np.ndarray, dx: np.ndarray, tile: _Tile) -> None:
        """Add the patch gradients dcols (g, pixels, K) into dx (n, H, W, Cin)."""
        geometry = self.geometry
        g = geometry.groups
        patches = dcols.reshape(self._patch_shape(tile))
        dx_groups = dx.reshape(*dx.shape[:-1], g, geometry.cin // g)
        for offset in self._offsets:
            ranges, sources = self._offset_regions(tile, offset)
            if any(last == first for first, last, _, _ in ranges):
                continue
            inner = tuple(slice(first - lo, last - lo) for first, last, lo, _ in ranges)
            source = patches[(slice(None), slice(None), *inner, *offset)]
            dx_groups[(tile.images, *sources)] += np.moveaxis(source, 0, -2)


def _outside(ranges):
    """Index tuples (relative to the tile) covering the outputs outside the valid box."""
    regions = []
    for axis, (first, last, lo, hi) in enumerate(ranges):
        before = [slice(f - l0, la - l0) for f, la, l0, _ in ranges[:axis]]
        after = [slice(None)] * (len(ranges) - axis - 1)
        if first > lo:
            regions.append((*before, slice(0, first - lo), *after))
        if last < hi:
            regions.append((*before, slice(last - lo, hi - lo), *after))
    return regions
