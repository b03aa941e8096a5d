"""`convcli compare`: saved results against convcli's, the tolerance rule and the diagnosis.

Each usual mistake is made on purpose (with convcli's engine on an altered layer, or by the
mistake's own arithmetic) and must be named; correct results, float64 and float32, pass and
are never given a diagnosis.
"""

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from convcli import ConvSpec, conv_backward, conv_forward
from convcli.check.tolerance import accumulation_tolerance
from convcli.cli import app
from convcli.compare import run_compare
from convcli.engine.operands import w_from_last, w_to_last, x_from_last, x_to_last
from convcli.engine.reference import conv_backward_reference, conv_forward_reference
from convcli.errors import DataError, DtypeError
from convcli.run import RunInputs

runner = CliRunner()
SPEC = ConvSpec(padding=1)


def _layer(layout="nhwc", kernel=(3, 3), seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2, 6, 5, 3))
    w = rng.standard_normal((*kernel, 3, 4))
    b = rng.standard_normal(4)
    return x_from_last(x, layout), w_from_last(w, layout), b


def _results(x, w, b, spec, dz=None):
    z, cache = conv_forward(x, w, b, spec)
    dx, dw, db = conv_backward(z if dz is None else dz, cache)
    if db is None:
        db = np.zeros(4)
    return {"z": z, "dx": dx, "dw": dw, "db": db}


def _compare(results, x, w, b, spec=SPEC, **options):
    return run_compare(RunInputs.of({"x": x, "w": w, "b": b}), results, spec, **options)


def _named(name, value, x, w, b, spec=SPEC):
    """The first diagnosis key for ``value`` given as the user's ``name``."""
    run = _compare({name: value}, x, w, b, spec)
    tensor = run.tensors[name]
    assert not tensor.passed
    assert tensor.diagnosis is not None
    return tensor.diagnosis.matches[0] if tensor.diagnosis.matches else None


# -- correct results pass, with no diagnosis -------------------------------------------------


@pytest.mark.parametrize("layout", ["nhwc", "nchw"])
def test_correct_float64_results_pass_without_diagnosis(layout):
    x, w, b = _layer(layout)
    spec = ConvSpec(padding=1, layout=layout)
    run = _compare(_results(x, w, b, spec), x, w, b, spec)
    assert run.passed
    assert all(t.diagnosis is None for t in run.tensors.values())
    assert "½‖z‖²" in run.upstream


@pytest.mark.parametrize(
    ("forward", "backward"),
    [(conv_forward, conv_backward), (conv_forward_reference, conv_backward_reference)],
)
def test_float32_results_of_a_correct_computation_pass(forward, backward):
    """Engine and plain-loop reference in float32: other rounding, other summation order."""
    x, w, b = (a.astype(np.float32) for a in _layer())
    z, cache = forward(x, w, b, SPEC)
    dx, dw, db = backward(z, cache)
    run = _compare({"z": z, "dx": dx, "dw": dw, "db": db}, x, w, b)
    assert run.passed, {n: t.check.max_rel_err for n, t in run.tensors.items()}
    assert {t.dtype for t in run.tensors.values()} == {"float32"}


