"""Found by a hostile review of issue 14's features (safetensors, --layer, inspect, --impl with
same_lower); each test failed before its fix."""

from __future__ import annotations

import json
import struct

from typer.testing import CliRunner

from convcli import ConvSpec
from convcli.check.adapters import ADAPTERS, callable_adapter
from convcli.check.userimpl import impl_config
from convcli.cli import app

runner = CliRunner()


def test_same_lower_reaches_a_callable_resolved_not_as_a_word_it_never_agreed_to():
    """A callable takes padding "same" and "valid" (README); "same_lower" is resolved for the
    given layer into (before, after) pairs, here asymmetric: the extra pixel first."""
    adapter = callable_adapter("nhwc", ("stride", "padding"))
    config = impl_config((1, 8, 8, 3), (3,), 2, ConvSpec(stride=2, padding="same_lower"), adapter)
    assert config.pad == ((1, 0), (1, 0))
    symmetric = impl_config(
        (1, 7, 7, 3), (3,), 2, ConvSpec(stride=2, padding="same_lower"), adapter
    )
    assert symmetric.pad == 1


def test_same_on_a_given_layer_reaches_classic_as_the_integer_it_resolves_to():
    """Classic takes one integer pad; 'same' that comes out symmetric on the given layer is
    that integer, not a refusal."""
    config = impl_config((1, 7, 7, 3), (3,), 2, ConvSpec(padding="same"), ADAPTERS["classic"])
    assert config.pad == 1


def _safetensors(path, header: dict, data: bytes) -> None:
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


ESC = "\x1b]0;pwned\x07\x1b[31m"


def test_inspect_shows_control_characters_in_keys_and_metadata_escaped(tmp_path):
    """A downloaded file's key or __metadata__ reaches the terminal as text, never as an
    escape sequence (error lines already escape them)."""
    data = tmp_path / f"dl{ESC}.safetensors"
    entry = {"dtype": "F32", "shape": [], "data_offsets": [0, 4]}
    _safetensors(data, {f"k{ESC}": entry, "__metadata__": {f"n{ESC}": f"v{ESC}\nx"}}, b"\0" * 4)
    result = runner.invoke(app, ["inspect", str(data)])
    assert result.exit_code == 0, result.output
    assert "\x1b" not in result.stdout, repr(result.stdout)
    assert "\x07" not in result.stdout, repr(result.stdout)
    assert "k\\x1b]0;pwned" in result.stdout, result.stdout
    assert "v\\x1b]0;pwned\\x07\\x1b[31m\\nx" in result.stdout, result.stdout


def test_forward_shows_a_key_with_control_characters_escaped_in_its_origin(tmp_path):
    data = tmp_path / "state.safetensors"
    entry = {"dtype": "F32", "shape": [1, 3, 3, 1], "data_offsets": [0, 36]}
    weight = {"dtype": "F32", "shape": [1, 1, 1, 1], "data_offsets": [36, 40]}
    _safetensors(data, {"x": entry, f"w{ESC}": weight}, b"\0" * 40)
    result = runner.invoke(app, ["forward", "--x", f"{data}:x", "--w", f"{data}:w{ESC}"])
    assert result.exit_code == 0, result.output
    assert "\x1b" not in result.stdout, repr(result.stdout)
    assert "w\\x1b]0;pwned" in result.stdout, result.stdout


def test_a_metadata_that_is_not_an_object_is_refused_not_read_as_empty(tmp_path):
    """``"__metadata__": []`` (or "", 0, false) is malformed like a list of numbers is; only
    an object of strings, or null, is a metadata."""
    entry = {"dtype": "F32", "shape": [1, 3, 3, 1], "data_offsets": [0, 36]}
    weight = {"dtype": "F32", "shape": [1, 1, 1, 1], "data_offsets": [36, 40]}
    for index, metadata in enumerate([[], "", 0, False, ["stride"]]):
        data = tmp_path / f"m{index}.safetensors"
        _safetensors(data, {"x": entry, "w": weight, "__metadata__": metadata}, b"\0" * 40)
        result = runner.invoke(app, ["inspect", str(data)])
        assert result.exit_code == 65, (metadata, result.output)
        assert "__metadata__ must be an object of strings" in result.stderr
    data = tmp_path / "null.safetensors"
    _safetensors(data, {"x": entry, "w": weight, "__metadata__": None}, b"\0" * 40)
    assert runner.invoke(app, ["inspect", str(data)]).exit_code == 0


def test_a_big_safetensors_x_streams_like_the_same_x_from_npy(tmp_path):
    """README: convcli reads .npz, .npy, HDF5 and safetensors files, "streaming those bigger
    than memory"; a safetensors x was loaded whole however big (a 2.2 GiB x took 5.4 GB of
    RSS). Its tensors lie C-ordered at known offsets, so they stream like a .npy's rows."""
    import h5py
    import numpy as np
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 16, 16, 8))
    w = rng.standard_normal((3, 3, 8, 4))
    save_file({"x": x, "w": w, "b": rng.standard_normal(4)}, str(tmp_path / "s.safetensors"))
    np.save(tmp_path / "x.npy", x)
    common = ["forward", "--w", f"{tmp_path / 's.safetensors'}:w", "--pad", "1"]
    common += ["--max-workspace", "256K", "--json"]

    def run(*args):
        result = runner.invoke(app, [*common, *map(str, args)])
        assert result.exit_code == 0, result.stderr
        return json.loads(result.stdout)

    from_st = run("--x", f"{tmp_path / 's.safetensors'}:x", "--out", tmp_path / "s.h5")
    from_npy = run("--x", tmp_path / "x.npy", "--out", tmp_path / "n.h5")
    assert from_st["streamed"] is from_npy["streamed"] is True
    assert from_st["tensors"]["z"] == from_npy["tensors"]["z"]
    with h5py.File(tmp_path / "s.h5") as s, h5py.File(tmp_path / "n.h5") as n:
        np.testing.assert_array_equal(s["z"][()], n["z"][()])


