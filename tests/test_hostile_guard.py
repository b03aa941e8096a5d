"""Hostile corpus: memory, disk and work bounded before work starts; the checker's inputs.

Every case runs the installed command through :mod:`tests.hostile` (bounded time and address
space, no traceback, no exit 70) and asserts the exit code, one error line and, where files
are involved, that they keep their bytes and no temporary file is left.

- memory: the guard's ``auto`` budget honours ``RLIMIT_AS`` (and the cgroup limit), so bombs
  under an address-space limit are refused with exit 65 naming what is needed and the limit;
  an allocation that fails anyway ends as one line, exit 65;
- streamed runs: one image's block counts even when it exceeds the workspace; the ``--out``
  file is estimated against the free space of its folder (exit 73);
- work: ``--samples``/``--probes`` (and any mode) whose forward passes would take absurdly long
  are refused with exit 2;
- tolerances: NaN, infinite or negative ``--eps``/``--rtol``/``--atol`` (flags: 2; sweep spec: 65);
- ``--impl``: non-real results and values that raise on conversion are failed configurations;
- gradcheck data whose z overflows to inf is refused (65);
- numeric flags of 2**63 and beyond: exit 2.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest

from tests import hostile
from tests.conftest import SAMPLE_H5

GiB = 2**30
TIGHT = hostile.Limits(memory=1 * GiB)  # an address-space limit far below the machine's memory
BIG = 2**63
CLASSIC = Path(__file__).resolve().parent.parent / "sample_data" / "classic_conv.py"


def _run(*args, cwd, **kwargs):
    return hostile.run(*args, cwd=cwd, timeout=kwargs.pop("timeout", 30), **kwargs)


# -- memory: RLIMIT_AS ----------------------------------------------------------------------


def test_generate_bomb_under_an_address_space_limit_is_refused(tmp_path):
    out = tmp_path / "layer.h5"
    with hostile.unchanged(out):
        result = _run(
            "generate", out, "--shape", "2000,100,100,3", "--kernel", "3", "--cout", "4",
            cwd=tmp_path, limits=TIGHT,
        )  # fmt: skip
    line = hostile.one_error(result, 65)
    assert "needs about" in line
    assert "address-space limit" in line


def test_gradcheck_bomb_under_an_address_space_limit_is_refused(tmp_path):
    result = _run(
        "gradcheck", "--shape", "3000,100,100,3", "--kernel", "3", "--cout", "4", "--mode", "fast",
        cwd=tmp_path, limits=TIGHT,
    )  # fmt: skip
    line = hostile.one_error(result, 65)
    assert "needs about" in line
    assert "--max-memory" in line


def test_gradcheck_from_a_file_is_guarded_with_its_own_copies(tmp_path):
    """A file of 120 MiB loads within the limit, but the check's copies would not fit."""
    rng = np.random.default_rng(0)
    data = tmp_path / "layer.npz"
    np.savez(data, x=rng.standard_normal((500, 100, 100, 3)).astype(np.float32),
             w=rng.standard_normal((3, 3, 3, 8)))  # fmt: skip
    result = _run("gradcheck", data, "--mode", "fast", cwd=tmp_path, limits=TIGHT)
    line = hostile.one_error(result, 65)
    assert "needs about" in line


def test_hdf5_tensor_declaring_more_than_the_address_space_is_refused(tmp_path):
    data = tmp_path / "bomb.h5"
    with h5py.File(data, "w") as h5:  # nothing stored: every element is the fill value
        h5.create_dataset("x", data=np.ones((1, 4, 4, 1)))
        h5.create_dataset("w", shape=(1, 1, 1, 120_000_000), dtype="f8", fillvalue=1.0)
    with hostile.unchanged(data):
        result = _run("forward", data, cwd=tmp_path, limits=TIGHT)
    hostile.one_error(result, 65)


def test_an_allocation_the_estimate_missed_is_one_line_exit_65(tmp_path):
    """An explicit --max-memory above what the process may map: the last line of defence."""
    result = _run(
        "gradcheck", "--shape", "3000,100,100,3", "--kernel", "3", "--cout", "4", "--mode", "fast",
        "--max-memory", "100G", cwd=tmp_path, limits=TIGHT,
    )  # fmt: skip
    line = hostile.one_error(result, 65)
    assert "ran out of memory" in line
    assert "--max-memory" in line


# -- streamed runs --------------------------------------------------------------------------


def _streamable(path: Path, n: int, cout: int) -> None:
    """x (n, 1, 1, 1) float32, really stored; w (1, 1, 1, cout)."""
    with h5py.File(path, "w") as h5:
        h5.create_dataset("x", data=np.ones((n, 1, 1, 1), np.float32))
        h5.create_dataset("w", data=np.ones((1, 1, 1, cout), np.float32))


