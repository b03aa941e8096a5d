"""Hostile input against ``convcli sweep`` and its results file, through the installed command.

Each case asserts the exit code, exactly one ``convcli: error:`` line, bounded time and
memory (:mod:`tests.hostile`), and that the files it touches keep their bytes: special files
as results, grids too big to expand, configurations too big to allocate, results files that
are not results, two sweeps on one file, a full disk, strangers at the scheduler address and
deeply nested or unreadable specs.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import hostile

TINY = """actions = ["forward"]
[grid]
shape = [[1, 4, 4, 1]]
kernel = [1]
cout = [1, 2]
"""
TINY_RUNS = 2
MiB = 2**20


def spec_file(folder: Path, text: str = TINY, name: str = "spec.toml") -> Path:
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return path


def partial_of(out: Path) -> Path:
    return out.with_name(f".{out.name}.convcli-partial")


def lock_of(out: Path) -> Path:
    return out.with_name(f".{out.name}.convcli-lock")


@pytest.fixture(scope="module")
def tiny_results(tmp_path_factory) -> bytes:
    """The results file of a sweep of TINY (run once: records depend on the spec's content,
    not on where it is)."""
    folder = tmp_path_factory.mktemp("tiny")
    spec, out = spec_file(folder), folder / "r.jsonl"
    result = hostile.run("sweep", spec, "--out", out, cwd=folder)
    assert result.returncode == 0, result.stderr
    return out.read_bytes()


@pytest.fixture
def results(tmp_path, tiny_results) -> tuple[Path, Path]:
    """A spec (TINY) and the complete results of its sweep, in ``tmp_path``."""
    spec, out = spec_file(tmp_path), tmp_path / "r.jsonl"
    out.write_bytes(tiny_results)
    return spec, out


# ---------------------------------------------------------------------------------------------
# 1. Results and partial files that are not regular files
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", ["/dev/zero", "/dev/full"])
@pytest.mark.parametrize("mode", ["--resume", "--append"])
def test_resume_from_a_device_is_refused(tmp_path, device, mode):
    spec, link = spec_file(tmp_path), tmp_path / "link.jsonl"
    link.symlink_to(device)
    with hostile.unchanged(link, partial_of(link)):
        result = hostile.run("sweep", spec, "--out", link, mode, cwd=tmp_path, timeout=20)
    line = hostile.one_error(result, 66)
    assert "not a regular file" in line


def special_files(folder: Path) -> Iterator[Path]:
    fifo = folder / "fifo.jsonl"
    os.mkfifo(fifo)
    yield fifo
    directory = folder / "dir.jsonl"
    directory.mkdir()
    yield directory
    for device in ("/dev/null", "/dev/full"):
        link = folder / f"{Path(device).name}.jsonl"
        link.symlink_to(device)
        yield link
    sock = folder / "sock.jsonl"
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(sock))
    yield sock
    server.close()


@pytest.mark.slow  # five kinds of special file, one run each
@pytest.mark.parametrize("where", ["out", "partial"])
def test_force_never_replaces_a_special_file(tmp_path, where):
    spec = spec_file(tmp_path)
    for special in special_files(tmp_path):
        out = special if where == "out" else tmp_path / f"r-{special.name}"
        if where == "partial":
            os.rename(special, partial_of(out))
            special = partial_of(out)
        with hostile.unchanged(special, out):
            result = hostile.run("sweep", spec, "--out", out, "--force", cwd=tmp_path, timeout=20)
        line = hostile.one_error(result, 73)
        assert str(special) in line or "directory" in line, line


def test_resume_from_a_fifo_partial_file_is_refused(tmp_path, results):
    spec, out = results
    os.mkfifo(partial_of(out))
    with hostile.unchanged(out, partial_of(out)):
        result = hostile.run("sweep", spec, "--out", out, "--resume", cwd=tmp_path, timeout=20)
    hostile.one_error(result, 66)


# ---------------------------------------------------------------------------------------------
# 2. Grids counted before they are expanded
# ---------------------------------------------------------------------------------------------

BILLION = """actions = ["forward"]
[grid]
shape = [[1, 4, 4, 1]]
kernel = [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]
cout = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]
seed = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]
stride = [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]
dilation = [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]
groups = [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]
pad = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
dtype = ["float64", "float64", "float64", "float64", "float64",
         "float64", "float64", "float64", "float64", "float64"]
