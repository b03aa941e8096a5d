"""The CLI through CliRunner (and the installed command in a subprocess)."""

import json
import os
import shutil
import subprocess
import sys

import h5py
import numpy as np
import pytest
import typer
from rich.text import Text
from typer.testing import CliRunner

from convcli.cli import app
from tests.conftest import SAMPLE_H5, SAMPLE_NPZ
from tests.test_engine import Z_3_2_1

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def run_json(*args):
    result = run(*args, "--json")
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def assert_error(result, code, match):
    assert result.exit_code == code, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("convcli: error: ")
    assert match in lines[0]
    assert "Traceback" not in result.stderr + result.stdout


def test_forward_golden_values_json():
    doc = run_json("forward", SAMPLE_H5, "--slice", "z[3,2,1]")
    assert doc["command"] == "forward"
    assert doc["engine"] == "fast"
    assert doc["hparams"] == {
        "stride": [2, 2],
        "padding": [[2, 2], [2, 2]],
        "dilation": [1, 1],
        "groups": 1,
        "padding_mode": "zeros",
        "layout": "nhwc",
    }
    z = doc["tensors"]["z"]
    assert z["role"] == "output"
    assert z["shape"] == [10, 4, 4, 8]
    assert z["dtype"] == "float64"
    assert z["mean"] == pytest.approx(0.048995203528855794, rel=1e-12)
    assert set(z) >= {"role", "shape", "dtype", "mean", "std", "min", "max"}
    assert doc["tensors"]["x"]["role"] == "input"
    np.testing.assert_allclose(doc["slices"]["z[3,2,1]"], Z_3_2_1, rtol=1e-7)
    assert isinstance(doc["seconds"], float)


@pytest.mark.parametrize("engine", ["fast", "reference"])
def test_backward_golden_values_json(engine):
    doc = run_json("backward", SAMPLE_NPZ, "--engine", engine)
    means = {name: doc["tensors"][name]["mean"] for name in ("dx", "dw", "db")}
    assert means["dx"] == pytest.approx(1.4524377775388075, rel=1e-12)
    assert means["dw"] == pytest.approx(1.7269914583139097, rel=1e-12)
    assert means["db"] == pytest.approx(7.839232564616838, rel=1e-12)
    assert doc["tensors"]["dz"]["mean"] == doc["tensors"]["z"]["mean"]
    assert doc["engine"] == engine


def test_forward_table_shows_full_precision_mean_and_slice():
    result = run("forward", SAMPLE_H5, "--slice", "3,2,1")
    assert result.exit_code == 0, result.stderr
    out = result.stdout
    z_row = next(line.split() for line in out.splitlines() if line.split()[:1] == ["z"])
    mean = z_row[-4]
    assert float(mean) == pytest.approx(0.048995203528855794, rel=1e-12)
    assert len(mean) >= 18  # repr, not rounded
    assert "z[3,2,1] =" in out
    values = out.split("z[3,2,1] =")[1].strip().strip("[]").split()
    np.testing.assert_allclose([float(v) for v in values], Z_3_2_1, rtol=1e-7)
    assert "stride=2 padding=2" in out


def test_flags_override_file_hyperparameters():
    doc = run_json("forward", SAMPLE_H5, "--stride", "1", "--pad", "0,1", "--dilation", "1")
    assert doc["tensors"]["z"]["shape"] == [10, 3, 5, 8]
    assert doc["hparams"]["padding"] == [[0, 0], [1, 1]]
    doc = run_json("forward", SAMPLE_H5, "--pad", "same")
    assert doc["tensors"]["z"]["shape"] == [10, 2, 2, 8]
    doc = run_json("forward", SAMPLE_H5, "--pad", "1,2,0,1", "--stride", "1,2")
    assert doc["hparams"]["padding"] == [[1, 2], [0, 1]]
    assert doc["tensors"]["z"]["shape"] == [10, 6, 2, 8]


