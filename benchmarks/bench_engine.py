"""Benchmark the conv engine against this machine's GEMM throughput and, when it is
importable, PyTorch.

    python benchmarks/bench_engine.py [--quick] [--repeats 5] [--rounds 3] [--threads N]
                                      [--dtype float32 float64] [--layers cifar resnet ...]
                                      [--out FILE] [--keep-blas-env] [--no-torch] [--smoke]
    python benchmarks/bench_engine.py --table-from FILE     # the README table from a JSON

Native BLAS kernels: ``OPENBLAS_CORETYPE`` and ``OPENBLAS_L2_SIZE`` (set on some machines to
work around old OpenBLAS builds) pin slower kernels than a user's machine gets, so the script
re-executes itself once without them and says so; ``--keep-blas-env`` keeps the environment
as it is (the test suite does). It prints the BLAS library threadpoolctl reports.

In one run, on one machine and thread count, it measures
- NumPy matrix-multiply throughput (2048 x 2048 operands) per dtype;
- each layer's GEMMs alone, at the shapes its im2col formulation needs (patches @ weights
  forward; patchesᵀ @ dz and dz @ weightsᵀ backward), on ready operands with BLAS on every
  thread: no im2col + GEMM engine is faster than these calls, so with PyTorch's times they
  give the best ratio to PyTorch such an engine could reach (not for depthwise layers, whose
  per-group products are too small to be GEMMs);
- convcli's forward, backward (dx + dw + db) and forward + backward on the layers below
  (NHWC, 3x3 unless stated): GFLOP/s (forward 2·n·Ho·Wo·Cout·kh·kw·Cin/groups, backward
  twice that), the ratio to GEMM of the same dtype, the median of the repeats, and the peak
  memory NumPy allocated during one call (tracemalloc);
- when ``import torch`` works: PyTorch's conv1d/2d/3d (or conv_transpose) forward and
  forward + backward on the same data, with ``torch.set_num_threads`` equal to convcli's
  threads, the better of NCHW and channels_last. Every operation is timed in a block of its
  own (a 0.2 s warm-up, then the repeats back to back; :func:`block_medians` says why not
  call by call), the blocks of convcli, its GEMMs and PyTorch in turn, layer after layer,
  round after round, so that changes in load hit all of them. Ratios are PyTorch's time
  over convcli's (> 1: convcli faster);
- the reference engine on a small layer, for the speed-up.
Results go to a JSON file and a Rich table. ``--smoke`` runs tiny sizes once (the test suite
does, so the script cannot rot); ``--quick`` one round of 3 repeats.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

from convcli import ConvSpec, conv_backward, conv_forward
from convcli.engine.fast import blas_threads
from convcli.engine.reference import conv_backward_reference, conv_forward_reference

# name: (x shape (n, *spatial, Cin), kernel, Cout, ConvSpec kwargs)
LAYERS = {
    "cifar": ((32, 32, 32, 16), (3, 3), 32, {"padding": 1}),
    "resnet": ((8, 56, 56, 64), (3, 3), 64, {"padding": 1}),
    "wide": ((8, 28, 28, 128), (3, 3), 128, {"padding": 1}),
    "stride2": ((16, 64, 64, 32), (3, 3), 64, {"stride": 2, "padding": 1}),
    "dilated": ((8, 64, 64, 32), (3, 3), 32, {"dilation": 2, "padding": 2}),
    "k7": ((4, 64, 64, 16), (7, 7), 16, {"padding": 3}),
    "depthwise": ((16, 56, 56, 64), (3, 3), 64, {"padding": 1, "groups": 64}),
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
WARM_UP_SECONDS = 0.2  # per block: longer than OpenBLAS's idle threads spin (about 0.1 s)

#: Variables that pin OpenBLAS to other kernels than it would pick on this CPU.
BLAS_OVERRIDES = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
#: Set in the re-executed process: the overrides it was started without (comma-separated).
REEXEC_MARK = "CONVCLI_BENCH_CLEARED_BLAS_ENV"


def reexec_with_native_blas(argv: list[str]) -> None:
    """Re-execute this script once without :data:`BLAS_OVERRIDES`, so OpenBLAS loads the
    kernels it picks for this CPU. Does nothing with ``--keep-blas-env``, in the re-executed
    process, or when none of the variables is set."""
    if "--keep-blas-env" in argv or "--table-from" in argv or REEXEC_MARK in os.environ:
        return
    cleared = [name for name in BLAS_OVERRIDES if name in os.environ]
    if not cleared:
        return
    env = {k: v for k, v in os.environ.items() if k not in BLAS_OVERRIDES}
    env[REEXEC_MARK] = ",".join(cleared)
    sys.stdout.flush()
    os.execve(sys.executable, [sys.executable, os.path.abspath(__file__), *argv], env)


def blas_environment(keep: bool) -> dict:
    """What the run did with the BLAS overrides, for the output."""
    cleared = [name for name in os.environ.get(REEXEC_MARK, "").split(",") if name]
    present = {name: os.environ[name] for name in BLAS_OVERRIDES if name in os.environ}
    return {"kept": keep, "cleared": cleared, "set": present, "native": not present}


def median_seconds(function, repeats: int) -> float:
    """Median wall time of ``repeats`` consecutive calls, after calling it for
    WARM_UP_SECONDS (see :func:`block_medians`)."""
    return block_medians({"f": function}, repeats)["f"]


def block_medians(functions: dict, repeats: int) -> dict[str, float]:
    """Median wall time per function, each timed in a block of its own: calls for
    WARM_UP_SECONDS, then ``repeats`` timed calls back to back; the functions in turn.

    Not call by call: measured here, alternating single calls of PyTorch and convcli slowed
    both (cifar forward: convcli 3.3 -> 5.9 ms, PyTorch 0.98 -> 1.27 ms), because each one's
    idle threads keep spinning for a while after a call (OpenBLAS's for about 0.1 s) and take
    a core from the other; and a call after a pause runs cold (several times slower on this
    machine). A block's warm-up outlasts the previous block's spinning threads, so each
    function is timed as a loop of its own calls runs. Rounds (the caller's loop over
    layers) still spread slow spells of a shared machine over all of them.
    """
    medians = {}
    for name, function in functions.items():
        start = time.perf_counter()
        function()
        while time.perf_counter() - start < WARM_UP_SECONDS:
            function()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            function()
            times.append(time.perf_counter() - start)
        medians[name] = statistics.median(times)
    return medians


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
    cin = x_shape[-1]
    x = rng.standard_normal(x_shape).astype(dtype)
    wt = rng.standard_normal(spec.weight_shape(kernel, cin, cout)).astype(dtype)
    b = rng.standard_normal(cout).astype(dtype)
    geometry = spec.geometry(x.shape, wt.shape)
    taps = int(np.prod(kernel))
    # a transposed layer's products: every input pixel times every tap and output channel
    pixels = geometry.in_sizes if spec.transposed else geometry.out_sizes
    flops = 2 * x_shape[0] * int(np.prod(pixels)) * taps * cout * cin // spec.groups
    return x, wt, b, spec, flops


def torch_operations(x, w, b, z, dz, spec: ConvSpec, threads: int) -> dict:
    """PyTorch's forward and forward + backward of the layer, per memory format: names
    ``torch_forward_<format>`` and ``torch_fwd_bwd_<format>`` (format ``nchw`` or ``cl``).

    x (n, *spatial, Cin), w (*kernel, Cin/g, Cout) (transposed: (*kernel, Cout/g, Cin)) and
    z and dz (n, *out, Cout) are convcli's channels-last arrays; PyTorch gets channels-first
    copies of the same values, and its output must match z (else the comparison is void).
    """
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(threads)
    nd = x.ndim - 2
    to_first = (0, nd + 1, *range(1, nd + 1))
    xt = torch.from_numpy(np.ascontiguousarray(x.transpose(to_first)))
    # (*kernel, a, b) -> (b, a, *kernel): Cout first (conv), Cin first (transposed)
    wt = torch.from_numpy(np.ascontiguousarray(w.transpose(nd + 1, nd, *range(nd))))
    bt = torch.from_numpy(b)
    dzt = torch.from_numpy(np.ascontiguousarray(dz.transpose(to_first)))
    common = {"stride": spec.stride, "padding": spec.padding, "dilation": spec.dilation}
    if spec.transposed:
        conv = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}[nd]
        common["output_padding"] = spec.output_padding
    else:
        conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[nd]
    formats = {"nchw": torch.contiguous_format}
    if nd in (2, 3):
        formats["cl"] = torch.channels_last if nd == 2 else torch.channels_last_3d
    operations = {}
    for label, memory_format in formats.items():
        xf = xt.contiguous(memory_format=memory_format).requires_grad_(True)
        wf = wt.contiguous(memory_format=memory_format).requires_grad_(True)
        bf = bt.clone().requires_grad_(True)
        dzf = dzt.contiguous(memory_format=memory_format)

        def forward(xf=xf, wf=wf, bf=bf):
            with torch.no_grad():
                return conv(xf, wf, bf, groups=spec.groups, **common)

        def fwd_bwd(xf=xf, wf=wf, bf=bf, dzf=dzf):
            xf.grad = wf.grad = bf.grad = None
            conv(xf, wf, bf, groups=spec.groups, **common).backward(dzf)

        ours = z.transpose(to_first)
        if not np.allclose(forward().numpy(), ours, rtol=1e-3, atol=1e-3 * np.abs(ours).max()):
            raise RuntimeError(f"PyTorch's output differs from convcli's ({label})")
        operations[f"torch_forward_{label}"] = forward
        operations[f"torch_fwd_bwd_{label}"] = fwd_bwd
    return operations


def gemm_shapes(x, w, spec: ConvSpec) -> dict | None:
    """The matrix products of the layer written as im2col + GEMM, each ``[M, K, N]`` for
    ``groups`` products of (M, K) @ (K, N): ``forward`` patches @ weights (P, K, N), ``dw``
    patchesᵀ @ dz (K, P, N), ``dx`` dz @ weightsᵀ (P, N, K), with P output pixels, K =
    taps·Cin/groups, N = Cout/groups. A transposed layer's are its adjoint convolution's,
    its forward being that convolution's dx product. None for a depthwise layer (K = taps,
    N = 1 per group: its bound is memory traffic, not a GEMM)."""
    geometry = spec.geometry(x.shape, w.shape)
    if geometry.transposed:
        geometry = geometry.adjoint()
    g = geometry.groups
    if geometry.cin == g and g > 1:
        return None
    p = geometry.n * int(np.prod(geometry.out_sizes))
    k = int(np.prod(geometry.kernel)) * geometry.cin // g
    n = geometry.cout // g
    forward, dx = [p, k, n], [p, n, k]
    if spec.transposed:
        forward, dx = dx, forward
    return {"groups": g, "forward": forward, "dw": [k, p, n], "dx": dx}


def gemm_operations(shapes: dict, dtype) -> dict:
    """The products of :func:`gemm_shapes` on random operands, BLAS on all its threads:
    ``gemms_forward`` (the forward's) and ``gemms_fwd_bwd`` (all three). No patch matrix is
    built: an im2col + GEMM engine cannot be faster than these calls."""
    rng = np.random.default_rng(2)
    g = shapes["groups"]

    def product(m, k, n):
        a = rng.standard_normal((g, m, k)).astype(dtype)
        b = rng.standard_normal((g, k, n)).astype(dtype)
        out = np.empty((g, m, n), dtype=dtype)
        if g == 1:
            a, b, out = a[0], b[0], out[0]
        return lambda: np.matmul(a, b, out=out)

    forward, dw, dx = (product(*shapes[key]) for key in ("forward", "dw", "dx"))

    def all_three():
        forward()
        dw()
        dx()

    return {"gemms_forward": forward, "gemms_fwd_bwd": all_three}


def bench_layer(name, layer, dtype, gemm, torch_threads: int | None) -> dict:
    """A layer's timed operations (convcli's, its GEMMs alone, a per-group GEMM's, PyTorch's
    when asked)."""
    x, w, b, spec, flops = make_layer(layer, dtype)
    z, cache = conv_forward(x, w, b, spec)
    dz = np.random.default_rng(1).standard_normal(z.shape).astype(dtype)
    operations = {
        "forward": lambda: conv_forward(x, w, b, spec),
        "backward": lambda: conv_backward(dz, cache),
        "fwd_bwd": lambda: conv_backward(dz, conv_forward(x, w, b, spec)[1]),
    }
    shapes = gemm_shapes(x, w, spec)
    if shapes is not None:
        operations.update(gemm_operations(shapes, dtype))
    if not spec.transposed and (spec.groups > 1 or set(w.shape[:-2]) == {1}):
        operations["per_group_gemm_forward"] = per_group_gemm(x, w, b, spec)
    if torch_threads is not None:
        operations.update(torch_operations(x, w, b, z, dz, spec, torch_threads))
    return {
        "name": name,
        "dtype": np.dtype(dtype),
        "x": x,
        "w": w,
        "hparams": layer[-1],
        "cout": layer[2],
        "flops": flops,
        "gemm": gemm,
        "gemm_shapes": shapes,
        "operations": operations,
        "rounds": [],
        "peaks": (
            peak_bytes(operations["forward"]) / 2**20,
            peak_bytes(operations["backward"]) / 2**20,
        ),
    }


def measure_round(case: dict, repeats: int) -> None:
    case["rounds"].append(block_medians(case["operations"], repeats))


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
    if "gemms_forward" in seconds:
        row["gemm_shapes"] = case["gemm_shapes"]
        row["gemms_forward_s"] = seconds["gemms_forward"]
        row["gemms_fwd_bwd_s"] = seconds["gemms_fwd_bwd"]
        row["gemms_forward_vs_gemm"] = flops / seconds["gemms_forward"] / 1e9 / gemm
    if "per_group_gemm_forward" in seconds:
        row["per_group_gemm_forward_s"] = seconds["per_group_gemm_forward"]
        row["speedup_vs_per_group_gemm"] = seconds["per_group_gemm_forward"] / seconds["forward"]
    for key in ("forward", "fwd_bwd"):
        formats = {
            op.rsplit("_", 1)[1]: t for op, t in seconds.items() if op.startswith(f"torch_{key}_")
        }
        if formats:
            best = min(formats, key=formats.__getitem__)
            row[f"torch_{key}_s"] = formats[best]
            row[f"torch_{key}_format"] = best
            row[f"{key}_vs_torch"] = formats[best] / seconds[key]
            if f"gemms_{key}" in seconds:  # the best ratio an im2col + GEMM engine can reach
                row[f"gemms_{key}_vs_torch"] = formats[best] / seconds[f"gemms_{key}"]
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


def torch_version(wanted: bool) -> str | None:
    """PyTorch's version when it is importable and wanted, else None."""
    if not wanted:
        return None
    try:
        import torch
    except ImportError:
        return None
    return str(torch.__version__)


