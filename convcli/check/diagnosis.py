"""Naming the mistake behind a saved result that differs from convcli's.

A user's z, dx, dw or db that fails :func:`convcli.compare.run_compare` is tried against
convcli's own results for the usual mistakes, each computed with convcli's engine on an
altered spec or altered inputs (:data:`Candidate`): the kernel flipped (true convolution),
its spatial axes swapped, a transposed convolution for a convolution or the reverse, another
output_padding, data or weights read in the other layout, padding off by one or on
the other side, another stride or dilation (on every axis or on one), the bias missing or
added twice, dw or db divided by the batch size or summed over the wrong axis, dw's im2col
product left transposed, dx left padded or cropped one pixel off. A candidate *explains* a
tensor when every element matches under the same tolerance (:mod:`convcli.check.tolerance`)
with the scale Σ|terms| of the altered computation. Tensors are in the spec's layout: x
``(n, *spatial, Cin)`` channels last or ``(n, Cin, *spatial)`` channels first, w ``(*kernel,
Cin/groups, Cout)`` or ``(Cout, Cin/groups, *kernel)``, db ``(Cout,)``; everything runs in
float64.

The work is bounded: at most :data:`MAX_CANDIDATES` candidates, each about two forward and
backward passes, and only the first ones (in the order of :func:`candidates`) whose work
together stays within :data:`MAX_WORK` multiply-adds.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from convcli.check.gradients import forward_multiply_adds
from convcli.check.tolerance import Tolerance
from convcli.engine.fast import conv_backward, conv_forward
from convcli.engine.operands import w_from_last, w_to_last, x_from_last, x_to_last
from convcli.errors import ConvcliError
from convcli.spec import ConvSpec, Geometry

MAX_CANDIDATES = 80
MAX_WORK = 4 * 10**9  # multiply-adds of all candidates together (about a second or two)
TENSORS = ("z", "dx", "dw", "db")


@dataclass(frozen=True)
class Setup:
    """A layer to compute: x, w, b (or None), dz (or None: dz = z, the loss ½‖z‖²), spec.

    Arrays are float64 in ``spec.layout`` (see the module docstring).
    """

    x: np.ndarray
    w: np.ndarray
    b: np.ndarray | None
    dz: np.ndarray | None
    spec: ConvSpec

    def compute(self) -> dict[str, np.ndarray]:
        """z, dx, dw and db (``(Cout,)``, also without a bias) by convcli's engine."""
        z, cache = conv_forward(self.x, self.w, self.b, self.spec)
        g = z if self.dz is None else self.dz
        dx, dw, _ = conv_backward(g, cache)
        return {"z": z, "dx": dx, "dw": dw, "db": sum_but_channel(g, self.spec)}

    def absolute(self) -> Setup:
        """The same layer on |x|, |w|, |b|, |dz|: its results are the sums of |terms|."""
        return Setup(
            np.abs(self.x),
            np.abs(self.w),
            None if self.b is None else np.abs(self.b),
            None if self.dz is None else np.abs(self.dz),
            self.spec,
        )

    def with_spec(self, **changes: object) -> Setup:
        """The same tensors under a spec with ``changes`` (ConvSpec's argument names)."""
        spec = self.spec
        fields = {
            "stride": spec.stride,
            "padding": spec.padding,
            "dilation": spec.dilation,
            "groups": spec.groups,
            "padding_mode": spec.padding_mode,
            "layout": spec.layout,
            "transposed": spec.transposed,
            "output_padding": spec.output_padding,
            **changes,
        }
        return Setup(self.x, self.w, self.b, self.dz, ConvSpec(**fields))  # type: ignore[arg-type]


def sum_but_channel(g: np.ndarray, spec: ConvSpec) -> np.ndarray:
    """db: ``g`` (shape of z in ``spec.layout``) summed over all but its channel axis."""
    channel = 1 if spec.channels_first else g.ndim - 1
    return g.sum(axis=tuple(a for a in range(g.ndim) if a != channel))


