"""The arithmetic of the fast engine: weights laid out for a GEMM, the grouped matrix product,
the einsum kernels of depthwise layers, and dx as a transposed convolution.

Arrays are channels last: x ``(n, *spatial, Cin)``, w ``(*kernel, Cin/groups, Cout)``; a tile's
outputs are ``(pixels, Cout)`` views from :meth:`~convcli.engine.tiling.Plan.output_rows`,
its patch matrix ``(groups, pixels, K)`` with ``K = taps·Cin/groups`` from
:meth:`~convcli.engine.tiling.Plan.im2col`.

References
----------
K. Chellapilla, S. Puri, P. Simard, "High Performance Convolutional Neural Networks for
Document Processing" (2006): convolution as im2col followed by one matrix product.
V. Dumoulin, F. Visin, "A guide to convolution arithmetic for deep learning" (2016): the
gradient of a convolution with respect to its input is a (transposed) convolution.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np

from convcli.engine.operands import Index
from convcli.engine.tiling import Plan, Tile
from convcli.spec import ConvSpec, Geometry


def is_depthwise(geometry: Geometry) -> bool:
    """One input channel per group (and more than one group): no GEMM is worth its setup."""
    return geometry.cin == geometry.groups and geometry.groups > 1


#: values per inner loop of the merged depthwise einsums (a block of output positions of the
#: last spatial axis times the channels; long inner loops, and tiled weights that stay
#: small) and of :func:`channel_sums`
ROW_BLOCK_VALUES = 4096


#: values of the merged-row weights and dw sums at most (kernel taps times a block of the
#: row): a long kernel gets shorter blocks, so that they stay small; counted by
#: :func:`merged_row_bytes`
ROW_WEIGHT_VALUES = 2**18


#: rows (images times output positions but the last axis) a tile needs before dw takes the
#: merged rows of :func:`depthwise_backward`
MERGED_DW_LINES = 16


def channel_sums(a: np.ndarray) -> np.ndarray:
    """Σ of a (..., C) over every axis but the last (db from dz), as sums over blocks of whole
    rows of about :data:`ROW_BLOCK_VALUES` values, then over the block: long inner loops
    (NumPy's reduction over the leading axes of a (pixels, C) array loops over C alone; 2 to
    3 times slower, measured) and shorter chains of additions."""
    channels = a.shape[-1]
    rows = a.reshape(-1, channels)
    block = max(1, ROW_BLOCK_VALUES // max(1, channels))
    whole = rows.shape[0] // block * block
    sums = rows[:whole].reshape(-1, block * channels).sum(axis=0).reshape(block, channels)
    return sums.sum(axis=0) + rows[whole:].sum(axis=0)


# -- GEMM --------------------------------------------------------------------------------------


def weights_by_group(w: np.ndarray, geometry: Geometry) -> np.ndarray:
    """Weights (*kernel, Cin/g, Cout) -> (g, K, Cout/g), C-contiguous, K = taps·Cin/g."""
    g = geometry.groups
    k_group = w.size // geometry.cout
    return np.ascontiguousarray(w.reshape(k_group, g, geometry.cout // g).transpose(1, 0, 2))


def weights_from_groups(w_groups: np.ndarray, geometry: Geometry) -> np.ndarray:
    """Inverse of :func:`weights_by_group`: (g, K, Cout/g) -> (*kernel, Cin/g, Cout)."""
    shape = (*geometry.kernel, geometry.cin // geometry.groups, geometry.cout)
    return np.ascontiguousarray(w_groups.transpose(1, 0, 2)).reshape(shape)


def grouped_matmul(cols: np.ndarray, w_groups: np.ndarray, out: np.ndarray) -> None:
    """out (pixels, Cout) = cols (g, pixels, K) @ w_groups (g, K, Cout/g), groups side by side."""
    if w_groups.shape[0] == 1:
        np.matmul(cols[0], w_groups[0], out=out)
    else:
        pixels = out.shape[0]
        out.reshape(pixels, w_groups.shape[0], -1)[...] = np.matmul(cols, w_groups).transpose(
            1, 0, 2
        )


def shifted_forward(
    plan: Plan, x: np.ndarray, w_rows: np.ndarray, tile: Tile, out: np.ndarray
) -> None:
    """out (pixels, Cout) of a stride-1, one-group tile without a full patch matrix.

    x is (n, *spatial, Cin), w_rows the weights (taps / kw, kw·Cin, Cout) (kernel rows of
    the last axis, in kernel order). One GEMM per kernel row on shifted rows of
    :meth:`~convcli.engine.tiling.Plan.shifted_matrix`, accumulated over the padded grid,
    then the valid outputs copied out.
    """
    matrix, offsets = plan.shifted_matrix(x, tile)
    positions, cout = matrix.shape[0], w_rows.shape[-1]
    rows = positions - offsets[-1]
    acc = plan.buffer("acc", (positions, cout))
    np.matmul(matrix[:rows], w_rows[0], out=acc[:rows])
    if len(offsets) > 1:
        product = plan.buffer("product", (rows, cout))
        for offset, w_row in zip(offsets[1:], w_rows[1:], strict=True):
            np.matmul(matrix[offset : offset + rows], w_row, out=product)
            acc[:rows] += product
    _, lengths = plan.input_window(tile)
    grid = acc.reshape(tile.n_images, *lengths, cout)
    out_tile = (tile.n_rows, *plan.geometry.out_sizes[1:])
    valid: Index = (slice(None), *(slice(0, size) for size in out_tile), slice(None))
    out.reshape(tile.n_images, *out_tile, cout)[...] = grid[valid]


def transposed_conv(geometry: Geometry, w: np.ndarray) -> tuple[np.ndarray, ConvSpec] | None:
    """dx as a convolution of dz, when it is one (stride 1, zero padding, :func:`dx_convolution`).

    dx[h] = Σ_i dz[h + pad_top - i·d] · w[i], i.e. with i' = k - 1 - i a correlation of dz
    with w[k - 1 - i'] and padding ``d·(k - 1) - pad_top`` on top (likewise bottom, per
    axis): w flipped in space, its channel axes swapped per group.

    Parameters
    ----------
    geometry : the forward convolution's geometry
    w : ndarray of shape (*kernel, Cin/g, Cout)

    Returns
    -------
    (w_t, spec) with w_t of shape (*kernel, Cout/g, Cin) and the spec to convolve dz
    (n, *out, Cout) with to get dx (n, *spatial, Cin); or None when the padding this needs
    would be negative (then dx is gathered from the patch gradients instead).
    """
    spec = dx_convolution(geometry)
    if spec is None:
        return None
    g = geometry.groups
    nd = len(geometry.kernel)
    cin_g, cout_g = geometry.cin // g, geometry.cout // g
    flip: Index = (slice(None, None, -1),) * nd
    flipped = w[flip]  # (*kernel, Cin/g, Cout)
    # output channel (group k, co) of the forward pass is input channel k*Cout/g + co here
    grouped = flipped.reshape(*geometry.kernel, cin_g, g, cout_g)
    w_t = np.ascontiguousarray(np.swapaxes(grouped, -3, -1)).reshape(
        *geometry.kernel, cout_g, g * cin_g
    )
    return w_t, spec


def dx_convolution(geometry: Geometry) -> ConvSpec | None:
    """The spec of the convolution of dz that gives dx (see :func:`transposed_conv`), or None
    when dx is not one (stride above 1, other padding modes, negative padding) or is not
    done this way (depthwise: see :func:`dx_phases`)."""
    if set(geometry.stride) != {1} or is_depthwise(geometry) or geometry.padding_mode != "zeros":
        return None
    pads = tuple(
        (d * (k - 1) - lo, d * (k - 1) - hi)
        for d, k, (lo, hi) in zip(geometry.dilation, geometry.kernel, geometry.pads, strict=True)
    )
    if any(v < 0 for pair in pads for v in pair):
        return None
    return ConvSpec(
        stride=geometry.stride, padding=pads, dilation=geometry.dilation, groups=geometry.groups
    )


# -- dx of a depthwise layer by phases ----------------------------------------------------------


@dataclass(frozen=True)
class Phase:
    """The dx positions of one residue of the stride per spatial axis, as a stride-1
    depthwise correlation of a slice of dz (see :func:`dx_phases`).

    Attributes
    ----------
    dx : per spatial axis of dx, every s-th position from the residue
    dz : per spatial axis of dz, the positions this phase reads (explicit start and stop)
    taps : per spatial axis, the kernel positions that reach these dx positions, in reverse
        order (the flip of the adjoint); ``w[np.ix_(*taps)]`` is the phase's kernel
    spec : stride 1, the padding and dilation that give exactly the phase's dx positions
    """

    dx: tuple[slice, ...]
    dz: tuple[slice, ...]
    taps: tuple[list[int], ...]
    spec: ConvSpec


def dx_phases(geometry: Geometry) -> list[Phase] | None:
    """dx of a depthwise layer with multiplier 1 and zero padding as stride-1 depthwise
    correlations of dz, one per residue of the stride (s^d phases), or None for other layers.

    Per axis (stride s, dilation d, padding lo before): dx[r + t·s] = Σ w[i]·dz[t + δ_i]
    over the taps i with (r + lo - i·d) divisible by s, δ_i = (r + lo - i·d) / s. Those taps
    are equally spaced and δ falls by d / gcd(d, s) from one to the next, so with the taps in
    reverse order this is a correlation of dz with dilation d / gcd(d, s), padded (or
    sliced) so that it has exactly the phase's positions. Residues that no tap reaches keep
    dx zero and have no phase. At stride 1 there is one phase: the flipped-kernel
    correlation of :func:`transposed_conv`. Each phase runs through the merged-row forward
    kernel instead of a scatter per tap into a padded dx buffer.
    """
    if not is_depthwise(geometry) or geometry.cout != geometry.cin:
        return None
    if geometry.padding_mode != "zeros":
        return None
    per_axis = []
    for size, out, k, s, d, (lo, _) in zip(
        geometry.in_sizes,
        geometry.out_sizes,
        geometry.kernel,
        geometry.stride,
        geometry.dilation,
        geometry.pads,
        strict=True,
    ):
        options = []
        for r in range(min(s, size)):
            count = -(-(size - r) // s)  # dx positions r, r + s, ... of this residue
            taps = [i for i in range(k) if (r + lo - i * d) % s == 0]
            if not taps:
                continue
            deltas = [(r + lo - i * d) // s for i in taps]  # falling
            first, last = max(0, deltas[-1]), min(out - 1, count - 1 + deltas[0])
            if first > last:
                continue
            pads = (first - deltas[-1], count - 1 + deltas[0] - last)
            step = deltas[0] - deltas[1] if len(taps) > 1 else 1
            options.append((slice(r, None, s), slice(first, last + 1), taps[::-1], pads, step))
        per_axis.append(options)
    phases = []
    for combination in itertools.product(*per_axis):
        dx_slices, dz_slices, taps, pads, steps = zip(*combination, strict=True)
        spec = ConvSpec(padding=pads, dilation=steps, groups=geometry.groups)
        phases.append(Phase(dx_slices, dz_slices, taps, spec))
    return phases


# -- depthwise (one input channel per group) ----------------------------------------------------
#
# One einsum per tile and pass: NumPy's sum-of-products loops multiply and accumulate in one
# sweep over the tile's strided receptive-field view, without a temporary per tap (measured
# about 1.6x / 2x faster in float32 / float64 than a multiply then an add per tap).


def _depthwise_subscripts(plan: Plan) -> tuple[str, str, str]:
    """einsum letters of the batch and output axes, the kernel axes, and the channel axes
    (``c``, or ``cm`` when each input channel has a multiplier m > 1 of outputs)."""
    nd = len(plan.geometry.kernel)
    channels = "c" if plan.multiplier == 1 else "cm"
    return "n" + "opq"[:nd], "ijk"[:nd], channels


def _depthwise_weights(plan: Plan, w: np.ndarray) -> np.ndarray:
    """(*kernel, 1, Cout) -> (*kernel, Cin) or, with a multiplier m > 1, (*kernel, Cin, m):
    output channel c*m + j reads input channel c."""
    geometry = plan.geometry
    if plan.multiplier == 1:
        return w.reshape(*geometry.kernel, geometry.groups)
    return w.reshape(*geometry.kernel, geometry.groups, plan.multiplier)


def _by_channel(plan: Plan, rows: np.ndarray, tile: Tile) -> np.ndarray:
    """A tile's z or dz rows (pixels, Cout) as (images, *out_tile, Cin[, m])."""
    geometry = plan.geometry
    channels = (geometry.groups,) if plan.multiplier == 1 else (geometry.groups, plan.multiplier)
    return rows.reshape(tile.n_images, tile.n_rows, *geometry.out_sizes[1:], *channels)


