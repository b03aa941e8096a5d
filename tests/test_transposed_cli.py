"""Transposed layers in compare, plan, generate, sweep tables, --impl and memory estimates."""

import json

import numpy as np
import pytest
from hypothesis import given, settings
from typer.testing import CliRunner

from convcli import ConvSpec, conv_backward, conv_forward
from convcli.cli import app
from convcli.engine.fast import scratch_bytes
from convcli.memory import in_memory_run_needs, nbytes
from convcli.plan import StackPlan, plan_layer, plan_stack
from tests.strategies import transposed_cases

runner = CliRunner()
FLAGS = ["--transposed", "--stride", "2", "--pad", "1", "--output-padding", "1"]


def _cli(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_generate_plan_and_compare_take_the_flags(tmp_path):
    result = _cli(
        "generate", tmp_path / "t.npz", "--shape", "1,4,4,2", "--kernel", "3", "--cout", "3",
        *FLAGS, "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    with np.load(tmp_path / "t.npz") as saved:
        assert int(saved["transposed"]) == 1
        assert saved["w"].shape == (3, 3, 3, 2)  # (*kernel, Cout/groups, Cin)
        x, w, b = saved["x"], saved["w"], saved["b"]
    spec = ConvSpec(stride=2, padding=1, output_padding=1, transposed=True)
    z, cache = conv_forward(x, w, b, spec)
    assert z.shape == (1, 8, 8, 3)
    dx, dw, db = conv_backward(z, cache)
    np.savez(tmp_path / "yours.npz", z=z, dx=dx, dw=dw, db=db)
    result = _cli("compare", tmp_path / "t.npz", "--expect", tmp_path / "yours.npz", "--json")
    assert result.exit_code == 0, result.stderr
    # the flags win over the file: with output_padding 0 the saved z is of another shape
    result = _cli(
        "compare", tmp_path / "t.npz", "--expect", tmp_path / "yours.npz", "--output-padding", "0"
    )
    assert result.exit_code == 1
    assert "z equals convcli's with output_padding 1 instead of 0" in result.stdout
    result = _cli("plan", "--shape", "1,4,4,2", "--kernel", "3", "--cout", "3", *FLAGS, "--json")
    assert result.exit_code == 0, result.stderr
    planned = json.loads(result.stdout)["layers"][0]
    assert planned["shapes"]["z"] == [1, 8, 8, 3]
    assert planned["shapes"]["w"] == [3, 3, 3, 2]
    assert planned["hparams"]["transposed"] == 1


def test_impl_refuses_a_data_file_of_a_transposed_layer(tmp_path):
    impl = tmp_path / "mine.py"
    impl.write_text("def conv_forward(x, w, b, stride, pad):\n    return x\n")
    rng = np.random.default_rng(0)
    np.savez(
        tmp_path / "t.npz",
        x=rng.standard_normal((1, 3, 3, 2)),
        w=rng.standard_normal((3, 3, 2, 2)),
        transposed=1,
        stride=2,
    )
    result = _cli("gradcheck", "--impl", impl, tmp_path / "t.npz")
    assert result.exit_code == 65, result.stderr
    assert "transposed" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_sweep_table_marks_transposed_layers(tmp_path):
    spec_file = tmp_path / "s.toml"
    spec_file.write_text(
        "[defaults]\nshape = [1, 3, 3, 2]\nkernel = 3\ncout = 2\nstride = 2\n"
        "[grid]\ntransposed = [0, 1]\n"
    )
    result = _cli("sweep", spec_file, "--out", tmp_path / "r.jsonl")
    assert result.exit_code == 0, result.stderr
    header = next(line for line in result.stdout.splitlines() if "kernel" in line)
    assert header.split()[-6:-4] == ["T", "dtype"]
    rows = [line.split() for line in result.stdout.splitlines() if line.strip()[:1] in "12"]
    assert [row[8] for row in rows[:2]] == ["float64", "T"]


# -- plan ----------------------------------------------------------------------------------------


def test_plan_of_a_transposed_layer_by_hand():
    # x (2, 5, 5, 4) -> z (2, 10, 10, 6): kernel 4, stride 2, padding 1 (DCGAN's doubling)
    spec = ConvSpec(stride=2, padding=1, transposed=True)
    plan = plan_layer((2, 5, 5, 4), (4, 4, 6, 4), spec, bias=True)
    assert plan.shapes["z"] == (2, 10, 10, 6)
    # every input pixel times every tap times every output channel: 2·25·4 · 16 · 6
    assert plan.macs.forward == 2 * 25 * 4 * 16 * 6 == 19200
    assert plan.bias_adds == 2 * 100 * 6
    assert plan.weights == 4 * 4 * 6 * 4
    # one output sees ceil(4 / 2) = 2 inputs per axis; every input is used, every output fed
    assert plan.receptive_field == (2, 2)
    assert plan.unread_pixels == 0
    assert plan.unreached_pixels == 0


def test_plan_counts_outputs_no_input_reaches():
    # kernel 2 < stride 3: of every 3 outputs one gets only the bias; output_padding 2 adds two
    spec = ConvSpec(stride=3, output_padding=2, transposed=True)
    plan = plan_layer((1, 4, 1), (2, 1, 1), spec)
    assert plan.shapes["z"] == (1, 13, 1)  # 3·3 + 1 + 2 + 1
    axis = plan.axes[0]
    # reached: 0,1 3,4 6,7 9,10; not: 2 5 8 11 12
    assert axis.unreached == 5
    assert plan.unreached_pixels == 5
    assert axis.unread == 0
    # a long axis counts the same way, in time independent of its length
    big = plan_layer((1, 10**9, 1), (2, 1, 1), spec).axes[0]
    assert big.out == 3 * 10**9 + 1
    assert big.unreached == (10**9 - 1) + 2
    # cropping: padding 2,2 keeps uncropped positions 2..8 of 0..10
    cropped = plan_layer(
        (1, 4, 1), (2, 1, 1), ConvSpec(stride=3, padding=((2, 2),), transposed=True)
    )
    assert cropped.axes[0].out == 7
    assert cropped.axes[0].unread == 2  # inputs 0 (to 0,1) and 3 (to 9,10) are cropped whole


def test_plan_of_a_decoder_stack(tmp_path):
    stack = tmp_path / "dec.toml"
    stack.write_text(
        "[[layers]]\nshape = [1, 16, 16, 3]\nkernel = 3\ncout = 8\nstride = 2\npad = 1\n"
        "[[layers]]\nkernel = 3\ncout = 4\nstride = 2\npad = 1\ntransposed = 1\n"
        "output_padding = 1\n"
    )
    plans = plan_stack(stack)
    first, second = plans.layers
    assert first.plan.shapes["z"] == (1, 8, 8, 8)
    assert second.plan.shapes["z"] == (1, 16, 16, 4)
    assert first.receptive_field == (3, 3)
    assert first.jump == (2, 2)
    # the transposed layer: ceil(3/2) = 2 of its inputs per output, 2 input pixels apart
    assert second.receptive_field == (5, 5)
    assert second.jump == (1, 1)  # the jump divides by the stride
    assert second.plan.macs.forward == 64 * 8 * 9 * 4
    result = _cli("plan", "--stack", stack, "--json")
    assert result.exit_code == 0, result.stderr
    totals = json.loads(result.stdout)["totals"]
    assert totals["receptive_field"] == [5, 5]
    assert totals["macs"]["forward"] == 64 * 9 * 3 * 8 + 64 * 8 * 9 * 4
    assert _cli("plan", "--stack", stack).exit_code == 0


def test_stack_jump_below_one_pixel():
    plans = [plan_layer((1, 4, 1), (2, 1, 1), ConvSpec(stride=2, transposed=True))] * 2
    layers = StackPlan.of(plans).layers
    assert [layer.jump for layer in layers] == [(0.5,), (0.25,)]
    assert [layer.receptive_field for layer in layers] == [(1,), (1,)]


def test_plan_table_names_unreached_outputs():
    result = _cli(
        "plan", "--shape", "1,4,1", "--kernel", "2", "--cout", "1", "--transposed",
        "--stride", "3", "--output-padding", "2",
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    assert "no input reaches: 5 of 13 output pixels" in result.stdout


# -- memory ----------------------------------------------------------------------------------------


def test_memory_estimate_counts_the_extended_input_copy():
    spec = ConvSpec(stride=2, dilation=3, output_padding=2, transposed=True)
    geometry = spec.geometry((2, 5, 5, 3), (2, 2, 4, 3))
    # output_padding 2 >= stride 2: the adjoint reads one more row and column of x
    assert geometry.adjoint().out_sizes == (6, 6)
    needs = in_memory_run_needs(
        geometry, np.dtype(np.float64), input_bytes=0, scratch=0, backward=False
    )
    assert needs["copy of x"] == nbytes((2, 6, 6, 3), np.float64)
    plain = ConvSpec(stride=2, output_padding=1, transposed=True).geometry(
        (2, 5, 5, 3), (2, 2, 4, 3)
    )
    assert "copy of x" not in in_memory_run_needs(
        plain, np.dtype(np.float64), input_bytes=0, scratch=0, backward=True
    )
    assert scratch_bytes(geometry, np.dtype(np.float64), 1 << 20) > 0


@settings(max_examples=25)
@given(transposed_cases(dtypes=(np.float64,)))
def test_planned_transposed_layers_match_the_engine(case):
    x, w, _, spec = case
    plan = plan_layer(x.shape, w.shape, spec, bias=False)
    z, cache = conv_forward(np.ones_like(x), np.abs(w) + 0.5, None, spec)
    assert plan.shapes["z"] == z.shape
    channel_axis = 1 if spec.layout == "nchw" else -1
    # with positive operands z is positive exactly where some input reaches
    reached = (z > 0).any(axis=(0, channel_axis))
    assert reached.size - reached.sum() == plan.unreached_pixels
    # and dx (for dz = 1) positive exactly where an input is used
    dx, _, _ = conv_backward(np.ones_like(z), cache)
    used = (dx > 0).any(axis=(0, channel_axis))
    assert used.size - used.sum() == plan.unread_pixels


@pytest.mark.parametrize(
    ("size", "kernel", "stride", "dilation", "padding", "output_padding"),
    [
        (101, 2, 3, 1, 0, 2),
        (150, 3, 5, 2, ((4, 1),), 1),
        (97, 1, 4, 1, 2, 3),
        (120, 4, 7, 3, 5, 6),
        (500, 3, 2, 1, ((1, 400),), 1),
        (400, 2, 1, 5, ((300, 2),), 4),
    ],
)
def test_unreached_outputs_of_long_axes_match_the_engine(
    size, kernel, stride, dilation, padding, output_padding
):
    spec = ConvSpec(
        stride=stride, dilation=dilation, padding=padding, output_padding=output_padding,
        transposed=True,
    )  # fmt: skip
    (axis,) = plan_layer((1, size, 1), (kernel, 1, 1), spec, bias=False).axes
    z, _ = conv_forward(np.ones((1, size, 1)), np.ones((kernel, 1, 1)), None, spec)
    assert axis.out == z.shape[1]
    assert axis.unreached == int((z[0, :, 0] == 0).sum())


def test_gradcheck_streamed_blocks_and_plan_count_the_copy_too():
    from convcli.memory import block_bytes, gradcheck_needs

    spec = ConvSpec(stride=2, dilation=3, output_padding=2, transposed=True)
    geometry = spec.geometry((2, 5, 5, 3), (2, 2, 4, 3))
    plain = ConvSpec(stride=2, dilation=3, output_padding=1, transposed=True).geometry(
        (2, 5, 5, 3), (2, 2, 4, 3)
    )
    assert gradcheck_needs(geometry, input_bytes=0, scratch=0)["copy of x"] == 2 * 36 * 3 * 8
    assert "copy of x" not in gradcheck_needs(plain, input_bytes=0, scratch=0)
    grown = block_bytes(geometry, np.float64, 1, False) - block_bytes(plain, np.float64, 1, False)
    # z is one row and column longer too (14 vs 13 per axis, 4 channels), plus the copy
    assert grown == (14 * 14 * 4 - 13 * 13 * 4 + 36 * 3) * 8
    planned = plan_layer((2, 5, 5, 3), (2, 2, 4, 3), spec)
    assert planned.needs["forward"]["copy of x"] == 2 * 36 * 3 * 8
    assert planned.needs["gradcheck"]["copy of x"] == 2 * 36 * 3 * 8
