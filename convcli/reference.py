"""The reference engine: plain loops, written to be read, used as the oracle in tests.

Same contract as :mod:`convcli.engine` (``conv_forward_reference`` / ``conv_backward_reference``
take and return what ``conv_forward`` / ``conv_backward`` do), NHWC activations and HWIO weights.
For output pixel (ho, wo) the kernel tap (i, j) reads padded-input pixel
``(ho * stride_h + i * dilation_h, wo * stride_w + j * dilation_w)``; output channel ``co``
belongs to group ``co // (Cout / groups)`` and sees only that group's input channels.
It is slow (one Python iteration per output element) and meant for small tensors.
"""

from __future__ import annotations

import numpy as np

from convcli.operands import ConvCache, prepare, prepare_upstream, shape_bias_grad
from convcli.spec import ConvSpec


def conv_forward_reference(
    x, w, b=None, spec: ConvSpec | None = None, *, workspace: int = 0, threads: int | None = None
):
    """Loop implementation of :func:`convcli.conv_forward` (``workspace``, ``threads`` ignored).

    x (n, H, W, Cin), w (kh, kw, Cin/groups, Cout), b None/(Cout,)/(1, 1, 1, Cout)
    -> z (n, Ho, Wo, Cout), cache.
    """
    spec = spec if spec is not None else ConvSpec()
    x, w, b, b_shape, geo = prepare(x, w, b, spec)
    (top, bottom), (left, right) = geo.pads
    x_padded = np.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))
    kh, kw = geo.kernel
    sh, sw = geo.stride
    dh, dw = geo.dilation
    in_per_group = geo.cin // geo.groups
    out_per_group = geo.cout // geo.groups
    n, (ho_count, wo_count), cout = geo.n, geo.out_sizes, geo.cout

    z = np.zeros(geo.out_shape, dtype=x.dtype)
    for i in range(n):
        for ho in range(ho_count):
            for wo in range(wo_count):
                top_row, left_col = ho * sh, wo * sw
                window = x_padded[
                    i,
                    top_row : top_row + dh * (kh - 1) + 1 : dh,
                    left_col : left_col + dw * (kw - 1) + 1 : dw,
                    :,
                ]  # (kh, kw, Cin)
                for co in range(cout):
                    group = co // out_per_group
                    channels = slice(group * in_per_group, (group + 1) * in_per_group)
                    z[i, ho, wo, co] = np.sum(window[:, :, channels] * w[:, :, :, co])
                    if b is not None:
                        z[i, ho, wo, co] += b[co]
    cache = ConvCache(x=x, w=w, b_shape=b_shape, spec=spec, geometry=geo, workspace=workspace)
    return z, cache


def conv_backward_reference(dz, cache: ConvCache):
    """Loop implementation of :func:`convcli.conv_backward`.

    dz (n, Ho, Wo, Cout) -> dx (n, H, W, Cin), dw (kh, kw, Cin/groups, Cout), db (shape of b).
    """
    dz, dtype = prepare_upstream(dz, cache)
    geo = cache.geometry
    x, w = cache.x.astype(dtype), cache.w.astype(dtype)
    (top, bottom), (left, right) = geo.pads
    x_padded = np.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))
    kh, kw = geo.kernel
    sh, sw = geo.stride
    dh, dw_ = geo.dilation
    in_per_group = geo.cin // geo.groups
    out_per_group = geo.cout // geo.groups
    n, (ho_count, wo_count), cout = geo.n, geo.out_sizes, geo.cout

    dx_padded = np.zeros_like(x_padded)
    dw = np.zeros_like(w)
    db = np.zeros(cout, dtype=dtype)
    for i in range(n):
        for ho in range(ho_count):
            for wo in range(wo_count):
                rows = slice(ho * sh, ho * sh + dh * (kh - 1) + 1, dh)
                cols = slice(wo * sw, wo * sw + dw_ * (kw - 1) + 1, dw_)
                for co in range(cout):
                    group = co // out_per_group
                    channels = slice(group * in_per_group, (group + 1) * in_per_group)
                    g = dz[i, ho, wo, co]
                    dx_padded[i, rows, cols, channels] += w[:, :, :, co] * g
                    dw[:, :, :, co] += x_padded[i, rows, cols, channels] * g
                    db[co] += g
    height, width = geo.in_sizes
    dx = dx_padded[:, top : top + height, left : left + width, :]
    db = db if cache.b_shape is not None else None
    return np.ascontiguousarray(dx), dw, shape_bias_grad(db, cache.b_shape)
