"""The benchmark scripts run (tiny sizes) and write their JSON, so they cannot rot."""

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT


def run_script(name, *args, env=None):
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / name), *map(str, args)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
        env=env,
    )
    assert done.returncode == 0, done.stderr
    return done


def test_engine_benchmark_smoke(tmp_path):
    out = tmp_path / "engine.json"
    run_script("bench_engine.py", "--smoke", "--keep-blas-env", "--no-torch", "--out", out)
    results = json.loads(out.read_text())
    assert results["machine"]["blas_environment"]["kept"]
    assert results["machine"]["blas_environment"]["cleared"] == []
    assert set(results["gemm_gflops"]) == {"float32", "float64"}
    layers = {(row["layer"], row["dtype"]) for row in results["layers"]}
    assert ("classic", "float64") in layers
    row = results["layers"][0]
    for key in ("forward_gflops", "backward_vs_gemm", "fwd_bwd_s", "forward_peak_mib"):
        assert row[key] > 0
    assert results["reference"]["forward_speedup"] > 1
    # the layer's GEMMs alone, at its im2col shapes: what an im2col + BLAS engine cannot beat
    for row in results["layers"]:
        if row["layer"] == "depthwise":  # no GEMM worth the name: K = 9, N = 1 per group
            assert "gemms_forward_s" not in row
        else:
            assert 0 < row["gemms_forward_s"] < row["gemms_fwd_bwd_s"], row["layer"]
            forward, dx = row["gemm_shapes"]["forward"], row["gemm_shapes"]["dx"]
            assert forward == [dx[0], dx[2], dx[1]]  # (P, K, N) and (P, N, K)


def test_memory_benchmark_smoke(tmp_path):
    out = tmp_path / "memory.json"
    run_script("bench_memory.py", "--smoke", "--out", out)
    results = json.loads(out.read_text())
    assert results["in_memory"]["within_bound"]
    assert results["streamed"]["within_bound"]


@pytest.mark.slow
def test_gradcheck_benchmark_smoke(tmp_path):
    out = tmp_path / "gradcheck.json"
    run_script("bench_gradcheck.py", "--smoke", "--out", out)
    cases = json.loads(out.read_text())["cases"]
    assert all(case["passed"] for case in cases)
    assert cases[0]["forward_passes"] == 290


def _have_revision(revision: str) -> bool:
    found = subprocess.run(
        ["git", "-C", str(ROOT), "cat-file", "-e", f"{revision}^{{commit}}"],
        capture_output=True,
        check=False,
    )
    return found.returncode == 0


# the last revision with convcli/engine.py (before the engine/ package), and this checkout
@pytest.mark.parametrize("baseline", ["c5985f6", "HEAD"])
def test_compare_engines_smoke(baseline):
    """The baseline engine loads from a single engine.py and from the engine/ package."""
    if not _have_revision(baseline):
        pytest.skip(f"not a git checkout with revision {baseline}")
    done = run_script("compare_engines.py", "--baseline", baseline, "--smoke", "--dtype", "float64")
    lines = done.stdout.splitlines()
    header = next(k for k, line in enumerate(lines) if line.startswith("layer"))
    rows = [line.split() for line in lines[header + 1 :]]
    assert [row[0] for row in rows] == [
        "cifar",
        "depthwise",
        "conv1d",
        "conv3d",
        "classic",
        "reflect-s2",
    ]
    assert {row[-1] for row in rows} <= {"yes", "no"}  # same bits or not, both engines ran


def test_engine_benchmark_full_path_on_one_small_layer(tmp_path):
    """The non-smoke code path (warm-up, rounds) on the classic layer only; the script
    re-executes itself once without the variables that pin OpenBLAS's kernels."""
    out = tmp_path / "one.json"
    env = {**os.environ, "OPENBLAS_CORETYPE": "Haswell", "OPENBLAS_L2_SIZE": "1048576"}
    env.pop("CONVCLI_BENCH_CLEARED_BLAS_ENV", None)
    done = run_script(
        "bench_engine.py",
        "--no-torch",
        "--layers",
        "classic",
        "--dtype",
        "float64",
        "--repeats",
        "1",
        "--rounds",
        "2",
        "--out",
        out,
        env=env,
    )
    results = json.loads(out.read_text())
    assert results["rounds"] == 2
    assert [row["layer"] for row in results["layers"]] == ["classic"]
    environment = results["machine"]["blas_environment"]
    assert environment["cleared"] == ["OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE"]
    assert environment["native"]
    assert "re-executed without OPENBLAS_CORETYPE, OPENBLAS_L2_SIZE" in done.stdout
    table = run_script("bench_engine.py", "--table-from", out).stdout.splitlines()
    assert table[0].startswith("| layer | dtype | fwd ms")
    assert table[2].startswith("| classic | float64 |")
    heads = [k for k, line in enumerate(table) if line.startswith("| layer | dtype | GEMMs fwd")]
    assert len(heads) == 1, "a second table: the layers' GEMMs alone"
    gemms = heads[0]
    assert table[gemms + 2].startswith("| classic | float64 |")


def test_engine_benchmark_against_torch(tmp_path):
    """With PyTorch importable, the same run times it and reports the ratios."""
    pytest.importorskip("torch")
    out = tmp_path / "torch.json"
    run_script(
        "bench_engine.py",
        "--smoke",
        "--keep-blas-env",
        "--layers",
        "cifar",
        "conv1d",
        "decoder",
        "--out",
        out,
    )
    rows = json.loads(out.read_text())["layers"]
    for row in rows:
        assert row["forward_vs_torch"] > 0
        assert row["fwd_bwd_vs_torch"] > 0
        assert row["gemms_forward_vs_torch"] > 0
        assert row["gemms_fwd_bwd_vs_torch"] > 0
    assert {row["torch_forward_format"] for row in rows} <= {"nchw", "cl"}