def test_a_streamed_block_bigger_than_the_workspace_counts(tmp_path):
    """One image's z (4001 x 4001 x 64 float32, 4 GiB) cannot be cut: refused before work."""
    data = tmp_path / "wide.h5"
    _streamable(data, 64, 64)
    result = _run(
        "forward", data, "--pad", "2000", "--max-workspace", "64", cwd=tmp_path, limits=TIGHT
    )
    line = hostile.one_error(result, 65)
    assert "needs about" in line


def test_a_streamed_output_larger_than_the_free_disk_is_refused(tmp_path):
    """z of twice the folder's free space, from a 256 KiB input: exit 73 before any block."""
    n, spatial = 65536, 41 * 41  # pad 20 around 1x1 images
    free = shutil.disk_usage(tmp_path).free
    cout = max(1, math.ceil(2 * free / (n * spatial * 4)))
    data, out = tmp_path / "x.h5", tmp_path / "z.h5"
    _streamable(data, n, cout)
    with hostile.unchanged(data, out):
        result = _run(
            "forward", data, "--pad", "20", "--max-workspace", "64K", "--out", out,
            cwd=tmp_path, limits=hostile.Limits(file_size=64 * 2**20),
        )  # fmt: skip
    line = hostile.one_error(result, 73)
    assert "free" in line


# -- work: --samples, --probes --------------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "flags", "param"),
    [
        ("4,10,10,3", ("--mode", "fast", "--probes", "1000000000"), "--probes"),
        ("4,10,10,3", ("--mode", "fast", "--probes", str(BIG)), "--probes"),
        ("64,64,64,8", ("--mode", "sample", "--samples", str(10**12)), "--samples"),
    ],
)
def test_absurd_counts_are_refused_with_the_estimate(shape, flags, param, tmp_path):
    result = _run(
        "gradcheck", "--shape", shape, "--kernel", "3", "--cout", "8", *flags, cwd=tmp_path,
        timeout=20,
    )  # fmt: skip
    line = hostile.one_error(result, 2)
    assert param in line
    assert "forward passes" in line


def test_a_huge_sample_count_on_a_small_layer_is_clamped(tmp_path):
    result = _run(
        "gradcheck", "--shape", "2,5,5,3", "--kernel", "3", "--cout", "4", "--mode", "sample",
        "--samples", str(BIG), cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr


# -- tolerances -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "flags",
    [
        ("--atol", "inf"),
        ("--atol", "nan"),
        ("--atol", "-1"),
        ("--rtol", "nan"),
        ("--rtol", "inf"),
        ("--rtol", "-1e-6"),
        ("--eps", "inf"),
        ("--eps", "nan"),
        ("--eps", "-0.001"),
        ("--eps", "0"),
    ],
)
def test_nonsense_tolerances_are_usage_errors(flags, tmp_path):
    result = _run(
        "gradcheck", "--shape", "2,5,5,3", "--kernel", "3", "--cout", "4", *flags, cwd=tmp_path
    )
    line = hostile.one_error(result, 2)
    assert flags[0] in line


@pytest.mark.parametrize("value", ["inf", "nan", "-inf", "-1.0"])
@pytest.mark.parametrize("name", ["eps", "rtol", "atol"])
def test_nonsense_tolerances_in_a_sweep_spec_are_data_errors(name, value, tmp_path):
    spec = tmp_path / "spec.toml"
    spec.write_text(
        f'actions = ["gradcheck"]\n[gradcheck]\n{name} = {value}\n'
        "[[configs]]\nshape = [1, 4, 4, 1]\nkernel = 2\ncout = 1\n"
    )
    out = tmp_path / "results.jsonl"
    with hostile.unchanged(out):
        result = _run("sweep", spec, "--out", out, cwd=tmp_path)
    line = hostile.one_error(result, 65)
    assert name in line


# -- --impl ---------------------------------------------------------------------------------

_EXTRA = """
class RaisesOnArray:
    def __array__(self, *args, **kwargs):
        raise RuntimeError("no array for you")


class RaisesOnFloat:
    def __float__(self):
        raise RuntimeError("no float for you")
"""


def _impl(tmp_path: Path, z_expression: str) -> Path:
    source = CLASSIC.read_text()
    returned = "    return Z, (A_prev, W, b, hparameters)"
    assert returned in source
    source = source.replace(returned, f"    return {z_expression}, (A_prev, W, b, hparameters)")
    path = tmp_path / "impl.py"
    path.write_text(source + _EXTRA)
    return path


