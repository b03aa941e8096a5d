"""safetensors files, PyTorch checkpoints and keys holding ``:`` (issue 14, files).

Files are written here with the real ``safetensors`` package in the layout of a PyTorch
state dict (``conv1.weight`` OIHW, ``conv1.bias``), or byte by byte for what it cannot
write (bfloat16) and for hostile headers; no framework is needed.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import h5py
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file
from typer.testing import CliRunner

from convcli.cli import app
from convcli.errors import DataError
from convcli.io.detect import detect_format, parse_ref
from convcli.io.tensorfile import open_tensor_file, read_tensor
from tests.test_hostile_safetensors import HOSTILE, raw_safetensors

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def run_json(*args):
    result = run(*args, "--json")
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def one_error(result, code: int) -> str:
    assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("convcli: error: "), lines
    assert "Traceback" not in result.stderr + result.stdout
    return lines[0]


def state_dict(rng) -> dict[str, np.ndarray]:
    """A tiny PyTorch-style state dict: conv weights OIHW (Cout, Cin, kh, kw), biases (Cout,)."""
    return {
        "conv1.weight": rng.standard_normal((4, 3, 3, 3)).astype(np.float32),
        "conv1.bias": rng.standard_normal(4).astype(np.float32),
        "layer2.0.conv1.weight": rng.standard_normal((4, 4, 1, 1)).astype(np.float32),
        "layer2.0.conv1.bias": rng.standard_normal(4).astype(np.float32),
    }


@pytest.fixture
def weights(tmp_path) -> Path:
    path = tmp_path / "model.safetensors"
    save_file(state_dict(np.random.default_rng(0)), str(path), metadata={"format": "pt"})
    return path


@pytest.fixture
def x_nchw(tmp_path) -> Path:
    path = tmp_path / "x.npy"
    np.save(path, np.random.default_rng(1).standard_normal((2, 3, 6, 6)).astype(np.float32))
    return path


# ---------------------------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------------------------


def test_detected_by_content_and_listed_from_the_header(weights, tmp_path):
    renamed = tmp_path / "weights.bin"
    renamed.write_bytes(weights.read_bytes())
    assert detect_format(renamed) == "safetensors"
    doc = run_json("inspect", renamed)
    assert doc["format"] == "safetensors"
    listed = {t["key"]: (t["shape"], t["dtype"]) for t in doc["tensors"]}
    assert listed == {
        "conv1.bias": ([4], "float32"),
        "conv1.weight": ([4, 3, 3, 3], "float32"),
        "layer2.0.conv1.bias": ([4], "float32"),
        "layer2.0.conv1.weight": ([4, 4, 1, 1], "float32"),
    }
    assert doc["metadata"] == {"format": "pt"}
    table = run("inspect", renamed)
    assert table.exit_code == 0, table.stderr
    assert "layer2.0.conv1.weight" in table.stdout
    assert "format=pt" in table.stdout


def test_dotted_keys_are_plain_keys(weights):
    expected = state_dict(np.random.default_rng(0))
    for key, value in expected.items():
        got = read_tensor(f"{weights}:{key}")
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, value)


def test_state_dict_weights_run_like_the_same_arrays_in_npz(weights, x_nchw, tmp_path):
    arrays = state_dict(np.random.default_rng(0))
    npz = tmp_path / "same.npz"
    np.savez(npz, w=arrays["conv1.weight"], b=arrays["conv1.bias"])
    refs = ("--x", x_nchw, "--layout", "nchw", "--pad", "1", "--slice", "z[1,2]")
    ours = run_json(
        "forward", *refs, "--w", f"{weights}:conv1.weight", "--b", f"{weights}:conv1.bias"
    )
    theirs = run_json("forward", *refs, "--w", f"{npz}:w", "--b", f"{npz}:b")
    assert ours["tensors"]["z"] == theirs["tensors"]["z"]
    assert ours["slices"] == theirs["slices"]


def test_out_safetensors_round_trip(tmp_path):
    rng = np.random.default_rng(2)
    data = tmp_path / "layer.npz"
    np.savez(
        data, x=rng.standard_normal((2, 5, 5, 3)), w=rng.standard_normal((3, 3, 3, 4)), stride=2
    )
    out = tmp_path / "grads.safetensors"
    result = run("backward", data, "--out", out)
    assert result.exit_code == 0, result.stderr
    reference = tmp_path / "grads.npz"
    assert run("backward", data, "--out", reference).exit_code == 0
    read_back = load_file(str(out))  # the real package reads what convcli wrote
    expected = dict(np.load(reference))
    assert set(read_back) == {"dx", "dw"}  # no bias: no db; hyperparameters as metadata
    for name in ("dx", "dw"):
        np.testing.assert_array_equal(read_back[name], expected[name])
        assert read_back[name].dtype == np.float64
    with open_tensor_file(out) as written:
        hparams = {name: value for name, (value, _) in written.hparams().items()}
        assert written.reader.metadata()["stride"] == "[2, 2]"
    assert hparams["stride"] == [2, 2]


def test_float16_is_upcast_to_float32_with_a_notice(tmp_path, x_nchw):
    w = np.random.default_rng(3).standard_normal((2, 3, 3, 3)).astype(np.float16)
    path = tmp_path / "half.safetensors"
    save_file({"conv.weight": w}, str(path))
    with pytest.warns(UserWarning, match=r"conv\.weight is stored as float16; read as float32"):
        got = read_tensor(f"{path}:conv.weight")
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, w.astype(np.float32))
    result = run("forward", "--x", x_nchw, "--w", path, "--layout", "nchw", "--json")
    assert result.exit_code == 0, result.stderr
    assert "conv.weight" in result.stderr
    assert "float16" in result.stderr
    assert "float32" in result.stderr
    assert json.loads(result.stdout)["tensors"]["z"]["dtype"] == "float32"
    inventory = run_json("inspect", path)["tensors"][0]
    assert (inventory["dtype"], inventory["stored_dtype"]) == ("float32", "float16")


def bfloat16_file(path: Path, values: np.ndarray) -> Path:
    """bfloat16 written by hand: the high 16 bits of each float32, little-endian."""
    high = (values.astype("<f4").view("<u4") >> 16).astype("<u2")
    header = {"w": {"dtype": "BF16", "shape": list(values.shape), "data_offsets": [0, high.nbytes]}}
    return raw_safetensors(path, header, high.tobytes())


def test_bfloat16_is_upcast_to_float32_with_a_notice(tmp_path):
    rng = np.random.default_rng(4)
    exact = rng.standard_normal((2, 2, 1, 3)).astype(np.float32)
    exact = (exact.view(np.uint32) & 0xFFFF0000).view(np.float32)  # representable in bfloat16
    path = bfloat16_file(tmp_path / "bf16.safetensors", exact)
    with pytest.warns(UserWarning, match="bfloat16"):
        got = read_tensor(path)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, exact)
    x = tmp_path / "x.npy"
    np.save(x, rng.standard_normal((1, 3, 3, 1)).astype(np.float32))
    result = run("forward", "--x", x, "--w", path, "--json")
    assert result.exit_code == 0, result.stderr
    assert "bfloat16" in result.stderr


def test_integer_tensors_are_read_as_elsewhere(tmp_path):
    path = tmp_path / "ints.safetensors"
    save_file(
        {"x": np.ones((1, 3, 3, 1), np.int64), "w": np.ones((2, 2, 1, 1), np.int32)}, str(path)
    )
    assert read_tensor(f"{path}:x").dtype == np.int64
    result = run("forward", path, "--json")
    assert result.exit_code == 0, result.stderr
    assert "converted to float64" in result.stderr
    assert json.loads(result.stdout)["tensors"]["z"]["dtype"] == "float64"


def test_a_state_dict_as_the_data_file_names_its_layers_and_layer_picks_one(weights, x_nchw):
    line = one_error(run("forward", weights), 65)
    assert "--layer NAME" in line
    assert "conv1, layer2.0.conv1" in line
    by_name = run_json("forward", weights, "--x", x_nchw, "--layer", "conv1", "--pad", "1")
    assert by_name["tensors"]["w"]["origin"].endswith("model.safetensors:conv1.weight")
    assert by_name["tensors"]["z"]["shape"] == [2, 4, 6, 6]  # nchw, implied by the names


# ---------------------------------------------------------------------------------------------
# hostile headers: each refused before allocating, one line, exit 65
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", list(HOSTILE), ids=list(HOSTILE))
@pytest.mark.parametrize("command", ["inspect", "forward"])
def test_hostile_header_is_one_line_and_exit_65(case, command, tmp_path):
    """In-process, for each command; tests/test_hostile_safetensors.py runs the installed one."""
    header, data, length, words = HOSTILE[case]
    path = raw_safetensors(tmp_path / "bad.safetensors", header, data, length)
    args = ("inspect", path) if command == "inspect" else ("forward", "--x", path, "--w", path)
    line = one_error(run(*args), 65)
    assert str(path) in line, line
    assert words in line, line


def test_a_truncated_file_is_refused_before_reading(weights, tmp_path):
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(weights.read_bytes()[:-100])
    line = one_error(run("forward", "--x", f"{cut}:conv1.bias", "--w", f"{cut}:conv1.weight"), 65)
    assert "outside the data area" in line, line


# ---------------------------------------------------------------------------------------------
# PyTorch checkpoints
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["model.pt", "model.pth", "model.npz"])
def test_pytorch_checkpoint_is_refused_with_a_way_out(name, tmp_path):
    path = tmp_path / name
    with zipfile.ZipFile(path, "w") as archive:  # the layout torch.save writes
        archive.writestr("archive/data.pkl", b"\x80\x02}q\x00.")
        archive.writestr("archive/data/0", b"\0" * 64)
        archive.writestr("archive/version", b"3\n")
    for args in (("inspect", path), ("forward", path), ("forward", "--x", path, "--w", path)):
        line = one_error(run(*args), 65)
        assert "PyTorch" in line, line
        assert "never unpickles" in line, line
        assert "safetensors.torch.save_file" in line, line
    with pytest.raises(DataError, match="never unpickles"):
        read_tensor(path)


def test_a_bare_pickle_is_named_as_one(tmp_path):
    path = tmp_path / "legacy.pt"  # torch.save(..., _use_new_zipfile_serialization=False)
    path.write_bytes(b"\x80\x02\x8a\nl\xfc\x9cF\xf9 j\xa8P\x19.")
    line = one_error(run("inspect", path), 65)
    assert "pickle" in line, line
    assert "safetensors.torch.save_file" in line, line


# ---------------------------------------------------------------------------------------------
# PATH:KEY with ':' in the key or the path
# ---------------------------------------------------------------------------------------------


def test_parse_ref_resolves_the_longest_existing_path(tmp_path):
    h5 = tmp_path / "keras.h5"
    h5.write_bytes(b"")
    assert parse_ref(f"{h5}:conv2d/kernel:0") == (h5, "conv2d/kernel:0")
    named = tmp_path / "run:1.npz"
    named.write_bytes(b"")
    assert parse_ref(f"{named}:W") == (named, "W")
    assert parse_ref(f"{named}") == (named, None)
    assert parse_ref("missing:a:b") == (Path("missing:a"), "b")  # nothing exists: last colon


def test_keras2_key_with_a_colon(tmp_path):
    rng = np.random.default_rng(5)
    kernel = rng.standard_normal((3, 3, 2, 4))
    bias = rng.standard_normal(4)
    path = tmp_path / "keras2.h5"
    with h5py.File(path, "w") as h5:
        h5["conv2d/kernel:0"] = kernel
        h5["conv2d/bias:0"] = bias
    np.testing.assert_array_equal(read_tensor(f"{path}:conv2d/kernel:0"), kernel)
    x = tmp_path / "x.npy"
    np.save(x, rng.standard_normal((1, 5, 5, 2)))
    ours = run_json(
        "forward", "--x", x, "--w", f"{path}:conv2d/kernel:0", "--b", f"{path}:/conv2d/bias:0"
    )
    npz = tmp_path / "same.npz"
    np.savez(npz, w=kernel, b=bias)
    theirs = run_json("forward", "--x", x, "--w", f"{npz}:w", "--b", f"{npz}:b")
    assert ours["tensors"]["z"] == theirs["tensors"]["z"]


def test_file_name_with_a_colon(tmp_path):
    path = tmp_path / "run:2.npz"
    w = np.arange(8.0).reshape(2, 2, 1, 2)
    np.savez(path, W=w, x=np.ones((1, 3, 3, 1)))
    np.testing.assert_array_equal(read_tensor(f"{path}:W"), w)
    assert run_json("forward", path)["tensors"]["z"]["shape"] == [1, 2, 2, 2]
    assert run_json("forward", "--x", f"{path}:x", "--w", f"{path}:W")["tensors"]["z"]["shape"] == [
        1,
        2,
        2,
        2,
    ]


def test_a_header_whose_parse_would_take_hundreds_of_megabytes_is_refused(tmp_path):
    """Parsing JSON takes about 14 bytes per header byte: a 20 MiB header (valid, one tensor and
    a long metadata string) is refused by its length before it is parsed, with the limit."""
    from tests.test_hostile_safetensors import GOOD

    header = {"__metadata__": {"note": "x" * (20 * 2**20)}, **GOOD}
    path = raw_safetensors(tmp_path / "big_header.safetensors", header, b"\0" * 16)
    result = runner.invoke(app, ["inspect", str(path)])
    assert result.exit_code == 65, result.stderr
    assert "header length" in result.stderr
    assert "16 MiB limit" in result.stderr
