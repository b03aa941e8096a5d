"""gradcheck --impl for every common signature: classic, cs231n and callable (issue 13).

Library-level tests check a few small configurations (each costs a child process); only a
handful of runs go through the CLI.
"""

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from convcli import DataError, UsageError
from convcli.check.adapters import ADAPTERS, callable_adapter
from convcli.check.userimpl import (
    EXTRA,
    Config,
    check_impl,
    load_impl,
    suite_for,
)
from convcli.cli import app
from tests.conftest import ROOT

runner = CliRunner()

# -- implementations written for these tests, one per signature -------------------------------

# the bundled CS231n-style implementation (the README's transcript runs it too)
CS231N = (ROOT / "sample_data" / "cs231n_conv.py").read_text(encoding="utf-8")

# any rank, channels last, with every hyperparameter keyword
CALLABLE = """
import numpy as np


def _setup(x, w, stride, padding, dilation):
    r = x.ndim - 2
    k = w.shape[:r]
    pads = []
    for i in range(r):
        size, span = x.shape[1 + i], dilation * (k[i] - 1) + 1
        if padding == "valid":
            pads.append((0, 0))
        elif padding == "same":
            total = max((-(-size // stride) - 1) * stride + span - size, 0)
            pads.append((total // 2, total - total // 2))
        else:
            pads.append((padding, padding))
    xp = np.pad(x, [(0, 0), *pads, (0, 0)])
    out = [(xp.shape[1 + i] - dilation * (k[i] - 1) - 1) // stride + 1 for i in range(r)]
    return xp, k, out, pads


def _window(tap, out, stride, dilation):
    return (slice(None),) + tuple(
        slice(t * dilation, t * dilation + stride * (o - 1) + 1, stride) for t, o in zip(tap, out)
    )


def forward(x, w, b, *, stride=1, padding=0, dilation=1, groups=1):
    xp, k, out, pads = _setup(x, w, stride, padding, dilation)
    cin, cout = w.shape[-2], w.shape[-1]
    co = cout // groups
    z = np.zeros((x.shape[0], *out, cout))
    for tap in np.ndindex(*k):
        patch = xp[_window(tap, out, stride, dilation)]
        for g in range(groups):
            z[..., g * co : (g + 1) * co] += (
                patch[..., g * cin : (g + 1) * cin] @ w[tap][:, g * co : (g + 1) * co]
            )
    return WRAP(z + b)


def backward(dz, x, w, b, *, stride=1, padding=0, dilation=1, groups=1):
    xp, k, out, pads = _setup(x, w, stride, padding, dilation)
    cin, cout = w.shape[-2], w.shape[-1]
    co = cout // groups
    dxp, dw = np.zeros_like(xp), np.zeros_like(w)
    for tap in np.ndindex(*k):
        window = _window(tap, out, stride, dilation)
        patch = xp[window]
        for g in range(groups):
            i, o = slice(g * cin, (g + 1) * cin), slice(g * co, (g + 1) * co)
            dw[tap][:, o] += patch[..., i].reshape(-1, cin).T @ dz[..., o].reshape(-1, co)
            dxp[window][..., i] += dz[..., o] @ w[tap][:, o].T
    inner = (slice(None),) + tuple(slice(p[0], p[0] + s) for p, s in zip(pads, x.shape[1:-1]))
    db = dz.sum(axis=tuple(range(dz.ndim - 1)))
    return WRAP(dxp[inner]), WRAP(dw), WRAP(db)


WRAP = np.asarray
"""

# framework-like results: objects that are not ndarrays but convert through __array__
TENSOR = """

class Tensor:
    def __init__(self, data):
        self._data = data

    def __array__(self, dtype=None, copy=None):
        return self._data if dtype is None else self._data.astype(dtype)


WRAP = Tensor
"""


def write(tmp_path, name, text, old=None, new=None):
    if old is not None:
        assert old in text, old
        text = text.replace(old, new)
    path = tmp_path / f"{name}.py"
    path.write_text(text, encoding="utf-8")
    return path


