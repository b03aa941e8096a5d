"""Hypothesis strategies for convolution configurations (small, finite, always valid)."""

import numpy as np
from hypothesis import assume
from hypothesis import strategies as st

from convcli import ConvSpec
from convcli.errors import HyperparameterError

small = st.integers(1, 3)


@st.composite
def paddings(draw):
    kind = draw(st.sampled_from(["int", "pair", "asymmetric", "same", "same_lower", "valid"]))
    if kind == "int":
        return draw(st.integers(0, 2))
    if kind == "pair":
        return (draw(st.integers(0, 2)), draw(st.integers(0, 2)))
    if kind == "asymmetric":
        return tuple((draw(st.integers(0, 2)), draw(st.integers(0, 2))) for _ in range(2))
    return kind


@st.composite
def conv_cases(draw, dtypes=(np.float64, np.float32), max_size=7):
    """(x, w, b, spec): x (n,H,W,Cin), w (kh,kw,Cin/g,Cout), b (Cout,), (1,1,1,Cout) or None."""
    groups = draw(st.integers(1, 3))
    cin = groups * draw(small)
    cout = groups * draw(small)
    n = draw(st.integers(1, 3))
    h, w_ = draw(st.integers(1, max_size)), draw(st.integers(1, max_size))
    kh, kw = draw(small), draw(small)
    spec = ConvSpec(
        stride=(draw(small), draw(small)),
        padding=draw(paddings()),
        dilation=(draw(st.integers(1, 2)), draw(st.integers(1, 2))),
        groups=groups,
    )
    try:
        spec.geometry((n, h, w_, cin), (kh, kw, cin // groups, cout))
    except HyperparameterError:
        assume(False)
    dtype = draw(st.sampled_from(dtypes))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    x = rng.standard_normal((n, h, w_, cin)).astype(dtype)
    w = rng.standard_normal((kh, kw, cin // groups, cout)).astype(dtype)
    bias_form = draw(st.sampled_from(["none", "flat", "4d"]))
    b = None if bias_form == "none" else rng.standard_normal(cout).astype(dtype)
    if bias_form == "4d":
        b = b.reshape(1, 1, 1, cout)
    return x, w, b, spec


@st.composite
def nd_conv_cases(draw, dtypes=(np.float64, np.float32), ranks=(1, 2, 3)):
    """(x, w, b, spec) of any rank, layout and padding mode; arrays in the spec's layout."""
    rank = draw(st.sampled_from(ranks))
    max_size = {1: 9, 2: 6, 3: 4}[rank]
    groups = draw(st.integers(1, 2))
    cin, cout = groups * draw(st.integers(1, 2)), groups * draw(st.integers(1, 2))
    n = draw(st.integers(1, 2))
    sizes = [draw(st.integers(1, max_size)) for _ in range(rank)]
    kernel = [draw(st.integers(1, 3)) for _ in range(rank)]
    mode = draw(st.sampled_from(["zeros", "reflect", "replicate", "circular"]))
    layout = draw(st.sampled_from(["nhwc", "nchw"]))
    padding = draw(
        st.one_of(
            st.integers(0, 2),
            st.lists(st.integers(0, 2), min_size=rank, max_size=rank).map(tuple),
            st.lists(
                st.tuples(st.integers(0, 2), st.integers(0, 2)), min_size=rank, max_size=rank
            ).map(tuple),
            st.sampled_from(["same", "same_lower", "valid"]),
        )
    )
    spec = ConvSpec(
        stride=tuple(draw(st.integers(1, 2)) for _ in range(rank)),
        padding=padding,
        dilation=tuple(draw(st.integers(1, 2)) for _ in range(rank)),
        groups=groups,
        padding_mode=mode,
        layout=layout,
    )
    w_last = (*kernel, cin // groups, cout)
    return _arrays(draw, spec, (n, *sizes, cin), w_last, cout, dtypes)


@st.composite
def transposed_cases(draw, dtypes=(np.float64, np.float32), ranks=(1, 2, 3)):
    """(x, w, b, spec) of a transposed convolution of any rank and layout; arrays in the
    spec's layout (w ``(*kernel, Cout/g, Cin)`` channels last, ``(Cin, Cout/g, *kernel)``
    channels first)."""
    rank = draw(st.sampled_from(ranks))
    max_size = {1: 6, 2: 4, 3: 3}[rank]
    groups = draw(st.integers(1, 2))
    cin, cout = groups * draw(st.integers(1, 2)), groups * draw(st.integers(1, 2))
    n = draw(st.integers(1, 2))
    sizes = [draw(st.integers(1, max_size)) for _ in range(rank)]
    kernel = [draw(st.integers(1, 3)) for _ in range(rank)]
    stride = tuple(draw(st.integers(1, 3)) for _ in range(rank))
    dilation = tuple(draw(st.integers(1, 2)) for _ in range(rank))
    output_padding = tuple(
        draw(st.integers(0, max(s, d) - 1)) for s, d in zip(stride, dilation, strict=True)
    )
    layout = draw(st.sampled_from(["nhwc", "nchw"]))
    padding = draw(axis_paddings(rank, ["same", "same_lower"]))
    spec = ConvSpec(
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=groups,
        layout=layout,
        transposed=True,
        output_padding=output_padding,
    )
    w_last = (*kernel, cout // groups, cin)
    return _arrays(draw, spec, (n, *sizes, cin), w_last, cout, dtypes)


def axis_paddings(rank, words):
    """A padding of ``rank`` axes: one int, a (before, after) pair per axis, or one of
    ``words``."""
    pairs = st.tuples(st.integers(0, 2), st.integers(0, 2))
    return st.one_of(
        st.integers(0, 2),
        st.lists(pairs, min_size=rank, max_size=rank).map(tuple),
        st.sampled_from(words),
    )


def _arrays(draw, spec, x_last, w_last, cout, dtypes):
    """Random x, w, b for ``spec`` from channels-last shapes (moved to ``spec.layout``);
    configurations the spec refuses are rejected."""
    x_shape, w_shape = x_last, w_last
    if spec.layout == "nchw":
        x_shape = (x_last[0], x_last[-1], *x_last[1:-1])
        w_shape = (w_last[-1], w_last[-2], *w_last[:-2])
    try:
        spec.geometry(x_shape, w_shape)
    except HyperparameterError:
        assume(False)
    dtype = draw(st.sampled_from(dtypes))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    x = rng.standard_normal(x_shape).astype(dtype)
    w = rng.standard_normal(w_shape).astype(dtype)
    b = rng.standard_normal(cout).astype(dtype) if draw(st.booleans()) else None
    return x, w, b, spec


@st.composite
def depthwise_cases(draw, dtypes=(np.float64, np.float32), ranks=(1, 2, 3)):
    """(x, w, b, spec) of a depthwise layer (groups = Cin > 1, channel multiplier 1 to 3) of
    any rank, stride, dilation, padding mode and layout; arrays in the spec's layout."""
    rank = draw(st.sampled_from(ranks))
    max_size = {1: 12, 2: 7, 3: 4}[rank]
    groups = draw(st.integers(2, 4))
    multiplier = draw(st.sampled_from([1, 1, 2, 3]))
    n = draw(st.integers(1, 2))
    sizes = [draw(st.integers(1, max_size)) for _ in range(rank)]
    kernel = [draw(st.integers(1, 3)) for _ in range(rank)]
    padding = draw(axis_paddings(rank, ["same", "valid"]))
    stride = st.sampled_from([1, 1, 2])  # stride 1 with zero padding: dx as a correlation
    spec = ConvSpec(
        stride=tuple(draw(stride) for _ in range(rank)),
        padding=padding,
        dilation=tuple(draw(st.integers(1, 2)) for _ in range(rank)),
        groups=groups,
        padding_mode=draw(st.sampled_from(["zeros"] * 3 + ["reflect", "replicate", "circular"])),
        layout=draw(st.sampled_from(["nhwc", "nchw"])),
    )
    cout = groups * multiplier
    return _arrays(draw, spec, (n, *sizes, groups), (*kernel, 1, cout), cout, dtypes)