# A candidate: from a setup, the results as the mistake makes them (only those it changes
# or explains), or None when it does not apply. Called on the setup and on its |·| twin.
Make = Callable[[Setup], "dict[str, np.ndarray] | None"]


@dataclass(frozen=True)
class Candidate:
    """One usual mistake: ``make`` computes it; the sentence is the tensor's name, then ``says``."""

    key: str
    make: Make
    says: str


@dataclass(frozen=True)
class Diagnosis:
    """What explains a failing tensor.

    ``matches`` holds the keys of every candidate that explains it (first: the one named),
    ``sentence`` the plain explanation ("z equals convcli's with padding 0 instead of 1"),
    or says that none of the ``tried`` candidates does (``matches`` empty), or why none was
    tried.
    """

    tensor: str
    matches: tuple[str, ...]
    sentence: str
    tried: int

    def to_json(self) -> dict:
        """As JSON values."""
        return {"matches": list(self.matches), "sentence": self.sentence, "tried": self.tried}


def diagnose(
    failing: dict[str, np.ndarray], setup: Setup, tolerances: dict[str, Tolerance]
) -> dict[str, Diagnosis]:
    """A :class:`Diagnosis` per tensor of ``failing`` (name -> the user's float64 array).

    ``tolerances`` gives each tensor's tolerance; candidates come from :func:`candidates`
    and are computed once each, for every failing tensor together.
    """
    geometry = setup.spec.geometry(setup.x.shape, setup.w.shape)
    affordable = MAX_WORK // max(4 * forward_multiply_adds(geometry), 1)
    listed = list(candidates(setup, geometry))[: min(MAX_CANDIDATES, affordable)]
    if not listed:
        return {
            name: Diagnosis(name, (), "no diagnosis: the layer is too large to try candidates", 0)
            for name in failing
        }
    matches: dict[str, list[Candidate]] = {name: [] for name in failing}
    absolute = setup.absolute()
    for candidate in listed:
        try:
            made = candidate.make(setup)
            scales = candidate.make(absolute) if made else None
        except (ConvcliError, ValueError):
            continue  # the altered layer does not exist (too much padding, shapes ...)
        if not made or not scales:
            continue
        for name, got in failing.items():
            want = made.get(name)
            if want is None or want.shape != got.shape:
                continue
            scale = np.asarray(scales[name], dtype=np.float64)
            if not tolerances[name].exceeded(np.abs(got - want), scale).any():
                matches[name].append(candidate)
    return {name: _verdict(name, found, len(listed)) for name, found in matches.items()}


def _verdict(name: str, found: list[Candidate], tried: int) -> Diagnosis:
    if not found:
        return Diagnosis(
            name, (), f"{name} matches none of the {tried} usual mistakes convcli tried", tried
        )
    sentence = f"{name} {found[0].says}"
    if len(found) > 1:
        sentence += " (also consistent with: " + "; ".join(c.key for c in found[1:]) + ")"
    return Diagnosis(name, tuple(c.key for c in found), sentence, tried)


# -- the candidates ------------------------------------------------------------------------


def candidates(setup: Setup, geometry: Geometry) -> Iterator[Candidate]:
    """Every usual mistake that applies to this layer, most specific first."""
    yield from _weight_mistakes(geometry)
    yield from _transposed_mistakes(geometry)
    yield from _bias_mistakes(setup)
    yield from _reduction_mistakes(geometry)
    yield from _crop_mistakes(setup, geometry)
    yield from _layout_mistakes(geometry)
    yield from _padding_mistakes(setup, geometry)
    yield from _step_mistakes(geometry)


def _spatial_axes(ndim: int, rank: int, first: bool) -> tuple[int, ...]:
    """Spatial axes of x/z (``first``: channels first) of ``ndim`` dimensions."""
    return tuple(range(2, 2 + rank)) if first else tuple(range(1, 1 + rank))


