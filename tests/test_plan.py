"""``convcli plan``: a layer's shapes, costs and memory from shapes alone, checked by hand and
against the engine."""

import json

import h5py
import numpy as np
import pytest
from hypothesis import given, settings
from typer.testing import CliRunner

from convcli import ConvSpec, conv_backward, conv_forward
from convcli.check import gradcheck
from convcli.cli import app
from convcli.errors import HyperparameterError, MemoryLimitError
from convcli.io import loading
from convcli.plan import layer_shapes, plan_file, plan_layer, plan_stack
from convcli.run import RunInputs, RunOptions, run_backward, run_forward, run_gradcheck
from convcli.sweep.schema import SpecError
from convcli.versioning import SCHEMA_VERSION
from tests.conftest import SAMPLE_H5, SAMPLE_NPZ
from tests.strategies import nd_conv_cases

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def plan_of(shape, kernel, cout, bias=True, **hparams):
    spec = ConvSpec(**hparams)
    x_shape, w_shape = layer_shapes(shape, kernel, cout, spec)
    return plan_layer(x_shape, w_shape, spec, bias=bias)


# -- hand-computed layers ---------------------------------------------------------------------


def test_cifar_layer_counts_by_hand():
    plan = plan_of((1, 32, 32, 3), (3, 3), 16, padding=1)
    assert plan.shapes == {
        "x": (1, 32, 32, 3),
        "w": (3, 3, 3, 16),
        "b": (16,),
        "z": (1, 32, 32, 16),
    }
    assert plan.macs.forward == 32 * 32 * 16 * 3 * 3 * 3 == 442368
    assert plan.macs.backward_dx == plan.macs.backward_dw == 442368
    assert plan.flops.forward == 884736
    assert plan.flops.total == 3 * 884736
    assert plan.bias_adds == 32 * 32 * 16
    assert (plan.weights, plan.biases, plan.parameters) == (432, 16, 448)
    assert [a.padding for a in plan.axes] == [(1, 1), (1, 1)]
    assert plan.receptive_field == (3, 3)
    assert plan.unread_pixels == 0
    assert plan.tensors == {"x": 32 * 32 * 3 * 8, "w": 432 * 8, "b": 16 * 8, "z": 32 * 32 * 16 * 8}


def test_without_bias_no_bias_parameters_or_adds():
    plan = plan_of((1, 32, 32, 3), (3, 3), 16, bias=False, padding=1)
    assert (plan.parameters, plan.biases, plan.bias_adds) == (432, 0, 0)
    assert "b" not in plan.shapes


def test_stride_larger_than_kernel_leaves_gaps():
    # 8 positions, kernel 2, stride 3: outputs read 0,1 | 3,4 | 6,7; 2 and 5 are never read
    plan = plan_of((1, 8, 8, 1), (2, 2), 1, stride=3)
    assert plan.shapes["z"] == (1, 3, 3, 1)
    for axis in plan.axes:
        assert (axis.unread, axis.unread_gaps, axis.unread_border) == (2, 2, 0)
    assert plan.input_pixels == 64
    assert plan.unread_pixels == 64 - 6 * 6 == 28


def test_valid_padding_drops_a_border():
    # 7 positions, kernel 2, stride 2, no padding: outputs read 0..5; 6 is never read
    plan = plan_of((1, 7, 3), (2,), 1, stride=2, padding="valid")
    assert plan.shapes["z"] == (1, 3, 1)
    (axis,) = plan.axes
    assert (axis.unread, axis.unread_gaps, axis.unread_border) == (1, 0, 1)
    assert plan.unread_pixels == 1


def test_same_with_even_kernel_pads_more_after():
    plan = plan_of((1, 5, 5, 1), (4, 2), 1, padding="same")
    assert [a.padding for a in plan.axes] == [(1, 2), (0, 1)]
    assert plan.shapes["z"] == (1, 5, 5, 1)
    strided = plan_of((1, 5, 1), (2,), 1, padding="same", stride=2)
    assert strided.axes[0].padding == (0, 1)
    assert strided.shapes["z"] == (1, 3, 1)


def test_dilation_widens_the_receptive_field():
    plan = plan_of((1, 9, 9, 2), (3, 3), 4, dilation=2)
    assert [a.effective_kernel for a in plan.axes] == [5, 5]
    assert plan.receptive_field == (5, 5)
    assert plan.shapes["z"] == (1, 5, 5, 4)
    assert plan.macs.forward == 5 * 5 * 4 * 3 * 3 * 2  # taps, not the span