def describe_blas(info: dict, environment: dict) -> str:
    pools = info["blas"] if isinstance(info["blas"], list) else []
    kernels = "; ".join(
        f"{p['internal_api']} {p['version']}, kernel {p['architecture']}, "
        f"{p['num_threads']} threads"
        for p in pools
    )
    if environment["cleared"]:
        how = f"native kernels: re-executed without {', '.join(environment['cleared'])}"
    elif environment["set"]:
        how = "environment kept: " + ", ".join(f"{k}={v}" for k, v in environment["set"].items())
    else:
        how = "native kernels: no BLAS overrides in the environment"
    return f"BLAS: {kernels or info['blas']} ({how})"


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per round")
    parser.add_argument("--rounds", type=int, default=3, help="passes over all layers")
    parser.add_argument("--quick", action="store_true", help="one round of 3 repeats")
    parser.add_argument("--dtype", nargs="+", default=["float32", "float64"])
    parser.add_argument("--layers", nargs="+", default=None, help=f"any of {', '.join(LAYERS)}")
    parser.add_argument(
        "--threads", type=int, default=None, help="pin BLAS threads (threadpoolctl)"
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/engine.json"))
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, one repeat")
    parser.add_argument(
        "--keep-blas-env",
        action="store_true",
        help=f"do not re-execute without {' and '.join(BLAS_OVERRIDES)}",
    )
    parser.add_argument("--no-torch", action="store_true", help="skip PyTorch even if present")
    parser.add_argument(
        "--table-from", type=Path, default=None, help="print the README table of a results JSON"
    )
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.table_from is not None:
        results = json.loads(args.table_from.read_text())
        print(markdown_table(results))
        return results
    layers = SMOKE_LAYERS if args.smoke else LAYERS
    if args.layers:
        layers = {name: layers[name] for name in args.layers}
    if args.quick:
        args.repeats, args.rounds = 3, 1
    repeats = 1 if args.smoke else args.repeats
    args.rounds = 1 if args.smoke else args.rounds
    global WARM_UP_SECONDS
    WARM_UP_SECONDS = 0.0 if args.smoke else WARM_UP_SECONDS
    gemm_size = 256 if args.smoke else 2048
    environment = blas_environment(args.keep_blas_env)
    torch_found = torch_version(not args.no_torch)

    limiter = None
    if args.threads is not None:
        from threadpoolctl import threadpool_limits

        limiter = threadpool_limits(limits=args.threads, user_api="blas")
    try:
        info = blas_info()
        threads = blas_threads()  # convcli's default worker count
        print(describe_blas(info, environment), flush=True)
        print(
            f"PyTorch {torch_found}, {threads} threads, timed in blocks alternating with convcli's"
            if torch_found
            else "PyTorch: not importable (or --no-torch); convcli and GEMM only",
            flush=True,
        )
        gemm = {dtype: gemm_gflops(dtype, gemm_size, repeats) for dtype in args.dtype}
        cases = [
            bench_layer(name, shape, dtype, gemm[dtype], threads if torch_found else None)
            for dtype in args.dtype
            for name, shape in layers.items()
        ]
        for _ in range(args.rounds):  # rounds interleave the layers, spreading slow spells
            for case in cases:
                measure_round(case, repeats)
        rows = [layer_row(case) for case in cases]
        reference = bench_reference(repeats)
    finally:
        if limiter is not None:
            limiter.restore_original_limits()
    results = {
        "machine": {
            "python": sys.version.split()[0],
            "numpy": np.__version__,
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "threads": threads,
            "blas_environment": environment,
            "torch": torch_found,
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


def markdown_row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def markdown_head(header: list[str]) -> list[str]:
    """A table's header row and alignment row: two text columns, the rest numbers."""
    return [markdown_row(header), "|---|---|" + "---:|" * (len(header) - 2)]


def markdown_table(results: dict) -> str:
    """The README's table: convcli's times, ratio to GEMM, and PyTorch's when measured."""
    torch_found = any("torch_forward_s" in r for r in results["layers"])
    header = ["layer", "dtype", "fwd ms", "fwd / GEMM", "f+b ms", "f+b / GEMM"]
    if torch_found:
        header += ["torch fwd ms", "torch f+b ms", "fwd ÷ torch", "f+b ÷ torch"]
    lines = markdown_head(header)
    for r in results["layers"]:
        cells = [
            r["layer"],
            r["dtype"],
            f"{r['forward_s'] * 1e3:.2f}",
            f"{r['forward_vs_gemm']:.2f}",
            f"{r['fwd_bwd_s'] * 1e3:.2f}",
            f"{r['fwd_bwd_vs_gemm']:.2f}",
        ]
        if torch_found:
            cells += [
                f"{r['torch_forward_s'] * 1e3:.2f} ({r['torch_forward_format']})",
                f"{r['torch_fwd_bwd_s'] * 1e3:.2f} ({r['torch_fwd_bwd_format']})",
                f"{r['forward_vs_torch']:.2f}",
                f"{r['fwd_bwd_vs_torch']:.2f}",
            ]
        lines.append(markdown_row(cells))
    return "\n".join(lines) + "\n\n" + gemms_table(results, torch_found)


def gemms_table(results: dict, torch_found: bool) -> str:
    """The layers' GEMMs alone (:func:`gemm_operations`): their time, their rate as a
    fraction of the 2048² GEMM's, convcli's time as a multiple of theirs and, with PyTorch,
    the best ratio to it an im2col + GEMM engine could reach."""
    header = ["layer", "dtype", "GEMMs fwd ms", "GEMMs f+b ms", "GEMM rate fwd"]
    header += ["convcli fwd ÷ GEMMs", "convcli f+b ÷ GEMMs"]
    if torch_found:
        header += ["best fwd ÷ torch", "best f+b ÷ torch"]
    lines = markdown_head(header)
    for r in results["layers"]:
        if "gemms_forward_s" not in r:
            continue
        cells = [
            r["layer"],
            r["dtype"],
            f"{r['gemms_forward_s'] * 1e3:.2f}",
            f"{r['gemms_fwd_bwd_s'] * 1e3:.2f}",
            f"{r['gemms_forward_vs_gemm']:.2f}",
            f"{r['forward_s'] / r['gemms_forward_s']:.2f}",
            f"{r['fwd_bwd_s'] / r['gemms_fwd_bwd_s']:.2f}",
        ]
        if torch_found:
            cells += [f"{r['gemms_forward_vs_torch']:.2f}", f"{r['gemms_fwd_bwd_vs_torch']:.2f}"]
        lines.append(markdown_row(cells))
    return "\n".join(lines)


def print_table(results: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    gemm = ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in results["gemm_gflops"].items())
    runs = f"{results['rounds']} rounds x {results['repeats']}"
    title = f"convcli engine, {runs} · GEMM {results['gemm_size']}²: {gemm}"
    table = Table(title=title)
    torch_found = any("torch_forward_s" in r for r in results["layers"])
    columns = [
        "layer",
        "dtype",
        "fwd ms",
        "fwd GF/s",
        "xGEMM",
        "bwd ms",
        "xGEMM",
        "f+b ms",
        "xGEMM",
        "peak MiB f/b",
    ]
    if torch_found:
        columns += ["torch fwd", "torch f+b", "fwd ÷torch", "f+b ÷torch"]
    for column in columns:
        table.add_column(column, justify="left" if column in ("layer", "dtype") else "right")
    for r in results["layers"]:
        cells = [
            r["layer"],
            r["dtype"],
            f"{r['forward_s'] * 1e3:.2f}",
            f"{r['forward_gflops']:.1f}",
            f"{r['forward_vs_gemm']:.2f}",
            f"{r['backward_s'] * 1e3:.2f}",
            f"{r['backward_vs_gemm']:.2f}",
            f"{r['fwd_bwd_s'] * 1e3:.2f}",
            f"{r['fwd_bwd_vs_gemm']:.2f}",
            f"{r['forward_peak_mib']:.0f}/{r['backward_peak_mib']:.0f}",
        ]
        if torch_found:
            cells += [
                f"{r['torch_forward_s'] * 1e3:.2f} {r['torch_forward_format']}",
                f"{r['torch_fwd_bwd_s'] * 1e3:.2f} {r['torch_fwd_bwd_format']}",
                f"{r['forward_vs_torch']:.2f}",
                f"{r['fwd_bwd_vs_torch']:.2f}",
            ]
        table.add_row(*cells)
    console = Console(width=170)
    console.print(table)
    for r in results["layers"]:
        if "gemms_forward_s" in r:
            best = (
                f"; best ratio to PyTorch an im2col + GEMM engine could reach "
                f"{r['gemms_forward_vs_torch']:.2f} / {r['gemms_fwd_bwd_vs_torch']:.2f}"
                if "gemms_forward_vs_torch" in r
                else ""
            )
            console.print(
                f"{r['layer']} {r['dtype']}: its GEMMs alone take {r['gemms_forward_s'] * 1e3:.2f}"
                f" ms forward, {r['gemms_fwd_bwd_s'] * 1e3:.2f} ms f+b (convcli "
                f"{r['forward_s'] / r['gemms_forward_s']:.2f}x / "
                f"{r['fwd_bwd_s'] / r['gemms_fwd_bwd_s']:.2f}x that){best}"
            )
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
    reexec_with_native_blas(sys.argv[1:])
    main()
