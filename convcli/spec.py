"""Convolution hyperparameters (:class:`ConvSpec`) and the geometry they give a pair of tensors.

Layout: activations NHWC ``(n, H, W, C)``, weights HWIO ``(kh, kw, Cin / groups, Cout)``.

The output size along each spatial axis is computed in exactly one place,
:func:`output_size`::

    Ho = floor((H + top + bottom - dilation_h * (kh - 1) - 1) / stride_h) + 1

and likewise ``Wo`` with ``left``, ``right``, ``dilation_w``, ``kw`` and ``stride_w``.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

from convcli.errors import HyperparameterError, ShapeError

SPATIAL_DIMS = 2
AXIS_NAMES = ("h", "w")

PaddingLike = int | str | tuple | list


def output_size(size: int, kernel: int, stride: int, dilation: int, before: int, after: int) -> int:
    """Output length along one spatial axis (the one place this formula lives)."""
    return (size + before + after - dilation * (kernel - 1) - 1) // stride + 1


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _plain(value):
    """NumPy arrays and scalars as Python lists and numbers."""
    return (
        value.tolist()
        if hasattr(value, "tolist") and not isinstance(value, (str, bytes))
        else value
    )


def _per_axis(name: str, value, minimum: int) -> tuple[int, ...]:
    """Normalise an int or a per-axis sequence of ints to a tuple of SPATIAL_DIMS ints."""
    value = _plain(value)
    if _is_int(value):
        values = (int(value),) * SPATIAL_DIMS
    elif (
        isinstance(value, (tuple, list))
        and len(value) == SPATIAL_DIMS
        and all(_is_int(v) for v in value)
    ):
        values = tuple(int(v) for v in value)
    else:
        raise HyperparameterError(
            f"{name} must be an int or {SPATIAL_DIMS} ints (h, w), got {value!r}"
        )
    if any(v < minimum for v in values):
        raise HyperparameterError(f"{name} must be >= {minimum}, got {_show(values)}")
    return values


def _show(values: tuple) -> str:
    return str(values[0]) if len(set(values)) == 1 else str(tuple(values))


def _normalise_padding(padding: PaddingLike):
    """Return "same", or a tuple of (before, after) pairs, one per spatial axis."""
    padding = _plain(padding)
    if isinstance(padding, str):
        mode = padding.lower()
        if mode == "valid":
            return ((0, 0),) * SPATIAL_DIMS
        if mode == "same":
            return "same"
        raise HyperparameterError(f"padding must be 'same', 'valid' or ints, got {padding!r}")
    if _is_int(padding):
        pairs = ((int(padding), int(padding)),) * SPATIAL_DIMS
    elif isinstance(padding, (tuple, list)) and len(padding) == SPATIAL_DIMS:
        pairs = []
        for item in padding:
            if _is_int(item):
                pairs.append((int(item), int(item)))
            elif (
                isinstance(item, (tuple, list)) and len(item) == 2 and all(_is_int(v) for v in item)
            ):
                pairs.append((int(item[0]), int(item[1])))
            else:
                raise HyperparameterError(_padding_form_message(padding))
        pairs = tuple(pairs)
    else:
        raise HyperparameterError(_padding_form_message(padding))
    if any(v < 0 for pair in pairs for v in pair):
        raise HyperparameterError(f"padding must be >= 0, got {pairs}")
    return pairs


def _padding_form_message(padding) -> str:
    return (
        "padding must be an int, (ph, pw), ((top, bottom), (left, right)), 'same' or 'valid', "
        f"got {padding!r}"
    )


@dataclass(frozen=True)
class ConvSpec:
    """Hyperparameters of a 2-D convolution.

    Parameters
    ----------
    stride : int or (int, int)
        Step between output pixels, per axis (h, w). At least 1.
    padding : int, (ph, pw), ((top, bottom), (left, right)), "valid" or "same"
        Zero padding. ``"same"`` gives ``ceil(in / stride)`` outputs per axis with any odd
        extra pixel at the bottom/right (TensorFlow ``SAME``, ONNX ``SAME_UPPER``).
    dilation : int or (int, int)
        Spacing between kernel taps, PyTorch convention (1 = no dilation).
    groups : int
        Channel groups; Cin and Cout must both be divisible by it (depthwise: groups == Cin).

    Values are normalised on construction: ``stride`` and ``dilation`` become tuples of two
    ints, ``padding`` becomes ``"same"`` or ``((top, bottom), (left, right))``.
    """

    stride: tuple = 1
    padding: PaddingLike = 0
    dilation: tuple = 1
    groups: int = 1

    def __post_init__(self):
        object.__setattr__(self, "stride", _per_axis("stride", self.stride, 1))
        object.__setattr__(self, "dilation", _per_axis("dilation", self.dilation, 1))
        object.__setattr__(self, "padding", _normalise_padding(self.padding))
        if not _is_int(self.groups) or self.groups < 1:
            raise HyperparameterError(f"groups must be an int >= 1, got {self.groups!r}")
        object.__setattr__(self, "groups", int(self.groups))

    def resolve_padding(self, in_sizes, kernel) -> tuple[tuple[int, int], ...]:
        """Explicit ``((top, bottom), (left, right))`` padding for these input and kernel sizes."""
        if self.padding != "same":
            return self.padding
        pairs = []
        for size, k, s, d in zip(in_sizes, kernel, self.stride, self.dilation, strict=True):
            out = math.ceil(size / s)
            total = max((out - 1) * s + d * (k - 1) + 1 - size, 0)
            pairs.append((total // 2, total - total // 2))
        return tuple(pairs)

    def geometry(self, x_shape, w_shape) -> Geometry:
        """Check that x (n, H, W, Cin) and w (kh, kw, Cin/groups, Cout) fit this spec.

        Raises
        ------
        ShapeError
            If the ranks or channel counts do not match.
        HyperparameterError
            If groups does not divide the channels or the kernel is larger than the padded input.
        """
        if len(x_shape) != SPATIAL_DIMS + 2:
            raise ShapeError(f"x must be 4-D (n, H, W, Cin), got shape {tuple(x_shape)}")
        if len(w_shape) != SPATIAL_DIMS + 2:
            raise ShapeError(
                f"w must be 4-D (kh, kw, Cin/groups, Cout), got shape {tuple(w_shape)}"
            )
        if 0 in tuple(x_shape):
            raise ShapeError(f"x has an empty dimension: shape {tuple(x_shape)}")
        n, *in_sizes, cin = (int(v) for v in x_shape)
        *kernel, cin_per_group, cout = (int(v) for v in w_shape)
        g = self.groups
        if cin % g or cout % g:
            raise HyperparameterError(f"groups={g} must divide both Cin={cin} and Cout={cout}")
        if cin_per_group * g != cin:
            raise ShapeError(
                f"Cin of x is {cin} but w {tuple(w_shape)} expects Cin/groups = {cin_per_group}"
                f" (groups={g}, so Cin = {cin_per_group * g})"
            )
        if min(kernel) < 1 or cout < 1:
            raise ShapeError(f"w has an empty dimension: shape {tuple(w_shape)}")
        pads = self.resolve_padding(in_sizes, kernel)
        out_sizes = []
        for axis, size, k, s, d, (lo, hi) in zip(
            AXIS_NAMES, in_sizes, kernel, self.stride, self.dilation, pads, strict=True
        ):
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
            stride=self.stride,
            dilation=self.dilation,
            pads=pads,
            out_sizes=tuple(out_sizes),
        )


@dataclass(frozen=True)
class Geometry:
    """Everything about one convolution's shapes, resolved and checked."""

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

    @property
    def out_shape(self) -> tuple[int, ...]:
        """Shape of z: (n, Ho, Wo, Cout)."""
        return (self.n, *self.out_sizes, self.cout)

    def hparams(self) -> dict:
        """Resolved hyperparameters as plain JSON-ready values."""
        return {
            "stride": list(self.stride),
            "padding": [list(p) for p in self.pads],
            "dilation": list(self.dilation),
            "groups": self.groups,
        }
