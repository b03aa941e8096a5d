"""Benchmark gradcheck as a user runs it: wall time of the installed command, start-up included.

    python benchmarks/bench_gradcheck.py [--repeats 5] [--out benchmarks/results/gradcheck.json]

Cases (issue 3's targets):
- exhaustive: n=4, 16x16x8 -> 16, 3x3, stride 1, pad 1 (9,360 parameters), target well under 2 s;
- fast: n=8, 32x32x16 -> 16, 3x3, pad 1, target under 1 s;
- ``--impl`` on the bundled classic implementation (12 configurations, each in a child process).
Reports the median of the repeats and the forward passes used (vs 2 per parameter element-wise).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

CASES = {
    "exhaustive 4x16x16x8->16": [
        "--shape",
        "4,16,16,8",
        "--kernel",
        "3",
        "--cout",
        "16",
        "--pad",
        "1",
        "--mode",
        "exhaustive",
    ],
    "fast 8x32x32x16->16": [
        "--shape",
        "8,32,32,16",
        "--kernel",
        "3",
        "--cout",
        "16",
        "--pad",
        "1",
        "--mode",
        "fast",
    ],
    "auto 4x16x16x8->16": ["--shape", "4,16,16,8", "--kernel", "3", "--cout", "16", "--pad", "1"],
    # the user's code in a child process per configuration, numerical gradients of their forward
    "impl classic suite (12 configs)": [
        "--impl",
        str(Path(__file__).resolve().parent.parent / "sample_data" / "classic_conv.py"),
    ],
}


def command() -> list[str]:
    exe = shutil.which("convcli")
    return [exe] if exe else [sys.executable, "-m", "convcli"]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/gradcheck.json"))
    parser.add_argument("--smoke", action="store_true", help="one repeat of each case")
    args = parser.parse_args(argv)
    if args.smoke:
        args.repeats = 1
    rows = []
    for name, flags in CASES.items():
        times, document = [], None
        for _ in range(args.repeats):
            start = time.perf_counter()
            done = subprocess.run(
                [*command(), "gradcheck", *flags, "--json"],
                capture_output=True,
                text=True,
                check=False,
            )
            times.append(time.perf_counter() - start)
            if done.returncode != 0:
                sys.exit(f"{name}: convcli exited {done.returncode}: {done.stderr.strip()}")
            document = json.loads(done.stdout)
        result = document["results"][0]
        parameters = sum(  # --impl results have per-check tensors instead
            t["total"] for t in result.get("tensors", {}).values() if t.get("unit") == "elements"
        )
        rows.append(
            {
                "case": name,
                "mode": document["mode"] or "impl",
                "median_wall_s": statistics.median(times),
                "min_wall_s": min(times),
                "check_s": document["seconds"],
                "forward_passes": document["forward_passes"],
                "parameters": parameters,
                "elementwise_passes": 2 * parameters,
                "passed": document["passed"],
            }
        )
    table = Table(
        title=f"convcli gradcheck, median of {args.repeats} runs (wall, start-up included)"
    )
    for column in (
        "case",
        "mode",
        "median wall s",
        "check s",
        "forward passes",
        "element-wise passes",
    ):
        table.add_column(column, justify="left" if column in ("case", "mode") else "right")
    for row in rows:
        table.add_row(
            row["case"],
            row["mode"],
            f"{row['median_wall_s']:.3f}",
            f"{row['check_s']:.3f}",
            str(row["forward_passes"]),
            str(row["elementwise_passes"]) if row["parameters"] else "-",
        )
    Console(width=120).print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"repeats": args.repeats, "cases": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
