"""Hostile files and numbers against the installed command (issue 12, reading files).

- HDF5 (and npz) bombs: declared shapes are checked against the roles from headers alone,
  and a dataset declaring far more data than the file stores is refused unless
  ``--allow-sparse``; ``inspect`` lists both as problems.
- Integers of 2**63 and more, or above the documented bound, from a flag, an HDF5 attribute,
  an npz entry or a sweep spec; compound and huge attributes.
- Paths: symlink loops and over-long names as inputs (66) and outputs (73); unreadable
  ``inspect`` files (66).
- Big-endian floats are read (converted to native order, dtype kept).
- HDF5 filters: a missing filter named by id and name; a checksum failure called corruption.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import h5py
import numpy as np
import pytest

from tests import hostile

GiB = 2**30
SMALL = hostile.Limits(memory=1 * GiB)
FAST = 30  # seconds: every case here takes well under a few seconds
X_SHAPE = (2, 4, 4, 3)
W_SHAPE = (2, 2, 3, 8)


def layer(rng=None) -> dict[str, np.ndarray]:
    rng = rng or np.random.default_rng(0)
    return {
        "x": rng.standard_normal(X_SHAPE),
        "w": rng.standard_normal(W_SHAPE),
        "b": rng.standard_normal((8,)),
    }


def unallocated(h5: h5py.File, name: str, shape: tuple[int, ...], dtype="f8") -> None:
    """A chunked dataset whose chunks were never written: declared size, no data stored."""
    chunks = tuple(min(s, 4) for s in shape)
    h5.create_dataset(name, shape=shape, dtype=dtype, chunks=chunks)


@pytest.fixture
def out(tmp_path) -> Path:
    """An existing output file that must survive every refused run byte for byte."""
    path = tmp_path / "old.npz"
    np.savez(path, z=np.arange(3.0))
    return path


def refused(tmp_path, code, *args, out=None, watch=(), limits=SMALL) -> str:
    """Run convcli, assert one error line with ``code``; watched files keep their bytes."""
    paths = [p for p in (out, *watch) if p is not None]
    extra = ("--out", out, "--force") if out is not None else ()
    with hostile.unchanged(*paths):
        result = hostile.run(*args, *extra, cwd=tmp_path, limits=limits, timeout=FAST)
    return hostile.one_error(result, code)


# ---------------------------------------------------------------------------------------------
# 1. HDF5 bombs
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def bias_bomb(tmp_path) -> Path:
    """3 KB on disk declaring a 1.5 GiB bias of the wrong shape."""
    path = tmp_path / "bias_bomb.h5"
    with h5py.File(path, "w") as h5:
        data = layer()
        h5["x"], h5["w"] = data["x"], data["w"]
        unallocated(h5, "b", (200_000_000,))
    return path


@pytest.fixture
def input_bomb(tmp_path) -> Path:
    """A few KB on disk declaring an input of 10**9 images (98 GB), right shape otherwise."""
    path = tmp_path / "input_bomb.h5"
    with h5py.File(path, "w") as h5:
        data = layer()
        unallocated(h5, "x", (10**9, 4, 4, 3))
        h5["w"], h5["b"] = data["w"], data["b"]
    return path


@pytest.mark.parametrize("command", ["forward", "backward", "gradcheck"])
def test_bias_of_the_wrong_shape_is_refused_from_its_header(command, bias_bomb, out, tmp_path):
    line = refused(tmp_path, 65, command, bias_bomb, out=out if command != "gradcheck" else None)
    assert "b has shape (200000000,)" in line, line


@pytest.mark.parametrize("command", ["forward", "backward", "gradcheck"])
def test_input_declaring_more_than_the_file_stores_is_refused(command, input_bomb, out, tmp_path):
    line = refused(tmp_path, 65, command, input_bomb, out=out if command != "gradcheck" else None)
    assert "input_bomb.h5:/x" in line, line
    assert "stores" in line, line
    assert "--allow-sparse" in line, line


def test_x_reference_to_a_bomb_is_refused(input_bomb, tmp_path):
    good = tmp_path / "good.npz"
    np.savez(good, **layer())
    line = refused(tmp_path, 65, "forward", good, "--x", f"{input_bomb}:x")
    assert "--allow-sparse" in line, line


def test_allow_sparse_reads_a_never_written_dataset(tmp_path):
    path = tmp_path / "sparse.h5"
    with h5py.File(path, "w") as h5:
        unallocated(h5, "x", (1024, 32, 32, 3), dtype="f4")  # 12 MiB declared, 0 stored
        h5["w"] = np.ones((1, 1, 3, 2), dtype="f4")
    # below the 16 MiB floor: read as zeros (fill value) without asking
    result = hostile.run("forward", path, "--json", cwd=tmp_path, limits=SMALL, timeout=FAST)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["tensors"]["z"]["max"] == 0.0
    with h5py.File(path, "a") as h5:
        del h5["x"]
        unallocated(h5, "x", (2048, 32, 32, 3), dtype="f4")  # 24 MiB declared
    line = refused(tmp_path, 65, "forward", path)
    assert "--allow-sparse" in line, line
    result = hostile.run(
        "forward", path, "--allow-sparse", "--json", cwd=tmp_path, limits=SMALL, timeout=FAST
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["tensors"]["z"]["max"] == 0.0


def test_compressed_bomb_in_hdf5_is_refused(tmp_path):
    path = tmp_path / "zeros.h5"
    with h5py.File(path, "w") as h5:
        h5.create_dataset(
            "x", data=np.zeros((512, 64, 64, 3), "f4"), chunks=(512, 64, 64, 3), compression=9
        )  # 24 MiB of zeros in ~25 KB
        h5["w"] = np.ones((1, 1, 3, 2), dtype="f4")
    line = refused(tmp_path, 65, "forward", path)
    assert "--allow-sparse" in line, line


def test_compressed_bomb_in_npz_is_refused(tmp_path):
    path = tmp_path / "zeros.npz"
    np.savez_compressed(path, x=np.zeros((512, 64, 64, 3), "f4"), w=np.ones((1, 1, 3, 2), "f4"))
    line = refused(tmp_path, 65, "forward", path)
    assert "--allow-sparse" in line, line


def test_absurd_dimensions_are_refused_without_overflow(tmp_path):
    path = tmp_path / "absurd.h5"
    with h5py.File(path, "w") as h5:
        h5.create_dataset("x", shape=(2**40, 2**40, 1, 3), dtype="f8", chunks=(1, 1, 1, 3))
        h5["w"] = np.ones((1, 1, 3, 2))
    refused(tmp_path, 65, "forward", path)
    refused(tmp_path, 65, "backward", path)


@pytest.mark.parametrize("fixture", ["bias_bomb", "input_bomb"])
def test_inspect_lists_what_forward_would_refuse(fixture, request, tmp_path):
    path = request.getfixturevalue(fixture)
    result = hostile.run("inspect", path, "--json", cwd=tmp_path, limits=SMALL, timeout=FAST)
    assert result.returncode == 0, result.stderr
    problems = json.loads(result.stdout)["problems"]
    assert problems, result.stdout
    text = " ".join(problems)
    assert ("b has shape" in text) if fixture == "bias_bomb" else ("stores" in text), text


def test_inspect_flags_a_truncated_npy(tmp_path):
    path = tmp_path / "cut.npy"
    np.save(path, np.zeros((100, 100)))
    path.write_bytes(path.read_bytes()[:2000])
    result = hostile.run("inspect", path, "--json", cwd=tmp_path, limits=SMALL, timeout=FAST)
    assert result.returncode == 0, result.stderr
    assert any("truncated" in p for p in json.loads(result.stdout)["problems"]), result.stdout


# ---------------------------------------------------------------------------------------------
# 2. Huge integers
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def sample(tmp_path) -> Path:
    path = tmp_path / "layer.npz"
    np.savez(path, **layer())
    return path


@pytest.mark.parametrize(
    ("flag", "value"),
    [
        ("--stride", 2**63),
        ("--pad", 2**64),
        ("--dilation", 2**31),
        ("--groups", 2**63),
        ("--stride", -(2**63) - 1),
    ],
)
def test_huge_hyperparameter_flag_is_a_usage_error(flag, value, sample, out, tmp_path):
    line = refused(tmp_path, 2, "forward", sample, flag, value, out=out)
    assert len(line) < 300, line


def test_huge_per_axis_flag_is_a_usage_error(sample, tmp_path):
    refused(tmp_path, 2, "forward", sample, "--stride", f"1,{2**63}")
    refused(tmp_path, 2, "forward", sample, "--pad", f"0,0,1,{2**64}")


@pytest.mark.parametrize(
    ("name", "value"),
    [("stride", 2**63), ("pad", 2**64 - 1), ("dilation", 2**31), ("groups", 2**63)],
)
def test_huge_hdf5_attribute_is_a_data_error(name, value, out, tmp_path):
    path = tmp_path / "attr.h5"
    with h5py.File(path, "w") as h5:
        for key, array in layer().items():
            h5[key] = array
        h5.attrs[name] = np.uint64(value)
    refused(tmp_path, 65, "forward", path, out=out)
    result = hostile.run("inspect", path, "--json", cwd=tmp_path, limits=SMALL, timeout=FAST)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["problems"], result.stdout


@pytest.mark.parametrize("value", [np.uint64(2**63), np.array([1, 2**63], np.uint64)])
def test_huge_npz_entry_is_a_data_error(value, out, tmp_path):
    path = tmp_path / "entry.npz"
    np.savez(path, **layer(), stride=value)
    refused(tmp_path, 65, "forward", path, out=out)


def test_compound_attribute_is_a_data_error(tmp_path):
    path = tmp_path / "compound.h5"
    with h5py.File(path, "w") as h5:
        for key, array in layer().items():
            h5[key] = array
        h5.attrs["stride"] = np.array([(1, 2.0)], dtype=[("a", "i4"), ("b", "f8")])
    refused(tmp_path, 65, "forward", path)


def test_huge_attribute_gives_a_short_line(tmp_path):
    path = tmp_path / "long.h5"
    with h5py.File(path, "w", libver="latest") as h5:  # dense storage: big attributes
        for key, array in layer().items():
            h5[key] = array
        h5.attrs["stride"] = np.ones(2_000_000, dtype=np.int64)
    line = refused(tmp_path, 65, "forward", path)
    assert len(line) < 400, line[:500]
    assert "2000000 values" in line, line[:500]
    result = hostile.run("inspect", path, "--json", cwd=tmp_path, limits=SMALL, timeout=FAST)
    assert result.returncode == 0, result.stderr[:500]
    assert len(result.stdout) < 10_000


@pytest.mark.parametrize(
    "entry",
    [
        "stride = 9223372036854775807",
        "stride = [1, 9223372036854775807]",
        "pad = 4294967296",
        "dilation = 2147483648",
        "groups = 9223372036854775807",
        "kernel = 9223372036854775807",
        "cout = 9223372036854775807",
        "shape = [1, 9223372036854775807, 4, 3]",
    ],
)
def test_huge_integer_in_a_sweep_spec_is_a_data_error(entry, tmp_path):
    key = entry.split(" ")[0]
    base = {"shape": "shape = [1, 4, 4, 3]", "kernel": "kernel = 1", "cout": "cout = 2"}
    extra = []
    if key in base:
        base[key] = entry
    else:
        extra.append(entry)
    lines = ["actions = ['forward']", "[[configs]]", *base.values(), *extra]
    spec = tmp_path / "huge.toml"
    spec.write_text("\n".join(lines) + "\n")
    line = refused(tmp_path, 65, "sweep", spec, "--out", tmp_path / "r.jsonl")
    assert key in line, line


# ---------------------------------------------------------------------------------------------
# 3. Paths
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def loop(tmp_path) -> Path:
    a, b = tmp_path / "loop_a.npz", tmp_path / "loop_b.npz"
    a.symlink_to(b.name)
    b.symlink_to(a.name)
    return a


def test_symlink_loop_as_input_is_66(loop, sample, tmp_path):
    refused(tmp_path, 66, "forward", loop)
    refused(tmp_path, 66, "forward", sample, "--x", loop)
    refused(tmp_path, 66, "forward", sample, "--w", f"{loop}:w")
    refused(tmp_path, 66, "inspect", loop)


def test_symlink_loop_as_output_is_73(loop, sample, tmp_path):
    refused(tmp_path, 73, "forward", sample, "--out", loop, watch=[loop])
    refused(tmp_path, 73, "forward", sample, "--out", loop, "--force", watch=[loop])
    refused(
        tmp_path,
        73,
        "generate",
        loop,
        "--shape",
        "1,4,4,3",
        "--kernel",
        "1",
        "--cout",
        "2",
        watch=[loop],
    )


@pytest.mark.slow  # seven runs of the command
def test_overlong_names_are_66_for_inputs_and_73_for_outputs(sample, tmp_path):
    long_in = tmp_path / ("x" * 300 + ".npz")
    refused(tmp_path, 66, "forward", long_in)
    refused(tmp_path, 66, "forward", sample, "--x", long_in)
    refused(tmp_path, 66, "inspect", long_in)
    long_out = tmp_path / ("z" * 300 + ".npz")
    refused(tmp_path, 73, "forward", sample, "--out", long_out)
    refused(
        tmp_path, 73, "generate", long_out, "--shape", "1,4,4,3", "--kernel", "1", "--cout", "2"
    )
    deep = tmp_path / "/".join(["d" * 200] * 25) / "z.npz"  # path longer than PATH_MAX
    refused(tmp_path, 73, "forward", sample, "--out", deep)
    refused(tmp_path, 66, "forward", deep)


def test_unreadable_inspect_file_is_66(tmp_path):
    refused(tmp_path, 66, "inspect", tmp_path)
    fifo = tmp_path / "fifo.h5"
    os.mkfifo(fifo)
    refused(tmp_path, 66, "inspect", fifo)
    refused(tmp_path, 66, "inspect", tmp_path / "missing.npz")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_inspect_without_read_permission_is_66(sample, tmp_path):
    sample.chmod(0)
    try:
        refused(tmp_path, 66, "inspect", sample)
    finally:
        sample.chmod(0o644)


# ---------------------------------------------------------------------------------------------
# 4. Big-endian floats
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "order"), [("npz", ">f8"), ("h5", ">f8"), ("h5", ">f4"), ("npy", ">f4")]
)
def test_big_endian_floats_are_read(fmt, order, tmp_path):
    data = layer()
    native = tmp_path / "native.npz"
    np.savez(native, **{k: v.astype(order[1:]) for k, v in data.items()})
    swapped = {k: v.astype(order) for k, v in data.items()}
    path = tmp_path / f"swapped.{'npz' if fmt == 'npy' else fmt}"
    if fmt == "h5":
        with h5py.File(path, "w") as h5:
            for key, value in swapped.items():
                h5[key] = value
    elif fmt == "npz":
        np.savez(path, **swapped)
    args: tuple = (path,)
    if fmt == "npy":
        for key, value in swapped.items():
            np.save(tmp_path / f"{key}.npy", value)
        args = tuple(a for k in swapped for a in (f"--{k}", tmp_path / f"{k}.npy"))
    results = []
    for source in ((native,), args):
        result = hostile.run(
            "backward", *source, "--json", cwd=tmp_path, limits=SMALL, timeout=FAST
        )
        assert result.returncode == 0, result.stderr
        results.append(json.loads(result.stdout)["tensors"])
    for name in ("z", "dx", "dw", "db"):
        assert results[1][name]["dtype"] == np.dtype(order[1:]).name
        assert results[1][name]["mean"] == results[0][name]["mean"], name


def test_big_endian_stream(tmp_path):
    data = layer()
    path = tmp_path / "big.h5"
    with h5py.File(path, "w") as h5:
        h5["x"] = np.random.default_rng(1).standard_normal((64, 16, 16, 3)).astype(">f8")
        h5["w"] = data["w"].astype(">f8")
    native = tmp_path / "native.h5"
    with h5py.File(native, "w") as h5, h5py.File(path) as src:
        h5["x"], h5["w"] = src["x"][()].astype("f8"), src["w"][()].astype("f8")
    means = []
    for source in (native, path):
        result = hostile.run(
            "forward", source, "--max-workspace", "64K", "--json", cwd=tmp_path, timeout=FAST
        )
        assert result.returncode == 0, result.stderr
        means.append(json.loads(result.stdout)["tensors"]["z"]["mean"])
    assert means[0] == means[1]


# ---------------------------------------------------------------------------------------------
# 5. HDF5 filters
# ---------------------------------------------------------------------------------------------


def with_filter(path: Path, filter_id: int) -> Path:
    """An HDF5 layer whose x is chunked through the shuffle filter, then patched (in the
    version-1 filter pipeline message) to say it needs filter ``filter_id``."""
    data = layer()
    with h5py.File(path, "w", libver="earliest") as h5:
        h5.create_dataset("x", data=data["x"], chunks=(1, 4, 4, 3), shuffle=True)
        h5["w"] = data["w"]
    raw = bytearray(path.read_bytes())
    # v1 pipeline entry: id 2 (shuffle), name length 8, flags, 1 client value, "shuffle\0"
    entry = b"\x02\x00\x08\x00"
    at = raw.find(entry)
    assert at > 0, "pipeline message not found"
    assert raw[at + 8 : at + 16] == b"shuffle\x00", "pipeline message not found"
    raw[at : at + 2] = filter_id.to_bytes(2, "little")
    path.write_bytes(bytes(raw))
    return path


@pytest.mark.parametrize(
    ("filter_id", "name"),
    [
        (32001, "Blosc"),
        (32004, "LZ4"),
        (32008, "Bitshuffle"),
        (32015, "Zstandard"),
        (32000, "LZF"),
        (31999, None),
    ],
)
def test_missing_filter_is_named(filter_id, name, out, tmp_path):
    path = with_filter(tmp_path / "filtered.h5", filter_id)
    line = refused(tmp_path, 65, "forward", path, out=out)
    if h5py.h5z.filter_avail(filter_id):  # h5py has LZF: it fails on shuffled bytes
        assert "corrupt" in line, line
        assert name in line, line
        return
    assert str(filter_id) in line, line
    if name:
        assert name in line, line
    result = hostile.run("inspect", path, "--json", cwd=tmp_path, limits=SMALL, timeout=FAST)
    assert result.returncode == 0, result.stderr
    assert any(str(filter_id) in p for p in json.loads(result.stdout)["problems"])


def test_checksum_failure_is_corruption(out, tmp_path):
    path = tmp_path / "fletcher.h5"
    values = np.full((4, 4, 4, 3), 0.123456789)
    with h5py.File(path, "w") as h5:
        h5.create_dataset("x", data=values, chunks=(4, 4, 4, 3), fletcher32=True)
        h5["w"] = np.ones((1, 1, 3, 2))
        offset = h5["x"].id.get_chunk_info(0).byte_offset
    raw = bytearray(path.read_bytes())
    raw[offset + 10] ^= 0xFF
    path.write_bytes(bytes(raw))
    line = refused(tmp_path, 65, "forward", path, out=out)
    assert "checksum" in line.lower(), line
    assert "corrupt" in line.lower(), line
    assert "does not have" not in line, line