def _kernel_axes(rank: int, first: bool) -> tuple[int, ...]:
    return tuple(range(2, 2 + rank)) if first else tuple(range(rank))


def _transposed(permute: Callable[[np.ndarray], np.ndarray], shape: tuple[int, ...]):
    """For an element permutation ``permute`` of arrays of ``shape``, the map taking the
    gradient with respect to the permuted array back to the original's positions."""
    index = permute(np.arange(int(np.prod(shape))).reshape(shape))

    def back(gradient: np.ndarray) -> np.ndarray:
        out = np.zeros(int(np.prod(shape)))
        out[index.ravel()] = gradient.ravel()
        return out.reshape(shape)

    return back


def _weights_changed(permute: Callable[[np.ndarray], np.ndarray]) -> Make:
    """The user's code used ``permute(w)`` for w: z, dx as such, dw mapped back."""

    def make(setup: Setup) -> dict[str, np.ndarray] | None:
        w = permute(setup.w)
        got = Setup(setup.x, w, setup.b, setup.dz, setup.spec).compute()
        got["dw"] = _transposed(permute, setup.w.shape)(got["dw"])
        return got

    return make


def _inputs_changed(permute: Callable[[np.ndarray], np.ndarray]) -> Make:
    """The user's code used ``permute(x)`` for x: z, dw as such, dx mapped back."""

    def make(setup: Setup) -> dict[str, np.ndarray] | None:
        got = Setup(permute(setup.x), setup.w, setup.b, setup.dz, setup.spec).compute()
        got["dx"] = _transposed(permute, setup.x.shape)(got["dx"])
        return got

    return make


def _shaped(shape: tuple[int, ...]) -> np.ndarray:
    """A read-only array of ``shape`` that takes no memory (for shape arithmetic)."""
    return np.broadcast_to(np.float64(0), shape)


def _weight_mistakes(geometry: Geometry) -> Iterator[Candidate]:
    rank, first = geometry.rank, geometry.layout == "nchw"
    axes = _kernel_axes(rank, first)
    yield Candidate(
        "kernel flipped",
        _weights_changed(lambda w: np.flip(w, axis=axes)),
        "equals convcli's with the kernel flipped: a true convolution instead of cross-correlation",
    )
    if rank >= 2:
        yield Candidate(
            "kernel axes swapped",
            _weights_changed(lambda w: np.swapaxes(w, axes[-1], axes[-2])),
            "equals convcli's with the kernel's last two spatial axes swapped "
            "(kh and kw exchanged)",
        )
    layout = geometry.layout
    other = "nhwc" if first else "nchw"
    names = {"nhwc": "HWIO", "nchw": "OIHW"}

    def reread_w(w: np.ndarray) -> np.ndarray:
        shape_other = w_from_last(_shaped(w_to_last(w, layout).shape), other).shape
        return w_from_last(w_to_last(w.reshape(shape_other), other), layout)

    yield Candidate(
        "weights read in the other layout",
        _weights_changed(reread_w),
        f"equals convcli's with the weights' memory read as {names[other]} "
        f"(reshaped, not transposed) while they are {names[layout]}",
    )

    def reread_x(x: np.ndarray) -> np.ndarray:
        shape_other = x_from_last(_shaped(x_to_last(x, layout).shape), other).shape
        return x_from_last(x_to_last(x.reshape(shape_other), other), layout)

    data = {"nhwc": "NHWC", "nchw": "NCHW"}
    yield Candidate(
        "data read in the other layout",
        _inputs_changed(reread_x),
        f"equals convcli's with x's memory read as {data[other]} "
        f"(reshaped, not transposed) while it is {data[layout]}",
    )


