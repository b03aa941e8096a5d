"""Shared test set-up: Hypothesis profiles and the sample data paths.

Profiles: ``ci`` (default; derandomized, bounded) and ``dev`` (deeper, random), chosen
with the environment variable ``CONVCLI_HYPOTHESIS_PROFILE``.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    derandomize=True,
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    print_blob=True,
)
settings.register_profile("dev", max_examples=500, deadline=None)
settings.load_profile(os.environ.get("CONVCLI_HYPOTHESIS_PROFILE", "ci"))

ROOT = Path(__file__).resolve().parent.parent
SAMPLE_NPZ = ROOT / "sample_data" / "conv_example.npz"
SAMPLE_H5 = ROOT / "sample_data" / "conv_example.h5"


@pytest.fixture
def classic():
    """The classic exercise's tensors, read from the bundled NPZ (no global seeding here)."""
    import numpy as np

    with np.load(SAMPLE_NPZ, allow_pickle=False) as f:
        return {
            "x": f["A_prev"],
            "w": f["W"],
            "b": f["b"],
            "pad": int(f["pad"]),
            "stride": int(f["stride"]),
        }


def peak_rss(*args) -> int:
    """Peak resident memory in bytes of ``convcli ARGS`` run in a child of a fresh process."""
    code = (
        "import resource, subprocess, sys;"
        "subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL);"
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)"
    )
    command = [sys.executable, "-m", "convcli", *map(str, args)]
    done = subprocess.run(
        [sys.executable, "-c", code, *command],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "NO_COLOR": "1"},
    )
    return int(done.stdout.strip())
