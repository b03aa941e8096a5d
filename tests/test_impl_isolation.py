"""gradcheck --impl (issue 10, sections 3 and 4): the right function is blamed, and the
user's code runs in a child process that cannot change, stop or corrupt the checker."""

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from convcli.check.userimpl import SUITE
from convcli.cli import app
from convcli.engine.fast import conv_forward
from convcli.run import run_impl_check
from convcli.spec import ConvSpec
from tests.conftest import ROOT

CLASSIC = (ROOT / "sample_data" / "classic_conv.py").read_text(encoding="utf-8")
runner = CliRunner()
# one small stride-2 configuration, so each test starts one child process
ONE = ["--shape", "2,5,5,2", "--kernel", "2", "--cout", "3", "--stride", "2", "--pad", "1"]
FORWARD_START = "    m, n_H_prev, n_W_prev, _ = A_prev.shape\n"
BACKWARD_START = "    A_prev, W, b, hparameters = cache\n"


def variant(tmp_path, replacements, name="impl", prefix=""):
    source = prefix + CLASSIC
    for old, new in replacements:
        assert old in source, old
        source = source.replace(old, new)
    path = tmp_path / f"{name}.py"
    path.write_text(source, encoding="utf-8")
    return path


def run_json(path, *args):
    result = runner.invoke(app, ["gradcheck", "--impl", str(path), "--json", *args])
    assert result.stdout.strip(), (result.exit_code, result.stderr)
    return result, json.loads(result.stdout)


def line_of(path, text):
    return path.read_text(encoding="utf-8").splitlines().index(text) + 1


# ---------------------------------------------------------------------------------------------
# 3. Blame the right function
# ---------------------------------------------------------------------------------------------


def test_numeric_gradients_are_the_true_central_differences_of_any_forward():
    """Grouping is driven by the measured dependencies, so a forward that is not a
    convolution (wrong stride, and one output that reads every input) still gets the
    element-by-element central differences."""
    from convcli.check.numgrad import numeric_gradients  # the module this issue adds

    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 5, 4, 2))
    w = rng.standard_normal((2, 2, 2, 3))
    b = rng.standard_normal(3)
    spec = ConvSpec(stride=2, padding=1)
    z_shape = conv_forward(x, w, b, spec)[0].shape

    def forward(x_, w_, b_):
        z = conv_forward(x_, w_, b_, ConvSpec(stride=1, padding=1))[0][:, : z_shape[1], :3]
        z = z.copy()
        z[0, 0, 0, 1] += np.sin(x_).sum() + w_[0, 0, 0, 2] * b_[0]
        return z

    g = rng.standard_normal(z_shape)
    numeric = numeric_gradients(forward, x, w, b, g, eps=1e-3)
    for name, array in (("dx", x), ("dw", w), ("db", b)):
        expected = np.zeros_like(array)
        for index in np.ndindex(array.shape):
            plus, minus = [x.copy(), w.copy(), b.copy()], [x.copy(), w.copy(), b.copy()]
            position = ("dx", "dw", "db").index(name)
            plus[position][index] += 1e-3
            minus[position][index] -= 1e-3
            expected[index] = np.vdot(forward(*plus) - forward(*minus), g) / 2e-3
        np.testing.assert_allclose(getattr(numeric, name), expected, rtol=1e-12, atol=1e-12)
    assert numeric.forward_passes < 2 * (x.size + w.size + b.size) + 40


def test_forward_and_backward_sharing_a_stride_bug_blame_the_forward(tmp_path):
    path = variant(
        tmp_path,
        [
            ("top = h * stride  # FORWARD_TOP", "top = h  # FORWARD_TOP"),
            ("top = h * stride  # BACKWARD_TOP", "top = h  # BACKWARD_TOP"),
            ("left = w * stride", "left = w"),
        ],
    )
    result, doc = run_json(path, *ONE)
    assert result.exit_code == 1
    (entry,) = doc["results"]
    checks = entry["checks"]
    assert set(checks) == {"forward_vs_engine", "backward_vs_numeric", "backward_vs_engine"}
    assert checks["forward_vs_engine"]["passed"] is False
    assert checks["backward_vs_numeric"]["passed"] is True  # never an invented numeric value
    assert checks["backward_vs_engine"]["passed"] is False
    assert set(checks["backward_vs_numeric"]["tensors"]) == {"dA_prev", "dW", "db"}
    assert "numerically" not in entry["error"]
    assert entry["diagnosis"].startswith("conv_forward is wrong (Z differs from the engine at ")
    assert entry["diagnosis"].endswith("conv_backward is the exact gradient of your conv_forward")


