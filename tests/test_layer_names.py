"""``--layer NAME``: a layer's weight and bias found by the names frameworks save them under.

Files are made here with NumPy and h5py in the layouts PyTorch state dicts (dotted names),
Keras 3 ``.weights.h5`` (``layers/NAME/vars/0|1``) and Keras 2 ``.h5``
(``model_weights/NAME/NAME/kernel:0``) use; no framework is needed.
"""

import json

import h5py
import numpy as np
import pytest
from typer.testing import CliRunner

from convcli.cli import app
from convcli.errors import DataError
from convcli.io.layers import find_layers
from convcli.io.loading import load_tensors

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def z_of(*args):
    result = run("forward", *args, "--json", "--slice", "z[:]")
    assert result.exit_code == 0, result.stderr
    return np.asarray(json.loads(result.stdout)["slices"]["z[:]"]), result.stderr


def assert_error(result, code, *matches):
    assert result.exit_code == code, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("convcli: error: ")
    for match in matches:
        assert match in lines[0]


@pytest.fixture
def layer():
    """x (NHWC), w (HWIO) and b of a 3x3 layer 3 -> 4 channels, and a second layer's w."""
    rng = np.random.default_rng(14)
    return {
        "x": rng.standard_normal((2, 5, 5, 3)),
        "w": rng.standard_normal((3, 3, 3, 4)),
        "b": rng.standard_normal(4),
        "w2": rng.standard_normal((1, 1, 4, 2)),
        "b2": rng.standard_normal(2),
    }


def oihw(w):
    return np.ascontiguousarray(w.transpose(3, 2, 0, 1))


def nchw(x):
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


@pytest.fixture
def direct(tmp_path, layer):
    """z computed with the tensors passed directly (NHWC)."""
    path = tmp_path / "direct.npz"
    np.savez(path, x=layer["x"], w=layer["w"], b=layer["b"])
    z, _ = z_of(path, "--pad", "1")
    return z


def torch_file(tmp_path, layer, *, second=True, x=True):
    path = tmp_path / "state.npz"
    arrays = {"layer2.0.conv1.weight": oihw(layer["w"]), "layer2.0.conv1.bias": layer["b"]}
    if second:
        arrays |= {"layer2.0.conv2.weight": oihw(layer["w2"]), "layer2.0.conv2.bias": layer["b2"]}
        arrays["layer2.0.bn1.weight"] = np.ones(4)  # not a convolution: never offered
    if x:
        arrays["x"] = nchw(layer["x"])
    np.savez(path, **arrays)
    return path


def keras3_file(tmp_path, layer):
    path = tmp_path / "model.weights.h5"
    with h5py.File(path, "w") as f:
        f["layers/conv2d/vars/0"] = layer["w"]
        f["layers/conv2d/vars/1"] = layer["b"]
        f["layers/conv2d_1/vars/0"] = layer["w2"]
        f["layers/conv2d_1/vars/1"] = layer["b2"]
        f["optimizer/vars/0"] = np.zeros((3, 3, 3, 4))  # not a layer
        f["optimizer/vars/1"] = np.zeros(4)
        f.create_group("layers/flatten/vars")
    return path


def keras2_file(tmp_path, layer):
    path = tmp_path / "model.h5"
    with h5py.File(path, "w") as f:
        f.attrs["keras_version"] = "2.15.0"
        f["model_weights/conv2d/conv2d/kernel:0"] = layer["w"]
        f["model_weights/conv2d/conv2d/bias:0"] = layer["b"]
        f["model_weights/conv2d_1/conv2d_1/kernel:0"] = layer["w2"]
        f["model_weights/conv2d_1/conv2d_1/bias:0"] = layer["b2"]
        f["optimizer_weights/Adam/conv2d/kernel/m:0"] = np.zeros((3, 3, 3, 4))
    return path


def x_file(tmp_path, layer, layout="nhwc"):
    path = tmp_path / "x.npz"
    np.savez(path, x=layer["x"] if layout == "nhwc" else nchw(layer["x"]))
    return path


# -- the three schemes give the same z as the weights passed directly -------------------------