def test_groups_divide_the_work_and_weights():
    plan = plan_of((2, 6, 6, 4), (3, 3), 8, groups=4, padding=1)
    assert plan.shapes["w"] == (3, 3, 1, 8)
    assert plan.weights == 3 * 3 * 1 * 8
    assert plan.macs.forward == 2 * 6 * 6 * 8 * 3 * 3 * 1


def test_channels_first_shapes():
    plan = plan_of((2, 10, 3), (3,), 6, padding="same", layout="nchw")
    assert plan.shapes == {"x": (2, 3, 10), "w": (6, 3, 3), "b": (6,), "z": (2, 6, 10)}


def test_bad_layer_is_the_engines_error():
    with pytest.raises(HyperparameterError, match="spans 5"):
        plan_of((1, 4, 1), (3,), 1, dilation=2)


def test_gradcheck_passes_and_memory_are_the_runs_own():
    spec = ConvSpec(stride=2, padding=1)
    rng = np.random.default_rng(0)
    x, w, b = rng.standard_normal((2, 5, 6, 3)), rng.standard_normal((3, 2, 3, 4)), np.zeros(4)
    plan = plan_layer(x.shape, w.shape, spec)
    assert plan.gradcheck_passes == gradcheck(x, w, b, spec, mode="exhaustive").forward_passes
    assert plan.gradcheck_passes == 2 * (3 * 2 * 3 + 3 * 2 * 3 + 1)  # periods = spans 3x2
    inputs = RunInputs(x=x, w=w, b=b)
    for command, call in (("forward", run_forward), ("backward", run_backward)):
        with pytest.raises(MemoryLimitError) as caught:
            call(inputs, spec, RunOptions(max_memory=1))
        assert caught.value.needs == plan.needs[command]
    with pytest.raises(MemoryLimitError) as caught:
        run_gradcheck(inputs, spec, max_memory=1)
    assert caught.value.needs == plan.needs["gradcheck"]


def test_sample_file_from_headers_only():
    plan = plan_file(SAMPLE_H5, {}, {})
    assert plan.shapes["z"] == (10, 4, 4, 8)
    assert [a.padding for a in plan.axes] == [(2, 2), (2, 2)]
    assert plan.gradcheck_passes == 50  # as `convcli gradcheck` on this file reports
    assert plan.bias_adds == 10 * 4 * 4 * 8
    flagged = plan_file(SAMPLE_NPZ, {}, {"stride": "1", "padding": "same"})
    assert flagged.shapes["z"] == (10, 4, 4, 8)
    assert [a.padding for a in flagged.axes] == [(0, 1), (0, 1)]


def test_huge_file_is_planned_without_reading(tmp_path, monkeypatch):
    path = tmp_path / "huge.h5"
    with h5py.File(path, "w") as f:  # declares 1.2 TB, stores nothing: never written
        f.create_dataset("x", shape=(100_000, 1024, 1024, 3), dtype="f4", chunks=(1, 64, 64, 3))
        f.create_dataset("w", shape=(3, 3, 3, 64), dtype="f4", chunks=True)
        f.attrs["stride"] = 2
        f.attrs["pad"] = "same"

    def refuse(*args, **kwargs):
        raise AssertionError("plan read tensor data")

    monkeypatch.setattr(loading.tensorfile.TensorFile, "read", refuse)
    plan = plan_file(path, {}, {})
    assert plan.shapes["z"] == (100_000, 512, 512, 64)
    assert plan.dtype == "float32"
    assert not plan.bias
    assert plan.macs.forward == 100_000 * 512 * 512 * 64 * 27
    assert plan.tensors["x"] == 100_000 * 1024 * 1024 * 3 * 4


def test_a_state_dicts_layer_from_headers(tmp_path):
    # PyTorch names: w and b found by the layer's name, layout nchw implied, as forward does
    path = tmp_path / "state.npz"
    np.savez(
        path,
        x=np.zeros((2, 3, 8, 8)),
        **{
            "conv1.weight": np.zeros((5, 3, 3, 3), np.float32),
            "conv1.bias": np.zeros(5, np.float32),
            "conv2.weight": np.zeros((4, 3, 1, 1), np.float32),
        },
    )
    plan = plan_file(path, {}, {"padding": "1"}, layer="conv1")
    assert plan.shapes == {"x": (2, 3, 8, 8), "w": (5, 3, 3, 3), "b": (5,), "z": (2, 5, 8, 8)}
    assert plan.geometry.layout == "nchw"
    plan = plan_file(path, {}, {}, layer="conv2")
    assert (plan.shapes["z"], plan.bias) == ((2, 4, 8, 8), False)
    result = run("plan", path)
    assert result.exit_code == 65
    assert "conv1" in result.stderr
    assert "conv2" in result.stderr
    result = run("plan", path, "--layer", "conv2", "--json")
    assert json.loads(result.stdout)["layers"][0]["shapes"]["w"] == [4, 3, 1, 1]


