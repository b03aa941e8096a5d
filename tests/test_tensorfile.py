"""Tests for convcli.io: format detection, references, reading, loading and writing."""

from __future__ import annotations

import os
import pickle
import re
import threading

import h5py
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from convcli.cli.messages import explain
from convcli.errors import DataError, InputFileError, OutputError, OutputExistsError, UsageError
from convcli.io import detect, read_tensor, tensorfile, writing
from convcli.io.detect import detect_format, parse_ref
from convcli.io.loading import Loaded, load_tensors
from convcli.io.tensorfile import TensorFile, open_tensor_file
from convcli.io.writing import write_tensors


@pytest.fixture
def rng():
    return np.random.default_rng(20240611)


def named(path) -> str:
    """Regex matching the file name of ``path`` inside an error message."""
    return re.escape(os.path.basename(str(path)))


def layer(rng, dtype=np.float64):
    """A small conv layer: x (2, 5, 5, 3), w (3, 3, 3, 4), b (4,)."""
    return {
        "x": rng.standard_normal((2, 5, 5, 3)).astype(dtype),
        "w": rng.standard_normal((3, 3, 3, 4)).astype(dtype),
        "b": rng.standard_normal(4).astype(dtype),
    }


def make_h5(path, datasets, attrs=None, group_attrs=None):
    """Write ``datasets`` (path -> array), root ``attrs`` and ``group_attrs`` (group -> attrs)."""
    with h5py.File(path, "w") as h5:
        for name, array in datasets.items():
            h5.create_dataset(name, data=array)
        for name, value in (attrs or {}).items():
            h5.attrs[name] = value
        for group, values in (group_attrs or {}).items():
            for name, value in values.items():
                h5.require_group(group).attrs[name] = value
    return path


def truncate(path, keep):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def temp_leftovers(folder):
    return [p.name for p in folder.iterdir() if p.name.startswith(writing.TEMP_PREFIX)]


# ---------------------------------------------------------------------------------------------
# detect_format
# ---------------------------------------------------------------------------------------------


def test_detect_format_by_content_not_extension(tmp_path, rng):
    npz_named_h5 = tmp_path / "really_npz.h5"
    with open(npz_named_h5, "wb") as handle:
        np.savez(handle, x=rng.standard_normal(3))
    h5_named_npz = make_h5(tmp_path / "really_h5.npz", {"x": np.arange(3.0)})
    npy_named_txt = tmp_path / "array.txt"
    with open(npy_named_txt, "wb") as handle:
        np.save(handle, np.arange(3))
    assert detect_format(npz_named_h5) == "npz"
    assert detect_format(h5_named_npz) == "hdf5"
    assert detect_format(npy_named_txt) == "npy"
    with open_tensor_file(npz_named_h5) as tf:
        assert tf.keys() == ["x"]
    with open_tensor_file(h5_named_npz) as tf:
        np.testing.assert_array_equal(tf.read("x"), np.arange(3.0))


def test_detect_format_empty_zip_is_npz(tmp_path):
    path = tmp_path / "empty.npz"
    with open(path, "wb") as handle:
        np.savez(handle)
    assert path.read_bytes().startswith(b"PK\x05\x06")
    assert detect_format(path) == "npz"
    with open_tensor_file(path) as tf:
        assert tf.keys() == []
        assert tf.describe() == "holds no arrays"


def test_detect_format_hdf5_with_user_block(tmp_path):
    path = tmp_path / "ub.h5"
    with h5py.File(path, "w", userblock_size=512) as h5:
        h5["W"] = np.ones((1, 1, 1, 1))
    assert not path.read_bytes().startswith(b"\x89HDF")
    assert detect_format(path) == "hdf5"
    with open_tensor_file(path) as tf:
        assert tf.find("w") == "W"


def test_detect_format_empty_file(tmp_path):
    path = tmp_path / "empty.npz"
    path.write_bytes(b"")
    with pytest.raises(DataError, match=named(path) + r".*empty"):
        detect_format(path)


def test_detect_format_garbage(tmp_path):
    path = tmp_path / "sample.npz"
    path.write_bytes(b"hello, world\n")
    expected = r": not a \.npy, \.npz, HDF5 or safetensors file"
    with pytest.raises(DataError, match=named(path) + expected) as info:
        detect_format(path)
    assert "b'hello, w'" in str(info.value)


def test_detect_format_directory(tmp_path):
    with pytest.raises(InputFileError, match=named(tmp_path) + ".*directory"):
        detect_format(tmp_path)


