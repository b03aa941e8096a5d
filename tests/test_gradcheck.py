"""gradcheck: a correct engine always passes; broken backward passes are caught and located."""

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import convcli.check.gradients as gc
from convcli import ConvSpec, conv_backward, conv_forward
from convcli.check import Tolerance, gradcheck
from convcli.check.exhaustive import exhaustive_passes, feeding_inputs, perturbation_periods
from convcli.cli.heatmap import RAMP, heatmap
from tests.strategies import conv_cases, nd_conv_cases


def _flat_bias(b):
    return None if b is None else b.reshape(-1)


@settings(max_examples=40)
@given(
    case=conv_cases(dtypes=(np.float64,)), mode=st.sampled_from(["exhaustive", "sample", "fast"])
)
def test_correct_engine_passes_every_mode(case, mode):
    x, w, b, spec = case
    result = gradcheck(x, w, _flat_bias(b), spec, mode=mode, samples=16, probes=4)
    assert result.passed, {
        k: (v.max_abs_err, v.max_rel_err, v.worst[:1]) for k, v in result.tensors.items()
    }
    assert set(result.tensors) == ({"dx", "dw"} | ({"db"} if b is not None else set()))


@settings(max_examples=40)
@given(case=conv_cases(dtypes=(np.float64,)), scale=st.sampled_from([1e-3, 1.0, 30.0]))
def test_default_tolerances_never_fail_a_correct_engine_at_other_scales(case, scale):
    x, w, b, spec = case
    result = gradcheck(scale * x, w, _flat_bias(b), spec, mode="exhaustive")
    assert result.passed


def _broken(spec, corrupt):
    """The engine's backward, then corrupted by ``corrupt(dx, dw, db) -> (dx, dw, db)``."""

    def backward(g, x, w, b):
        grads = conv_backward(g, conv_forward(x, w, b, spec)[1])
        return corrupt(*[None if a is None else a.copy() for a in grads])

    return backward


def _dw_channel_error(relative, channel=1):
    def corrupt(dx, dw, db):
        dw[..., channel] *= 1 + relative
        return dx, dw, db

    return corrupt


def _frame(dx, dw, db):
    dx[:, 0, :, :] = 0  # a padding bug: the border of dx is lost
    dx[:, -1, :, :] = 0
    dx[:, :, 0, :] = 0
    dx[:, :, -1, :] = 0
    return dx, dw, db


def _shifted_dx(dx, dw, db):
    return np.roll(dx, 1, axis=1), dw, db  # off-by-one in the padding offset


def _mean_bias(dx, dw, db):
    return dx, dw, db / 4  # a wrong reduction (mean over a batch of 4 instead of the sum)


def _dw_transposed_kernel(dx, dw, db):
    return dx, np.swapaxes(dw, 0, 1), db  # kernel axes swapped (flipped correlation)


@pytest.fixture
def layer():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((4, 7, 7, 3))
    w = rng.standard_normal((3, 3, 3, 4))
    b = rng.standard_normal(4)
    return x, w, b


BUGS = {
    "tiny dw channel error": (
        _dw_channel_error(1e-5),
        ConvSpec(padding=1),
        "dw",
        ("exhaustive", "sample"),
    ),
    "padding frame": (_frame, ConvSpec(padding=1), "dx", ("exhaustive", "sample", "fast")),
    "off-by-one": (_shifted_dx, ConvSpec(padding=1), "dx", ("exhaustive", "sample", "fast")),
    "wrong reduction": (_mean_bias, ConvSpec(padding=1), "db", ("exhaustive", "sample", "fast")),
    "swapped kernel axes": (
        _dw_transposed_kernel,
        ConvSpec(padding=1),
        "dw",
        ("exhaustive", "sample", "fast"),
    ),
}