def row_block(geometry: Geometry) -> int:
    """Output positions of the last spatial axis per merged einsum row (at least 1), with
    the merged weights (taps, block·Cin) under :data:`ROW_WEIGHT_VALUES` values."""
    taps_cin = math.prod(geometry.kernel) * geometry.cin
    return max(
        1,
        min(
            geometry.out_sizes[-1],
            ROW_BLOCK_VALUES // geometry.cin,
            ROW_WEIGHT_VALUES // taps_cin,
        ),
    )


def merged_row_bytes(geometry: Geometry, dtype: np.dtype, workers: int) -> int:
    """Bytes outside the tiles' scratch that the merged rows of a multiplier-1 depthwise
    layer take at once, at most: the weights tiled along a block of the row (forward), or
    per worker a tile's dw sums and their running total (backward); 0 for other layers."""
    if not is_depthwise(geometry) or geometry.cout != geometry.cin:
        return 0
    values = math.prod(geometry.kernel) * row_block(geometry) * geometry.cin
    return 2 * workers * values * np.dtype(dtype).itemsize


def depthwise_row_weights(geometry: Geometry, w: np.ndarray) -> np.ndarray | None:
    """The weights of a multiplier-1 depthwise layer tiled along a block of the last output
    axis, (*kernel, block·Cin) with block·Cin about :data:`ROW_BLOCK_VALUES`: the second
    operand of :func:`depthwise_forward`'s merged einsum (None for a multiplier above 1)."""
    cin = geometry.cin
    if geometry.cout != cin:
        return None
    block = row_block(geometry)
    per_tap = w.reshape(*geometry.kernel, 1, cin)
    return np.ascontiguousarray(np.broadcast_to(per_tap, (*geometry.kernel, block, cin))).reshape(
        *geometry.kernel, block * cin
    )