SMALL_2D = (
    Config(shape=(2, 5, 4, 2), kernel=(3, 3), cout=3, stride=2, pad=1),
    Config(shape=(1, 4, 5, 2), kernel=(2, 3), cout=2, stride=1, pad=0),
)


def verdicts(results):
    return [r.passed for r in results]


# -- detection ---------------------------------------------------------------------------------


def test_signatures_are_detected_from_the_names_a_file_defines(tmp_path):
    impl = load_impl(write(tmp_path, "cs", CS231N))
    assert impl.binding.adapter.name == "cs231n"
    assert (impl.binding.forward, impl.binding.backward) == (
        "conv_forward_naive",
        "conv_backward_naive",
    )
    fast = CS231N.replace("_naive", "_fast")
    assert load_impl(write(tmp_path, "fast", fast)).binding.forward == "conv_forward_fast"


def test_signature_override_picks_the_named_one(tmp_path):
    both = CS231N + "\n\ndef conv_forward(A_prev, W, b, hparameters):\n    raise ValueError\n"
    path = write(tmp_path, "both", both)
    assert load_impl(path).binding.adapter.name == "classic"
    assert load_impl(path, signature="cs231n").binding.adapter.name == "cs231n"
    with pytest.raises(UsageError, match="must be one of classic, cs231n"):
        load_impl(path, signature="keras")


def test_a_file_without_known_names_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="no function of a known signature"):
        load_impl(write(tmp_path, "none", "x = 1\n"))
    with pytest.raises(DataError, match="defines no function nope"):
        load_impl(f"{write(tmp_path, 'cb', CALLABLE)}:forward,nope")


# -- the suite follows the signature -----------------------------------------------------------


def test_each_signature_gets_the_configurations_it_can_express():
    classic = suite_for(ADAPTERS["classic"])
    cs231n = suite_for(ADAPTERS["cs231n"])
    full = suite_for(ADAPTERS["callable"])
    assert all(c.rank == 2 and len(set(c.kernel)) == 1 for c in classic)
    assert any(len(set(c.kernel)) > 1 for c in cs231n)
    assert not any(c.dilation > 1 or c.groups > 1 for c in cs231n)
    assert {c.rank for c in full} == {1, 2, 3}
    assert any(c.dilation > 1 for c in full)
    assert {"same", "valid"} <= {c.pad for c in full}
    assert not any(isinstance(c.pad, str) for c in cs231n)
    assert any(c.groups > 1 for c in full)
    only_stride = suite_for(callable_adapter("nhwc", ("stride",)))
    assert only_stride
    assert all(c.pad == 0 and c.dilation == c.groups == 1 for c in only_stride)


# -- cs231n ------------------------------------------------------------------------------------


def test_cs231n_correct_passes_and_a_batch_mean_db_is_caught(tmp_path):
    impl = load_impl(write(tmp_path, "good", CS231N))
    assert verdicts(check_impl(impl, SMALL_2D)) == [True, True]
    bad = write(
        tmp_path, "bad", CS231N, "db = dout.sum(axis=(0, 2, 3))", "db = dout.mean(axis=(0, 2, 3))"
    )
    (result,) = check_impl(load_impl(bad), SMALL_2D[:1])
    assert not result.passed
    assert "db" in result.error
    assert "dx" not in result.error
    assert result.diagnosis.startswith("conv_forward_naive is right; conv_backward_naive is wrong")
    assert result.hints == ["db is a mean over the images and positions: sum it instead"]


def test_forward_only_file_gets_a_forward_check(tmp_path):
    text = CS231N[: CS231N.index("def conv_backward_naive")]
    impl = load_impl(write(tmp_path, "fwd", text))
    assert impl.forward_only
    (result,) = check_impl(impl, SMALL_2D[:1])
    assert result.passed
    assert result.checks["backward_vs_engine"].reason == "forward only: no backward given"
    assert "forward only" in result.diagnosis


def test_inputs_modified_in_place_are_caught(tmp_path):
    text = CS231N.replace(
        "    return out, (x, w, b, conv_param)", "    x *= 0\n    return out, (x, w, b, conv_param)"
    )
    (result,) = check_impl(load_impl(write(tmp_path, "inplace", text)), SMALL_2D[:1])
    assert not result.passed
    assert "conv_forward_naive modified its input x in place" in result.error