def test_detect_format_missing(tmp_path):
    path = tmp_path / "nope.h5"
    with pytest.raises(InputFileError, match=named(path) + ".*no such file"):
        detect_format(path)
    with pytest.raises(InputFileError, match=named(path)):
        open_tensor_file(path)


def test_detect_format_under_a_file(tmp_path):
    parent = tmp_path / "plain"
    parent.write_bytes(b"x")
    with pytest.raises(InputFileError, match="plain"):
        detect_format(parent / "child.npz")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs os.mkfifo")
def test_detect_format_fifo_does_not_block(tmp_path):
    fifo = tmp_path / "pipe.npz"
    os.mkfifo(fifo)
    outcome = {}

    def probe():
        try:
            detect_format(fifo)
        except InputFileError as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout=5)
    assert not thread.is_alive(), "detect_format blocked on a FIFO"
    assert "not a regular file" in str(outcome["error"])
    assert "pipe.npz" in str(outcome["error"])


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root reads any file")
def test_detect_format_unreadable(tmp_path):
    path = tmp_path / "secret.npy"
    np.save(path, np.arange(3))
    path.chmod(0)
    try:
        with pytest.raises(InputFileError, match=named(path) + ".*permission"):
            detect_format(path)
    finally:
        path.chmod(0o600)


def test_detect_format_read_denied_simulated(tmp_path, monkeypatch):
    path = tmp_path / "secret.npz"
    np.savez(path, x=np.ones(2))

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(detect, "open", denied, raising=False)
    with pytest.raises(InputFileError, match=named(path) + ": no read permission"):
        detect_format(path)


# ---------------------------------------------------------------------------------------------
# parse_ref
# ---------------------------------------------------------------------------------------------


def test_parse_ref_forms(tmp_path):
    assert parse_ref("w.npy") == (tmp_path.__class__("w.npy"), None)
    assert parse_ref("run.npz:W") == (tmp_path.__class__("run.npz"), "W")
    assert parse_ref("run.h5:/layer1/W") == (tmp_path.__class__("run.h5"), "/layer1/W")
    assert parse_ref("a:b:c") == (tmp_path.__class__("a:b"), "c")
    assert parse_ref("run.npz:") == (tmp_path.__class__("run.npz"), None)


def test_parse_ref_existing_path_with_colon(tmp_path):
    path = tmp_path / "odd:name.npy"
    np.save(path, np.arange(2))
    assert parse_ref(str(path)) == (path, None)


# ---------------------------------------------------------------------------------------------
# Round trips and references
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_npy_round_trip(tmp_path, rng, dtype):
    array = rng.standard_normal((2, 3, 4, 5)).astype(dtype)
    path = tmp_path / "x.npy"
    np.save(path, array)
    with open_tensor_file(path) as tf:
        assert tf.format == "npy"
        assert tf.keys() == [""]
        got = tf.read("")
        assert tf.describe() == f"holds one unnamed array (2, 3, 4, 5) {np.dtype(dtype)}"
    assert got.dtype == dtype
    np.testing.assert_array_equal(got, array)


def test_npy_with_key_refused(tmp_path):
    path = tmp_path / "x.npy"
    np.save(path, np.arange(3.0))
    with open_tensor_file(path) as tf, pytest.raises(DataError, match=named(path) + ".*:W"):
        tf.read("W")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_npz_round_trip_and_key(tmp_path, rng, dtype):
    arrays = layer(rng, dtype)
    path = tmp_path / "run.npz"
    np.savez(path, **arrays)
    with open_tensor_file(path) as tf:
        assert tf.format == "npz"
        assert tf.keys() == ["b", "w", "x"]
        for name, array in arrays.items():
            got = tf.read(name)
            assert got.dtype == dtype
            np.testing.assert_array_equal(got, array)
    loaded = load_tensors(None, {"x": f"{path}:x", "w": f"{path}:w"}, ("x", "w"))
    np.testing.assert_array_equal(loaded.arrays["w"], arrays["w"])
    assert loaded.origins == {"x": f"{path}:x", "w": f"{path}:w"}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("key", ["/layer1/W", "layer1/W"])