def depthwise_forward(
    plan: Plan,
    x: np.ndarray,
    w: np.ndarray,
    tile: Tile,
    out: np.ndarray,
    row_weights: np.ndarray | None = None,
) -> None:
    """out (pixels, Cout) = Σ over taps of window(tap) ⊙ w(tap), per channel.

    x is (n, *spatial, Cin), w (*kernel, 1, Cout); one einsum over the strided view of the
    tile's receptive fields (a GEMM would have an inner dimension of 1). With
    ``row_weights`` from :func:`depthwise_row_weights` (multiplier 1) and stride 1 along
    the last spatial axis, the einsum runs over :meth:`~convcli.engine.tiling.Plan.row_windows`,
    whose inner loop is a block of output positions times the channels instead of the
    channels alone (measured 2.7x / 1.4x faster in float32 / float64 on 56 x 64 rows).
    """
    padded = plan.padded_input(x, tile)
    pixels, taps, channels = _depthwise_subscripts(plan)
    if row_weights is not None:
        block = row_weights.shape[-1] // plan.geometry.cin
        views = plan.row_windows(padded, tile, block)
        if views is not None:
            out_tile = (tile.n_rows, *plan.geometry.out_sizes[1:])
            rows = out.reshape(tile.n_images, *out_tile[:-1], -1)  # a view: out is contiguous
            for view, part in views:
                target = rows[..., part].reshape(*view.shape[: len(pixels)], -1)
                length = view.shape[-1]
                np.einsum(
                    f"{pixels}{taps}x,{taps}x->{pixels}x",
                    view,
                    row_weights[..., :length],
                    out=target,
                )
            return
    np.einsum(
        f"{pixels}{taps}c,{taps}{channels}->{pixels}{channels}",
        plan.windows(padded, tile),
        _depthwise_weights(plan, w),
        out=_by_channel(plan, out, tile),
    )


