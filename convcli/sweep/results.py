"""The results file of a sweep: one JSON line per run, written so that no finished run is lost.

Each result is one JSON object (a *record*) keyed by its run's :meth:`~convcli.sweep.Sweep.key`,
so a resumed sweep skips what is done. Lines are appended (flushed and fsynced as each run
finishes) to ``.OUT.convcli-partial`` beside the results file ``OUT``, which is renamed over
it when the sweep ends or is interrupted; after a kill, the partial file is where a resumed
sweep continues, and the old results file is untouched. Continuing a file checks every line
first (:func:`scan_results`): each must be a record, and only a final record torn by a kill
is cut off before appending goes on. While a sweep writes, it holds an exclusive lock on
``.OUT.convcli-lock`` (:func:`lock_path`), so a second sweep on the same file is refused.
Results and partial files must be regular files (or not exist).

Every record has a ``"status"``: ``"passed"`` (every action finished and the gradient check,
if one was asked for, passed), ``"failed"`` (the gradient check ran and failed) or
``"errored"`` (an action raised, e.g. groups not dividing Cin, or the worker died; the
message is in ``"error"``). Every record also holds its spec's fingerprint
(:attr:`~convcli.sweep.Sweep.fingerprint`, as ``"spec_fingerprint"``), and resuming results
that another spec wrote is refused (:class:`SpecMismatchError`) unless ``append`` says to add
to them.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from convcli.errors import DataError, InputFileError, OutputError, OutputExistsError
from convcli.io.detect import regular_file_size
from convcli.io.writing import check_target
from convcli.sweep.schema import Sweep
from convcli.versioning import SCHEMA_VERSION

VERDICTS = ("passed", "failed", "errored")


class SpecMismatchError(DataError):
    """Resuming a results file that another spec wrote (or that has no spec fingerprints).

    Nothing was written. ``append`` adds this spec's runs to such results; ``force`` starts
    them over.
    """


class ResultsExistError(OutputExistsError):
    """The results file exists, or the partial file of an interrupted sweep beside it, and
    neither ``resume``, ``append`` nor ``force`` says what to do with it.

    ``interrupted``: whether it is the partial file of an interrupted sweep.
    """

    def __init__(self, message: str, *, interrupted: bool) -> None:
        self.interrupted = interrupted
        super().__init__(message, param="out")


def record_verdict(record: dict[str, Any]) -> str:
    """``"passed"``, ``"failed"`` or ``"errored"`` for one result record.

    Read from what the record holds, not only its status, so records written by an older
    convcli (status ``"ok"``, or ``"failed"`` for an exception) count correctly, and anything
    unrecognised counts as errored, never as passed.
    """
    gradcheck = record.get("gradcheck")
    if record.get("error") is not None or record.get("status") == "errored":
        return "errored"
    if "gradcheck" in record.get("actions", ()) and not isinstance(gradcheck, dict):
        return "errored"  # asked for, never recorded
    if gradcheck and gradcheck.get("passed") is not True:
        return "failed"
    if record.get("status") in ("passed", "ok"):
        return "passed"
    return "errored"


@dataclass(frozen=True)
class SweepSummary:
    """What a sweep did: counts, and every record (resumed ones included) in spec order.

    Attributes
    ----------
    spec, out : str
        The spec file and the results file.
    records : list of dict
        One record per distinct run of the spec, as the results file holds it.
    skipped : int
        Records that were already in the results file (resumed, not run again).
    seconds : float
        Wall time of the runs.
    fingerprint : str
        The spec's fingerprint.
    """

    spec: str
    out: str
    records: list[dict[str, Any]]
    skipped: int
    seconds: float
    fingerprint: str = ""

    @property
    def counts(self) -> dict[str, int]:
        """How many records passed, failed (a gradient check) and errored (an exception)."""
        verdicts = [record_verdict(r) for r in self.records]
        return {verdict: verdicts.count(verdict) for verdict in VERDICTS}

    @property
    def passed(self) -> bool:
        """True only when every configuration of the spec ran and passed."""
        return all(record_verdict(r) == "passed" for r in self.records)

    def to_json(self) -> dict[str, Any]:
        """The summary as plain JSON values: counts, verdicts and one line per record."""
        return {
            "command": "sweep",
            "spec": self.spec,
            "spec_fingerprint": self.fingerprint,
            "out": self.out,
            "total": len(self.records),
            "ran": len(self.records) - self.skipped,
            "skipped": self.skipped,
            "passed": self.passed,
            "counts": self.counts,
            "seconds": self.seconds,
            "results": [
                {
                    "key": r["key"],
                    "config": r["config"],
                    "status": record_verdict(r),
                    "error": r.get("error"),
                    "gradcheck_passed": r["gradcheck"]["passed"] if r.get("gradcheck") else None,
                    "gradcheck_mode": r["gradcheck"].get("mode") if r.get("gradcheck") else None,
                    "seconds": r.get("seconds"),
                }
                for r in self.records
            ],
        }


def partial_path(out: Path) -> Path:
    """Where a running sweep appends its results before they are renamed over ``out``."""
    return out.with_name(f".{out.name}.convcli-partial")


def lock_path(out: Path) -> Path:
    """The lock file a running sweep holds beside ``out``, so that only one writes it."""
    return out.with_name(f".{out.name}.convcli-lock")


@dataclass(frozen=True)
class ResultsContent:
    """What a results file holds, checked line by line.

    Attributes
    ----------
    records : dict of str to dict
        Every record by key (a later line with the same key wins).
    length : int
        Bytes of the file up to the end of its last complete record: what is kept when the
        file is continued (a torn final record, cut off by a kill, lies beyond it).
    newline : bool
        Whether the last complete record lacks its line end (to be added before appending).
    """

    records: dict[str, dict[str, Any]]
    length: int
    newline: bool


def read_results(path: Path) -> dict[str, dict[str, Any]]:
    """The records of a results file by key (see :func:`scan_results`); nothing is changed."""
    return scan_results(path).records


def scan_results(path: Path, name: Path | None = None) -> ResultsContent:
    """Read and check every line of the results file ``path``, changing nothing.

    Every complete line must be a record (a JSON object with a string ``"key"``, a
    ``"config"`` object and a string ``"status"``; see :func:`check_record`), the first line
    included: a file whose first line is not a record is not a convcli results file. Only
    the final line may be incomplete, and only if it is the start of a record torn by a kill
    (no line end, begins like a record, does not parse); it is left out. Lines are read at
    most :data:`MAX_RECORD_BYTES` at a time, so any file is read in bounded memory.

    Parameters
    ----------
    path : Path
        The file to read.
    name : Path, optional
        How messages call it (default ``path``).

    Raises
    ------
    InputFileError
        ``path`` is not a regular file, or cannot be read.
    ResultsContentError
        A line that is not a record (the message gives its number), or a first line that is
        not one.
    """
    name = name or path
    _check_readable(path)
    records: dict[str, dict[str, Any]] = {}
    length, number = 0, 0
    try:
        with open(path, "rb") as handle:
            while line := handle.readline(MAX_RECORD_BYTES + 1):
                number += 1
                complete = line.endswith(b"\n")
                record = _record(line)
                if record is None and not complete and number > 1 and _torn(line):
                    break  # a record torn by a kill: dropped when the file is continued
                if record is None:
                    raise _not_results(name, number, line)
                records[record["key"]] = record
                length += len(line)
                if not complete:
                    return ResultsContent(records, length, newline=True)
    except OSError as error:
        raise InputFileError(f"{name}: cannot read ({error.strerror or error})") from None
    return ResultsContent(records, length, newline=False)


class ResultsContentError(DataError):
    """A file given as sweep results that is not one (a line that is not a result record).

    ``line``: the number of the first such line. Nothing was written.
    """

    def __init__(self, message: str, *, line: int) -> None:
        self.line = line
        super().__init__(message, param="out")


MAX_RECORD_BYTES = 16 * 2**20  # a record is a few KiB; a longer line is not one
_RECORD_START = b'{"key": "'  # how every record convcli writes begins
# what a record's configuration must hold for the summary to show it
_SHOWN_CONFIG_KEYS = ("shape", "kernel", "cout", "stride", "pad", "dilation", "groups", "dtype")


def check_record(record: object) -> bool:
    """Whether ``record`` (a parsed JSON value) is a result record convcli can use: an object
    with a string ``key``, a ``config`` object holding at least shape and kernel (lists),
    cout, stride, pad, dilation, groups and dtype, a string ``status``, and where present a
    string or null ``error``, an ``actions`` list, a ``gradcheck`` object or null, and
    ``seconds`` a number or null."""
    if not isinstance(record, dict):
        return False
    optional = (
        ("error", (str, type(None))),
        ("actions", list),
        ("gradcheck", (dict, type(None))),
        ("seconds", (int, float, type(None))),
        ("spec_fingerprint", (str, type(None))),
    )
    config = record.get("config")
    return (
        isinstance(record.get("key"), str)
        and isinstance(config, dict)
        and all(key in config for key in _SHOWN_CONFIG_KEYS)
        and isinstance(config["shape"], list)
        and isinstance(config["kernel"], list)
        and isinstance(record.get("status"), str)
        and all(isinstance(record.get(k), kind) for k, kind in optional if k in record)
        and (not isinstance(record.get("gradcheck"), dict) or "passed" in record["gradcheck"])
    )


def _record(line: bytes) -> dict[str, Any] | None:
    """The record a line holds, or None."""
    try:
        record = json.loads(line)
    except (ValueError, RecursionError):
        return None
    return record if check_record(record) else None


def _torn(line: bytes) -> bool:
    """Whether an unfinished line (no line end) is the start of a record cut short by a kill:
    it begins as records do, and it is the end of the file (shorter than the read limit)."""
    return len(line) <= MAX_RECORD_BYTES and line.startswith(_RECORD_START[: len(line)])


def _write_all(handle: IO[bytes], data: bytes) -> None:
    """Write every byte of ``data`` to an unbuffered file (a short write is continued)."""
    view = memoryview(data)
    while view:
        count = handle.write(view)
        if not count:
            raise OSError(errno.EIO, "nothing written")
        view = view[count:]


def _not_results(name: Path, number: int, line: bytes) -> ResultsContentError:
    if number == 1:
        return ResultsContentError(
            f"{name}: not a convcli results file (its first line is not a result record); "
            "refusing to continue it",
            line=number,
        )
    what = "too long" if len(line) > MAX_RECORD_BYTES else "not a result record"
    return ResultsContentError(
        f"{name} line {number}: {what}; refusing to continue a results file that convcli "
        "did not write",
        line=number,
    )


def _check_readable(path: Path) -> None:
    """Refuse, without opening it, a results file that is not a regular file."""
    if path.is_dir():
        raise InputFileError(f"{path}: is a directory, not a results file")
    try:
        regular_file_size(path)
    except InputFileError:
        if path.is_symlink() and path.exists():
            raise InputFileError(
                f"{path}: not a regular file (links to {os.path.realpath(path)}); "
                "cannot read it as results"
            ) from None
        raise


def check_fingerprints(content: ResultsContent, out: Path, sweep: Sweep) -> None:
    """Refuse to resume results (``content``, of ``out``) unless ``sweep`` wrote every record.

    Raises
    ------
    SpecMismatchError
        Some records hold another spec's fingerprint, or none.
    """
    found = {record.get("spec_fingerprint") for record in content.records.values()}
    others = sorted(str(f) for f in found - {sweep.fingerprint} if f is not None)
    if not others and None not in found:
        return
    held = [f"results of spec {', '.join(others)}"] if others else []
    if None in found:
        held.append("records with no spec fingerprint (written by an older convcli)")
    raise SpecMismatchError(
        f"{out} holds {' and '.join(held)}, but {sweep.path} is spec "
        f"{sweep.fingerprint}; resuming continues only the spec that wrote the results"
    )


class ResultsBusyError(OutputError):
    """Another sweep holds the lock of this results file (it is writing it now)."""


class ResultsWriteError(OutputError):
    """Writing a record failed (a full disk, a file-size limit). The results file is as it
    was; ``kept`` says whether finished records were kept in the partial file to resume."""

    def __init__(self, message: str, *, kept: bool) -> None:
        self.kept = kept
        super().__init__(message, param="out")


class _Lock:
    """An exclusive ``flock`` on the lock file beside a results file, held while a sweep
    writes it. The kernel drops it when the process dies, so a killed sweep leaves no stale
    lock; the file is removed when the lock is released."""

    def __init__(self, out: Path) -> None:
        self.path = lock_path(out)
        for _ in range(10):  # another sweep may remove the file between open and lock
            self._fd = self._open(out)
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(self._fd)
                raise ResultsBusyError(
                    f"{out}: another sweep is writing these results now (it holds "
                    f"{self.path}); wait for it to finish",
                    param="out",
                ) from None
            except OSError as error:
                os.close(self._fd)
                raise OutputError(
                    f"{self.path}: cannot lock ({error.strerror})", param="out"
                ) from None
            if self._is_current():
                return
            os.close(self._fd)
        raise ResultsBusyError(f"{out}: other sweeps keep taking its lock", param="out")

    def _open(self, out: Path) -> int:
        flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0)
        try:
            fd = os.open(self.path, flags, 0o644)
        except OSError as error:
            raise OutputError(
                f"{self.path}: cannot create the lock of {out} ({error.strerror})", param="out"
            ) from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise OutputError(f"{self.path}: exists and is not a regular file", param="out")
        return fd

    def _is_current(self) -> bool:
        """Whether the locked file is still the one at the lock's path."""
        try:
            here = os.stat(self.path, follow_symlinks=False)
        except OSError:
            return False
        mine = os.fstat(self._fd)
        return (here.st_dev, here.st_ino) == (mine.st_dev, mine.st_ino)

    def release(self) -> None:
        """Remove the lock file, then unlock (in this order, so no one locks a removed file
        and believes it holds the lock)."""
        with contextlib.suppress(OSError):
            os.unlink(self.path)
        os.close(self._fd)


