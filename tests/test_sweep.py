"""convcli sweep: TOML specs, JSON Lines results, failures recorded, resume, jobs, Dask."""

import json
import signal
import subprocess
import sys
import time

import pytest
from typer.testing import CliRunner

from convcli.cli import app
from convcli.sweep import SpecError, SweepSummary, load_sweep, partial_path
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
    assert plan.configs[0].to_json() == {
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
    assert summary["counts"] == {"passed": 8, "failed": 0, "errored": 0}
    assert summary["passed"] is True
    records = lines(out)
    assert len(records) == 8
    first = records[0]
    assert first["status"] == "passed"
    assert first["gradcheck"]["passed"] is True
    assert first["gradcheck"]["mode"] == "exhaustive"
    assert set(first["backward"]) >= {"dx", "dw", "db", "seconds"}
    assert first["forward"]["z"]["shape"] == [2, 6, 6, 4]
    table = sweep(write(tmp_path, SMALL), "--out", out, "--force")
    assert "8 configurations: 8 run" in table.stdout


def test_an_errored_configuration_is_recorded_the_sweep_goes_on_and_exits_1(tmp_path):
    spec = write(tmp_path, SMALL + "groups = [1, 3]\n")
    result = sweep(spec, "--out", tmp_path / "r.jsonl", "--json")
    assert result.exit_code == 1
    summary = json.loads(result.stdout)
    assert summary["total"] == 16
    assert summary["passed"] is False
    assert summary["counts"] == {"passed": 8, "failed": 0, "errored": 8}
    errored = [r for r in lines(tmp_path / "r.jsonl") if r["status"] == "errored"]
    assert len(errored) == 8  # groups=3 divides neither Cin=4 nor Cin=2
    assert all("groups=3 must divide" in r["error"] for r in errored)
    table = sweep(spec, "--out", tmp_path / "r.jsonl", "--force")
    assert table.exit_code == 1
    assert "8 passed, 0 failed, 8 errored" in table.stdout


@pytest.mark.parametrize("jobs", ["1", "2"])
def test_any_configuration_that_did_not_pass_fails_the_sweep(tmp_path, jobs):
    one_bad = """
actions = ["forward"]
[grid]
shape = [[1, 5, 5, 4]]
kernel = [1, 3, 9]
cout = [4]
"""  # a 9x9 kernel does not fit in a 5x5 input
    out = tmp_path / "r.jsonl"
    result = sweep(write(tmp_path, one_bad), "--out", out, "--jobs", jobs, "--json")
    assert result.exit_code == 1
    summary = json.loads(result.stdout)
    assert summary["passed"] is False
    assert summary["counts"] == {"passed": 2, "failed": 0, "errored": 1}
    assert [r["status"] for r in summary["results"]] == ["passed", "passed", "errored"]


def test_sweep_summary_counts_every_kind_of_result():
    def record(key, status, error=None, gradcheck=None):
        return {
            "key": key,
            "config": {},
            "status": status,
            "error": error,
            "gradcheck": gradcheck,
            "seconds": 0.0,
        }

    summary = SweepSummary(
        spec="s.toml",
        out="r.jsonl",
        records=[
            record("a", "passed", gradcheck={"passed": True, "mode": "exhaustive"}),
            record("b", "failed", gradcheck={"passed": False, "mode": "sample+fast"}),
            record("c", "errored", error="worker failed: BrokenProcessPool: ..."),
            record("d", "passed"),
            {**record("e", "passed"), "actions": ["forward", "gradcheck"]},  # no verdict
        ],
        skipped=0,
        seconds=0.0,
        fingerprint="0" * 16,
    )
    data = summary.to_json()
    assert data["passed"] is False
    assert data["counts"] == {"passed": 2, "failed": 1, "errored": 2}
    assert [r["gradcheck_mode"] for r in data["results"]] == [
        "exhaustive",
        "sample+fast",
        None,
        None,
        None,
    ]
    only_passed = SweepSummary("s.toml", "r.jsonl", summary.records[::3], 0, 0.0, "0" * 16)
    assert only_passed.to_json()["passed"] is True


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
        (
            "[[configs]]\nshape = [1, 4]\nkernel = 3\ncout = 2\n",
            "line 2 ([[configs]] table 1, key 'shape'): shape must be",
        ),
        (
            "[[configs]]\nshape = [1, 4, 4, 1]\nkernel = [3, 3, 3]\ncout = 2\n",
            "line 3 ([[configs]] table 1, key 'kernel'): kernel",
        ),
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


RESHAPED = """
# the same runs as SMALL, written differently: comments, key order, explicit defaults,
# actions in another order, a kernel as a list, a default gradcheck option spelled out
actions = ["gradcheck", "forward", "backward"]

[grid]
pad = [0, "same"]
cout = [4]
kernel = [[1, 1], [3, 3]]
shape = [[2, 6, 6, 4], [1, 5, 7, 2]]
stride = [1]

[gradcheck]
probes = 8
mode = "exhaustive"

[defaults]
seed = 0
"""


def test_spec_fingerprint_ignores_formatting_but_not_content(tmp_path):
    small = load_sweep(write(tmp_path, SMALL))
    assert len(small.fingerprint) == 16
    assert load_sweep(write(tmp_path, RESHAPED, "other.toml")).fingerprint == small.fingerprint
    for changed in (
        SMALL.replace("cout = [4]", "cout = [5]"),
        SMALL.replace('mode = "exhaustive"', 'mode = "exhaustive"\nrtol = 1e-5'),
        SMALL.replace('"backward", ', ""),
        SMALL + "seed = [1]\n",
    ):
        assert load_sweep(write(tmp_path, changed, "c.toml")).fingerprint != small.fingerprint


def test_every_record_holds_its_spec_fingerprint(tmp_path):
    out = tmp_path / "r.jsonl"
    result = sweep(write(tmp_path, SMALL), "--out", out, "--json")
    fingerprint = json.loads(result.stdout)["spec_fingerprint"]
    assert fingerprint == load_sweep(tmp_path / "spec.toml").fingerprint
    assert {r["spec_fingerprint"] for r in lines(out)} == {fingerprint}


def test_resume_with_the_same_spec_written_differently(tmp_path):
    out = tmp_path / "r.jsonl"
    assert sweep(write(tmp_path, SMALL), "--out", out).exit_code == 0
    out.write_text("".join(out.read_text().splitlines(keepends=True)[:5]))
    result = sweep(write(tmp_path, RESHAPED, "other.toml"), "--out", out, "--resume", "--json")
    assert result.exit_code == 0, result.stderr
    assert (json.loads(result.stdout)["skipped"], json.loads(result.stdout)["ran"]) == (5, 3)


def test_resume_with_another_spec_is_refused_unless_append(tmp_path):
    out = tmp_path / "r.jsonl"
    first = load_sweep(write(tmp_path, SMALL))
    assert sweep(first.path, "--out", out).exit_code == 0
    before = out.read_bytes()
    other = write(tmp_path, SMALL.replace("cout = [4]", "cout = [4, 6]"), "other.toml")
    second = load_sweep(other)
    refused = sweep(other, "--out", out, "--resume")
    assert refused.exit_code == 65
    assert refused.stderr.count("\n") == 1
    assert first.fingerprint in refused.stderr
    assert second.fingerprint in refused.stderr
    assert "--append" in refused.stderr
    assert out.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir() if "convcli" in p.name] == []
    added = sweep(other, "--out", out, "--append", "--json")
    assert added.exit_code == 0, added.stderr
    summary = json.loads(added.stdout)
    assert (summary["total"], summary["skipped"], summary["ran"]) == (16, 8, 8)
    records = lines(out)
    assert len(records) == 16
    assert [r["spec_fingerprint"] for r in records] == [first.fingerprint] * 8 + [
        second.fingerprint
    ] * 8
    assert out.read_bytes().startswith(before)
    mixed = sweep(first.path, "--out", out, "--resume")  # the file now holds two specs' runs
    assert mixed.exit_code == 65
    assert second.fingerprint in mixed.stderr


