"""The results file of a sweep: one JSON line per run, written so that no finished run is lost.

Each result is one JSON object (a *record*) keyed by its run's :meth:`~convcli.sweep.Sweep.key`,
so a resumed sweep skips what is done. Lines are appended (flushed and fsynced as each run
finishes) to ``.OUT.convcli-partial`` beside the results file ``OUT``, which is renamed over
it when the sweep ends or is interrupted; after a kill, the partial file is where a resumed
sweep continues, and the old results file is untouched. A line torn by a kill is cut off
before appending goes on.

Every record has a ``"status"``: ``"passed"`` (every action finished and the gradient check,
if one was asked for, passed), ``"failed"`` (the gradient check ran and failed) or
``"errored"`` (an action raised, e.g. groups not dividing Cin, or the worker died; the
message is in ``"error"``). Every record also holds its spec's fingerprint
(:attr:`~convcli.sweep.Sweep.fingerprint`, as ``"spec_fingerprint"``), and resuming results
that another spec wrote is refused (:class:`SpecMismatchError`) unless ``append`` says to add
to them.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from convcli.errors import DataError, OutputError, OutputExistsError
from convcli.sweep.schema import Sweep

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


def read_results(out: Path) -> dict[str, dict[str, Any]]:
    """Finished records in a results file, by key. A torn last line (the process was killed
    while writing it) is cut off the file, so appending goes on from a clean line end."""
    data = out.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        with open(out, "r+b") as handle:
            handle.truncate(end)
    return parse_results(data[:end])


def parse_results(data: bytes) -> dict[str, dict[str, Any]]:
    """The complete records (JSON objects with a ``"key"``) in JSON Lines ``data``, by key.

    Lines that are not such objects are skipped, and so is a last line with no line end.
    """
    records: dict[str, dict[str, Any]] = {}
    end = data.rfind(b"\n") + 1
    for line in data[:end].splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and "key" in record:
            records[record["key"]] = record
    return records


def check_fingerprints(source: Path, out: Path, sweep: Sweep) -> None:
    """Refuse to resume ``source`` (results for ``out``) unless ``sweep`` wrote every record.

    Raises
    ------
    SpecMismatchError
        Some records hold another spec's fingerprint, or none.
    OutputError
        ``source`` cannot be read.
    """
    try:
        records = parse_results(source.read_bytes())
    except OSError as error:
        raise OutputError(f"{out}: cannot read ({error.strerror})", param="out") from None
    found = {record.get("spec_fingerprint") for record in records.values()}
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


class ResultsFile:
    """The results of one sweep while it runs: the records already there, and the partial
    file new ones are appended to.

    Open it with :func:`open_results`; use it as a context manager, or call :meth:`close`,
    which renames the partial file over the results file (also when the sweep is
    interrupted, so every finished record reaches it).

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
        handle: IO[str],
        done: dict[str, dict[str, Any]],
        fingerprint: str,
    ) -> None:
        self.out = out
        self.partial = partial_path(out)
        self.done = done
        self.fingerprint = fingerprint
        self._handle = handle

    def write(self, record: dict[str, Any]) -> None:
        """Append one record (with the spec's fingerprint added), flushed and fsynced."""
        record["spec_fingerprint"] = self.fingerprint
        self._handle.write(json.dumps(record) + "\n")
        self._handle.flush()
        os.fsync(self._handle.fileno())
        self.done[record["key"]] = record

    def close(self) -> None:
        """Close the partial file and rename it over the results file."""
        try:
            self._handle.close()
        finally:
            os.replace(self.partial, self.out)
            _fsync_folder(self.out.parent)

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
    """Open ``out`` to receive the results of ``sweep``.

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
    SpecMismatchError
        ``resume`` without ``append`` on results holding records of another spec (or records
        with no fingerprint); nothing is written.
    OutputError
        ``out`` is the spec file or a folder, its folder does not exist, or it cannot be
        written.
    """
    resume = resume or append
    _check_target(out, sweep.path)
    partial = partial_path(out)
    if partial.exists() and not (resume or force):
        raise ResultsExistError(
            f"{partial} holds the results of an interrupted sweep", interrupted=True
        )
    if out.exists() and not (resume or force):
        raise ResultsExistError(f"{out} exists", interrupted=False)
    source = partial if partial.exists() else out
    if resume and not append and source.exists():
        check_fingerprints(source, out, sweep)
    try:
        if resume and not partial.exists() and out.exists():
            shutil.copyfile(out, partial)
        if not resume:
            partial.unlink(missing_ok=True)
        done = read_results(partial) if partial.exists() else {}
        handle = open(partial, "a", encoding="utf-8")  # noqa: SIM115  # closed by ResultsFile
    except OSError as error:
        raise OutputError(f"{out}: cannot write ({error.strerror})", param="out") from None
    return ResultsFile(out, handle, done, sweep.fingerprint)


def _check_target(out: Path, spec: Path) -> None:
    """Refuse results files that cannot be: the spec itself, a folder, in no folder."""
    if out.resolve() == spec.resolve():
        raise OutputError(f"{out}: refusing to write results over the spec file", param="out")
    if out.is_dir():
        raise OutputError(f"{out}: is a directory", param="out")
    if not out.parent.is_dir():
        raise OutputError(f"{out}: folder {out.parent} does not exist", param="out")


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