class ResultsFile:
    """The results of one sweep while it runs: the records already there, and the partial
    file new ones are appended to.

    Open it with :func:`open_results`; use it as a context manager, or call :meth:`close`,
    which renames the partial file over the results file (also when the sweep is
    interrupted, so every finished record reaches it) and releases the lock. If nothing new
    was written, the results file is left as it was; if writing failed (a full disk), the
    results file is left as it was and the finished records stay in the partial file.

    Attributes
    ----------
    out : Path
        The results file.
    partial : Path
        Where records are appended until :meth:`close` (:func:`partial_path`).
    done : dict of str to dict
        Every record in the file by key: those resumed, then those written.
    fingerprint : str
        The spec's fingerprint, added to every record written.
    """

    def __init__(
        self,
        out: Path,
        handle: IO[bytes],
        done: dict[str, dict[str, Any]],
        fingerprint: str,
        *,
        lock: _Lock | None = None,
        fresh: bool = True,
    ) -> None:
        self.out = out
        self.partial = partial_path(out)
        self.done = done
        self.fingerprint = fingerprint
        self._handle = handle
        self._lock = lock
        self._fresh = fresh  # the partial file was made by this sweep from what ``out`` holds
        self._written = 0
        self._failed = False

    def write(self, record: dict[str, Any]) -> None:
        """Append one record (with the spec's fingerprint and the schema version added),
        flushed and fsynced.

        Raises
        ------
        ResultsWriteError
            The record could not be written (the partial file is cut back to its last
            complete record).
        """
        record["spec_fingerprint"] = self.fingerprint
        record["schema_version"] = SCHEMA_VERSION  # last: records begin with their key
        line = (json.dumps(record) + "\n").encode()
        end = self._handle.tell()
        try:
            _write_all(self._handle, line)
            os.fsync(self._handle.fileno())
        except OSError as error:
            self._failed = True
            with contextlib.suppress(OSError):
                os.ftruncate(self._handle.fileno(), end)
            kept = self._written > 0 or not self._fresh
            where = f"; finished results are kept in {self.partial}" if kept else ""
            raise ResultsWriteError(
                f"{self.out}: cannot write ({error.strerror or error}); the results file is "
                f"unchanged{where}",
                kept=kept,
            ) from None
        self._written += 1
        self.done[record["key"]] = record

    def close(self) -> None:
        """Close the partial file and rename it over the results file (unless nothing new
        is in it, or writing failed), then release the lock."""
        try:
            with contextlib.suppress(OSError):
                self._handle.close()
            if self._written == 0 and self._fresh:
                self.partial.unlink(missing_ok=True)  # holds nothing ``out`` lacks
            elif not self._failed:
                os.replace(self.partial, self.out)
                _fsync_folder(self.out.parent)
        finally:
            if self._lock is not None:
                self._lock.release()

    def __enter__(self) -> ResultsFile:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