@pytest.mark.parametrize(
    ("bug", "mode"), [(bug, mode) for bug, (*_, modes) in BUGS.items() for mode in modes]
)
def test_broken_backward_is_caught(layer, bug, mode):
    corrupt, spec, tensor, _ = BUGS[bug]
    x, w, b = layer
    result = gradcheck(x, w, b, spec, mode=mode, backward=_broken(spec, corrupt), samples=64)
    assert not result.passed
    assert not result.tensors[tensor].passed
    assert all(check.passed for name, check in result.tensors.items() if name != tensor)


@pytest.mark.parametrize("mode", ["exhaustive", "sample", "fast"])
def test_forgotten_stride_is_caught(mode):
    """A backward that scatters dz as if the stride were 1 when it is 2."""
    rng = np.random.default_rng(6)
    x, w = rng.standard_normal((2, 8, 8, 2)), rng.standard_normal((2, 2, 2, 3))
    spec = ConvSpec(stride=2)

    def backward(g, x_, w_, b_):
        dense = np.zeros((2, 7, 7, 3))
        dense[:, : g.shape[1], : g.shape[2]] = g
        return conv_backward(dense, conv_forward(x_, w_, b_, ConvSpec(stride=1))[1])

    result = gradcheck(x, w, None, spec, mode=mode, backward=backward)
    assert not result.tensors["dx"].passed
    assert not result.tensors["dw"].passed


def test_tiny_error_located_by_channel(layer):
    x, w, b = layer
    spec = ConvSpec(padding=1)
    result = gradcheck(
        x, w, b, spec, mode="exhaustive", backward=_broken(spec, _dw_channel_error(1e-5, 2))
    )
    dw = result.tensors["dw"]
    assert set(dw.failures_per_channel) == {2}
    assert dw.failures_per_channel[2] == 3 * 3 * 3
    assert all(row["index"][-1] == 2 for row in dw.worst)


def test_padding_bug_shows_as_a_frame(layer):
    x, w, b = layer
    spec = ConvSpec(padding=1)
    result = gradcheck(x, w, b, spec, mode="exhaustive", backward=_broken(spec, _frame))
    values, title = result.tensors["dx"].error_map()
    assert values.shape == (7, 7)
    assert values[1:-1, 1:-1].max() < 1e-9  # rounding only
    assert values[0].min() > 1e-3
    assert values[:, -1].min() > 1e-3
    assert "dx" in title
    picture = heatmap(values, title, color=False).plain
    rows = picture.splitlines()[1:8]
    assert rows[3][4:-4].strip() == ""  # empty interior
    assert set(rows[0]) <= set(RAMP)
    assert rows[0].strip()


@pytest.mark.parametrize(("n", "h", "w"), [(1, 5, 6), (4, 16, 16), (7, 23, 9)])
def test_exhaustive_passes_do_not_grow_with_n_h_w(n, h, w):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, h, w, 3))
    wt = rng.standard_normal((3, 3, 3, 2))
    result = gradcheck(x, wt, np.zeros(2), ConvSpec(padding=1), mode="exhaustive")
    assert result.passed
    assert result.forward_passes == 2 * (3 * 3 * 3 + 3 * 3 * 3 + 1)


def test_benchmark_layer_uses_290_forward_passes():
    spec = ConvSpec(padding=1)
    geometry = spec.geometry((4, 16, 16, 8), (3, 3, 8, 16))
    assert exhaustive_passes(geometry, has_bias=True) == 290  # versus 2 x 9,360 element-wise


def test_groups_and_dilation_grouping_is_exact():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 9, 8, 4))
    w = rng.standard_normal((3, 2, 2, 6))
    spec = ConvSpec(stride=(2, 1), padding=((1, 2), (0, 1)), dilation=(2, 3), groups=2)
    result = gradcheck(x, w, rng.standard_normal(6), spec, mode="exhaustive")
    assert result.passed
    assert result.tensors["dx"].checked == x.size


