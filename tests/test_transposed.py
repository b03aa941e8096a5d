"""Transposed convolution (``ConvSpec(transposed=True)``): output sizes worked by hand, the
adjoint identity with convolution, the fast engine against the scatter-form reference
(Hypothesis, forced row tiles and threads), gradcheck of the layer, and ONNX's ConvTranspose."""

import json

import numpy as np
import pytest
from hypothesis import given

from convcli import (
    ConvSpec,
    HyperparameterError,
    ShapeError,
    conv_backward,
    conv_backward_reference,
    conv_forward,
    conv_forward_reference,
)
from convcli.check import gradcheck
from convcli.engine.tiling import Plan
from convcli.spec import output_size, transposed_output_size
from tests.strategies import transposed_cases


@pytest.mark.parametrize(
    ("size", "kernel", "stride", "dilation", "pads", "output_padding", "expected"),
    [
        # (in - 1)·stride - before - after + dilation·(k - 1) + output_padding + 1
        (4, 3, 1, 1, (0, 0), 0, 6),  # 3 + 2 + 1: a "full" convolution
        (4, 3, 2, 1, (1, 1), 1, 8),  # 6 - 2 + 2 + 1 + 1: the 2x upsampling decoder layer
        (4, 3, 2, 1, (1, 1), 0, 7),
        (5, 4, 2, 1, (1, 1), 0, 10),  # DCGAN's kernel 4, stride 2, padding 1 doubles
        (3, 3, 3, 2, (0, 2), 2, 11),  # 6 - 2 + 4 + 2 + 1
        (1, 1, 5, 1, (0, 0), 4, 5),  # one pixel, output_padding < stride
        (2, 2, 1, 3, (2, 0), 2, 5),  # 1 - 2 + 3 + 2 + 1: output_padding < dilation
    ],
)
def test_output_size_worked_by_hand(size, kernel, stride, dilation, pads, output_padding, expected):
    assert transposed_output_size(size, kernel, stride, dilation, *pads, output_padding) == expected
    # and the convolution with the same hyperparameters maps it back
    assert output_size(expected, kernel, stride, dilation, *pads) == (
        size if output_padding < stride else size + output_padding // stride
    )
    spec = ConvSpec(
        stride=stride,
        padding=(pads,),
        dilation=dilation,
        transposed=True,
        output_padding=output_padding,
    )
    geometry = spec.geometry((1, size, 2), (kernel, 3, 2))
    assert geometry.out_shape == (1, expected, 3)
    z, _ = conv_forward(np.ones((1, size, 2)), np.ones((kernel, 3, 2)), None, spec)
    assert z.shape == (1, expected, 3)


def test_weight_shapes_in_both_layouts():
    first = ConvSpec(transposed=True, groups=2, layout="nchw")
    geometry = first.geometry((1, 4, 5, 6), (4, 3, 2, 2))  # (Cin, Cout/g, kh, kw)
    assert geometry.user_shapes() == {"x": (1, 4, 5, 6), "w": (4, 3, 2, 2), "z": (1, 6, 6, 7)}
    last = ConvSpec(transposed=True, groups=2)
    geometry = last.geometry((1, 5, 6, 4), (2, 2, 3, 4))  # (kh, kw, Cout/g, Cin)
    assert geometry.user_shapes() == {"x": (1, 5, 6, 4), "w": (2, 2, 3, 4), "z": (1, 6, 7, 6)}
    assert geometry.hparams()["transposed"] == 1
    assert geometry.hparams()["output_padding"] == [0, 0]


@pytest.mark.parametrize(
    ("size", "kernel", "stride", "dilation"),
    [(4, 3, 2, 1), (5, 4, 2, 1), (3, 1, 3, 1), (6, 3, 1, 2), (2, 2, 4, 1), (3, 5, 2, 2)],
)
@pytest.mark.parametrize("same", ["same", "same_upper", "same_lower"])
def test_same_gives_in_times_stride(size, kernel, stride, dilation, same):
    spec = ConvSpec(stride=stride, dilation=dilation, padding=same, transposed=True)
    z, _ = conv_forward(np.ones((1, size, 1)), np.ones((kernel, 1, 1)), None, spec)
    assert z.shape == (1, size * stride, 1)


