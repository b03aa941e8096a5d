"""The harness of the hostile-input corpus: run the installed command as an attacker would.

Every corpus test runs ``convcli`` through :func:`run`, which enforces what holds for any
input, however hostile:

- the process ends within ``timeout`` seconds (bounded time);
- it runs under an address-space limit (:class:`Limits`; bounded memory), and optionally a
  file-size limit (writes past it fail with ``EFBIG``, as on a full disk);
- it never exits 70 (that code is for convcli's own bugs) and never prints a traceback.

:func:`one_error` then checks the error contract (one ``convcli: error:`` line, the documented
exit code) and :func:`unchanged` that files on disk keep their exact bytes and no temporary
file is left behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import resource
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

PREFIX = "convcli: error: "
TEMP_PREFIX = ".convcli-"
EXIT_INTERNAL = 70
GiB = 2**30


def command() -> list[str]:
    """The installed console script (beside this interpreter), else ``python -m convcli``."""
    script = Path(sys.executable).parent / "convcli"
    return [str(script)] if script.exists() else [sys.executable, "-m", "convcli"]


@dataclass(frozen=True)
class Limits:
    """Resource limits of the child: address space and largest file it may write (bytes)."""

    memory: int | None = 2 * GiB
    file_size: int | None = None

    def apply(self) -> None:  # runs in the child, before exec
        if self.memory is not None:
            resource.setrlimit(resource.RLIMIT_AS, (self.memory, self.memory))
        if self.file_size is not None:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past it fails with EFBIG
            resource.setrlimit(resource.RLIMIT_FSIZE, (self.file_size, self.file_size))


def run(
    *args: object,
    cwd: Path | str,
    env: dict[str, str] | None = None,
    limits: Limits | None = None,
    timeout: float = 60,
    input: str | None = None,
) -> subprocess.CompletedProcess:
    """Run ``convcli *args``; fail the test on a hang, a traceback or exit 70."""
    argv = [*command(), *(str(arg) for arg in args)]
    environment = {**os.environ, "NO_COLOR": "1", **(env or {})}
    limits = limits or Limits()
    try:
        result = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            errors="replace",
            timeout=timeout,
            env=environment,
            cwd=cwd,
            input=input,
            stdin=None if input is not None else subprocess.DEVNULL,
            preexec_fn=limits.apply,
            check=False,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"{' '.join(argv)}: still running after {timeout} s")
    return check(result)


def check(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    """Fail on a traceback or exit 70; for the few tests that must start convcli themselves
    (a closed stdout, a pipeline), wrapped around their own ``subprocess.run``."""
    both = (result.stdout or "") + (result.stderr or "")
    assert "Traceback" not in both, both[-3000:]
    assert result.returncode != EXIT_INTERNAL, f"exit 70 (a convcli bug): {both[-2000:]}"
    return result


def one_error(result: subprocess.CompletedProcess, code: int) -> str:
    """Exit ``code`` and exactly one ``convcli: error:`` line on stderr; returns the line."""
    lines = result.stderr.splitlines()
    assert result.returncode == code, (result.returncode, result.stderr[-2000:])
    assert len(lines) == 1, result.stderr[-2000:]
    assert lines[0].startswith(PREFIX), result.stderr[-2000:]
    return lines[0]


def digest(path: Path) -> str | None:
    """SHA-256 of a regular file, the link target of a symlink, None when absent."""
    if path.is_symlink():
        return "link:" + os.readlink(path)
    if not path.exists():
        return None
    if not path.is_file():
        return f"kind:{path.stat().st_mode:o}"
    return hashlib.sha256(path.read_bytes()).hexdigest()


@contextlib.contextmanager
def unchanged(*paths: Path, folders: tuple[Path, ...] = ()) -> Iterator[None]:
    """Check that ``paths`` keep their bytes (or stay absent) and ``folders`` (default: the
    paths' folders) hold no ``.convcli-*`` temporary file afterwards."""
    before = {path: digest(path) for path in paths}
    yield
    for path, was in before.items():
        assert digest(path) == was, f"{path} changed"
    for folder in folders or {path.parent for path in paths}:
        left = sorted(p.name for p in folder.iterdir() if p.name.startswith(TEMP_PREFIX))
        assert not left, f"temporary files left in {folder}: {left}"