def test_resume_of_results_without_fingerprints_is_refused(tmp_path):
    out = tmp_path / "r.jsonl"
    spec = write(tmp_path, SMALL)
    assert sweep(spec, "--out", out).exit_code == 0
    old = [{k: v for k, v in r.items() if k != "spec_fingerprint"} for r in lines(out)]
    out.write_text("".join(json.dumps(r) + "\n" for r in old[:3]))
    refused = sweep(spec, "--out", out, "--resume")
    assert refused.exit_code == 65
    assert "no spec fingerprint" in refused.stderr


def test_append_and_force_do_not_go_together(tmp_path):
    result = sweep(write(tmp_path, SMALL), "--out", tmp_path / "r.jsonl", "--append", "--force")
    assert result.exit_code == 2
    assert "--append" in result.stderr
    assert "--force" in result.stderr


def test_auto_mode_in_a_sweep_is_the_same_on_a_slow_machine(tmp_path, monkeypatch):
    import convcli.check.gradients as gc

    spec = write(tmp_path, SMALL.replace('mode = "exhaustive"', 'mode = "auto"'))
    fast = sweep(spec, "--out", tmp_path / "fast.jsonl")
    now = [0.0]

    def slow_clock() -> float:  # every reading 100 s after the last: a very slow machine
        now[0] += 100.0
        return now[0]

    monkeypatch.setattr(gc.time, "perf_counter", slow_clock)
    slow = sweep(spec, "--out", tmp_path / "slow.jsonl")
    assert fast.exit_code == slow.exit_code == 0

    def modes(path):
        return {r["key"]: (r["gradcheck"]["mode"], r["status"]) for r in lines(path)}

    assert modes(tmp_path / "slow.jsonl") == modes(tmp_path / "fast.jsonl")
    assert {mode for mode, _ in modes(tmp_path / "fast.jsonl").values()} == {"exhaustive"}