padding_mode = ["zeros", "zeros", "zeros", "zeros", "zeros",
                "zeros", "zeros", "zeros", "zeros", "zeros"]
"""


def test_a_billion_grid_combinations_are_counted_not_expanded(tmp_path):
    spec, out = spec_file(tmp_path, BILLION), tmp_path / "r.jsonl"
    with hostile.unchanged(out):
        result = hostile.run(
            "sweep", spec, "--out", out, cwd=tmp_path, limits=hostile.Limits(), timeout=20
        )
    line = hostile.one_error(result, 65)
    assert "1000000000" in line.replace(",", "")
    assert "--max-configs" in line


def test_max_configs_allows_more(tmp_path):
    spec, out = spec_file(tmp_path), tmp_path / "r.jsonl"
    with hostile.unchanged(out):
        refused = hostile.run("sweep", spec, "--out", out, "--max-configs", 1, cwd=tmp_path)
    assert "--max-configs" in hostile.one_error(refused, 65)
    ran = hostile.run("sweep", spec, "--out", out, "--max-configs", TINY_RUNS, cwd=tmp_path)
    assert ran.returncode == 0, ran.stderr
    assert len(out.read_text().splitlines()) == TINY_RUNS


def test_max_configs_must_be_positive(tmp_path):
    result = hostile.run("sweep", spec_file(tmp_path), "--max-configs", 0, cwd=tmp_path)
    hostile.one_error(result, 2)


# ---------------------------------------------------------------------------------------------
# 3. The memory guard of each configuration
# ---------------------------------------------------------------------------------------------

HUGE_CONFIG = """actions = ["forward", "backward"]
[[configs]]
shape = [1000000, 1000, 1000, 8]
kernel = 3
cout = 8
[[configs]]
shape = [1, 4, 4, 1]
kernel = 1
cout = 1
"""


@pytest.mark.parametrize("max_memory", [[], ["--max-memory", "1G"]])
def test_a_configuration_too_big_for_memory_errors_before_allocating(tmp_path, max_memory):
    spec, out = spec_file(tmp_path, HUGE_CONFIG), tmp_path / "r.jsonl"
    result = hostile.run(
        "sweep", spec, "--out", out, "--json", *max_memory, cwd=tmp_path, timeout=30
    )
    assert result.returncode == 1, result.stderr
    summary = json.loads(result.stdout)
    assert summary["counts"] == {"passed": 1, "failed": 0, "errored": 1}
    first = summary["results"][0]
    assert first["status"] == "errored"
    assert "needs about" in first["error"]
    assert "max_memory" in first["error"]


# ---------------------------------------------------------------------------------------------
# 4. --resume reads only convcli results, and drops only a torn final record
# ---------------------------------------------------------------------------------------------


def test_resume_refuses_a_file_with_no_newline(tmp_path):
    spec, out = spec_file(tmp_path), tmp_path / "r.jsonl"
    out.write_bytes(b"precious data " * 100_000)
    with hostile.unchanged(out, partial_of(out)):
        result = hostile.run("sweep", spec, "--out", out, "--resume", cwd=tmp_path)
    line = hostile.one_error(result, 65)
    assert "not a convcli results file" in line


def test_resume_refuses_a_huge_sparse_file_in_bounded_memory(tmp_path):
    spec, out = spec_file(tmp_path), tmp_path / "r.jsonl"
    with open(out, "wb") as handle:
        handle.truncate(50 * 2**30)  # 50 GiB of zeros, no newline, no blocks on disk
    with hostile.unchanged(partial_of(out)):
        result = hostile.run(
            "sweep", spec, "--out", out, "--resume", cwd=tmp_path, limits=hostile.Limits()
        )
    hostile.one_error(result, 65)
    assert out.stat().st_size == 50 * 2**30


@pytest.mark.parametrize(
    "odd",
    [
        '{"key": [1, 2]}',
        '{"key": "0123456789abcdef", "status": "passed"}',  # no config
        "[1, 2, 3]",
        "not json at all",
        '{"key": "k", "config": {}, "status": "passed", "gradcheck": 7}',
        "[" * 100_000 + "]" * 100_000,
    ],
)
@pytest.mark.parametrize("where", ["out", "partial"])
def test_resume_refuses_odd_lines_before_writing(tmp_path, results, odd, where):
    spec, out = results
    rows = out.read_text().splitlines(keepends=True)
    text = "".join(rows[:1]) + odd + "\n" + "".join(rows[1:])
    target = out if where == "out" else partial_of(out)
    target.write_text(text)
    with hostile.unchanged(out, partial_of(out)):
        result = hostile.run("sweep", spec, "--out", out, "--resume", cwd=tmp_path)
    line = hostile.one_error(result, 65)
    assert "line 2" in line


def test_resume_refuses_a_first_line_that_is_not_a_record(tmp_path, results):
    spec, out = results
    out.write_text('{"hello": "world"}\n' + out.read_text())
    with hostile.unchanged(out, partial_of(out)):
        result = hostile.run("sweep", spec, "--out", out, "--resume", cwd=tmp_path)
    line = hostile.one_error(result, 65)
    assert "not a convcli results file" in line


def test_resume_drops_only_a_torn_final_record(tmp_path, results):
    spec, out = results
    rows = out.read_text().splitlines(keepends=True)
    out.write_text(rows[0] + rows[1][: len(rows[1]) // 2])  # killed while writing line 2
    result = hostile.run("sweep", spec, "--out", out, "--resume", "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["skipped"] == 1
    assert len([json.loads(line) for line in out.read_text().splitlines()]) == TINY_RUNS


def test_resume_keeps_a_complete_last_record_without_newline(tmp_path, results):
    spec, out = results
    rows = out.read_text().splitlines(keepends=True)
    out.write_text(rows[0].rstrip("\n"))
    result = hostile.run("sweep", spec, "--out", out, "--resume", "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["skipped"] == 1
    assert len([json.loads(line) for line in out.read_text().splitlines()]) == TINY_RUNS


# ---------------------------------------------------------------------------------------------
# 5. One sweep at a time per results file
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", [[], ["--resume"], ["--force"]])
def test_a_second_sweep_on_the_same_results_is_refused(tmp_path, results, mode):
    spec, out = results
    lock = lock_of(out)
    with open(lock, "a") as handle:  # what a running sweep holds
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with hostile.unchanged(out, partial_of(out)):
            result = hostile.run("sweep", spec, "--out", out, *mode, cwd=tmp_path, timeout=20)
    line = hostile.one_error(result, 73)
    assert "another sweep" in line


def test_two_concurrent_sweeps_never_duplicate_records(tmp_path):
    text = TINY.replace("cout = [1, 2]", f"cout = {list(range(1, 41))}")
    spec, out = spec_file(tmp_path, text), tmp_path / "r.jsonl"
    args = [*hostile.command(), "sweep", str(spec), "--out", str(out), "--resume"]
    procs = [
        subprocess.Popen(
            args, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    codes = [(p.communicate(timeout=60)[1], p.returncode) for p in procs]
    codes = [(code, err) for err, code in codes]
    assert sorted(c for c, _ in codes) in ([0, 0], [0, 73]), codes
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 40
    assert len({r["key"] for r in records}) == 40
    assert not lock_of(out).exists()


# ---------------------------------------------------------------------------------------------
# 6. A full disk
# ---------------------------------------------------------------------------------------------


def test_disk_full_while_copying_the_results_keeps_them(tmp_path, results):
    spec, out = results
    with hostile.unchanged(out, partial_of(out)):
        result = hostile.run(
            "sweep",
            spec,
            "--out",
            out,
            "--resume",
            cwd=tmp_path,
            limits=hostile.Limits(file_size=out.stat().st_size // 2),
        )
    hostile.one_error(result, 73)


@pytest.mark.parametrize("mode", ["--resume", "--force"])
def test_disk_full_while_appending_keeps_the_old_results(tmp_path, results, mode):
    spec, out = results
    rows = out.read_text().splitlines(keepends=True)
    out.write_text(rows[0])
    with hostile.unchanged(out):
        result = hostile.run(
            "sweep",
            spec,
            "--out",
            out,
            mode,
            cwd=tmp_path,
            limits=hostile.Limits(file_size=len(rows[0]) + 10),
        )
    line = hostile.one_error(result, 73)
    assert "cannot write" in line
    partial = partial_of(out)
    if partial.exists():  # whatever is kept is whole records, to resume from
        for row in partial.read_text().splitlines(keepends=True):
            assert row.endswith("\n")
            json.loads(row)


# ---------------------------------------------------------------------------------------------
# 7. The scheduler address
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def stranger() -> Iterator[str]:
    """A TCP server that answers every connection with bytes no Dask scheduler sends: a
    frame header declaring 2**63 bytes, then noise."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                continue
            with conn:
                try:
                    conn.sendall((2**63).to_bytes(8, "little") + os.urandom(4096))
                    time.sleep(0.5)
                except OSError:
                    pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield f"tcp://127.0.0.1:{server.getsockname()[1]}"
    stop.set()
    thread.join()
    server.close()


