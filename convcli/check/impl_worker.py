"""The child process that runs a user's functions, and nothing else, when checking a user's
implementation.

It runs as ``python -B impl_worker.py FILE OUTPUT FAULT MAX_MEMORY WANTED`` (a script, so the
``convcli`` package is not imported) with single-threaded BLAS. The parent
(:mod:`convcli.check.userproc`) writes requests to its stdin and reads answers from its stdout,
each a length-prefixed message in the format of :func:`pack`: a JSON header and plain
``.npy`` arrays, read with ``allow_pickle=False``; nothing the child sends is ever
unpickled. The child

- sends what the user's code printed (stdout and stderr, also from C) to a capture file;
- writes a Python traceback to a fault file on a crash (faulthandler) and on ``SIGUSR1``
  (the parent's time-out), and the line of any ``os._exit`` call;
- limits its own address space (``RLIMIT_AS``) when asked;
- turns anything the user's code raises, including ``SystemExit``, ``KeyboardInterrupt``
  and ``GeneratorExit``, into a one-line answer naming the exception and the line.

Only the standard library and NumPy are imported here: whatever the user's module patches
stays in this process, and the verdicts are computed in the parent.
"""

from __future__ import annotations

import contextlib
import faulthandler
import importlib.util
import inspect
import io
import json
import os
import signal
import struct
import sys
import traceback
from pathlib import Path

import numpy as np

MAGIC = b"CVC1"
LENGTH = struct.Struct(">Q")
EXIT_MARK = "convcli-exit: "
HPARAMS = ("stride", "padding", "dilation", "groups")


def pack(header: dict, arrays: dict | None = None) -> bytes:
    """A message: MAGIC, the JSON header's length and the header, then each array as .npy."""
    blobs, names = [], []
    for name, array in (arrays or {}).items():
        buffer = io.BytesIO()
        np.lib.format.write_array(buffer, np.ascontiguousarray(array), allow_pickle=False)
        blobs.append(buffer.getvalue())
        names.append([name, len(blobs[-1])])
    head = json.dumps({**header, "arrays": names}).encode()
    return MAGIC + struct.pack(">I", len(head)) + head + b"".join(blobs)


def unpack(data: bytes) -> tuple[dict, dict[str, np.ndarray]]:
    """The header and arrays of a message; ValueError when it is malformed.

    Arrays are read by NumPy's .npy reader with ``allow_pickle=False``: object arrays and
    anything else that would need unpickling are refused.
    """
    if data[:4] != MAGIC or len(data) < 8:
        raise ValueError("not a convcli message")
    (length,) = struct.unpack(">I", data[4:8])
    header = json.loads(data[8 : 8 + length].decode())
    if not isinstance(header, dict) or not isinstance(header.get("arrays"), list):
        raise ValueError("message header is not an object with arrays")
    offset, arrays = 8 + length, {}
    for entry in header.pop("arrays"):
        if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], str)):
            raise ValueError("bad array entry")
        name, size = entry
        if not isinstance(size, int) or size < 0 or offset + size > len(data):
            raise ValueError("array runs past the end of the message")
        arrays[name] = np.lib.format.read_array(
            io.BytesIO(data[offset : offset + size]), allow_pickle=False
        )
        offset += size
    if offset != len(data):
        raise ValueError("trailing bytes after the arrays")
    return header, arrays


def user_line(path: Path, frames) -> int | None:
    """The line of the innermost frame in the user's file, from (filename, lineno) pairs."""
    line = None
    for filename, lineno in frames:
        with contextlib.suppress(OSError):
            if Path(filename).resolve() == path:
                line = lineno
    return line


def describe(error: BaseException, path: Path) -> str:
    """``TypeError: message (impl.py line 12)``, citing the deepest frame in the user's file."""
    frames = [(f.filename, f.lineno) for f in traceback.extract_tb(error.__traceback__)]
    line = user_line(path, frames)
    where = f" ({path.name} line {line})" if line is not None else ""
    text = str(error).strip()
    if isinstance(error, SystemExit) and error.code is None:
        text = ""
    message = text.splitlines()[0][:300] if text else ""
    return f"{type(error).__name__}{': ' + message if message else ''}{where}"


