"""The reference engine: plain loops, written to be read, used as the oracle in tests.

Same contract as :mod:`convcli.engine.fast`: ``conv_forward_reference`` and
``conv_backward_reference`` take and return what ``conv_forward`` and ``conv_backward`` do
(any layout, 1 to 3 spatial axes, every padding mode). Inside it works channels last:
x ``(n, *spatial, Cin)``, w ``(*kernel, Cin/groups, Cout)``. The input is padded with
:func:`numpy.pad` (``zeros`` = constant,
``reflect``, ``replicate`` = edge, ``circular`` = wrap). For output position ``o`` (a tuple,
one index per axis) the kernel tap ``t`` reads padded position ``o * stride + t * dilation``;
output channel ``co`` belongs to group ``co // (Cout / groups)`` and sees only that group's
input channels. It is slow (one Python iteration per output element) and meant for small
tensors.
"""

from __future__ import annotations

import itertools

import numpy as np

from convcli.engine.operands import (
    ConvCache,
    finish_gradients,
    prepare,
    prepare_upstream,
    x_from_last,
)
from convcli.spec import ConvSpec, padding_source

NUMPY_PAD_MODES = {
    "zeros": "constant",
    "reflect": "reflect",
    "replicate": "edge",
    "circular": "wrap",
}


def _pad(x: np.ndarray, geo) -> np.ndarray:
    """x (n, *spatial, C) padded on its spatial axes as the padding mode says."""
    widths = ((0, 0), *geo.pads, (0, 0))
    return np.pad(x, widths, mode=NUMPY_PAD_MODES[geo.padding_mode])


def _window(geo, out_position) -> tuple[slice, ...]:
    """Padded-input slices, one per spatial axis, under the kernel at an output position."""
    return tuple(
        slice(o * s, o * s + d * (k - 1) + 1, d)
        for o, s, d, k in zip(out_position, geo.stride, geo.dilation, geo.kernel, strict=True)
    )


def conv_forward_reference(
    x, w, b=None, spec: ConvSpec | None = None, *, workspace: int = 0, threads: int | None = None
):
    """Loop implementation of :func:`convcli.conv_forward` (``workspace``, ``threads`` ignored)."""
    spec = spec if spec is not None else ConvSpec()
    x, w, b, b_shape, geo = prepare(x, w, b, spec)
    x_padded = _pad(x, geo)
    in_per_group = geo.cin // geo.groups
    out_per_group = geo.cout // geo.groups

    z = np.zeros(geo.out_shape, dtype=x.dtype)
    for i in range(geo.n):
        for position in itertools.product(*(range(o) for o in geo.out_sizes)):
            window = x_padded[(i, *_window(geo, position))]  # (*kernel, Cin)
            for co in range(geo.cout):
                group = co // out_per_group
                channels = slice(group * in_per_group, (group + 1) * in_per_group)
                z[(i, *position, co)] = np.sum(window[..., channels] * w[..., co])
                if b is not None:
                    z[(i, *position, co)] += b[co]
    cache = ConvCache(x=x, w=w, b_shape=b_shape, spec=spec, geometry=geo, workspace=workspace)
    return x_from_last(z, geo.layout), cache


def conv_backward_reference(dz, cache: ConvCache):
    """Loop implementation of :func:`convcli.conv_backward`."""
    dz, dtype = prepare_upstream(dz, cache)
    geo = cache.geometry
    x, w = cache.x.astype(dtype), cache.w.astype(dtype)
    x_padded = _pad(x, geo)
    in_per_group = geo.cin // geo.groups
    out_per_group = geo.cout // geo.groups

    dx_padded = np.zeros_like(x_padded)
    dw = np.zeros_like(w)
    db = np.zeros(geo.cout, dtype=dtype)
    for i in range(geo.n):
        for position in itertools.product(*(range(o) for o in geo.out_sizes)):
            window = _window(geo, position)
            for co in range(geo.cout):
                group = co // out_per_group
                channels = slice(group * in_per_group, (group + 1) * in_per_group)
                g = dz[(i, *position, co)]
                dx_padded[(i, *window, channels)] += w[..., co] * g
                dw[..., co] += x_padded[(i, *window, channels)] * g
                db[co] += g
    dx = _unpad(dx_padded, geo)
    db = db if cache.b_shape is not None else None
    return finish_gradients(dx, dw, db, cache)


def _unpad(dx_padded: np.ndarray, geo) -> np.ndarray:
    """The adjoint of :func:`_pad`: every padded position's gradient goes back to the input
    pixel it was copied from (and is dropped for zero padding)."""
    dx = np.zeros((geo.n, *geo.in_sizes, geo.cin), dtype=dx_padded.dtype)
    sources = [
        padding_source(np.arange(-lo, size + hi), size, geo.padding_mode)
        for size, (lo, hi) in zip(geo.in_sizes, geo.pads, strict=True)
    ]
    for position in itertools.product(*(range(len(s)) for s in sources)):
        source = tuple(int(s[p]) for s, p in zip(sources, position, strict=True))
        if min(source) >= 0:
            dx[(slice(None), *source)] += dx_padded[(slice(None), *position)]
    return dx