def test_correct_implementation_has_three_passing_verdicts(tmp_path):
    result, doc = run_json(variant(tmp_path, []), *ONE)
    assert result.exit_code == 0
    (entry,) = doc["results"]
    assert [check["passed"] for check in entry["checks"].values()] == [True, True, True]
    assert entry["diagnosis"] == "conv_forward and conv_backward are right"
    assert set(entry["checks"]["forward_vs_engine"]["tensors"]) == {"Z"}


def test_dw_wrong_in_one_output_channel_is_located_there(tmp_path):
    path = variant(
        tmp_path,
        [
            (
                "dW[:, :, :, c] += patch * dZ[i, h, w, c]  # DW",
                "dW[:, :, :, c] += patch * dZ[i, h, w, c] * (1 + (c == 2))  # DW",
            )
        ],
    )
    result, doc = run_json(path, *ONE)
    assert result.exit_code == 1
    dw = doc["results"][0]["checks"]["backward_vs_numeric"]["tensors"]["dW"]
    assert dw["passed"] is False
    assert set(dw["failures_per_channel"]) == {"2"}
    assert "output channel 2" in dw["where"]
    assert "conv_backward is wrong" in doc["results"][0]["diagnosis"]


def test_da_prev_wrong_in_one_output_channels_contribution_names_that_channel(tmp_path):
    path = variant(
        tmp_path,
        [
            (
                "W[:, :, :, c] * dZ[i, h, w, c]\n",
                "W[:, :, :, c] * dZ[i, h, w, c] * (1 + 0.5 * (c == 1))\n",
            )
        ],
    )
    result, doc = run_json(path, *ONE)
    assert result.exit_code == 1
    entry = doc["results"][0]
    da = entry["checks"]["backward_vs_numeric"]["tensors"]["dA_prev"]
    assert da["passed"] is False
    assert "the contribution of output channel 1 is wrong" in da["where"]
    assert "output channel 1" in entry["diagnosis"]
    table = runner.invoke(app, ["gradcheck", "--impl", str(path), *ONE])
    assert "the contribution of output channel 1 is wrong" in " ".join(table.stdout.split())


# ---------------------------------------------------------------------------------------------
# 4. User code runs apart from the checker
# ---------------------------------------------------------------------------------------------

ESCAPES = {
    "exit()": ("    exit()\n", "SystemExit"),
    "sys.exit(0)": ("    import sys\n    sys.exit(0)\n", "SystemExit"),
    "os._exit(0)": ("    import os\n    os._exit(0)\n", "os._exit(0)"),
    "KeyboardInterrupt": ("    raise KeyboardInterrupt\n", "KeyboardInterrupt"),
    "GeneratorExit": ("    raise GeneratorExit\n", "GeneratorExit"),
    "MemoryError": ("    raise MemoryError\n", "MemoryError"),
    "segfault": ("    import ctypes\n    ctypes.string_at(0)\n", "crashed (SIGSEGV)"),
}


@pytest.mark.parametrize("escape", list(ESCAPES))
def test_user_code_that_ends_the_process_fails_its_configuration(tmp_path, escape):
    code, reason = ESCAPES[escape]
    path = variant(tmp_path, [(BACKWARD_START, BACKWARD_START + code)])
    result, doc = run_json(path, *ONE)
    assert result.exit_code == 1, result.stderr
    (entry,) = doc["results"]
    assert entry["passed"] is False
    assert reason in entry["error"]
    line = line_of(path, code.splitlines()[-1])
    assert "conv_backward" in entry["error"]
    assert f"impl.py line {line}" in entry["error"], entry["error"]
    assert entry["checks"]["forward_vs_engine"]["passed"] is True
    assert entry["checks"]["backward_vs_engine"]["passed"] is None