def test_pytorch_names_read_oihw_weights_and_say_nchw(tmp_path, layer, direct):
    path = torch_file(tmp_path, layer)
    z, stderr = z_of(path, "--layer", "layer2.0.conv1", "--pad", "1")
    np.testing.assert_allclose(z, nchw(direct), rtol=1e-12)
    assert "convcli: note:" in stderr
    assert "layout nchw" in stderr
    assert "layer2.0.conv1.weight" in stderr


def test_pytorch_note_not_said_when_layout_given(tmp_path, layer, direct):
    path = torch_file(tmp_path, layer)
    z, stderr = z_of(path, "--layer", "layer2.0.conv1", "--pad", "1", "--layout", "nchw")
    np.testing.assert_allclose(z, nchw(direct), rtol=1e-12)
    assert "note" not in stderr


def test_keras3_names(tmp_path, layer, direct):
    path = keras3_file(tmp_path, layer)
    x = x_file(tmp_path, layer)
    z, stderr = z_of(path, "--x", f"{x}:x", "--layer", "conv2d", "--pad", "1")
    np.testing.assert_allclose(z, direct, rtol=1e-12)
    assert "nchw" not in stderr


def test_keras2_names_with_colons(tmp_path, layer, direct):
    path = keras2_file(tmp_path, layer)
    x = x_file(tmp_path, layer)
    z, _ = z_of(path, "--x", x, "--layer", "conv2d", "--pad", "1")
    np.testing.assert_allclose(z, direct, rtol=1e-12)


def test_layer_in_the_file_of_w(tmp_path, layer, direct):
    """Without a data file, --layer picks inside the file --w names."""
    path = keras2_file(tmp_path, layer)
    x = x_file(tmp_path, layer)
    z, _ = z_of("--x", x, "--w", path, "--layer", "conv2d", "--pad", "1")
    np.testing.assert_allclose(z, direct, rtol=1e-12)