def test_h5_round_trip_nested_key(tmp_path, rng, dtype, key):
    arrays = layer(rng, dtype)
    path = make_h5(
        tmp_path / "run.h5",
        {"layer1/A_prev": arrays["x"], "layer1/W": arrays["w"], "layer1/b": arrays["b"]},
    )
    with open_tensor_file(path) as tf:
        assert tf.format == "hdf5"
        assert tf.keys() == ["layer1/A_prev", "layer1/W", "layer1/b"]
        got = tf.read(key)
    assert got.dtype == dtype
    np.testing.assert_array_equal(got, arrays["w"])
    loaded = load_tensors(None, {"x": f"{path}:layer1/A_prev", "w": f"{path}:{key}"}, ("x", "w"))
    np.testing.assert_array_equal(loaded.arrays["w"], arrays["w"])
    assert loaded.origins["w"] == f"{path}:/layer1/W"
    assert loaded.sources == [path.resolve()]


def test_h5_scalar_dataset_is_array(tmp_path):
    path = make_h5(tmp_path / "s.h5", {"x": np.float32(2.5)})
    with open_tensor_file(path) as tf:
        got = tf.read("x")
    assert isinstance(got, np.ndarray)
    assert got.shape == ()
    assert got.dtype == np.float32


def test_h5_keys_skip_soft_and_external_links(tmp_path):
    path = make_h5(tmp_path / "links.h5", {"g/W": np.ones((1, 1, 1, 2))})
    with h5py.File(path, "a") as h5:
        h5["soft"] = h5py.SoftLink("/g")
        h5["ext"] = h5py.ExternalLink("elsewhere.h5", "/x")
        h5["g/loop"] = h5["g"]  # a hard link cycle must not recurse forever
    with open_tensor_file(path) as tf:
        keys = tf.keys()
        assert "g/W" in keys
        assert all(not key.startswith(("soft", "ext")) for key in keys)
        assert tf.find("w") is not None
        with pytest.raises(DataError, match=named(path) + ".*link"):
            tf.read("soft/W")
        with pytest.raises(DataError, match=named(path) + ".*link"):
            tf.read("ext")


def test_h5_group_key_refused(tmp_path):
    path = make_h5(tmp_path / "run.h5", {"layer1/W": np.ones(2)})
    with open_tensor_file(path) as tf, pytest.raises(DataError, match=named(path) + ".*group"):
        tf.read("layer1")


def test_h5_missing_key_lists_contents(tmp_path):
    path = make_h5(tmp_path / "run.h5", {"layer1/W": np.ones((2, 2), dtype=np.float32)})
    with open_tensor_file(path) as tf, pytest.raises(DataError) as info:
        tf.read("/layer1/X")
    message = str(info.value)
    assert "run.h5" in message
    assert "layer1/W (2, 2) float32" in message


def test_npz_missing_key_lists_contents(tmp_path):
    path = tmp_path / "run.npz"
    np.savez(path, W=np.ones((2, 2)))
    with open_tensor_file(path) as tf, pytest.raises(DataError) as info:
        tf.read("x")
    assert "run.npz" in str(info.value)
    assert "W (2, 2) float64" in str(info.value)


def test_h5_string_dataset_refused(tmp_path):
    path = make_h5(tmp_path / "s.h5", {"x": np.array([b"a", b"bc"], dtype=h5py.string_dtype())})
    with open_tensor_file(path) as tf, pytest.raises(DataError, match=named(path)):
        tf.read("x")


# ---------------------------------------------------------------------------------------------
# Roles: aliases, ambiguity, missing tensors
# ---------------------------------------------------------------------------------------------


def test_find_aliases(tmp_path, rng):
    arrays = layer(rng)
    path = tmp_path / "cnn.npz"
    np.savez(path, A_prev=arrays["x"], W=arrays["w"], b=arrays["b"], pad=1, stride=2)
    with open_tensor_file(path) as tf:
        assert tf.find("x") == "A_prev"
        assert tf.find("w") == "W"
        assert tf.find("b") == "b"
        assert tf.find("dz") is None
        assert tf.describe() == (
            "holds: A_prev (2, 5, 5, 3) float64, W (3, 3, 3, 4) float64, b (4,) float64, "
            "pad () int64, stride () int64"
        )
    loaded = load_tensors(str(path), {}, ("x", "w"), ("b", "dz"))
    assert isinstance(loaded, Loaded)
    assert set(loaded.arrays) == {"x", "w", "b"}
    np.testing.assert_array_equal(loaded.arrays["x"], arrays["x"])
    assert loaded.origins["x"] == f"{path}:A_prev"
    assert loaded.hparams["padding"] == (1, f"{path} entry 'pad'")
    assert loaded.hparams["stride"] == (2, f"{path} entry 'stride'")