def closed_port() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{sock.getsockname()[1]}"


@pytest.mark.parametrize(
    "address", ["not an address!!", "tcp://", "tcp://127.0.0.1:99999", "ucx://x:1", "closed"]
)
def test_a_bad_scheduler_address_is_a_usage_error(tmp_path, address):
    pytest.importorskip("distributed")
    address = closed_port() if address == "closed" else address
    spec, out = spec_file(tmp_path), tmp_path / "r.jsonl"
    began = time.monotonic()
    with hostile.unchanged(out, partial_of(out)):
        result = hostile.run("sweep", spec, "--out", out, "--scheduler", address, cwd=tmp_path)
    hostile.one_error(result, 2)
    assert time.monotonic() - began < 8


def test_a_stranger_at_the_scheduler_address_is_refused(tmp_path, stranger):
    pytest.importorskip("distributed")
    spec, out = spec_file(tmp_path), tmp_path / "r.jsonl"
    began = time.monotonic()
    with hostile.unchanged(out, partial_of(out)):
        result = hostile.run(
            "sweep",
            spec,
            "--out",
            out,
            "--scheduler",
            stranger,
            cwd=tmp_path,
            limits=hostile.Limits(memory=2 * hostile.GiB),
        )
    line = hostile.one_error(result, 2)
    assert "Dask scheduler" in line
    assert time.monotonic() - began < 8


