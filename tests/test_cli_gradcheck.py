"""convcli gradcheck on data files and on configurations given by flags."""

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from convcli.cli import app
from tests.conftest import SAMPLE_H5, SAMPLE_NPZ

runner = CliRunner()


def gradcheck(*args):
    return runner.invoke(app, ["gradcheck", *map(str, args)])


def test_sample_file_passes_exhaustively_with_json():
    result = gradcheck(SAMPLE_H5, "--json")
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["command"] == "gradcheck"
    assert doc["passed"] is True
    assert doc["mode"] == "exhaustive"
    assert doc["forward_passes"] == 2 * (2 * 2 * 3 + 2 * 2 * 3 + 1)  # auto times nothing
    (entry,) = doc["results"]
    assert entry["config"] == {
        "shape": [10, 4, 4, 3],
        "kernel": [2, 2],
        "cout": 8,
        "stride": [2, 2],
        "dilation": [1, 1],
        "groups": 1,
        "padding_mode": "zeros",
        "layout": "nhwc",
        "pad": [[2, 2], [2, 2]],
    }
    assert entry["error"] is None
    assert entry["mode"] == "exhaustive"  # the mode this check used
    assert set(entry["tensors"]) == {"dx", "dw", "db"}
    dx = entry["tensors"]["dx"]
    assert dx["checked"] == dx["total"] == 480
    assert dx["passed"] is True
    assert set(dx) >= {"checked", "max_abs_err", "max_rel_err", "passed", "worst"}
    assert "auto chose exhaustive" in result.stderr


@pytest.mark.parametrize("mode", ["exhaustive", "sample", "fast"])
def test_modes_from_flags(mode):
    result = gradcheck(
        "--shape",
        "2,7,6,4",
        "--kernel",
        "3,2",
        "--cout",
        "6",
        "--stride",
        "2,1",
        "--pad",
        "same",
        "--dilation",
        "1,2",
        "--groups",
        "2",
        "--mode",
        mode,
        "--samples",
        "10",
        "--probes",
        "3",
        "--json",
    )
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["mode"] == doc["results"][0]["mode"] == mode
    assert doc["passed"] is True
    checked = doc["results"][0]["tensors"]["dw"]["checked"]
    assert checked == {"exhaustive": 3 * 2 * 2 * 6, "sample": 10, "fast": 3}[mode]


def test_table_output():
    result = gradcheck(SAMPLE_NPZ, "--mode", "sample", "--samples", "5")
    assert result.exit_code == 0
    assert "5/480" in result.stdout
    assert "PASS: every gradient matches" in result.stdout


def test_float32_is_upcast_with_a_notice(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(
        tmp_path / "f32.npz",
        x=rng.standard_normal((2, 5, 5, 2)).astype(np.float32),
        w=rng.standard_normal((3, 3, 2, 2)).astype(np.float32),
    )
    result = gradcheck(tmp_path / "f32.npz", "--json")
    assert result.exit_code == 0
    assert "upcast from float32" in result.stderr


def test_upstream_from_file_and_modes(tmp_path):
    with np.load(SAMPLE_NPZ) as f:
        arrays = dict(f)
    arrays["dz"] = np.ones((10, 4, 4, 8))
    np.savez(tmp_path / "with_dz.npz", **arrays)
    assert gradcheck(tmp_path / "with_dz.npz").exit_code == 0
    for upstream in ("z", "ones", "random"):
        assert gradcheck(SAMPLE_NPZ, "--upstream", upstream).exit_code == 0


def test_loose_eps_and_tolerance_flags():
    result = gradcheck(SAMPLE_NPZ, "--eps", "1e-6", "--rtol", "1e-4", "--atol", "1e-6", "--json")
    assert json.loads(result.stdout)["tolerance"] == {"eps": 1e-6, "rtol": 1e-4, "atol": 1e-6}


@pytest.mark.parametrize(
    ("args", "code", "match"),
    [
        ([], 2, "give a data file"),
        (["--shape", "1,4"], 2, "--shape '1,4'"),
        (["--shape", "1,4,4,1"], 2, "--shape needs --kernel and --cout"),
        ([SAMPLE_NPZ, "--shape", "1,4,4,1", "--kernel", "2", "--cout", "1"], 2, "not both"),
        (["--shape", "1,4,4,3", "--kernel", "2", "--cout", "2", "--groups", "2"], 65, "groups=2"),
        (["--shape", "1,2,2,1", "--kernel", "3", "--cout", "1"], 65, "kernel along h"),
        ([SAMPLE_NPZ, "--mode", "psychic"], 2, "psychic"),
        ([SAMPLE_NPZ, "--eps", "0"], 2, "--eps"),
    ],
)
def test_bad_usage(args, code, match):
    result = gradcheck(*args)
    assert result.exit_code == code, result.stderr
    assert result.stderr.startswith("convcli: error: ")
    assert match in result.stderr
    assert result.stderr.count("\n") == 1
