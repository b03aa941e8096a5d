"""Time this checkout's engine against the engine of another git revision, side by side.

    python benchmarks/compare_engines.py --baseline main~1 [--layers resnet depthwise ...]
                                         [--dtype float32 float64] [--rounds 5] [--threads N]
                                         [--smoke]

Loads the engine as it was at ``--baseline`` (``git show``) into a temporary package of its
own, next to today's engine: the files of the ``convcli/engine/`` package, or, for a revision
from before the package existed, ``convcli/engine.py`` and ``convcli/operands.py``. Imports
between those files are pointed at the temporary package; everything else (``spec``,
``errors``) is today's. Times forward and forward+backward of each layer for both,
interleaved call by call, so that a busy machine slows both alike. Reports the medians and
the ratio baseline / current (> 1: the current engine is faster), checks that both give the
same results, and says whether they are the same bit for bit. ``--smoke`` runs tiny layers
once (the test suite does, so the script cannot rot).

Runs with the machine's native BLAS kernels: ``OPENBLAS_CORETYPE`` and ``OPENBLAS_L2_SIZE``
(set in some environments to work around old OpenBLAS builds, halving GEMM speed) are removed
for this process only, by re-executing it, and the kernel threadpoolctl reports is printed.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType

import numpy as np
from bench_engine import LAYERS, SMOKE_LAYERS, make_layer

ROOT = Path(__file__).resolve().parent.parent
FORCED_BLAS_VARIABLES = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
EXTRA_LAYERS = {
    # one image bigger than the cache target: row tiles, several waves in the backward pass
    "wide-depthwise-s2": ((1, 64, 1024, 32), (3, 3), 32, {"stride": 2, "padding": 1, "groups": 32}),
    "wide-stride2": ((2, 128, 128, 32), (3, 3), 32, {"stride": 2, "padding": 1}),
    "wide-reflect": ((2, 96, 96, 32), (3, 3), 32, {"padding": 1, "padding_mode": "reflect"}),
}
SMOKE_EXTRA_LAYERS = {
    # forced row tiles need a small workspace; tiny shapes still take the reflect gather path
    "reflect-s2": ((2, 9, 7, 3), (3, 3), 4, {"stride": 2, "padding": 1, "padding_mode": "reflect"}),
}
PACKAGE = "convcli/engine"
# before the package existed, the fast engine was convcli/engine.py and imported its
# operand checks from convcli/operands.py
MODULES_BEFORE_THE_PACKAGE = ("engine", "operands")


def native_blas() -> None:
    """Re-execute without the variables that force a generic OpenBLAS kernel."""
    if any(name in os.environ for name in FORCED_BLAS_VARIABLES):
        env = {k: v for k, v in os.environ.items() if k not in FORCED_BLAS_VARIABLES}
        os.execve(sys.executable, [sys.executable, *sys.argv], env)


def git(*args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(ROOT), *args], check=True, capture_output=True, text=True
    ).stdout


def baseline_files(revision: str) -> tuple[dict[str, str], dict[str, str]]:
    """The engine's sources at ``revision``, by module name inside the temporary package,
    and the map from the module names they import to those names."""
    if _is_dir(revision):
        listed = git("ls-tree", "--name-only", f"{revision}:{PACKAGE}/").split()
        files = [name for name in listed if name.endswith(".py")]
        sources = {name[:-3]: git("show", f"{revision}:{PACKAGE}/{name}") for name in files}
        renames = {"convcli.engine": ""} | {f"convcli.engine.{m}": m for m in sources}
        return sources, renames
    present = git("ls-tree", "--name-only", revision, "convcli/").split()
    sources = {
        module: git("show", f"{revision}:convcli/{module}.py")
        for module in MODULES_BEFORE_THE_PACKAGE
        if f"convcli/{module}.py" in present
    }
    if "engine" not in sources:
        raise SystemExit(f"no engine at {revision}: neither {PACKAGE}/ nor convcli/engine.py")
    sources["__init__"] = "from .engine import conv_backward, conv_forward\n"
    return sources, {f"convcli.{module}": module for module in sources if module != "__init__"}


def _is_dir(revision: str) -> bool:
    kind = subprocess.run(
        ["git", "-C", str(ROOT), "cat-file", "-t", f"{revision}:{PACKAGE}"],
        capture_output=True,
        text=True,
        check=False,
    )
    return kind.stdout.strip() == "tree"


def point_imports(source: str, renames: dict[str, str], package: str) -> str:
    """``source`` with ``from X import``/``import X`` of a renamed module X pointing into
    ``package`` (line numbers kept, so tracebacks still match ``git show``)."""
    names = "|".join(re.escape(name) for name in sorted(renames, key=len, reverse=True))
    pattern = re.compile(rf"^(\s*(?:from|import)\s+)({names})(?=[\s.]|$)", re.MULTILINE)

    def swap(match: re.Match[str]) -> str:
        inside = renames[match.group(2)]
        return match.group(1) + (f"{package}.{inside}" if inside else package)

    return pattern.sub(swap, source)


def load_baseline(revision: str) -> ModuleType:
    """The engine at ``revision`` as a package of its own, every module of it imported."""
    sources, renames = baseline_files(revision)
    commit = git("rev-parse", "--short", f"{revision}^{{commit}}").strip()
    package = f"convcli_baseline_{commit}"
    with tempfile.TemporaryDirectory(prefix="convcli-baseline-") as folder:
        root = Path(folder) / package
        root.mkdir()
        for module, source in sources.items():
            (root / f"{module}.py").write_text(point_imports(source, renames, package))
        sys.path.insert(0, folder)
        try:
            engine = importlib.import_module(package)
            for module in sources:
                if module != "__init__":
                    importlib.import_module(f"{package}.{module}")
        finally:
            sys.path.remove(folder)
    return engine


#: The clock of :func:`time_pair`: wall time, or with ``--cpu-time`` the calling thread's CPU
#: time (all work in one thread), which other processes' load on a shared machine barely moves.
CLOCK = {"now": time.perf_counter}


def time_pair(functions, rounds: int, calls: int) -> list[float]:
    """Median seconds per function, calls interleaved: a, b, a, b, ..."""
    clock = CLOCK["now"]
    for function in functions:  # warm-up (thread pools, scratch buffers, page faults)
        function()
        function()
    times: list[list[float]] = [[] for _ in functions]
    for _ in range(rounds * calls):
        for slot, function in enumerate(functions):
            start = clock()
            function()
            times[slot].append(clock() - start)
    return [statistics.median(t) for t in times]


def compare_layer(name, layer, dtype, engines, rounds: int, threads, workspace: int) -> dict:
    x, w, b, spec, _ = make_layer(layer, dtype)
    options = {"threads": threads, "workspace": workspace}
    dz = None
    outcomes = []
    for engine in engines:
        z, cache = engine.conv_forward(x, w, b, spec, **options)
        dz = np.random.default_rng(1).standard_normal(z.shape).astype(dtype) if dz is None else dz
        outcomes.append((z, *engine.conv_backward(dz, cache)))
    scale = 1e-4 if dtype == "float32" else 1e-10
    for got, want in zip(outcomes[1], outcomes[0], strict=True):
        # absolute error relative to the array's largest value: sums in another order
        # differ by a few float32 ulps of their largest terms, also on entries near zero
        np.testing.assert_allclose(
            got, want, rtol=scale, atol=scale * max(1.0, float(np.abs(want).max()))
        )
    identical = all(
        np.array_equal(got, want) for got, want in zip(outcomes[1], outcomes[0], strict=True)
    )

    def forward(engine):
        return lambda: engine.conv_forward(x, w, b, spec, **options)

    def both(engine):
        def run():
            _, cache = engine.conv_forward(x, w, b, spec, **options)
            engine.conv_backward(dz, cache)

        return run

    calls = 1 if rounds == 1 else 3
    fwd = time_pair([forward(e) for e in engines], rounds, calls)
    fb = time_pair([both(e) for e in engines], rounds, calls)
    return {
        "identical": identical,
        "layer": name,
        "dtype": dtype,
        "forward_ms": [round(t * 1e3, 2) for t in fwd],
        "fwd_bwd_ms": [round(t * 1e3, 2) for t in fb],
        "forward_ratio": round(fwd[0] / fwd[1], 3),
        "fwd_bwd_ratio": round(fb[0] / fb[1], 3),
    }


def _convolutions(layers: dict) -> dict:
    """The layers an engine from before transposed convolutions can run."""
    return {name: layer for name, layer in layers.items() if not layer[-1].get("transposed")}


def main(argv=None) -> list[dict]:
    full = _convolutions({**LAYERS, **EXTRA_LAYERS})
    smoke = _convolutions({**SMOKE_LAYERS, **SMOKE_EXTRA_LAYERS})
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--baseline", required=True, help="git revision of the old engine")
    parser.add_argument("--layers", nargs="+", choices=sorted({*full, *smoke}))
    parser.add_argument("--dtype", nargs="+", default=["float32", "float64"])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--workspace", type=int, default=None, help="scratch budget, bytes")
    parser.add_argument(
        "--smoke", action="store_true", help="tiny layers, one round, a small workspace"
    )
    parser.add_argument(
        "--cpu-time",
        action="store_true",
        help="one thread (engine and BLAS), timed by the thread's CPU time, not wall time",
    )
    args = parser.parse_args(argv)
    native_blas()

    from threadpoolctl import threadpool_info

    import convcli.engine as current

    if args.smoke:
        args.rounds = 1
        args.workspace = args.workspace or 4096  # row tiles and waves even on tiny layers
    workspace = args.workspace or current.DEFAULT_WORKSPACE
    table = smoke if args.smoke else full  # a name in both: the table's sizes
    layers = {
        name: table.get(name, full.get(name, smoke.get(name))) for name in args.layers or table
    }

    blas = [i for i in threadpool_info() if i.get("user_api") == "blas"]
    for info in blas:
        print(
            f"BLAS: {info.get('internal_api')} {info.get('version')}, kernel "
            f"{info.get('architecture')}, {info.get('num_threads')} threads "
            f"(OPENBLAS_CORETYPE/OPENBLAS_L2_SIZE cleared for this process)"
        )
    baseline = load_baseline(args.baseline)
    limits = contextlib.nullcontext()
    if args.cpu_time:
        from threadpoolctl import threadpool_limits

        args.threads, CLOCK["now"] = 1, time.thread_time
        limits = threadpool_limits(limits=1, user_api="blas")
        print("one thread, timed by CPU time (time.thread_time)")
    with limits:
        return compare_all(args, layers, baseline, current, workspace)


def compare_all(args, layers: dict, baseline, current, workspace: int) -> list[dict]:
    """Every layer and dtype, both engines, one printed row each."""
    rows = []
    print(
        f"{'layer':20} {'dtype':8} {'fwd ms base/now':>18} {'ratio':>6} "
        f"{'fwd+bwd ms base/now':>22} {'ratio':>6} same bits"
    )
    for dtype in args.dtype:
        for name, layer in layers.items():
            row = compare_layer(
                name, layer, dtype, [baseline, current], args.rounds, args.threads, workspace
            )
            rows.append(row)
            print(
                f"{name:20} {dtype:8} {row['forward_ms'][0]:>8} / {row['forward_ms'][1]:<8} "
                f"{row['forward_ratio']:>6} {row['fwd_bwd_ms'][0]:>10} / "
                f"{row['fwd_bwd_ms'][1]:<10} {row['fwd_bwd_ratio']:>6} "
                f"{'yes' if row['identical'] else 'no'}"
            )
    return rows


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