def test_hanging_code_times_out_and_the_suite_goes_on(tmp_path):
    hang = "    if A_prev.shape[0] == 1:\n        import time\n        time.sleep(60)\n"
    path = variant(tmp_path, [(FORWARD_START, FORWARD_START + hang)])
    run = run_impl_check(path, SUITE[:3], timeout=1.5)  # SUITE[0] has one image
    first, *others = run.impl_results
    assert not first.passed
    line = line_of(path, "        time.sleep(60)")
    assert first.error == f"conv_forward timed out after 1.5 s (impl.py line {line})"
    assert [result.passed for result in others] == [True, True]
    result = runner.invoke(app, ["gradcheck", "--impl", str(path), *ONE, "--timeout", "10"])
    assert result.exit_code == 0  # two images: no hang


def test_max_memory_limits_the_child(tmp_path):
    grab = "    big = np.ones(60_000_000)\n"
    path = variant(tmp_path, [(FORWARD_START, FORWARD_START + grab)])
    result, doc = run_json(path, *ONE, "--max-memory", "100M")
    assert result.exit_code == 1
    assert "MemoryError" in doc["results"][0]["error"]


def test_monkeypatching_numpy_in_the_user_file_cannot_change_the_verdict(tmp_path):
    abs_before = np.abs
    path = variant(
        tmp_path,
        [("top = h * stride  # BACKWARD_TOP", "top = h  # BACKWARD_TOP")],
        prefix="import numpy\nnumpy.abs = lambda a, *args, **kwargs: a * 0.0\n",
    )
    result, doc = run_json(path)
    assert np.abs is abs_before
    assert result.exit_code == 1
    # the bug shows wherever the stride is > 1 and there is more than one output row
    rows = [c.spec().geometry(c.shape, c.w_shape()).out_sizes[0] for c in SUITE]
    expected = [not (c.stride > 1 and r > 1) for c, r in zip(SUITE, rows, strict=True)]
    assert [r["passed"] for r in doc["results"]] == expected
    assert expected.count(False) >= 5


def test_what_user_code_prints_is_captured_under_its_configuration(tmp_path):
    chatty = (
        "    print('hello from forward')\n    import sys\n    print('to stderr', file=sys.stderr)\n"
    )
    path = variant(tmp_path, [(FORWARD_START, FORWARD_START + chatty)])
    result, doc = run_json(path, *ONE)
    assert result.exit_code == 0
    output = doc["results"][0]["output"]
    assert "hello from forward" in output
    assert "to stderr" in output
    assert "hello" not in result.stderr
    table = runner.invoke(app, ["gradcheck", "--impl", str(path), *ONE])
    assert "hello from forward" in table.stdout


def test_long_output_is_truncated(tmp_path):
    chatty = "    print('x' * 100_000)\n"
    path = variant(tmp_path, [(FORWARD_START, FORWARD_START + chatty)])
    _, doc = run_json(path, *ONE)
    output = doc["results"][0]["output"]
    assert len(output) < 5000
    assert "truncated" in output


def test_timeout_goes_with_impl():
    result = runner.invoke(
        app, ["gradcheck", "--shape", "1,4,4,1", "--kernel", "2", "--cout", "1", "--timeout", "3"]
    )
    assert result.exit_code == 2
    assert "--timeout goes with --impl" in result.stderr


@pytest.mark.parametrize("bad_timeout", ["inf", "nan", "0", "-1"])
def test_timeout_must_be_a_positive_number_of_seconds(bad_timeout):
    result = runner.invoke(
        app,
        [
            "gradcheck",
            "--impl",
            str(ROOT / "sample_data" / "classic_conv.py"),
            *ONE,
            "--timeout",
            bad_timeout,
        ],
    )
    assert result.exit_code == 2, result.stderr
    assert "--timeout" in result.stderr
    assert "Traceback" not in result.stderr


# ---------------------------------------------------------------------------------------------
# What the user's code returns is taken at face value only when it can be
# ---------------------------------------------------------------------------------------------


def test_a_backward_that_keeps_state_between_calls_fails(tmp_path):
    """A dW accumulator kept at module level is right on the first call only."""
    path = variant(
        tmp_path,
        [("    dW = np.zeros(W.shape)\n", "    dW = _KEPT.setdefault('dW', np.zeros(W.shape))\n")],
        prefix="_KEPT = {}\n",
    )
    result, doc = run_json(path, *ONE)
    assert result.exit_code == 1
    (entry,) = doc["results"]
    assert entry["passed"] is False
    assert "conv_backward returned different dW when called again" in entry["error"]
    assert entry["diagnosis"].startswith("conv_backward is not repeatable")


