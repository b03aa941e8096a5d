"""The reference engine: plain loops, written to be read, used as the oracle in tests.

Same contract as :mod:`convcli.engine.fast`: ``conv_forward_reference`` and
``conv_backward_reference`` take and return what ``conv_forward`` and ``conv_backward`` do
(any layout, 1 to 3 spatial axes, every padding mode). Inside it works channels last:
x ``(n, *spatial, Cin)``, w ``(*kernel, Cin/groups, Cout)``. The input is padded with
:func:`numpy.pad` (``zeros`` = constant, ``reflect``, ``replicate`` = edge, ``circular`` =
wrap). For output position ``o`` (a tuple,
one index per axis) the kernel tap ``t`` reads padded position ``o * stride + t * dilation``;
output channel ``co`` belongs to group ``co // (Cout / groups)`` and sees only that group's
input channels. It is slow (one Python iteration per output element) and meant for small
tensors.

A transposed convolution (``spec.transposed``) is written in its scatter form: input pixel
``p`` adds ``x[p, ci] · w[t, co, ci]`` at output position ``p * stride + t * dilation -
before`` for every kernel tap ``t``, and contributions landing outside the output (in the
padding it crops) are dropped. There w is ``(*kernel, Cout/groups, Cin)`` channels last.
"""

from __future__ import annotations

import itertools
from typing import Literal

import numpy as np
import numpy.typing as npt

from convcli.engine.operands import (
    ConvCache,
    Index,
    finish_gradients,
    prepare,
    prepare_upstream,
    x_from_last,
)
from convcli.spec import ConvSpec, Geometry, padding_source

NumpyPadMode = Literal["constant", "reflect", "edge", "wrap"]
#: convcli's padding modes as :func:`numpy.pad` names them
NUMPY_PAD_MODES: dict[str, NumpyPadMode] = {
    "zeros": "constant",
    "reflect": "reflect",
    "replicate": "edge",
    "circular": "wrap",
}


def _pad(x: np.ndarray, geo: Geometry) -> np.ndarray:
    """x (n, *spatial, C) padded on its spatial axes as the padding mode says."""
    widths = [(0, 0), *geo.pads, (0, 0)]
    return np.pad(x, widths, mode=NUMPY_PAD_MODES[geo.padding_mode])


def _window(geo: Geometry, out_position: tuple[int, ...]) -> tuple[slice, ...]:
    """Padded-input slices, one per spatial axis, under the kernel at an output position."""
    return tuple(
        slice(o * s, o * s + d * (k - 1) + 1, d)
        for o, s, d, k in zip(out_position, geo.stride, geo.dilation, geo.kernel, strict=True)
    )


def conv_forward_reference(
    x: npt.ArrayLike,
    w: npt.ArrayLike,
    b: npt.ArrayLike | None = None,
    spec: ConvSpec | None = None,
    *,
    workspace: int = 0,
    threads: int | None = None,
) -> tuple[np.ndarray, ConvCache]:
    """Loop implementation of :func:`convcli.conv_forward` (``workspace``, ``threads`` ignored).

    Same arguments and results: x (n, *spatial, Cin), w (*kernel, Cin/groups, Cout), b (Cout,)
    or None, in the spec's layout (channels first swaps the channel axes to the front); returns
    z (n, *out, Cout) and the cache for :func:`conv_backward_reference`.
    """
    spec = spec if spec is not None else ConvSpec()
    operands = prepare(x, w, b, spec)
    geo, bias = operands.geometry, operands.b
    x_last, w_last = operands.x, operands.w
    if geo.transposed:
        z = _transposed_forward(x_last, w_last, geo)
        if bias is not None:
            z += bias
        cache = ConvCache(
            x=x_last, w=w_last, b_shape=operands.b_shape, spec=spec, geometry=geo, workspace=0
        )
        return x_from_last(z, geo.layout), cache
    x_padded = _pad(x_last, geo)
    in_per_group = geo.cin // geo.groups
    out_per_group = geo.cout // geo.groups

    z = np.zeros(geo.out_shape, dtype=x_last.dtype)
    for i in range(geo.n):
        for position in itertools.product(*(range(o) for o in geo.out_sizes)):
            under: Index = (i, *_window(geo, position))
            window = x_padded[under]  # (*kernel, Cin)
            for co in range(geo.cout):
                group = co // out_per_group
                channels = slice(group * in_per_group, (group + 1) * in_per_group)
                out: Index = (i, *position, co)
                z[out] = np.sum(window[..., channels] * w_last[..., co])
                if bias is not None:
                    z[out] += bias[co]
    cache = ConvCache(
        x=x_last,
        w=w_last,
        b_shape=operands.b_shape,
        spec=spec,
        geometry=geo,
        workspace=workspace,
    )
    return x_from_last(z, geo.layout), cache


