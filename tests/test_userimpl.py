"""gradcheck --impl: checking a user's conv_forward / conv_backward, whatever it does."""

import hashlib
import json

import pytest
from typer.testing import CliRunner

from convcli import DataError
from convcli.check.userimpl import SUITE, check_config, load_impl
from convcli.cli import app
from tests.conftest import ROOT

CLASSIC = (ROOT / "sample_data" / "classic_conv.py").read_text(encoding="utf-8")
runner = CliRunner()


def variant(tmp_path, name, old=None, new=None, text=None):
    """Write the classic implementation with one marked line replaced (or ``text``)."""
    source = CLASSIC if text is None else text
    if old is not None:
        assert old in source, old
        source = source.replace(old, new)
    path = tmp_path / f"{name}.py"
    path.write_text(source, encoding="utf-8")
    return path


# one configuration where every bug below shows (stride 2, pad 1, 3 output channels)
ONE = ["--shape", "2,5,5,2", "--kernel", "2", "--cout", "3", "--stride", "2", "--pad", "1"]


def run_impl(path, *args):
    result = runner.invoke(app, ["gradcheck", "--impl", str(path), "--json", *args])
    return result, (json.loads(result.stdout) if result.stdout.strip() else None)


def test_suite_covers_the_hyperparameters():
    assert {c.pad for c in SUITE} == {0, 1, 2}
    assert {c.stride for c in SUITE} == {1, 2, 3}
    assert {c.kernel for c in SUITE} == {(1, 1), (2, 2), (3, 3)}
    assert any(c.shape[1] != c.shape[2] for c in SUITE)
    assert any(c.shape[1] == c.shape[2] for c in SUITE)
    assert {c.n == 1 for c in SUITE} == {True, False}
    assert any(c.cin != c.cout for c in SUITE)
    out_sizes = {c.spec().geometry(c.shape, c.w_shape()).out_sizes for c in SUITE}
    assert (1, 1) in out_sizes


def test_correct_implementation_passes(tmp_path):
    path = variant(tmp_path, "good")
    before = hashlib.sha256(path.read_bytes()).hexdigest()
    result, doc = run_impl(path)
    assert result.exit_code == 0, result.stdout
    assert doc["passed"] is True
    assert len(doc["results"]) == len(SUITE)
    assert all(r["error"] is None for r in doc["results"])
    checks = doc["results"][0]["checks"]
    assert checks["backward_vs_numeric"]["tensors"]["dA_prev"]["passed"] is True
    assert [c["passed"] for c in checks.values()] == [True, True, True]
    assert hashlib.sha256(path.read_bytes()).hexdigest() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["good.py"]  # no __pycache__


BROKEN = {
    "stride ignored in backward": (
        "top = h * stride  # BACKWARD_TOP",
        "top = h  # BACKWARD_TOP",
        "dA_prev wrong at",
    ),
    "padding removed at the wrong offset": (
        "dA_prev = dA_prev_pad[:, pad : pad + A_prev.shape[1], pad : pad + A_prev.shape[2], :]",
        "dA_prev = dA_prev_pad[:, : A_prev.shape[1], : A_prev.shape[2], :]",
        "dA_prev wrong at",
    ),
    "mean instead of sum for db": (
        "db[:, :, :, c] += dZ[i, h, w, c]  # DB",
        "db[:, :, :, c] += dZ[i, h, w, c] / m  # DB",
        "db wrong at",
    ),
    "tiny error in one channel of dW": (
        "dW[:, :, :, c] += patch * dZ[i, h, w, c]  # DW",
        "dW[:, :, :, c] += patch * dZ[i, h, w, c] * (1 + 1e-5 * (c == 1))  # DW",
        "dW wrong at",
    ),
    "forward stride bug": (
        "top = h * stride  # FORWARD_TOP",
        "top = h  # FORWARD_TOP",
        "Z differs from convcli's engine",
    ),
    "backward raises": (
        "    dW = np.zeros(W.shape)\n",
        "    dW = np.zeros(W.shape)\n    raise IndexError('oops')\n",
        "conv_backward raised IndexError: oops (broken.py line {line})",
    ),
    "wrong dW shape": (
        "return dA_prev, dW, db",
        "return dA_prev, dW[..., :-1], db",
        "dW has shape",
    ),
    "NaN in db": ("return dA_prev, dW, db", "return dA_prev, dW, db * np.nan", "db has"),
    "backward returns two values": (
        "return dA_prev, dW, db",
        "return dA_prev, dW",
        "must return a tuple",
    ),
}


@pytest.mark.parametrize("bug", list(BROKEN))
def test_broken_implementations_fail_with_the_cause(tmp_path, bug):
    old, new, cause = BROKEN[bug]
    path = variant(tmp_path, "broken", old, new)
    lines = path.read_text(encoding="utf-8").splitlines()
    if "{line}" in cause:
        cause = cause.format(line=lines.index("    raise IndexError('oops')") + 1)
    result, doc = run_impl(path, *ONE)
    assert result.exit_code == 1, (result.stdout, result.stderr)
    assert doc["passed"] is False
    errors = [r["error"] for r in doc["results"] if r["error"]]
    assert errors, doc
    assert any(cause in error for error in errors), errors
    assert all("\n" not in error for error in errors)


