"""Running a user's forward and backward functions in a child process, for checking a
user's implementation.

One child per configuration (``python -B impl_worker.py``, NumPy with single-threaded BLAS;
about 0.1 s to start, so :meth:`UserProcess.launch` lets it start while other work goes on),
so a crash, a patched NumPy or a leaked global affects one
configuration and never this process. The parent sends
plain arrays and reads plain arrays back (``.npy`` with ``allow_pickle=False``, size-capped):
nothing from the child is unpickled, and every answer is checked again here (shape, finite
values) before a verdict uses it.

Whatever the user's code does — raise anything, call ``exit()`` or ``os._exit``, crash,
hang past the time-out, run out of the memory limit, print — ends as a
:class:`UserCodeError` whose message is one line naming the function, the reason and, when
known, the line of the user's file.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import select
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO

import numpy as np

from convcli.check import impl_worker
from convcli.check.adapters import Binding

DEFAULT_TIMEOUT = 30.0
MAX_TIMEOUT = 86400  # seconds: a day; far larger deadlines overflow the clocks they are set on
OUTPUT_LIMIT = 2000  # characters of captured output kept per configuration
_SINGLE_THREAD = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
_FRAME = re.compile(r'File "(?P<file>[^"]+)", line (?P<line>\d+)')


class UserCodeError(Exception):
    """The user's code failed (raised, crashed, hung, exited, returned junk); one-line message."""


class CheckerError(RuntimeError):
    """convcli's own code failed in the child, outside the user's functions (not a verdict on
    them: an internal error); one-line message."""


def _environment() -> dict:
    environment = dict(os.environ)
    environment.update(dict.fromkeys(_SINGLE_THREAD, "1"))
    environment.pop("PYTHONSTARTUP", None)
    return environment