def test_tensor_references_from_separate_files(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 5, 5, 3)).astype(np.float32)
    w = rng.standard_normal((3, 3, 3, 4)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    np.savez(tmp_path / "params.npz", weight=w, bias=np.ones(4, np.float32))
    doc = run_json(
        "forward",
        "--x",
        tmp_path / "x.npy",
        "--w",
        f"{tmp_path / 'params.npz'}:weight",
        "--b",
        f"{tmp_path / 'params.npz'}:bias",
        "--pad",
        "1",
    )
    assert doc["tensors"]["z"]["dtype"] == "float32"
    assert doc["tensors"]["z"]["shape"] == [2, 5, 5, 4]
    from convcli import ConvSpec, conv_forward

    z, _ = conv_forward(x, w, np.ones(4, np.float32), ConvSpec(padding=1))
    assert doc["tensors"]["z"]["mean"] == pytest.approx(float(z.mean(dtype=np.float64)), rel=1e-12)


def test_override_one_tensor_of_the_data_file(tmp_path):
    h5 = tmp_path / "run.h5"
    with h5py.File(h5, "w") as f:
        f["layer1/W"] = np.ones((2, 2, 3, 8))
    doc = run_json("forward", SAMPLE_NPZ, "--w", f"{h5}:/layer1/W")
    assert doc["tensors"]["w"]["mean"] == 1.0
    assert doc["tensors"]["w"]["origin"].endswith("layer1/W")


def test_backward_upstream_modes_and_dz_file(tmp_path):
    ones = run_json("backward", SAMPLE_H5, "--upstream", "ones")
    assert ones["tensors"]["dz"]["mean"] == 1.0
    assert ones["tensors"]["db"]["mean"] == pytest.approx(10 * 4 * 4)
    r1 = run_json("backward", SAMPLE_H5, "--upstream", "random", "--seed", "7")
    r2 = run_json("backward", SAMPLE_H5, "--upstream", "random", "--seed", "7")
    assert r1["tensors"]["dx"]["mean"] == r2["tensors"]["dx"]["mean"]
    dz = np.full((10, 4, 4, 8), 2.0)
    np.save(tmp_path / "dz.npy", dz)
    given = run_json("backward", SAMPLE_H5, "--dz", tmp_path / "dz.npy")
    assert given["tensors"]["db"]["mean"] == pytest.approx(2 * ones["tensors"]["db"]["mean"])


@pytest.mark.parametrize("suffix", [".npz", ".h5"])
def test_out_writes_outputs_and_hparams(tmp_path, suffix):
    out = tmp_path / f"grads{suffix}"
    result = run("backward", SAMPLE_H5, "--out", out)
    assert result.exit_code == 0, result.stderr
    from convcli.io.tensorfile import open_tensor_file

    with open_tensor_file(out) as f:
        assert set(f.keys()) >= {"db", "dw", "dx"}
        dx = f.read("dx")
        hparams = {name: value for name, (value, _) in f.hparams().items()}
    assert dx.shape == (10, 4, 4, 3)
    assert dx.mean() == pytest.approx(1.4524377775388075, rel=1e-12)
    assert hparams["stride"] == [2, 2]
    assert hparams["padding"] == [[2, 2], [2, 2]]
    # the written file is itself a valid data file for the hyperparameters
    again = run_json(
        "forward", "--x", SAMPLE_H5, "--w", f"{SAMPLE_H5}:W", "--out", tmp_path / "z.npz"
    )
    assert again["tensors"]["z"]["shape"] == [10, 4, 4, 8]


def test_out_refuses_to_overwrite_without_force(tmp_path):
    out = tmp_path / "z.npz"
    out.write_bytes(b"precious")
    assert_error(run("forward", SAMPLE_H5, "--out", out), 73, "--force")
    assert out.read_bytes() == b"precious"
    assert run("forward", SAMPLE_H5, "--out", out, "--force").exit_code == 0
    with np.load(out) as f:
        assert f["z"].shape == (10, 4, 4, 8)
    assert [p.name for p in tmp_path.iterdir()] == ["z.npz"]


def test_out_refuses_to_write_over_an_input(tmp_path):
    data = tmp_path / "data.npz"
    shutil.copy(SAMPLE_NPZ, data)
    before = data.read_bytes()
    assert_error(run("forward", data, "--out", data, "--force"), 73, "input")
    assert data.read_bytes() == before


def test_integer_input_notice_on_stderr(tmp_path):
    np.savez(
        tmp_path / "ints.npz", x=np.ones((1, 3, 3, 1), np.int64), w=np.ones((2, 2, 1, 1), np.int64)
    )
    result = run("forward", tmp_path / "ints.npz", "--json")
    assert result.exit_code == 0
    assert "converted to float64" in result.stderr
    assert json.loads(result.stdout)["tensors"]["z"]["dtype"] == "float64"


def bad_files(tmp_path):
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"this is not a zip file at all")
    empty = tmp_path / "empty.h5"
    empty.write_bytes(b"")
    bad_hparam = tmp_path / "bad.npz"
    np.savez(bad_hparam, x=np.ones((1, 4, 4, 1)), w=np.ones((2, 2, 1, 1)), stride=1.5)
    no_w = tmp_path / "now.npz"
    np.savez(no_w, x=np.ones((1, 4, 4, 1)))
    mismatch = tmp_path / "mismatch.npz"
    np.savez(mismatch, x=np.ones((1, 4, 4, 3)), w=np.ones((2, 2, 2, 1)))
    complex_ = tmp_path / "complex.npz"
    np.savez(complex_, x=np.ones((1, 4, 4, 1), complex), w=np.ones((2, 2, 1, 1)))
    return {
        "missing": ((tmp_path / "nope.h5",), 66, "nope.h5"),
        "directory": ((tmp_path,), 66, str(tmp_path)),
        "garbage": ((garbage,), 65, "garbage.npz"),
        "empty": ((empty,), 65, "empty.h5"),
        "bad hparam in file": ((bad_hparam,), 65, "stride = 1.5 from"),
        "missing tensor": ((no_w,), 65, "no w found"),
        "cin mismatch": ((mismatch,), 65, "Cin of x is 3"),
        "complex dtype": ((complex_,), 65, "complex128"),
        "bad stride flag": ((SAMPLE_H5, "--stride", "0"), 2, "--stride '0'"),
        "bad pad flag": ((SAMPLE_H5, "--pad", "full"), 2, "--pad 'full'"),
        "bad groups": ((SAMPLE_H5, "--groups", "2"), 65, "groups=2 must divide"),
        "kernel too big": ((SAMPLE_H5, "--pad", "0", "--dilation", "5"), 65, "kernel along h"),
        "bad slice": ((SAMPLE_H5, "--slice", "z[os]"), 2, "--slice"),
        "slice out of range": ((SAMPLE_H5, "--slice", "z[99]"), 2, "shape of z"),
        "unknown option": ((SAMPLE_H5, "--strid", "2"), 2, "--strid"),
        "bad engine": ((SAMPLE_H5, "--engine", "gpu"), 2, "gpu"),
        "no data": ((), 2, "no x given"),
        "out folder missing": ((SAMPLE_H5, "--out", tmp_path / "no" / "z.npz"), 73, "z.npz"),
        "out extension": ((SAMPLE_H5, "--out", tmp_path / "z.txt"), 2, "--out"),
    }