def test_integer_results_are_refused(tmp_path):
    text = CS231N.replace("    return out, (x", "    return out.astype(np.int64), (x")
    (result,) = check_impl(load_impl(write(tmp_path, "ints", text)), SMALL_2D[:1])
    assert "out is an array of int64, not of floating-point numbers" in result.error


def test_a_nondeterministic_backward_is_caught_unless_allowed(tmp_path):
    noisy = CS231N.replace(
        "    return dx, dw, db", "    return dx, dw + np.random.uniform(0, 1e-12, dw.shape), db"
    )
    impl = load_impl(write(tmp_path, "noisy", noisy))
    (result,) = check_impl(impl, SMALL_2D[:1], max_passes=0)
    assert "conv_backward_naive returned different dw when called again" in result.error
    assert result.diagnosis.startswith("conv_backward_naive is not repeatable")
    (allowed,) = check_impl(impl, SMALL_2D[:1], max_passes=0, nondet_tol=1e-9)
    assert allowed.passed, allowed.error


# -- callable ----------------------------------------------------------------------------------


@pytest.mark.parametrize("wrap", ["ndarray", "tensor"])
def test_callable_passes_on_every_rank_and_hyperparameter(tmp_path, wrap):
    text = CALLABLE + (TENSOR if wrap == "tensor" else "")
    impl = load_impl(f"{write(tmp_path, 'cb', text)}:forward,backward")
    assert impl.binding.adapter.accepted == ("stride", "padding", "dilation", "groups")
    configs = EXTRA[2:4] + EXTRA[5:] if wrap == "ndarray" else EXTRA[:1]
    results = check_impl(impl, configs)
    assert all(r.passed for r in results), [r.error for r in results]


def test_callable_in_channels_first_layout(tmp_path):
    """The same implementation wrapped to take NCHW: --layout nchw converts for it."""
    nchw = CALLABLE.replace(
        "def forward(x, w, b, *, stride=1, padding=0, dilation=1, groups=1):",
        "def forward(x, w, b, *, stride=1, padding=0, dilation=1, groups=1):\n"
        "    return np.moveaxis(_forward(np.moveaxis(x, 1, -1), np.moveaxis(w, (0, 1), (-1, -2)),"
        " b, stride=stride, padding=padding, dilation=dilation, groups=groups), -1, 1)\n\n\n"
        "def _forward(x, w, b, *, stride=1, padding=0, dilation=1, groups=1):",
    )
    impl = load_impl(f"{write(tmp_path, 'nchw', nchw)}:forward", layout="nchw")
    assert impl.forward_only
    assert impl.binding.adapter.layout == "nchw"
    assert all(r.passed for r in check_impl(impl, SMALL_2D))


def test_callable_with_a_dilation_bug_fails_only_where_dilation_shows(tmp_path):
    bad = write(tmp_path, "bad", CALLABLE, "t * dilation + stride", "t + stride")
    impl = load_impl(f"{bad}:forward,backward")
    dilated, plain = EXTRA[2], SMALL_2D[0]
    assert verdicts(check_impl(impl, (dilated, plain), max_passes=0)) == [False, True]


# -- through the CLI ---------------------------------------------------------------------------


def test_cli_cs231n_forward_only_report(tmp_path):
    text = CS231N[: CS231N.index("def conv_backward_naive")]
    path = write(tmp_path, "fwd", text)
    shape = ["--shape", "1,2,5,5", "--layout", "nchw", "--kernel", "3", "--cout", "2"]
    result = runner.invoke(app, ["gradcheck", "--impl", str(path), *shape, "--pad", "1"])
    assert result.exit_code == 0, result.output
    assert "cs231n · forward only · 1 configuration ·" in result.stdout
    assert "1 of 1 configuration passes" in result.stdout