@pytest.mark.parametrize(
    ("written", "same_as"),
    [
        ("stride = [2, 2]", "stride = 2"),
        ("pad = [1, 1]", "pad = 1"),
        ("pad = [[1, 1], [1, 1]]", "pad = 1"),
        ("pad = [1, 1, 1, 1]", "pad = 1"),
        ("dilation = [1, 1]", ""),
        ('pad = "same_upper"', 'pad = "same"'),
        ('pad = "SAME_LOWER"', 'pad = "same_lower"'),
    ],
)
def test_per_axis_spellings_of_the_same_values_share_a_fingerprint(tmp_path, written, same_as):
    base = "[[configs]]\nshape = [1, 6, 6, 2]\nkernel = 3\ncout = 2\nstride = 2\npad = 1\n"
    if same_as.startswith('pad = "'):
        base = base.replace("pad = 1", same_as)
    spec = base.replace(same_as, written) if same_as else base + written + "\n"
    assert spec != base
    assert (
        load_sweep(write(tmp_path, spec, "a.toml")).fingerprint
        == load_sweep(write(tmp_path, base, "b.toml")).fingerprint
    )
    differs = base.split("pad = ")[0] + "pad = [1, 2]\n"
    assert load_sweep(write(tmp_path, differs, "c.toml")).fingerprint != (
        load_sweep(write(tmp_path, base, "b.toml")).fingerprint
    )


@pytest.mark.parametrize(
    ("spec", "where"),
    [
        (
            "[[configs]]\nshape = [1, 4, 4, 1]\nkernel = 3\ncout = 2\nstride = 1\n\n"
            "[[configs]]\nshape = [1, 4, 4, 1]\nkernel = 3\ncout = 2\nstride = 0\n",
            "line 11 ([[configs]] table 2, key 'stride')",
        ),
        (
            "[[configs]]\nshape = [1, 4, 4, 1]\nkernel = 3\ncout = 2\n\n"
            "[[configs]]\nshape = [1, 4, 4, 1]\nkernel = 3\ncout = 0\n",
            "line 9 ([[configs]] table 2, key 'cout')",
        ),
        (
            "[defaults]\nstride = 0\n\n[[configs]]\nshape = [1, 4, 4, 1]\nkernel = 3\ncout = 2\n",
            "line 2 ([defaults], key 'stride')",
        ),
        (
            "[[configs]]\nshape = [1, 4, 4, 1]\nkernel = 3\ncout = 2\n\n"
            "[[configs]]\nshape = [1, 4, 4, 1]\nkernel = 3\ncout = 2\ncolour = 1\n",
            "line 10 ([[configs]] table 2, key 'colour')",
        ),
    ],
)
def test_a_bad_value_is_reported_in_the_table_that_holds_it(tmp_path, spec, where):
    result = sweep(write(tmp_path, spec), "--out", tmp_path / "r.jsonl")
    assert result.exit_code == 65
    assert where in result.stderr, result.stderr


def test_library_errors_name_parameters_and_the_cli_names_flags(tmp_path):
    from convcli.cli.messages import explain
    from convcli.errors import UsageError
    from convcli.sweep import ResultsExistError, SweepOptions, run_sweep

    with pytest.raises(UsageError) as bad_jobs:
        SweepOptions(jobs=0)
    assert (bad_jobs.value.param, str(bad_jobs.value)) == ("jobs", "jobs 0: must be at least 1")
    assert explain(bad_jobs.value) == "--jobs 0: must be at least 1"
    with pytest.raises(UsageError, match=r"^resume continues a sweep and force starts it over"):
        SweepOptions(resume=True, force=True)
    out = tmp_path / "r.jsonl"
    out.write_text("keep\n")
    with pytest.raises(ResultsExistError) as exists:
        run_sweep(load_sweep(write(tmp_path, SMALL)), out)
    assert str(exists.value) == f"{out} exists"
    assert explain(exists.value).endswith(
        "; pass --resume to continue the sweep or --force to start over"
    )
    assert out.read_text() == "keep\n"