# -- stacks -----------------------------------------------------------------------------------

STACK = """\
[defaults]
dtype = "float32"

[[layers]]              # 32x32x3 -> 32x32x8
shape = [1, 32, 32, 3]
kernel = 3
cout = 8
pad = 1

[[layers]]              # -> 16x16x16
kernel = 3
cout = 16
stride = 2
pad = 1

[[layers]]              # dilated: span 5
kernel = 3
cout = 16
dilation = 2
pad = 2

[[layers]]              # pointwise, strided -> 8x8x16
kernel = 1
cout = 16
stride = 2
"""


def test_stack_receptive_field_and_jump_by_hand(tmp_path):
    path = tmp_path / "net.toml"
    path.write_text(STACK)
    stack = plan_stack(path)
    assert [layer.plan.shapes["z"] for layer in stack.layers] == [
        (1, 32, 32, 8),
        (1, 16, 16, 16),
        (1, 16, 16, 16),
        (1, 8, 8, 16),
    ]
    # r_l = r_(l-1) + (span_l - 1) * j_(l-1), j_l = j_(l-1) * s_l
    assert [layer.receptive_field for layer in stack.layers] == [(3, 3), (5, 5), (13, 13), (13, 13)]
    assert [layer.jump for layer in stack.layers] == [(1, 1), (2, 2), (2, 2), (4, 4)]
    assert [layer.plan.parameters for layer in stack.layers] == [224, 1168, 2320, 272]
    assert stack.parameters == 3984
    assert stack.macs.forward == (
        32 * 32 * 8 * 27 + 16 * 16 * 16 * 72 + 16 * 16 * 16 * 144 + 8 * 8 * 16 * 16
    )
    assert stack.flops.forward == 2 * stack.macs.forward
    assert all(layer.plan.dtype == "float32" for layer in stack.layers)