def test_find_is_case_sensitive_and_uses_basename(tmp_path):
    datasets = {"net/conv1/Weights": np.ones(1), "net/conv1/weights": np.ones(1)}
    path = make_h5(tmp_path / "run.h5", datasets)
    with open_tensor_file(path) as tf:
        assert tf.find("w") == "net/conv1/weights"


@pytest.mark.parametrize(
    ("names", "listed"),
    [(["x", "X"], "X, x"), (["a/x", "b/x"], "a/x, b/x"), (["input", "A_prev"], "A_prev, input")],
)
def test_find_ambiguous(tmp_path, names, listed):
    path = make_h5(tmp_path / "file.h5", {name: np.ones(2) for name in names})
    with open_tensor_file(path) as tf, pytest.raises(DataError) as info:
        tf.find("x")
    assert str(info.value) == f"ambiguous: {path} holds several candidates for x: {listed}"


def test_hparam_entries_never_match_as_tensors(tmp_path):
    path = tmp_path / "only_hparams.npz"
    np.savez(path, stride=2, pad=1, groups=1, dilation=1)
    with open_tensor_file(path) as tf:
        assert tf.tensor_keys() == []
        assert all(tf.find(role) is None for role in tensorfile.ALIASES)


def test_load_missing_required_lists_contents(tmp_path):
    path = tmp_path / "data.npz"
    np.savez(path, W=np.ones((1, 1, 1, 1)), stride=1)
    with pytest.raises(DataError) as info:
        load_tensors(str(path), {}, ("x", "w"))
    message = str(info.value)
    assert message.startswith(f"no x found in {path} (looked for x, X, A_prev, input)")
    assert "W (1, 1, 1, 1) float64" in message
    assert "pass x FILE:KEY" in message  # the library names the parameter...
    assert info.value.param == "x"
    assert "pass --x FILE:KEY" in explain(info.value)  # ...the command line its flag


def test_load_nothing_given():
    with pytest.raises(UsageError, match=r"no x given: pass a data file or x FILE\[:KEY\]") as info:
        load_tensors(None, {"x": None, "w": None}, ("x", "w"))
    assert explain(info.value) == "no x given: pass a data file or --x FILE[:KEY]"


def test_load_optional_absent_is_skipped(tmp_path, rng):
    arrays = layer(rng)
    path = tmp_path / "d.npz"
    np.savez(path, x=arrays["x"], w=arrays["w"])
    loaded = load_tensors(path, {}, ("x", "w"), ("b", "dz"))
    assert set(loaded.arrays) == {"x", "w"}
    assert loaded.hparams == {}


def test_load_npy_data_file_refused(tmp_path):
    path = tmp_path / "x.npy"
    np.save(path, np.ones(3))
    with pytest.raises(DataError, match=named(path)) as info:
        load_tensors(str(path), {}, ("x", "w"))
    assert explain(info.value).endswith(f"pass it as the file of one tensor, e.g. --x {path}")


def test_load_explicit_refs_win_and_files_opened_once(tmp_path, rng, monkeypatch):
    arrays = layer(rng)
    data = make_h5(
        tmp_path / "run.h5", {"x": arrays["x"], "w": np.zeros((3, 3, 3, 4))}, attrs={"stride": 2}
    )
    w_path = tmp_path / "w.npy"
    np.save(w_path, arrays["w"])
    opened = []
    real_open = tensorfile.open_tensor_file

    def counting_open(path, **options):
        opened.append(os.path.basename(str(path)))
        return real_open(path, **options)

    monkeypatch.setattr(tensorfile, "open_tensor_file", counting_open)
    loaded = load_tensors(str(data), {"w": str(w_path), "x": f"{data}:x"}, ("x", "w"))
    np.testing.assert_array_equal(loaded.arrays["w"], arrays["w"])
    np.testing.assert_array_equal(loaded.arrays["x"], arrays["x"])
    assert loaded.origins == {"x": f"{data}:/x", "w": str(w_path)}
    assert loaded.hparams == {"stride": (2, f"{data} attribute 'stride' on /")}
    assert sorted(opened) == ["run.h5", "w.npy"]
    assert sorted(loaded.sources) == sorted([data.resolve(), w_path.resolve()])


