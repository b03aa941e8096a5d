"""`.npy` inputs bigger than the workspace stream like HDF5 ones: same results, bounded memory."""

import json
import os

import h5py
import numpy as np
import pytest
from typer.testing import CliRunner

from convcli import ConvSpec
from convcli.cli import app
from convcli.errors import DataError
from convcli.io.loading import DatasetRef, load_tensors
from convcli.io.npy import NpyReader
from convcli.run import RunInputs, RunOptions, run_forward
from tests.conftest import peak_rss

runner = CliRunner()
BUDGET = "256K"


def run_json(*args):
    result = runner.invoke(app, [str(a) for a in args] + ["--json"])
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def read(path, key):
    with h5py.File(path) as f:
        return f[key][()]


@pytest.fixture
def npy_layer(tmp_path):
    """x of 1 MiB (4x the 256 KiB budget) and dz as .npy files, w and b beside them."""
    rng = np.random.default_rng(0)
    arrays = {
        "x": rng.standard_normal((64, 16, 16, 8)),
        "w": rng.standard_normal((3, 3, 8, 4)),
        "b": rng.standard_normal(4),
        "dz": rng.standard_normal((64, 16, 16, 4)),
    }
    for name, array in arrays.items():
        np.save(tmp_path / f"{name}.npy", array)
    return tmp_path


def refs(folder, *names):
    return [arg for name in names for arg in (f"--{name}", folder / f"{name}.npy")]


def assert_same_stats(streamed, in_memory):
    assert streamed["streamed"] is True
    assert in_memory["streamed"] is False
    for name, expected in in_memory["tensors"].items():
        got = streamed["tensors"][name]
        assert got["shape"] == expected["shape"]
        for key in ("mean", "std", "min", "max"):
            assert got[key] == pytest.approx(expected[key], rel=1e-12, abs=1e-15), (name, key)


def test_forward_streams_a_big_npy_with_the_in_memory_results(npy_layer, tmp_path):
    common = ["forward", *refs(npy_layer, "x", "w", "b"), "--pad", "1", "--slice", "x[63,0,0]"]
    streamed = run_json(*common, "--max-workspace", BUDGET, "--out", tmp_path / "s.h5")
    in_memory = run_json(*common, "--out", tmp_path / "m.h5")
    assert_same_stats(streamed, in_memory)
    assert streamed["tensors"]["x"]["origin"] == in_memory["tensors"]["x"]["origin"]
    np.testing.assert_allclose(
        read(tmp_path / "s.h5", "z"), read(tmp_path / "m.h5", "z"), rtol=1e-12, atol=1e-13
    )
    assert streamed["slices"]["x[63,0,0]"] == in_memory["slices"]["x[63,0,0]"]


def test_a_streamed_npy_gives_what_the_same_x_streamed_from_hdf5_gives(npy_layer, tmp_path):
    with h5py.File(tmp_path / "x.h5", "w") as f:
        f["x"] = np.load(npy_layer / "x.npy")
    common = ["forward", "--w", npy_layer / "w.npy", "--pad", "1", "--max-workspace", BUDGET]
    from_npy = run_json(*common, "--x", npy_layer / "x.npy", "--out", tmp_path / "n.h5")
    from_h5 = run_json(*common, "--x", f"{tmp_path / 'x.h5'}:x", "--out", tmp_path / "h.h5")
    assert from_npy["streamed"] is from_h5["streamed"] is True
    assert from_npy["tensors"]["z"] == from_h5["tensors"]["z"]
    np.testing.assert_array_equal(read(tmp_path / "n.h5", "z"), read(tmp_path / "h.h5", "z"))


def test_backward_streams_x_and_dz_from_npy(npy_layer, tmp_path):
    common = ["backward", *refs(npy_layer, "x", "w", "b", "dz"), "--pad", "1"]
    streamed = run_json(*common, "--max-workspace", BUDGET, "--out", tmp_path / "s.h5")
    in_memory = run_json(*common, "--out", tmp_path / "m.h5")
    assert_same_stats(streamed, in_memory)
    for key in ("dx", "dw", "db"):
        np.testing.assert_allclose(
            read(tmp_path / "s.h5", key), read(tmp_path / "m.h5", key), rtol=1e-12, atol=1e-12
        )


@pytest.mark.parametrize("dtype", ["<f8", ">f8", "<f4", ">f4", ">i4", "<u2"])
@pytest.mark.parametrize("shape", [(7,), (7, 3), (5, 2, 3, 4)])
def test_rows_read_at_offsets_equal_the_loaded_array(tmp_path, dtype, shape):
    rng = np.random.default_rng(1)
    array = (rng.standard_normal(shape) * 100).astype(dtype)
    path = tmp_path / "a.npy"
    np.save(path, array)
    reader = NpyReader.open(path)
    try:
        rows = reader.rows("")
        assert rows is not None
        for start, stop in ((0, 1), (1, 4), (0, shape[0]), (3, 3), (shape[0] - 1, shape[0])):
            block = rows.read(start, stop)
            assert block.dtype.isnative
            assert block.dtype == array.dtype.newbyteorder("=")
            np.testing.assert_array_equal(block, array[start:stop])
        for index in [
            (0,),
            (-1,),
            (slice(None),),
            (slice(1, None, 2),),
            (slice(None, None, -3),),
            (Ellipsis,),
            (Ellipsis, 0),
            (2, Ellipsis),
            (slice(5, 1),),
            (),
        ]:
            if len([i for i in index if i is not Ellipsis]) > len(shape):
                continue
            np.testing.assert_array_equal(rows[index], array[index])
        if len(shape) > 1:
            np.testing.assert_array_equal(rows[1, ..., -1], array[1, ..., -1])
            np.testing.assert_array_equal(rows[::2, 1], array[::2, 1])
        with pytest.raises(IndexError):
            rows[shape[0]]
    finally:
        reader.close()