def test_cli_data_file_layer_and_json_keys(tmp_path):
    rng = np.random.default_rng(3)
    data = tmp_path / "layer.npz"
    np.savez(
        data,
        x=rng.standard_normal((2, 4, 4, 2)),
        w=rng.standard_normal((3, 3, 2, 3)),
        b=rng.standard_normal(3),
        stride=np.array(1),
        padding=np.array(1),
    )
    path = write(tmp_path, "cb", CALLABLE)
    result = runner.invoke(
        app,
        ["gradcheck", str(data), "--impl", f"{path}:forward,backward", "--mode", "fast", "--json"],
    )
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["signature"] == "callable"
    assert doc["forward_only"] is False
    assert doc["mode"] == "fast"
    (entry,) = doc["results"]
    assert entry["config"]["shape"] == [2, 4, 4, 2]
    assert entry["config"]["pad"] == [[1, 1], [1, 1]]
    assert entry["checks"]["backward_vs_numeric"]["reason"] == "not run (fast mode)"


def test_cli_flags_that_need_impl():
    result = runner.invoke(
        app,
        ["gradcheck", "--shape", "1,3,3,1", "--kernel", "1", "--cout", "1", "--nondet-tol", "1"],
    )
    assert result.exit_code == 2
    assert "--nondet-tol goes with --impl" in result.stderr


# -- hints for the classic traps ---------------------------------------------------------------

CLASSIC = (ROOT / "sample_data" / "classic_conv.py").read_text(encoding="utf-8")
TRAPS = {
    "float(b)": (
        "+ b[0, 0, 0, c]",
        "+ float(b[:, :, :, c])",
        "float() or int() of an array with dimensions",
    ),
    "db / n": (
        "    return dA_prev, dW, db",
        "    return dA_prev, dW, db / m",
        "db is the right value divided by the batch size n = 2",
    ),
    "unpad slice": (
        "dA_prev_pad[:, pad : pad + A_prev.shape[1], pad : pad + A_prev.shape[2], :]",
        "dA_prev_pad[:, : A_prev.shape[1], : A_prev.shape[2], :]",
        "dA_prev is the right gradient moved by 1 pixel",
    ),
    "one dW channel": (
        "dW[:, :, :, c] += patch * dZ[i, h, w, c]  # DW",
        "dW[:, :, :, c] += patch * dZ[i, h, w, c] * (1 + (c == 1))  # DW",
        "dW is wrong in output channel 1 only",
    ),
}


@pytest.mark.parametrize("trap", list(TRAPS))
def test_classic_traps_get_a_hint(tmp_path, trap):
    old, new, hint = TRAPS[trap]
    impl = load_impl(write(tmp_path, "trap", CLASSIC, old, new))
    (result,) = check_impl(impl, SMALL_2D[:1], max_passes=0)
    assert not result.passed
    assert any(hint in h for h in result.hints), result.hints


def test_a_correct_file_gets_no_hint(tmp_path):
    impl = load_impl(write(tmp_path, "good", CLASSIC))
    (result,) = check_impl(impl, SMALL_2D[:1], max_passes=0)
    assert result.passed
    assert result.hints == []


def test_channels_first_users_see_their_own_shapes_and_indices(tmp_path):
    """A cs231n (NCHW) file's report: shapes and worst-element indices in NCHW order."""
    shape = ["--shape", "2,3,5,4", "--layout", "nchw", "--kernel", "3", "--cout", "2"]
    text = CS231N.replace(
        "    return dx, dw, db", "    dx[1, 2, 3, 0] += 1.0\n    return dx, dw, db"
    )
    bad = write(tmp_path, "bad", text)
    result = runner.invoke(app, ["gradcheck", "--impl", str(bad), *shape, "--pad", "1", "--json"])
    assert result.exit_code == 1, result.output
    (entry,) = json.loads(result.stdout)["results"]
    assert entry["config"]["shape"] == [2, 3, 5, 4]
    assert entry["config"]["layout"] == "nchw"
    worst = entry["checks"]["backward_vs_engine"]["tensors"]["dx"]["worst"]
    assert worst[0]["index"] == [1, 2, 3, 0]
    result = runner.invoke(app, ["gradcheck", "--impl", str(bad), *shape, "--pad", "1"])
    assert "2x3x5x4" in result.stdout
    assert "(1, 2, 3, 0)" in result.stdout


