"""Transposed convolution against ONNX's own ``ConvTranspose`` (``onnx.reference``), on the
attribute sets of ONNX's node tests: defaults, strides with pads, output_padding, dilations,
groups, ``auto_pad=SAME_UPPER``, 1-D and 3-D. ONNX's layout is channels first: X
``(n, Cin, *spatial)``, W ``(Cin, Cout/group, *kernel)`` — the library's ``nchw``."""

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
