"""A reader that goes away (`convcli gradcheck ... | head -c 10`) never changes the verdict.

The installed command runs with stdout a pipe whose reading end is already closed, so every
write to stdout fails (EPIPE) — the same as a `head` that has exited, without a race — or with
stdout closed altogether. The exit code must still be the verdict (0 or 1), and stderr must
hold no "Exception ignored" message or traceback.
"""

import os
import shutil
import subprocess
import sys

import pytest

from tests.conftest import SAMPLE_NPZ

EXE = shutil.which("convcli")
COMMAND = [EXE] if EXE else [sys.executable, "-m", "convcli"]
LAYER = ["--shape", "1,5,5,2", "--kernel", "3", "--cout", "2"]
FAILING = [*LAYER, "--rtol", "0", "--atol", "0"]  # rounding error alone fails every element


def run_with_broken_stdout(*args) -> subprocess.CompletedProcess:
    reader, writer = os.pipe()
    os.close(reader)  # nobody will ever read: the first write to stdout fails with EPIPE
    try:
        return subprocess.run(
            [*COMMAND, *map(str, args)],
            stdout=writer,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
            timeout=120,
            check=False,
        )
    finally:
        os.close(writer)


def assert_quiet(stderr: str) -> None:
    assert "Exception ignored" not in stderr
    assert "Traceback" not in stderr
    assert "error" not in stderr


@pytest.mark.parametrize(
    ("args", "verdict"),
    [
        (["gradcheck", *LAYER], 0),
        (["gradcheck", *FAILING], 1),
        (["gradcheck", *LAYER, "--json"], 0),
        (["gradcheck", *FAILING, "--json"], 1),
        (["inspect", SAMPLE_NPZ, "--json"], 0),
    ],
    ids=["pass-table", "fail-table", "pass-json", "fail-json", "inspect-json"],
)
def test_broken_stdout_keeps_the_verdict(args, verdict):
    result = run_with_broken_stdout(*args)
    assert result.returncode == verdict, result.stderr
    assert_quiet(result.stderr)


@pytest.mark.parametrize(("args", "verdict"), [(LAYER, 0), (FAILING, 1)])
def test_closed_stdout_keeps_the_verdict(args, verdict):
    result = subprocess.run(
        ["bash", "-c", 'exec "$@" >&-', "convcli", *COMMAND, "gradcheck", *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == verdict, result.stderr
    assert_quiet(result.stderr)


def test_head_in_a_shell_pipeline_keeps_the_verdict():
    script = 'set -o pipefail; "$@" | head -c 10 >/dev/null; echo "${PIPESTATUS[0]}" >&2'
    result = subprocess.run(
        ["bash", "-c", script, "convcli", *COMMAND, "gradcheck", *FAILING, "--json"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.stderr.splitlines()[-1] == "1", result.stderr
    assert_quiet(result.stderr)


@pytest.mark.parametrize(("kernels", "verdict"), [("[1, 3]", 0), ("[1, 9]", 1)])
def test_broken_stdout_keeps_the_sweep_verdict(tmp_path, kernels, verdict):
    spec = tmp_path / "spec.toml"  # a 9x9 kernel does not fit the 4x4 input: an errored run
    spec.write_text(
        f'actions = ["forward"]\n[grid]\nshape = [[1, 4, 4, 2]]\nkernel = {kernels}\ncout = [2]\n'
    )
    result = run_with_broken_stdout("sweep", spec, "--out", tmp_path / "r.jsonl", "--json")
    assert result.returncode == verdict, result.stderr
    assert_quiet(result.stderr)
