"""The fast engine against golden values, the reference engine and the adjoint identity."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from convcli import (
    ConvcliNotice,
    ConvSpec,
    DtypeError,
    HyperparameterError,
    ShapeError,
    conv_backward,
    conv_backward_reference,
    conv_forward,
    conv_forward_reference,
)
from convcli.engine import kernels
from convcli.engine.tiling import Plan
from tests.strategies import conv_cases, depthwise_cases, nd_conv_cases

ENGINES = [
    pytest.param((conv_forward, conv_backward), id="fast"),
    pytest.param((conv_forward_reference, conv_backward_reference), id="reference"),
]
Z_3_2_1 = [
    -0.61490741,
    -6.7439236,
    -2.55153897,
    1.75698377,
    3.56208902,
    0.53036437,
    5.18531798,
    8.75898442,
]


@pytest.mark.parametrize("engine", ENGINES)
def test_classic_exercise_golden_values(classic, engine):
    forward, backward = engine
    spec = ConvSpec(stride=classic["stride"], padding=classic["pad"])
    z, cache = forward(classic["x"], classic["w"], classic["b"], spec)
    assert z.shape == (10, 4, 4, 8)
    assert z.mean() == pytest.approx(0.048995203528855794, rel=1e-12)
    np.testing.assert_allclose(z[3, 2, 1], Z_3_2_1, rtol=1e-7)
    dx, dw, db = backward(z, cache)
    assert dx.mean() == pytest.approx(1.4524377775388075, rel=1e-12)
    assert dw.mean() == pytest.approx(1.7269914583139097, rel=1e-12)
    assert db.mean() == pytest.approx(7.839232564616838, rel=1e-12)
    assert (dx.shape, dw.shape, db.shape) == ((10, 4, 4, 3), (2, 2, 3, 8), (1, 1, 1, 8))


def _tolerance(dtype):
    return {"rtol": 1e-4, "atol": 1e-4} if dtype == np.float32 else {"rtol": 1e-10, "atol": 1e-10}


@given(
    case=conv_cases(),
    workspace=st.sampled_from([1, 4096, 256 * 2**20]),
    threads=st.sampled_from([None, 1, 3]),
)
def test_fast_engine_matches_reference(case, workspace, threads):
    x, w, b, spec = case
    z, cache = conv_forward(x, w, b, spec, workspace=workspace, threads=threads)
    z_ref, cache_ref = conv_forward_reference(x, w, b, spec)
    assert z.dtype == x.dtype
    assert z.shape == z_ref.shape
    np.testing.assert_allclose(z, z_ref, **_tolerance(x.dtype))
    dz = np.random.default_rng(0).standard_normal(z.shape).astype(x.dtype)
    grads = conv_backward(dz, cache)
    grads_ref = conv_backward_reference(dz, cache_ref)
    for got, want in zip(grads, grads_ref, strict=True):
        if want is None:
            assert got is None
            continue
        assert got.shape == want.shape
        assert got.dtype == x.dtype
        np.testing.assert_allclose(got, want, **_tolerance(x.dtype))
    if b is not None:
        assert grads[2].shape == b.shape


@given(case=conv_cases(dtypes=(np.float64,)))
def test_adjoint_identity(case):
    """<conv(x, w), g> = <x, dx> = <w, dw> for bias-free conv, and db = sum of g."""
    x, w, _, spec = case
    z, cache = conv_forward(x, w, None, spec)
    g = np.random.default_rng(1).standard_normal(z.shape)
    dx, dw, db = conv_backward(g, cache)
    assert db is None
    inner = np.vdot(z, g)
    scale = np.abs(z).sum() * np.abs(g).max() + 1.0
    assert abs(inner - np.vdot(x, dx)) <= 1e-12 * scale
    assert abs(inner - np.vdot(w, dw)) <= 1e-12 * scale
    _, cache_b = conv_forward(x, w, np.zeros(w.shape[-1]), spec)
    np.testing.assert_allclose(conv_backward(g, cache_b)[2], g.sum(axis=(0, 1, 2)), rtol=1e-12)


def test_pad_zero_non_square_against_hand_computed_values():
    x = np.arange(2 * 3 * 5 * 1, dtype=np.float64).reshape(2, 3, 5, 1)
    w = np.ones((2, 3, 1, 1))
    z, _ = conv_forward(x, w, None, ConvSpec(padding=0))
    assert z.shape == (2, 2, 3, 1)
    # top-left window of image 0 covers rows 0-1, cols 0-2: 0+1+2+5+6+7 = 21
    assert z[0, 0, 0, 0] == 21.0
    assert z[1, 1, 2, 0] == sum(x[1, 1:3, 2:5, 0].ravel())


def test_same_padding_keeps_ceil_size_with_even_kernel_and_stride():
    x = np.ones((1, 7, 6, 2))
    w = np.ones((2, 4, 2, 3))
    spec = ConvSpec(stride=(2, 3), padding="same")
    z, cache = conv_forward(x, w, None, spec)
    assert z.shape == (1, 4, 2, 3)
    # odd extra pixel goes at the bottom/right (TensorFlow SAME)
    assert cache.geometry.pads == ((0, 1), (0, 1))


def test_same_lower_puts_the_odd_extra_pixel_first_and_same_upper_is_same():
    x = np.ones((1, 7, 6, 2))
    w = np.ones((2, 4, 2, 3))
    lower = conv_forward(x, w, None, ConvSpec(stride=(2, 3), padding="same_lower"))[1]
    assert lower.geometry.pads == ((1, 0), (1, 0))  # ONNX SAME_LOWER
    assert lower.geometry.out_sizes == (4, 2)
    assert ConvSpec(padding="SAME_UPPER").padding == "same"
    assert ConvSpec(padding="same_lower").padding == "same_lower"
    rng = np.random.default_rng(0)
    x, w = rng.standard_normal((2, 5, 6, 3)), rng.standard_normal((2, 3, 3, 4))
    z = conv_forward(x, w, None, ConvSpec(padding="same_lower"))[0]
    explicit = conv_forward(x, w, None, ConvSpec(padding=((1, 0), (1, 1))))[0]
    np.testing.assert_array_equal(z, explicit)


@pytest.mark.parametrize(
    ("dtypes", "expected"),
    [
        ((np.float32, np.float32), np.float32),
        ((np.float64, np.float64), np.float64),
        ((np.float32, np.float64), np.float64),
    ],
)
def test_dtype_rules(dtypes, expected):
    x = np.ones((1, 3, 3, 2), dtype=dtypes[0])
    w = np.ones((2, 2, 2, 1), dtype=dtypes[1])
    z, cache = conv_forward(x, w, None)
    assert z.dtype == expected
    dx, dw, _ = conv_backward(np.ones_like(z), cache)
    assert dx.dtype == dw.dtype == expected


def test_integer_input_becomes_float64_with_notice():
    x = np.ones((1, 3, 3, 2), dtype=np.int32)
    with pytest.warns(ConvcliNotice, match="int32"):
        z, _ = conv_forward(x, np.ones((2, 2, 2, 1), dtype=np.float32), None)
    assert z.dtype == np.float64


@pytest.mark.parametrize("dtype", [np.complex128, np.bool_, np.float16, "U3", object])
def test_other_dtypes_refused(dtype):
    x = np.ones((1, 3, 3, 1)).astype(dtype)
    with pytest.raises(DtypeError, match="x has dtype"):
        conv_forward(x, np.ones((2, 2, 1, 1)), None)


@pytest.mark.parametrize(
    ("kwargs", "x_shape", "w_shape", "error", "match"),
    [
        (
            {"stride": 0},
            (1, 4, 4, 1),
            (2, 2, 1, 1),
            HyperparameterError,
            "stride must be >= 1, got 0",
        ),
        (
            {"dilation": (1, 0)},
            (1, 4, 4, 1),
            (2, 2, 1, 1),
            HyperparameterError,
            r"dilation must be >= 1",
        ),
        ({"padding": -1}, (1, 4, 4, 1), (2, 2, 1, 1), HyperparameterError, "padding must be >= 0"),
        (
            {"groups": 2},
            (1, 4, 4, 3),
            (2, 2, 1, 4),
            HyperparameterError,
            "groups=2 must divide both Cin=3",
        ),
        ({}, (1, 4, 4, 3), (2, 2, 2, 4), ShapeError, "Cin of x is 3"),
        ({}, (1, 2, 4, 1), (3, 2, 1, 1), HyperparameterError, "kernel along h spans 3"),
        (
            {"dilation": 3},
            (1, 5, 5, 1),
            (3, 3, 1, 1),
            HyperparameterError,
            r"spans 7 \(k=3, dilation=3\)",
        ),
        ({"padding": "full"}, (1, 4, 4, 1), (2, 2, 1, 1), HyperparameterError, "'full'"),
        ({"stride": 1.5}, (1, 4, 4, 1), (2, 2, 1, 1), HyperparameterError, "1.5"),
        ({}, (4, 4, 1), (2, 2, 1, 1), ShapeError, "w must be .* with 1 kernel axes like x"),
        ({}, (1, 2, 3, 4, 5, 6), (1, 1, 1, 1, 6, 1), ShapeError, "1 to 3 spatial axes"),
    ],
)
def test_bad_hyperparameters_raise_typed_errors(kwargs, x_shape, w_shape, error, match):
    with pytest.raises(error, match=match):
        conv_forward(np.ones(x_shape), np.ones(w_shape), None, ConvSpec(**kwargs))


def test_bias_shape_checked():
    with pytest.raises(ShapeError, match="b has shape"):
        conv_forward(np.ones((1, 3, 3, 1)), np.ones((2, 2, 1, 4)), np.ones(3))


def test_dz_shape_checked():
    _z, cache = conv_forward(np.ones((1, 3, 3, 1)), np.ones((2, 2, 1, 4)), None)
    with pytest.raises(ShapeError, match="dz has shape"):
        conv_backward(np.ones((1, 3, 3, 4)), cache)


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("groups", [1, 4])
def test_single_image_larger_than_workspace_is_tiled_by_rows(threads, groups):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 40, 33, 4))
    w = rng.standard_normal((3, 3, 4 // groups, 8))
    spec = ConvSpec(stride=(2, 1), padding=((1, 2), (0, 1)), dilation=(1, 2), groups=groups)
    z_small, cache_small = conv_forward(x, w, None, spec, workspace=2048, threads=threads)
    z_big, cache_big = conv_forward(x, w, None, spec)
    np.testing.assert_allclose(z_small, z_big, rtol=1e-12, atol=1e-12)
    for a, b in zip(
        conv_backward(z_small, cache_small)[:2], conv_backward(z_big, cache_big)[:2], strict=True
    ):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)


def test_depthwise_groups_equal_cin():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((2, 6, 6, 4))
    w = rng.standard_normal((3, 3, 1, 8))
    spec = ConvSpec(padding=1, groups=4)
    z, _ = conv_forward(x, w, None, spec)
    # output channel 3 belongs to group 1 (channels 2,3 of z use input channel 1)
    z1, _ = conv_forward(x[..., 1:2], w[..., 2:4], None, ConvSpec(padding=1))
    np.testing.assert_allclose(z[..., 2:4], z1, rtol=1e-12)


@given(
    case=depthwise_cases(),
    workspace=st.sampled_from([1, 4096, 256 * 2**20]),
    threads=st.sampled_from([1, 2, 4]),
    row_block=st.sampled_from([None, 1, 2, 3]),
)
def test_depthwise_layers_match_reference(case, workspace, threads, row_block):
    """Depthwise layers (einsums, dx by phases of the stride) against the reference:
    multipliers 1-3, strides, dilations, padding modes, 1-3 spatial axes, row tiles and waves
    (tiny workspaces), several threads; ``row_block`` output positions per merged row (with
    dw merged from one row on), so that tiny layers have several blocks and a rest."""
    x, w, b, spec = case
    with pytest.MonkeyPatch.context() as patch:
        if row_block is not None:
            channels = x.shape[1] if spec.layout == "nchw" else x.shape[-1]
            patch.setattr(kernels, "ROW_BLOCK_VALUES", row_block * channels)
            patch.setattr(kernels, "MERGED_DW_LINES", 1)
        z, cache = conv_forward(x, w, b, spec, workspace=workspace, threads=threads)
        dz = np.random.default_rng(2).standard_normal(z.shape).astype(x.dtype)
        gradients = conv_backward(dz, cache)
    z_ref, cache_ref = conv_forward_reference(x, w, b, spec)
    assert z.dtype == x.dtype
    np.testing.assert_allclose(z, z_ref, **_tolerance(x.dtype))
    for got, want in zip(gradients, conv_backward_reference(dz, cache_ref), strict=True):
        if want is None:
            continue
        assert got.dtype == x.dtype
        np.testing.assert_allclose(got, want, **_tolerance(x.dtype))


@pytest.mark.parametrize(("rank", "stride"), [(1, 1), (2, 1), (3, 1), (1, 3), (2, (2, 3)), (3, 2)])
def test_depthwise_dx_is_correlations_by_phase(rank, stride, monkeypatch):
    """Multiplier 1, zero padding: dx is depthwise correlations of dz with the flipped
    weights, one per residue of the stride (one at stride 1), with no padded dx buffer to
    scatter into (and so no waves)."""

    def no_scatter(self, tile):
        raise AssertionError("dx scattered into a padded buffer")

    monkeypatch.setattr(Plan, "dx_buffer", no_scatter)
    rng = np.random.default_rng(rank)
    x = rng.standard_normal((2, *(5,) * rank, 3))
    w = rng.standard_normal((*(3,) * rank, 1, 3))
    spec = ConvSpec(stride=stride, padding=((1, 2), *((1, 0),) * (rank - 1)), dilation=2, groups=3)
    for workspace in (1, 256 * 2**20):
        z, cache = conv_forward(x, w, None, spec, workspace=workspace, threads=2)
        z_ref, cache_ref = conv_forward_reference(x, w, None, spec)
        np.testing.assert_allclose(z, z_ref, rtol=1e-12, atol=1e-12)
        dz = rng.standard_normal(z.shape)
        got_dx, got_dw, _ = conv_backward(dz, cache)
        want_dx, want_dw, _ = conv_backward_reference(dz, cache_ref)
        for got, want in ((got_dx, want_dx), (got_dw, want_dw)):
            np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_engine_has_no_python_loop_over_batch_or_pixels(monkeypatch):
    """Doubling n and H x W must not multiply the number of Python-level copies."""
    calls = []
    original = Plan.im2col

    def counting(self, x, tile):
        calls.append(tile)
        return original(self, x, tile)

    monkeypatch.setattr(Plan, "im2col", counting)
    conv_forward(np.ones((8, 16, 16, 3)), np.ones((3, 3, 3, 4)), None, ConvSpec(padding=1))
    assert len(calls) == 1


def test_summary_statistics_streamed_equal_in_memory():
    from convcli.stats import RunningStats, summarize

    rng = np.random.default_rng(9)
    array = 3.0 + 1e-3 * rng.standard_normal(
        (37, 5, 4)
    )  # a large mean: naive sums would lose digits
    whole = summarize(array)
    stats = RunningStats(array.shape, array.dtype)
    for start in range(0, 37, 6):
        stats.update(array[start : start + 6])
    streamed = stats.summary()
    assert streamed["mean"] == pytest.approx(float(array.mean()), rel=1e-13)
    assert streamed["std"] == pytest.approx(float(array.std()), rel=1e-10)
    for key in ("mean", "std"):
        assert streamed[key] == pytest.approx(whole[key], rel=1e-12)
    assert (streamed["min"], streamed["max"]) == (whole["min"], whole["max"])
    assert whole["shape"] == [37, 5, 4]


@given(
    case=nd_conv_cases(),
    workspace=st.sampled_from([1, 256 * 2**20]),
    threads=st.sampled_from([None, 1, 3]),
)
def test_every_rank_layout_and_padding_mode_matches_reference(case, workspace, threads):
    x, w, b, spec = case
    z, cache = conv_forward(x, w, b, spec, workspace=workspace, threads=threads)
    z_ref, cache_ref = conv_forward_reference(x, w, b, spec)
    assert z.shape == z_ref.shape == cache.geometry.user_out_shape
    assert z.dtype == x.dtype
    np.testing.assert_allclose(z, z_ref, **_tolerance(x.dtype))
    dz = np.random.default_rng(0).standard_normal(z.shape).astype(x.dtype)
    for got, want, given_ in zip(
        conv_backward(dz, cache), conv_backward_reference(dz, cache_ref), (x, w, b), strict=True
    ):
        if given_ is None:
            assert got is None
            continue
        assert got.shape == want.shape == given_.shape
        np.testing.assert_allclose(got, want, **_tolerance(x.dtype))


@given(case=nd_conv_cases(dtypes=(np.float64,)))
def test_channels_first_equals_converting_yourself(case):
    x, w, b, spec = case
    if spec.layout != "nchw":
        spec = ConvSpec(**{**_fields(spec), "layout": "nchw"})
        x, w = np.moveaxis(x, -1, 1), np.moveaxis(w, (-1, -2), (0, 1))
    last = ConvSpec(**{**_fields(spec), "layout": "nhwc"})
    z_first, cache_first = conv_forward(x, w, b, spec)
    z_last, cache_last = conv_forward(
        np.moveaxis(x, 1, -1), np.moveaxis(w, (0, 1), (-1, -2)), b, last
    )
    np.testing.assert_allclose(z_first, np.moveaxis(z_last, -1, 1), rtol=1e-12, atol=1e-12)
    dz = np.random.default_rng(1).standard_normal(z_first.shape)
    dx_f, dw_f, _ = conv_backward(dz, cache_first)
    dx_l, dw_l, _ = conv_backward(np.moveaxis(dz, 1, -1), cache_last)
    np.testing.assert_allclose(dx_f, np.moveaxis(dx_l, -1, 1), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dw_f, np.moveaxis(dw_l, (-1, -2), (0, 1)), rtol=1e-12, atol=1e-12)


def _fields(spec):
    return {
        "stride": spec.stride,
        "padding": spec.padding,
        "dilation": spec.dilation,
        "groups": spec.groups,
        "padding_mode": spec.padding_mode,
    }


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        # x = [1, 2, 3], kernel [1, 1, 1], pad 2 on both sides: sums of 3 padded neighbours
        ("zeros", [1, 3, 6, 5, 3]),
        ("reflect", [6, 5, 6, 7, 6]),  # padded: 3 2 | 1 2 3 | 2 1
        ("replicate", [3, 4, 6, 8, 9]),  # padded: 1 1 | 1 2 3 | 3 3
        ("circular", [6, 6, 6, 6, 6]),  # padded: 2 3 | 1 2 3 | 1 2
    ],
)
def test_padding_modes_known_values_1d(mode, expected):
    x = np.array([1.0, 2.0, 3.0]).reshape(1, 3, 1)
    w = np.ones((3, 1, 1))
    spec = ConvSpec(padding=2, padding_mode=mode)
    z, cache = conv_forward(x, w, None, spec)
    np.testing.assert_array_equal(z.reshape(-1), expected)
    z_ref, _ = conv_forward_reference(x, w, None, spec)
    np.testing.assert_array_equal(z_ref.reshape(-1), expected)
    # backward with dz = 1 everywhere counts how often each input is read
    dx, _, _ = conv_backward(np.ones_like(z), cache)
    reads = {
        "zeros": [3, 3, 3],
        "reflect": [4, 7, 4],
        "replicate": [6, 3, 6],
        "circular": [5, 5, 5],
    }
    np.testing.assert_array_equal(dx.reshape(-1), reads[mode])


def test_padding_modes_known_values_2d_replicate_corner():
    x = np.arange(4.0).reshape(1, 2, 2, 1)  # [[0, 1], [2, 3]]
    z, _ = conv_forward(
        x, np.ones((1, 1, 1, 1)), None, ConvSpec(padding=1, padding_mode="replicate")
    )
    # 1x1 kernel, stride 1: z is the padded input itself
    np.testing.assert_array_equal(
        z[0, :, :, 0], [[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]]
    )


@pytest.mark.parametrize(
    ("kwargs", "shape", "match"),
    [
        (
            {"padding": 3, "padding_mode": "reflect"},
            (1, 3, 1),
            "reflect padding along l must be smaller",
        ),
        ({"padding": 4, "padding_mode": "circular"}, (1, 3, 1), "circular padding along l"),
        ({"stride": (1, 2)}, (1, 5, 1), "stride has 2 values but x has 1 spatial axis"),
        ({"padding": (1, 2, 3)}, (1, 5, 5, 1), "padding has 3 values"),
    ],
)
def test_mode_and_rank_errors(kwargs, shape, match):
    w = np.ones((*([1] * (len(shape) - 2)), 1, 1))
    with pytest.raises(HyperparameterError, match=match):
        conv_forward(np.ones(shape), w, None, ConvSpec(**kwargs))