class UserProcess:
    """A child process holding the user's module; use as a context manager.

    Parameters
    ----------
    path : Path
        The user's file.
    timeout : float
        Seconds for everything done with this child (load and every call).
    max_memory : int or None
        Bytes the child may map beyond what it maps after start-up (RLIMIT_AS).
    wanted : sequence of str
        The function names to look for in the user's file; after :meth:`start`,
        :attr:`defined` holds those it defines and :attr:`keywords` the hyperparameter
        keywords each accepts.
    """

    def __init__(
        self,
        path,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        max_memory: int | None = None,
        wanted: Sequence[str] = (),
    ):
        self.path = Path(path).resolve()
        self.timeout = timeout
        self.max_memory = max_memory
        self.calls = 0
        self.dtypes: dict[str, str] = {}  # the dtypes the user's last answer had, by role
        self.repeat: dict[str, float] = {}  # max |difference| between two backward calls
        self.wanted = list(wanted)
        self._dir = tempfile.TemporaryDirectory(prefix="convcli-impl-")
        self._output = Path(self._dir.name) / "output"
        self._fault = Path(self._dir.name) / "fault"
        self._output.touch()
        self._process: subprocess.Popen | None = None
        self._deadline = 0.0
        self.defined: set[str] = set()
        self.keywords: dict[str, tuple[str, ...]] = {}
        self._dead: str | None = None

    # -- life cycle ----------------------------------------------------------------------------

    def __enter__(self) -> UserProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def launch(self) -> None:
        """Start the child without waiting for it (it loads NumPy and the user's file while
        this process does other work); :meth:`start` then waits for it."""
        if self._process is not None:
            return
        with open(self._output, "ab") as capture:
            self._process = subprocess.Popen(
                [
                    sys.executable,
                    "-B",
                    impl_worker.__file__,
                    str(self.path),
                    str(self._output),
                    str(self._fault),
                    str(self.max_memory or 0),
                    json.dumps(self.wanted),
                ],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=capture,
                env=_environment(),
            )

    def start(self) -> None:
        """Start the child (unless :meth:`launch` did) and wait until it has loaded the
        user's file; UserCodeError if loading fails. The time-out counts from here."""
        self.launch()
        self._deadline = time.monotonic() + self.timeout
        header, _ = self._receive("loading it", 1 << 16)
        if "error" in header:
            raise UserCodeError(str(header["error"]))
        defined = header.get("defined")
        keywords = header.get("keywords")
        self.defined = {str(n) for n in defined} if isinstance(defined, list) else set()
        self.keywords = (
            {str(k): tuple(map(str, v)) for k, v in keywords.items() if isinstance(v, list)}
            if isinstance(keywords, dict)
            else {}
        )

    def close(self) -> None:
        """Stop the child (politely, then by force) and remove the temporary files."""
        if self._process is not None:
            if self._dead is None and self._process.poll() is None:
                with contextlib.suppress(OSError, UserCodeError):
                    self._deadline = min(self._deadline, time.monotonic() + 0.5)
                    self._send("stop", impl_worker.pack({"op": "stop"}))
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self._process.wait(0.5)
            if self._process.poll() is None:
                self._process.kill()
                self._process.wait()
            for stream in (self._process.stdin, self._process.stdout):
                if stream is not None:
                    with contextlib.suppress(OSError):
                        stream.close()
            self._process = None
        self._captured = self._read_output()
        self._dir.cleanup()

    def output(self) -> str:
        """What the user's code printed (stdout and stderr), truncated to OUTPUT_LIMIT."""
        text = getattr(self, "_captured", None)
        return self._read_output() if text is None else text

    def _read_output(self) -> str:
        try:
            with open(self._output, "rb") as f:
                data = f.read(4 * OUTPUT_LIMIT + 1)
                total = f.seek(0, os.SEEK_END)
        except OSError:
            return ""
        text = data.decode("utf-8", errors="replace")
        if len(text) > OUTPUT_LIMIT or total > len(data):
            text = text[:OUTPUT_LIMIT] + f"\n[... output truncated: {total} bytes in all]"
        return text

    # -- calls ---------------------------------------------------------------------------------

    def forward(self, binding: Binding, hparams: dict, x, w, b, z_shape: tuple) -> np.ndarray:
        """The user's z for x (n, *spatial, Cin), w (*kernel, Cin/groups, Cout), b (Cout,),
        all channels last (converted to and from the user's layout by ``binding.adapter``)."""
        adapter = binding.adapter
        shapes = {"z": adapter.user_shapes(x.shape, w.shape, z_shape)["z"]}
        header = binding.header("forward", shapes, hparams)
        (z,) = self._call(binding, binding.forward, header, adapter.to_user(x, w, b), shapes)
        return adapter.from_user("z", z)

    def backward(self, binding: Binding, hparams: dict, dz, x, w, b) -> tuple:
        """The user's (dx, dw, db), channels last, for upstream dz after a fresh forward on
        x, w, b; the backward runs twice on the same cache, and :attr:`repeat` holds the
        largest difference of each gradient between the two calls."""
        adapter = binding.adapter
        every = adapter.user_shapes(x.shape, w.shape, dz.shape)
        shapes = {role: every[role] for role in ("dx", "dw", "db")}
        header = binding.header("backward", shapes, hparams)
        function = binding.backward or binding.forward
        arrays = adapter.to_user(x, w, b, dz)
        dx, dw, db = self._call(binding, function, header, arrays, shapes)
        return adapter.from_user("dx", dx), adapter.from_user("dw", dw), db.reshape(-1)

    def _call(
        self, binding: Binding, function: str, header: dict, arrays: dict, shapes: dict
    ) -> list:
        if self._dead is not None:
            raise UserCodeError(self._dead)
        self.calls += 1
        self._send(function, impl_worker.pack(header, arrays))
        limit = sum(8 * int(np.prod(s)) + 1024 for s in shapes.values()) + (1 << 16)
        answer, received = self._receive(function, limit)
        if "error" in answer:
            raise UserCodeError(str(answer["error"])[:1000].splitlines()[0])
        if "internal" in answer:
            raise CheckerError(str(answer["internal"])[:1000].splitlines()[0])
        dtypes = answer.get("dtypes")
        self.dtypes = (
            {str(k): str(v) for k, v in dtypes.items()} if isinstance(dtypes, dict) else {}
        )
        repeat = answer.get("repeat")
        self.repeat = {
            str(k): float(v)
            for k, v in (repeat.items() if isinstance(repeat, dict) else ())
            if isinstance(v, (int, float))
        }
        results = []
        for role, shape in shapes.items():
            value = received.get(role)
            name = binding.name(role)
            if value is None or value.dtype != np.float64:
                raise self._die(f"{function}: the child process sent no float64 {name}")
            if value.size != int(np.prod(shape)):
                raise UserCodeError(f"{name} has shape {value.shape}, expected {tuple(shape)}")
            if value.shape != tuple(shape) and not (role == "db" and value.size == shape[-1]):
                raise UserCodeError(f"{name} has shape {value.shape}, expected {tuple(shape)}")
            bad = ~np.isfinite(value)
            if bad.any():
                first = [int(i) for i in np.argwhere(bad)[0]]
                raise UserCodeError(
                    f"{name} has {int(bad.sum())} NaN/Inf values (first at {first})"
                )
            results.append(value.reshape(shape))
        return results

    # -- the pipe ------------------------------------------------------------------------------

    def _remaining(self) -> float:
        return max(0.0, self._deadline - time.monotonic())

    def _send(self, function: str, data: bytes) -> None:
        view = memoryview(impl_worker.LENGTH.pack(len(data)) + data)
        fd = self._pipe(function, self._running(function).stdin)
        while view:
            _, ready, _ = select.select([], [fd], [], self._remaining())
            if not ready:
                raise self._timed_out(function)
            try:
                view = view[os.write(fd, view[: 1 << 16]) :]
            except OSError:  # the child is gone
                raise self._died(function) from None

    def _read(self, function: str, size: int) -> bytes:
        fd = self._pipe(function, self._running(function).stdout)
        chunks, left = [], size
        while left:
            ready, _, _ = select.select([fd], [], [], self._remaining())
            if not ready:
                raise self._timed_out(function)
            chunk = os.read(fd, min(left, 1 << 20))
            if not chunk:
                raise self._died(function)
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)

    def _receive(self, function: str, limit: int) -> tuple[dict, dict]:
        (length,) = impl_worker.LENGTH.unpack(self._read(function, impl_worker.LENGTH.size))
        if length > limit:
            raise self._die(f"{function}: the child process sent an answer larger than expected")
        data = self._read(function, length)
        try:
            return impl_worker.unpack(data)
        except (ValueError, UnicodeDecodeError) as error:
            raise self._die(
                f"{function}: the child process sent a malformed answer ({error})"
            ) from None

    def _running(self, function: str) -> subprocess.Popen:
        """The child process, once launched and until closed."""
        if self._process is None:
            raise UserCodeError(f"{function}: the child process is not running")
        return self._process

    @staticmethod
    def _pipe(function: str, stream: IO[bytes] | None) -> int:
        """The file descriptor of one of the child's pipes (stdin and stdout are pipes)."""
        if stream is None:
            raise UserCodeError(f"{function}: the child process has no pipe to talk through")
        return stream.fileno()

    def _die(self, reason: str) -> UserCodeError:
        """Kill the child; later calls fail with the same reason."""
        if self._process is not None and self._process.poll() is None:
            self._process.kill()
            self._process.wait()
        self._dead = reason
        return UserCodeError(reason)

    def _timed_out(self, function: str) -> UserCodeError:
        if self._process is not None:
            with contextlib.suppress(OSError):
                self._process.send_signal(signal.SIGUSR1)  # faulthandler dumps the stack
                self._wait_for_fault()
        where = self._where()
        seconds = f"{self.timeout:g}"
        return self._die(f"{function} timed out after {seconds} s{where}")

    def _wait_for_fault(self) -> None:
        for _ in range(50):
            if self._fault.exists() and "File " in self._fault.read_text(errors="replace"):
                return
            time.sleep(0.01)

    def _died(self, function: str) -> UserCodeError:
        code: int | None = None
        if self._process is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                code = self._process.wait(5)
        fault = self._fault_text()
        marks = [line for line in fault.splitlines() if line.startswith(impl_worker.EXIT_MARK)]
        if marks:
            reason = f"{function} called {marks[-1][len(impl_worker.EXIT_MARK) :]}"
        elif code is not None and code < 0:
            try:
                name = signal.Signals(-code).name
            except ValueError:
                name = f"signal {-code}"
            reason = f"{function} crashed ({name}){self._where()}"
        else:
            reason = f"{function} ended the process (exit status {code}){self._where()}"
        return self._die(reason)

    def _fault_text(self) -> str:
        try:
            return self._fault.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""

    def _where(self) -> str:
        """`` (impl.py line N)`` from faulthandler's dump: its first frame in the user's file."""
        for match in _FRAME.finditer(self._fault_text()):
            with contextlib.suppress(OSError):
                if Path(match["file"]).resolve() == self.path:
                    return f" ({self.path.name} line {match['line']})"
        return ""