def test_same_crops_the_odd_pixel_at_the_end_and_same_lower_at_the_start():
    upper = ConvSpec(stride=2, padding="same", transposed=True)
    lower = ConvSpec(stride=2, padding="same_lower", transposed=True)
    # cropped: dilation·(k - 1) + 1 + output_padding - stride
    assert upper.geometry((1, 4, 1), (4, 1, 1)).pads == ((1, 1),)  # 4 - 2 = 2
    assert upper.geometry((1, 4, 1), (5, 1, 1)).pads == ((1, 2),)  # 5 - 2 = 3
    assert lower.geometry((1, 4, 1), (5, 1, 1)).pads == ((2, 1),)
    for spec in (upper, lower):  # a kernel shorter than the stride: zeros added at the end
        geometry = spec.geometry((1, 3, 1), (1, 1, 1))
        assert (geometry.pads, geometry.output_padding, geometry.out_sizes) == (
            ((0, 0),),
            (1,),
            (6,),
        )


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"output_padding": 1}, "output_padding"),  # not transposed
        ({"transposed": True, "padding_mode": "reflect"}, "padding_mode"),
        ({"transposed": 2}, "transposed"),
        ({"transposed": True, "output_padding": -1}, "output_padding"),
    ],
)
def test_spec_refuses(kwargs, param):
    with pytest.raises(HyperparameterError) as caught:
        ConvSpec(**kwargs)
    assert caught.value.param == param


def test_geometry_refuses_output_padding_not_below_stride_or_dilation():
    spec = ConvSpec(stride=2, dilation=2, transposed=True, output_padding=2)
    with pytest.raises(HyperparameterError, match="smaller than the stride"):
        spec.geometry((1, 4, 1), (3, 1, 1))


def test_geometry_refuses_cropping_everything_and_wrong_channels():
    with pytest.raises(HyperparameterError, match="crops the whole output"):
        ConvSpec(padding=2, transposed=True).geometry((1, 1, 1), (3, 1, 1))
    with pytest.raises(ShapeError, match="expects Cin = 3"):
        ConvSpec(transposed=True, layout="nchw").geometry((1, 2, 5), (3, 1, 2))


# -- the adjoint identity -------------------------------------------------------------------


@given(case=transposed_cases(dtypes=(np.float64,)))
def test_adjoint_identity(case):
    """⟨conv(y, w), x⟩ = ⟨y, conv_transpose(x, w)⟩: the transposed convolution of x is the
    convolution's input gradient for upstream x, with the very same w array in either layout."""
    x, w, _, spec = case
    z, cache = conv_forward(x, w, None, spec)
    geometry = cache.geometry
    forward_spec = ConvSpec(
        stride=geometry.stride,
        padding=geometry.pads,
        dilation=geometry.dilation,
        groups=geometry.groups,
        layout=spec.layout,
    )
    y = np.random.default_rng(1).standard_normal(z.shape)
    conv_y, conv_cache = conv_forward(y, w, None, forward_spec)
    shapes = conv_cache.geometry.user_shapes()
    assert shapes["w"] == w.shape
    # the convolution's output is x's size, plus any positions an output_padding >= stride adds
    extra = [o - i for o, i in zip(conv_cache.geometry.out_sizes, geometry.in_sizes, strict=True)]
    assert all(
        e == op // s
        for e, op, s in zip(extra, geometry.output_padding, geometry.stride, strict=True)
    )
    x_last = np.moveaxis(x, 1, -1) if spec.layout == "nchw" else x
    x_padded = np.pad(x_last, [(0, 0), *((0, e) for e in extra), (0, 0)])
    x_as_dz = np.moveaxis(x_padded, -1, 1) if spec.layout == "nchw" else x_padded
    np.testing.assert_allclose(np.vdot(conv_y, x_as_dz), np.vdot(y, z), rtol=1e-10, atol=1e-10)
    # and it is the convolution's dx for that upstream gradient
    dx, _, _ = conv_backward(x_as_dz, conv_cache)
    np.testing.assert_allclose(z, dx, rtol=1e-10, atol=1e-10)


# -- fast engine against the reference --------------------------------------------------------


def _tolerance(dtype):
    return {"rtol": 1e-4, "atol": 1e-4} if dtype == np.float32 else {"rtol": 1e-10, "atol": 1e-10}


@given(case=transposed_cases())
def test_engine_matches_reference(case):
    x, w, b, spec = case
    z, cache = conv_forward(x, w, b, spec)
    z_ref, cache_ref = conv_forward_reference(x, w, b, spec)
    assert z.dtype == x.dtype
    np.testing.assert_allclose(z, z_ref, **_tolerance(x.dtype))
    dz = np.random.default_rng(2).standard_normal(z.shape).astype(x.dtype)
    for got, expected in zip(
        conv_backward(dz, cache), conv_backward_reference(dz, cache_ref), strict=True
    ):
        if expected is None:
            assert got is None
        else:
            assert got.shape == expected.shape
            np.testing.assert_allclose(got, expected, **_tolerance(x.dtype))


