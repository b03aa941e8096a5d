"""Peak memory of ``convcli forward`` in a fresh process, against the issue's bound.

    python benchmarks/bench_memory.py [--size-mib 1024] [--workspace 256M] [--out FILE] [--smoke]

Two runs on an input of ``--size-mib`` (float32 NHWC, 64x64x16 images, 3x3 -> 16, pad 1):
- in memory (``.npy`` input): peak RSS must stay within input + output + workspace + 150 MiB;
- streamed (HDF5 input bigger than a 64 MiB workspace): peak RSS must stay within the
  process's start-up size + workspace + 150 MiB, whatever the input size.
Peak RSS is the child's ``ru_maxrss``; the start-up size is that of ``convcli forward`` on
the bundled sample.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import h5py
import numpy as np

from convcli.units import format_size, parse_size

MIB = 2**20
SLACK = 150 * MIB
IMAGE = (64, 64, 16)
ROOT = Path(__file__).resolve().parent.parent


def peak_rss(*args: str) -> int:
    """Peak resident set size in bytes of ``python -m convcli ARGS`` run in a child process."""
    code = (
        "import resource, subprocess, sys;"
        "subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL);"
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)"
    )
    command = [sys.executable, "-m", "convcli", *args]
    done = subprocess.run(
        [sys.executable, "-c", code, *command], capture_output=True, text=True, check=True
    )
    return int(done.stdout.strip())


def make_inputs(folder: Path, size: int) -> tuple[Path, Path, Path, int]:
    rng = np.random.default_rng(0)
    per_image = int(np.prod(IMAGE)) * 4
    n = max(1, size // per_image)
    x_npy, x_h5, w_npy = folder / "x.npy", folder / "x.h5", folder / "w.npy"
    x = np.lib.format.open_memmap(x_npy, mode="w+", dtype=np.float32, shape=(n, *IMAGE))
    with h5py.File(x_h5, "w") as f:
        dataset = f.create_dataset("x", shape=(n, *IMAGE), dtype=np.float32)
        for start in range(0, n, 256):
            block = rng.standard_normal((min(256, n - start), *IMAGE), dtype=np.float32)
            x[start : start + len(block)] = block
            dataset[start : start + len(block)] = block
    x.flush()
    del x
    np.save(w_npy, rng.standard_normal((3, 3, IMAGE[-1], 16)).astype(np.float32))
    return x_npy, x_h5, w_npy, n * per_image


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--workspace", default="256M")
    parser.add_argument("--stream-workspace", default="64M")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/memory.json"))
    parser.add_argument("--smoke", action="store_true", help="a 16 MiB input")
    args = parser.parse_args(argv)
    size = (16 if args.smoke else args.size_mib) * MIB
    workspace, stream_workspace = parse_size(args.workspace), parse_size(args.stream_workspace)
    with tempfile.TemporaryDirectory(dir=ROOT / "benchmarks") as folder:
        folder = Path(folder)
        x_npy, x_h5, w_npy, input_bytes = make_inputs(folder, size)
        start_up = peak_rss("forward", str(ROOT / "sample_data" / "conv_example.h5"), "--json")
        in_memory = peak_rss(
            "forward",
            "--x",
            str(x_npy),
            "--w",
            str(w_npy),
            "--pad",
            "1",
            "--max-workspace",
            args.workspace,
            "--json",
        )
        streamed = peak_rss(
            "forward",
            "--x",
            f"{x_h5}:x",
            "--w",
            str(w_npy),
            "--pad",
            "1",
            "--max-workspace",
            args.stream_workspace,
            "--out",
            str(folder / "z.h5"),
            "--json",
        )
    output_bytes = input_bytes  # 3x3, pad 1, Cout = Cin: z is as large as x
    results = {
        "input_bytes": input_bytes,
        "start_up_peak_rss": start_up,
        "in_memory": {
            "workspace": workspace,
            "peak_rss": in_memory,
            "bound": input_bytes + output_bytes + workspace + SLACK,
        },
        "streamed": {
            "workspace": stream_workspace,
            "peak_rss": streamed,
            "bound": start_up + stream_workspace + SLACK,
        },
    }
    for name in ("in_memory", "streamed"):
        results[name]["within_bound"] = results[name]["peak_rss"] <= results[name]["bound"]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"input {format_size(input_bytes)}; start-up peak RSS {format_size(start_up)}")
    for name in ("in_memory", "streamed"):
        r = results[name]
        verdict = "OK" if r["within_bound"] else "OVER"
        print(
            f"{name}: peak RSS {format_size(r['peak_rss'])} "
            f"(workspace {format_size(r['workspace'])}), bound {format_size(r['bound'])}: {verdict}"
        )
    print(f"wrote {args.out}")
    return results


if __name__ == "__main__":
    main()