def describe_internal(error: BaseException) -> str:
    """``TypeError: message (impl_worker.py line 262)``, citing the deepest frame of
    convcli's own code."""
    package = Path(__file__).resolve().parent.parent
    line = None
    for frame in traceback.extract_tb(error.__traceback__):
        with contextlib.suppress(OSError, ValueError):
            if Path(frame.filename).resolve().is_relative_to(package):
                line = f"{Path(frame.filename).name} line {frame.lineno}"
    text = str(error).strip()
    message = text.splitlines()[0][:300] if text else ""
    where = f" ({line})" if line else ""
    return f"{type(error).__name__}{': ' + message if message else ''}{where}"


class _Pipe:
    """Length-prefixed messages over two file descriptors (blocking; the child's side)."""

    def __init__(self, read_fd: int, write_fd: int):
        self.read_fd, self.write_fd = read_fd, write_fd

    def send_bytes(self, data: bytes) -> None:
        view = memoryview(LENGTH.pack(len(data)) + data)
        while view:
            view = view[os.write(self.write_fd, view) :]

    def recv_bytes(self) -> bytes:
        (length,) = LENGTH.unpack(self._read(LENGTH.size))
        return self._read(length)

    def _read(self, size: int) -> bytes:
        chunks, left = [], size
        while left:
            chunk = os.read(self.read_fd, min(left, 1 << 20))
            if not chunk:
                raise EOFError
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)


