"""The arithmetic of the fast engine: weights laid out for a GEMM, the grouped matrix product,
the per-tap kernels of depthwise layers, and dx as a transposed convolution.

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

import numpy as np

from convcli.engine.operands import Index
from convcli.engine.tiling import Plan, Tile
from convcli.spec import ConvSpec, Geometry


def is_depthwise(geometry: Geometry) -> bool:
    """One input channel per group (and more than one group): no GEMM is worth its setup."""
    return geometry.cin == geometry.groups and geometry.groups > 1


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
    """dx as a convolution of dz, when it is one (stride 1, zero padding, not depthwise).

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
    when dx is not one (stride above 1, depthwise, other padding modes, negative padding)."""
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


# -- depthwise (one input channel per group) ----------------------------------------------------


def _depthwise_weights(plan: Plan, w: np.ndarray) -> np.ndarray:
    """(*kernel, 1, Cout) -> (taps, Cin, multiplier): output channel c*m + j reads input c."""
    g = plan.geometry.groups
    return w.reshape(plan.taps, g, plan.geometry.cout // g)


def depthwise_forward(
    plan: Plan, x: np.ndarray, w: np.ndarray, tile: Tile, out: np.ndarray
) -> None:
    """out (pixels, Cout) = Σ over taps of window(tap) ⊙ w(tap), per channel.

    x is (n, *spatial, Cin), w (*kernel, 1, Cout); per-tap multiply-adds on the strided view
    of the tile's receptive fields (a GEMM would have an inner dimension of 1).
    """
    g = plan.geometry.groups
    windows = plan.windows(plan.padded_input(x, tile), tile)
    weights = _depthwise_weights(plan, w)
    acc = out.reshape(*windows.shape[: 1 + len(plan.geometry.kernel)], g, -1)
    product = plan.buffer("product", acc.shape)
    acc[...] = 0
    for tap, offset in enumerate(plan.offsets):
        index: Index = (Ellipsis, *offset, slice(None))
        source = windows[index][..., None]
        np.multiply(source, weights[tap], out=product)
        acc += product


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
    """
    g = plan.geometry.groups
    shape = (tile.n_images, tile.n_rows, *plan.geometry.out_sizes[1:], g, -1)
    dz_view = dz_tile.reshape(shape)
    weights = _depthwise_weights(plan, w)
    windows = None if dw is None or x is None else plan.windows(plan.padded_input(x, tile), tile)
    dx_padded = None if dx is None else plan.dx_buffer(tile)
    dx_windows = None if dx_padded is None else plan.writable_windows(dx_padded, tile)
    dw_taps = None if dw is None else dw.reshape(plan.taps, g, -1)
    product = plan.buffer("product", dz_view.shape)
    spatial = tuple(range(1 + len(plan.geometry.kernel)))
    for tap, offset in enumerate(plan.offsets):
        index: Index = (Ellipsis, *offset, slice(None))
        if windows is not None and dw_taps is not None:
            np.multiply(windows[index][..., None], dz_view, out=product)
            dw_taps[tap] += product.sum(axis=spatial)
        if dx_windows is not None:
            np.multiply(dz_view, weights[tap], out=product)
            dx_windows[index] += product.sum(axis=-1)
    if dx_padded is not None and dx is not None:
        plan.add_interior(dx_padded, dx, tile)
