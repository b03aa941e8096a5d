"""Convolution hyperparameters (:class:`ConvSpec`) and the geometry they give a pair of tensors.

Any number of spatial axes from 1 to 3. Layouts (``ConvSpec.layout``):

- ``"nhwc"`` (channels last, the default): x ``(n, *spatial, Cin)`` — ``(n, L, C)``,
  ``(n, H, W, C)``, ``(n, D, H, W, C)`` — and weights ``(*kernel, Cin / groups, Cout)``;
- ``"nchw"`` (channels first, PyTorch/ONNX order): x ``(n, Cin, *spatial)`` and weights
  ``(Cout, Cin / groups, *kernel)``.

The rank comes from x; ``nlc``/``ndhwc`` and ``ncl``/``ncdhw`` are accepted as names of the
same two layouts. Inside, the engines work channels last: :class:`Geometry` holds the
channels-last view.

The output size along each spatial axis is computed in exactly one place,
:func:`output_size`::

    Ho = floor((H + top + bottom - dilation_h * (kh - 1) - 1) / stride_h) + 1

and likewise for every other spatial axis. A transposed convolution (``ConvSpec(transposed=True)``,
PyTorch's ``ConvTranspose``) maps sizes the other way, :func:`transposed_output_size`::

    Ho = (H - 1) * stride_h - top - bottom + dilation_h * (kh - 1) + output_padding_h + 1

Its weights are ``(*kernel, Cout / groups, Cin)`` channels last and ``(Cin, Cout / groups,
*kernel)`` channels first: the weights of the convolution it is the input gradient of.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeGuard

from convcli.errors import HyperparameterError, ShapeError

MAX_SPATIAL_DIMS = 3
AXIS_NAMES = {1: ("l",), 2: ("h", "w"), 3: ("d", "h", "w")}
LAYOUTS = {
    "nhwc": "nhwc",
    "nlc": "nhwc",
    "ndhwc": "nhwc",
    "channels_last": "nhwc",
    "nchw": "nchw",
    "ncl": "nchw",
    "ncdhw": "nchw",
    "channels_first": "nchw",
}
PADDING_MODES = ("zeros", "reflect", "replicate", "circular")
MAX_INT = 2**31 - 1
"""The largest stride, padding, dilation or groups value (and, in sweep specs, size): no
real layer comes near it, and bounded values keep every later product of sizes small."""

PaddingLike = int | str | tuple | list
"""What ``ConvSpec(padding=...)`` accepts: an int, one int per axis, ((before, after), ...),
"same" (or "same_upper"), "same_lower" or "valid"."""
Padding = tuple[int, ...] | tuple[tuple[int, int], ...] | str
"""ConvSpec.padding once normalised: one int or one per axis, (before, after) pairs, "same" or
"same_lower"."""


SAME_FORMS = {"same": "same", "same_upper": "same", "same_lower": "same_lower"}
"""Padding words that keep ``ceil(in / stride)`` outputs, and their normalised names: "same"
(also "same_upper"; ONNX SAME_UPPER, TensorFlow's SAME) puts an odd extra pixel at the end,
"same_lower" (ONNX SAME_LOWER) at the start."""


def output_size(size: int, kernel: int, stride: int, dilation: int, before: int, after: int) -> int:
    """Output length along one spatial axis (the one place this formula lives)."""
    return (size + before + after - dilation * (kernel - 1) - 1) // stride + 1


def transposed_output_size(
    size: int,
    kernel: int,
    stride: int,
    dilation: int,
    before: int,
    after: int,
    output_padding: int,
) -> int:
    """Output length along one axis of a transposed convolution (the one place this lives).

    The padding crops the output (``before`` at the start, ``after`` at the end);
    ``output_padding`` adds positions at the end. A convolution with the same hyperparameters
    maps this many positions back to ``size`` (:func:`output_size`).
    """
    return (size - 1) * stride - before - after + dilation * (kernel - 1) + output_padding + 1


def onnx_transposed_padding(
    in_sizes: Sequence[int],
    kernel: Sequence[int],
    output_shape: Sequence[int],
    *,
    stride: int | Sequence[int] = 1,
    dilation: int | Sequence[int] = 1,
    output_padding: int | Sequence[int] = 0,
    auto_pad: str = "NOTSET",
) -> tuple[tuple[tuple[int, int], ...], tuple[int, ...]]:
    """The padding and output_padding of a transposed convolution that gives ``output_shape``
    (the spatial sizes of z), as ONNX's ``ConvTranspose`` derives pads from its
    ``output_shape`` attribute.

    Per axis, ``total = stride·(in - 1) + output_padding + dilation·(k - 1) + 1 - out`` is
    cropped: with ``auto_pad="SAME_UPPER"`` the larger half at the end, otherwise
    (``"SAME_LOWER"``, ``"NOTSET"``) at the start. ``output_padding`` is returned as given.

    Parameters
    ----------
    in_sizes, kernel, output_shape : one int per spatial axis (x's sizes, the kernel, z's)
    stride, dilation, output_padding : one int, or one per spatial axis

    Returns
    -------
    padding : ((before, after), ...) for ``ConvSpec(padding=...)``
    output_padding : tuple of int, one per axis

    Raises
    ------
    HyperparameterError
        An output longer than the transposed convolution's uncropped output (ONNX would pad
        negatively), or lengths that disagree.
    """
    rank = len(in_sizes)
    if auto_pad not in ("NOTSET", "SAME_UPPER", "SAME_LOWER"):
        raise HyperparameterError(
            f"auto_pad {auto_pad!r}: output_shape goes with NOTSET, SAME_UPPER or SAME_LOWER",
            param="auto_pad",
        )
    if len(kernel) != rank or len(output_shape) != rank:
        raise HyperparameterError(
            f"output_shape {tuple(output_shape)} and kernel {tuple(kernel)} need one size per "
            f"spatial axis of x ({rank})",
            param="output_shape",
        )
    steps = [
        _for_rank(name, _ints(name, value, 1 if name != "output_padding" else 0), rank)
        for name, value in (
            ("stride", stride),
            ("dilation", dilation),
            ("output_padding", output_padding),
        )
    ]
    pads = []
    for size, k, out, s, d, op in zip(in_sizes, kernel, output_shape, *steps, strict=True):
        full = transposed_output_size(int(size), int(k), s, d, 0, 0, op)
        total = full - int(out)
        if total < 0 or int(out) < 1:
            raise HyperparameterError(
                f"output_shape {tuple(output_shape)}: along an axis {out} outputs of the "
                f"{full} a transposed convolution of {size} inputs gives before cropping",
                param="output_shape",
            )
        small, large = total // 2, total - total // 2
        pads.append((small, large) if auto_pad == "SAME_UPPER" else (large, small))
    return tuple(pads), tuple(steps[2])


def in_layout(values: tuple, which: str, layout: str) -> tuple:
    """A channels-last shape or index of x-like (``which="x"``: x, z, dx, dz) or w-like
    (``"w"``: w, dw) arrays, in ``layout``: ``(n, *spatial, C)`` -> ``(n, C, *spatial)`` and
    ``(*kernel, Cin, Cout)`` -> ``(Cout, Cin, *kernel)`` for "nchw"; anything else as given."""
    if layout != "nchw" or len(values) < 3:
        return tuple(values)
    if which == "x":
        return (values[0], values[-1], *values[1:-1])
    return (values[-1], values[-2], *values[:-2])


def _is_int(value: object) -> TypeGuard[numbers.Integral]:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _plain(value):
    """NumPy arrays and scalars as Python lists and numbers."""
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        return value.tolist()
    return value


def _ints(name: str, value, minimum: int) -> tuple[int, ...]:
    """An int (for every axis) or a sequence of per-axis ints, as a tuple."""
    value = _plain(value)
    values: tuple[int, ...]
    if _is_int(value):
        values = (int(value),)
    elif (
        isinstance(value, (tuple, list))
        and 1 <= len(value) <= MAX_SPATIAL_DIMS
        and all(_is_int(v) for v in value)
    ):
        values = tuple(int(v) for v in value)
    else:
        raise HyperparameterError(
            f"{name} must be an int or one int per spatial axis, got {value!r}", param=name
        )
    if any(v < minimum for v in values):
        raise HyperparameterError(f"{name} must be >= {minimum}, got {_show(values)}", param=name)
    _check_bound(name, values)
    return values


def _check_bound(name: str, values: tuple) -> None:
    """Refuse values above :data:`MAX_INT` (flat ints or (before, after) pairs)."""
    flat = [v for item in values for v in (item if isinstance(item, tuple) else (item,))]
    if any(v > MAX_INT for v in flat):
        raise HyperparameterError(
            f"{name} must be at most {MAX_INT:,}, got {_show(tuple(values))}", param=name
        )


def _show(values: tuple) -> str:
    return str(values[0]) if len(set(values)) == 1 else str(tuple(values))


def _normalise_padding(padding: PaddingLike) -> Padding:
    """``"same"``, ``"same_lower"``, a tuple of ints (one for all axes, or one per axis), or
    a tuple of (before, after) pairs, one per axis. ``"valid"`` is ``(0,)``."""
    padding = _plain(padding)
    if isinstance(padding, str):
        mode = padding.lower()
        if mode == "valid":
            return (0,)
        if mode in SAME_FORMS:
            return SAME_FORMS[mode]
        raise HyperparameterError(
            f"padding must be 'same', 'same_lower', 'valid' or ints, got {padding!r}",
            param="padding",
        )
    if _is_int(padding):
        values: tuple[int, ...] = (int(padding),)
    elif (
        isinstance(padding, (tuple, list))
        and 1 <= len(padding) <= MAX_SPATIAL_DIMS
        and all(_is_int(v) for v in padding)
    ):
        values = tuple(int(v) for v in padding)
    elif (
        isinstance(padding, (tuple, list))
        and 1 <= len(padding) <= MAX_SPATIAL_DIMS
        and all(isinstance(item, (tuple, list)) and len(item) == 2 for item in padding)
    ):
        if not all(_is_int(v) for item in padding for v in item):
            raise HyperparameterError(_padding_form_message(padding), param="padding")
        pairs = tuple((int(item[0]), int(item[1])) for item in padding)
        if any(v < 0 for pair in pairs for v in pair):
            raise HyperparameterError(f"padding must be >= 0, got {pairs}", param="padding")
        _check_bound("padding", pairs)
        return pairs
    else:
        raise HyperparameterError(_padding_form_message(padding), param="padding")
    if any(v < 0 for v in values):
        raise HyperparameterError(f"padding must be >= 0, got {_show(values)}", param="padding")
    _check_bound("padding", values)
    return values


def _padding_form_message(padding) -> str:
    return (
        "padding must be an int, one int per axis, ((before, after), ...) per axis, "
        f"'same' or 'valid', got {padding!r}"
    )


def _for_rank(name: str, values: tuple, rank: int) -> tuple:
    """One value for every axis, or exactly one per axis."""
    if len(values) == 1:
        return values * rank
    if len(values) == rank:
        return values
    raise HyperparameterError(
        f"{name} has {len(values)} values but x has {rank} spatial "
        f"{'axis' if rank == 1 else 'axes'} {AXIS_NAMES[rank]}",
        param=name,
    )


@dataclass(frozen=True, init=False)
class ConvSpec:
    """Hyperparameters of a convolution with 1 to 3 spatial axes.

    Parameters
    ----------
    stride : int or one int per spatial axis
        Step between outputs. At least 1.
    padding : int, one int per spatial axis, ((before, after), ...), "valid", "same" or "same_lower"
        Padding per axis; for 2-D, ``1``, ``(ph, pw)`` or ``((top, bottom), (left, right))``.
        ``"same"`` (also spelled ``"same_upper"``) gives ``ceil(in / stride)`` outputs per
        axis with any odd extra pixel at the end (TensorFlow ``SAME``, ONNX ``SAME_UPPER``);
        ``"same_lower"`` puts it at the start (ONNX ``SAME_LOWER``). Flat before/after lists
        (``1,2,0,1``) are a file and command-line spelling: :func:`convcli.hparams.spec_from`
        reads them.
    dilation : int or one int per spatial axis
        Spacing between kernel taps, PyTorch convention (1 = no dilation).
    groups : int
        Channel groups; Cin and Cout must both be divisible by it (depthwise: groups == Cin).
    padding_mode : "zeros", "reflect", "replicate" or "circular"
        What the padding holds (PyTorch's names and semantics).
    layout : "nhwc" (channels last) or "nchw" (channels first)
        See the module docstring; ``nlc``, ``ndhwc``, ``ncl``, ``ncdhw`` are aliases.
    transposed : bool
        A transposed convolution (PyTorch's ``ConvTranspose``, ONNX ``ConvTranspose``): the
        gradient with respect to its input of the convolution with these hyperparameters.
        x is ``(n, *spatial, Cin)``, w ``(*kernel, Cout / groups, Cin)`` channels last or
        ``(Cin, Cout / groups, *kernel)`` channels first; the padding crops the output, and
        ``"same"`` gives ``in * stride`` outputs per axis (ONNX's ``auto_pad`` rule). Zero
        padding only.
    output_padding : int or one int per spatial axis
        Positions added at the end of a transposed convolution's output, each smaller than
        the stride or the dilation of its axis; 0 for a convolution.

    Values are validated on construction and resolved per axis when the spec meets tensors
    (:meth:`geometry`), since the rank comes from x.
    """

    # the normalised values (the constructor takes the wider forms the docstring lists)
    stride: tuple[int, ...]
    padding: Padding
    dilation: tuple[int, ...]
    groups: int
    padding_mode: str
    layout: str
    transposed: bool
    output_padding: tuple[int, ...]

    def __init__(
        self,
        stride: int | Sequence[int] = 1,
        padding: PaddingLike = 0,
        dilation: int | Sequence[int] = 1,
        groups: int = 1,
        padding_mode: str = "zeros",
        layout: str = "nhwc",
        transposed: bool = False,
        output_padding: int | Sequence[int] = 0,
    ) -> None:
        setattr_ = object.__setattr__  # frozen: set once, here
        setattr_(self, "stride", _ints("stride", stride, 1))
        setattr_(self, "padding", _normalise_padding(padding))
        setattr_(self, "dilation", _ints("dilation", dilation, 1))
        if not _is_int(groups) or groups < 1:
            raise HyperparameterError(f"groups must be an int >= 1, got {groups!r}", param="groups")
        _check_bound("groups", (int(groups),))
        setattr_(self, "groups", int(groups))
        mode = str(padding_mode).lower()
        if mode not in PADDING_MODES:
            raise HyperparameterError(
                f"padding_mode must be one of {', '.join(PADDING_MODES)}, got {padding_mode!r}",
                param="padding_mode",
            )
        setattr_(self, "padding_mode", mode)
        canonical = LAYOUTS.get(str(layout).lower())
        if canonical is None:
            raise HyperparameterError(
                f"layout must be nhwc (channels last) or nchw (channels first), got {layout!r}",
                param="layout",
            )
        setattr_(self, "layout", canonical)
        transposed = _plain(transposed)
        if not isinstance(transposed, numbers.Integral) or transposed not in (0, 1):
            raise HyperparameterError(
                f"transposed must be True or False, got {transposed!r}", param="transposed"
            )
        setattr_(self, "transposed", bool(transposed))
        setattr_(self, "output_padding", _ints("output_padding", output_padding, 0))
        if not self.transposed and any(self.output_padding):
            raise HyperparameterError(
                f"output_padding={_show(self.output_padding)} applies to transposed "
                "convolutions only (transposed=True)",
                param="output_padding",
            )
        if self.transposed and mode != "zeros":
            raise HyperparameterError(
                f"a transposed convolution pads with zeros only, got padding_mode={mode!r}",
                param="padding_mode",
            )

    @property
    def channels_first(self) -> bool:
        return self.layout == "nchw"

    def per_axis(self, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(stride, dilation) with one value per spatial axis."""
        return _for_rank("stride", self.stride, rank), _for_rank("dilation", self.dilation, rank)

    def explicit_padding(self, rank: int) -> tuple[tuple[int, int], ...] | str:
        """``"same"`` or ``"same_lower"``, or ((before, after), ...) per axis, without input
        sizes."""
        padding = self.padding
        if isinstance(padding, str):
            return padding
        pairs = tuple((p, p) if isinstance(p, int) else p for p in padding)
        if len(pairs) == 1:
            return pairs * rank
        if len(pairs) == rank:
            return pairs
        raise HyperparameterError(
            f"padding has {len(padding)} values but x has {rank} spatial "
            f"{'axis' if rank == 1 else 'axes'} {AXIS_NAMES[rank]}: give 1 or {rank}, or "
            "((before, after), ...) per axis",
            param="padding",
        )

    def resolve_padding(self, in_sizes, kernel) -> tuple[tuple[int, int], ...]:
        """Explicit ((before, after), ...) padding for these input and kernel sizes."""
        rank = len(in_sizes)
        padding = self.explicit_padding(rank)
        if not isinstance(padding, str):
            return padding
        if self.transposed:
            return self._transposed_same(in_sizes, kernel)[0]
        stride, dilation = self.per_axis(rank)
        pairs = []
        for size, k, s, d in zip(in_sizes, kernel, stride, dilation, strict=True):
            out = math.ceil(size / s)
            total = max((out - 1) * s + d * (k - 1) + 1 - size, 0)
            small, large = total // 2, total - total // 2
            pairs.append((large, small) if padding == "same_lower" else (small, large))
        return tuple(pairs)

    def _transposed_same(
        self, in_sizes, kernel
    ) -> tuple[tuple[tuple[int, int], ...], tuple[int, ...]]:
        """``"same"``/``"same_lower"`` for a transposed convolution: the padding and
        output_padding that give ``in * stride`` outputs per axis (ONNX's ``auto_pad`` for
        ConvTranspose: ``SAME_UPPER`` crops the odd pixel at the end, ``SAME_LOWER`` at the
        start).

        The cropping needed is ``total = dilation·(k - 1) + 1 + output_padding - stride``;
        when the kernel is shorter than the stride it is negative, and the missing positions
        (which no input reaches) are added as output_padding instead.
        """
        rank = len(in_sizes)
        stride, dilation = self.per_axis(rank)
        extra = _for_rank("output_padding", self.output_padding, rank)
        lower = self.explicit_padding(rank) == "same_lower"
        pairs, paddings = [], []
        for k, s, d, op in zip(kernel, stride, dilation, extra, strict=True):
            total = d * (k - 1) + 1 + op - s
            small, large = max(total, 0) // 2, max(total, 0) - max(total, 0) // 2
            pairs.append((large, small) if lower else (small, large))
            paddings.append(op if total >= 0 else op - total)
        return tuple(pairs), tuple(paddings)

    def weight_shape(self, kernel, cin: int, cout: int) -> tuple[int, ...]:
        """The shape of w in this spec's layout, for x with ``cin`` and z with ``cout``
        channels: ``(*kernel, Cin/groups, Cout)`` or ``(Cout, Cin/groups, *kernel)``;
        transposed ``(*kernel, Cout/groups, Cin)`` or ``(Cin, Cout/groups, *kernel)``."""
        kernel = tuple(int(k) for k in kernel)
        g = self.groups
        if self.transposed:
            last = (*kernel, max(1, cout // g), cin)
        else:
            last = (*kernel, max(1, cin // g), cout)
        return in_layout(last, "w", self.layout)

    def to_channels_last(self, x_shape, w_shape) -> tuple[tuple, tuple]:
        """Shapes of x and w in the engine's channels-last order."""
        x_shape, w_shape = tuple(int(v) for v in x_shape), tuple(int(v) for v in w_shape)
        if not self.channels_first:
            return x_shape, w_shape
        if len(x_shape) < 3 or len(w_shape) < 3:
            return x_shape, w_shape  # the rank check below reports it
        return (
            (x_shape[0], *x_shape[2:], x_shape[1]),
            (*w_shape[2:], w_shape[1], w_shape[0]),
        )

    def geometry(self, x_shape, w_shape) -> Geometry:
        """Check that x and w fit this spec (in its layout) and resolve every size.

        Raises
        ------
        ShapeError
            If the ranks or channel counts do not match.
        HyperparameterError
            If a per-axis value has the wrong length, groups does not divide the channels,
            a padding mode cannot pad that much, or the kernel is larger than the padded input.
        """
        x_shape, w_shape = self.to_channels_last(x_shape, w_shape)
        rank = len(x_shape) - 2
        x_form = "(n, Cin, *spatial)" if self.channels_first else "(n, *spatial, Cin)"
        w_form = (
            "(Cout, Cin/groups, *kernel)" if self.channels_first else "(*kernel, Cin/groups, Cout)"
        )
        if self.transposed:
            w_form = (
                "(Cin, Cout/groups, *kernel)"
                if self.channels_first
                else "(*kernel, Cout/groups, Cin)"
            )
        if not 1 <= rank <= MAX_SPATIAL_DIMS:
            raise ShapeError(
                f"x must be {x_form} with 1 to {MAX_SPATIAL_DIMS} spatial axes, "
                f"got {len(x_shape)}-D shape {self._user(x_shape, 'x')}"
            )
        if len(w_shape) != rank + 2:
            raise ShapeError(
                f"w must be {w_form} with {rank} kernel axes like x, got shape "
                f"{self._user(w_shape, 'w')}"
            )
        if 0 in x_shape:
            raise ShapeError(f"x has an empty dimension: shape {self._user(x_shape, 'x')}")
        n, *in_sizes, cin = x_shape
        if self.transposed:
            return self._transposed_geometry(x_shape, w_shape)
        *kernel, cin_per_group, cout = w_shape
        g = self.groups
        if cin % g or cout % g:
            raise HyperparameterError(
                f"groups={g} must divide both Cin={cin} and Cout={cout}", param="groups"
            )
        if cin_per_group * g != cin:
            raise ShapeError(
                f"Cin of x is {cin} but w {self._user(w_shape, 'w')} expects Cin/groups = "
                f"{cin_per_group} (groups={g}, so Cin = {cin_per_group * g})"
            )
        if min(kernel) < 1 or cout < 1:
            raise ShapeError(f"w has an empty dimension: shape {self._user(w_shape, 'w')}")
        stride, dilation = self.per_axis(rank)
        pads = self.resolve_padding(in_sizes, kernel)
        names = AXIS_NAMES[rank]
        out_sizes = []
        for axis, size, k, s, d, (lo, hi) in zip(
            names, in_sizes, kernel, stride, dilation, pads, strict=True
        ):
            self._check_mode_fits(axis, size, lo, hi)
            span = d * (k - 1) + 1
            if span > size + lo + hi:
                raise HyperparameterError(
                    f"kernel along {axis} spans {span} (k={k}, dilation={d}) but the padded input"
                    f" is only {size + lo + hi} ({size} + pad {lo}+{hi})"
                )
            out_sizes.append(output_size(size, k, s, d, lo, hi))
        return Geometry(
            n=n,
            in_sizes=tuple(in_sizes),
            cin=cin,
            kernel=tuple(kernel),
            cout=cout,
            groups=g,
            stride=stride,
            dilation=dilation,
            pads=pads,
            out_sizes=tuple(out_sizes),
            padding_mode=self.padding_mode,
            layout=self.layout,
        )

    def _transposed_geometry(self, x_shape: tuple, w_shape: tuple) -> Geometry:
        """:meth:`geometry` of a transposed convolution (shapes channels last, ranks checked)."""
        n, *in_sizes, cin = x_shape
        *kernel, cout_per_group, w_cin = w_shape
        g = self.groups
        if cin % g:
            raise HyperparameterError(f"groups={g} must divide Cin={cin}", param="groups")
        if w_cin != cin:
            raise ShapeError(
                f"Cin of x is {cin} but w {self._user(w_shape, 'w')} of a transposed "
                f"convolution expects Cin = {w_cin} (w is (Cin, Cout/groups, *kernel) channels "
                "first, (*kernel, Cout/groups, Cin) channels last)"
            )
        if min(kernel) < 1 or cout_per_group < 1:
            raise ShapeError(f"w has an empty dimension: shape {self._user(w_shape, 'w')}")
        rank = len(in_sizes)
        stride, dilation = self.per_axis(rank)
        extra = _for_rank("output_padding", self.output_padding, rank)
        if isinstance(self.explicit_padding(rank), str):
            pads, extra = self._transposed_same(in_sizes, kernel)
        else:
            pads = self.resolve_padding(in_sizes, kernel)
        out_sizes = []
        for axis, size, k, s, d, (lo, hi), op in zip(
            AXIS_NAMES[rank], in_sizes, kernel, stride, dilation, pads, extra, strict=True
        ):
            if op >= s and op >= d:
                raise HyperparameterError(
                    f"output_padding along {axis} must be smaller than the stride ({s}) or the "
                    f"dilation ({d}), got {op}",
                    param="output_padding",
                )
            out = transposed_output_size(size, k, s, d, lo, hi, op)
            if out < 1:
                raise HyperparameterError(
                    f"padding {lo}+{hi} along {axis} crops the whole output of the transposed "
                    f"convolution ({out + lo + hi} positions before cropping)"
                )
            out_sizes.append(out)
        return Geometry(
            n=n,
            in_sizes=tuple(in_sizes),
            cin=cin,
            kernel=tuple(kernel),
            cout=cout_per_group * g,
            groups=g,
            stride=stride,
            dilation=dilation,
            pads=pads,
            out_sizes=tuple(out_sizes),
            padding_mode=self.padding_mode,
            layout=self.layout,
            transposed=True,
            output_padding=tuple(extra),
        )

    def _check_mode_fits(self, axis: str, size: int, lo: int, hi: int) -> None:
        """PyTorch's limits: reflect needs pad < size, circular pad <= size."""
        if self.padding_mode == "reflect" and max(lo, hi) >= size:
            raise HyperparameterError(
                f"reflect padding along {axis} must be smaller than the input ({size}), "
                f"got {max(lo, hi)}"
            )
        if self.padding_mode == "circular" and max(lo, hi) > size:
            raise HyperparameterError(
                f"circular padding along {axis} can be at most the input size ({size}), "
                f"got {max(lo, hi)}"
            )

    def _user(self, shape_cl: tuple, which: str) -> tuple:
        """A channels-last shape shown in this spec's layout."""
        return in_layout(shape_cl, which, self.layout)


@dataclass(frozen=True)
class Geometry:
    """Everything about one convolution's shapes, resolved and checked (channels last).

    The fields and :attr:`out_shape` are the engine's channels-last view; the shapes in the
    caller's layout come from :meth:`user_shapes`. For a transposed convolution
    (``transposed``) w is ``(*kernel, Cout/groups, Cin)`` and ``output_padding`` holds one
    value per axis; :meth:`adjoint` is the convolution it is the input gradient of.
    """

    n: int
    in_sizes: tuple[int, ...]
    cin: int
    kernel: tuple[int, ...]
    cout: int
    groups: int
    stride: tuple[int, ...]
    dilation: tuple[int, ...]
    pads: tuple[tuple[int, int], ...]
    out_sizes: tuple[int, ...]
    padding_mode: str = "zeros"
    layout: str = "nhwc"
    transposed: bool = False
    output_padding: tuple[int, ...] = ()

    @property
    def rank(self) -> int:
        return len(self.in_sizes)

    @property
    def out_shape(self) -> tuple[int, ...]:
        """Shape of z channels last: (n, *out, Cout)."""
        return (self.n, *self.out_sizes, self.cout)

    @property
    def user_out_shape(self) -> tuple[int, ...]:
        """Shape of z in the caller's layout."""
        return self.user_shapes()["z"]

    def user_shapes(self) -> dict[str, tuple[int, ...]]:
        """Shapes of x, w and z as the caller gives and gets them (the spec's layout).

        ``out_shape`` and the engine's arrays are channels last; anything shown to the user,
        written for them, or checked against their data (dz, slices, files) uses these.
        Gradients have the shape of their tensor: dx of x, dw of w, dz of z.
        """
        w_last = self.w_shape
        if self.layout == "nchw":
            return {
                "x": (self.n, self.cin, *self.in_sizes),
                "w": (w_last[-1], w_last[-2], *self.kernel),
                "z": (self.n, self.cout, *self.out_sizes),
            }
        return {
            "x": (self.n, *self.in_sizes, self.cin),
            "w": w_last,
            "z": self.out_shape,
        }

    @property
    def w_shape(self) -> tuple[int, ...]:
        """Shape of w channels last: (*kernel, Cin/groups, Cout), or (*kernel, Cout/groups,
        Cin) when transposed."""
        if self.transposed:
            return (*self.kernel, self.cout // self.groups, self.cin)
        return (*self.kernel, self.cin // self.groups, self.cout)

    def adjoint(self) -> Geometry:
        """The convolution whose input gradient this transposed convolution is.

        It maps ``(n, *out_sizes, Cout)`` to ``(n, *in_sizes', Cin)`` with the same w
        (``(*kernel, Cout/groups, Cin)`` is its ``(*kernel, Cin'/groups, Cout')``), stride,
        padding, dilation and groups, where ``in_sizes'`` is ``in_sizes`` plus the positions
        an output_padding at least the stride adds (it is ``in_sizes`` when output_padding <
        stride): those see no input of the transposed convolution.
        """
        if not self.transposed:
            raise ValueError("adjoint() is the geometry of a transposed convolution's adjoint")
        out_sizes = tuple(
            output_size(size, k, s, d, lo, hi)
            for size, k, s, d, (lo, hi) in zip(
                self.out_sizes, self.kernel, self.stride, self.dilation, self.pads, strict=True
            )
        )
        return Geometry(
            n=self.n,
            in_sizes=self.out_sizes,
            cin=self.cout,
            kernel=self.kernel,
            cout=self.cin,
            groups=self.groups,
            stride=self.stride,
            dilation=self.dilation,
            pads=self.pads,
            out_sizes=out_sizes,
            padding_mode=self.padding_mode,
            layout="nhwc",
        )

    def hparams(self) -> dict:
        """Resolved hyperparameters as plain JSON-ready values."""
        return {
            "stride": list(self.stride),
            "padding": [list(p) for p in self.pads],
            "dilation": list(self.dilation),
            "groups": self.groups,
            "padding_mode": self.padding_mode,
            "layout": self.layout,
            **(
                {"transposed": 1, "output_padding": list(self.output_padding)}
                if self.transposed
                else {}
            ),
        }


def padding_source(positions, size: int, mode: str):
    """Input index each (possibly padded) position reads, along one axis.

    ``positions`` are input coordinates, negative or ``>= size`` inside the padding.
    zeros: -1 there (the value is 0); reflect: mirrored without repeating the edge;
    replicate: the nearest edge; circular: wrapped around — PyTorch's padding modes.
    """
    import numpy as np

    positions = np.asarray(positions)
    if mode == "zeros":
        return np.where((positions >= 0) & (positions < size), positions, -1)
    if mode == "replicate":
        return np.clip(positions, 0, size - 1)
    if mode == "circular":
        return np.mod(positions, size)
    if size == 1:
        return np.zeros_like(positions)
    period = 2 * (size - 1)
    folded = np.mod(positions, period)
    return np.where(folded < size, folded, period - folded)