@pytest.mark.parametrize(
    ("z_expression", "reason"),
    [
        ("Z.astype(complex)", "not an array of real numbers"),
        ("Z + 1e-30j", "not an array of real numbers"),
        ("Z.astype(str)", "not an array of real numbers"),
        ("Z.astype(np.clongdouble)", "not an array of real numbers"),
        ("np.ma.masked_array(Z, mask=True)", "masked"),
        ("RaisesOnArray()", "RuntimeError: no array for you"),
        ("np.full(Z.shape, RaisesOnFloat(), dtype=object)", "not an array of real numbers"),
        ("[[[[RaisesOnFloat()]]]]", "not an array of real numbers"),
    ],
)
def test_unusable_impl_results_fail_the_configuration(z_expression, reason, tmp_path):
    impl = _impl(tmp_path, z_expression)
    result = _run(
        "gradcheck", "--impl", impl, "--shape", "1,3,3,1", "--kernel", "1", "--cout", "1",
        "--json", cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    report = json.loads(result.stdout)
    assert not report["passed"]
    assert reason in report["results"][0]["error"]
    assert "Z" in report["results"][0]["error"]


@pytest.mark.parametrize("kind", ["directory", "fifo", "loop"])
def test_an_unreadable_impl_file_is_exit_66(kind, tmp_path):
    path = tmp_path / "impl.py"
    if kind == "directory":
        path.mkdir()
    elif kind == "fifo":
        os.mkfifo(path)
    else:
        path.symlink_to(path.name)
    result = _run("gradcheck", "--impl", path, cwd=tmp_path, timeout=20)
    hostile.one_error(result, 66)


# -- gradcheck: data too large to check --------------------------------------------------


@pytest.mark.parametrize(
    ("x_scale", "w_scale", "flags", "words"),
    [
        (1e300, 1.0, (), "rounded away"),  # x + eps == x: no difference to measure
        (1e200, 1e200, (), "rounded away"),
        (1e300, 1e10, ("--eps", "1e290"), "z overflows to inf"),  # the step survives, z not
    ],
)
def test_gradcheck_refuses_data_too_large_to_check(x_scale, w_scale, flags, words, tmp_path):
    rng = np.random.default_rng(0)
    data = tmp_path / "huge.npz"
    np.savez(
        data,
        x=rng.standard_normal((2, 5, 5, 3)) * x_scale,
        w=rng.standard_normal((3, 3, 3, 4)) * w_scale,
    )
    result = _run("gradcheck", data, *flags, cwd=tmp_path)
    line = hostile.one_error(result, 65)
    assert words in line


# -- numeric flags of 2**63 and beyond ------------------------------------------------------


@pytest.mark.parametrize(
    "flags",
    [
        ("--threads", str(BIG)),
        ("--threads", str(10**26)),
        ("--threads", "100000"),
    ],
)
def test_absurd_thread_counts_are_usage_errors(flags, tmp_path):
    result = _run("forward", SAMPLE_H5, *flags, cwd=tmp_path, timeout=20)
    line = hostile.one_error(result, 2)
    assert "--threads" in line


@pytest.mark.parametrize("timeout", [str(BIG), "1e300", "inf", "nan", "0"])
def test_absurd_impl_timeouts_are_usage_errors(timeout, tmp_path):
    result = _run(
        "gradcheck", "--impl", CLASSIC, "--shape", "1,3,3,1", "--kernel", "1", "--cout", "1",
        "--timeout", timeout, cwd=tmp_path, timeout=20,
    )  # fmt: skip
    line = hostile.one_error(result, 2)
    assert "--timeout" in line


def test_a_seed_of_2_63_and_more_is_used_as_given(tmp_path):
    result = _run(
        "gradcheck", "--shape", "2,5,5,3", "--kernel", "3", "--cout", "4", "--seed", str(BIG),
        cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr


# -- the limits the guard reads -------------------------------------------------------------


def test_cgroup_limits_are_read_from_v2_and_v1_files(tmp_path):
    from convcli.memory import MemoryRoom, _cgroup_folder_room

    v2, v1, unlimited = tmp_path / "v2", tmp_path / "v1", tmp_path / "max"
    for folder, files in (
        (v2, {"memory.max": "1000000\n", "memory.current": "250000\n"}),
        (v1, {"memory.limit_in_bytes": "4096\n", "memory.usage_in_bytes": "1024\n"}),
        (unlimited, {"memory.max": "max\n", "memory.current": "250000\n"}),
    ):
        folder.mkdir()
        for name, text in files.items():
            (folder / name).write_text(text)
    assert _cgroup_folder_room(v2) == 750000
    assert _cgroup_folder_room(v1) == 3072
    assert _cgroup_folder_room(unlimited) is None
    assert _cgroup_folder_room(tmp_path) is None  # no files: no limit known
    room = MemoryRoom(available=2**34, address_space=2**30, cgroup=2**31)
    assert room.least() == (2**30, "1 GiB left under the address-space limit")
    assert MemoryRoom().least() is None


def test_an_output_bigger_than_the_free_disk_is_refused_by_the_library(tmp_path):
    from convcli.errors import EXIT_CANT_CREATE, OutputError
    from convcli.memory import check_disk

    check_disk(tmp_path / "small.h5", {"z": 1})
    with pytest.raises(OutputError) as caught:
        check_disk(tmp_path / "huge.h5", {"x": 10**18, "w": 8})
    assert caught.value.exit_code == EXIT_CANT_CREATE
    assert caught.value.param == "out"
    assert "needs about" in str(caught.value)
    assert "free in" in str(caught.value)
    assert not (tmp_path / "huge.h5").exists()