CASES = [
    "missing",
    "directory",
    "garbage",
    "empty",
    "bad hparam in file",
    "missing tensor",
    "cin mismatch",
    "complex dtype",
    "bad stride flag",
    "bad pad flag",
    "bad groups",
    "kernel too big",
    "bad slice",
    "slice out of range",
    "unknown option",
    "bad engine",
    "no data",
    "out folder missing",
    "out extension",
]


@pytest.mark.parametrize("case", CASES)
def test_errors_are_one_line_with_exit_code(tmp_path, case):
    args, code, match = bad_files(tmp_path)[case]
    assert_error(run("forward", *args), code, match)


def test_help_for_every_command():
    for command in ("forward", "backward"):
        result = run(command, "--help")
        assert result.exit_code == 0
        assert "Example: convcli" in result.stdout


def test_installed_command_in_subprocess(tmp_path):
    exe = shutil.which("convcli")
    command = [exe] if exe else [sys.executable, "-m", "convcli"]
    env = {**os.environ, "NO_COLOR": "1"}
    done = subprocess.run(
        [*command, "forward", str(SAMPLE_H5), "--json"],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["tensors"]["z"]["mean"] == pytest.approx(
        0.048995203528855794, rel=1e-12
    )
    bad = subprocess.run(
        [*command, "backward", str(tmp_path / "missing.npz")],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert bad.returncode == 66
    assert bad.stderr.startswith("convcli: error: ")
    assert len(bad.stderr.strip().splitlines()) == 1
    module = subprocess.run(
        [sys.executable, "-m", "convcli", "--version"], capture_output=True, text=True, check=False
    )
    assert module.returncode == 0
    assert module.stdout.startswith("convcli ")


def test_interrupt_exits_130_with_one_line(monkeypatch):
    import convcli.cli.commands

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(convcli.cli.commands, "run_forward", interrupted)
    assert_error(run("forward", SAMPLE_H5), 130, "interrupted")


def test_internal_error_is_70_without_traceback(monkeypatch):
    import convcli.cli.commands

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(convcli.cli.commands, "run_forward", broken)
    assert_error(run("forward", SAMPLE_H5), 70, "internal error: RuntimeError: boom")
    result = run("--debug", "forward", SAMPLE_H5)
    assert result.exit_code == 70
    assert "Traceback" in result.stderr


@pytest.mark.parametrize(
    "args",
    [
        ["--slice", "z[99]"],
        ["--slice", "q[0]"],
        ["--slice", "z[0][1]"],
        ["--heatmap", "z[0]"],
    ],
)
def test_bad_slices_are_refused_before_anything_is_written(tmp_path, args):
    out = tmp_path / "z.h5"
    result = run("forward", SAMPLE_H5, "--out", out, *args)
    assert result.exit_code == 2, result.stderr
    assert not out.exists()
    existing = tmp_path / "old.npz"
    existing.write_bytes(b"old")
    assert run("backward", SAMPLE_H5, "--out", existing, "--force", *args).exit_code == 2
    assert existing.read_bytes() == b"old"


def test_nonfinite_inputs_refused_unless_allowed(tmp_path):
    x = np.random.default_rng(0).standard_normal((2, 5, 5, 2))
    x[1, 2, 3, 0] = np.nan
    x[0, 0, 0, 1] = np.inf
    np.savez(tmp_path / "nan.npz", x=x, w=np.ones((2, 2, 2, 3)))
    assert_error(
        run("forward", tmp_path / "nan.npz"), 65, "x has 2 NaN/Inf values (first at [0, 0, 0, 1])"
    )
    allowed = run("forward", tmp_path / "nan.npz", "--allow-nonfinite", "--json")
    assert allowed.exit_code == 0
    assert allowed.stderr == ""  # no NumPy RuntimeWarnings leak out
    doc = json.loads(allowed.stdout)
    assert doc["tensors"]["x"]["nonfinite"] == 2
    assert doc["tensors"]["z"]["nonfinite"] > 0
    assert doc["tensors"]["z"]["mean"] is None
    assert_error(run("gradcheck", tmp_path / "nan.npz"), 65, "gradient checks need finite values")


def test_memory_guard_refuses_with_the_estimate(tmp_path):
    assert_error(run("forward", SAMPLE_H5, "--max-memory", "1K"), 65, "left of --max-memory")
    assert_error(
        run("forward", SAMPLE_H5, "--max-memory", "6K"), 65, "more than --max-memory 6 KiB"
    )
    assert run("forward", SAMPLE_H5, "--max-memory", "none").exit_code == 0
    assert_error(run("forward", SAMPLE_H5, "--max-memory", "lots"), 2, "--max-memory 'lots'")
    result = runner.invoke(
        app, ["gradcheck", "--shape", "100000,1000,1000,3", "--kernel", "3", "--cout", "8"]
    )
    assert result.exit_code == 65
    assert "more than --max-memory" in result.stderr


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (
            ["--impl", "IMPL", "--dilation", "2"],
            "does not use hyperparameter flags without --shape",
        ),
        (["--impl", "IMPL", "--samples", "3"], "does not use --samples without --mode sample"),
        (["SAMPLE", "--kernel", "5"], "--kernel and --cout go with --shape"),
        (["--shape", "2,5,5,3", "--kernel", "3", "--cout", "2", "--seed", "-1"], "--seed"),
    ],
)
def test_gradcheck_refuses_flags_it_would_ignore(args, match):
    impl = str(SAMPLE_NPZ.parent / "classic_conv.py")
    args = [impl if a == "IMPL" else str(SAMPLE_NPZ) if a == "SAMPLE" else a for a in args]
    assert_error(run("gradcheck", *args), 2, match)