def test_float32_naive_summation_in_the_worst_order_passes():
    """Plain left-to-right float32 sums of the products: far from pairwise summation."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((1, 4, 4, 64)).astype(np.float32)
    w = rng.standard_normal((3, 3, 64, 2)).astype(np.float32)
    z = np.zeros((1, 2, 2, 2), np.float32)
    for i in range(2):
        for j in range(2):
            for o in range(2):
                total = np.float32(0)
                for term in (x[0, i : i + 3, j : j + 3, :] * w[..., o]).ravel():
                    total = np.float32(total + term)
                z[0, i, j, o] = total
    run = run_compare(RunInputs.of({"x": x, "w": w}), {"z": z}, ConvSpec())
    assert run.passed


def test_a_relative_error_of_1e4_in_one_channel_fails():
    x, w, b = (a.astype(np.float32) for a in _layer())
    z = conv_forward(x, w, b, SPEC)[0]
    z[..., 2] *= np.float32(1 + 1e-4)
    run = _compare({"z": z}, x, w, b)
    check = run.tensors["z"].check
    assert not check.passed
    assert set(check.failures_per_channel) == {2}
    assert run.tensors["z"].diagnosis.matches == ()
    assert "none of the" in run.tensors["z"].diagnosis.sentence


def test_tolerance_grows_with_the_reduction_and_the_dtype():
    small = accumulation_tolerance(np.float32, 9)
    large = accumulation_tolerance(np.float32, 900)
    assert large.rtol == pytest.approx(10 * small.rtol)
    assert accumulation_tolerance(np.float64, 9).rtol < 1e-14
    assert accumulation_tolerance(np.float32, 9, rtol=0.5).rtol == 0.5


def test_only_the_failing_tensor_is_diagnosed():
    x, w, b = _layer()
    results = _results(x, w, b, SPEC)
    results["dw"] = results["dw"] / 2
    run = _compare(results, x, w, b)
    assert run.tensors["z"].diagnosis is None
    assert run.tensors["dw"].diagnosis.matches[0] == "dw divided by the batch size"


# -- each mistake is named ---------------------------------------------------------------------


def test_flipped_kernel_is_named_for_z_dx_and_dw():
    x, w, b = _layer()
    made = _results(x, np.flip(w, (0, 1)), b, SPEC)
    assert _named("z", made["z"], x, w, b) == "kernel flipped"
    assert _named("dx", made["dx"], x, w, b) == "kernel flipped"
    assert _named("dw", np.flip(made["dw"], (0, 1)), x, w, b) == "kernel flipped"
    run = _compare({"z": made["z"]}, x, w, b)
    assert "true convolution instead of cross-correlation" in run.tensors["z"].diagnosis.sentence


def test_kernel_axes_swapped_is_named():
    x, w, b = _layer()
    z = conv_forward(x, np.swapaxes(w, 0, 1), b, SPEC)[0]
    assert _named("z", z, x, w, b) == "kernel axes swapped"
    x, w, b = _layer(kernel=(3, 2))
    made = _results(x, np.swapaxes(w, 0, 1), b, SPEC)
    assert _named("z", made["z"], x, w, b) == "kernel axes swapped"
    assert _named("dw", np.swapaxes(made["dw"], 0, 1), x, w, b) == "kernel axes swapped"


def test_weights_reshaped_from_the_other_layout_are_named():
    x, w, b = _layer()
    reread = w_to_last(w.reshape(4, 3, 3, 3), "nchw")
    assert _named("z", conv_forward(x, reread, b, SPEC)[0], x, w, b) == (
        "weights read in the other layout"
    )


def test_data_reshaped_from_the_other_layout_is_named():
    x, w, b = _layer()
    reread = x_to_last(x.reshape(2, 3, 6, 5), "nchw")
    assert _named("z", conv_forward(reread, w, b, SPEC)[0], x, w, b) == (
        "data read in the other layout"
    )


def test_results_in_the_other_layout_are_named():
    x, w, b = _layer()
    ours = _results(x, w, b, SPEC)
    assert _named("z", x_from_last(ours["z"], "nchw"), x, w, b) == "z in the other layout"
    assert _named("dw", w_from_last(ours["dw"], "nchw"), x, w, b) == "dw in the other layout"


def test_padding_off_by_one_says_it_plainly():
    x, w, b = _layer()
    z = conv_forward(x, w, b, ConvSpec(padding=0))[0]
    run = _compare({"z": z}, x, w, b)
    assert run.tensors["z"].diagnosis.sentence == "z equals convcli's with padding 0 instead of 1"
    assert _named("z", conv_forward(x, w, b, ConvSpec(padding=((1, 2), (1, 2))))[0], x, w, b) == (
        "padding 1,2,1,2"
    )


def test_same_padding_on_the_wrong_side_is_named():
    x, w, b = _layer(kernel=(2, 2))
    spec = ConvSpec(padding="same")
    lower = conv_forward(x, w, b, ConvSpec(padding=((1, 0), (1, 0))))[0]
    run = _compare({"z": lower}, x, w, b, spec)
    assert run.tensors["z"].diagnosis.matches[0] == "padding 1,0,1,0"
    assert "SAME_LOWER" in run.tensors["z"].diagnosis.sentence


def test_same_lower_and_upper_mixed_up_are_named_by_their_names():
    x, w, b = _layer(kernel=(2, 2))
    upper = conv_forward(x, w, b, ConvSpec(padding="same"))[0]
    run = _compare({"z": upper}, x, w, b, ConvSpec(padding="same_lower"))
    assert run.tensors["z"].diagnosis.sentence.startswith(
        "z equals convcli's with padding 0,1,0,1 ('same', SAME_UPPER: the extra pixel last) "
        "instead of 'same_lower'"
    )


def test_other_stride_and_dilation_are_named():
    x, w, b = _layer()
    z = conv_forward(x, w, b, ConvSpec(padding=1, stride=2))[0]
    assert _named("z", z, x, w, b) == "stride 2"
    dx = _results(x, w, b, ConvSpec(padding=1, dilation=2))["dx"]
    assert _named("dx", dx, x, w, b) == "dilation 2"


def test_bias_missing_or_added_twice_is_named():
    x, w, b = _layer()
    assert _named("z", conv_forward(x, w, None, SPEC)[0], x, w, b) == "bias missing"
    assert _named("z", conv_forward(x, w, 2 * b, SPEC)[0], x, w, b) == "bias added twice"


def test_batch_means_and_wrong_sums_of_dw_and_db_are_named():
    x, w, b = _layer()
    ours = _results(x, w, b, SPEC)
    z = ours["z"]
    assert _named("db", ours["db"] / 2, x, w, b) == "db divided by the batch size"
    assert _named("db", ours["db"] / z[..., 0].size, x, w, b) == "db averaged"
    assert _named("db", z[0].sum(axis=(0, 1)), x, w, b) == "db of the first image only"
    assert _named("db", z.sum(axis=(0, 1, 3))[:4], x, w, b) is None  # not a sum over an axis
    assert _named("dw", ours["dw"] / 2, x, w, b) == "dw divided by the batch size"
    first = _results(x[:1], w, b, SPEC)["dw"]
    assert _named("dw", first, x, w, b) == "dw of the first image only"


def test_db_summed_over_the_wrong_axis_is_named():
    x, w, b = _layer()
    x = x[:, :, :4]  # W = 4 = Cout after the padded 3x3 convolution
    z = conv_forward(x, w, b, SPEC)[0]
    assert _named("db", z.sum(axis=(0, 1, 3)), x, w, b) == "db summed over the wrong axis (2)"


def test_dw_summed_over_the_wrong_axis_is_named():
    x, w, b = _layer()
    ours = _results(x, w, b, SPEC)
    # every output channel's dw made with dz summed over the output channels
    g = np.broadcast_to(ours["z"].sum(axis=-1, keepdims=True), ours["z"].shape)
    _, cache = conv_forward(x, w, b, SPEC)
    wrong = conv_backward(np.ascontiguousarray(g), cache)[1]
    assert _named("dw", wrong, x, w, b) == "dw summed over the wrong axis (output channels)"
    # im2col: (Cout, kh·kw·Cin) product reshaped to (kh, kw, Cin, Cout) without transposing
    gemm = ours["dw"].reshape(-1, 4).T.reshape(ours["dw"].shape)
    assert _named("dw", gemm, x, w, b) == "dw from the transposed product"


def test_another_stride_or_dilation_on_one_axis_is_named():
    x, w, b = _layer()
    x = np.concatenate([x, x], axis=2)  # W = 10
    z = conv_forward(x, w, b, ConvSpec(padding=1, stride=(1, 2)))[0]
    run = _compare({"z": z}, x, w, b)
    assert run.tensors["z"].diagnosis.matches[0] == "stride 1,2"
    assert run.tensors["z"].diagnosis.sentence == "z equals convcli's with stride 1,2 instead of 1"
    spec = ConvSpec(padding=2, dilation=2)
    dx = _results(x, w, b, ConvSpec(padding=2, dilation=(2, 1)))["dx"]
    assert _named("dx", dx, x, w, b, spec) == "dilation 2,1"


def test_dx_left_padded_or_cropped_off_by_one_is_named():
    x, w, b = _layer()
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    full = _results(padded, w, b, ConvSpec())["dx"]
    assert _named("dx", full, x, w, b) == "dx not cropped"
    assert _named("dx", full[:, 2:8, 2:7], x, w, b) == "dx cropped +1"
    assert _named("dx", full[:, 0:6, 0:5], x, w, b) == "dx cropped -1"


def test_channels_first_and_one_dimensional_layers_are_diagnosed():
    x, w, b = _layer("nchw")
    spec = ConvSpec(padding=1, layout="nchw")
    z = conv_forward(x, np.flip(w, (2, 3)), b, spec)[0]
    assert _named("z", z, x, w, b, spec) == "kernel flipped"
    assert _named("z", x_to_last(conv_forward(x, w, b, spec)[0], "nchw"), x, w, b, spec) == (
        "z in the other layout"
    )
    rng = np.random.default_rng(1)
    x1, w1 = rng.standard_normal((2, 9, 3)), rng.standard_normal((3, 3, 2))
    spec1 = ConvSpec(padding=2)
    z1 = conv_forward(x1, w1, None, ConvSpec(padding=1))[0]
    run = run_compare(RunInputs.of({"x": x1, "w": w1}), {"z": z1}, spec1)
    assert run.tensors["z"].diagnosis.sentence == "z equals convcli's with padding 1 instead of 2"


def test_a_wrong_shape_fails_and_is_diagnosed_not_refused():
    x, w, b = _layer()
    run = _compare({"z": conv_forward(x, w, b, ConvSpec())[0]}, x, w, b)
    assert run.tensors["z"].check.checked == 0
    assert run.tensors["z"].shape == (2, 4, 3, 4)


# -- transposed convolutions ----------------------------------------------------------------------

TSPEC = ConvSpec(stride=2, padding=1, output_padding=1, transposed=True)


def _square_layer(seed=3):
    """x (2, 4, 4, 3), w (3, 3, 3, 3) and b (3,): a convolution and a transposed one alike."""
    rng = np.random.default_rng(seed)
    return (
        rng.standard_normal((2, 4, 4, 3)),
        rng.standard_normal((3, 3, 3, 3)),
        rng.standard_normal(3),
    )


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_correct_transposed_results_pass_without_diagnosis(dtype):
    x, w, b = (a.astype(dtype) for a in _square_layer())
    z, cache = conv_forward(x, w, b, TSPEC)
    dx, dw, db = conv_backward(z, cache)
    assert z.shape == (2, 8, 8, 3)
    run = _compare({"z": z, "dx": dx, "dw": dw, "db": db}, x, w, b, TSPEC)
    assert run.passed, {n: t.check.max_rel_err for n, t in run.tensors.items()}
    assert all(t.diagnosis is None for t in run.tensors.values())


def test_transposed_result_for_a_convolution_is_named():
    x, w, b = _square_layer()
    spec = ConvSpec(stride=2, padding=1)
    z = conv_forward(x, w, b, ConvSpec(stride=2, padding=1, transposed=True))[0]
    assert z.shape == (2, 7, 7, 3)  # not the convolution's (2, 2, 2, 3)
    assert _named("z", z, x, w, b, spec) == "transposed convolution"
    run = _compare({"z": z}, x, w, b, spec)
    assert "transposed convolution" in run.tensors["z"].diagnosis.sentence


def test_convolution_result_for_a_transposed_layer_is_named():
    x, w, b = _square_layer()
    z, cache = conv_forward(x, w, b, ConvSpec(stride=2, padding=1))
    assert _named("z", z, x, w, b, TSPEC) == "not transposed"
    # the same layer's gradients, with dz = z of the convolution, name it too
    _, dw, _ = conv_backward(z, cache)
    assert _named("dw", dw, x, w, b, TSPEC) == "not transposed"


def test_other_output_padding_is_named():
    x, w, b = _square_layer()
    z = conv_forward(x, w, b, ConvSpec(stride=2, padding=1, transposed=True))[0]
    assert _named("z", z, x, w, b, TSPEC) == "output_padding 0"
    run = _compare({"z": z}, x, w, b, TSPEC)
    assert run.tensors["z"].diagnosis.sentence.startswith(
        "z equals convcli's with output_padding 0 instead of 1"
    )
    wide = ConvSpec(stride=(2, 3), padding=1, output_padding=(1, 0), transposed=True)
    z = conv_forward(
        x, w, b, ConvSpec(stride=(2, 3), padding=1, output_padding=(1, 2), transposed=True)
    )[0]
    assert _named("z", z, x, w, b, wide) == "output_padding 1,2"


def test_transposed_reduction_counts_the_taps_that_land():
    from convcli.compare import reduction_size

    # kernel 3, stride 2: one output gets ceil(3 / 2) = 2 taps per axis; kernel 4, dilation 2,
    # stride 4: taps land 2 apart modulo 4, so 2 of 4 per position
    geometry = TSPEC.geometry((2, 4, 4, 3), (3, 3, 5, 3))
    assert reduction_size("z", geometry, True) == 2 * 2 * 3 + 1
    assert reduction_size("dx", geometry, True) == 3 * 3 * 5
    assert reduction_size("dw", geometry, True) == 2 * 4 * 4  # n · input pixels
    assert reduction_size("db", geometry, True) == 2 * 8 * 8  # n · output pixels
    spread = ConvSpec(stride=4, dilation=2, transposed=True).geometry((1, 5, 2), (4, 1, 2))
    assert reduction_size("z", spread, False) == 2 * 2


def test_no_result_and_bad_dtypes_are_refused():
    x, w, b = _layer()
    with pytest.raises(DataError, match=r"z \(z, Z, y, out, output\)") as caught:
        _compare({}, x, w, b)
    assert caught.value.param == "z"
    with pytest.raises(DtypeError, match="float32 or float64") as caught:
        _compare({"dw": np.ones((3, 3, 3, 4), np.int64)}, x, w, b)
    assert caught.value.param == "dw"


# -- the command line --------------------------------------------------------------------------


def _files(tmp_path, **results):
    x, w, b = _layer()
    layer = tmp_path / "layer.npz"
    np.savez(layer, x=x, w=w, b=b, pad=1)
    yours = tmp_path / "yours.npz"
    np.savez(yours, **results)
    return layer, yours, _results(x, w, b, SPEC)


def run(*args):
    return runner.invoke(app, ["compare", *(str(a) for a in args)])


def test_cli_aliases_in_expect_file_pass_with_exit_0(tmp_path):
    x, w, b = _layer()
    ours = _results(x, w, b, SPEC)
    layer, yours, _ = _files(
        tmp_path,
        y=ours["z"].astype(np.float32),
        grad_input=ours["dx"],
        grad_weight=ours["dw"],
        grad_bias=ours["db"],
    )
    result = run(layer, "--expect", yours)
    assert result.exit_code == 0, result.stderr
    assert "PASS: every tensor matches convcli's" in result.stdout
    assert "yours.npz" not in result.stderr


def test_cli_results_in_the_data_file_and_overrides(tmp_path):
    x, w, b = _layer()
    ours = _results(x, w, b, SPEC)
    layer = tmp_path / "all.npz"
    np.savez(layer, x=x, w=w, b=b, pad=1, out=ours["z"], dA_prev=ours["dx"], dW=ours["dw"] / 2)
    result = run(layer, "--json")
    assert result.exit_code == 1
    doc = json.loads(result.stdout)
    assert list(doc["tensors"]) == ["z", "dx", "dw"]
    assert doc["tensors"]["dw"]["diagnosis"]["matches"][0] == "dw divided by the batch size"
    other = tmp_path / "dw.npy"
    np.save(other, ours["dw"])
    assert run(layer, "--dw", other).exit_code == 0


def test_cli_json_has_gradcheck_tensor_entries(tmp_path):
    x, w, b = _layer()
    ours = _results(x, w, b, SPEC)
    z0 = conv_forward(x, w, b, ConvSpec())[0]
    layer, yours, _ = _files(tmp_path, z=z0, dw=ours["dw"])
    result = run(layer, "--expect", yours, "--json")
    assert result.exit_code == 1
    doc = json.loads(result.stdout)
    gradcheck = runner.invoke(app, ["gradcheck", str(layer), "--mode", "exhaustive", "--json"])
    entry = json.loads(gradcheck.stdout)["results"][0]["tensors"]["dw"]
    assert set(entry) <= set(doc["tensors"]["dw"])
    assert doc["passed"] is False
    assert doc["tensors"]["dw"]["passed"] is True
    assert doc["tensors"]["dw"]["diagnosis"] is None
    assert doc["tensors"]["z"]["diagnosis"]["sentence"] == (
        "z equals convcli's with padding 0 instead of 1"
    )
    assert doc["upstream"].startswith("dz = z")


def test_cli_table_names_the_mistake_and_draws_the_error(tmp_path):
    x, w, b = _layer()
    ours = _results(x, w, b, SPEC)
    layer, yours, _ = _files(tmp_path, db=ours["db"], z=conv_forward(x, w, None, SPEC)[0])
    result = run(layer, "--expect", yours)
    assert result.exit_code == 1
    assert "diagnosis: z equals convcli's without the bias" in result.stdout
    assert "|error| of z over (H, W)" in result.stdout
    assert "FAIL: z differ" in result.stdout


def test_cli_rtol_override_and_errors(tmp_path):
    x, w, b = _layer()
    ours = _results(x, w, b, SPEC)
    layer, yours, _ = _files(tmp_path, z=ours["z"] * (1 + 1e-6))
    assert run(layer, "--expect", yours).exit_code == 1
    assert run(layer, "--expect", yours, "--rtol", "1e-5").exit_code == 0
    nothing = tmp_path / "nothing.npz"
    np.savez(nothing, other=np.ones(3))
    result = run(layer, "--expect", nothing)
    assert result.exit_code == 65
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "looked for z (z, Z, y, out, output); dx (dx, dA_prev, grad_input)" in lines[0]
    assert "--expect FILE" in lines[0]
    assert "--z FILE:KEY" in lines[0]
    ints = tmp_path / "ints.npz"
    np.savez(ints, z=np.ones(ours["z"].shape, np.int32))
    result = run(layer, "--expect", ints)
    assert result.exit_code == 65
    assert "--z is int32" in result.stderr


def test_readme_failing_transcript_is_real_output(monkeypatch):
    """The README's failing example (a ``console`` block: it exits 1, so test_readme skips it)."""
    import re
    import shlex

    from tests.conftest import ROOT
    from tests.test_readme import _normalised

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    blocks = [
        b
        for b in re.findall(r"```console\n(.*?)```", readme, flags=re.DOTALL)
        if b.startswith("$ convcli compare ")
    ]
    assert blocks
    for variable in ("COLUMNS", "FORCE_COLOR", "TERM"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.chdir(ROOT)
    for block in blocks:
        command, *expected = block.rstrip("\n").splitlines()
        result = runner.invoke(app, shlex.split(command)[2:])
        assert result.exit_code == 1, result.stderr
        assert _normalised(result.stdout.rstrip("\n").splitlines()) == _normalised(expected)


def test_diagnosis_work_is_bounded(monkeypatch):
    from convcli.check import diagnosis

    x, w, b = _layer()
    z = conv_forward(x, w, None, SPEC)[0]
    monkeypatch.setattr(diagnosis, "MAX_WORK", 1)
    found = _compare({"z": z}, x, w, b).tensors["z"].diagnosis
    assert found.tried == 0
    assert "too large" in found.sentence
    monkeypatch.setattr(
        diagnosis,
        "MAX_WORK",
        4 * 3 * diagnosis.forward_multiply_adds(SPEC.geometry(x.shape, w.shape)),
    )
    assert _compare({"z": z}, x, w, b).tensors["z"].diagnosis.tried == 3