def test_load_ref_without_key(tmp_path, rng):
    arrays = layer(rng)
    single = tmp_path / "single.npz"
    np.savez(single, kernel=arrays["w"], stride=1)
    named_file = tmp_path / "named.npz"
    np.savez(named_file, A_prev=arrays["x"], other=arrays["b"])
    many = tmp_path / "many.npz"
    np.savez(many, p=arrays["x"], q=arrays["w"])
    loaded = load_tensors(None, {"x": str(named_file), "w": str(single)}, ("x", "w"))
    np.testing.assert_array_equal(loaded.arrays["w"], arrays["w"])
    np.testing.assert_array_equal(loaded.arrays["x"], arrays["x"])
    assert loaded.hparams == {}  # hyperparameters come from x's file: named.npz has none
    with pytest.raises(DataError, match=named(many) + r".*p \(2, 5, 5, 3\)"):
        load_tensors(None, {"x": str(many), "w": str(single)}, ("x", "w"))


def test_load_hparams_from_x_file_without_data(tmp_path, rng):
    arrays = layer(rng)
    path = make_h5(tmp_path / "x.h5", {"net/A_prev": arrays["x"]}, group_attrs={"net": {"pad": 1}})
    w_path = tmp_path / "w.npy"
    np.save(w_path, arrays["w"])
    loaded = load_tensors(None, {"x": str(path), "w": str(w_path)}, ("x", "w"))
    assert loaded.hparams == {"padding": (1, f"{path} attribute 'pad' on /net")}


def test_load_missing_ref_file(tmp_path):
    missing = tmp_path / "gone.npz"
    with pytest.raises(InputFileError, match=named(missing)):
        load_tensors(None, {"x": f"{missing}:x", "w": f"{missing}:w"}, ("x", "w"))


# ---------------------------------------------------------------------------------------------
# Hyperparameters
# ---------------------------------------------------------------------------------------------


def test_hparams_h5_root_attrs(tmp_path):
    path = make_h5(
        tmp_path / "conv_example.h5",
        {"A_prev": np.ones((1, 2, 2, 1))},
        attrs={"pad": 2, "stride": np.int64(1), "dilation": [1, 2], "groups": 1, "other": 5},
    )
    with open_tensor_file(path) as tf:
        found = tf.hparams(near_key="A_prev")
    assert found == {
        "padding": (2, f"{path} attribute 'pad' on /"),
        "stride": (1, f"{path} attribute 'stride' on /"),
        "dilation": ([1, 2], f"{path} attribute 'dilation' on /"),
        "groups": (1, f"{path} attribute 'groups' on /"),
    }
    assert type(found["stride"][0]) is int


def test_hparams_h5_group_overrides_root(tmp_path):
    path = make_h5(
        tmp_path / "run.h5",
        {"layer1/A_prev": np.ones((1, 2, 2, 1)), "layer2/A_prev": np.ones((1, 2, 2, 1))},
        attrs={"stride": 1, "pad": 0},
        group_attrs={"layer1": {"stride": [2, 2], "padding": b"same"}},
    )
    with open_tensor_file(path) as tf:
        near = tf.hparams(near_key="/layer1/A_prev")
        other = tf.hparams(near_key="layer2/A_prev")
        root = tf.hparams()
    assert near == {
        "stride": ([2, 2], f"{path} attribute 'stride' on /layer1"),
        "padding": ("same", f"{path} attribute 'padding' on /layer1"),
    }
    expected_root = {
        "stride": (1, f"{path} attribute 'stride' on /"),
        "padding": (0, f"{path} attribute 'pad' on /"),
    }
    assert other == expected_root
    assert root == expected_root


def test_hparams_npz_entries(tmp_path):
    path = tmp_path / "run.npz"
    np.savez(
        path, x=np.ones((1, 3, 3, 1)), stride=np.array([2, 1]), padding=np.array("same"), groups=1
    )
    with open_tensor_file(path) as tf:
        found = tf.hparams()
    assert found == {
        "stride": ([2, 1], f"{path} entry 'stride'"),
        "padding": ("same", f"{path} entry 'padding'"),
        "groups": (1, f"{path} entry 'groups'"),
    }


def test_hparams_npz_large_entry_refused(tmp_path):
    path = tmp_path / "run.npz"
    np.savez(path, x=np.ones(2), stride=np.ones(17, dtype=int))
    with open_tensor_file(path) as tf, pytest.raises(DataError, match=named(path) + ".*stride"):
        tf.hparams()


