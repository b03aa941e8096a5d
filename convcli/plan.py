"""A layer's questions answered from shapes alone: the library behind ``convcli plan``.

:func:`plan_layer` takes the shapes of x and w (in the spec's layout) and a
:class:`~convcli.spec.ConvSpec` and returns a :class:`LayerPlan`: the output shape, the
padding resolved per axis, the input pixels no output reads, parameters, multiply-adds
(MACs) and floating-point operations (FLOPs = 2 · MACs) of the forward pass and of the two
halves of the backward pass, the receptive field, the memory a ``forward``, ``backward`` or
``gradcheck`` run would need and the forward passes of an exhaustive gradient check.
:func:`plan_file` does the same from a data file's headers (no tensor data is read) and
:func:`plan_stack` for the ``[[layers]]`` of a TOML file (:class:`StackPlan`: per layer the
cumulative receptive field and jump, and totals).

Nothing here computes a size of its own: output sizes and padding come from
:meth:`ConvSpec.geometry`, which pixels a padded position reads from
:func:`convcli.spec.padding_source`, multiply-adds from
:func:`convcli.check.gradients.forward_multiply_adds`, memory from :mod:`convcli.memory`
(the estimates the runs check before any work) and the engine's scratch bound, gradient-check
passes from :func:`convcli.check.exhaustive.exhaustive_passes`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
import numpy.typing as npt

from convcli.check.exhaustive import exhaustive_passes
from convcli.check.gradients import auto_mode, forward_multiply_adds
from convcli.engine.fast import DEFAULT_WORKSPACE, scratch_bytes
from convcli.errors import DataError
from convcli.hparams import build_spec
from convcli.io.loading import read_headers
from convcli.memory import gradcheck_needs, in_memory_run_needs, nbytes
from convcli.run import check_shapes, compute_dtype
from convcli.spec import AXIS_NAMES, ConvSpec, Geometry, output_size, padding_source
from convcli.sweep.schema import LayerTables, SpecError

_CHUNK = 1 << 20  # positions computed at once when finding the pixels an axis reads


@dataclass(frozen=True)
class AxisPlan:
    """One spatial axis of a layer.

    ``effective_kernel`` is the span of the dilated kernel, ``dilation · (kernel - 1) + 1``;
    ``unread`` counts the input positions along this axis that no output reads (through any
    tap, after the padding mode maps padded positions back), ``unread_border`` those before
    the first and after the last position read (``valid`` dropping the end) and
    ``unread_gaps`` those between (a stride longer than the kernel's span).

    A transposed convolution reads every input position except those whose every
    contribution the padding crops (all at the ends: ``unread_gaps`` is 0); what it can leave
    out are *outputs*: ``unreached`` counts the output positions along this axis that no input
    reaches (a stride longer than the kernel's span, an output_padding at least the stride),
    which hold only the bias.
    """

    axis: str
    size: int
    kernel: int
    effective_kernel: int
    stride: int
    dilation: int
    padding: tuple[int, int]
    out: int
    unread: int
    unread_border: int
    unread_gaps: int
    transposed: bool = False
    unreached: int = 0

    def to_json(self) -> dict:
        extra = {"unreached": self.unreached} if self.transposed else {}
        return {
            "axis": self.axis,
            "size": self.size,
            "kernel": self.kernel,
            "effective_kernel": self.effective_kernel,
            "stride": self.stride,
            "dilation": self.dilation,
            "padding": list(self.padding),
            "out": self.out,
            "unread": self.unread,
            "unread_border": self.unread_border,
            "unread_gaps": self.unread_gaps,
            **extra,
        }


@dataclass(frozen=True)
class Work:
    """Operations of a layer: the forward pass, and the backward pass's dx and dw.

    As multiply-adds each is ``n · ∏out · Cout · ∏kernel · Cin/groups`` (every product of
    the forward pass appears once in dx and once in dw), padded taps included, bias not.
    """

    forward: int
    backward_dx: int
    backward_dw: int

    @property
    def total(self) -> int:
        return self.forward + self.backward_dx + self.backward_dw

    def __add__(self, other: Work) -> Work:
        return Work(
            self.forward + other.forward,
            self.backward_dx + other.backward_dx,
            self.backward_dw + other.backward_dw,
        )

    def scaled(self, factor: int) -> Work:
        return Work(self.forward * factor, self.backward_dx * factor, self.backward_dw * factor)

    def to_json(self) -> dict:
        return {
            "forward": self.forward,
            "backward_dx": self.backward_dx,
            "backward_dw": self.backward_dw,
            "total": self.total,
        }


@dataclass(frozen=True)
class LayerPlan:
    """What one convolution layer is, costs and needs, from its shapes.

    Attributes
    ----------
    geometry : Geometry
        The resolved geometry (channels last inside; :attr:`shapes` in the caller's layout).
    dtype : str
        The dtype the engine computes in (``"float32"`` or ``"float64"``).
    bias : bool
        Whether the layer has a bias ``b (Cout,)``.
    axes : tuple of AxisPlan
        One per spatial axis.
    macs : Work
        Multiply-adds (:attr:`flops` is twice this). Bias additions are :attr:`bias_adds`.
    bias_adds : int
        Additions of the bias in the forward pass, ``n · ∏out · Cout`` (0 without bias);
        db sums as many.
    tensors : dict of str to int
        Bytes of x, w, b (held in their dtypes) and z (in ``dtype``).
    workspace : int
        The engine's scratch bound for a forward or backward call.
    needs : dict of str to dict of str to int
        ``"forward"``, ``"backward"``, ``"gradcheck"``: what such a run with every tensor in
        memory needs, by kind, exactly as the run estimates it before it starts (and
        compares with ``max_memory``).
    gradcheck_passes : int
        Forward passes of an exhaustive gradient check.
    gradcheck_auto : str
        The mode a gradient check in mode ``auto`` would choose (``"exhaustive"`` or
        ``"sample+fast"``).
    """

    geometry: Geometry
    dtype: str
    bias: bool
    axes: tuple[AxisPlan, ...]
    macs: Work
    bias_adds: int
    tensors: dict[str, int]
    workspace: int
    needs: dict[str, dict[str, int]]
    gradcheck_passes: int
    gradcheck_auto: str

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        """x, w, b (with a bias) and z in the caller's layout."""
        shapes = self.geometry.user_shapes()
        if self.bias:
            shapes = {**shapes, "b": (self.geometry.cout,)}
        return {name: shapes[name] for name in ("x", "w", "b", "z") if name in shapes}

    @property
    def flops(self) -> Work:
        """Floating-point operations: one multiply and one add per multiply-add."""
        return self.macs.scaled(2)

    @property
    def weights(self) -> int:
        g = self.geometry
        return math.prod(g.kernel) * (g.cin // g.groups) * g.cout

    @property
    def biases(self) -> int:
        return self.geometry.cout if self.bias else 0

    @property
    def parameters(self) -> int:
        return self.weights + self.biases

    @property
    def receptive_field(self) -> tuple[int, ...]:
        """Input positions one output sees along each axis: the effective kernel; for a
        transposed layer at most ``ceil(effective_kernel / stride)`` (its taps land
        ``stride`` output positions apart per input)."""
        return tuple(_field(axis) for axis in self.axes)

    @property
    def output_pixels(self) -> int:
        """Spatial positions of one image (and channel) of z."""
        return math.prod(self.geometry.out_sizes)

    @property
    def unreached_pixels(self) -> int:
        """Spatial positions of z no input reaches (transposed layers; 0 otherwise): they
        hold the bias alone."""
        return self.output_pixels - math.prod(a.out - a.unreached for a in self.axes)

    @property
    def input_pixels(self) -> int:
        """Spatial positions of one image (and channel) of x."""
        return math.prod(self.geometry.in_sizes)

    @property
    def unread_pixels(self) -> int:
        """Spatial positions of x no output reads (in every image and channel alike)."""
        return self.input_pixels - math.prod(a.size - a.unread for a in self.axes)

    def to_json(self) -> dict:
        return {
            "shapes": {name: list(shape) for name, shape in self.shapes.items()},
            "hparams": self.geometry.hparams(),
            "dtype": self.dtype,
            "bias": self.bias,
            "axes": [axis.to_json() for axis in self.axes],
            "input_pixels": self.input_pixels,
            "unread_pixels": self.unread_pixels,
            **(
                {"output_pixels": self.output_pixels, "unreached_pixels": self.unreached_pixels}
                if self.geometry.transposed
                else {}
            ),
            "parameters": {
                "weights": self.weights,
                "biases": self.biases,
                "total": self.parameters,
            },
            "macs": self.macs.to_json(),
            "flops": self.flops.to_json(),
            "bias_adds": self.bias_adds,
            "memory": {
                "tensors": dict(self.tensors),
                "workspace": self.workspace,
                **{
                    run: {"needs": dict(needs), "total": sum(needs.values())}
                    for run, needs in self.needs.items()
                },
            },
            "gradcheck": {
                "exhaustive_passes": self.gradcheck_passes,
                "auto_mode": self.gradcheck_auto,
            },
        }


@dataclass(frozen=True)
class StackLayer:
    """A layer of a stack: its plan, and the receptive field and jump of its outputs on the
    stack's input, per spatial axis.

    ``receptive_field`` is ``r_l = r_(l-1) + (f_l - 1) · j_(l-1)`` and ``jump`` (the
    distance on the input between neighbouring outputs) ``j_l = j_(l-1) · stride_l``, from
    ``r_0 = j_0 = 1``, where ``f_l`` is the layer's own receptive field (its effective kernel).
    A transposed layer's outputs are ``stride`` times denser than its inputs: there ``j_l =
    j_(l-1) / stride_l`` (a fraction of an input pixel once the stack upsamples past its
    input) and ``f_l = ceil(effective_kernel / stride)``; ``r_l`` is then rounded up to whole
    input pixels.
    """

    plan: LayerPlan
    receptive_field: tuple[int, ...]
    jump: tuple[float, ...]

    def to_json(self) -> dict:
        return {
            **self.plan.to_json(),
            "receptive_field": list(self.receptive_field),
            "jump": _jumps(self.jump),
        }


def _jumps(jump: tuple[float, ...]) -> list[float | int]:
    """Whole jumps as ints in JSON (as before transposed layers), fractions as floats."""
    return [int(j) if float(j).is_integer() else float(j) for j in jump]


@dataclass(frozen=True)
class StackPlan:
    """Layers applied one after the other, and their totals."""

    layers: tuple[StackLayer, ...]

    @classmethod
    def of(cls, plans: Sequence[LayerPlan]) -> StackPlan:
        """Chain ``plans`` (each layer's x the previous layer's z)."""
        layers: list[StackLayer] = []
        rank = plans[0].geometry.rank if plans else 0
        field: tuple[Fraction, ...] = (Fraction(1),) * rank
        jump: tuple[Fraction, ...] = (Fraction(1),) * rank
        for plan in plans:
            field = tuple(
                r + (_field(a) - 1) * j for r, a, j in zip(field, plan.axes, jump, strict=True)
            )
            jump = tuple(
                j / a.stride if a.transposed else j * a.stride
                for j, a in zip(jump, plan.axes, strict=True)
            )
            layers.append(
                StackLayer(
                    plan,
                    tuple(math.ceil(r) for r in field),
                    tuple(int(j) if j.denominator == 1 else float(j) for j in jump),
                )
            )
        return cls(tuple(layers))

    @property
    def parameters(self) -> int:
        return sum(layer.plan.parameters for layer in self.layers)

    @property
    def macs(self) -> Work:
        total = Work(0, 0, 0)
        for layer in self.layers:
            total = total + layer.plan.macs
        return total

    @property
    def flops(self) -> Work:
        return self.macs.scaled(2)

    @property
    def bias_adds(self) -> int:
        return sum(layer.plan.bias_adds for layer in self.layers)

    def to_json(self) -> dict:
        last = self.layers[-1]
        return {
            "layers": [layer.to_json() for layer in self.layers],
            "totals": {
                "parameters": self.parameters,
                "macs": self.macs.to_json(),
                "flops": self.flops.to_json(),
                "bias_adds": self.bias_adds,
                "receptive_field": list(last.receptive_field),
                "jump": _jumps(last.jump),
            },
        }


def layer_shapes(
    shape: Sequence[int], kernel: Sequence[int], cout: int, spec: ConvSpec
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The shapes of x and w in ``spec.layout`` for a layer described channels last.

    Parameters
    ----------
    shape : (n, *spatial, Cin), 1 to 3 spatial axes, whatever the layout
    kernel : one size for every spatial axis, or one per axis
    cout : output channels

    w is ``(*kernel, Cin/groups, Cout)`` or ``(Cout, Cin/groups, *kernel)``; for a transposed
    ``spec`` ``(*kernel, Cout/groups, Cin)`` or ``(Cin, Cout/groups, *kernel)``.
    """
    n, *spatial, cin = (int(v) for v in shape)
    sizes = [int(k) for k in kernel]
    sizes = sizes * len(spatial) if len(sizes) == 1 else sizes
    cout = int(cout)
    # transposed: w is (*kernel, Cout/groups, Cin); a count groups does not divide is left
    # whole, for the geometry to refuse with its own message
    grouped, whole = (cout, cin) if spec.transposed else (cin, cout)
    per_group = grouped // spec.groups if grouped % spec.groups == 0 else grouped
    if spec.channels_first:
        return (n, cin, *spatial), (whole, per_group, *sizes)
    return (n, *spatial, cin), (*sizes, per_group, whole)


def plan_layer(
    x_shape: Sequence[int],
    w_shape: Sequence[int],
    spec: ConvSpec,
    *,
    bias: bool = True,
    dtype: npt.DTypeLike = "float64",
    held: Mapping[str, npt.DTypeLike] | None = None,
    workspace: int = DEFAULT_WORKSPACE,
) -> LayerPlan:
    """Plan one layer from the shapes of x and w.

    Parameters
    ----------
    x_shape : (n, *spatial, Cin), or (n, Cin, *spatial) with ``layout="nchw"``
    w_shape : (*kernel, Cin/groups, Cout), or (Cout, Cin/groups, *kernel)
    spec : ConvSpec
    bias : bool
        Whether a bias b (Cout,) is added.
    dtype : float32 or float64
        The dtype of x, w and b, when ``held`` does not say.
    held : mapping of "x", "w", "b" to dtypes, optional
        The dtypes the tensors are held in (a file's); the engine computes in the widest,
        integers as float64.
    workspace : int
        The engine's scratch budget in bytes (a run's ``workspace``).

    Raises
    ------
    ShapeError, HyperparameterError
        What the engine would raise for these shapes.
    """
    geometry = spec.geometry(tuple(x_shape), tuple(w_shape))
    dtypes = {name: np.dtype(value) for name, value in (held or {}).items()}
    for name in ("x", "w", "b") if bias else ("x", "w"):
        dtypes.setdefault(name, np.dtype(dtype))
    compute = compute_dtype(dtypes.values())
    shapes = geometry.user_shapes()
    tensors = {name: nbytes(shapes[name], dtypes[name]) for name in ("x", "w")}
    if bias:
        tensors["b"] = nbytes((geometry.cout,), dtypes["b"])
    given = sum(tensors.values())
    tensors["z"] = nbytes(shapes["z"], compute)
    scratch = scratch_bytes(geometry, compute, workspace)
    needs = {
        command: in_memory_run_needs(
            geometry,
            compute,
            input_bytes=given,
            scratch=scratch,
            backward=command == "backward",
        )
        for command in ("forward", "backward")
    }
    check_scratch = scratch_bytes(geometry, np.dtype(np.float64), DEFAULT_WORKSPACE)
    needs["gradcheck"] = gradcheck_needs(geometry, input_bytes=given, scratch=check_scratch)
    macs = forward_multiply_adds(geometry)
    return LayerPlan(
        geometry=geometry,
        dtype=str(compute),
        bias=bias,
        axes=tuple(_axis_plan(geometry, axis) for axis in range(geometry.rank)),
        macs=Work(macs, macs, macs),
        bias_adds=geometry.n * math.prod(geometry.out_sizes) * geometry.cout if bias else 0,
        tensors=tensors,
        workspace=scratch,
        needs=needs,
        gradcheck_passes=exhaustive_passes(geometry, bias),
        gradcheck_auto=auto_mode(geometry, bias)[0],
    )


def plan_file(
    data: str | os.PathLike[str] | None,
    refs: Mapping[str, str | None],
    texts: Mapping[str, str | None],
    *,
    layer: str | None = None,
    workspace: int = DEFAULT_WORKSPACE,
) -> LayerPlan:
    """Plan the layer a data file (and per-role references) describes, from headers alone.

    ``refs``, ``texts`` and ``layer`` as ``forward`` takes them: ``{"x": "FILE:KEY", ...}``,
    hyperparameter texts by library name (they win over the file's) and the name of the
    layer w and b come from (see :func:`convcli.io.loading.load_tensors`). The bias is there
    when the file holds one. Shapes, dtypes and hyperparameters are checked as ``forward`` checks
    them before reading; no tensor data is read.
    """
    headers = read_headers(data, refs, ("x", "w"), ("b",), layer=layer)
    rank = len(headers.shapes["x"]) - 2
    spec = build_spec(headers.hparams, texts, rank).spec
    check_shapes("forward", headers.shapes, headers.dtypes, spec)
    return plan_layer(
        headers.shapes["x"],
        headers.shapes["w"],
        spec,
        bias="b" in headers.shapes,
        held=headers.dtypes,
        workspace=workspace,
    )


def plan_stack(path: str | os.PathLike[str], *, workspace: int = DEFAULT_WORKSPACE) -> StackPlan:
    """Plan the ``[[layers]]`` of a TOML file (see :class:`convcli.sweep.schema.LayerTables`):
    each layer's x is the previous layer's z.

    Raises
    ------
    SpecError
        A bad table or value (citing the line, table and key), or a layer the engine would
        refuse (with the layer's number).
    """
    tables = LayerTables(path)
    plans: list[LayerPlan] = []
    shape: tuple[int, ...] | None = None
    for index in range(len(tables)):
        config = tables.config(index, shape)
        try:
            spec = config.spec()
            x_shape, w_shape = layer_shapes(config.shape, config.kernel, config.cout, spec)
            plan = plan_layer(x_shape, w_shape, spec, dtype=config.dtype, workspace=workspace)
        except DataError as error:
            raise SpecError(f"{tables.path} ([[layers]] table {index + 1}): {error}") from None
        plans.append(plan)
        shape = plan.geometry.out_shape
    return StackPlan.of(plans)


def _field(axis: AxisPlan) -> int:
    """Positions of its input one output of this axis sees (see LayerPlan.receptive_field)."""
    if axis.transposed:
        return -(-axis.effective_kernel // axis.stride)
    return axis.effective_kernel


def _axis_plan(geometry: Geometry, axis: int) -> AxisPlan:
    size, k = geometry.in_sizes[axis], geometry.kernel[axis]
    s, d = geometry.stride[axis], geometry.dilation[axis]
    before, after = geometry.pads[axis]
    unreached = 0
    if geometry.transposed:
        out = geometry.out_sizes[axis]
        unread, unreached = _transposed_unread(size, k, s, d, before, after, out)
        border = unread  # only the cropping padding leaves inputs unused: at the ends
    else:
        unread, border = _unread(size, k, s, d, before, after, geometry.padding_mode)
    return AxisPlan(
        transposed=geometry.transposed,
        unreached=unreached,
        axis=AXIS_NAMES[geometry.rank][axis],
        size=size,
        kernel=k,
        effective_kernel=d * (k - 1) + 1,
        stride=s,
        dilation=d,
        padding=(before, after),
        out=geometry.out_sizes[axis],
        unread=unread,
        unread_border=border,
        unread_gaps=unread - border,
    )


def _unread(
    size: int, kernel: int, stride: int, dilation: int, before: int, after: int, mode: str
) -> tuple[int, int]:
    """Input positions along one axis that no output reads, and how many of them lie before
    the first position read or after the last (all of them when none is read).

    Away from the ends (``margin = span + stride`` positions from either), whether a
    position is read depends only on its remainder modulo the stride, as long as padding
    reads nothing from there (zeros, replicate). So a long axis is computed as a shorter one
    with whole periods of the stride taken out of its middle, and each period removed counts
    as one period of that middle: the time and memory do not grow with the axis.
    """
    margin = dilation * (kernel - 1) + 1 + stride
    periods = 0
    if mode in ("zeros", "replicate") and size > 2 * margin + 2 * stride:
        periods = (size - 2 * margin - stride) // stride
    short = size - periods * stride
    out = output_size(short, kernel, stride, dilation, before, after)
    read = _read_mask(short, kernel, stride, dilation, before, out, mode)
    positions = np.flatnonzero(read)
    # a removed period is read like positions margin .. margin + stride of the short axis
    unread = short - positions.size + periods * int(stride - read[margin : margin + stride].sum())
    if not positions.size:
        return unread, unread
    return unread, int(positions[0]) + short - 1 - int(positions[-1])


def _read_mask(
    size: int, kernel: int, stride: int, dilation: int, before: int, out: int, mode: str
) -> np.ndarray:
    """Which input positions along one axis some output reads, through any tap."""
    read = np.zeros(size, dtype=bool)
    taps_per_chunk = max(1, min(kernel, _CHUNK))
    outs_per_chunk = max(1, _CHUNK // taps_per_chunk)
    for first_tap in range(0, kernel, taps_per_chunk):
        taps = np.arange(first_tap, min(kernel, first_tap + taps_per_chunk)) * dilation - before
        for first in range(0, out, outs_per_chunk):
            starts = np.arange(first, min(out, first + outs_per_chunk)) * stride
            sources = padding_source(np.add.outer(starts, taps).ravel(), size, mode)
            read[sources[sources >= 0]] = True
    return read


def _transposed_unread(
    size: int, kernel: int, stride: int, dilation: int, before: int, after: int, out: int
) -> tuple[int, int]:
    """Along one axis of a transposed convolution: the inputs none of whose contributions
    lands in the output (the padding crops them all), and the outputs no input reaches.

    Input ``i`` adds to the uncropped positions ``t = i·stride + j·dilation`` (``0 <= j <
    kernel``); output ``o`` is ``t = o + before``. Inputs are unused only at the ends, where
    the padding crops everything they give (counted in closed form; when the output is
    shorter than the dilation, taps may also step over it, and the few inputs whose taps
    straddle it are looked at one by one). A position ``t`` between ``span - 1`` and
    ``(size - 1)·stride`` is reached exactly when ``t mod stride`` is some ``j·dilation mod
    stride``; the positions before and after are looked at one by one (at most a span and an
    output_padding of them). So time and memory do not grow with the axis.
    """
    span = dilation * (kernel - 1) + 1
    last = (size - 1) * stride  # where the last input's first tap lands
    start, stop = before, before + out  # the uncropped positions kept
    # inputs whose last tap lands before the output, and whose first lands after it
    early = min(size, max(0, -(-(start - span + 1) // stride)))
    late = min(size - early, max(0, size - -(-stop // stride)))
    unread = early + late
    if out < dilation and early < size - late:  # taps may step over a short output
        landing = np.add.outer(np.arange(early, size - late) * stride, np.arange(kernel) * dilation)
        unread += int((~((landing >= start) & (landing < stop)).any(axis=1)).sum())

    def missed(first: int, end: int) -> int:
        """Positions in [first, end) that no tap of any input lands on, one by one."""
        if end <= first:
            return 0
        t = np.arange(first, end)
        reached = np.zeros(t.size, dtype=bool)
        for j in range(kernel):
            u = t - j * dilation
            reached |= (u >= 0) & (u <= last) & (u % stride == 0)
        return int(t.size - reached.sum())

    low, high = max(start, span - 1), min(stop, last + 1)  # the periodic middle
    if low >= high:
        return unread, missed(start, stop)
    residues = {j * dilation % stride for j in range(kernel)}
    reached = sum((high - 1 - r) // stride - (low - 1 - r) // stride for r in residues)
    unreached = missed(start, low) + (high - low - reached) + missed(high, stop)
    return unread, unreached
