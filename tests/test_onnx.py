"""Convolution and transposed convolution against ONNX's own ``Conv`` and ``ConvTranspose``
(``onnx.reference``), on the attribute sets of ONNX's node tests: defaults, pads (symmetric
and not), strides, output_padding, dilations, groups, ``auto_pad`` SAME_UPPER, SAME_LOWER and
VALID, 1-D and 3-D. ONNX's layout is channels first: X ``(n, Cin, *spatial)``, W ``(Cout,
Cin/group, *kernel)`` (ConvTranspose ``(Cin, Cout/group, *kernel)``) — the library's ``nchw``."""

import numpy as np
import pytest

from convcli import ConvSpec, conv_forward

onnx = pytest.importorskip("onnx", reason="onnx is a test dependency (pip install -e '.[test]')")
from onnx import TensorProto, helper  # noqa: E402
from onnx.reference import ReferenceEvaluator  # noqa: E402


def onnx_conv_transpose(x, w, b, **attributes):
    """Y of one ConvTranspose node run by ONNX's reference evaluator (float64)."""
    inputs = ["X", "W"] if b is None else ["X", "W", "B"]
    node = helper.make_node("ConvTranspose", inputs, ["Y"], **attributes)
    graph = helper.make_graph(
        [node],
        "conv_transpose",
        [helper.make_tensor_value_info(name, TensorProto.DOUBLE, None) for name in inputs],
        [helper.make_tensor_value_info("Y", TensorProto.DOUBLE, None)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    feeds = dict(zip(inputs, (x, w, b), strict=False))
    return ReferenceEvaluator(model).run(None, feeds)[0]


def _pairs(pads, rank):
    """ONNX's pads ``[begin_1, ..., begin_r, end_1, ..., end_r]`` as ((before, after), ...)."""
    return tuple((pads[i], pads[i + rank]) for i in range(rank))


# name -> (x shape, w shape, bias?, ONNX attributes, the same layer's ConvSpec arguments)
CASES = {
    "default": ((1, 1, 3, 3), (1, 2, 3, 3), True, {}, dict()),
    "1d": ((1, 1, 5), (1, 2, 3), False, {}, dict()),
    "3d": ((1, 1, 3, 4, 5), (1, 2, 3, 3, 3), False, {}, dict()),
    "strides-pads": (
        (1, 1, 3, 3),
        (1, 2, 3, 3),
        False,
        {"strides": [3, 2], "pads": [1, 2, 1, 2]},
        dict(stride=(3, 2), padding=_pairs([1, 2, 1, 2], 2)),
    ),
    "asymmetric-pads": (
        (1, 2, 4, 3),
        (2, 3, 3, 2),
        True,
        {"strides": [2, 1], "pads": [0, 1, 2, 0]},
        dict(stride=(2, 1), padding=_pairs([0, 1, 2, 0], 2)),
    ),
    "output-padding": (
        (1, 1, 3, 3),
        (1, 2, 3, 3),
        False,
        {"strides": [3, 2], "output_padding": [1, 1]},
        dict(stride=(3, 2), output_padding=1),
    ),
    "dilations": (
        (1, 1, 3, 3),
        (1, 1, 2, 2),
        False,
        {"dilations": [2, 2]},
        dict(dilation=2),
    ),
    "dilation-output-padding": (
        (1, 2, 4),
        (2, 1, 3),
        False,
        {"dilations": [3], "strides": [2], "output_padding": [1], "pads": [1, 0]},
        dict(dilation=3, stride=2, output_padding=1, padding=((1, 0),)),
    ),
    # onnx.reference's grouped ConvTranspose is right when every group has one input and one
    # output channel (and its col2im wants output_padding < stride): groups == Cin == Cout
    "group": ((1, 4, 3, 3), (4, 1, 3, 3), False, {"group": 4}, dict(groups=4)),
    "group-strided": (
        (2, 3, 3, 2),
        (3, 1, 2, 3),
        False,
        {"group": 3, "strides": [2, 3], "pads": [1, 0, 0, 1]},
        dict(groups=3, stride=(2, 3), padding=_pairs([1, 0, 0, 1], 2)),
    ),
    "autopad-same-upper": (
        (1, 1, 3, 3),
        (1, 2, 3, 3),
        False,
        {"strides": [2, 2], "auto_pad": "SAME_UPPER"},
        dict(stride=2, padding="same"),
    ),
    "autopad-same-lower": (
        (1, 2, 3, 4),
        (2, 2, 4, 3),
        True,
        {"strides": [2, 3], "auto_pad": "SAME_LOWER"},
        dict(stride=(2, 3), padding="same_lower"),
    ),
    "autopad-same-upper-odd": (
        (1, 2, 4),
        (2, 1, 4),
        False,
        {"strides": [3], "auto_pad": "SAME_UPPER", "output_padding": [1]},
        dict(stride=3, padding="same", output_padding=1),
    ),
}


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_matches_onnx_conv_transpose(name, layout):
    x_shape, w_shape, with_bias, attributes, hparams = CASES[name]
    rng = np.random.default_rng(sorted(CASES).index(name))
    x, w = rng.standard_normal(x_shape), rng.standard_normal(w_shape)
    b = rng.standard_normal(w_shape[1] * attributes.get("group", 1)) if with_bias else None
    expected = onnx_conv_transpose(x, w, b, **attributes)
    spec = ConvSpec(**hparams, transposed=True, layout=layout)
    if layout == "nhwc":  # the same data channels last: x (n, *spatial, Cin), w (*k, Cout/g, Cin)
        x, w = np.moveaxis(x, 1, -1), np.moveaxis(w, (0, 1), (-1, -2))
        expected = np.moveaxis(expected, 1, -1)
    z, _ = conv_forward(x, w, b, spec)
    assert z.shape == expected.shape
    np.testing.assert_allclose(z, expected, rtol=1e-12, atol=1e-12)


# -- Conv -----------------------------------------------------------------------------------------


def onnx_node(op, x, w, b, **attributes):
    """Y of one ``op`` node (Conv, ConvTranspose) run by ONNX's reference evaluator."""
    inputs = ["X", "W"] if b is None else ["X", "W", "B"]
    node = helper.make_node(op, inputs, ["Y"], **attributes)
    graph = helper.make_graph(
        [node],
        op.lower(),
        [helper.make_tensor_value_info(name, TensorProto.DOUBLE, None) for name in inputs],
        [helper.make_tensor_value_info("Y", TensorProto.DOUBLE, None)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    feeds = dict(zip(inputs, (x, w, b), strict=False))
    return ReferenceEvaluator(model).run(None, feeds)[0]


# name -> (x shape, w shape (Cout, Cin/group, *kernel), bias?, ONNX attributes, ConvSpec args)
CONV_CASES = {
    "basic": ((1, 1, 5, 5), (1, 1, 3, 3), False, {}, dict()),
    "pads": ((1, 1, 5, 5), (1, 1, 3, 3), True, {"pads": [1, 1, 1, 1]}, dict(padding=1)),
    "strides-pads": (
        (1, 1, 7, 5),
        (1, 1, 3, 3),
        False,
        {"strides": [2, 2], "pads": [1, 1, 1, 1]},
        dict(stride=2, padding=1),
    ),
    "strides-asymmetric-pads": (
        (1, 1, 7, 5),
        (1, 1, 3, 3),
        False,
        {"strides": [2, 2], "pads": [1, 0, 1, 0]},
        dict(stride=2, padding=_pairs([1, 0, 1, 0], 2)),
    ),
    "dilations": (
        (1, 2, 7, 6),
        (3, 2, 2, 3),
        True,
        {"dilations": [2, 1], "strides": [1, 2]},
        dict(dilation=(2, 1), stride=(1, 2)),
    ),
    "group": ((1, 4, 5, 5), (6, 2, 3, 3), True, {"group": 2}, dict(groups=2)),
    "depthwise": (
        (2, 3, 4, 4),
        (3, 1, 3, 3),
        False,
        {"group": 3, "pads": [1, 1, 1, 1]},
        dict(groups=3, padding=1),
    ),
    "autopad-same-upper": (
        (1, 1, 5, 4),
        (1, 1, 2, 3),
        False,
        {"auto_pad": "SAME_UPPER"},
        dict(padding="same"),
    ),
    "autopad-same-lower": (
        (1, 1, 5, 4),
        (1, 1, 2, 2),
        False,
        {"auto_pad": "SAME_LOWER"},
        dict(padding="same_lower"),
    ),
    "autopad-same-upper-strided": (
        (1, 1, 7, 6),
        (1, 1, 3, 2),
        False,
        {"auto_pad": "SAME_UPPER", "strides": [2, 2]},
        dict(padding="same", stride=2),
    ),
    "autopad-same-lower-strided": (
        (1, 2, 6, 7),
        (2, 2, 4, 2),
        True,
        {"auto_pad": "SAME_LOWER", "strides": [3, 2]},
        dict(padding="same_lower", stride=(3, 2)),
    ),
    "autopad-valid": ((1, 1, 5, 5), (1, 1, 3, 3), False, {"auto_pad": "VALID"}, dict(padding=0)),
    "1d": (
        (2, 2, 9),
        (3, 2, 4),
        True,
        {"strides": [2], "pads": [2, 1]},
        dict(stride=2, padding=((2, 1),)),
    ),
    "3d": (
        (1, 2, 4, 5, 3),
        (2, 1, 2, 3, 2),
        False,
        {"group": 2, "dilations": [1, 2, 1], "pads": [1, 0, 1, 0, 2, 1]},
        dict(groups=2, dilation=(1, 2, 1), padding=_pairs([1, 0, 1, 0, 2, 1], 3)),
    ),
}


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("name", sorted(CONV_CASES))
def test_matches_onnx_conv(name, layout):
    x_shape, w_shape, with_bias, attributes, hparams = CONV_CASES[name]
    rng = np.random.default_rng(100 + sorted(CONV_CASES).index(name))
    x, w = rng.standard_normal(x_shape), rng.standard_normal(w_shape)
    b = rng.standard_normal(w_shape[0]) if with_bias else None
    expected = onnx_node("Conv", x, w, b, **attributes)
    spec = ConvSpec(**hparams, layout=layout)
    if layout == "nhwc":  # x (n, *spatial, Cin), w (*kernel, Cin/g, Cout)
        x, w = np.moveaxis(x, 1, -1), np.moveaxis(w, (0, 1), (-1, -2))
        expected = np.moveaxis(expected, 1, -1)
    z, _ = conv_forward(x, w, b, spec)
    assert z.shape == expected.shape
    np.testing.assert_allclose(z, expected, rtol=1e-12, atol=1e-12)


# -- ConvTranspose's output_shape ------------------------------------------------------------

# name -> (x shape, w shape, ONNX attributes with output_shape)
OUTPUT_SHAPE_CASES = {
    "same-upper": ((1, 1, 3, 3), (1, 2, 3, 3), {"strides": [3, 2], "output_shape": [9, 6]}),
    "same-lower": ((1, 1, 3, 3), (1, 2, 3, 3), {"strides": [3, 2], "output_shape": [8, 5]}),
    "1d-dilated": ((1, 2, 4), (2, 1, 3), {"strides": [2], "dilations": [2], "output_shape": [7]}),
    "3d-output-padding": (
        (1, 1, 2, 3, 2),
        (1, 1, 2, 2, 3),
        {"strides": [2, 2, 2], "output_padding": [1, 0, 1], "output_shape": [4, 5, 4]},
    ),
}


@pytest.mark.parametrize("auto_pad", ["SAME_UPPER", "SAME_LOWER"])
@pytest.mark.parametrize("name", sorted(OUTPUT_SHAPE_CASES))
def test_output_shape_becomes_pads_as_onnx_makes_them(name, auto_pad):
    from convcli import onnx_transposed_padding

    x_shape, w_shape, attributes = OUTPUT_SHAPE_CASES[name]
    rng = np.random.default_rng(200 + sorted(OUTPUT_SHAPE_CASES).index(name))
    x, w = rng.standard_normal(x_shape), rng.standard_normal(w_shape)
    expected = onnx_node("ConvTranspose", x, w, None, auto_pad=auto_pad, **attributes)
    rank = len(x_shape) - 2
    steps = {key: attributes.get(key + "s", [1] * rank) for key in ("stride", "dilation")}
    padding, output_padding = onnx_transposed_padding(
        x_shape[2:],
        w_shape[2:],
        attributes["output_shape"],
        stride=steps["stride"],
        dilation=steps["dilation"],
        output_padding=attributes.get("output_padding", 0),
        auto_pad=auto_pad,
    )
    spec = ConvSpec(
        stride=steps["stride"],
        dilation=steps["dilation"],
        padding=padding,
        output_padding=output_padding,
        transposed=True,
        layout="nchw",
    )
    z, _ = conv_forward(x, w, None, spec)
    assert z.shape[2:] == tuple(attributes["output_shape"])
    np.testing.assert_allclose(z, expected, rtol=1e-12, atol=1e-12)


def test_output_shape_by_hand_and_refusals():
    from convcli import HyperparameterError, onnx_transposed_padding

    # in 3, kernel 3, stride 2: 7 uncropped positions; 6 wanted crops 1, at the end (SAME_UPPER)
    assert onnx_transposed_padding([3], [3], [6], stride=2, auto_pad="SAME_UPPER") == (
        ((0, 1),),
        (0,),
    )
    # NOTSET (ONNX's default) puts the larger half first, as SAME_LOWER does
    assert onnx_transposed_padding([3], [3], [4], stride=2) == (((2, 1),), (0,))
    with pytest.raises(HyperparameterError, match="output_shape"):
        onnx_transposed_padding([3], [3], [8], stride=2)  # longer than the 7 positions
    with pytest.raises(HyperparameterError, match="output_shape"):
        onnx_transposed_padding([3, 3], [3, 3], [6], stride=2)