def test_a_silent_server_at_the_scheduler_address_times_out(tmp_path):
    pytest.importorskip("distributed")
    spec, out = spec_file(tmp_path), tmp_path / "r.jsonl"
    with socket.create_server(("127.0.0.1", 0)) as server:  # accepts, never speaks
        address = f"tcp://127.0.0.1:{server.getsockname()[1]}"
        began = time.monotonic()
        result = hostile.run("sweep", spec, "--out", out, "--scheduler", address, cwd=tmp_path)
    hostile.one_error(result, 2)
    assert time.monotonic() - began < 8


# ---------------------------------------------------------------------------------------------
# 8. Specs: nesting, unreadable files, seeds
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("depth", [100_000, 2_000])
def test_deeply_nested_toml_is_bad_data(tmp_path, depth):
    text = TINY + "[defaults]\nseed = " + "[" * depth + "]" * depth + "\n"
    spec, out = spec_file(tmp_path, text), tmp_path / "r.jsonl"
    with hostile.unchanged(out):
        result = hostile.run("sweep", spec, "--out", out, cwd=tmp_path)
    hostile.one_error(result, 65)


@pytest.mark.parametrize("key", ["kernel", "shape", "seed", "pad", "stride"])
def test_nested_grid_values_are_bad_data(tmp_path, key):
    # as deep as the TOML reader goes (deeper is refused while reading)
    nested = "[" + "[" * 300 + "]" * 300 + "]"
    text = TINY if key in ("kernel", "shape") else TINY + f"{key} = []\n"
    text = re.sub(rf"^{key} = .*$", f"{key} = {nested}", text, flags=re.M)
    spec, out = spec_file(tmp_path, text), tmp_path / "r.jsonl"
    with hostile.unchanged(out):
        result = hostile.run("sweep", spec, "--out", out, cwd=tmp_path)
    line = hostile.one_error(result, 65)
    assert f"'{key}'" in line
    if key in ("kernel", "shape", "seed"):  # the sweep's own keys (hyperparameters: hparams.py)
        assert len(line) < 400


