"""generate, inspect, --heatmap and --quiet."""

import json

import h5py
import numpy as np
import pytest
from typer.testing import CliRunner

from convcli.cli import app
from convcli.cli.heatmap import RAMP, heatmap
from tests.conftest import SAMPLE_H5, SAMPLE_NPZ

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.mark.parametrize("suffix", [".npz", ".h5"])
def test_generate_writes_a_file_the_other_commands_read(tmp_path, suffix):
    out = tmp_path / f"layer{suffix}"
    result = invoke(
        "generate",
        out,
        "--shape",
        "2,9,7,4",
        "--kernel",
        "3,2",
        "--cout",
        "6",
        "--stride",
        "2",
        "--pad",
        "same",
        "--groups",
        "2",
        "--seed",
        "5",
        "--dtype",
        "float32",
        "--with-dz",
        "--json",
    )
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["tensors"]["w"] == {"shape": [3, 2, 2, 6], "dtype": "float32"}
    assert doc["tensors"]["dz"]["shape"] == [2, 5, 4, 6]
    forward = json.loads(invoke("forward", out, "--json").stdout)
    assert forward["hparams"]["stride"] == [2, 2]
    assert forward["hparams"]["groups"] == 2
    assert forward["tensors"]["z"]["shape"] == [2, 5, 4, 6]
    assert forward["tensors"]["z"]["dtype"] == "float32"
    backward = json.loads(invoke("backward", out, "--json").stdout)
    assert backward["tensors"]["dz"]["origin"].endswith("dz")
    assert invoke("gradcheck", out).exit_code == 0


def test_generate_is_reproducible_and_refuses_to_overwrite(tmp_path):
    first, second = tmp_path / "a.npz", tmp_path / "b.npz"
    for path in (first, second):
        assert (
            invoke("generate", path, "--shape", "1,4,4,2", "--kernel", "2", "--cout", "3").exit_code
            == 0
        )
    with np.load(first) as a, np.load(second) as b:
        np.testing.assert_array_equal(a["x"], b["x"])
    before = first.read_bytes()
    result = invoke(
        "generate", first, "--shape", "1,4,4,2", "--kernel", "2", "--cout", "3", "--seed", "1"
    )
    assert result.exit_code == 73
    assert first.read_bytes() == before
    assert (
        invoke(
            "generate", first, "--shape", "1,4,4,2", "--kernel", "2", "--cout", "3", "--force"
        ).exit_code
        == 0
    )


@pytest.mark.parametrize(
    ("args", "code", "match"),
    [
        (["--shape", "1,4", "--kernel", "2", "--cout", "1"], 2, "--shape"),
        (["--shape", "1,4,4,3", "--kernel", "2", "--cout", "2", "--groups", "2"], 65, "groups=2"),
        (["--shape", "1,2,2,1", "--kernel", "3", "--cout", "1"], 65, "kernel along h"),
        (["--shape", "1,4,4,1", "--kernel", "2", "--cout", "1", "--dtype", "int8"], 2, "int8"),
    ],
)
def test_generate_bad_values(tmp_path, args, code, match):
    result = invoke("generate", tmp_path / "x.npz", *args)
    assert result.exit_code == code, result.stderr
    assert match in result.stderr
    assert not (tmp_path / "x.npz").exists()


def test_inspect_lists_tensors_roles_and_hyperparameters_without_reading_data(
    tmp_path, monkeypatch
):
    from convcli.io.npz import NpzReader

    read = []
    original = NpzReader.read_array

    def recording_read(self, key):
        read.append(key)
        return original(self, key)

    monkeypatch.setattr(NpzReader, "read_array", recording_read)  # every data read of an npz
    doc = json.loads(invoke("inspect", SAMPLE_NPZ, "--json").stdout)
    assert set(read) <= {"pad", "stride"}  # only the small hyperparameter entries
    assert doc["format"] == "npz"
    by_key = {t["key"]: t for t in doc["tensors"]}
    assert by_key["A_prev"] == {
        "key": "A_prev",
        "shape": [10, 4, 4, 3],
        "dtype": "float64",
        "bytes": 3840,
        "role": "x",
    }
    assert by_key["pad"]["role"] == "hyperparameter"
    assert doc["hparams"] == {
        "stride": [2, 2],
        "padding": [[2, 2], [2, 2]],
        "dilation": [1, 1],
        "groups": 1,
        "padding_mode": "zeros",
        "layout": "nhwc",
    }
    assert doc["roles"]["dz"] is None
    table = invoke("inspect", SAMPLE_H5)
    assert table.exit_code == 0
    assert "A_prev" in table.stdout
    assert "stride=2 padding=2" in table.stdout