def open_results(
    out: Path, sweep: Sweep, *, resume: bool = False, append: bool = False, force: bool = False
) -> ResultsFile:
    """Open ``out`` to receive the results of ``sweep``, holding its lock until closed.

    Parameters
    ----------
    out : Path
        The results file (JSON Lines).
    sweep : Sweep
        The spec whose runs are written.
    resume : bool
        Continue the results this spec wrote (from the partial file of an interrupted sweep
        if there is one).
    append : bool
        Like ``resume``, but the results may hold runs of other specs.
    force : bool
        Start the results over.

    Raises
    ------
    ResultsExistError
        ``out`` (or the partial file of an interrupted sweep) exists and neither ``resume``,
        ``append`` nor ``force`` is given.
    ResultsBusyError
        Another sweep is writing ``out``.
    InputFileError
        ``resume``: ``out`` or its partial file is not a regular file (a device, FIFO,
        socket, directory, or a link to one) or cannot be read.
    ResultsContentError
        ``resume``: a line of the results is not a result record; nothing is written.
    SpecMismatchError
        ``resume`` without ``append`` on results holding records of another spec (or records
        with no fingerprint); nothing is written.
    OutputError
        ``out`` or its partial file is the spec file, a directory or another non-regular
        file (even with ``force``), its folder does not exist, or it cannot be written.
    """
    resume = resume or append
    partial = partial_path(out)
    if resume:
        for path in (out, partial):
            if os.path.lexists(path):
                _check_readable(path)
    for path in (out, partial):
        check_target(path, force=True, protect=[sweep.path], param="out")
    lock = _Lock(out)
    try:
        return _open_locked(out, sweep, lock, resume=resume, append=append, force=force)
    except BaseException:
        lock.release()
        raise


