"""HDF5 inputs bigger than the workspace are streamed in chunks: same results, bounded memory."""

import json

import h5py
import numpy as np
import pytest
from typer.testing import CliRunner

from convcli import ConvSpec
from convcli.cli import app
from convcli.errors import UsageError
from convcli.memory import chunk_images
from convcli.run import RunOptions, Upstream
from tests.conftest import peak_rss

runner = CliRunner()
BUDGET = "256K"


@pytest.fixture
def big_h5(tmp_path):
    """x of 1 MiB (4x the 256 KiB budget), w, b, and a dz, with pad 1 stored as attributes."""
    rng = np.random.default_rng(0)
    path = tmp_path / "big.h5"
    with h5py.File(path, "w") as f:
        f["data/x"] = rng.standard_normal((64, 16, 16, 8))
        f["data/w"] = rng.standard_normal((3, 3, 8, 4))
        f["data/b"] = rng.standard_normal(4)
        f["data"].attrs["pad"] = 1
    with h5py.File(tmp_path / "dz.h5", "w") as f:
        f["grad_output"] = rng.standard_normal((64, 16, 16, 4))
    return path


def run_json(*args):
    result = runner.invoke(app, [str(a) for a in args] + ["--json"])
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def assert_same_stats(streamed, in_memory):
    assert streamed["streamed"] is True
    assert in_memory["streamed"] is False
    assert streamed["tensors"].keys() == in_memory["tensors"].keys()
    for name, expected in in_memory["tensors"].items():
        got = streamed["tensors"][name]
        assert got["shape"] == expected["shape"]
        assert got["dtype"] == expected["dtype"]
        for key in ("mean", "std", "min", "max"):
            assert got[key] == pytest.approx(expected[key], rel=1e-12, abs=1e-15), (name, key)


def read(path, key):
    with h5py.File(path) as f:
        return f[key][()]


@pytest.mark.parametrize("stride", ["1", "2"])
def test_forward_streamed_equals_in_memory(big_h5, tmp_path, stride):
    streamed = run_json(
        "forward",
        big_h5,
        "--stride",
        stride,
        "--max-workspace",
        BUDGET,
        "--out",
        tmp_path / "s.h5",
        "--slice",
        "z[3,2,1]",
        "--slice",
        "x[63,0,0]",
    )
    in_memory = run_json(
        "forward",
        big_h5,
        "--stride",
        stride,
        "--out",
        tmp_path / "m.h5",
        "--slice",
        "z[3,2,1]",
        "--slice",
        "x[63,0,0]",
    )
    assert_same_stats(streamed, in_memory)
    np.testing.assert_allclose(
        read(tmp_path / "s.h5", "z"), read(tmp_path / "m.h5", "z"), rtol=1e-12, atol=1e-13
    )
    for label in ("z[3,2,1]", "x[63,0,0]"):
        np.testing.assert_allclose(
            streamed["slices"][label], in_memory["slices"][label], rtol=1e-12
        )
    with h5py.File(tmp_path / "s.h5") as f:
        assert f.attrs["padding"].tolist() == [[1, 1], [1, 1]]


@pytest.mark.parametrize(
    "upstream", [["--upstream", "random", "--seed", "4"], ["--upstream", "z"], ["--dz", "GRAD"]]
)
def test_backward_streamed_equals_in_memory(big_h5, tmp_path, upstream):
    upstream = [tmp_path / "dz.h5" if a == "GRAD" else a for a in upstream]
    common = ["backward", big_h5]
    streamed = run_json(*common, *upstream, "--max-workspace", BUDGET, "--out", tmp_path / "s.h5")
    in_memory = run_json(*common, *upstream, "--out", tmp_path / "m.h5")
    assert_same_stats(streamed, in_memory)
    for key in ("dx", "dw", "db"):
        np.testing.assert_allclose(
            read(tmp_path / "s.h5", key), read(tmp_path / "m.h5", key), rtol=1e-12, atol=1e-12
        )


def test_a_dz_bigger_than_the_workspace_is_streamed_with_x_in_memory(tmp_path):
    """x (11 KiB) fits the budget, dz (720 KiB, Cout 64) does not: dz alone is streamed."""
    rng = np.random.default_rng(5)
    data = tmp_path / "wide.h5"
    with h5py.File(data, "w") as f:
        f["x"] = rng.standard_normal((16, 10, 9, 1))
        f["w"] = rng.standard_normal((3, 3, 1, 64))
        f["dz"] = rng.standard_normal((16, 10, 9, 64))
        f.attrs["pad"] = 1
    runs = {}
    for kind, extra in (("streamed", ["--max-workspace", "100K"]), ("memory", [])):
        runs[kind] = run_json("backward", data, *extra, "--out", tmp_path / f"{kind}.h5")
    assert_same_stats(runs["streamed"], runs["memory"])
    for key in ("dx", "dw"):
        np.testing.assert_allclose(
            read(tmp_path / "streamed.h5", key), read(tmp_path / "memory.h5", key), rtol=1e-12
        )