def test_inspect_reports_problems_and_nested_hdf5(tmp_path):
    path = tmp_path / "odd.h5"
    with h5py.File(path, "w") as f:
        f["a/x"] = np.ones((1, 4, 4, 2))
        f["b/x"] = np.ones((1, 4, 4, 2))
        f.attrs["stride"] = 1.5
    doc = json.loads(invoke("inspect", path, "--json").stdout)
    assert [t["key"] for t in doc["tensors"]] == ["a/x", "b/x"]
    assert any("ambiguous" in p for p in doc["problems"])
    assert any("stride = 1.5" in p for p in doc["problems"])
    assert invoke("inspect", tmp_path / "missing.h5").exit_code == 66


def test_heatmap_draws_a_2d_slice_and_refuses_others():
    result = invoke("forward", SAMPLE_H5, "--heatmap", "z[3,:,:,0]")
    assert result.exit_code == 0
    picture = result.stdout.split("z[3,:,:,0], shape (4, 4)\n")[1].splitlines()[:4]
    assert all(len(row) == 8 for row in picture)
    assert set("".join(picture)) <= set(RAMP) | {"-"}
    doc = json.loads(invoke("forward", SAMPLE_H5, "--heatmap", "z[3,:,:,0]", "--json").stdout)
    assert np.array(doc["heatmaps"]["z[3,:,:,0]"]).shape == (4, 4)
    bad = invoke("backward", SAMPLE_H5, "--heatmap", "dw[0]")
    assert bad.exit_code == 2
    assert "needs a 2-D slice" in bad.stderr


def test_heatmap_scales_and_marks_signs():
    values = np.array([[0.0, 1.0], [-2.0, 4.0]])
    text = heatmap(values, "t", color=False).plain.splitlines()
    assert text[1] == "  ::"  # 0 -> ' ', a quarter of the maximum -> level 2 of 9: ':'
    assert text[2] == "=-@@"  # -2: half the maximum, marked negative
    assert "4" in text[3]
    colour = heatmap(values, "t", color=True)
    assert any("rgb" in str(span.style) for span in colour.spans)


def test_quiet_drops_notes_but_not_errors(tmp_path):
    np.savez(
        tmp_path / "ints.npz", x=np.ones((1, 3, 3, 1), np.int64), w=np.ones((2, 2, 1, 1), np.int64)
    )
    loud = invoke("forward", tmp_path / "ints.npz")
    assert "converted to float64" in loud.stderr
    quiet = invoke("--quiet", "forward", tmp_path / "ints.npz")
    assert quiet.exit_code == 0
    assert quiet.stderr == ""
    assert "tensor" in quiet.stdout
    missing = invoke("-q", "forward", tmp_path / "missing.npz")
    assert missing.exit_code == 66
    assert missing.stderr.startswith("convcli: error:")


def test_no_color_terminal_heatmap_uses_characters():
    from rich.console import Console

    from convcli.cli.heatmap import print_heatmap

    console = Console(force_terminal=True, no_color=True, record=True, width=80)
    print_heatmap(console, np.array([[0.0, 1.0], [2.0, 4.0]]), "t")
    text = console.export_text()
    assert "@@" in text
    assert "::" in text


def test_error_messages_keep_colons_literal(tmp_path):
    path = tmp_path / "s.npz"
    np.savez(path, x=np.ones((8, 8, 8, 4)), w=np.ones((3, 3, 4, 2)))
    result = invoke("forward", path, "--max-memory", "1K")
    assert result.exit_code == 65
    assert "s.npz:x:" in result.stderr