@pytest.mark.parametrize(
    ("returned", "message"),
    [
        ("dA_prev + 1j", "dA_prev is an array of complex128, not an array of real numbers"),
        ("dA_prev > 0", "dA_prev is an array of bool, not an array of real numbers"),
        ("None", "dA_prev is None, not an array of real numbers"),
    ],
)
def test_values_that_are_not_real_numbers_are_refused(tmp_path, returned, message):
    path = variant(tmp_path, [("    return dA_prev, dW, db", f"    return {returned}, dW, db")])
    result, doc = run_json(path, *ONE)
    assert result.exit_code == 1
    assert message in doc["results"][0]["error"]


def test_a_float32_forward_is_not_checked_against_noisy_differences(tmp_path):
    """Central differences of float32 values are rounding noise at eps = 1e-3: the numeric
    verdict is null with the reason, not a FAIL that contradicts the engine checks."""
    path = variant(
        tmp_path, [("    return Z, (A_prev", "    return Z.astype(np.float32), (A_prev")]
    )
    result, doc = run_json(path, *ONE)
    (entry,) = doc["results"]
    numeric = entry["checks"]["backward_vs_numeric"]
    assert numeric["passed"] is None
    assert "conv_forward returns float32 Z" in numeric["reason"]
    assert entry["checks"]["backward_vs_engine"]["passed"] is True
    assert "float32" in entry["diagnosis"]
    assert result.exit_code == 1  # a check that could not run is not a pass


def test_an_interrupted_suite_leaves_no_child_process(monkeypatch):
    """The next configuration's child is launched ahead of time; an interrupt (here from the
    progress callback) must still stop and reap every child started."""
    from convcli.check import userproc
    from convcli.check.adapters import ADAPTERS, Binding
    from convcli.check.userimpl import UserImpl, check_impl

    started = []
    launch = userproc.UserProcess.launch

    def recording_launch(self):
        if self not in started:  # start() calls launch() again; that launches nothing
            started.append(self)
        launch(self)

    monkeypatch.setattr(userproc.UserProcess, "launch", recording_launch)

    def progress(done, total):
        if done == 2:
            raise KeyboardInterrupt

    classic = Binding(ADAPTERS["classic"], "conv_forward", "conv_backward")
    impl = UserImpl(path=ROOT / "sample_data" / "classic_conv.py", binding=classic)
    with pytest.raises(KeyboardInterrupt):
        check_impl(impl, SUITE[:4], progress=progress)
    assert len(started) == 3  # configurations 1 and 2, and 3 launched ahead
    assert all(process._process is None for process in started)


def test_a_failure_of_the_checker_after_the_users_function_returned_is_not_blamed_on_it(
    tmp_path,
):
    """conv_forward returned; the child's own code then failed (here because the file broke a
    NumPy function the checker uses, with no frame of the file in the traceback): an internal
    error (exit 70) that says what may have caused it, not "conv_forward raised"."""
    path = variant(tmp_path, [], prefix="import numpy\nnumpy.array_equal = None\n")
    result = runner.invoke(app, ["gradcheck", "--impl", str(path), *ONE])
    assert result.exit_code == 70, (result.exit_code, result.stderr)
    assert "conv_forward raised" not in result.stderr
    assert "after conv_forward returned" in result.stderr
    assert "impl_worker.py line" in result.stderr
    assert "if impl.py changes NumPy or Python itself, that is the cause" in result.stderr


def test_users_code_called_by_the_checker_is_still_blamed_on_the_user(tmp_path):
    """A NumPy function the file replaced raises inside the checker's own call: the user's
    line is named, and the configuration fails (exit 1), as for any error in their code."""
    patch = (
        "import numpy\n"
        "def _broken(*args, **kwargs):\n"
        "    raise ValueError('patched')\n"
        "numpy.array_equal = _broken\n"
    )
    path = variant(tmp_path, [], prefix=patch)
    result, doc = run_json(path, *ONE)
    assert result.exit_code == 1
    (entry,) = doc["results"]
    assert "ValueError: patched (impl.py line 3)" in entry["error"], entry["error"]
    assert "after conv_forward returned" in entry["error"]
    assert not entry["error"].startswith("conv_forward raised")