def _open_locked(
    out: Path, sweep: Sweep, lock: _Lock, *, resume: bool, append: bool, force: bool
) -> ResultsFile:
    """:func:`open_results` once the lock is held."""
    partial = partial_path(out)
    if partial.exists() and not (resume or force):
        raise ResultsExistError(
            f"{partial} holds the results of an interrupted sweep", interrupted=True
        )
    if out.exists() and not (resume or force):
        raise ResultsExistError(f"{out} exists", interrupted=False)
    source = partial if partial.exists() else out if out.exists() else None
    content = ResultsContent({}, 0, newline=False)
    if resume and source is not None:
        content = scan_results(source)
        if not append:
            check_fingerprints(content, out, sweep)
    fresh = source is not partial or not resume
    try:
        if fresh:
            handle = _fresh_partial(partial, source, content)
        else:
            handle = open(partial, "r+b", buffering=0)  # noqa: SIM115  # closed by ResultsFile
            handle.truncate(content.length)  # only a torn final record goes
            handle.seek(content.length)
            if content.newline:
                _write_all(handle, b"\n")
    except OSError as error:
        raise OutputError(f"{out}: cannot write ({error.strerror or error})", param="out") from None
    return ResultsFile(
        out, handle, dict(content.records), sweep.fingerprint, lock=lock, fresh=fresh
    )


def _fresh_partial(partial: Path, source: Path | None, content: ResultsContent) -> IO[bytes]:
    """A new partial file holding the complete records of ``source`` (none to start over);
    removed again if that cannot be written in full."""
    partial.unlink(missing_ok=True)
    handle = open(partial, "xb", buffering=0)  # noqa: SIM115  # closed by ResultsFile
    try:
        if source is not None and content.length:
            with open(source, "rb") as old:
                remaining = content.length
                while remaining:
                    block = old.read(min(remaining, 2**20))
                    if not block:
                        raise OSError(errno.EIO, f"{source} shrank while being copied")
                    _write_all(handle, block)
                    remaining -= len(block)
            if content.newline:
                _write_all(handle, b"\n")
            os.fsync(handle.fileno())
    except BaseException:
        handle.close()
        partial.unlink(missing_ok=True)
        raise
    return handle


def _fsync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` durable (where the platform allows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
