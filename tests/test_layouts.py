"""1-D and 3-D layers, channels-first layouts and padding modes through the CLI (npz and h5)."""

import json

import h5py
import numpy as np
import pytest
from typer.testing import CliRunner

from convcli import ConvSpec, conv_backward, conv_forward
from convcli.cli import app

runner = CliRunner()

LAYERS = {
    "1-D nchw reflect": (
        [
            "--shape",
            "2,16,3",
            "--kernel",
            "5",
            "--cout",
            "4",
            "--pad",
            "same",
            "--padding-mode",
            "reflect",
            "--layout",
            "nchw",
        ],
        ".npz",
    ),
    "3-D nhwc circular": (
        [
            "--shape",
            "1,5,6,7,2",
            "--kernel",
            "3,2,3",
            "--cout",
            "3",
            "--stride",
            "1,2,1",
            "--pad",
            "1",
            "--padding-mode",
            "circular",
        ],
        ".h5",
    ),
    "2-D nchw replicate groups": (
        [
            "--shape",
            "2,7,6,4",
            "--kernel",
            "3",
            "--cout",
            "6",
            "--groups",
            "2",
            "--pad",
            "2,1",
            "--padding-mode",
            "replicate",
            "--layout",
            "nchw",
        ],
        ".h5",
    ),
    "1-D nhwc dilated": (
        ["--shape", "3,20,2", "--kernel", "3", "--cout", "2", "--dilation", "3", "--stride", "2"],
        ".npz",
    ),
}


def invoke(*args):
    result = runner.invoke(app, [str(a) for a in args])
    return result


def read(path):
    if path.suffix == ".npz":
        with np.load(path) as f:
            return {k: f[k] for k in f.files}
    with h5py.File(path) as f:
        return {k: f[k][()] for k in f}


@pytest.mark.parametrize("name", list(LAYERS))
def test_generate_forward_backward_gradcheck_round_trip(tmp_path, name):
    flags, suffix = LAYERS[name]
    data = tmp_path / f"layer{suffix}"
    assert invoke("generate", data, *flags, "--with-dz").exit_code == 0
    arrays = read(data)
    spec_flags = dict(zip(flags[::2], flags[1::2], strict=True))
    spec = ConvSpec(
        stride=tuple(int(v) for v in spec_flags.get("--stride", "1").split(",")),
        padding=spec_flags["--pad"]
        if spec_flags.get("--pad") == "same"
        else tuple(int(v) for v in spec_flags.get("--pad", "0").split(",")),
        dilation=tuple(int(v) for v in spec_flags.get("--dilation", "1").split(",")),
        groups=int(spec_flags.get("--groups", "1")),
        padding_mode=spec_flags.get("--padding-mode", "zeros"),
        layout=spec_flags.get("--layout", "nhwc"),
    )
    z, cache = conv_forward(arrays["x"], arrays["w"], arrays["b"], spec)

    out = tmp_path / f"z{suffix}"
    result = invoke("forward", data, "--out", out, "--json")
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["tensors"]["z"]["shape"] == list(z.shape)
    assert doc["hparams"]["layout"] == spec.layout
    assert doc["hparams"]["padding_mode"] == spec.padding_mode
    np.testing.assert_allclose(read(out)["z"], z, rtol=1e-12, atol=1e-12)

    grads = tmp_path / f"g{suffix}"
    result = invoke("backward", data, "--out", grads, "--json")
    assert result.exit_code == 0, result.stderr
    dx, dw, db = conv_backward(arrays["dz"], cache)
    written = read(grads)
    np.testing.assert_allclose(written["dx"], dx, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(written["dw"], dw, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(written["db"], db, rtol=1e-12, atol=1e-12)

    check = invoke("gradcheck", data, "--mode", "exhaustive", "--json")
    assert check.exit_code == 0, check.stderr
    assert json.loads(check.stdout)["results"][0]["tensors"]["dx"]["checked"] == arrays["x"].size


def test_streamed_3d_equals_in_memory(tmp_path):
    data = tmp_path / "vol.h5"
    assert (
        invoke(
            "generate",
            data,
            "--shape",
            "16,4,5,6,2",
            "--kernel",
            "3",
            "--cout",
            "2",
            "--pad",
            "1",
            "--padding-mode",
            "reflect",
            "--layout",
            "nchw",
        ).exit_code
        == 0
    )
    streamed = json.loads(invoke("forward", data, "--max-workspace", "16K", "--json").stdout)
    whole = json.loads(invoke("forward", data, "--json").stdout)
    assert streamed["streamed"] is True
    assert whole["streamed"] is False
    for key in ("mean", "std", "min", "max"):
        assert streamed["tensors"]["z"][key] == pytest.approx(whole["tensors"]["z"][key], rel=1e-12)


@pytest.mark.parametrize(
    ("args", "code", "match"),
    [
        (["--padding-mode", "mirror"], 2, "--padding-mode 'mirror'"),
        (["--layout", "hwcn"], 2, "--layout 'hwcn'"),
        (
            ["--pad", "4", "--padding-mode", "reflect"],
            65,
            "reflect padding along h must be smaller",
        ),
        (["--stride", "1,2,2"], 65, "stride has 3 values but x has 2 spatial axes"),
        (["--layout", "nchw"], 65, "Cin of x is 4"),
    ],
)
def test_bad_layout_and_mode_values(args, code, match):
    from tests.conftest import SAMPLE_H5

    result = invoke("forward", SAMPLE_H5, *args)
    assert result.exit_code == code, result.stderr
    assert match in result.stderr