class _Child:
    def __init__(self, conn, path: Path, fault):
        self.conn, self.path, self.fault = conn, path, fault
        self.functions: dict = {}
        self.in_user_code = False
        self.raised_in_call = False  # the exception being handled came out of self.call
        self.current = "conv_forward"
        self.names: dict[str, str] = {}  # the user's names of z, dx, dw, db

    def send(self, header: dict, arrays: dict | None = None) -> None:
        self.conn.send_bytes(pack(header, arrays))

    def guard_exit(self) -> None:
        """Record where the user's code calls os._exit, then exit as asked."""
        real_exit = os._exit

        def _exit(code):
            if self.in_user_code:
                frames = [(f.filename, f.lineno) for f in traceback.extract_stack()]
                line = user_line(self.path, frames)
                where = f" ({self.path.name} line {line})" if line is not None else ""
                self.fault.write(f"{EXIT_MARK}os._exit({code!r}){where}\n")
                self.fault.flush()
            real_exit(code)

        os._exit = _exit

    def load(self, wanted: list[str]) -> tuple[str | None, dict]:
        """Run the user's file; (error or None, {"defined": [...], "keywords": {...}}): which
        of the ``wanted`` names it defines as callables, and the keyword parameters of each."""
        name = f"convcli_user_impl_{abs(hash(self.path))}"
        spec = importlib.util.spec_from_file_location(name, self.path)
        if spec is None or spec.loader is None:
            return f"{self.path}: cannot be loaded as a Python file", {}
        module = importlib.util.module_from_spec(spec)
        sys.path.insert(0, str(self.path.parent))
        sys.dont_write_bytecode = True
        self.in_user_code = True
        try:
            spec.loader.exec_module(module)
        except BaseException as error:
            return f"{self.path}: running it raised {describe(error, self.path)}", {}
        finally:
            self.in_user_code = False
        self.functions = {
            n: getattr(module, n) for n in wanted if callable(getattr(module, n, None))
        }
        return None, {
            "defined": sorted(self.functions),
            "keywords": {n: keywords(f) for n, f in self.functions.items()},
        }

    def call(self, name: str, *args, **kwargs):
        self.current = name
        self.in_user_code = True
        try:
            return self.functions[name](*args, **kwargs)
        except BaseException:
            self.raised_in_call = True
            raise
        finally:
            self.in_user_code = False

    def serve(self) -> None:
        while True:
            try:
                header, arrays = unpack(self.conn.recv_bytes())
            except EOFError:
                return
            if header.get("op") == "stop":
                return
            self.raised_in_call = False
            try:
                answer = self.answer(header, arrays)
            except _Failure as failure:
                self.send({"error": str(failure)})
            except BaseException as error:
                self.send(self.blame(error))
            else:
                dtypes, repeat, arrays = answer
                self.send({"ok": True, "dtypes": dtypes, "repeat": repeat}, arrays)

    def blame(self, error: BaseException) -> dict:
        """The answer for an exception out of :meth:`answer`: ``{"error": ...}`` when the
        user's code raised it (their function, or code of their file the checker called
        after it returned, e.g. a NumPy function they replaced) or memory ran out;
        ``{"internal": ...}`` when convcli's own code failed with no frame of theirs."""
        name = self.path.name
        if self.raised_in_call:
            return {"error": f"{self.current} raised {describe(error, self.path)}"}
        frames = [(f.filename, f.lineno) for f in traceback.extract_tb(error.__traceback__)]
        if user_line(self.path, frames) is not None:
            return {
                "error": f"code in {name} raised {describe(error, self.path)} when the "
                f"checker called it after {self.current} returned (does {name} change NumPy?)"
            }
        if isinstance(error, MemoryError):
            return {"error": f"MemoryError after {self.current} returned (its memory limit)"}
        return {
            "internal": f"the checker failed in the process running {name} after "
            f"{self.current} returned: {describe_internal(error)}; if {name} changes NumPy "
            "or Python itself, that is the cause, else it is a bug in convcli"
        }

    def answer(self, header: dict, arrays: dict) -> tuple[dict, dict, dict]:
        """The user's results for one request: (their own dtype names, the largest difference
        of each gradient between two backward calls, float64 arrays by role)."""
        forward, backward = str(header["forward"]), header.get("backward")
        self.names = {str(k): str(v) for k, v in header.get("names", {}).items()}
        inputs = {role: arrays[role] for role in ("x", "w", "b", "dz") if role in arrays}
        given = {role: array.copy() for role, array in inputs.items()}
        x, w, b = given["x"], given["w"], given["b"]
        keywords = _hparams(header)
        if header["calling"] == "keywords":
            result = self.call(forward, x, w, b, **keywords)
            cache = None
        else:
            result = self.call(forward, x, w, b, dict(keywords))
            if not isinstance(result, tuple) or len(result) != 2:
                raise _Failure(f"{forward} must return a tuple ({self.names.get('z', 'z')}, cache)")
            result, cache = result
        self.unchanged(forward, inputs, given)
        repeat: dict[str, float] = {}
        expect = header["expect"]
        if header["op"] == "forward":
            converted = {"z": self.convert("z", result, expect["z"])}
        else:
            outputs = self.backward(str(backward), header, cache, given)
            # converted (copied) now: a second call may write into the arrays it returned
            converted = {role: self.convert(role, v, expect[role]) for role, v in outputs.items()}
            self.unchanged(str(backward), inputs, given)
            again = self.backward(str(backward), header, cache, given)
            for role, (first, _) in converted.items():
                second = self.convert(role, again[role], expect[role])[0]
                repeat[role] = float(np.max(np.abs(first - second), initial=0.0))
        dtypes = {role: dtype for role, (_, dtype) in converted.items()}
        return dtypes, repeat, {role: array for role, (array, _) in converted.items()}

    def backward(self, name: str, header: dict, cache, given: dict) -> dict:
        """One call of the user's backward with a fresh copy of dz; results by role."""
        dz = given["dz"].copy()
        if header["calling"] == "keywords":
            grads = self.call(name, dz, given["x"], given["w"], given["b"], **_hparams(header))
        else:
            grads = self.call(name, dz, cache)
        if not isinstance(grads, (tuple, list)) or len(grads) != 3:
            dx, dw, db = (self.names.get(r, r) for r in ("dx", "dw", "db"))
            raise _Failure(f"{name} must return a tuple ({dx}, {dw}, {db})")
        if not np.array_equal(dz, given["dz"]):
            raise _Failure(f"{name} modified its input dz in place; work on a copy of it")
        return dict(zip(("dx", "dw", "db"), grads, strict=True))

    @staticmethod
    def unchanged(function: str, inputs: dict, given: dict) -> None:
        """_Failure when the user's code wrote into one of the arrays it was given."""
        for role in ("x", "w", "b"):
            if not np.array_equal(inputs[role], given[role], equal_nan=True):
                raise _Failure(f"{function} modified its input {role} in place; work on a copy")

    def convert(self, role: str, value, expected: list) -> tuple[np.ndarray, str]:
        role = self.names.get(role, role)
        try:
            return as_array(value, role, expected)
        except _Failure:
            raise
        except Exception as error:  # the user's own __array__ (or the like) raised
            reason = describe(error, self.path)
            raise _Failure(f"{role} cannot be read as an array: {reason}") from None