def test_table_names_the_cause(tmp_path):
    old, new, _ = BROKEN["stride ignored in backward"]
    path = variant(tmp_path, "broken", old, new)
    result = runner.invoke(app, ["gradcheck", "--impl", str(path), *ONE])
    assert result.exit_code == 1
    assert "FAIL" in result.stdout
    assert "PASS" in result.stdout  # the forward
    assert "dA_prev wrong at" in result.stdout
    assert "0 of 1 configuration passes" in result.stdout


def test_one_configuration_from_flags(tmp_path):
    result, doc = run_impl(
        variant(tmp_path, "good"),
        "--shape",
        "2,6,5,3",
        "--kernel",
        "3",
        "--cout",
        "4",
        "--stride",
        "2",
        "--pad",
        "1",
    )
    assert result.exit_code == 0
    assert [r["config"] for r in doc["results"]] == [
        {
            "shape": [2, 6, 5, 3],
            "kernel": [3, 3],
            "cout": 4,
            "stride": [2, 2],
            "dilation": [1, 1],
            "groups": 1,
            "padding_mode": "zeros",
            "layout": "nhwc",
            "pad": [[1, 1], [1, 1]],
        }
    ]


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["--shape", "1,5,5,1", "--kernel", "2,3", "--cout", "1"], "square kernels"),
        (["--shape", "1,5,5,1", "--kernel", "3", "--cout", "1", "--dilation", "2"], "--dilation"),
        (["--shape", "1,5,5,1", "--kernel", "3", "--cout", "1", "--pad", "1,2"], "one integer"),
    ],
)
def test_configurations_the_exercise_cannot_express_are_usage_errors(tmp_path, args, match):
    result = runner.invoke(app, ["gradcheck", "--impl", str(variant(tmp_path, "good")), *args])
    assert result.exit_code == 2
    assert match in result.stderr


@pytest.mark.parametrize(
    ("text", "code", "match"),
    [
        ("x = 1\n", 65, "defines no function of a known signature (classic: conv_forward;"),
        (
            "import numpy as np\n\nraise RuntimeError('at import')\n",
            65,
            "RuntimeError: at import (bad.py line 3)",
        ),
        ("def conv_forward(:\n", 65, "SyntaxError"),
    ],
)
def test_unusable_files_are_one_line_errors(tmp_path, text, code, match):
    path = variant(tmp_path, "bad", text=text)
    result = runner.invoke(app, ["gradcheck", "--impl", str(path)])
    assert result.exit_code == code, result.stderr
    assert result.stderr.count("\n") == 1
    assert match in result.stderr
    with pytest.raises(DataError):
        load_impl(path)


def test_missing_impl_file_is_66(tmp_path):
    result = runner.invoke(app, ["gradcheck", "--impl", str(tmp_path / "nope.py")])
    assert result.exit_code == 66
    assert "nope.py" in result.stderr


def test_user_prints_do_not_corrupt_json(tmp_path):
    path = variant(
        tmp_path,
        "chatty",
        "    m, n_H_prev, n_W_prev, _ = A_prev.shape\n",
        "    m, n_H_prev, n_W_prev, _ = A_prev.shape\n    print('hello from forward')\n",
    )
    result, doc = run_impl(path, *ONE)
    assert result.exit_code == 0
    assert doc["passed"] is True


def test_check_config_never_raises_for_user_mistakes(tmp_path):
    impl = load_impl(
        variant(tmp_path, "weird", "return Z, (A_prev, W, b, hparameters)", "return 'Z', None")
    )
    result = check_config(impl, SUITE[1])
    assert not result.passed
    assert "Z is a str" in result.error or "Z has shape" in result.error


def test_sample_mode_checks_sampled_elements_against_central_differences(tmp_path):
    good, args = variant(tmp_path, "good"), [*ONE, "--mode", "sample", "--samples", "7"]
    result, doc = run_impl(good, *args)
    assert result.exit_code == 0, result.stdout
    assert doc["mode"] == "sample"
    numeric = doc["results"][0]["checks"]["backward_vs_numeric"]["tensors"]
    assert {name: t["checked"] for name, t in numeric.items()} == {
        "dA_prev": 7,
        "dW": 7,
        "db": 3,  # all of db: it has 3 elements
    }
    assert doc["results"][0]["forward_passes"] == 2 * (7 + 7 + 3)
    old, new, _ = BROKEN["mean instead of sum for db"]
    result, doc = run_impl(variant(tmp_path, "bad", old, new), *args)
    assert result.exit_code == 1
    numeric = doc["results"][0]["checks"]["backward_vs_numeric"]["tensors"]
    assert numeric["db"]["passed"] is False
    assert numeric["dW"]["passed"] is True
    worst = numeric["db"]["worst"][0]
    assert len(worst["index"]) == 1
    assert worst["expected"] == pytest.approx(2 * worst["yours"], rel=1e-6)  # n = 2


def test_samples_without_sample_mode_is_refused_with_impl(tmp_path):
    result, _ = run_impl(variant(tmp_path, "good"), *ONE, "--samples", "7")
    assert result.exit_code == 2
    assert "--samples" in result.stderr
    result, _ = run_impl(variant(tmp_path, "good"), *ONE, "--mode", "sample", "--samples", "2000")
    assert result.exit_code == 2
    assert "--samples 2000" in result.stderr
    assert "1 to 1,666" in result.stderr