@pytest.mark.parametrize("fmt", ["npz", "h5"])
def test_hparams_pad_and_padding_conflict(tmp_path, fmt):
    path = tmp_path / f"both.{fmt}"
    if fmt == "npz":
        np.savez(path, x=np.ones(2), pad=1, padding=2)
    else:
        make_h5(path, {"x": np.ones(2)}, attrs={"pad": 1, "padding": 2})
    with open_tensor_file(path) as tf, pytest.raises(DataError) as info:
        tf.hparams(near_key="x")
    assert f"both.{fmt}" in str(info.value)
    assert "'pad' and 'padding'" in str(info.value)


def test_hparams_npy_is_empty(tmp_path):
    path = tmp_path / "x.npy"
    np.save(path, np.ones(2))
    with open_tensor_file(path) as tf:
        assert tf.hparams() == {}


# ---------------------------------------------------------------------------------------------
# Unsafe, truncated and corrupt content
# ---------------------------------------------------------------------------------------------


def test_object_npy_refused_without_unpickling(tmp_path, monkeypatch):
    path = tmp_path / "objects.npy"
    np.save(path, np.array([{}], dtype=object), allow_pickle=True)

    def forbidden(*args, **kwargs):
        raise AssertionError("pickle must not be used")

    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    with open_tensor_file(path) as tf:
        assert "object" in tf.describe()
        with pytest.raises(DataError, match=named(path)):
            tf.read("")


def test_object_npz_member_refused(tmp_path):
    path = tmp_path / "objects.npz"
    np.savez(path, x=np.array([{}], dtype=object), allow_pickle=True)
    with open_tensor_file(path) as tf, pytest.raises(DataError, match=named(path)):
        tf.read("x")


def test_truncated_npy(tmp_path, rng):
    path = tmp_path / "x.npy"
    np.save(path, rng.standard_normal(100))
    truncate(path, 0.6)
    with open_tensor_file(path) as tf, pytest.raises(DataError, match=named(path)) as info:
        tf.read("")
    assert "\n" not in str(info.value)


def test_truncated_npz(tmp_path, rng):
    path = tmp_path / "run.npz"
    np.savez(path, x=rng.standard_normal(100), w=rng.standard_normal(100))
    truncate(path, 0.5)
    with pytest.raises(DataError, match=named(path)):
        open_tensor_file(path)


def test_corrupt_npz_member(tmp_path, rng):
    path = tmp_path / "run.npz"
    np.savez(path, x=rng.standard_normal(1000))
    data = bytearray(path.read_bytes())
    data[2000:2100] = bytes(100)  # inside the array data: the CRC no longer matches
    path.write_bytes(bytes(data))
    with open_tensor_file(path) as tf, pytest.raises(DataError, match=named(path)):
        tf.read("x")


def test_truncated_h5(tmp_path, rng):
    path = make_h5(tmp_path / "run.h5", {"x": rng.standard_normal(1000)})
    truncate(path, 0.5)
    with pytest.raises(DataError, match=named(path)):
        open_tensor_file(path)


# ---------------------------------------------------------------------------------------------
# write_tensors
# ---------------------------------------------------------------------------------------------


ATTRS = {"stride": [2, 2], "padding": [[2, 2], [2, 2]], "dilation": [1, 1], "groups": 1}