def test_auto_falls_back_to_sample_and_fast(monkeypatch, layer):
    x, w, b = layer
    monkeypatch.setattr(gc, "AUTO_MAX_WORK", 0)
    result = gradcheck(x, w, b, ConvSpec(padding=1), samples=8, probes=2)
    assert result.mode == "sample+fast"
    assert "exhaustive would need" in result.notes[0]
    assert result.tensors["dx"].checked == 8
    assert result.tensors["dx"].probes.checked == 2
    assert result.passed
    monkeypatch.setattr(gc, "AUTO_MAX_WORK", 10**30)
    assert gradcheck(x, w, b, ConvSpec(padding=1)).mode == "exhaustive"


def _clock(step: float):
    """A perf_counter that advances ``step`` seconds per call (0: time stands still)."""
    now = [0.0]

    def perf_counter() -> float:
        now[0] += step
        return now[0]

    return perf_counter


@pytest.mark.parametrize("step", [0.0, 1000.0])
def test_auto_mode_does_not_depend_on_timing(monkeypatch, layer, step):
    x, w, b = layer
    spec = ConvSpec(padding=1)
    monkeypatch.setattr(gc.time, "perf_counter", _clock(step))  # instant, or a very slow machine
    result = gradcheck(x, w, b, spec)
    assert result.mode == "exhaustive"
    geometry = spec.geometry(x.shape, w.shape)
    assert result.forward_passes == exhaustive_passes(geometry, True)  # no timing pass
    assert result.passed


def test_auto_mode_is_chosen_from_sizes(monkeypatch):
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 24, 24, 48))
    w = rng.standard_normal((5, 5, 48, 16))
    spec = ConvSpec(padding=2)
    geometry = spec.geometry(x.shape, w.shape)
    assert exhaustive_passes(geometry, False) > 4000  # far too many for a default check
    monkeypatch.setattr(gc.time, "perf_counter", _clock(0.0))  # "every pass takes no time"
    calls = [0]

    def forward(x_, w_, b_):
        calls[0] += 1
        if calls[0] > 500:
            raise AssertionError("auto started an exhaustive check of a big layer")
        return conv_forward(x_, w_, b_, spec)[0]

    result = gradcheck(x, w, None, spec, samples=4, probes=2, forward=forward)
    assert result.mode == "sample+fast"
    assert "exhaustive would need" in result.notes[0]
    assert result.forward_passes == calls[0] == 2 * 4 * 2 + 2 * 2 * 2
    assert result.passed


def test_tolerance_is_configurable(layer):
    x, w, b = layer
    spec = ConvSpec(padding=1)
    loose = Tolerance(rtol=1e-3)
    broken = _broken(spec, _dw_channel_error(1e-5))
    assert gradcheck(x, w, b, spec, mode="exhaustive", backward=broken, tolerance=loose).passed


def test_progress_is_reported(layer):
    x, w, b = layer
    calls = []
    gradcheck(
        x, w, b, ConvSpec(padding=1), mode="exhaustive", progress=lambda d, t: calls.append((d, t))
    )
    assert calls[-1][0] == calls[-1][1] == len(calls)


@settings(max_examples=40)
@given(case=conv_cases(dtypes=(np.float64,)))
def test_default_tolerances_catch_a_1e5_error_in_one_dw_channel(case):
    x, w, b, spec = case
    channel = w.shape[-1] - 1
    _, cache = conv_forward(x, w, None, spec)
    g = np.random.default_rng(0).standard_normal(cache.geometry.out_shape)
    _, dw, _ = conv_backward(g, cache)
    detectable = np.abs(dw[..., channel]) > 2e-3  # where 1e-5 relative exceeds atol + rtol·|dw|
    result = gradcheck(
        x,
        w,
        _flat_bias(b),
        spec,
        upstream=g,
        mode="exhaustive",
        backward=_broken(spec, _dw_channel_error(1e-5, channel)),
    )
    check = result.tensors["dw"]
    assume(detectable.any())
    assert check.failed[..., channel][detectable].all()
    assert not check.failed[..., :channel].any()
    assert result.passed == (not check.failed.any())