def test_sampled_gradients_step_a_transposed_operand():
    """A layer from an nchw file reaches the check as transposed views; the sampled central
    differences stepped a copy of them and found 0 everywhere, so
    `gradcheck --impl classic_conv.py --mode sample nchw.npz --layout nchw` failed a correct
    backward ("dW wrong at 3/3 elements ... numerically 0") while exhaustive mode passed."""
    import numpy as np

    from convcli.check.numgrad import sampled_gradients

    x = np.arange(12.0).reshape(3, 4).T  # not C-contiguous, as x_to_last makes it
    w, b = np.ones((2, 2)).T, np.ones(2)

    def forward(x, w, b):
        return 2 * x + w.sum() + 3 * b.sum()

    sampled = sampled_gradients(forward, x, w, b, np.ones(x.shape), samples=5, eps=1e-3)
    np.testing.assert_allclose(sampled.values["dx"], 2.0)
    np.testing.assert_allclose(sampled.values["dw"], x.size)
    np.testing.assert_allclose(sampled.values["db"], 3 * x.size)


def test_two_schemes_naming_the_same_group_are_two_layers_not_one_silently():
    """``conv1.weight`` (PyTorch) and ``conv1/kernel:0`` (Keras 2) share the group ``conv1``;
    the second was dropped, so a file of two layers ran the first without --layer."""
    from convcli.io.layers import find_layers

    layers = find_layers(["conv1.weight", "conv1/kernel:0", "x"])
    assert len(layers) == 2, layers
    assert {layer.weight for layer in layers.values()} == {"conv1.weight", "conv1/kernel:0"}


def _npy_with_shape(path, shape: str, data: bytes) -> None:
    header = f"{{'descr': '<f8', 'fortran_order': False, 'shape': {shape}, }}".encode()
    header += b" " * (-(10 + len(header) + 1) % 64) + b"\n"
    path.write_bytes(b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header + data)


def test_a_negative_dimension_in_an_npy_header_is_refused_as_corrupt(tmp_path):
    """numpy's header parser takes (-1, 2, 2, 3); inspect listed it with -96 bytes and no
    problem, and forward failed late with numpy's wording. safetensors refuses the same."""
    import zipfile

    _npy_with_shape(tmp_path / "x.npy", "(-1, 2, 2, 3)", b"\0" * 96)
    with zipfile.ZipFile(tmp_path / "d.npz", "w") as archive:
        archive.write(tmp_path / "x.npy", "x.npy")
    for target in ("x.npy", "d.npz"):
        result = runner.invoke(app, ["inspect", str(tmp_path / target)])
        assert result.exit_code == 65, result.output
        assert "negative" in result.stderr, result.stderr
    import numpy as np

    np.save(tmp_path / "w.npy", np.ones((1, 1, 3, 4)))
    result = runner.invoke(
        app, ["forward", "--x", str(tmp_path / "x.npy"), "--w", str(tmp_path / "w.npy")]
    )
    assert result.exit_code == 65, result.output
    assert "negative" in result.stderr, result.stderr


def test_inspect_lists_a_file_with_a_tensor_convcli_does_not_read(tmp_path):
    """An FP8 tensor beside float32 ones (quantized checkpoints): forward runs on the others,
    but inspect refused the whole file (exit 65) instead of listing it from the header."""
    data = tmp_path / "fp8.safetensors"
    x = {"dtype": "F32", "shape": [1, 3, 3, 1], "data_offsets": [0, 36]}
    w = {"dtype": "F32", "shape": [1, 1, 1, 1], "data_offsets": [36, 40]}
    q = {"dtype": "F8_E4M3", "shape": [4], "data_offsets": [40, 44]}
    _safetensors(data, {"x": x, "w": w, "q": q}, b"\0" * 44)
    result = runner.invoke(app, ["inspect", str(data), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    by_key = {t["key"]: t for t in report["tensors"]}
    assert set(by_key) == {"x", "w", "q"}
    assert by_key["x"]["role"] == "x"
    assert by_key["q"]["dtype"] is None
    assert any("F8_E4M3" in problem for problem in report["problems"])
    table = runner.invoke(app, ["inspect", str(data)])
    assert table.exit_code == 0, table.output
    assert "unreadable" in table.stdout


def test_wrote_messages_show_control_characters_in_names_escaped(tmp_path):
    """'wrote ...' lines of generate, example and --out printed the path raw."""
    name = "o\x1b[31m"
    made = runner.invoke(
        app,
        [
            "generate",
            str(tmp_path / f"{name}.npz"),
            "--shape",
            "1,4,4,1",
            "--kernel",
            "1",
            "--cout",
            "1",
        ],
    )
    assert made.exit_code == 0, made.output
    example = runner.invoke(app, ["example", str(tmp_path / name)])
    assert example.exit_code == 0, example.output
    out = runner.invoke(
        app, ["forward", str(tmp_path / f"{name}.npz"), "--out", str(tmp_path / f"z{name}.npz")]
    )
    assert out.exit_code == 0, out.output
    for result in (made, example, out):
        assert "\x1b" not in result.stdout + result.stderr, repr(result.stdout + result.stderr)
        assert "o\\x1b[31m" in result.stdout + result.stderr