@pytest.mark.parametrize("suffix", [".npz", ".h5", ".hdf5"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_write_round_trip(tmp_path, rng, suffix, dtype):
    z = rng.standard_normal((2, 3, 3, 4)).astype(dtype)
    path = tmp_path / f"out{suffix}"
    write_tensors(path, {"z": z}, ATTRS)
    assert temp_leftovers(tmp_path) == []
    with open_tensor_file(path) as tf:
        got = tf.read("z")
        found = tf.hparams(near_key="z")
    assert got.dtype == dtype
    np.testing.assert_array_equal(got, z)
    assert {name: value for name, (value, _) in found.items()} == ATTRS


def test_write_string_attr_round_trip(tmp_path):
    for suffix in (".npz", ".h5"):
        path = tmp_path / f"s{suffix}"
        write_tensors(path, {"z": np.ones(1)}, {"padding": "same", "stride": [1, 2]})
        with open_tensor_file(path) as tf:
            assert tf.hparams()["padding"][0] == "same"
            assert tf.hparams()["stride"][0] == [1, 2]


hparam_values = st.one_of(
    st.integers(0, 9),
    st.lists(st.integers(0, 9), min_size=2, max_size=2),
    st.lists(st.lists(st.integers(0, 9), min_size=2, max_size=2), min_size=2, max_size=2),
)


@settings(max_examples=25, deadline=None)
@given(
    stride=hparam_values,
    padding=hparam_values,
    suffix=st.sampled_from([".npz", ".h5"]),
)
def test_write_hparams_round_trip_property(tmp_path_factory, stride, padding, suffix):
    folder = tmp_path_factory.mktemp("prop")
    path = folder / f"out{suffix}"
    write_tensors(path, {"z": np.zeros(1)}, {"stride": stride, "padding": padding})
    with open_tensor_file(path) as tf:
        found = tf.hparams()
    assert found["stride"][0] == stride
    assert found["padding"][0] == padding


def test_write_refuses_existing_without_force(tmp_path):
    path = tmp_path / "out.h5"
    path.write_bytes(b"old")
    with pytest.raises(OutputExistsError, match=named(path) + " exists$") as info:
        write_tensors(path, {"z": np.ones(2)}, {})
    assert info.value.param == "out"
    assert explain(info.value) == f"{path} exists; pass --force to overwrite"
    assert path.read_bytes() == b"old"


def test_write_force_overwrites(tmp_path):
    path = tmp_path / "out.npz"
    path.write_bytes(b"old")
    path.chmod(0o640)
    write_tensors(path, {"z": np.arange(3.0)}, {"groups": 1}, force=True)
    with open_tensor_file(path) as tf:
        np.testing.assert_array_equal(tf.read("z"), np.arange(3.0))
    assert path.stat().st_mode & 0o777 == 0o640
    assert temp_leftovers(tmp_path) == []


def test_write_new_file_mode_follows_umask(tmp_path):
    path = tmp_path / "new.h5"
    write_tensors(path, {"z": np.ones(1)}, {})
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


def test_write_refuses_protected_input(tmp_path):
    source = tmp_path / "in.h5"
    make_h5(source, {"x": np.ones(2)})
    before = source.read_bytes()
    for target in (source, tmp_path / "." / "in.h5"):
        with pytest.raises(OutputError, match=r"refusing to write over input file .*in\.h5"):
            write_tensors(target, {"z": np.ones(2)}, {}, force=True, protect=[source.resolve()])
    assert source.read_bytes() == before


def test_write_refuses_protected_through_symlink(tmp_path):
    source = tmp_path / "in.npz"
    np.savez(source, x=np.ones(2))
    link = tmp_path / "link.npz"
    link.symlink_to(source)
    with pytest.raises(OutputError, match="refusing"):
        write_tensors(link, {"z": np.ones(2)}, {}, force=True, protect=[source])


@pytest.mark.parametrize("name", ["out.npy", "out.txt", "out"])
def test_write_unknown_extension(tmp_path, name):
    expected = r"^out must end in \.npz, \.h5, \.hdf5 or \.safetensors.*" + name
    with pytest.raises(UsageError, match=expected) as info:
        write_tensors(tmp_path / name, {"z": np.ones(2)}, {})
    assert explain(info.value).startswith("--out must end in .npz, .h5, .hdf5 or .safetensors")
    with pytest.raises(UsageError) as info:
        write_tensors(tmp_path / name, {"z": np.ones(2)}, {}, param="generate_out")
    assert explain(info.value).startswith("OUT must end in .npz, .h5, .hdf5 or .safetensors")


def test_write_missing_folder(tmp_path):
    path = tmp_path / "no" / "such" / "out.h5"
    with pytest.raises(OutputError, match=named(path) + ".*does not exist"):
        write_tensors(path, {"z": np.ones(2)}, {})


def test_write_directory_target(tmp_path):
    folder = tmp_path / "dir.h5"
    folder.mkdir()
    with pytest.raises(OutputError, match=r"dir\.h5"):
        write_tensors(folder, {"z": np.ones(2)}, {}, force=True)


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root writes anywhere")
def test_write_unwritable_folder(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        with pytest.raises(OutputError, match="not writable"):
            write_tensors(folder / "out.h5", {"z": np.ones(2)}, {})
    finally:
        folder.chmod(0o700)


def test_write_unwritable_folder_simulated(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "access", lambda *args, **kwargs: False)
    with pytest.raises(OutputError, match=r"out\.h5: folder .* is not writable"):
        write_tensors(tmp_path / "out.h5", {"z": np.ones(2)}, {})


def test_write_refuses_object_arrays(tmp_path):
    with pytest.raises(DataError, match=r"out\.npz"):
        write_tensors(tmp_path / "out.npz", {"z": np.array([{}], dtype=object)}, {})
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("error", [RuntimeError("boom"), KeyboardInterrupt()])
def test_failed_npz_write_keeps_target(tmp_path, monkeypatch, error):
    path = tmp_path / "out.npz"
    np.savez(path, z=np.arange(4.0))
    before = path.read_bytes()

    def failing_savez(file, *args, **kwargs):
        file.write(b"partial")
        raise error

    monkeypatch.setattr(np, "savez", failing_savez)
    with pytest.raises(type(error)):
        write_tensors(path, {"z": np.ones(2)}, {}, force=True)
    assert path.read_bytes() == before
    assert temp_leftovers(tmp_path) == []


def test_failed_h5_write_keeps_target(tmp_path, monkeypatch):
    path = make_h5(tmp_path / "out.h5", {"z": np.arange(4.0)})
    before = path.read_bytes()

    def failing_create(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(h5py.Group, "create_dataset", failing_create)
    with pytest.raises(OutputError, match=named(path) + ".*disk full"):
        write_tensors(path, {"z": np.ones(2)}, {"groups": 1}, force=True)
    assert path.read_bytes() == before
    assert temp_leftovers(tmp_path) == []


def test_tensorfile_closes(tmp_path):
    path = make_h5(tmp_path / "c.h5", {"x": np.ones(1)})
    with open_tensor_file(path) as tf:
        assert isinstance(tf, TensorFile)
        assert repr(tf) == f"TensorFile({str(path)!r}, format='hdf5')"
    with pytest.raises(DataError, match="closed"):
        tf.read("x")
    tf.close()  # closing twice is harmless


# ---------------------------------------------------------------------------------------------
# read_tensor (public API)
# ---------------------------------------------------------------------------------------------


def test_read_tensor_from_every_format(tmp_path, rng):
    arrays = layer(rng)
    npy = tmp_path / "w.npy"
    np.save(npy, arrays["w"])
    npz = tmp_path / "layer.npz"
    np.savez(npz, x=arrays["x"], W=arrays["w"], stride=2)
    single = tmp_path / "single.npz"
    np.savez(single, kernel=arrays["w"], pad=1)  # one tensor besides a hyperparameter
    h5 = make_h5(tmp_path / "layer.h5", {"net/A_prev": arrays["x"], "net/W": arrays["w"]})
    np.testing.assert_array_equal(read_tensor(npy), arrays["w"])
    np.testing.assert_array_equal(read_tensor(str(npy)), arrays["w"])
    np.testing.assert_array_equal(read_tensor(npz, "W"), arrays["w"])
    np.testing.assert_array_equal(read_tensor(f"{npz}:x"), arrays["x"])
    np.testing.assert_array_equal(read_tensor(single), arrays["w"])
    np.testing.assert_array_equal(read_tensor(h5, "/net/W"), arrays["w"])
    np.testing.assert_array_equal(read_tensor(f"{h5}:net/A_prev"), arrays["x"])
    assert read_tensor(npz, "W").dtype == np.float64


def test_read_tensor_errors_are_typed(tmp_path, rng):
    npz = tmp_path / "layer.npz"
    np.savez(npz, **layer(rng))
    with pytest.raises(DataError, match=r"holds 3 arrays; say which one.*holds: b \(4,\)"):
        read_tensor(npz)
    with pytest.raises(DataError, match=r"no entry 'nope'"):
        read_tensor(npz, "nope")
    with pytest.raises(InputFileError, match="no such file"):
        read_tensor(tmp_path / "missing.h5")
    objects = tmp_path / "objects.npy"
    np.save(objects, np.array([{}], dtype=object), allow_pickle=True)
    with pytest.raises(DataError, match="never unpickles"):
        read_tensor(objects)


def test_memory_guard_names_its_parameter(tmp_path):
    path = tmp_path / "big.npz"
    np.savez(path, x=np.ones((64, 64)))
    with open_tensor_file(path) as tf, pytest.raises(DataError) as info:
        tf.read("x", max_bytes=1024)
    assert info.value.param == "max_memory"
    assert "left of max_memory); raise max_memory" in str(info.value)
    assert "(1 KiB left of --max-memory); raise --max-memory, or store it in HDF5" in explain(
        info.value
    )
