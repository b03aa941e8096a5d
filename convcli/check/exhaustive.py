"""Gradcheck's exhaustive mode: central differences of every element, perturbed in groups.

Elements whose effects on z cannot overlap are perturbed together in one pair of forward
passes, and each one's difference is read back from its own region of z:

- input pixels whose positions along every spatial axis are a period apart (the
  receptive-field span ``d·(k - 1) + 1``, or more for wrapped or mirrored padding, see
  :func:`perturbation_periods`), in every image and every channel group at once;
- the weights ``w[i, j, c, :]`` of all output channels at once;
- all biases at once.

For a transposed convolution (``geometry.transposed``) input pixel ``i`` reaches outputs
``i·stride + t·dilation - before`` (its own reach, :func:`feeding_inputs`), so the period is
about ``span / stride``; its w ``(*kernel, Cout/groups, Cin)`` is perturbed at one input
channel of every group, for all its output channels at once.

So an exhaustive check takes ``2 · (∏periods · Cin/groups + ∏kernel · Cin/groups + 1)``
forward passes (:func:`exhaustive_passes`), independent of n, H and W.

Layout: channels last throughout — x ``(n, *in_sizes, Cin)``, w ``(*kernel, Cin/groups,
Cout)``, b ``(Cout,)``, z and g ``(n, *out_sizes, Cout)`` — all float64.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable

import numpy as np

from convcli.spec import Geometry, padding_source

# padding modes that read an input from beyond the window's span (a mirrored or wrapped copy);
# with zeros or replicate padding an output's inputs lie within one span, so the span is the period
_FOLDING = ("reflect", "circular")
# forward(x, w, b) -> z, all float64 and channels last
CountedForward = Callable[[np.ndarray, np.ndarray, "np.ndarray | None"], np.ndarray]


def feeding_inputs(
    axis: int, geometry: Geometry, outputs: Iterable[int] | None = None
) -> list[set[int]]:
    """For each output position along spatial ``axis`` (or each of ``outputs``), the input
    positions that feed it.

    Through any tap of the kernel, after the padding mode maps padded positions back onto
    the input (zero padding feeds nothing). For a transposed convolution, the inputs ``i``
    with ``i·stride + t·dilation - before = o`` for some tap ``t``.
    """
    size, k = geometry.in_sizes[axis], geometry.kernel[axis]
    s, d = geometry.stride[axis], geometry.dilation[axis]
    before = geometry.pads[axis][0]
    chosen = range(geometry.out_sizes[axis]) if outputs is None else outputs
    if geometry.transposed:  # input i adds into output i·s + t·d - before
        return [
            {
                (o + before - t * d) // s
                for t in range(k)
                if (o + before - t * d) % s == 0 and 0 <= (o + before - t * d) // s < size
            }
            for o in chosen
        ]
    taps = np.arange(k) * d - before
    return [
        {int(i) for i in padding_source(o * s + taps, size, geometry.padding_mode) if i >= 0}
        for o in chosen
    ]


def perturbation_periods(geometry: Geometry) -> list[int]:
    """Per spatial axis, the smallest spacing P such that no output is fed by two different
    inputs with the same position modulo P: inputs P apart can then be perturbed together.

    It is the receptive-field span ``d·(k - 1) + 1`` (at most the input size) for zero
    padding; wrapped or mirrored padding can need more.
    """
    periods = []
    for axis in range(geometry.rank):
        size = geometry.in_sizes[axis]
        span = geometry.dilation[axis] * (geometry.kernel[axis] - 1) + 1
        period = _transposed_period(axis, geometry) if geometry.transposed else min(span, size)
        if geometry.padding_mode in _FOLDING:  # only these can feed an output from afar
            feeds = feeding_inputs(axis, geometry, _padded_outputs(axis, geometry))
            while period < size and any(len({i % period for i in f}) < len(f) for f in feeds):
                period += 1
        periods.append(period)
    return periods


def _transposed_period(axis: int, geometry: Geometry) -> int:
    """The period along ``axis`` of a transposed convolution: two inputs ``Δ`` apart feed one
    output when ``Δ·stride = δ·dilation`` for a difference of taps ``1 <= δ < k``; the
    smallest P none of those ``Δ`` is a multiple of (from sizes alone, like the span)."""
    size, k = geometry.in_sizes[axis], geometry.kernel[axis]
    s, d = geometry.stride[axis], geometry.dilation[axis]
    apart = {delta * d // s for delta in range(1, k) if delta * d % s == 0}
    apart = {a for a in apart if a < size}
    period = 1
    while period < size and any(a % period == 0 for a in apart):
        period += 1
    return period


def _padded_outputs(axis: int, geometry: Geometry) -> itertools.chain[int]:
    """The outputs along ``axis`` whose window reaches into the padding: only they can be fed
    by mirrored or wrapped copies (a window inside the input spans less than one period)."""
    out, s = geometry.out_sizes[axis], geometry.stride[axis]
    before = geometry.pads[axis][0]
    span = geometry.dilation[axis] * (geometry.kernel[axis] - 1) + 1
    first_inside = min(-(-before // s), out)  # the window of o starts at o·s - before
    last_inside = (geometry.in_sizes[axis] - span + before) // s
    return itertools.chain(range(first_inside), range(max(last_inside + 1, first_inside), out))


def exhaustive_passes(geometry: Geometry, has_bias: bool) -> int:
    """Forward passes an exhaustive check of this geometry uses (see the module docstring)."""
    cin_group = geometry.cin // geometry.groups
    return 2 * (
        math.prod(perturbation_periods(geometry)) * cin_group
        + math.prod(geometry.kernel) * cin_group
        + int(has_bias)
    )


def owner_matrices(axis: int, geometry: Geometry, period: int) -> list[np.ndarray]:
    """For each residue r, a float64 matrix ``(in_size, out_size)`` along spatial ``axis``:
    ``A[r][i, o] = 1`` when input i (with ``i % period == r``) feeds output o.

    With the period from :func:`perturbation_periods`, at most one input of each residue
    feeds an output, so ``A[r] @ Δz`` gives each perturbed input its own outputs' change.
    """
    size, out = geometry.in_sizes[axis], geometry.out_sizes[axis]
    matrices = [np.zeros((size, out)) for _ in range(period)]
    for o, inputs in enumerate(feeding_inputs(axis, geometry)):
        for i in inputs:
            matrices[i % period][i, o] = 1.0
    return matrices


def exhaustive_numeric(
    forward: CountedForward,
    g: np.ndarray,
    x: np.ndarray,
    w: np.ndarray,
    b: np.ndarray | None,
    geometry: Geometry,
    eps: float,
) -> dict[str, np.ndarray]:
    """Central differences of ``L = Σ forward(x, w, b) ⊙ g`` for every element, grouped.

    Parameters
    ----------
    forward : callable(x, w, b) -> z
        Channels last, float64; called ``exhaustive_passes(geometry, b is not None)`` times.
    g : ndarray (n, *out_sizes, Cout)
    x : ndarray (n, *in_sizes, Cin); w : ndarray (*kernel, Cin/groups, Cout); b : (Cout,) or None
    geometry : Geometry
        The convolution ``forward`` computes; the groups follow its dependency pattern.
    eps : float
        The step.

    Returns
    -------
    dict
        ``"dx"``, ``"dw"`` (and ``"db"`` when b is given): float64 arrays shaped like x, w, b.
    """
    rank, groups, cout = geometry.rank, geometry.groups, geometry.cout
    cin_group = geometry.cin // groups
    periods = perturbation_periods(geometry)
    owners = [owner_matrices(a, geometry, p) for a, p in enumerate(periods)]

    def difference(xp, xm, wp, wm, bp, bm):
        return (forward(xp, wp, bp) - forward(xm, wm, bm)) / (2 * eps) * g

    numeric = {"dx": np.zeros_like(x), "dw": np.zeros_like(w)}
    step = np.zeros_like(x)
    for residues in itertools.product(*(range(p) for p in periods)):
        lattice = tuple(slice(r, None, p) for r, p in zip(residues, periods, strict=True))
        for channel in range(cin_group):
            # this channel of every group, at every pixel of the lattice, in every image
            pixels = (slice(None), *lattice, slice(channel, None, cin_group))
            step[...] = 0
            step[pixels] = eps
            weighted = difference(x + step, x - step, w, w, b, b)
            spread = weighted.reshape(*weighted.shape[:-1], groups, cout // groups).sum(axis=-1)
            for axis, residue in enumerate(residues):  # (n, *out, g) -> (n, *in, g)
                spread = np.moveaxis(
                    np.tensordot(owners[axis][residue], spread, axes=([1], [1 + axis])), 0, 1 + axis
                )
            numeric["dx"][pixels] = spread[pixels[:-1]]
    w_step = np.zeros_like(w)
    every_output = tuple(range(rank + 1))
    for taps in itertools.product(*(range(k) for k in geometry.kernel)):
        for channel in range(cin_group):
            weights: tuple[int | slice, ...] = (*taps, channel)
            if geometry.transposed:
                # w[taps, j, c-th input channel of group G] feeds output channel G·Cout/g + j
                weights = (*taps, slice(None), slice(channel, None, cin_group))
            w_step[...] = 0
            w_step[weights] = eps
            weighted = difference(x, x, w + w_step, w - w_step, b, b)
            by_channel = weighted.sum(axis=every_output)  # (Cout,)
            if geometry.transposed:
                numeric["dw"][weights] = by_channel.reshape(groups, cout // groups).T
            else:
                numeric["dw"][weights] = by_channel
    if b is not None:
        weighted = difference(x, x, w, w, b + eps, b - eps)
        numeric["db"] = weighted.sum(axis=every_output)
    return numeric