# name -> (x shape, w shape, spec, workspace bytes): images wide enough to be cut into rows
TILED = {
    "decoder-2x": (
        (1, 6, 40, 8),
        (3, 3, 8, 8),
        ConvSpec(stride=2, padding=1, output_padding=1, transposed=True),
        2**14,
    ),
    "dilated-grouped-nchw": (
        (1, 4, 5, 48),
        (4, 3, 3, 3),
        ConvSpec(
            stride=(1, 3),
            padding=((2, 0), (1, 2)),
            dilation=2,
            groups=2,
            transposed=True,
            output_padding=(1, 2),
            layout="nchw",
        ),
        2**13,
    ),
    "depthwise-1d": (
        (2, 64, 4),
        (5, 1, 4),
        ConvSpec(stride=3, padding=1, groups=4, transposed=True, output_padding=2),
        2**11,
    ),
}


@pytest.mark.parametrize("name", sorted(TILED))
def test_row_tiles_on_threads_match_reference(name):
    x_shape, w_shape, spec, workspace = TILED[name]
    rng = np.random.default_rng(sorted(TILED).index(name))
    x, w = rng.standard_normal(x_shape), rng.standard_normal(w_shape)
    z_ref, cache_ref = conv_forward_reference(x, w, None, spec)
    dz = rng.standard_normal(z_ref.shape)
    dx_ref, dw_ref, _ = conv_backward_reference(dz, cache_ref)
    adjoint = cache_ref.geometry.adjoint()
    for backward in (False, True):
        plan = Plan(adjoint, np.float64, workspace // 4, backward=backward)
        assert plan.rows_per_tile < adjoint.out_sizes[0], "the case must be cut into row tiles"
    for threads in (1, 2, 4):
        for _ in range(3):
            z, cache = conv_forward(x, w, None, spec, workspace=workspace, threads=threads)
            np.testing.assert_allclose(z, z_ref, rtol=1e-12, atol=1e-12)
            dx, dw, _ = conv_backward(dz, cache)
            np.testing.assert_allclose(dx, dx_ref, rtol=1e-12, atol=1e-12)
            np.testing.assert_allclose(dw, dw_ref, rtol=1e-12, atol=1e-12)


# -- gradcheck of the layer -------------------------------------------------------------------


# name -> (x shape, w shape, spec), arrays in the spec's layout
GRADCHECKED = {
    "decoder-2x": (
        (1, 3, 4, 2),
        (3, 3, 3, 2),
        ConvSpec(stride=2, padding=1, output_padding=1, transposed=True),
    ),
    "grouped-dilated-nchw": (
        (2, 4, 3, 4),
        (4, 1, 2, 3),
        ConvSpec(
            stride=(1, 3),
            padding=((0, 2), (1, 0)),
            dilation=(2, 1),
            groups=2,
            output_padding=(1, 2),
            transposed=True,
            layout="nchw",
        ),
    ),
    "depthwise-same": (
        (2, 3, 4, 4),
        (3, 3, 1, 4),
        ConvSpec(stride=2, padding="same", groups=4, transposed=True),
    ),
    "conv1d-output-padding-from-dilation": (
        (2, 5, 2),
        (2, 2, 2),
        ConvSpec(stride=1, dilation=3, padding=((1, 0),), output_padding=2, transposed=True),
    ),
}


@pytest.mark.parametrize("mode", ["exhaustive", "sample", "fast"])
@pytest.mark.parametrize("name", sorted(GRADCHECKED))
def test_gradcheck_passes(name, mode):
    x_shape, w_shape, spec = GRADCHECKED[name]
    rng = np.random.default_rng(5)
    x, w = rng.standard_normal(x_shape), rng.standard_normal(w_shape)
    b = rng.standard_normal(spec.geometry(x_shape, w_shape).cout)
    result = gradcheck(x, w, b, spec, mode=mode, seed=3)
    assert result.passed, result
    assert set(result.tensors) == {"dx", "dw", "db"}


def test_exhaustive_passes_do_not_grow_with_the_image():
    from convcli.check.exhaustive import exhaustive_passes

    spec = ConvSpec(stride=2, padding=1, output_padding=1, transposed=True)
    small = spec.geometry((1, 3, 3, 2), (3, 3, 4, 2))
    large = spec.geometry((8, 30, 20, 2), (3, 3, 4, 2))
    assert exhaustive_passes(small, True) == exhaustive_passes(large, True)
    # taps per input along an axis: 3 taps over stride 2 reach 2 inputs -> period 2
    assert exhaustive_passes(large, False) == 2 * (2 * 2 * 2 + 3 * 3 * 2)


# -- the hyperparameter table -----------------------------------------------------------------


def test_files_flags_and_sweeps_spell_transposed_layers():
    from convcli.errors import UsageError
    from convcli.hparams import BY_NAME, build_spec, format_hparams

    resolved = build_spec(
        {
            "transposed": (1, "a.toml key 'transposed'"),
            "output_padding": ([1, 0], "a.toml key 'output_padding'"),
        },
        {"stride": "2", "padding": "1"},
        rank=2,
    )
    assert resolved.spec == ConvSpec(stride=2, padding=1, transposed=True, output_padding=(1, 0))
    assert resolved.origins["transposed"] == "a.toml key 'transposed'"
    flag = BY_NAME["transposed"]
    assert [flag.from_text(t) for t in ("1", "true", "No", "0")] == [1, 1, 0, 0]
    assert flag.from_value(True, "f") == 1
    assert flag.from_value(0.0, "f") == 0
    with pytest.raises(UsageError):
        flag.from_text("2")
    with pytest.raises(HyperparameterError, match="expected 1"):
        flag.from_value(2, "f")
    assert BY_NAME["output_padding"].from_text("0,1") == (0, 1)
    with pytest.raises(UsageError, match=">= 0"):
        BY_NAME["output_padding"].from_text("-1")
    geometry = resolved.spec.geometry((1, 3, 3, 1), (3, 3, 1, 1))
    assert format_hparams(geometry.hparams()) == (
        "stride=2 padding=1 dilation=1 groups=1 transposed=1 output_padding=1,0"
    )


# -- the command line (forward, backward, gradcheck; files and sweep specs) -------------------


def _cli(*args):
    from typer.testing import CliRunner

    from convcli.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


def test_cli_flags_and_file_hyperparameters(tmp_path):
    rng = np.random.default_rng(7)
    x, w = rng.standard_normal((2, 3, 4, 2)), rng.standard_normal((3, 3, 5, 2))
    spec = ConvSpec(stride=2, padding=1, output_padding=(1, 0), transposed=True)
    z, cache = conv_forward(x, w, None, spec)
    dz = rng.standard_normal(z.shape)
    dx, dw, _ = conv_backward(dz, cache)
    flags = ["--transposed", "--stride", "2", "--pad", "1", "--output-padding", "1,0"]
    np.savez(tmp_path / "layer.npz", x=x, w=w, dz=dz)
    result = _cli("backward", tmp_path / "layer.npz", *flags, "--out", tmp_path / "o.npz", "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["hparams"]["output_padding"] == [1, 0]
    with np.load(tmp_path / "o.npz") as saved:
        np.testing.assert_allclose(saved["dx"], dx, rtol=1e-12)
        np.testing.assert_allclose(saved["dw"], dw, rtol=1e-12)
    # the same layer described by the file itself
    np.savez(tmp_path / "t.npz", x=x, w=w, transposed=1, stride=2, pad=1, output_padding=[1, 0])
    result = _cli("forward", tmp_path / "t.npz", "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["tensors"]["z"]["shape"] == list(z.shape)
    assert _cli("forward", tmp_path / "t.npz", "--no-transposed").exit_code == 65  # op w/o it
    result = _cli("gradcheck", tmp_path / "t.npz", "--mode", "exhaustive", "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["passed"] is True
    result = _cli("gradcheck", "--impl", "mine.py", "--transposed")
    assert result.exit_code == 2
    assert "--transposed" in result.stderr


def test_sweep_spec_runs_transposed_layers(tmp_path):
    spec_file = tmp_path / "s.toml"
    spec_file.write_text(
        "[defaults]\nshape = [1, 3, 3, 2]\nkernel = 3\ncout = 2\ntransposed = 1\nstride = 2\n"
        'output_padding = 1\n[grid]\ngroups = [1, 2]\nlayout = ["nhwc", "nchw"]\n'
    )
    result = _cli("sweep", spec_file, "--out", tmp_path / "r.jsonl", "--json")
    assert result.exit_code == 0, result.stderr
    records = [json.loads(line) for line in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert [r["status"] for r in records] == ["passed"] * 4
    assert {r["hparams"]["transposed"] for r in records} == {1}
    assert {tuple(r["forward"]["z"]["shape"]) for r in records} == {(1, 8, 8, 2), (1, 2, 8, 8)}
