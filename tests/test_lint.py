"""Lint and type checks that guard the structure, run with the tests so CI enforces them.

- ruff: the banned imports (``typer``/``rich`` outside ``convcli/cli/``, TID251) and no
  function above cyclomatic complexity 15 (C901), with the project's ruff settings;
- mypy: ``mypy convcli`` in its default mode passes.
"""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _run(*command: str) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_ruff_structure_rules():
    # ``python -m ruff``: the ruff installed with this interpreter, whatever PATH says
    done = _run(
        sys.executable, "-m", "ruff", "check", "--no-cache", "--select", "C901,TID251", "convcli"
    )
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.slow
def test_mypy_passes():
    done = _run(sys.executable, "-m", "mypy", "--no-incremental", "convcli")
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