@settings(max_examples=40)
@given(
    case=nd_conv_cases(dtypes=(np.float64,)),
    mode=st.sampled_from(["exhaustive", "sample", "fast"]),
)
def test_every_rank_layout_and_padding_mode_passes(case, mode):
    x, w, b, spec = case
    result = gradcheck(x, w, b, spec, mode=mode, samples=8, probes=3)
    assert result.passed
    assert result.tensors["dx"].shape == x.shape
    if mode == "exhaustive":
        assert result.tensors["dx"].checked == x.size
        geometry = spec.geometry(x.shape, w.shape)
        assert result.forward_passes == exhaustive_passes(geometry, b is not None)


@pytest.mark.parametrize("padding_mode", ["reflect", "replicate", "circular"])
def test_padding_mode_gradient_bug_is_caught(padding_mode):
    """A backward that treats the padding as zeros drops the border gradients."""
    rng = np.random.default_rng(8)
    x, w = rng.standard_normal((2, 6, 5, 2)), rng.standard_normal((3, 3, 2, 3))
    spec = ConvSpec(padding=1, padding_mode=padding_mode)
    zeros = ConvSpec(padding=1)

    def backward(g, x_, w_, b_):
        dx, _, db = conv_backward(g, conv_forward(x_, w_, b_, zeros)[1])
        _, dw, _ = conv_backward(g, conv_forward(x_, w_, b_, spec)[1])
        return dx, dw, db

    result = gradcheck(x, w, None, spec, mode="exhaustive", backward=backward)
    assert not result.tensors["dx"].passed
    assert result.tensors["dw"].passed
    values, _ = result.tensors["dx"].error_map()
    assert values[2:-2, 2:-2].max() < 1e-9  # only pixels copied into the padding are wrong
    assert values.max() > 1e-3


def test_circular_padding_needs_a_longer_period_and_stays_exact():
    spec = ConvSpec(padding=2, padding_mode="circular")
    geometry = spec.geometry((1, 5, 9, 1), (3, 3, 1, 1))
    periods = perturbation_periods(geometry)
    assert periods[0] > 3  # the span alone would put wrapped neighbours in one group
    rng = np.random.default_rng(3)
    result = gradcheck(
        rng.standard_normal((1, 5, 9, 1)),
        rng.standard_normal((3, 3, 1, 1)),
        None,
        spec,
        mode="exhaustive",
    )
    assert result.passed


def test_channels_first_report_uses_the_callers_indices():
    rng = np.random.default_rng(4)
    x, w = rng.standard_normal((2, 3, 6, 6)), rng.standard_normal((4, 3, 3, 3))
    spec = ConvSpec(padding=1, layout="nchw")

    def backward(g, x_, w_, b_):
        dx, dw, db = conv_backward(g, conv_forward(x_, w_, b_, spec)[1])
        dw = dw.copy()
        dw[2] *= 1 + 1e-5  # output channel 2 (first axis of OIHW weights)
        return dx, dw, db

    result = gradcheck(x, w, None, spec, mode="exhaustive", backward=backward)
    dw = result.tensors["dw"]
    assert set(dw.failures_per_channel) == {2}
    assert all(row["index"][0] == 2 for row in dw.worst)


@settings(max_examples=30)
@given(nd_conv_cases(dtypes=(np.float64,)))
def test_periods_are_the_smallest_that_separate_every_outputs_inputs(case):
    # the search perturbation_periods skips for zeros and replicate padding, done in full
    x, w, _, spec = case
    geometry = spec.geometry(x.shape, w.shape)
    for axis, period in enumerate(perturbation_periods(geometry)):
        size = geometry.in_sizes[axis]
        smallest = min(geometry.dilation[axis] * (geometry.kernel[axis] - 1) + 1, size)
        feeds = feeding_inputs(axis, geometry)
        while smallest < size and any(len({i % smallest for i in f}) < len(f) for f in feeds):
            smallest += 1
        assert period == smallest