def _bias_mistakes(setup: Setup) -> Iterator[Candidate]:
    if setup.b is None:
        return

    def missing(s: Setup) -> dict[str, np.ndarray] | None:
        return {"z": conv_forward(s.x, s.w, None, s.spec)[0]}

    def twice(s: Setup) -> dict[str, np.ndarray] | None:
        with_b = conv_forward(s.x, s.w, s.b, s.spec)[0]
        return {"z": 2 * with_b - conv_forward(s.x, s.w, None, s.spec)[0]}

    yield Candidate("bias missing", missing, "equals convcli's without the bias")
    yield Candidate("bias added twice", twice, "equals convcli's with b added twice")


def _reduction_mistakes(geometry: Geometry) -> Iterator[Candidate]:
    n = geometry.n
    positions = int(np.prod(geometry.out_sizes))
    if n > 1:
        for name in ("dw", "db"):
            yield Candidate(
                f"{name} divided by the batch size",
                _divided(name, n),
                f"equals convcli's divided by the batch size n={n} "
                "(a mean over the batch instead of a sum)",
            )
        yield Candidate(
            "db of the first image only",
            lambda s: {"db": _db_first_image(s)},
            "equals convcli's summed over the first image only, not the batch",
        )
        yield Candidate(
            "dw of the first image only",
            _dw_first_image,
            "equals convcli's for the first image only (not summed over the batch)",
        )
    if positions > 1:
        yield Candidate(
            "db averaged",
            _divided("db", n * positions),
            f"equals convcli's divided by n·Ho·Wo={n * positions} "
            "(a mean over batch and positions instead of a sum)",
        )
    yield Candidate(
        "dw summed over the wrong axis (output channels)",
        _dw_of_channel_sum,
        "equals convcli's made with dz summed over the output channels "
        "(every output channel's dw sees the same total)",
    )
    yield Candidate(
        "dw from the transposed product",
        _dw_transposed_product,
        "equals convcli's (kh·kw·Cin, Cout) matrix transposed and reshaped: "
        "an im2col product taken as dzᵀ·cols and reshaped without transposing back",
    )
    rank, first = geometry.rank, geometry.layout == "nchw"
    channel = 1 if first else rank + 1
    for axis in range(rank + 2):
        if axis != channel:
            yield Candidate(
                f"db summed over the wrong axis ({axis})",
                _db_keeping(axis),
                f"equals dz summed over every axis but axis {axis} (the channel axis is {channel})",
            )


def _upstream(setup: Setup) -> np.ndarray:
    if setup.dz is not None:
        return setup.dz
    return conv_forward(setup.x, setup.w, setup.b, setup.spec)[0]


def _db_first_image(setup: Setup) -> np.ndarray:
    return sum_but_channel(_upstream(setup)[:1], setup.spec)


def _dw_first_image(setup: Setup) -> dict[str, np.ndarray] | None:
    """dw of the layer on image 0 alone, with that image's dz."""
    g = _upstream(setup)[:1]
    return {"dw": Setup(setup.x[:1], setup.w, setup.b, g, setup.spec).compute()["dw"]}


def _dw_of_channel_sum(setup: Setup) -> dict[str, np.ndarray] | None:
    """dw as if every output channel's dz were dz summed over the output channels."""
    g = _upstream(setup)
    channel = 1 if setup.spec.channels_first else g.ndim - 1
    total = np.broadcast_to(g.sum(axis=channel, keepdims=True), g.shape)
    summed = Setup(setup.x, setup.w, setup.b, np.ascontiguousarray(total), setup.spec)
    return {"dw": summed.compute()["dw"]}


def _dw_transposed_product(setup: Setup) -> dict[str, np.ndarray] | None:
    """dw's (kh·kw·Cin, Cout) matrix (channels last) transposed, then reshaped back."""
    layout = setup.spec.layout
    dw = w_to_last(setup.compute()["dw"], layout)
    matrix = dw.reshape(-1, dw.shape[-1])
    if matrix.shape[0] == 1 or matrix.shape[1] == 1:
        return None  # a vector: transposing changes nothing
    return {"dw": w_from_last(np.ascontiguousarray(matrix.T).reshape(dw.shape), layout)}