def keywords(function) -> list[str]:
    """The hyperparameter keywords ``function`` accepts (all of them with ``**kwargs``)."""
    try:
        parameters = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):
        return list(HPARAMS)
    if any(p.kind is p.VAR_KEYWORD for p in parameters):
        return list(HPARAMS)
    names = {p.name for p in parameters if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}
    return [h for h in HPARAMS if h in names]


class _Failure(Exception):
    """The user's function returned something unusable; the message says what."""


def as_array(value, what: str, expected: list) -> tuple[np.ndarray, str]:
    """``value`` as float64 and the name of its own dtype; refused when it is not a real
    floating-point array (None, objects, integers, complex, bool, strings, masked arrays),
    cannot be converted (its ``__array__`` or ``__len__`` raises) or is not the expected
    size."""
    if isinstance(value, np.ma.MaskedArray):
        raise _Failure(f"{what} is a masked array; return a plain array of real numbers")
    try:
        given = np.asarray(value)
    except (TypeError, ValueError):
        given = None
    if given is None or value is None or given.dtype.kind not in "fiu":
        if value is None:
            kind = "None"
        elif isinstance(value, np.ndarray):
            kind = f"an array of {value.dtype}"
        else:
            kind = f"a {type(value).__name__}"
        raise _Failure(f"{what} is {kind}, not an array of real numbers")
    if given.dtype.kind in "iu":
        raise _Failure(
            f"{what} is an array of {given.dtype}, not of floating-point numbers (an integer "
            "result has lost its fractions)"
        )
    if given.size != int(np.prod(expected)):
        raise _Failure(f"{what} has shape {given.shape}, expected {tuple(expected)}")
    return given.astype(np.float64), given.dtype.name


def _redirect_output(path: str) -> _Pipe:
    """Keep stdin/stdout as the message pipe (on new descriptors); fd 0 becomes /dev/null and
    fd 1, 2 (and sys.stdout/sys.stderr, line-buffered) the capture file."""
    pipe = _Pipe(os.dup(0), os.dup(1))
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    sys.stdout = open(1, "w", encoding="utf-8", errors="replace", buffering=1, closefd=False)  # noqa: SIM115
    sys.stderr = open(2, "w", encoding="utf-8", errors="replace", buffering=1, closefd=False)  # noqa: SIM115
    return pipe


def _limit_memory(extra_bytes: int | None) -> None:
    """RLIMIT_AS: what the process maps now plus ``extra_bytes`` (Linux; elsewhere no-op)."""
    if not extra_bytes:
        return
    import resource

    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/statm", encoding="ascii") as statm:
            pages = int(statm.read().split()[0])
        now = pages * os.sysconf("SC_PAGE_SIZE")
        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        limit = now + extra_bytes
        if hard != resource.RLIM_INFINITY:
            limit = min(limit, hard)
        resource.setrlimit(resource.RLIMIT_AS, (limit, hard))


def _hparams(header: dict) -> dict:
    """The request's hyperparameters, per-axis values as tuples (JSON carries lists):
    ``stride=(1, 2)``, ``padding=((1, 0), (0, 2))``."""

    def tupled(value):
        return tuple(tupled(v) for v in value) if isinstance(value, list) else value

    return {str(name): tupled(value) for name, value in header.get("hparams", {}).items()}


def main(argv: list[str]) -> None:
    """``FILE OUTPUT FAULT MAX_MEMORY WANTED``: load FILE (WANTED: a JSON list of the
    function names to look for), then answer requests until told to stop."""
    path, output, fault, max_memory, wanted = argv
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C stops the parent, which kills us
    conn = _redirect_output(output)
    fault_file = open(fault, "w", encoding="utf-8")  # noqa: SIM115 - open until the process ends
    faulthandler.enable(file=fault_file, all_threads=True)
    faulthandler.register(signal.SIGUSR1, file=fault_file, all_threads=True)
    _limit_memory(int(max_memory) or None)
    child = _Child(conn, Path(path).resolve(), fault_file)
    child.guard_exit()
    error, found = child.load(json.loads(wanted))
    child.send({"error": error} if error else {"ready": True, **found})
    if error is None:
        child.serve()
    sys.stdout.flush()
    sys.stderr.flush()


if __name__ == "__main__":
    del sys.path[0]  # this script's folder (convcli/): the user's imports must not see it
    main(sys.argv[1:])
