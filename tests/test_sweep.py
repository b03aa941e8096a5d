"""convcli sweep: TOML specs, JSON Lines results, failures recorded, resume, jobs, Dask."""

import json
import signal
import subprocess
import sys
import time

import pytest
from typer.testing import CliRunner

from convcli.cli import app
from convcli.sweep import SpecError, load_sweep
from tests.conftest import ROOT

runner = CliRunner()
SAMPLE_SPEC = ROOT / "sample_data" / "sweep.toml"

SMALL = """
actions = ["forward", "backward", "gradcheck"]
[gradcheck]
mode = "exhaustive"
[grid]
shape = [[2, 6, 6, 4], [1, 5, 7, 2]]
kernel = [1, 3]
cout = [4]
pad = [0, "same"]
"""


def write(tmp_path, text, name="spec.toml"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def sweep(*args):
    return runner.invoke(app, ["sweep", *map(str, args)])


def lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_sample_spec_lists_configs_and_grid():
    plan = load_sweep(SAMPLE_SPEC)
    assert len(plan.configs) == 1 + 2 * 2 * 2 * 3
    assert plan.actions == ("forward", "backward", "gradcheck")
    keys = [plan.key(c) for c in plan.configs]
    assert len(set(keys)) == len(keys)
    assert keys == [load_sweep(SAMPLE_SPEC).key(c) for c in load_sweep(SAMPLE_SPEC).configs]
    assert plan.configs[0] == {
        "shape": [10, 4, 4, 3],
        "kernel": [2, 2],
        "cout": 8,
        "stride": 2,
        "pad": 2,
        "dilation": 1,
        "groups": 1,
        "padding_mode": "zeros",
        "layout": "nhwc",
        "dtype": "float64",
        "seed": 0,
    }


def test_sweep_writes_one_line_per_configuration(tmp_path):
    out = tmp_path / "r.jsonl"
    result = sweep(write(tmp_path, SMALL), "--out", out, "--json")
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["total"] == summary["ran"] == 8
    assert summary["failed"] == summary["gradcheck_failed"] == 0
    records = lines(out)
    assert len(records) == 8
    first = records[0]
    assert first["status"] == "ok"
    assert first["gradcheck"]["passed"] is True
    assert first["gradcheck"]["mode"] == "exhaustive"
    assert set(first["backward"]) >= {"dx", "dw", "db", "seconds"}
    assert first["forward"]["z"]["shape"] == [2, 6, 6, 4]
    table = sweep(write(tmp_path, SMALL), "--out", out, "--force")
    assert "8 configurations: 8 run" in table.stdout


def test_a_failing_configuration_is_recorded_and_the_sweep_goes_on(tmp_path):
    spec = write(tmp_path, SMALL + "groups = [1, 3]\n")
    result = sweep(spec, "--out", tmp_path / "r.jsonl", "--json")
    assert result.exit_code == 0
    summary = json.loads(result.stdout)
    assert summary["total"] == 16
    assert summary["failed"] == 8  # groups=3 divides neither Cin=4 nor Cin=2
    failed = [r for r in lines(tmp_path / "r.jsonl") if r["status"] == "failed"]
    assert all("groups=3 must divide" in r["error"] for r in failed)


def test_a_failed_gradient_check_exits_1(tmp_path):
    spec = write(
        tmp_path,
        SMALL.replace('mode = "exhaustive"', 'mode = "exhaustive"\nrtol = 0.0\natol = 0.0'),
    )
    result = sweep(spec, "--out", tmp_path / "r.jsonl")
    assert result.exit_code == 1
    assert "gradient checks failed" in result.stdout


def test_existing_results_need_resume_or_force(tmp_path):
    out = tmp_path / "r.jsonl"
    out.write_text("keep\n")
    result = sweep(write(tmp_path, SMALL), "--out", out)
    assert result.exit_code == 73
    assert "--resume" in result.stderr
    assert out.read_text() == "keep\n"


def test_resume_after_a_torn_line_completes_without_duplicates(tmp_path):
    spec, out = write(tmp_path, SMALL), tmp_path / "r.jsonl"
    assert sweep(spec, "--out", out).exit_code == 0
    text = out.read_text()
    keep = text.splitlines(keepends=True)[:3]
    out.write_text("".join(keep) + keep[0][: len(keep[0]) // 2])  # killed while writing line 4
    result = sweep(spec, "--out", out, "--resume", "--json")
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert (summary["skipped"], summary["ran"]) == (3, 5)
    records = lines(out)
    assert len(records) == 8
    assert len({r["key"] for r in records}) == 8


def test_parallel_jobs_give_the_same_results(tmp_path):
    spec = write(tmp_path, SMALL)
    assert sweep(spec, "--out", tmp_path / "one.jsonl").exit_code == 0
    assert sweep(spec, "--out", tmp_path / "two.jsonl", "--jobs", "2").exit_code == 0

    def by_key(path):
        return {
            r["key"]: (r["forward"]["z"]["mean"], r["gradcheck"]["passed"]) for r in lines(path)
        }

    one, two = by_key(tmp_path / "one.jsonl"), by_key(tmp_path / "two.jsonl")
    assert one.keys() == two.keys()
    for key, (mean, passed) in one.items():
        assert two[key][0] == pytest.approx(mean, rel=1e-12)
        assert two[key][1] == passed


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ('actions = ["forward"\n', "spec.toml"),
        (
            "colour = 1\n[grid]\nshape=[[1,4,4,1]]\nkernel=[1]\ncout=[1]\n",
            "line 1: unknown key 'colour'",
        ),
        ('[grid]\nshape=[[1,4,4,1]]\nkernel=[1]\ncout=[1]\nstride=["two"]\n', "line 5"),
        ("[[configs]]\nkernel = 3\ncout = 2\n", "has no 'shape'"),
        ("[[configs]]\nshape = [1, 4]\nkernel = 3\ncout = 2\n", "line 2: shape must be"),
        ("[[configs]]\nshape = [1, 4, 4, 1]\nkernel = [3, 3, 3]\ncout = 2\n", "line 3: kernel"),
        ('[[configs]]\nshape = [1, 4, 1]\nkernel = 3\ncout = 2\nlayout = "nwc"\n', "line 5"),
        (
            'actions = ["train"]\n[[configs]]\nshape=[1,4,4,1]\nkernel=1\ncout=1\n',
            "line 1: actions",
        ),
        (
            '[gradcheck]\nmode = "psychic"\n[[configs]]\nshape=[1,4,4,1]\nkernel=1\ncout=1\n',
            "line 2",
        ),
        ("", "no configurations"),
    ],
)
def test_bad_specs_exit_65_naming_the_line(tmp_path, text, match):
    spec = write(tmp_path, text)
    result = sweep(spec, "--out", tmp_path / "r.jsonl")
    assert result.exit_code == 65, result.stderr
    assert match in result.stderr
    assert result.stderr.count("\n") == 1
    assert not (tmp_path / "r.jsonl").exists()
    with pytest.raises(SpecError):
        load_sweep(spec)


def test_interrupted_sweep_keeps_finished_results_and_resumes(tmp_path):
    many = SMALL.replace('pad = [0, "same"]', 'pad = [0, 1, 2, "same"]\nseed = [0, 1, 2, 3, 4, 5]')
    spec, out = write(tmp_path, many), tmp_path / "r.jsonl"
    process = subprocess.Popen(
        [sys.executable, "-m", "convcli", "sweep", str(spec), "--out", str(out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    from convcli.sweep import partial_path

    partial = partial_path(out)  # results go there until the sweep ends or is interrupted
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and (
        not partial.exists() or partial.read_text().count("\n") < 3
    ):
        time.sleep(0.02)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    if process.returncode == 0:
        pytest.skip("the sweep finished before the signal arrived")
    assert process.returncode == 130
    assert stderr.strip() == "convcli: error: interrupted"
    assert not partial.exists()  # renamed over the results file on Ctrl-C
    finished = lines(out)  # every line on disk is a complete record
    assert 3 <= len(finished) < 96
    result = sweep(spec, "--out", out, "--resume", "--json")
    assert json.loads(result.stdout)["skipped"] == len(finished)
    records = lines(out)
    assert len(records) == 96
    assert len({r["key"] for r in records}) == 96


def test_sweep_on_a_dask_cluster(tmp_path):
    distributed = pytest.importorskip("distributed")
    with distributed.LocalCluster(
        n_workers=1,
        threads_per_worker=1,
        processes=False,
        protocol="tcp",
        host="127.0.0.1",
        dashboard_address=None,
    ) as cluster:
        spec, out = write(tmp_path, SMALL), tmp_path / "r.jsonl"
        result = sweep(spec, "--out", out, "--scheduler", cluster.scheduler_address, "--json")
        assert result.exit_code == 0, result.stderr
        assert json.loads(result.stdout)["ran"] == 8
        out.write_text("".join(out.read_text().splitlines(keepends=True)[:5]))
        again = sweep(
            spec, "--out", out, "--resume", "--scheduler", cluster.scheduler_address, "--json"
        )
        assert json.loads(again.stdout)["skipped"] == 5
    assert len({r["key"] for r in lines(out)}) == 8


def test_a_killed_sweep_leaves_the_old_results_and_a_partial_file_to_resume(tmp_path):
    from convcli.sweep import partial_path

    spec, out = write(tmp_path, SMALL), tmp_path / "r.jsonl"
    assert sweep(spec, "--out", out).exit_code == 0
    complete = out.read_text()
    # what a SIGKILL during a --force rerun leaves: the old file, and 3 lines + a torn one
    partial = partial_path(out)
    rows = complete.splitlines(keepends=True)
    partial.write_text("".join(rows[:3]) + rows[3][:20])
    refused = sweep(spec, "--out", out)
    assert refused.exit_code == 73
    assert "interrupted sweep" in refused.stderr
    result = sweep(spec, "--out", out, "--resume", "--json")
    assert json.loads(result.stdout)["skipped"] == 3
    assert not partial.exists()
    records = lines(out)
    assert len(records) == 8
    assert len({r["key"] for r in records}) == 8
    assert [p.name for p in tmp_path.iterdir() if "convcli" in p.name] == []


@pytest.mark.parametrize(
    ("extra", "match"),
    [("eps = 0.0", "eps must be > 0"), ("rtol = -1.0", "rtol must be >= 0")],
)
def test_bad_gradcheck_tolerances_in_a_spec(tmp_path, extra, match):
    spec = write(tmp_path, SMALL.replace('mode = "exhaustive"', f'mode = "exhaustive"\n{extra}'))
    result = sweep(spec, "--out", tmp_path / "r.jsonl")
    assert result.exit_code == 65
    assert match in result.stderr


def test_resume_and_force_do_not_go_together(tmp_path):
    result = sweep(write(tmp_path, SMALL), "--out", tmp_path / "r.jsonl", "--resume", "--force")
    assert result.exit_code == 2
    assert "give one" in result.stderr


def test_unreachable_scheduler_is_a_usage_error(tmp_path):
    pytest.importorskip("distributed")
    result = sweep(
        write(tmp_path, SMALL), "--out", tmp_path / "r.jsonl", "--scheduler", "tcp://127.0.0.1:9"
    )
    assert result.exit_code == 2
    assert "cannot reach a Dask scheduler" in result.stderr