ENGINE_WRAPPER = """
from convcli import ConvSpec, conv_backward, conv_forward


def forward(x, w, b, *, stride=1, padding=0, dilation=1):
    stride = STRIDE(stride)
    return conv_forward(x, w, b, ConvSpec(stride=stride, padding=padding, dilation=dilation))[0]


def backward(dz, x, w, b, *, stride=1, padding=0, dilation=1):
    spec = ConvSpec(stride=stride, padding=padding, dilation=dilation)
    return conv_backward(dz, conv_forward(x, w, b, spec)[1])


STRIDE = lambda s: s
"""


def test_callable_takes_per_axis_steps_and_asymmetric_padding(tmp_path):
    """A callable gets stride and dilation as one integer per axis and padding as (before,
    after) pairs when the layer has them; a wrapper that drops an axis fails."""
    layer = ["--shape", "2,7,8,3", "--kernel", "3,2", "--cout", "4", "--stride", "1,2"]
    layer += ["--pad", "1,0,0,2", "--dilation", "2,1", "--json"]
    good = write(tmp_path, "good", ENGINE_WRAPPER)
    result = runner.invoke(app, ["gradcheck", "--impl", f"{good}:forward,backward", *layer])
    assert result.exit_code == 0, result.output
    (entry,) = json.loads(result.stdout)["results"]
    assert entry["config"]["stride"] == [1, 2]
    assert entry["config"]["dilation"] == [2, 1]
    assert entry["config"]["pad"] == [[1, 0], [0, 2]]
    drop = "STRIDE = lambda s: s[0] if isinstance(s, tuple) else s"  # the first axis's only
    bad = write(tmp_path, "bad", ENGINE_WRAPPER.replace("STRIDE = lambda s: s", drop))
    result = runner.invoke(app, ["gradcheck", "--impl", f"{bad}:forward,backward", *layer])
    assert result.exit_code == 1, result.output
    classic = write(tmp_path, "classic", CLASSIC)
    square = [("3" if arg == "3,2" else arg) for arg in layer]
    result = runner.invoke(app, ["gradcheck", "--impl", str(classic), *square])
    assert result.exit_code == 2
    assert "--stride 1,2" in result.stderr


def test_the_bundled_numpy_kernel_takes_per_axis_strides_and_padding_pairs():
    kernel = ROOT / "sample_data" / "numpy_kernel.py"
    layer = ["--shape", "2,3,7,8", "--layout", "nchw", "--kernel", "3,2", "--cout", "4"]
    layer += ["--stride", "1,2", "--pad", "1,0,0,2"]
    result = runner.invoke(app, ["gradcheck", "--impl", f"{kernel}:conv", *layer, "--json"])
    assert result.exit_code == 0, result.output
    (entry,) = json.loads(result.stdout)["results"]
    assert entry["config"]["pad"] == [[1, 0], [0, 2]]


def test_a_files_hyperparameter_the_signature_cannot_take_names_the_file_not_a_flag(tmp_path):
    """classic takes one integer pad; a data file holding per-side padding is bad data from
    that file (exit 65, naming its entry), not a `--pad` the user never typed (exit 2)."""
    data = dict(np.load(ROOT / "sample_data" / "conv_example.npz"))
    data["pad"] = np.array([[1, 0], [1, 0]])
    path = tmp_path / "asym.npz"
    np.savez(path, **data)
    impl = ROOT / "sample_data" / "classic_conv.py"
    result = CliRunner().invoke(app, ["gradcheck", "--impl", str(impl), str(path)])
    assert result.exit_code == 65, result.stderr
    assert "--pad" not in result.stderr
    assert f"padding from {path} entry 'pad' ((1, 0), (1, 0))" in result.stderr
    assert "one integer" in result.stderr
    # the same value typed as a flag is still a usage error naming the flag
    flagged = CliRunner().invoke(
        app, ["gradcheck", "--impl", str(impl), str(path), "--pad", "1,0,1,0"]
    )
    assert flagged.exit_code == 2, flagged.stderr
    assert "--pad" in flagged.stderr