def test_each_block_is_a_fresh_buffer_not_a_view_of_a_map(tmp_path):
    np.save(tmp_path / "a.npy", np.arange(12.0).reshape(4, 3))
    reader = NpyReader.open(tmp_path / "a.npy")
    try:
        block = reader.rows("").read(1, 3)
    finally:
        reader.close()
    assert block.base is None or not isinstance(block.base, np.memmap)
    assert block.flags.writeable
    assert block.flags.c_contiguous


def test_fortran_order_npy_is_read_whole_not_streamed_with_the_same_results(npy_layer, tmp_path):
    x = np.load(npy_layer / "x.npy")
    np.save(tmp_path / "xf.npy", np.asfortranarray(x))
    reader = NpyReader.open(tmp_path / "xf.npy")
    try:
        assert reader.rows("") is None
    finally:
        reader.close()
    common = ["forward", "--w", npy_layer / "w.npy", "--pad", "1"]
    fortran = run_json(*common, "--x", tmp_path / "xf.npy", "--max-workspace", BUDGET)
    c_order = run_json(*common, "--x", npy_layer / "x.npy")
    assert fortran["streamed"] is False
    for key in ("mean", "std", "min", "max"):  # a column-major x takes other BLAS paths
        assert fortran["tensors"]["z"][key] == pytest.approx(c_order["tensors"]["z"][key], 1e-12)


def test_a_fortran_npy_over_the_memory_guard_says_to_save_it_in_c_order(npy_layer, tmp_path):
    np.save(tmp_path / "xf.npy", np.asfortranarray(np.load(npy_layer / "x.npy")))
    result = runner.invoke(
        app,
        [
            "forward",
            "--x",
            str(tmp_path / "xf.npy"),
            "--w",
            str(npy_layer / "w.npy"),
            "--max-memory",
            "512K",
            "--max-workspace",
            BUDGET,
        ],
    )
    assert result.exit_code == 65
    assert "Fortran order" in result.stderr


def test_big_endian_npy_streams_like_little_endian(npy_layer, tmp_path):
    x = np.load(npy_layer / "x.npy")
    np.save(tmp_path / "xbig.npy", x.astype(">f8"))
    common = ["forward", "--w", npy_layer / "w.npy", "--pad", "1", "--max-workspace", BUDGET]
    big = run_json(*common, "--x", tmp_path / "xbig.npy", "--out", tmp_path / "big.h5")
    little = run_json(*common, "--x", npy_layer / "x.npy", "--out", tmp_path / "little.h5")
    assert big["streamed"] is True
    assert big["tensors"]["z"] == little["tensors"]["z"]
    np.testing.assert_array_equal(read(tmp_path / "big.h5", "z"), read(tmp_path / "little.h5", "z"))


def test_a_npy_truncated_or_appended_to_during_the_run_is_refused(npy_layer, tmp_path):
    loaded = load_tensors(
        None,
        {"x": str(npy_layer / "x.npy"), "w": str(npy_layer / "w.npy")},
        ("x", "w"),
        lazy_above=16 * 1024,
    )
    assert isinstance(loaded.arrays["x"], DatasetRef)

    def between_blocks(done, total):
        if done == 1:
            with open(npy_layer / "x.npy", "r+b") as handle:
                handle.truncate(os.path.getsize(npy_layer / "x.npy") // 2)

    with pytest.raises(DataError, match=r"x\.npy"):
        run_forward(
            RunInputs.from_loaded(loaded),
            ConvSpec(padding=1),
            RunOptions(workspace=16 * 1024, out=tmp_path / "out.h5"),
            progress=between_blocks,
        )
    assert not (tmp_path / "out.h5").exists()


@pytest.mark.slow
def test_streamed_npy_peak_memory_stays_near_the_budget(tmp_path):
    """x of 128 MiB in a .npy streamed with a 16 MiB budget: peak RSS grows by far less than x."""
    rng = np.random.default_rng(1)
    x_path = tmp_path / "x.npy"
    x = np.lib.format.open_memmap(x_path, mode="w+", dtype=np.float32, shape=(512, 64, 64, 16))
    for start in range(0, 512, 64):
        x[start : start + 64] = rng.standard_normal((64, 64, 64, 16), dtype=np.float32)
    x.flush()
    del x
    np.save(tmp_path / "w.npy", rng.standard_normal((3, 3, 16, 4)).astype(np.float32))
    x_bytes = 512 * 64 * 64 * 16 * 4

    start_up = peak_rss("--version")
    streamed = peak_rss(
        "forward",
        "--x",
        x_path,
        "--w",
        tmp_path / "w.npy",
        "--pad",
        "1",
        "--max-workspace",
        "16M",
        "--out",
        tmp_path / "z.h5",
        "--json",
    )
    assert streamed - start_up <= 16 * 2**20 + 64 * 2**20, (start_up, streamed)
    assert streamed - start_up < x_bytes / 2