def depthwise_backward(
    plan: Plan,
    x: np.ndarray | None,
    w: np.ndarray,
    dz_tile: np.ndarray,
    tile: Tile,
    dx: np.ndarray | None,
    dw: np.ndarray | None,
) -> None:
    """Accumulate dw (*kernel, 1, Cout) and dx (n, *spatial, Cin) for one tile of a depthwise
    layer, given the tile's dz rows ``dz_tile`` (pixels, Cout).

    Either gradient may be skipped: ``dw`` None (then ``x`` may be None too) or ``dx`` None.
    dw is one einsum; dx is scattered tap by tap into a padded buffer (with zero padding and
    multiplier 1 the caller gets dx by :func:`dx_phases` instead).
    """
    dz_view = _by_channel(plan, dz_tile, tile)
    pixels, taps, channels = _depthwise_subscripts(plan)
    if dw is not None and x is not None:
        padded = plan.padded_input(x, tile)
        dw_view = dw.reshape(_depthwise_weights(plan, dw).shape)
        # one einsum per block of a row: worth its call when it covers enough rows (1-D
        # layers have one row per image: the plain einsum, measured)
        lines = tile.n_images * math.prod((tile.n_rows, *plan.geometry.out_sizes[1:])[:-1])
        merge = plan.multiplier == 1 and lines >= MERGED_DW_LINES
        views = plan.row_windows(padded, tile, row_block(plan.geometry)) if merge else None
        if views is None:
            dw_view += np.einsum(
                f"{pixels}{taps}c,{pixels}{channels}->{taps}{channels}",
                plan.windows(padded, tile),
                dz_view,
            )
        else:  # long inner loops: sums per (last-axis position, channel), folded afterwards
            out_tile = (tile.n_rows, *plan.geometry.out_sizes[1:])
            rows = dz_tile.reshape(tile.n_images, *out_tile[:-1], -1)
            head = len(pixels) - 1  # the axis of the blocks, one einsum each (not reduced
            merged = None  # by the einsum: its loops got slower, measured); (*kernel, block·Cin)
            for view, part in views:  # weight-sized sums, folded over the block once per tile
                dz_rows = rows[..., part].reshape(*view.shape[: len(pixels)], -1)
                for k in range(view.shape[head]):
                    block: Index = (*(slice(None),) * head, k)
                    sums = np.einsum(
                        f"{pixels[:-1]}{taps}x,{pixels[:-1]}x->{taps}x", view[block], dz_rows[block]
                    )
                    if merged is None:
                        merged = sums  # the first view has the longest rows
                    else:
                        merged[..., : sums.shape[-1]] += sums
                    del sums  # not alive beside the next one (merged_row_bytes counts two)
            assert merged is not None  # a tile has at least one output
            dw_view += merged.reshape(*merged.shape[:-1], -1, plan.geometry.cin).sum(axis=-2)
    if dx is None:
        return
    weights = _depthwise_weights(plan, w).reshape(plan.taps, *dz_view.shape[1 + len(taps) :])
    dx_padded = plan.dx_buffer(tile)
    dx_windows = plan.writable_windows(dx_padded, tile)
    product = plan.buffer("product", dz_view.shape[: 2 + len(taps)])
    for tap, offset in enumerate(plan.offsets):
        if plan.multiplier == 1:
            np.multiply(dz_view, weights[tap], out=product)
        else:
            np.einsum(f"{pixels}cm,cm->{pixels}c", dz_view, weights[tap], out=product)
        index: Index = (Ellipsis, *offset, slice(None))
        dx_windows[index] += product
    plan.add_interior(dx_padded, dx, tile)
