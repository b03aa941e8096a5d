"""Time this checkout's engine against the engine of another git revision, side by side.

    python benchmarks/compare_engines.py --baseline main~1 [--layers resnet depthwise ...]
                                         [--dtype float32 float64] [--rounds 5] [--threads N]

Loads ``convcli/engine.py`` as it was at ``--baseline`` (``git show``) into a module of its own,
next to today's engine (both use today's ``spec`` and ``operands``, so only engine.py may
differ between the two), and times forward and forward+backward of each layer for both,
interleaved call by call, so that a busy machine slows both alike. Reports the medians and
the ratio baseline / current (> 1: the current engine is faster), and checks that both give
the same results.

Runs with the machine's native BLAS kernels: ``OPENBLAS_CORETYPE`` and ``OPENBLAS_L2_SIZE``
(set in some environments to work around old OpenBLAS builds, halving GEMM speed) are removed
for this process only, by re-executing it, and the kernel threadpoolctl reports is printed.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from bench_engine import LAYERS, make_layer

ROOT = Path(__file__).resolve().parent.parent
FORCED_BLAS_VARIABLES = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
EXTRA_LAYERS = {
    # one image bigger than the cache target: row tiles, several waves in the backward pass
    "wide-depthwise-s2": ((1, 64, 1024, 32), (3, 3), 32, {"stride": 2, "padding": 1, "groups": 32}),
    "wide-stride2": ((2, 128, 128, 32), (3, 3), 32, {"stride": 2, "padding": 1}),
    "wide-reflect": ((2, 96, 96, 32), (3, 3), 32, {"padding": 1, "padding_mode": "reflect"}),
}


def native_blas() -> None:
    """Re-execute without the variables that force a generic OpenBLAS kernel."""
    if any(name in os.environ for name in FORCED_BLAS_VARIABLES):
        env = {k: v for k, v in os.environ.items() if k not in FORCED_BLAS_VARIABLES}
        os.execve(sys.executable, [sys.executable, *sys.argv], env)


def load_baseline(revision: str):
    source = subprocess.run(
        ["git", "-C", str(ROOT), "show", f"{revision}:convcli/engine.py"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    folder = Path(tempfile.mkdtemp(prefix="convcli-baseline-"))
    path = folder / "baseline_engine.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("baseline_engine", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def time_pair(functions, rounds: int, calls: int) -> list[float]:
    """Median seconds per function, calls interleaved: a, b, a, b, ..."""
    for function in functions:  # warm-up (thread pools, scratch buffers, page faults)
        function()
        function()
    times: list[list[float]] = [[] for _ in functions]
    for _ in range(rounds * calls):
        for slot, function in enumerate(functions):
            start = time.perf_counter()
            function()
            times[slot].append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def compare_layer(name, layer, dtype, engines, rounds: int, threads) -> dict:
    x, w, b, spec, _ = make_layer(layer, dtype)
    dz = None
    outcomes = []
    for engine in engines:
        z, cache = engine.conv_forward(x, w, b, spec, threads=threads)
        dz = np.random.default_rng(1).standard_normal(z.shape).astype(dtype) if dz is None else dz
        outcomes.append((z, *engine.conv_backward(dz, cache)))
    scale = 1e-4 if dtype == "float32" else 1e-10
    for got, want in zip(outcomes[1], outcomes[0], strict=True):
        np.testing.assert_allclose(got, want, rtol=scale, atol=scale)

    def forward(engine):
        return lambda: engine.conv_forward(x, w, b, spec, threads=threads)

    def both(engine):
        def run():
            _, cache = engine.conv_forward(x, w, b, spec, threads=threads)
            engine.conv_backward(dz, cache)

        return run

    fwd = time_pair([forward(e) for e in engines], rounds, 3)
    fb = time_pair([both(e) for e in engines], rounds, 3)
    return {
        "layer": name,
        "dtype": dtype,
        "forward_ms": [round(t * 1e3, 2) for t in fwd],
        "fwd_bwd_ms": [round(t * 1e3, 2) for t in fb],
        "forward_ratio": round(fwd[0] / fwd[1], 3),
        "fwd_bwd_ratio": round(fb[0] / fb[1], 3),
    }


def main(argv=None) -> list[dict]:
    layers = {**LAYERS, **EXTRA_LAYERS}
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--baseline", required=True, help="git revision of the old engine")
    parser.add_argument("--layers", nargs="+", default=list(layers), choices=list(layers))
    parser.add_argument("--dtype", nargs="+", default=["float32", "float64"])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    native_blas()

    from threadpoolctl import threadpool_info

    import convcli.engine.fast as current

    blas = [i for i in threadpool_info() if i.get("user_api") == "blas"]
    for info in blas:
        print(
            f"BLAS: {info.get('internal_api')} {info.get('version')}, kernel "
            f"{info.get('architecture')}, {info.get('num_threads')} threads "
            f"(OPENBLAS_CORETYPE/OPENBLAS_L2_SIZE cleared for this process)"
        )
    baseline = load_baseline(args.baseline)
    rows = []
    print(
        f"{'layer':20} {'dtype':8} {'fwd ms base/now':>18} {'ratio':>6} "
        f"{'fwd+bwd ms base/now':>22} {'ratio':>6}"
    )
    for dtype in args.dtype:
        for name in args.layers:
            row = compare_layer(
                name, layers[name], dtype, [baseline, current], args.rounds, args.threads
            )
            rows.append(row)
            print(
                f"{name:20} {dtype:8} {row['forward_ms'][0]:>8} / {row['forward_ms'][1]:<8} "
                f"{row['forward_ratio']:>6} {row['fwd_bwd_ms'][0]:>10} / "
                f"{row['fwd_bwd_ms'][1]:<10} {row['fwd_bwd_ratio']:>6}"
            )
    return rows


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