def test_run_options_name_the_parameter_at_fault():
    with pytest.raises(UsageError) as bad_upstream:
        Upstream("twice")
    assert bad_upstream.value.param == "upstream"
    assert str(bad_upstream.value) == "upstream 'twice': choose from z, ones, random"
    with pytest.raises(UsageError) as bad_engine:
        RunOptions(engine="gpu")
    assert bad_engine.value.param == "engine"


def test_chunks_respect_the_budget():
    geometry = ConvSpec(padding=1).geometry((64, 16, 16, 8), (3, 3, 8, 4))
    images = chunk_images(geometry, np.float64, 256 * 1024, backward=True)
    per_image_bytes = (2 * 16 * 16 * 8 + 16 * 16 * 4 + 2 * 16 * 16 * 4 + 16 * 16 * 8) * 8
    assert 1 <= images < 64
    assert images * per_image_bytes <= 128 * 1024


def test_streamed_output_must_be_hdf5_and_is_checked_first(big_h5, tmp_path):
    result = runner.invoke(
        app, ["forward", str(big_h5), "--max-workspace", BUDGET, "--out", str(tmp_path / "z.npz")]
    )
    assert result.exit_code == 2
    assert "use --out FILE.h5" in result.stderr
    existing = tmp_path / "z.h5"
    existing.write_bytes(b"keep me")
    result = runner.invoke(
        app, ["forward", str(big_h5), "--max-workspace", BUDGET, "--out", str(existing)]
    )
    assert result.exit_code == 73
    assert existing.read_bytes() == b"keep me"


def test_bad_workspace_size_is_a_usage_error(big_h5):
    result = runner.invoke(app, ["forward", str(big_h5), "--max-workspace", "lots"])
    assert result.exit_code == 2
    assert "--max-workspace 'lots'" in result.stderr


@pytest.mark.slow
def test_streamed_forward_peak_memory_stays_near_the_budget(tmp_path):
    """x of 128 MiB streamed with a 16 MiB budget: peak RSS grows by far less than x."""
    path = tmp_path / "x.h5"
    rng = np.random.default_rng(1)
    with h5py.File(path, "w") as f:
        x = f.create_dataset("x", shape=(512, 64, 64, 16), dtype=np.float32)
        for start in range(0, 512, 64):
            x[start : start + 64] = rng.standard_normal((64, 64, 64, 16), dtype=np.float32)
        f["w"] = rng.standard_normal((3, 3, 16, 4)).astype(np.float32)
        f.attrs["pad"] = 1
    x_bytes = 512 * 64 * 64 * 16 * 4

    start_up = peak_rss("--version")
    streamed = peak_rss(
        "forward", path, "--max-workspace", "16M", "--out", tmp_path / "z.h5", "--json"
    )
    assert streamed - start_up <= 16 * 2**20 + 64 * 2**20, (start_up, streamed)
    assert streamed - start_up < x_bytes / 2


def test_threads_flag_gives_the_same_numbers(big_h5):
    one = run_json("forward", big_h5, "--threads", "1")
    three = run_json("forward", big_h5, "--threads", "3", "--max-workspace", "64K")
    for key in ("mean", "std", "min", "max"):
        assert one["tensors"]["z"][key] == pytest.approx(three["tensors"]["z"][key], rel=1e-12)
    assert runner.invoke(app, ["forward", str(big_h5), "--threads", "0"]).exit_code == 2


@pytest.mark.parametrize("where", [0, 1, 2])
def test_a_nan_in_any_chunk_makes_every_statistic_null(where):
    """As np.min/np.max/np.mean do on the whole tensor: a NaN in a later chunk is not skipped."""
    from convcli.stats import RunningStats

    chunks = [np.arange(4.0) + 10 * k for k in range(3)]
    chunks[where][1] = np.nan
    stats = RunningStats((12,), np.float64)
    for chunk in chunks:
        stats.update(chunk)
    summary = stats.summary()
    assert summary["nonfinite"] == 1
    assert [summary[k] for k in ("mean", "std", "min", "max")] == [None] * 4