def test_hdf5_file_locked_by_a_writer_is_66(tmp_path):
    path = tmp_path / "busy.h5"
    with h5py.File(path, "w") as writer:
        writer["x"] = np.ones((1, 4, 4, 1))
        writer["w"] = np.ones((2, 2, 1, 1))
        writer.flush()
        done = subprocess.run(
            [sys.executable, "-m", "convcli", "forward", str(path)],
            capture_output=True,
            text=True,
            check=False,
        )
    assert done.returncode == 66, done.stderr
    assert "locked by another process" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_choice_enums_list_exactly_the_library_names():
    """The CLI spells its choices out (for type checkers); they must not drift from the library."""
    from convcli.check.gradients import MODES
    from convcli.cli.commands import DtypeName, EngineName, ModeName, UpstreamName
    from convcli.generate import DTYPES
    from convcli.run import ENGINES, UPSTREAMS

    for choices, names in (
        (EngineName, ENGINES),
        (UpstreamName, UPSTREAMS),
        (ModeName, MODES),
        (DtypeName, DTYPES),
    ):
        assert [c.value for c in choices] == list(names)


def test_no_help_text_loses_words_to_rich_markup():
    """Typer renders help as Rich markup: ``[random]`` would vanish unless escaped."""
    group = typer.main.get_command(app)
    for name, command in group.commands.items():  # type: ignore[attr-defined]
        texts = [command.help or ""] + [getattr(p, "help", None) or "" for p in command.params]
        for text in texts:
            assert Text.from_markup(text).plain == text.replace("\\[", "["), (name, text)