def _db_keeping(axis: int) -> Make:
    """db as dz summed over every axis but ``axis``."""

    def make(setup: Setup) -> dict[str, np.ndarray] | None:
        g = _upstream(setup)
        return {"db": g.sum(axis=tuple(a for a in range(g.ndim) if a != axis))}

    return make


def _divided(name: str, divisor: int) -> Make:
    """convcli's ``name`` divided by ``divisor``."""
    return lambda setup: {name: setup.compute()[name] / divisor}


def _respecified(**changes: object) -> Make:
    """Everything computed under a spec with ``changes``."""
    return lambda setup: setup.with_spec(**changes).compute()


def _transposed_mistakes(geometry: Geometry) -> Iterator[Candidate]:
    """A transposed convolution for a convolution or the reverse (same w, hyperparameters),
    and for a transposed layer another output_padding: on every axis, then on one alone.

    The result usually has another shape than convcli's; it is compared when it has the
    user's."""
    if not geometry.transposed:
        yield Candidate(
            "transposed convolution",
            _respecified(transposed=True),
            "equals convcli's transposed convolution (ConvTranspose) of x with the same w and "
            "hyperparameters: this layer is a convolution",
        )
        return
    yield Candidate(
        "not transposed",
        _respecified(transposed=False, output_padding=0),
        "equals convcli's convolution of x with the same w and hyperparameters: this layer "
        "is a transposed convolution (transposed = 1)",
    )
    current = geometry.output_padding
    limits = [max(s, d) for s, d in zip(geometry.stride, geometry.dilation, strict=True)]
    was = _format_steps(current)
    tried = {current}
    variants = [(value,) * len(current) for value in range(max(limits))]
    for axis, limit in enumerate(limits if len(current) > 1 else ()):
        variants += [(*current[:axis], v, *current[axis + 1 :]) for v in range(limit)]
    for variant in variants:
        if variant in tried or any(v >= limit for v, limit in zip(variant, limits, strict=True)):
            continue
        tried.add(variant)
        text = _format_steps(variant)
        yield Candidate(
            f"output_padding {text}",
            _respecified(output_padding=variant),
            f"equals convcli's with output_padding {text} instead of {was}",
        )


def _crop_mistakes(setup: Setup, geometry: Geometry) -> Iterator[Candidate]:
    pads = geometry.pads
    if geometry.transposed:
        return  # a transposed layer's padding crops z, not x: dx is never cropped
    if geometry.padding_mode != "zeros" or not any(lo or hi for lo, hi in pads):
        return
    rank, first = geometry.rank, geometry.layout == "nchw"
    axes = _spatial_axes(rank + 2, rank, first)

    def padded(s: Setup) -> np.ndarray:
        widths = [(0, 0)] * s.x.ndim
        for axis, pair in zip(axes, pads, strict=True):
            widths[axis] = pair
        x = np.pad(s.x, widths)
        return Setup(x, s.w, s.b, s.dz, s.with_spec(padding=0).spec).compute()["dx"]

    def cropped(s: Setup, shift: int) -> np.ndarray | None:
        full = padded(s)
        index: list[slice] = [slice(None)] * full.ndim
        for axis, (lo, _) in zip(axes, pads, strict=True):
            start = lo + shift
            if start < 0 or start + s.x.shape[axis] > full.shape[axis]:
                return None
            index[axis] = slice(start, start + s.x.shape[axis])
        return full[tuple(index)]

    yield Candidate(
        "dx not cropped",
        lambda s: {"dx": padded(s)},
        "is the gradient of the padded x: the padding was not cropped off",
    )
    for shift in (1, -1):

        def make(s: Setup, shift: int = shift) -> dict[str, np.ndarray] | None:
            dx = cropped(s, shift)
            return None if dx is None else {"dx": dx}

        yield Candidate(
            f"dx cropped {shift:+d}",
            make,
            f"equals convcli's padded dx cropped one pixel "
            f"{'late' if shift > 0 else 'early'} (the un-padding slice shifted by {shift:+d})",
        )


