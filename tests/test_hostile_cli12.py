"""Hostile environments for the command line's process and output contract (issue 12).

Through the installed command (:mod:`tests.hostile`): a full disk during every write path,
SIGTERM, a reader that goes away, an ASCII-only stdout, a narrow terminal, error lines that
must stay one line, file names that look like Rich markup, and deeply nested ``--slice``.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from tests import hostile
from tests.conftest import SAMPLE_H5, SAMPLE_NPZ

OLD = b"the old output, which must survive\n"
LAYER = ["--shape", "2,5,5,2", "--kernel", "3", "--cout", "2"]


@pytest.fixture(scope="module")
def streamed_input(tmp_path_factory) -> Path:
    """An HDF5 layer whose x (64 x 16 x 16 x 4 float64, 512 KiB) is bigger than a 64K
    workspace, so forward and backward stream it and write z / dx block by block."""
    path = tmp_path_factory.mktemp("streamed") / "layer.h5"
    rng = np.random.default_rng(12)
    with h5py.File(path, "w") as h5:
        h5["x"] = rng.standard_normal((64, 16, 16, 4))
        h5["w"] = rng.standard_normal((3, 3, 4, 8))
        h5["b"] = rng.standard_normal(8)
        h5.attrs["padding"] = 1
    return path


def old_file(folder: Path, name: str) -> Path:
    path = folder / name
    path.write_bytes(OLD)
    return path


# -- 1. disk full on every write path -----------------------------------------------------

FULL = hostile.Limits(file_size=20_000)  # every output below is bigger: writes fail (EFBIG)

WRITES = {
    "forward-streamed-h5": ("forward", "{streamed}", "--max-workspace", "64K", "--out"),
    "backward-streamed-h5": ("backward", "{streamed}", "--max-workspace", "64K", "--out"),
    "forward-in-memory-h5": ("forward", "{streamed}", "--out"),
    "forward-in-memory-npz": ("forward", "{streamed}", "--out"),
    "backward-in-memory-npz": ("backward", "{streamed}", "--out"),
    "generate-h5": ("generate",),
    "generate-npz": ("generate",),
}
GENERATE = ["--shape", "64,16,16,4", "--kernel", "3", "--cout", "8"]


DISK_FULL = [(case, True) for case in WRITES]
DISK_FULL += [(case, False) for case in ("forward-streamed-h5", "generate-h5")]


@pytest.mark.parametrize(("case", "exists"), DISK_FULL)
def test_disk_full_is_exit_73_and_keeps_the_old_file(case, exists, streamed_input, tmp_path):
    suffix = ".npz" if case.endswith("npz") else ".h5"
    out = old_file(tmp_path, "out" + suffix) if exists else tmp_path / ("out" + suffix)
    args = [a.format(streamed=streamed_input) for a in WRITES[case]]
    args = [*args, out, *GENERATE] if case.startswith("generate") else [*args, out]
    with hostile.unchanged(out):
        result = hostile.run(*args, "--force", cwd=tmp_path, limits=FULL, timeout=30)
    line = hostile.one_error(result, 73)
    assert str(out) in line, line
    assert "File too large" in line, line
    assert result.stdout == ""


def test_a_streamed_write_that_fits_still_works(streamed_input, tmp_path):
    """The guarded HDF5 output is a normal file when nothing fails."""
    out = tmp_path / "z.h5"
    result = hostile.run(
        "forward", streamed_input, "--max-workspace", "64K", "--out", out, "--json", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    with h5py.File(streamed_input) as h5, h5py.File(out) as written:
        assert written["z"].shape == (64, 16, 16, 8)
        assert list(written.attrs["padding"].ravel()) == [1, 1, 1, 1]
        x, w, b = h5["x"][:4], h5["w"][:], h5["b"][:]
    from convcli import ConvSpec, conv_forward

    with h5py.File(out) as written:
        z, _ = conv_forward(x, w, b, ConvSpec(padding=1))
        np.testing.assert_allclose(written["z"][:4], z, rtol=1e-12, atol=1e-12)


# -- 2. SIGTERM ----------------------------------------------------------------------------


def start(*args: object, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [*hostile.command(), *map(str, args)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        env={**os.environ, "NO_COLOR": "1"},
        cwd=cwd,
        preexec_fn=hostile.Limits().apply,
    )


def wait_for_temp_file(proc: subprocess.Popen, folder: Path) -> bool:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and proc.poll() is None:
        if any(p.name.startswith(hostile.TEMP_PREFIX) for p in folder.iterdir()):
            return True
        time.sleep(0.001)
    return False


@pytest.fixture(scope="module")
def slow_streamed_input(tmp_path_factory) -> Path:
    """x of 4096 x 8 x 8 x 4 float64 (8 MiB) streamed through a 16K workspace: one image
    per block, so the run takes a few seconds of writing its output."""
    path = tmp_path_factory.mktemp("slow") / "layer.h5"
    rng = np.random.default_rng(7)
    with h5py.File(path, "w") as h5:
        h5["x"] = rng.standard_normal((4096, 8, 8, 4))
        h5["w"] = rng.standard_normal((3, 3, 4, 4))
    return path


def test_sigterm_while_writing_exits_143_and_cleans_up(slow_streamed_input, tmp_path):
    out = old_file(tmp_path, "out.h5")
    with hostile.unchanged(out):
        proc = start(
            "forward",
            slow_streamed_input,
            "--max-workspace",
            "16K",
            "--out",
            out,
            "--force",
            cwd=tmp_path,
        )
        try:
            assert wait_for_temp_file(proc, tmp_path), "no temporary file seen"
            proc.send_signal(signal.SIGTERM)
            _, stderr = proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    stderr = stderr.decode(errors="replace")
    assert proc.returncode == 143, (proc.returncode, stderr)
    assert stderr.splitlines() == ["convcli: error: terminated"], stderr


def catches_sigterm(pid: int) -> bool:
    """Whether the process has a handler for SIGTERM (its SigCgt mask in /proc)."""
    with open(f"/proc/{pid}/status") as status:
        caught = next(line for line in status if line.startswith("SigCgt:"))
    return bool(int(caught.split()[1], 16) & (1 << (signal.SIGTERM - 1)))


def test_sigterm_at_start_up_exits_143(tmp_path):
    """As soon as the console script runs (before the heavy modules are loaded). Before
    that, the interpreter is still starting and SIGTERM kills it (nothing is written yet)."""
    proc = start("gradcheck", *LAYER, cwd=tmp_path)
    while proc.poll() is None and not catches_sigterm(proc.pid):
        time.sleep(0.0005)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=30)
    stderr = stderr.decode(errors="replace")
    assert proc.returncode == 143, (proc.returncode, stderr)
    assert stderr.splitlines() == ["convcli: error: terminated"], stderr


# -- 3. a reader that goes away ------------------------------------------------------------


def with_broken_stdout(*args: object, closed: bool = False) -> subprocess.CompletedProcess:
    """Run with stdout closed (``>&-``) or a pipe nobody reads (EPIPE on the first write)."""
    argv = [*hostile.command(), *map(str, args)]
    env = {**os.environ, "NO_COLOR": "1"}
    if closed:
        argv = ["bash", "-c", 'exec "$@" >&-', "convcli", *argv]
        return hostile.check(
            subprocess.run(argv, capture_output=True, text=True, env=env, timeout=60, check=False)
        )
    reader, writer = os.pipe()
    os.close(reader)
    try:
        return hostile.check(
            subprocess.run(
                argv,
                stdout=writer,
                stderr=subprocess.PIPE,
                text=True,
                env=env,
                timeout=60,
                check=False,
                stdin=subprocess.DEVNULL,
            )
        )
    finally:
        os.close(writer)


BROKEN = {
    "forward": (["forward", SAMPLE_H5, "--slice", "z[3]", "--heatmap", "z[0,:,:,0]"], 0),
    "backward": (["backward", SAMPLE_NPZ], 0),
    "inspect": (["inspect", SAMPLE_NPZ], 0),
    "generate": (["generate", "{tmp}/g.npz", *LAYER], 0),
    "help": (["--help"], 0),
    "forward-help": (["forward", "--help"], 0),
    "no-arguments": ([], 2),
    "version": (["--version"], 0),
    "usage-error": (["forward", SAMPLE_H5, "--stride", "0.5"], 2),
}


READERS = [(case, False) for case in BROKEN]
READERS += [(case, True) for case in ("forward", "help", "no-arguments")]


@pytest.mark.parametrize(("case", "closed"), READERS)
def test_a_reader_that_goes_away_keeps_the_exit_code(case, closed, tmp_path):
    args, code = BROKEN[case]
    result = with_broken_stdout(*(str(a).format(tmp=tmp_path) for a in args), closed=closed)
    assert result.returncode == code, (result.returncode, result.stderr)
    assert "Exception ignored" not in result.stderr
    assert "Traceback" not in result.stderr
    if code == 0:
        assert "error" not in result.stderr, result.stderr


def test_head_in_a_pipeline_keeps_the_exit_code(tmp_path):
    script = '"$@" | head -1 >/dev/null; echo "${PIPESTATUS[0]}" >&2'
    result = hostile.check(
        subprocess.run(
            [
                "bash",
                "-c",
                script,
                "convcli",
                *hostile.command(),
                "backward",
                SAMPLE_NPZ,
                "--slice",
                "dx",
                "--slice",
                "dw",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            env={**os.environ, "COLUMNS": "40"},
        )
    )
    assert result.stderr.splitlines() == ["0"], result.stderr


# -- 4. an ASCII-only stdout ---------------------------------------------------------------

ASCII_ENVS = {
    "PYTHONIOENCODING=ascii": {"PYTHONIOENCODING": "ascii"},
    "LC_ALL=C": {"LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0", "PYTHONIOENCODING": ""},
}
PRINTING = {
    "forward": ["forward", SAMPLE_H5, "--slice", "z[3,2,1]", "--heatmap", "z[3,:,:,0]"],
    "backward": ["backward", SAMPLE_NPZ, "--heatmap", "dw[:,:,0,1]"],
    "gradcheck": ["gradcheck", SAMPLE_H5],
    "gradcheck-failing": ["gradcheck", *LAYER, "--rtol", "0", "--atol", "0"],
    "inspect": ["inspect", SAMPLE_NPZ],
    "generate": ["generate", "{tmp}/g.h5", *LAYER],
    "help": ["--help"],
    "gradcheck-help": ["gradcheck", "--help"],
}


@pytest.fixture
def sweep_spec(tmp_path) -> Path:
    spec = tmp_path / "spec.toml"
    spec.write_text(
        'actions = ["forward"]\n[grid]\nshape = [[1, 4, 4, 2]]\nkernel = [1, 3]\ncout = [2]\n'
    )
    return spec


ASCII_CASES = [(case, "PYTHONIOENCODING=ascii", False) for case in [*PRINTING, "sweep"]]
ASCII_CASES += [(case, "LC_ALL=C", True) for case in ("forward", "gradcheck-failing")]


@pytest.mark.parametrize(("case", "env", "colour"), ASCII_CASES)
def test_an_ascii_only_stdout_gets_ascii(case, env, colour, sweep_spec, tmp_path):
    if case == "sweep":
        args = ["sweep", sweep_spec, "--out", tmp_path / "r.jsonl"]
    else:
        args = [str(a).format(tmp=tmp_path) for a in PRINTING[case]]
    environment = dict(ASCII_ENVS[env])
    if colour:
        environment.update(NO_COLOR="", FORCE_COLOR="1")
    result = hostile.run(*args, cwd=tmp_path, env=environment, timeout=60)
    assert result.returncode == (1 if case == "gradcheck-failing" else 0), result.stderr
    assert result.stdout.isascii()
    assert result.stderr.isascii()
    assert "\\u" not in result.stdout
    assert "\\x" not in result.stdout
    assert result.stdout.strip()


def test_ascii_stdout_keeps_the_arrows_readable(tmp_path):
    result = hostile.run("forward", SAMPLE_H5, cwd=tmp_path, env={"PYTHONIOENCODING": "ascii"})
    assert "x <- " in result.stdout, result.stdout
    assert " - engine=fast - " in result.stdout, result.stdout


# -- 5. a narrow terminal never cuts a number ----------------------------------------------

NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:e[+-]?\d+)?")
TIMING = re.compile(r"\d+(?:\.\d+)? m?s\b")  # timings differ from run to run


def numbers(text: str) -> set[str]:
    return set(NUMBER.findall(TIMING.sub("", text)))


NARROW = {
    "forward": ["forward", SAMPLE_H5, "--slice", "z[3,2,1]", "--heatmap", "z[3,:,:,0]"],
    "backward": ["backward", SAMPLE_NPZ],
    "backward-nonfinite-column": ["backward", SAMPLE_NPZ, "--allow-nonfinite"],
    "gradcheck": ["gradcheck", SAMPLE_H5],
    "gradcheck-failing": ["gradcheck", *LAYER, "--rtol", "0", "--atol", "0"],
    "inspect": ["inspect", SAMPLE_NPZ],
}


_WIDE: dict[str, subprocess.CompletedProcess] = {}


def wide(case: str, cwd: Path) -> subprocess.CompletedProcess:
    """The run at COLUMNS=200, once per case."""
    if case not in _WIDE:
        _WIDE[case] = hostile.run(*NARROW[case], cwd=cwd, env={"COLUMNS": "200"})
    return _WIDE[case]


@pytest.mark.parametrize(("case", "columns"), [*((case, 20) for case in NARROW), ("forward", 40)])
def test_a_narrow_terminal_never_cuts_a_number(case, columns, tmp_path):
    reference = wide(case, tmp_path)
    narrow = hostile.run(*NARROW[case], cwd=tmp_path, env={"COLUMNS": str(columns)})
    assert narrow.returncode == reference.returncode
    missing = numbers(reference.stdout) - numbers(narrow.stdout)
    assert not missing, (missing, narrow.stdout)


def test_a_table_that_fits_is_still_a_table(tmp_path):
    result = hostile.run("forward", SAMPLE_H5, cwd=tmp_path, env={"COLUMNS": "80"})
    assert "x       (10, 4, 4, 3)  float64  0.056276408216748744" in result.stdout


# -- 6. error lines are one line; names are text, never markup ------------------------------


@pytest.mark.parametrize(
    "name",
    ["new\nline.h5", "carriage\rreturn.h5", "tab\tand\x1b[31mescape.h5", "bell\x07.npz"],
    ids=["newline", "carriage-return", "escape-sequence", "bell"],
)
def test_control_characters_in_a_path_stay_on_one_line(name, tmp_path):
    result = hostile.run("forward", tmp_path / name, cwd=tmp_path)
    line = hostile.one_error(result, 66)
    assert not any(c in line for c in "\x1b\x07\r\t"), line
    assert "\\n" in line or "\\r" in line or "\\t" in line or "\\x07" in line, line


def test_a_control_character_in_a_key_stays_on_one_line(tmp_path):
    data = tmp_path / "data.npz"
    np.savez(data, **{"x": np.ones((1, 3, 3, 1)), "w": np.ones((1, 1, 1, 1))})
    result = hostile.run(
        "forward", "--x", f"{data}:no\nsuch\rkey", "--w", f"{data}:w", cwd=tmp_path
    )
    line = hostile.one_error(result, 65 if result.returncode == 65 else 66)
    assert "no\\nsuch\\rkey" in line, line


def test_a_huge_message_is_abbreviated(tmp_path):
    name = "a" * 200 + "/" + "b" * 200 + "/" + "c" * 200 + "/" + "d" * 200 + "/end.h5"
    result = hostile.run("forward", name, cwd=tmp_path)
    line = hostile.one_error(result, 66)
    assert len(line) <= 600, len(line)
    assert line.startswith("convcli: error: aaaa"), line
    assert "end.h5" in line, line


MARKUP = ["[/].npz", "[bold]x.h5", "[red]a[/red].npz", "[link=x]y.h5"]


@pytest.mark.parametrize("name", MARKUP)
def test_markup_in_a_missing_name_is_printed_as_text(name, tmp_path):
    (tmp_path / name).parent.mkdir(exist_ok=True)
    assert name in hostile.one_error(hostile.run("inspect", tmp_path / name, cwd=tmp_path), 66)


@pytest.mark.slow  # seven runs of the command
@pytest.mark.parametrize("name", ["[bold]x.h5"])
def test_markup_in_a_name_is_printed_as_text(name, tmp_path):
    """Errors, 'wrote' messages, table titles and captions: the name, verbatim."""
    missing = hostile.run("forward", tmp_path / name, cwd=tmp_path)
    assert name in hostile.one_error(missing, 66)
    out = tmp_path / name
    out.parent.mkdir(exist_ok=True)  # "[/].npz" is the file "].npz" in the folder "["
    made = hostile.run("generate", out, *LAYER, cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    assert name in made.stdout
    for args in (["inspect", out], ["forward", out], ["backward", out, "--json"]):
        shown = hostile.run(*args, cwd=tmp_path, env={"COLUMNS": "200"})
        assert shown.returncode == 0, shown.stderr
        assert name in shown.stdout, shown.stdout
    exists = hostile.run("generate", out, *LAYER, cwd=tmp_path)
    assert name in hostile.one_error(exists, 73)
    again = hostile.run("forward", SAMPLE_NPZ, "--out", out, cwd=tmp_path)
    assert name in hostile.one_error(again, 73)


def test_markup_in_a_note_is_printed_as_text(tmp_path):
    data = tmp_path / "[bold]ints.npz"
    np.savez(data, x=np.ones((1, 3, 3, 1), dtype=np.int64), w=np.ones((1, 1, 1, 1)))
    result = hostile.run("forward", data, cwd=tmp_path, env={"COLUMNS": "200"})
    assert result.returncode == 0, result.stderr
    assert "convcli: note:" in result.stderr


# -- 7. deeply nested --slice --------------------------------------------------------------

DEEP = 60_000  # one argument may hold 128 KiB (MAX_ARG_STRLEN)
NESTED = {
    "parentheses": "z[" + "(" * DEEP + "1" + ")" * DEEP + "]",
    "open-parentheses": "z[" + "(" * DEEP + "]",
    "minus-signs": "z[" + "-" * DEEP + "1]",
    "plus-signs": "z[" + "+" * DEEP + "1]",
    "nested-tuples": "z[" + "(" * 50 + "1" + ",)" * 50 + "]",
    "bare-index": "(" * DEEP + "1" + ")" * DEEP,
    "long": "z[" + ",".join(["0"] * DEEP) + "]",
    "brackets": "z[" + "[" * DEEP + "]",
}


@pytest.mark.parametrize(
    ("case", "flag"),
    [
        *((case, "--slice") for case in NESTED),
        ("parentheses", "--heatmap"),
        ("minus-signs", "--heatmap"),
    ],
)
def test_deeply_nested_slices_are_usage_errors(case, flag, tmp_path):
    result = hostile.run("forward", SAMPLE_NPZ, flag, NESTED[case], cwd=tmp_path, timeout=20)
    line = hostile.one_error(result, 2)
    assert len(line) <= 600
