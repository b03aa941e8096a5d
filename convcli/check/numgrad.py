"""Numerical gradients of an arbitrary forward function, grouped by its measured dependencies.

:mod:`convcli.check.exhaustive` groups perturbations by a convolution's dependency pattern, which is
only valid for a function that has that pattern. A user's forward may not (a stride bug reads
other pixels), so here the pattern is measured first and the groups follow the measurement:

1. **Probe.** For every index j along each axis of x (batch, rows, columns, channels), perturb
   the whole slice ``x[..., j, ...]`` by random values and record which output indices along
   the matching axis of z change (bitwise). Likewise each output channel of w and each bias.
   If an output o depends on an input element e, perturbing any slice through e changes o
   (up to a cancellation of probability zero), so o depends only on inputs in the product
   over axes of the indices recorded for o's indices.
2. **Colour.** Along each axis, give two indices different colours when some output index
   is recorded for both (greedy colouring). For a convolution this gives residues modulo the
   receptive-field span (or fewer colours); for a function that reads everything, one colour
   per index, i.e. element by element.
3. **Perturb and read back.** Perturb every element of one colour combination by ±eps at
   once. Each output then depends on at most one perturbed element, so its change is that
   element's alone: summing ``g ⊙ Δz / 2eps`` over the outputs each element may reach gives
   exactly that element's own central difference (bit for bit the element-by-element value,
   never an assumption about which outputs an input can reach).

Layout: x ``(n, *spatial, Cin)``, w ``(*kernel, Cin/groups, Cout)``, b ``(Cout,)``, z and g
``(n, *out, Cout)``, all float64; 1 to 3 spatial axes.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

DEFAULT_MAX_PASSES = 10_000
BY_CHANNEL_LIMIT = 1 << 22  # elements of x times Cout kept for per-output-channel read-back


class NumericUnavailable(Exception):
    """The numerical gradients cannot be trusted or would take too long; the message says why."""


@dataclass
class NumericGradients:
    """Central differences of ``L = Σ forward(x, w, b) ⊙ g``.

    ``dx_by_cout`` (n, *spatial, Cin, Cout) splits dx into the contribution of each output channel
    (g zero except in that channel); None when too large (see BY_CHANNEL_LIMIT).
    """

    dx: np.ndarray
    dw: np.ndarray
    db: np.ndarray
    dx_by_cout: np.ndarray | None
    forward_passes: int


def _colours(reach: np.ndarray) -> np.ndarray:
    """Greedy colouring of inputs (rows of ``reach``) so no output column has two of a colour."""
    overlap = (reach.astype(np.int64) @ reach.T.astype(np.int64)) > 0
    colours = np.zeros(len(reach), dtype=np.int64)
    for j in range(len(reach)):
        used = set(colours[:j][overlap[j, :j]].tolist())
        colours[j] = next(c for c in itertools.count() if c not in used)
    return colours


def _measure_reach(changed, x, w, b, z_shape, rng):
    """Step 1 (probe): which output indices each input slice reaches, per axis.

    ``changed(x, w, b)`` is the boolean map of outputs that differ from the unperturbed z.
    Returns ``x_reach`` (per axis of x, booleans of shape (size along x, size along z)),
    ``w_reach`` and ``b_reach`` ((Cout of w or b, Cout of z) booleans).
    """
    x_reach = []
    batch_and_spatial = tuple(range(x.ndim - 1))
    for axis in range(x.ndim):
        reach = np.zeros((x.shape[axis], z_shape[axis]), dtype=bool)
        others = tuple(a for a in range(x.ndim) if a != axis)
        for j in range(x.shape[axis]):
            probe = x.copy()
            index = (slice(None),) * axis + (j,)
            probe[index] += rng.standard_normal(probe[index].shape)
            reach[j] = changed(probe, w, b).any(axis=others)
        x_reach.append(reach)
    w_reach = np.zeros((w.shape[-1], z_shape[-1]), dtype=bool)
    b_reach = np.zeros((b.size, z_shape[-1]), dtype=bool)
    for c in range(w.shape[-1]):
        probe = w.copy()
        probe[..., c] += rng.standard_normal(probe[..., c].shape)
        w_reach[c] = changed(x, probe, b).any(axis=batch_and_spatial)
    for c in range(b.size):
        probe = b.copy()
        probe[c] += 1.0 + rng.random()
        b_reach[c] = changed(x, w, probe).any(axis=batch_and_spatial)
    return x_reach, w_reach, b_reach


def planned_passes(x_colours: list[int], w_shape: tuple, w_colours: int, b_colours: int) -> int:
    """Forward passes of step 3: two per colour combination of x, of w (per tap), of b."""
    return 2 * (math.prod(x_colours) + math.prod(w_shape[:-1]) * w_colours + b_colours)


def numeric_gradients(
    forward: Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray],
    x: np.ndarray,
    w: np.ndarray,
    b: np.ndarray,
    g: np.ndarray,
    *,
    eps: float = 1e-3,
    seed: int = 0,
    max_passes: int = DEFAULT_MAX_PASSES,
) -> NumericGradients:
    """Central differences of ``Σ forward(x, w, b) ⊙ g`` for every element of x, w and b.

    Raises
    ------
    NumericUnavailable
        When ``forward`` gives different z for the same inputs, or when the measured
        dependencies would need more than ``max_passes`` forward passes.
    """
    rng = np.random.default_rng(seed)
    x, w, b, g = (np.asarray(a, dtype=np.float64) for a in (x, w, b, g))
    passes = 0

    def run(x_, w_, b_):
        nonlocal passes
        passes += 1
        return np.asarray(forward(x_, w_, b_), dtype=np.float64)

    z = run(x, w, b)
    if not np.array_equal(run(x, w, b), z):
        raise NumericUnavailable("conv_forward gives different Z for the same inputs")

    x_reach, w_reach, b_reach = _measure_reach(lambda *a: run(*a) != z, x, w, b, z.shape, rng)
    x_colours = [_colours(reach) for reach in x_reach]
    w_colours, b_colours = _colours(w_reach), _colours(b_reach)
    counts = [int(c.max()) + 1 for c in x_colours]
    needed = planned_passes(counts, w.shape, int(w_colours.max()) + 1, int(b_colours.max()) + 1)
    if needed > max_passes:
        raise NumericUnavailable(
            f"numerical gradients of this conv_forward would need {needed} forward passes "
            f"(more than {max_passes}): its outputs depend on more inputs than a convolution's"
        )

    def weighted(x_plus, x_minus, w_plus, w_minus, b_plus, b_minus) -> np.ndarray:
        return (run(x_plus, w_plus, b_plus) - run(x_minus, w_minus, b_minus)) / (2 * eps) * g

    cout = z.shape[-1]
    batch_and_spatial = tuple(range(x.ndim - 1))
    dx = np.zeros_like(x)
    by_cout = np.zeros((*x.shape, cout)) if x.size * cout <= BY_CHANNEL_LIMIT else None
    for combination in itertools.product(*(range(k) for k in counts)):
        members = [c == k for c, k in zip(x_colours, combination, strict=True)]
        mask = functools.reduce(np.multiply.outer, members)
        step = np.where(mask, eps, 0.0)
        spread = weighted(x + step, x - step, w, w, b, b)
        for axis in batch_and_spatial:  # (n, *out, Cout) -> (n, *in, Cout), to each owner
            owners = x_reach[axis] & members[axis][:, None]
            spread = np.moveaxis(np.tensordot(owners, spread, axes=([1], [axis])), 0, axis)
        owners = (x_reach[-1] & members[-1][:, None]).astype(np.float64)  # (Cin, Cout)
        per_cout = spread[..., None, :] * owners  # (n, *in, Cin, Cout)
        dx[mask] = per_cout.sum(axis=-1)[mask]
        if by_cout is not None:
            by_cout[mask] = per_cout[mask]

    dw = np.zeros_like(w)
    for tap in np.ndindex(w.shape[:-1]):
        for colour in range(int(w_colours.max()) + 1):
            members = w_colours == colour
            step = np.zeros_like(w)
            step[tap][members] = eps
            totals = weighted(x, x, w + step, w - step, b, b).sum(axis=batch_and_spatial)
            dw[tap][members] = ((w_reach & members[:, None]) @ totals)[members]
    db = np.zeros_like(b)
    for colour in range(int(b_colours.max()) + 1):
        members = b_colours == colour
        step = np.where(members, eps, 0.0)
        totals = weighted(x, x, w, w, b + step, b - step).sum(axis=batch_and_spatial)
        db[members] = ((b_reach & members[:, None]) @ totals)[members]
    return NumericGradients(dx=dx, dw=dw, db=db, dx_by_cout=by_cout, forward_passes=passes)


@dataclass(frozen=True)
class SampledGradients:
    """Central differences at sampled elements: per tensor (``"dx"``, ``"dw"``, ``"db"``) the
    flat indices into x, w or b and the values there."""

    indices: dict[str, np.ndarray]
    values: dict[str, np.ndarray]
    forward_passes: int


def sampled_gradients(
    forward: Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray],
    x: np.ndarray,
    w: np.ndarray,
    b: np.ndarray,
    g: np.ndarray,
    *,
    samples: int,
    eps: float = 1e-3,
    seed: int = 0,
) -> SampledGradients:
    """Central differences of ``Σ forward(x, w, b) ⊙ g`` at ``samples`` elements of each of
    x, w and b (all of a tensor with fewer), chosen without replacement by a generator of
    its own seeded with ``seed``: two forward passes per element.

    Unlike :func:`numeric_gradients` nothing is assumed or measured about which outputs an
    element reaches: each value is the element's own central difference over all of z.
    """
    rng = np.random.default_rng(seed)
    operands = [np.array(a, dtype=np.float64, order="C") for a in (x, w, b)]  # flat views
    g = np.asarray(g, dtype=np.float64)
    indices: dict[str, np.ndarray] = {}
    values: dict[str, np.ndarray] = {}
    passes = 0
    for name, operand in zip(("dx", "dw", "db"), operands, strict=True):
        chosen = np.sort(rng.choice(operand.size, min(samples, operand.size), replace=False))
        flat = operand.reshape(-1)  # a view: stepping it steps the operand
        found = np.empty(len(chosen))
        for k, index in enumerate(chosen):
            original = flat[index]
            flat[index] = original + eps
            plus = np.asarray(forward(*operands), dtype=np.float64)
            flat[index] = original - eps
            minus = np.asarray(forward(*operands), dtype=np.float64)
            flat[index] = original
            passes += 2
            found[k] = np.sum((plus - minus) * g) / (2 * eps)
        indices[name], values[name] = chosen, found
    return SampledGradients(indices=indices, values=values, forward_passes=passes)