def _layout_mistakes(geometry: Geometry) -> Iterator[Candidate]:
    first = geometry.layout == "nchw"
    names = {"z": ("NCHW", "NHWC"), "dx": ("NCHW", "NHWC"), "dw": ("OIHW", "HWIO")}

    def moved(name: str) -> Make:
        def make(s: Setup) -> dict[str, np.ndarray] | None:
            value = s.compute()[name]
            to_last = w_to_last if name == "dw" else x_to_last
            from_last = w_from_last if name == "dw" else x_from_last
            return {name: to_last(value, "nchw") if first else from_last(value, "nchw")}

        return make

    for name, (cf, cl) in names.items():
        yours, ours = (cl, cf) if first else (cf, cl)
        yield Candidate(
            f"{name} in the other layout",
            moved(name),
            f"equals convcli's in {yours} order while the inputs are {ours}",
        )


def _format_pads(pads: tuple[tuple[int, int], ...]) -> str:
    if all(lo == hi == pads[0][0] for lo, hi in pads):
        return str(pads[0][0])
    return ",".join(f"{lo},{hi}" for lo, hi in pads)


def _padding_mistakes(setup: Setup, geometry: Geometry) -> Iterator[Candidate]:
    pads = geometry.pads
    same = setup.spec.padding if isinstance(setup.spec.padding, str) else None
    variants: list[tuple[tuple[int, int], ...]] = []
    if any(lo != hi for lo, hi in pads):
        variants.append(tuple((hi, lo) for lo, hi in pads))
    for d_lo, d_hi in ((1, 1), (-1, -1), (1, 0), (0, 1), (-1, 0), (0, -1)):
        variant = tuple((lo + d_lo, hi + d_hi) for lo, hi in pads)
        if all(lo >= 0 and hi >= 0 for lo, hi in variant) and variant not in variants:
            variants.append(variant)
    was = f"'{same}'" if same else _format_pads(pads)
    for variant in variants:
        if variant == pads:
            continue
        swapped = variant == tuple((hi, lo) for lo, hi in pads)
        text = _format_pads(variant)
        if same == "same" and swapped:
            text = f"{text} ('same_lower', SAME_LOWER: the extra pixel first)"
        elif same == "same_lower" and swapped:
            text = f"{text} ('same', SAME_UPPER: the extra pixel last)"
        yield Candidate(
            f"padding {_format_pads(variant)}",
            _respecified(padding=variant),
            f"equals convcli's with padding {text} instead of {was}",
        )


def _step_mistakes(geometry: Geometry) -> Iterator[Candidate]:
    """Another stride or dilation: on every axis at once, then on one axis alone."""
    for name, values in (("stride", geometry.stride), ("dilation", geometry.dilation)):
        was = _format_steps(values)
        tried: set[tuple[int, ...]] = {values}
        for value in _near(values[0]):
            variant = (value,) * len(values)
            if variant not in tried:
                tried.add(variant)
                yield _step_candidate(name, variant, was)
        if len(values) < 2:
            continue
        for axis, current in enumerate(values):
            for value in _near(current):
                variant = (*values[:axis], value, *values[axis + 1 :])
                if variant not in tried:
                    tried.add(variant)
                    yield _step_candidate(name, variant, was)


def _near(value: int) -> list[int]:
    """The steps a mistake usually gives instead of ``value``."""
    return sorted({1, 2, 3, *(v for v in (value - 1, value + 1) if v >= 1)} - {value})


def _format_steps(values: tuple[int, ...]) -> str:
    return str(values[0]) if len(set(values)) == 1 else ",".join(map(str, values))


def _step_candidate(name: str, variant: tuple[int, ...], was: str) -> Candidate:
    text = _format_steps(variant)
    return Candidate(
        f"{name} {text}",
        _respecified(**{name: variant}),
        f"equals convcli's with {name} {text} instead of {was}",
    )