def test_unreadable_spec_kinds_are_missing_input(tmp_path):
    folder = tmp_path / "folder.toml"
    folder.mkdir()
    fifo = tmp_path / "fifo.toml"
    os.mkfifo(fifo)
    for spec in (folder, fifo, tmp_path / "absent.toml"):
        result = hostile.run("sweep", spec, "--out", tmp_path / "r.jsonl", cwd=tmp_path, timeout=20)
        line = hostile.one_error(result, 66)
        assert "tensor file" not in line


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root reads any file")
def test_a_spec_without_read_permission_is_missing_input(tmp_path):
    spec = spec_file(tmp_path)
    spec.chmod(0)
    try:
        result = hostile.run("sweep", spec, "--out", tmp_path / "r.jsonl", cwd=tmp_path)
    finally:
        spec.chmod(0o600)
    hostile.one_error(result, 66)


@pytest.mark.parametrize(
    ("where", "label"),
    [
        ("[[configs]]\nshape = [1, 4, 4, 1]\nkernel = 1\ncout = 1\nseed = -1\n", "[[configs]]"),
        (
            "[defaults]\nseed = -1\n[[configs]]\nshape = [1, 4, 4, 1]\nkernel = 1\ncout = 1\n",
            "[defaults]",
        ),
        ("[grid]\nshape = [[1, 4, 4, 1]]\nkernel = [1]\ncout = [1]\nseed = [0, -1]\n", "[grid]"),
    ],
)
def test_a_negative_seed_is_bad_data(tmp_path, where, label):
    spec, out = spec_file(tmp_path, where), tmp_path / "r.jsonl"
    with hostile.unchanged(out):
        result = hostile.run("sweep", spec, "--out", out, cwd=tmp_path)
    line = hostile.one_error(result, 65)
    assert label in line
    assert "'seed'" in line


@pytest.mark.parametrize("key", ["seed", "cout"])
def test_integers_beyond_64_bits_in_a_spec_are_bad_data(tmp_path, key):
    text = "[[configs]]\nshape = [1, 4, 4, 1]\nkernel = 1\ncout = 1\n"
    text = text.replace("cout = 1", f"cout = 1\n{key} = {2**70}") if key == "seed" else text
    if key == "cout":
        text = text.replace("cout = 1", f"cout = {2**70}")
    spec, out = spec_file(tmp_path, text), tmp_path / "r.jsonl"
    with hostile.unchanged(out):
        result = hostile.run("sweep", spec, "--out", out, cwd=tmp_path)
    assert f"'{key}'" in hostile.one_error(result, 65)
