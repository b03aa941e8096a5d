"""Channels first through every path: streamed and in-memory runs agree in both layouts, slices
and heatmaps are checked against the shapes the user sees, and a streamed input that changes
during a run is refused (exit 65) instead of mixed into the result."""

import json
import os

import h5py
import numpy as np
import pytest
from typer.testing import CliRunner

from convcli import ConvSpec, DataError, conv_backward, conv_forward
from convcli.cli import app
from convcli.io.loading import DatasetRef, load_tensors
from convcli.run import RunInputs, RunOptions, run_backward, run_forward, tensor_shapes

runner = CliRunner()
BUDGET = "16K"  # every x below is bigger, so it is streamed one image per block
SPATIAL = {1: (100,), 2: (12, 11), 3: (5, 6, 7)}
KERNEL = {1: (3,), 2: (3, 2), 3: (3, 2, 3)}
CIN, COUT, N = 3, 4, 8


def write_layer(path, layout: str, rank: int, seed: int = 0):
    """x, w, b and dz in ``layout`` (pad 1, layout stored as attributes); returns them."""
    rng = np.random.default_rng(seed)
    spatial, kernel = SPATIAL[rank], KERNEL[rank]
    if layout == "nchw":
        x_shape, w_shape = (N, CIN, *spatial), (COUT, CIN, *kernel)
    else:
        x_shape, w_shape = (N, *spatial, CIN), (*kernel, CIN, COUT)
    arrays = {
        "x": rng.standard_normal(x_shape),
        "w": rng.standard_normal(w_shape),
        "b": rng.standard_normal(COUT),
    }
    z, _ = conv_forward(arrays["x"], arrays["w"], arrays["b"], ConvSpec(padding=1, layout=layout))
    arrays["dz"] = rng.standard_normal(z.shape)
    with h5py.File(path, "w") as f:
        for name, value in arrays.items():
            f[name] = value
        f.attrs["pad"] = 1
        f.attrs["layout"] = layout
    return arrays


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def run_json(*args):
    result = invoke(*args, "--json")
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def read(path):
    with h5py.File(path) as f:
        return {name: f[name][()] for name in f}


