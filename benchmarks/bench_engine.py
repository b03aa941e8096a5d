"""Benchmark the conv engine against this machine's GEMM throughput.

    python benchmarks/bench_engine.py [--repeats 5] [--dtype float32 float64] [--threads N]
                                      [--layers cifar resnet ...] [--out FILE] [--smoke]

In one run, on one machine and thread count, it measures
- NumPy matrix-multiply throughput (2048 x 2048 operands) per dtype: the practical ceiling
  of an im2col + GEMM engine;
- convcli's forward, backward (dx + dw + db) and forward + backward on the layers below
  (NHWC, 3x3 unless stated): GFLOP/s (forward 2·n·Ho·Wo·Cout·kh·kw·Cin/groups, backward
  twice that), the ratio to GEMM of the same dtype, the median of the repeats, and the peak
  memory NumPy allocated during one call (tracemalloc);
- the reference engine on a small layer, for the speed-up.
Results go to a JSON file and a Rich table. ``--smoke`` runs tiny sizes once (the test suite
does, so the script cannot rot).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

from convcli import ConvSpec, conv_backward, conv_forward
from convcli.engine.reference import conv_backward_reference, conv_forward_reference

# name: (x shape (n, *spatial, Cin), kernel, Cout, ConvSpec kwargs)
LAYERS = {
    "cifar": ((32, 32, 32, 16), (3, 3), 32, {"padding": 1}),
    "resnet": ((8, 56, 56, 64), (3, 3), 64, {"padding": 1}),
    "stride2": ((16, 64, 64, 32), (3, 3), 64, {"stride": 2, "padding": 1}),
    "depthwise": ((16, 56, 56, 64), (3, 3), 64, {"padding": 1, "groups": 64}),
    "dilated": ((8, 64, 64, 32), (3, 3), 32, {"dilation": 2, "padding": 2}),
    "pointwise": ((16, 28, 28, 128), (1, 1), 256, {}),
    "conv1d": ((32, 1024, 64), (3,), 64, {"padding": 1}),
    "conv3d": ((4, 16, 32, 32, 16), (3, 3, 3), 32, {"padding": 1}),
    "classic": ((10, 4, 4, 3), (2, 2), 8, {"stride": 2, "padding": 2}),
    # a 2x upsampling decoder layer (ConvTranspose2d(64, 32, 3, 2, 1, output_padding=1))
    "decoder": (
        (8, 32, 32, 64),
        (3, 3),
        32,
        {"stride": 2, "padding": 1, "output_padding": 1, "transposed": True},
    ),
}
SMOKE_LAYERS = {
    "cifar": ((2, 8, 8, 4), (3, 3), 4, {"padding": 1}),
    "depthwise": ((2, 8, 8, 4), (3, 3), 4, {"padding": 1, "groups": 4}),
    "conv1d": ((2, 16, 4), (3,), 4, {"padding": 1}),
    "conv3d": ((1, 4, 5, 6, 2), (3, 3, 3), 3, {"padding": 1}),
    "classic": LAYERS["classic"],
    "decoder": ((2, 4, 4, 4), (3, 3), 4, LAYERS["decoder"][-1]),
}
REFERENCE_LAYER = ((2, 8, 8, 4), (3, 3), 8, {"padding": 1})
WARM_UP_SECONDS = 0.3


def median_seconds(function, repeats: int) -> float:
    """Median wall time of ``repeats`` calls, after calling it for WARM_UP_SECONDS.

    The first calls after other work run slower here (allocator and page state, thread
    pools, clocks); a time-based warm-up makes the medians repeatable.
    """
    start = time.perf_counter()
    function()
    while time.perf_counter() - start < WARM_UP_SECONDS:
        function()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def peak_bytes(function) -> int:
    tracemalloc.start()
    try:
        function()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def gemm_gflops(dtype, size: int, repeats: int) -> float:
    rng = np.random.default_rng(0)
    a = rng.standard_normal((size, size)).astype(dtype)
    b = rng.standard_normal((size, size)).astype(dtype)
    out = np.empty((size, size), dtype=dtype)
    seconds = median_seconds(lambda: np.matmul(a, b, out=out), repeats)
    return 2 * size**3 / seconds / 1e9


def make_layer(layer, dtype):
    x_shape, kernel, cout, hparams = layer
    spec = ConvSpec(**hparams)
    rng = np.random.default_rng(0)
    n, cin = x_shape[0], x_shape[-1]
    x = rng.standard_normal(x_shape).astype(dtype)
    wt = rng.standard_normal(spec.weight_shape(kernel, cin, cout)).astype(dtype)
    b = rng.standard_normal(cout).astype(dtype)
    geometry = spec.geometry(x.shape, wt.shape)
    taps = int(np.prod(kernel))
    # a transposed layer's products: every input pixel times every tap and output channel
    pixels = geometry.in_sizes if spec.transposed else geometry.out_sizes
    flops = 2 * n * int(np.prod(pixels)) * taps * cout * cin // spec.groups
    return x, wt, b, spec, flops


def bench_layer(name, layer, dtype, repeats, gemm, rounds) -> dict:
    """Times of one layer: for each operation, the median of its per-round medians."""
    x, w, b, spec, flops = make_layer(layer, dtype)
    z, cache = conv_forward(x, w, b, spec)
    dz = np.random.default_rng(1).standard_normal(z.shape).astype(dtype)
    operations = {
        "forward": lambda: conv_forward(x, w, b, spec),
        "backward": lambda: conv_backward(dz, cache),
        "fwd_bwd": lambda: conv_backward(dz, conv_forward(x, w, b, spec)[1]),
    }
    if not spec.transposed and (spec.groups > 1 or set(w.shape[:-2]) == {1}):
        operations["per_group_gemm_forward"] = per_group_gemm(x, w, b, spec)
    return {
        "name": name,
        "dtype": np.dtype(dtype),
        "x": x,
        "w": w,
        "hparams": layer[-1],
        "cout": layer[2],
        "flops": flops,
        "gemm": gemm,
        "operations": operations,
        "rounds": [],
        "peaks": (
            peak_bytes(operations["forward"]) / 2**20,
            peak_bytes(operations["backward"]) / 2**20,
        ),
    }


def measure_round(case: dict, repeats: int) -> None:
    case["rounds"].append(
        {op: median_seconds(function, repeats) for op, function in case["operations"].items()}
    )


def layer_row(case: dict) -> dict:
    seconds = {op: statistics.median(r[op] for r in case["rounds"]) for op in case["operations"]}
    flops, gemm, w = case["flops"], case["gemm"], case["w"]
    row = {
        "layer": case["name"],
        "dtype": case["dtype"].name,
        "shape": list(case["x"].shape),
        "kernel": list(w.shape[:-2]),
        "cout": case["cout"],
        "hparams": case["hparams"],
        "forward_s": seconds["forward"],
        "backward_s": seconds["backward"],
        "fwd_bwd_s": seconds["fwd_bwd"],
        "forward_gflops": flops / seconds["forward"] / 1e9,
        "backward_gflops": 2 * flops / seconds["backward"] / 1e9,
        "fwd_bwd_gflops": 3 * flops / seconds["fwd_bwd"] / 1e9,
        "forward_peak_mib": case["peaks"][0],
        "backward_peak_mib": case["peaks"][1],
    }
    for key in ("forward", "backward", "fwd_bwd"):
        row[f"{key}_vs_gemm"] = row[f"{key}_gflops"] / gemm
    if "per_group_gemm_forward" in seconds:
        row["per_group_gemm_forward_s"] = seconds["per_group_gemm_forward"]
        row["speedup_vs_per_group_gemm"] = seconds["per_group_gemm_forward"] / seconds["forward"]
    return row


def per_group_gemm(x, w, b, spec: ConvSpec):
    """The plain alternative: one im2col + GEMM per group (a bare GEMM for 1x1, stride 1)."""
    if spec.groups == 1:
        x2, w2 = x.reshape(-1, x.shape[-1]), w.reshape(-1, w.shape[-1])
        return lambda: x2 @ w2 + b
    cin_g, cout_g = x.shape[-1] // spec.groups, w.shape[-1] // spec.groups
    single = ConvSpec(stride=spec.stride, padding=spec.padding, dilation=spec.dilation)
    parts = [
        (
            np.ascontiguousarray(x[..., k * cin_g : (k + 1) * cin_g]),
            w[..., k * cout_g : (k + 1) * cout_g],
        )
        for k in range(spec.groups)
    ]
    biases = b.reshape(spec.groups, cout_g)
    return lambda: [
        conv_forward(xg, wg, bg, single)[0] for (xg, wg), bg in zip(parts, biases, strict=True)
    ]


def bench_reference(repeats: int) -> dict:
    x, w, b, spec, _ = make_layer(REFERENCE_LAYER, np.float64)
    z, cache = conv_forward(x, w, b, spec)
    _, ref_cache = conv_forward_reference(x, w, b, spec)
    reference = median_seconds(lambda: conv_forward_reference(x, w, b, spec), max(1, repeats // 2))
    fast = median_seconds(lambda: conv_forward(x, w, b, spec), repeats)
    reference_bwd = median_seconds(
        lambda: conv_backward_reference(z, ref_cache), max(1, repeats // 2)
    )
    fast_bwd = median_seconds(lambda: conv_backward(z, cache), repeats)
    return {
        "layer": "reference " + "x".join(map(str, x.shape)) + f"->{w.shape[-1]}",
        "reference_forward_s": reference,
        "fast_forward_s": fast,
        "forward_speedup": reference / fast,
        "reference_backward_s": reference_bwd,
        "fast_backward_s": fast_bwd,
        "backward_speedup": reference_bwd / fast_bwd,
    }


def blas_info() -> dict:
    try:
        from threadpoolctl import threadpool_info

        return {
            "blas": [
                {k: pool.get(k) for k in ("internal_api", "version", "num_threads", "architecture")}
                for pool in threadpool_info()
                if pool.get("user_api") == "blas"
            ]
        }
    except ImportError:
        return {"blas": "threadpoolctl not installed"}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per round")
    parser.add_argument("--rounds", type=int, default=3, help="passes over all layers")
    parser.add_argument("--dtype", nargs="+", default=["float32", "float64"])
    parser.add_argument("--layers", nargs="+", default=None, help=f"any of {', '.join(LAYERS)}")
    parser.add_argument(
        "--threads", type=int, default=None, help="pin BLAS threads (threadpoolctl)"
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/engine.json"))
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, one repeat")
    args = parser.parse_args(argv)
    layers = SMOKE_LAYERS if args.smoke else LAYERS
    if args.layers:
        layers = {name: layers[name] for name in args.layers}
    repeats = 1 if args.smoke else args.repeats
    args.rounds = 1 if args.smoke else args.rounds
    global WARM_UP_SECONDS
    WARM_UP_SECONDS = 0.0 if args.smoke else WARM_UP_SECONDS
    gemm_size = 256 if args.smoke else 2048

    limiter = None
    if args.threads is not None:
        from threadpoolctl import threadpool_limits

        limiter = threadpool_limits(limits=args.threads, user_api="blas")
    try:
        gemm = {dtype: gemm_gflops(dtype, gemm_size, repeats) for dtype in args.dtype}
        cases = [
            bench_layer(name, shape, dtype, repeats, gemm[dtype], args.rounds)
            for dtype in args.dtype
            for name, shape in layers.items()
        ]
        for _ in range(args.rounds):  # rounds interleave the layers, spreading slow spells
            for case in cases:
                measure_round(case, repeats)
        rows = [layer_row(case) for case in cases]
        reference = bench_reference(repeats)
        info = blas_info()
    finally:
        if limiter is not None:
            limiter.restore_original_limits()
    results = {
        "machine": {
            "python": sys.version.split()[0],
            "numpy": np.__version__,
            "platform": platform.platform(),
            "threads": args.threads,
            **info,
        },
        "repeats": repeats,
        "rounds": args.rounds,
        "gemm_size": gemm_size,
        "gemm_gflops": gemm,
        "layers": rows,
        "reference": reference,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print_table(results)
    print(f"wrote {args.out}")
    return results


def print_table(results: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    gemm = ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in results["gemm_gflops"].items())
    runs = f"{results['rounds']} rounds x {results['repeats']}"
    title = f"convcli engine, {runs} · GEMM {results['gemm_size']}²: {gemm}"
    table = Table(title=title)
    for column in (
        "layer",
        "dtype",
        "fwd ms",
        "fwd GF/s",
        "xGEMM",
        "bwd ms",
        "bwd GF/s",
        "xGEMM",
        "f+b ms",
        "xGEMM",
        "peak MiB f/b",
    ):
        table.add_column(column, justify="left" if column in ("layer", "dtype") else "right")
    for r in results["layers"]:
        table.add_row(
            r["layer"],
            r["dtype"],
            f"{r['forward_s'] * 1e3:.2f}",
            f"{r['forward_gflops']:.1f}",
            f"{r['forward_vs_gemm']:.2f}",
            f"{r['backward_s'] * 1e3:.2f}",
            f"{r['backward_gflops']:.1f}",
            f"{r['backward_vs_gemm']:.2f}",
            f"{r['fwd_bwd_s'] * 1e3:.2f}",
            f"{r['fwd_bwd_vs_gemm']:.2f}",
            f"{r['forward_peak_mib']:.0f}/{r['backward_peak_mib']:.0f}",
        )
    console = Console(width=140)
    console.print(table)
    for r in results["layers"]:
        if "speedup_vs_per_group_gemm" in r:
            ours, plain = r["forward_s"] * 1e3, r["per_group_gemm_forward_s"] * 1e3
            console.print(
                f"{r['layer']} {r['dtype']}: forward {ours:.2f} ms vs a plain per-group GEMM "
                f"{plain:.2f} ms ({r['speedup_vs_per_group_gemm']:.2f}x)"
            )
    ref = results["reference"]
    console.print(
        f"reference engine on {ref['layer']}: forward {ref['reference_forward_s'] * 1e3:.1f} ms vs "
        f"{ref['fast_forward_s'] * 1e3:.3f} ms ({ref['forward_speedup']:.0f}x), backward "
        f"{ref['reference_backward_s'] * 1e3:.1f} ms vs {ref['fast_backward_s'] * 1e3:.3f} ms "
        f"({ref['backward_speedup']:.0f}x)"
    )


if __name__ == "__main__":
    main()