def test_stack_errors_name_the_line(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text(STACK.replace("cout = 16\nstride = 2\npad = 1", "cout = 16\nstride = 0"))
    with pytest.raises(SpecError, match=r"line 1[0-9] \(\[\[layers\]\] table 2, key 'stride'\)"):
        plan_stack(path)
    path.write_text(STACK.replace("kernel = 1\n", "kernel = 1\nshape = [1, 9, 9, 16]\n"))
    with pytest.raises(SpecError, match=r"table 4.*1, 16, 16, 16"):
        plan_stack(path)
    path.write_text("[[layers]]\nkernel = 3\ncout = 2\n")
    with pytest.raises(SpecError, match="shape"):
        plan_stack(path)


# -- against the engine -----------------------------------------------------------------------


@settings(max_examples=25)
@given(nd_conv_cases(dtypes=(np.float64,)))
def test_planned_shapes_and_unread_pixels_match_the_engine(case):
    x, w, b, spec = case
    plan = plan_layer(x.shape, w.shape, spec, bias=b is not None)
    z, cache = conv_forward(x, np.abs(w) + 0.5, b, spec)
    assert plan.shapes["z"] == z.shape
    assert plan.shapes["x"] == x.shape
    assert plan.shapes["w"] == w.shape
    # with positive weights and dz = 1, dx is positive exactly where an input is read
    dx, _, _ = conv_backward(np.ones_like(z), cache)
    read = dx > 0
    channel_axis = 1 if spec.layout == "nchw" else -1
    pixels = read.any(axis=(0, channel_axis))
    assert pixels.size - pixels.sum() == plan.unread_pixels


@pytest.mark.parametrize("mode", ["zeros", "replicate", "reflect"])
@pytest.mark.parametrize(
    ("size", "kernel", "stride", "dilation", "padding"),
    [
        (101, 2, 3, 1, 0),
        (150, 3, 5, 2, ((4, 1),)),
        (97, 1, 4, 1, "same"),
        (120, 4, 7, 3, 2),
        (64, 5, 2, 1, "valid"),
    ],
)
def test_unread_pixels_of_long_axes_match_the_engine(mode, size, kernel, stride, dilation, padding):
    # long enough that the middle of the axis is counted by periods of the stride
    spec = ConvSpec(stride=stride, dilation=dilation, padding=padding, padding_mode=mode)
    plan = plan_layer((1, size, 1), (kernel, 1, 1), spec, bias=False)
    z, cache = conv_forward(np.ones((1, size, 1)), np.ones((kernel, 1, 1)), None, spec)
    dx, _, _ = conv_backward(np.ones_like(z), cache)
    read = np.flatnonzero(dx[0, :, 0] > 0)
    (axis,) = plan.axes
    assert axis.unread == size - read.size
    assert axis.unread_border == read[0] + size - 1 - read[-1]


# -- the command ------------------------------------------------------------------------------


def test_cli_table():
    result = run("plan", "--shape", "1,32,32,3", "--kernel", "3", "--cout", "16", "--pad", "1")
    assert result.exit_code == 0, result.stderr
    for text in ("442,368", "884,736", "(1, 32, 32, 16)", "448", "MACs", "FLOPs", "1+1"):
        assert text in result.stdout


def test_cli_json_keys():
    result = run("plan", "--shape", "2,8,8,3", "--kernel", "2", "--cout", "4", "--stride", "3")
    assert result.exit_code == 0, result.stderr
    result = run(
        "plan", "--shape", "2,8,8,3", "--kernel", "2", "--cout", "4", "--stride", "3", "--json"
    )
    doc = json.loads(result.stdout)
    assert doc["schema_version"] == SCHEMA_VERSION
    assert doc["command"] == "plan"
    assert set(doc) >= {"layers", "totals", "source"}
    (layer,) = doc["layers"]
    assert set(layer) >= {
        "shapes",
        "hparams",
        "dtype",
        "axes",
        "parameters",
        "macs",
        "flops",
        "bias_adds",
        "receptive_field",
        "jump",
        "unread_pixels",
        "input_pixels",
        "memory",
        "gradcheck",
    }
    assert layer["shapes"]["z"] == [2, 3, 3, 4]
    assert layer["unread_pixels"] == 28
    assert layer["axes"][0] == {
        "axis": "h",
        "size": 8,
        "kernel": 2,
        "effective_kernel": 2,
        "stride": 3,
        "dilation": 1,
        "padding": [0, 0],
        "out": 3,
        "unread": 2,
        "unread_border": 0,
        "unread_gaps": 2,
    }
    assert layer["flops"]["forward"] == 2 * layer["macs"]["forward"]
    assert set(layer["memory"]) == {"tensors", "workspace", "forward", "backward", "gradcheck"}
    assert set(layer["gradcheck"]) == {"exhaustive_passes", "auto_mode"}
    assert doc["totals"]["parameters"] == layer["parameters"]["total"]


def test_cli_data_file_and_stack(tmp_path):
    result = run("plan", SAMPLE_H5, "--json")
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["layers"][0]["gradcheck"]["exhaustive_passes"] == 50
    assert doc["source"] == str(SAMPLE_H5)
    result = run("plan", "--x", f"{SAMPLE_NPZ}:A_prev", "--w", f"{SAMPLE_NPZ}:W", "--json")
    doc = json.loads(result.stdout)
    assert doc["source"] == f"--x {SAMPLE_NPZ}:A_prev --w {SAMPLE_NPZ}:W"
    assert not doc["layers"][0]["bias"]  # no b given
    assert doc["layers"][0]["shapes"]["z"] == [10, 4, 4, 8]  # stride, pad of the file x is in
    path = tmp_path / "net.toml"
    path.write_text(STACK)
    result = run("plan", "--stack", path)
    assert result.exit_code == 0, result.stderr
    assert "13x13" in result.stdout
    assert "3,984" in result.stdout
    doc = json.loads(run("plan", "--stack", path, "--json").stdout)
    assert [layer["jump"] for layer in doc["layers"]] == [[1, 1], [2, 2], [2, 2], [4, 4]]


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((), "give --shape"),
        (("--shape", "1,8,8,3", "--kernel", "3", "--cout", "2", "--stack", "x.toml"), "one of"),
        (("--shape", "1,8,8,3"), "--kernel and --cout"),
        ((SAMPLE_H5, "--no-bias"), "go with --shape"),
        ((SAMPLE_H5, "--shape", "1,8,8,3", "--kernel", "3", "--cout", "2"), "one of"),
    ],
)
def test_cli_usage_errors(args, match):
    result = run("plan", *args)
    assert result.exit_code == 2, (result.stdout, result.stderr)
    assert match in result.stderr
    assert "Traceback" not in result.stderr