def assert_same_run(streamed, in_memory):
    """Same tensors, shapes, dtypes and statistics (to rounding), and the same slices."""
    assert streamed["streamed"] is True
    assert in_memory["streamed"] is False
    assert streamed["tensors"].keys() == in_memory["tensors"].keys()
    for name, expected in in_memory["tensors"].items():
        got = streamed["tensors"][name]
        assert got["shape"] == expected["shape"], name
        assert got["dtype"] == expected["dtype"], name
        for key in ("mean", "std", "min", "max"):
            assert got[key] == pytest.approx(expected[key], rel=1e-12, abs=1e-14), (name, key)
    assert streamed["slices"].keys() == in_memory["slices"].keys()
    for label, expected in in_memory["slices"].items():
        np.testing.assert_allclose(streamed["slices"][label], expected, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("rank", [1, 2, 3])
@pytest.mark.parametrize("layout", ["nhwc", "nchw"])
def test_streamed_forward_equals_in_memory(tmp_path, layout, rank):
    data = tmp_path / "layer.h5"
    arrays = write_layer(data, layout, rank)
    z, _ = conv_forward(arrays["x"], arrays["w"], arrays["b"], ConvSpec(padding=1, layout=layout))
    # last image, last channel: the channel axis is 1 for nchw and -1 for nhwc
    channel = f"z[{N - 1},{COUT - 1}]" if layout == "nchw" else f"z[{N - 1},...,{COUT - 1}]"
    runs = {}
    for kind, extra in (("streamed", ["--max-workspace", BUDGET]), ("memory", [])):
        out = tmp_path / f"{kind}.h5"
        runs[kind] = run_json("forward", data, *extra, "--out", out, "--slice", channel)
        np.testing.assert_allclose(read(out)["z"], z, rtol=1e-12, atol=1e-12)
    assert_same_run(runs["streamed"], runs["memory"])
    assert runs["streamed"]["tensors"]["z"]["shape"] == list(z.shape)
    assert runs["streamed"]["tensors"]["x"]["shape"] == list(arrays["x"].shape)
    expected = z[N - 1, COUT - 1] if layout == "nchw" else z[N - 1, ..., COUT - 1]
    np.testing.assert_allclose(runs["streamed"]["slices"][channel], expected, rtol=1e-12)


@pytest.mark.parametrize("upstream", [["--dz", "FILE:dz"], ["--upstream", "random", "--seed", "3"]])
@pytest.mark.parametrize("rank", [1, 2, 3])
@pytest.mark.parametrize("layout", ["nhwc", "nchw"])
def test_streamed_backward_equals_in_memory(tmp_path, layout, rank, upstream):
    data = tmp_path / "layer.h5"
    arrays = write_layer(data, layout, rank)
    upstream = [str(data) + ":dz" if a == "FILE:dz" else a for a in upstream]
    slices = ["--slice", "dx[2,1]"]
    if upstream[0] == "--dz":  # a dz generated block by block is not kept, so not sliceable
        slices += ["--slice", "dz[1,0]"]
    runs = {}
    for kind, extra in (("streamed", ["--max-workspace", BUDGET]), ("memory", [])):
        out = tmp_path / f"{kind}.h5"
        runs[kind] = run_json("backward", data, *upstream, *extra, "--out", out, *slices)
        runs[kind]["written"] = read(out)
    assert_same_run(runs["streamed"], runs["memory"])
    for name in ("dx", "dw", "db"):
        np.testing.assert_allclose(
            runs["streamed"]["written"][name],
            runs["memory"]["written"][name],
            rtol=1e-12,
            atol=1e-12,
        )
    shapes = {name: t["shape"] for name, t in runs["streamed"]["tensors"].items()}
    assert shapes["dx"] == shapes["x"] == list(arrays["x"].shape)
    assert shapes["dw"] == shapes["w"] == list(arrays["w"].shape)
    assert shapes["dz"] == shapes["z"] == list(arrays["dz"].shape)
    if upstream[0] == "--dz":  # the file's own dz, in its layout, is what was used
        _, cache = conv_forward(
            arrays["x"], arrays["w"], arrays["b"], ConvSpec(padding=1, layout=layout)
        )
        dx, _, _ = conv_backward(arrays["dz"], cache)
        np.testing.assert_allclose(runs["streamed"]["written"]["dx"], dx, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("rank", [1, 2, 3])
@pytest.mark.parametrize("layout", ["nhwc", "nchw"])
def test_tensor_shapes_are_the_shapes_the_engine_returns(layout, rank):
    rng = np.random.default_rng(2)
    spatial, kernel = SPATIAL[rank], KERNEL[rank]
    spec = ConvSpec(stride=2, padding=1, groups=2, layout=layout)
    if layout == "nchw":
        x, w = rng.standard_normal((2, 4, *spatial)), rng.standard_normal((6, 2, *kernel))
    else:
        x, w = rng.standard_normal((2, *spatial, 4)), rng.standard_normal((*kernel, 2, 6))
    b = rng.standard_normal(6)
    z, cache = conv_forward(x, w, b, spec)
    dx, dw, db = conv_backward(z, cache)
    actual = {"x": x, "w": w, "b": b, "z": z, "dz": z, "dx": dx, "dw": dw, "db": db}
    shapes = tensor_shapes("backward", spec.geometry(x.shape, w.shape), b.shape)
    assert shapes == {name: value.shape for name, value in actual.items()}
    assert list(shapes) == list(actual)  # display order: inputs, then outputs


# -- slices and heatmaps are checked against the shapes the user sees ------------------------


@pytest.fixture
def nchw_layer(tmp_path):
    """x (1, 2, 6, 6), w (8, 2, 3, 3), pad 1, channels first: z is (1, 8, 6, 6)."""
    rng = np.random.default_rng(1)
    path = tmp_path / "nchw.h5"
    with h5py.File(path, "w") as f:
        f["x"] = rng.standard_normal((1, 2, 6, 6))
        f["w"] = rng.standard_normal((8, 2, 3, 3))
        f.attrs["pad"] = 1
        f.attrs["layout"] = "nchw"
    return path


@pytest.mark.parametrize("command", ["forward", "backward"])
def test_slices_and_heatmaps_use_the_users_layout(nchw_layer, command):
    with h5py.File(nchw_layer) as f:
        z, _ = conv_forward(f["x"][()], f["w"][()], None, ConvSpec(padding=1, layout="nchw"))
    name = "z" if command == "forward" else "dz"  # --upstream z: dz is z
    doc = run_json(command, nchw_layer, "--slice", f"{name}[0,7,5,0]", "--heatmap", f"{name}[0,7]")
    assert doc["tensors"][name]["shape"] == [1, 8, 6, 6]
    np.testing.assert_allclose(doc["slices"][f"{name}[0,7,5,0]"], z[0, 7, 5, 0], rtol=1e-12)
    np.testing.assert_allclose(doc["heatmaps"][f"{name}[0,7]"], z[0, 7], rtol=1e-12)


@pytest.mark.parametrize("streamed", [False, True])
def test_a_slice_outside_the_users_shape_is_refused_before_any_output(
    nchw_layer, tmp_path, streamed
):
    out = tmp_path / "z.h5"
    budget = ["--max-workspace", "256"] if streamed else []
    # z[0,0,0,7] fits the channels-last (1, 6, 6, 8) but not the (1, 8, 6, 6) the user sees
    result = invoke("forward", nchw_layer, *budget, "--out", out, "--slice", "z[0,0,0,7]")
    assert result.exit_code == 2, result.stderr
    assert "shape of z is (1, 8, 6, 6)" in result.stderr
    assert not out.exists()


# -- a streamed input is read through one handle and must not change during the run ----------


def other_file(tmp_path, layout="nhwc"):
    """A second file with the same shapes as ``write_layer``'s and different values."""
    path = tmp_path / "other.h5"
    write_layer(path, layout, 2, seed=9)
    return path


def load_streamed(path, required=("x", "w"), optional=("b",)):
    loaded = load_tensors(path, {}, required, optional, lazy_above=16 * 1024)
    assert isinstance(loaded.arrays["x"], DatasetRef)
    return loaded


def age(path):
    """Date the file an hour back, as a file written earlier would be (mtime resolution)."""
    past = os.stat(path).st_mtime_ns - 3600 * 10**9
    os.utime(path, ns=(past, past))


def overwrite_in_place(path, key="x"):
    """Change the last image of ``key`` in place, as another process writing the file would."""
    with h5py.File(path) as f:
        dataset = f[key]
        new_values = -dataset[-1] - 1.0
        start = dataset.id.get_offset() + dataset.id.get_storage_size() - new_values.nbytes
    with open(path, "r+b") as handle:  # contiguous storage: the last image ends the data
        handle.seek(start)
        handle.write(new_values.tobytes())


@pytest.mark.parametrize("command", ["forward", "backward"])
@pytest.mark.parametrize("change", ["replaced", "modified in place"])
def test_a_streamed_input_changed_during_the_run_is_refused(tmp_path, command, change):
    data = tmp_path / "layer.h5"
    write_layer(data, "nhwc", 2)
    age(data)
    replacement = other_file(tmp_path)
    loaded = load_streamed(data, optional=("b", "dz"))
    blocks = []

    def between_blocks(done, total):
        blocks.append(done)
        if done == 1:
            if change == "replaced":
                os.replace(replacement, data)
            else:
                overwrite_in_place(data)

    run = run_forward if command == "forward" else run_backward
    with pytest.raises(DataError, match=r"layer\.h5 changed while it was read"):
        run(
            RunInputs.from_loaded(loaded),
            ConvSpec(padding=1),
            RunOptions(workspace=16 * 1024, out=tmp_path / "out.h5"),
            progress=between_blocks,
        )
    assert blocks[0] == 1
    assert not (tmp_path / "out.h5").exists()


def test_a_streamed_input_replaced_before_the_run_is_refused(tmp_path):
    data = tmp_path / "layer.h5"
    write_layer(data, "nhwc", 2)
    loaded = load_streamed(data)
    os.replace(other_file(tmp_path), data)
    with pytest.raises(DataError, match=r"layer\.h5 changed"):
        run_forward(
            RunInputs.from_loaded(loaded), ConvSpec(padding=1), RunOptions(workspace=16 * 1024)
        )


def test_cli_exits_65_when_the_streamed_file_is_replaced_mid_run(tmp_path, monkeypatch):
    from convcli.io import loading

    data = tmp_path / "layer.h5"
    write_layer(data, "nchw", 2)
    replacement = other_file(tmp_path, "nchw")
    read_rows = loading.OpenDataset.read

    def read_then_replace(self, start, stop):
        rows = read_rows(self, start, stop)
        if start == 0 and replacement.exists():
            os.replace(replacement, data)
        return rows

    monkeypatch.setattr(loading.OpenDataset, "read", read_then_replace)
    result = invoke("forward", data, "--max-workspace", BUDGET, "--json")
    assert result.exit_code == 65, result.stdout
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("convcli: error: x: ")
    assert "changed while it was read" in lines[0]