def conv_backward_reference(
    dz_in: npt.ArrayLike, cache: ConvCache
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Loop implementation of :func:`convcli.conv_backward`: dz of the shape of z in, dx, dw
    of the shapes of x and w and db (None without a bias) out."""
    dz, dtype = prepare_upstream(dz_in, cache)
    geo = cache.geometry
    x, w = cache.x.astype(dtype), cache.w.astype(dtype)
    if geo.transposed:
        dx, dw = _transposed_backward(dz, x, w, geo)
        db_t = dz.sum(axis=tuple(range(dz.ndim - 1))) if cache.b_shape is not None else None
        return finish_gradients(dx, dw, db_t, cache)
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
                out: Index = (i, *position, co)
                under: Index = (i, *window, channels)
                g = dz[out]
                dx_padded[under] += w[..., co] * g
                dw[..., co] += x_padded[under] * g
                db[co] += g
    dx = _unpad(dx_padded, geo)
    return finish_gradients(dx, dw, db if cache.b_shape is not None else None, cache)


def _unpad(dx_padded: np.ndarray, geo: Geometry) -> np.ndarray:
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
            into: Index = (slice(None), *source)
            outof: Index = (slice(None), *position)
            dx[into] += dx_padded[outof]
    return dx


# -- transposed convolution: scatter form ----------------------------------------------------


def _scatter_targets(geo: Geometry, position: tuple[int, ...]):
    """(tap, output position) pairs that input ``position`` of a transposed convolution adds
    into: output ``p * stride + t * dilation - before`` per axis, when inside the output."""
    for tap in itertools.product(*(range(k) for k in geo.kernel)):
        target = tuple(
            p * s + t * d - lo
            for p, t, s, d, (lo, _) in zip(
                position, tap, geo.stride, geo.dilation, geo.pads, strict=True
            )
        )
        if all(0 <= o < size for o, size in zip(target, geo.out_sizes, strict=True)):
            yield tap, target


def _group_channels(geo: Geometry, ci: int) -> slice:
    """The output channels input channel ``ci`` of a transposed convolution reaches."""
    out_per_group = geo.cout // geo.groups
    group = ci // (geo.cin // geo.groups)
    return slice(group * out_per_group, (group + 1) * out_per_group)


def _transposed_forward(x: np.ndarray, w: np.ndarray, geo: Geometry) -> np.ndarray:
    """z (n, *out, Cout) of a transposed convolution of x (n, *in, Cin) with
    w (*kernel, Cout/groups, Cin), every contribution scattered one by one."""
    z = np.zeros(geo.out_shape, dtype=x.dtype)
    for i in range(geo.n):
        for position in itertools.product(*(range(size) for size in geo.in_sizes)):
            for tap, target in _scatter_targets(geo, position):
                for ci in range(geo.cin):
                    pixel: Index = (i, *position, ci)
                    into: Index = (i, *target, _group_channels(geo, ci))
                    weights: Index = (*tap, slice(None), ci)  # (Cout/groups,)
                    z[into] += x[pixel] * w[weights]
    return z


def _transposed_backward(
    dz: np.ndarray, x: np.ndarray, w: np.ndarray, geo: Geometry
) -> tuple[np.ndarray, np.ndarray]:
    """(dx, dw) of a transposed convolution: every contribution of the forward pass, followed
    back from the output position it was added to."""
    dx = np.zeros_like(x)
    dw = np.zeros_like(w)
    for i in range(geo.n):
        for position in itertools.product(*(range(size) for size in geo.in_sizes)):
            for tap, target in _scatter_targets(geo, position):
                for ci in range(geo.cin):
                    pixel: Index = (i, *position, ci)
                    outof: Index = (i, *target, _group_channels(geo, ci))
                    weights: Index = (*tap, slice(None), ci)
                    g = dz[outof]  # (Cout/groups,)
                    dx[pixel] += np.dot(g, w[weights])
                    dw[weights] += x[pixel] * g
    return dx, dw
