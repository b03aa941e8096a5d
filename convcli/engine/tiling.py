"""How the fast engine cuts one convolution into tiles, and the data movement of one tile.

Arrays are channels last: x ``(n, *spatial, Cin)``, z and dz ``(n, *out, Cout)``; the first
spatial axis is called *rows*.

A :class:`Tile` is a block of whole images, or, when one image is too big, a block of output
rows of one image. A :class:`Plan` chooses the tiles of one call under a scratch budget
(:meth:`Plan.tile_bytes` is the model of a tile's scratch; tiles aim at ``TILE_BYTES`` so
that patch matrices stay in the CPU cache) and owns the scratch buffers its tiles reuse. For
a tile it

1. copies the input rows the tile needs into a small padded buffer (:meth:`Plan.padded_input`;
   skipped when there is no padding), so that every kernel tap reads valid memory;
2. shows every receptive field as a strided view ``(images, *out_tile, *kernel, Cin)``
   (:meth:`Plan.windows`) and copies it into the patch matrix ``cols`` of shape
   ``(groups, tile_pixels, kernel_taps·Cin/groups)`` (:meth:`Plan.im2col`); or, for
   stride-1 layers where it pays (:attr:`Plan.shifted`), copies the padded input only along
   the last kernel axis (:meth:`Plan.shifted_matrix`), whose row-shifted views give each
   kernel row its GEMM operand;
3. in the backward pass, scatters patch gradients back with one strided add per kernel tap
   into its own padded buffer (:meth:`Plan.col2im`) and folds that buffer into dx
   (:meth:`Plan.add_interior`, the adjoint of padding).

Neighbouring row tiles of one image fold into overlapping dx rows. :meth:`Plan.waves` groups
the tiles so that the tiles of one wave write disjoint dx rows; :mod:`convcli.engine.fast`
explains how the waves make parallel tiles race-free.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
from numpy.lib.stride_tricks import as_strided

from convcli.engine.operands import Index
from convcli.spec import Geometry, padding_source

TILE_BYTES = 4 * 2**20  # target scratch per tile: patch matrices that stay in L2/L3
# below this much scratch for the whole call, one tile on one worker is quicker than handing
# pieces to threads (gradient checks make thousands of such calls)
SPLIT_BYTES = 2**20


class Tile:
    """A block of images (all output rows) or a block of output rows of one image.

    Attributes
    ----------
    images : slice of the batch axis
    rows : slice of the first output spatial axis
    n_images, n_rows : their lengths
    """

    __slots__ = ("images", "n_images", "n_rows", "rows")

    def __init__(self, n0: int, n1: int, r0: int, r1: int):
        self.images = slice(n0, n1)
        self.rows = slice(r0, r1)
        self.n_images = n1 - n0
        self.n_rows = r1 - r0


class Plan:
    """Tiling of one convolution under a scratch budget, with buffers reused across tiles.

    Spatial axes are handled generically: the first one is split into row blocks, the
    others are always whole.

    Parameters
    ----------
    geometry : the convolution's resolved shapes (channels last)
    dtype : float32 or float64, the compute dtype
    workspace : int
        Scratch budget in bytes of this plan (one worker's share).
    backward : bool
        Size tiles for the backward pass (patch gradients and a dx buffer besides the
        forward scratch) and colour them into waves.
    workers : int
        How many workers share the tiles (each with a plan of its own); the number of
        blocks of whole images is made a multiple of it.

    Attributes
    ----------
    image_blocks, row_blocks : int
        How many blocks the batch and each image's output rows are cut into (row blocks
        only with one image per block).
    images_per_tile, rows_per_tile : int
        The largest block of each kind: whole images (``rows_per_tile`` = output rows) or
        one image.
    depthwise : bool
        One input channel per group (groups > 1): einsums instead of a GEMM.
    multiplier : int
        Output channels per group (per input channel when depthwise).
    pointwise : bool
        1x1 kernel, stride 1, no padding, one group: x itself is the patch matrix.
    shifted : bool
        Stride 1, one group, 2 or 3 spatial axes, not pointwise, ``kw·Cin >= 3·Cout`` and
        ``taps·Cin < 1024``: the forward pass copies only along the last kernel axis
        (:meth:`shifted_matrix`) and does one GEMM per position of the other kernel axes on
        row-shifted views of that matrix, instead of building the full patch matrix.
    buffers : dict
        Scratch arrays by (name, dtype); lent by the caller for one call.
    dw : ndarray or None
        This worker's dw accumulator in the backward pass.
    """

    def __init__(
        self,
        geometry: Geometry,
        dtype: npt.DTypeLike,
        workspace: int,
        *,
        backward: bool,
        workers: int = 1,
    ):
        self.geometry = geometry
        self.dtype = np.dtype(dtype)
        g = geometry.groups
        self.cin_group = geometry.cin // g
        self.depthwise = self.cin_group == 1 and g > 1
        self.multiplier = geometry.cout // g  # outputs per group; per input channel if depthwise
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
        self.pointwise = is_pointwise(geometry)
        # the kw-copy saves (taps - kw)·Cin copied values per output and costs about three
        # passes over Cout per further kernel row (GEMM product out, read, accumulate): it
        # pays when kw·Cin >= 3·Cout, and not once a patch row of 1024 values makes the
        # full im2col GEMM efficient enough (measured with benchmarks/compare_engines.py
        # --cpu-time: cifar 16->32 and wide 128->128 lose; resnet 64->64, dilated and
        # 7x7 16->16 gain)
        self.shifted = (
            set(geometry.stride) == {1}
            and g == 1
            and len(geometry.kernel) >= 2
            and not self.pointwise
            and geometry.kernel[-1] * geometry.cin >= 3 * geometry.cout
            and self.k_group < 1024
        )
        self.backward = backward
        self.image_blocks, self.row_blocks = self._choose_tiles(workspace, workers)
        self.images_per_tile = -(-geometry.n // self.image_blocks)
        self.rows_per_tile = -(-geometry.out_sizes[0] // self.row_blocks)
        self.offsets = list(itertools.product(*(range(k) for k in geometry.kernel)))
        self.buffers: dict[tuple[str, np.dtype], np.ndarray] = {}
        self.dw: np.ndarray | None = None

    # -- sizing ----------------------------------------------------------------------------

    def tile_bytes(self, images: int, rows: int) -> int:
        """Scratch bytes for a tile of ``images`` x ``rows`` output rows."""
        geometry = self.geometry
        rest_out = math.prod(geometry.out_sizes[1:])
        pixels = images * rows * rest_out
        in_rows = (rows - 1) * geometry.stride[0] + self.spans[0]
        padded_input = images * in_rows * math.prod(self.extent[1:]) * geometry.cin
        elements = 0
        if self.pointwise:
            elements += pixels * geometry.cout  # x is used in place; keep the z tile cache-sized
        elif self.shifted:  # cols for dw; or the kw-copy, its accumulator and a GEMM product
            positions = padded_input // geometry.cin
            kw_cols = positions * geometry.kernel[-1] * geometry.cin
            elements += max(pixels * self.k_group, kw_cols + 2 * positions * geometry.cout)
        elif not self.depthwise:
            elements += pixels * geometry.groups * self.k_group  # cols
            if geometry.groups > 1:
                elements += pixels * geometry.cout  # group transpose temporary
        else:  # einsums need no scratch; the z tile counts, so that tiles stay cache-sized
            elements += pixels * geometry.cout
            if self.backward:  # a padded dx buffer and a per-tap product to scatter
                elements += padded_input + pixels * geometry.cin
        if self.padded or self.depthwise:
            elements += padded_input
        if self.backward and not self.depthwise:
            elements += elements  # dcols / dx buffer mirror the forward ones
            if not self.padded:  # the dx buffer, which no padded input mirrors
                elements += padded_input
        return elements * self.dtype.itemsize

    def _choose_tiles(self, workspace: int, workers: int) -> tuple[int, int]:
        """How many blocks of images and of output rows per image: (image_blocks, row_blocks).

        Whole images when one fits the cache target, in near-equal blocks whose number is a
        multiple of ``workers`` when there are enough images, so that each worker, dealt
        consecutive blocks (:func:`deal`), gets the same number of images to one. A forward
        pass of fewer images than workers also cuts each image into row blocks, so that no
        worker idles. A call under ``SPLIT_BYTES`` of scratch in all is not split further.
        When one image does not fit, near-equal blocks of output rows (this does not depend
        on ``workers``: the backward pass's dx is the same bit for bit for the same tiles).
        """
        geometry = self.geometry
        n, out_rows = geometry.n, geometry.out_sizes[0]
        budget = min(workspace, TILE_BYTES)
        per_image = max(1, self.tile_bytes(1, out_rows))
        if per_image > budget:
            return n, -(-out_rows // self._rows_fitting(budget))
        blocks = -(-n // max(1, min(n, budget // per_image)))
        if n * per_image < SPLIT_BYTES:
            return blocks, 1
        if n >= workers:
            return min(n, -(-blocks // workers) * workers), 1
        if self.backward:
            return blocks, 1
        return n, min(out_rows, workers // math.gcd(n, workers))

    def _rows_fitting(self, budget: int) -> int:
        rows = self.geometry.out_sizes[0]
        per_row = max(1, self.tile_bytes(1, 1))
        guess = max(1, min(rows, budget // per_row))
        while guess > 1 and self.tile_bytes(1, guess) > budget:
            guess -= 1
        return guess

    def tiles(self) -> Iterator[Tile]:
        """Every tile, image block by image block and row block by row block; blocks of one
        kind differ in size by one at most."""
        n, out_rows = self.geometry.n, self.geometry.out_sizes[0]
        images = [k * n // self.image_blocks for k in range(self.image_blocks + 1)]
        rows = [k * out_rows // self.row_blocks for k in range(self.row_blocks + 1)]
        for n0, n1 in itertools.pairwise(images):
            for r0, r1 in itertools.pairwise(rows):
                yield Tile(n0, n1, r0, r1)

    # -- ownership ---------------------------------------------------------------------------

    def waves(self) -> list[list[Tile]]:
        """The tiles in waves whose dx footprints are pairwise disjoint.

        The row blocks of one image are coloured greedily by the exact set of dx rows each
        one folds into (:meth:`fold_rows`, computed as :meth:`add_interior` writes them):
        a block joins the first wave none of whose blocks touches its rows. Tiles of
        different images never share rows, so every image's block at the same rows gets
        the same wave. Without a scatter into dx (forward, stride-1 backward) or with whole
        images per tile, no two tiles write the same memory: one wave.
        """
        tiles = list(self.tiles())
        if not self.backward or self.row_blocks == 1:
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
        waves: list[list[Tile]] = [[] for _ in occupied]
        for tile in tiles:
            waves[colour[tile.rows.start]].append(tile)
        return waves

    def fold_rows(self, tile: Tile) -> np.ndarray:
        """Indices along the first spatial axis of the dx rows :meth:`add_interior` writes for
        this tile: the rows under its receptive fields, folded back as the padding mode says."""
        starts, lengths = self.input_window(tile)
        size = self.geometry.in_sizes[0]
        if self.geometry.padding_mode == "zeros":
            rows = _inside(starts[:1], lengths[:1], (size,))[0]
            return np.arange(rows.start, rows.stop)
        return np.unique(self._source_maps(starts[:1], lengths[:1], (size,))[0])

    # -- scratch -----------------------------------------------------------------------------

    def buffer(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        """A scratch array of ``shape``, carved from a buffer kept for the whole plan."""
        size = math.prod(shape)
        key = (name, self.dtype)
        buffer = self.buffers.get(key)
        if buffer is None or buffer.size < size:
            buffer = np.empty(size, dtype=self.dtype)
            self.buffers[key] = buffer
        return buffer[:size].reshape(shape)

    # -- tensors of a tile -----------------------------------------------------------------

    def output_rows(self, z: np.ndarray, tile: Tile) -> np.ndarray:
        """z (n, *out, Cout) rows of this tile as a (pixels, Cout) view."""
        return z[tile.images, tile.rows].reshape(-1, z.shape[-1])  # contiguous: a view

    def input_window(self, tile: Tile) -> tuple[list[int], list[int]]:
        """Input index range per spatial axis (starts, lengths) that this tile's receptive
        fields cover; starts may be negative and ranges may pass the end (the padding)."""
        geometry = self.geometry
        first_row = tile.rows.start * geometry.stride[0] - geometry.pads[0][0]
        starts = [first_row] + [-before for before, _ in geometry.pads[1:]]
        lengths = [(tile.n_rows - 1) * geometry.stride[0] + self.spans[0], *self.extent[1:]]
        return starts, lengths

    def padded_input(self, x: np.ndarray, tile: Tile, name: str = "padded") -> np.ndarray:
        """x values under this tile's receptive fields, zero where they fall in the padding.

        Returns an array (images, rows_in, *rest_in, Cin) whose index 0 along each spatial
        axis is input position ``start`` of :meth:`input_window`. Without padding this is a
        view of x; otherwise a buffer whose padding is filled as the padding mode says.
        """
        starts, lengths = self.input_window(tile)
        inside = _inside(starts, lengths, x.shape[1:-1])
        source: Index = (tile.images, *inside)
        if not self.padded:
            return x[source]
        buffer = self.buffer(name, (tile.n_images, *lengths, x.shape[-1]))
        if self.geometry.padding_mode != "zeros":  # gather the padding from x itself
            maps = self._source_maps(starts, lengths, x.shape[1:-1])
            gather: Index = (slice(None), *np.ix_(*maps))
            buffer[...] = x[tile.images][gather]
            return buffer
        within = _within_window(inside, starts, lengths)
        target: Index = (slice(None), *within)
        buffer[target] = x[source]
        for region in _outside(within, lengths):
            padding: Index = (slice(None), *region)
            buffer[padding] = 0
        return buffer

    def windows(self, padded: np.ndarray, tile: Tile) -> np.ndarray:
        """Read-only strided view (images, *out_tile, *kernel, Cin) of every receptive field
        of ``padded`` (as returned by :meth:`padded_input`)."""
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

    def row_windows(
        self, padded: np.ndarray, tile: Tile, block: int
    ) -> list[tuple[np.ndarray, slice]] | None:
        """:meth:`windows` with the last output axis and the channels merged into one
        contiguous axis, for long inner loops: ``block`` output positions of the last
        spatial axis at a time.

        Possible when the last spatial axis has stride 1 and ``padded``'s last spatial axis
        and channels are contiguous (else None). Returns up to two read-only views: the
        whole blocks ``(images, *out_tile[:-1], blocks, *kernel, block·Cin)`` and the rest
        ``(images, *out_tile[:-1], 1, *kernel, rest·Cin)``, each with the slice of the
        merged last-axis-and-channels output positions it covers.
        """
        geometry = self.geometry
        item, cin = padded.itemsize, padded.shape[-1]
        if geometry.stride[-1] != 1 or padded.strides[-2:] != (cin * item, item):
            return None
        strides = padded.strides
        spatial = strides[1:-1]
        out_tile = (tile.n_rows, *geometry.out_sizes[1:])
        head = (padded.shape[0], *out_tile[:-1])
        head_strides = (
            strides[0],
            *(st * s for st, s in zip(spatial[:-1], geometry.stride[:-1], strict=True)),
        )
        kernel_strides = tuple(st * d for st, d in zip(spatial, geometry.dilation, strict=True))
        whole, rest = divmod(out_tile[-1], block)
        views = []
        for start, count, length in ((0, whole, block), (whole * block, 1 if rest else 0, rest)):
            if count == 0:
                continue
            base = padded[(Ellipsis, slice(start, None), slice(None))]
            view = as_strided(
                base,
                shape=(*head, count, *geometry.kernel, length * cin),
                strides=(*head_strides, block * spatial[-1], *kernel_strides, item),
                writeable=False,
            )
            views.append((view, slice(start * cin, (start + count * length) * cin)))
        return views

    def writable_windows(self, padded: np.ndarray, tile: Tile) -> np.ndarray:
        """:meth:`windows`, writable: for adding patch gradients into a padded dx buffer."""
        view = self.windows(padded, tile)
        return as_strided(padded, shape=view.shape, strides=view.strides, writeable=True)

    def im2col(self, x: np.ndarray, tile: Tile) -> np.ndarray:
        """Patch matrix (g, pixels, taps·Cin/g) of x (n, *spatial, Cin) for this tile."""
        geometry = self.geometry
        g = geometry.groups
        if self.pointwise:  # 1x1, stride 1, no padding, one group: x itself is the matrix
            return x[tile.images, tile.rows].reshape(1, -1, geometry.cin)
        windows = self.windows(self.padded_input(x, tile), tile)
        # (images, *out, *kernel, g, Cin/g) -> (g, images, *out, *kernel, Cin/g)
        windows = windows.reshape(*windows.shape[:-1], g, self.cin_group)
        windows = np.moveaxis(windows, -2, 0)
        cols = self.buffer("cols", windows.shape)
        np.copyto(cols, windows)
        return cols.reshape(g, -1, self.k_group)

    def shifted_matrix(self, x: np.ndarray, tile: Tile) -> tuple[np.ndarray, list[int]]:
        """The tile's padded input copied along the last kernel axis only, for a stride-1
        layer (:attr:`shifted`).

        With the padded input (images, *window lengths, Cin) flattened to ``positions`` rows
        of Cin, row p of the returned matrix (positions, kw·Cin) holds rows p, p + d, ...,
        p + (kw - 1)·d of it (d the last axis's dilation; zeros past the end). The
        receptive field of the output at padded position p is then rows p + offset of this
        matrix, one offset per position of the other kernel axes, returned in kernel order:
        output = Σ over offsets of matrix[offset : offset + q] @ w[that kernel row], for the
        first q = positions - max(offsets) rows. Rows whose position lies past an output's
        extent (the last span - 1 positions of each axis) are computed and dropped.
        """
        geometry = self.geometry
        cin, kw, d = geometry.cin, geometry.kernel[-1], geometry.dilation[-1]
        padded = self.padded_input(x, tile)
        flat = padded.reshape(-1, cin)
        positions = flat.shape[0]
        matrix = self.buffer("kw_cols", (positions, kw, cin))
        for b in range(kw):
            shift = min(b * d, positions)
            matrix[: positions - shift, b] = flat[shift:]
            matrix[positions - shift :, b] = 0
        lengths = padded.shape[1:-1]
        steps = [math.prod(lengths[axis + 1 :]) for axis in range(len(lengths) - 1)]
        dilations = geometry.dilation[:-1]
        offsets = [
            sum(a * dil * step for a, dil, step in zip(rest, dilations, steps, strict=True))
            for rest in itertools.product(*(range(k) for k in geometry.kernel[:-1]))
        ]
        return matrix.reshape(positions, kw * cin), offsets

    def dcols(self, tile: Tile) -> np.ndarray:
        """Scratch (g, pixels, taps·Cin/g) for the patch gradients."""
        pixels = tile.n_images * tile.n_rows * math.prod(self.geometry.out_sizes[1:])
        return self.buffer("dcols", (self.geometry.groups, pixels, self.k_group))

    def dx_buffer(self, tile: Tile) -> np.ndarray:
        """A zeroed padded dx buffer (images, *window lengths, Cin) for this tile."""
        _, lengths = self.input_window(tile)
        dx_padded = self.buffer("dx_padded", (tile.n_images, *lengths, self.geometry.cin))
        dx_padded[...] = 0
        return dx_padded

    def col2im(self, dcols: np.ndarray, dx: np.ndarray, tile: Tile) -> None:
        """Add the patch gradients dcols (g, pixels, taps·Cin/g) into dx (n, *spatial, Cin)."""
        g = self.geometry.groups
        dx_padded = self.dx_buffer(tile)
        windows = self.writable_windows(dx_padded, tile)
        windows = np.moveaxis(windows.reshape(*windows.shape[:-1], g, self.cin_group), -2, 0)
        patches = dcols.reshape(windows.shape)
        for offset in self.offsets:
            index: Index = (Ellipsis, *offset, slice(None))
            windows[index] += patches[index]
        self.add_interior(dx_padded, dx, tile)

    def add_interior(self, padded: np.ndarray, target: np.ndarray, tile: Tile) -> None:
        """target[images] += padded, folded back onto the input (the adjoint of padding):
        zeros drop the padding; other modes add it onto the pixels it was copied from.

        ``padded`` is (images, *window lengths, Cin) as from :meth:`dx_buffer`; ``target``
        is dx (n, *spatial, Cin). The dx rows written are :meth:`fold_rows`.
        """
        starts, lengths = self.input_window(tile)
        if self.geometry.padding_mode != "zeros":
            maps = self._source_maps(starts, lengths, target.shape[1:-1])
            # numpy's stub for ufunc.at admits only integer arrays; slices work at runtime
            scatter: tuple[Any, ...] = (slice(None), *np.ix_(*maps))
            np.add.at(target[tile.images], scatter, padded)
            return
        inside = _inside(starts, lengths, target.shape[1:-1])
        into: Index = (tile.images, *inside)
        source: Index = (slice(None), *_within_window(inside, starts, lengths))
        target[into] += padded[source]

    def _source_maps(
        self, starts: Sequence[int], lengths: Sequence[int], sizes: Sequence[int]
    ) -> list[np.ndarray]:
        """Per axis, the input index each position of a padded window reads."""
        mode = self.geometry.padding_mode
        return [
            padding_source(np.arange(start, start + length), size, mode)
            for start, length, size in zip(starts, lengths, sizes, strict=True)
        ]


def is_pointwise(geometry: Geometry) -> bool:
    """1x1 kernel, stride 1, no padding, one group: x itself is the patch matrix."""
    return (
        math.prod(geometry.kernel) == 1
        and set(geometry.stride) == {1}
        and not any(lo or hi for lo, hi in geometry.pads)
        and geometry.groups == 1
    )


def scratch_bound(
    geometry: Geometry,
    dtype: npt.DTypeLike,
    workspace: int,
    workers: int,
    passes: Sequence[bool] = (False, True),
) -> int:
    """An upper bound in bytes of the scratch ``workers`` plans sharing ``workspace`` use.

    Each worker's plan gets ``workspace // workers`` and picks its tiles for the forward
    (``False`` in ``passes``) or the backward pass (``True``); the bound is the workers times
    the biggest of those tiles: at most the workspace, unless even the smallest tile (one
    output row of one image) is bigger.
    """
    share = max(1, workspace // workers)
    one_tile = 0
    for backward in passes:
        plan = Plan(geometry, dtype, share, backward=backward, workers=workers)
        one_tile = max(one_tile, plan.tile_bytes(plan.images_per_tile, plan.rows_per_tile))
    return workers * one_tile


def _inside(starts: Sequence[int], lengths: Sequence[int], sizes: Sequence[int]) -> list[slice]:
    """Per axis, the part of [start, start + length) that lies in [0, size) (may be empty)."""
    slices = []
    for start, length, size in zip(starts, lengths, sizes, strict=True):
        lo = min(max(start, 0), size)
        slices.append(slice(lo, max(lo, min(start + length, size))))
    return slices


def _within_window(
    inside: list[slice], starts: Sequence[int], lengths: Sequence[int]
) -> tuple[slice, ...]:
    """The slices of :func:`_inside` in window coordinates (0 = ``start``), clamped to the window.

    When a window lies wholly in the padding its inside is empty; the clamp keeps the empty
    slice inside [0, length] so that :func:`_outside` then covers the whole window (an empty
    slice at a negative offset would count from the end and leave stale rows unzeroed).
    """
    return tuple(
        slice(min(max(sl.start - s, 0), n), min(max(sl.stop - s, 0), n))
        for sl, s, n in zip(inside, starts, lengths, strict=True)
    )


def _outside(inner: tuple[slice, ...], lengths: Sequence[int]) -> list[Index]:
    """Index tuples covering the parts of a box of ``lengths`` outside the ``inner`` box."""
    regions: list[Index] = []
    for axis, (sl, length) in enumerate(zip(inner, lengths, strict=True)):
        before = list(inner[:axis])
        after = [slice(None)] * (len(lengths) - axis - 1)
        if sl.start > 0:
            regions.append((*before, slice(0, sl.start), *after))
        if sl.stop < length:
            regions.append((*before, slice(sl.stop, length), *after))
    return regions


def deal(wave: Sequence[Tile], workers: int) -> list[list[Tile]]:
    """The tiles of one wave shared out to ``workers`` workers: consecutive runs of near-equal
    length, so that equal blocks (:meth:`Plan.tiles`) give each worker equal work."""
    bounds = [k * len(wave) // workers for k in range(workers + 1)]
    return [list(wave[lo:hi]) for lo, hi in itertools.pairwise(bounds)]