def test_backward_gradcheck_compare_take_layer(tmp_path, layer):
    path = torch_file(tmp_path, layer)
    result = run("backward", path, "--layer", "layer2.0.conv1", "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["tensors"]["dw"]["shape"] == [4, 3, 3, 3]
    result = run("gradcheck", path, "--layer", "layer2.0.conv1", "--mode", "fast", "--json")
    assert result.exit_code == 0, result.stderr
    z = tmp_path / "z.npz"
    result = run("forward", path, "--layer", "layer2.0.conv1", "--out", z)
    assert result.exit_code == 0, result.stderr
    result = run("compare", path, "--layer", "layer2.0.conv1", "--expect", z)
    assert result.exit_code == 0, result.stderr
    assert "layout nchw" in result.stderr


# -- choosing, listing, refusing ---------------------------------------------------------------


def test_one_layer_needs_no_layer(tmp_path, layer, direct):
    path = torch_file(tmp_path, layer, second=False)
    z, stderr = z_of(path, "--pad", "1")
    np.testing.assert_allclose(z, nchw(direct), rtol=1e-12)
    assert "layer2.0.conv1" in stderr


@pytest.mark.parametrize(
    ("make", "names"),
    [
        (torch_file, "layer2.0.conv1, layer2.0.conv2"),
        (keras3_file, "conv2d, conv2d_1"),
        (keras2_file, "conv2d, conv2d_1"),
    ],
)
def test_several_layers_without_layer_lists_them(tmp_path, layer, make, names):
    path = make(tmp_path, layer)
    x = x_file(tmp_path, layer)
    result = run("forward", path, "--x", x)
    assert_error(result, 65, "--layer", names)
    assert "bn1" not in result.stderr
    assert "optimizer" not in result.stderr


def test_unknown_layer_lists_the_names(tmp_path, layer):
    path = torch_file(tmp_path, layer)
    result = run("forward", path, "--layer", "conv9")
    assert_error(result, 65, "--layer", "conv9", "layer2.0.conv1, layer2.0.conv2")


def test_layer_without_any_file_is_a_usage_error(tmp_path, layer):
    x = x_file(tmp_path, layer)
    result = run("forward", "--x", x, "--layer", "conv1")
    assert_error(result, 2, "--layer")


def test_a_plain_w_wins_and_layer_names_are_not_needed(tmp_path, layer):
    path = tmp_path / "plain.npz"
    np.savez(path, x=layer["x"], w=layer["w"], b=layer["b"], **{"conv1.weight": oihw(layer["w"])})
    result = run("forward", path, "--pad", "1")
    assert result.exit_code == 0, result.stderr
    assert "note" not in result.stderr


def test_a_named_w_is_not_replaced_by_a_layer(tmp_path, layer):
    path = torch_file(tmp_path, layer, second=False)
    w = tmp_path / "w.npz"
    np.savez(w, kernel=layer["w"], bias=layer["b"])
    loaded = load_tensors(path, {"w": f"{w}:kernel"}, ("x", "w"), ("b",))
    assert loaded.layer is None
    assert "b" not in loaded.arrays


# -- the library -------------------------------------------------------------------------------


def test_find_layers_on_key_names_alone():
    keys = [
        "conv1.weight",
        "conv1.bias",
        "fc.weight",
        "layers/conv2d/vars/0",
        "layers/conv2d/vars/1",
        "optimizer/vars/0",
        "model_weights/dense/dense/kernel:0",
        "model_weights/dense/dense/bias:0",
    ]
    found = find_layers(keys)
    assert {name: (lay.weight, lay.bias) for name, lay in found.items()} == {
        "conv1": ("conv1.weight", "conv1.bias"),
        "fc": ("fc.weight", None),
        "conv2d": ("layers/conv2d/vars/0", "layers/conv2d/vars/1"),
        "dense": ("model_weights/dense/dense/kernel:0", "model_weights/dense/dense/bias:0"),
    }
    assert found["conv1"].scheme.layout == "nchw"
    assert found["conv2d"].scheme.layout == "nhwc"


def test_library_errors_name_layer(tmp_path, layer):
    path = torch_file(tmp_path, layer)
    with pytest.raises(DataError, match=r"layer2\.0\.conv2") as info:
        load_tensors(path, {}, ("x", "w"), ("b",), layer="nope")
    assert info.value.param == "layer"
    assert "--layer" not in str(info.value)
    loaded = load_tensors(path, {}, ("x", "w"), ("b",), layer="layer2.0.conv2")
    assert loaded.arrays["w"].shape == (2, 4, 1, 1)
    assert loaded.hparams["layout"][0] == "nchw"
    assert loaded.origins["b"].endswith("layer2.0.conv2.bias")


def test_a_name_in_two_places_is_given_by_its_path():
    keys = ["layers/a/layers/conv2d/vars/0", "layers/b/layers/conv2d/vars/0", "layers/c/vars/0"]
    assert list(find_layers(keys)) == ["layers/a/layers/conv2d", "layers/b/layers/conv2d", "c"]


def test_gradcheck_layer_without_a_file_is_a_usage_error():
    result = run("gradcheck", "--shape", "1,4,4,2", "--kernel", "3", "--cout", "2", "--layer", "c")
    assert_error(result, 2, "--layer")


@pytest.mark.parametrize(
    ("make", "names"),
    [
        (torch_file, {"layer2.0.conv1", "layer2.0.conv2"}),
        (keras3_file, {"conv2d", "conv2d_1"}),
        (keras2_file, {"conv2d", "conv2d_1"}),
    ],
)
def test_inspect_lists_the_layers_and_their_tensors(tmp_path, layer, make, names):
    path = make(tmp_path, layer)
    result = run("inspect", path, "--json")
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert set(doc["layers"]) == names
    first = doc["layers"][sorted(names)[0]]
    assert set(first) == {"weight", "bias", "scheme", "layout"}
    by_key = {t["key"]: t for t in doc["tensors"]}
    assert by_key[first["weight"]]["layer"] == sorted(names)[0]
    table = run("inspect", path)
    assert f"w of {sorted(names)[0]}" in table.stdout
    assert f"b of {sorted(names)[0]}" in table.stdout


def test_layer_and_a_named_w_together_are_a_usage_error(tmp_path, layer):
    path = torch_file(tmp_path, layer)
    result = run("forward", path, "--layer", "layer2.0.conv1", "--w", f"{path}:x")
    assert_error(result, 2, "--layer 'layer2.0.conv1' picks w and b", "give one of the two")
