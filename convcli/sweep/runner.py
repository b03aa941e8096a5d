"""Batch experiments (``convcli sweep SPEC.toml``): many configurations, results as JSON Lines.

A spec is a TOML file::

    actions = ["forward", "backward", "gradcheck"]   # what to do per configuration

    [gradcheck]                 # options of the gradcheck action (all optional)
    mode = "auto"               # auto | exhaustive | sample | fast
    samples = 64
    probes = 8

    [defaults]                  # values for every configuration (all optional)
    dtype = "float64"           # float32 | float64
    seed = 0
    stride = 1                  # int or [sh, sw]
    pad = 0                     # int, [ph, pw], [top, bottom, left, right], "same", "valid"
    dilation = 1
    groups = 1

    [[configs]]                 # configurations listed one by one ...
    shape = [2, 8, 8, 3]        # x: [n, H, W, Cin]
    kernel = 3                  # int or [kh, kw]
    cout = 4

    [grid]                      # ... and/or the product of value lists
    shape = [[2, 8, 8, 3], [1, 7, 5, 4]]
    kernel = [1, 3]
    cout = [4]
    pad = [0, 1, "same"]

Every configuration gets random float inputs from its seed, in its dtype. Each result is one
JSON line keyed by a hash of what was run, so ``--resume`` can skip what is done. Lines are
appended (flushed and fsynced as each run finishes) to ``.OUT.convcli-partial`` beside the
results file, which is renamed over it when the sweep ends or is interrupted; after a kill,
the partial file is where ``--resume`` continues, and the old results file is untouched.

Every record has a ``"status"``: ``"passed"`` (every action finished and the gradient check,
if one was asked for, passed), ``"failed"`` (the gradient check ran and failed) or
``"errored"`` (an action raised, e.g. groups not dividing Cin, or the worker died; the
message is in ``"error"``). The sweep goes on either way; it passes only when every record
passed. Every record also holds its spec's fingerprint (:attr:`Sweep.fingerprint`), and
resuming results that another spec wrote is refused unless ``append`` says to add to them.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from convcli.errors import ConvcliError, DataError, OutputError, UsageError
from convcli.spec import ConvSpec

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ACTIONS = ("forward", "backward", "gradcheck")
CONFIG_KEYS = (
    "shape",
    "kernel",
    "cout",
    "stride",
    "pad",
    "dilation",
    "groups",
    "padding_mode",
    "layout",
    "dtype",
    "seed",
)
DEFAULTS = {
    "stride": 1,
    "pad": 0,
    "dilation": 1,
    "groups": 1,
    "padding_mode": "zeros",
    "layout": "nhwc",
    "dtype": "float64",
    "seed": 0,
}
GRADCHECK_KEYS = {
    "mode": str,
    "samples": int,
    "probes": int,
    "eps": float,
    "rtol": float,
    "atol": float,
}
TOP_KEYS = {"actions", "gradcheck", "defaults", "configs", "grid"}


VERDICTS = ("passed", "failed", "errored")


class SpecError(DataError):
    """A sweep spec that cannot be used; the message names the file and line."""


class SpecMismatchError(DataError):
    """Resuming a results file that another spec wrote (or that has no spec fingerprints)."""


@dataclass(frozen=True)
class Sweep:
    """A parsed spec: the configurations (dicts of CONFIG_KEYS) and what to do with each."""

    path: Path
    configs: tuple[dict, ...]
    actions: tuple[str, ...]
    gradcheck: dict = field(default_factory=dict)

    def key(self, config: dict) -> str:
        """Stable key of one run: a hash of its configuration, actions and gradcheck options."""
        what = {
            "config": _per_axis(config),
            "actions": list(self.actions),
            "gradcheck": self.gradcheck if "gradcheck" in self.actions else None,
        }
        return _digest(what)

    @property
    def fingerprint(self) -> str:
        """A hash of what the spec asks to run: the set of its runs' keys (16 hex digits).

        Each key hashes a normalised configuration, the actions and the gradcheck options
        (defaults filled in), so comments, whitespace, key order, the order of the
        configurations, ``kernel = 3`` versus ``[3, 3]`` (likewise stride, pad and dilation:
        one value, one per axis, or before/after pairs that say the same) and defaults spelled
        out or left out do not change it; any change to what would run does.
        """
        return _digest(sorted({self.key(config) for config in self.configs}))


def _per_axis(config: dict) -> dict:
    """``config`` with stride and dilation one value per spatial axis and pad as
    ``[[before, after], ...]`` (or ``"same"``), so equal runs spelled differently share a key.
    A configuration whose values do not fit its rank is left as written (it will fail)."""
    rank = len(config["shape"]) - 2
    try:
        spec = ConvSpec(stride=config["stride"], padding=config["pad"], dilation=config["dilation"])
        stride, dilation = spec.per_axis(rank)
        padding = spec.explicit_padding(rank)
    except ConvcliError:
        return config
    pad = padding if isinstance(padding, str) else [list(pair) for pair in padding]
    return {**config, "stride": list(stride), "dilation": list(dilation), "pad": pad}


def _digest(value) -> str:
    text = json.dumps(value, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# Reading a spec
# ---------------------------------------------------------------------------------------------


def load_sweep(path) -> Sweep:
    """Parse and check a sweep spec.

    Raises
    ------
    InputFileError
        The file is missing or unreadable.
    SpecError
        TOML syntax errors, unknown keys, wrong types or values; the message cites the line.
    """
    from convcli.io.tensorfile import _regular_file_size

    path = Path(path)
    _regular_file_size(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise SpecError(f"{path}: not a UTF-8 text file ({error.reason})") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise SpecError(f"{path}: {error}") from None
    checker = _Checker(path, text)
    checker.keys(data, TOP_KEYS, "the top level")
    actions = data.get("actions", ["forward", "gradcheck"])
    if not isinstance(actions, list) or not actions or any(a not in ACTIONS for a in actions):
        checker.fail("actions", f"actions must be a list of {', '.join(ACTIONS)}, got {actions!r}")
    gradcheck = data.get("gradcheck", {})
    checker.table(gradcheck, "gradcheck")
    checker.sources = dict.fromkeys(gradcheck, ("gradcheck", 0))
    checker.keys(gradcheck, set(GRADCHECK_KEYS), "[gradcheck]")
    for name, kind in GRADCHECK_KEYS.items():
        if name in gradcheck and not _is(gradcheck[name], kind):
            checker.fail(
                name, f"gradcheck {name} must be a {kind.__name__}, got {gradcheck[name]!r}"
            )
    for name, low, strict in (
        ("eps", 0, True),
        ("rtol", 0, False),
        ("atol", 0, False),
        ("samples", 1, False),
        ("probes", 1, False),
    ):
        value = gradcheck.get(name)
        if value is not None and (value <= low if strict else value < low):
            bound = f"> {low}" if strict else f">= {low}"
            checker.fail(name, f"gradcheck {name} must be {bound}, got {value!r}")
    from convcli.check.gradients import DEFAULT_PROBES, DEFAULT_SAMPLES, MODES
    from convcli.check.tolerance import Tolerance

    if "mode" in gradcheck and gradcheck["mode"] not in MODES:
        checker.fail("mode", f"gradcheck mode must be one of {', '.join(MODES)}")
    default = Tolerance()
    gradcheck = {  # normalised: every option, floats as floats (keys and fingerprints use it)
        "mode": gradcheck.get("mode", "auto"),
        "samples": gradcheck.get("samples", DEFAULT_SAMPLES),
        "probes": gradcheck.get("probes", DEFAULT_PROBES),
        "eps": float(gradcheck.get("eps", default.eps)),
        "rtol": float(gradcheck.get("rtol", default.rtol)),
        "atol": float(gradcheck.get("atol", default.atol)),
    }
    defaults = dict(DEFAULTS)
    given_defaults = data.get("defaults", {})
    checker.table(given_defaults, "defaults")
    checker.keys(given_defaults, set(CONFIG_KEYS), "[defaults]", ("defaults", 0))
    defaults.update(given_defaults)
    default_sources: dict[str, SpecTable] = dict.fromkeys(given_defaults, ("defaults", 0))

    configs = []  # (configuration, the table each of its keys came from)
    listed = data.get("configs", [])
    if not isinstance(listed, list) or not all(isinstance(c, dict) for c in listed):
        checker.fail("configs", "[[configs]] must be a list of tables")
    for index, entry in enumerate(listed):
        source = ("configs", index)
        checker.keys(entry, set(CONFIG_KEYS), "[[configs]]", source)
        configs.append((defaults | entry, default_sources | dict.fromkeys(entry, source)))
    grid = data.get("grid", {})
    checker.table(grid, "grid")
    checker.keys(grid, set(CONFIG_KEYS), "[grid]", ("grid", 0))
    if grid:
        for name, values in grid.items():
            if not isinstance(values, list) or not values:
                checker.fail(name, f"grid {name} must be a non-empty list of values", ("grid", 0))
        names = list(grid)
        grid_sources = default_sources | dict.fromkeys(names, ("grid", 0))
        for combination in itertools.product(*(grid[name] for name in names)):
            configs.append((defaults | dict(zip(names, combination, strict=True)), grid_sources))
    if not configs:
        raise SpecError(f"{path}: no configurations: add [[configs]] tables or a [grid]")
    checked = tuple(checker.config(config, sources) for config, sources in configs)
    actions = tuple(a for a in ACTIONS if a in actions)  # normalised: one order, no repeats
    return Sweep(path=path, configs=checked, actions=actions, gradcheck=gradcheck)


def _is(value, kind) -> bool:
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, kind) and not isinstance(value, bool)


# a table of the spec: ("configs", i) for the i-th [[configs]] (from 0), ("grid", 0), ...
SpecTable = tuple[str, int]


class _Checker:
    """Type checks of a parsed spec, with errors that cite the table, key and line that hold
    a bad value (``sources`` says which table each key of the configuration in hand came from)."""

    def __init__(self, path: Path, text: str):
        self.path = path
        self.lines = text.splitlines()
        self.sources: dict[str, SpecTable] = {}

    def _header_line(self, table: SpecTable) -> int | None:
        name, index = table
        header = f"[[{name}]]" if name == "configs" else f"[{name}]"
        seen = -1
        for number, line in enumerate(self.lines, start=1):
            if line.split("#", 1)[0].strip() == header:
                seen += 1
                if seen == index:
                    return number
        return None

    def line_of(self, key: str, table: SpecTable | None = None) -> int | None:
        """The line holding ``key`` in ``table`` (the key's source by default), else the
        table's header line; for top-level keys, the first line that sets ``key``."""
        table = table or self.sources.get(key)
        header = self._header_line(table) if table else None
        for number in range(header + 1 if header else 1, len(self.lines) + 1):
            stripped = self.lines[number - 1].strip()
            if header and stripped.startswith("["):
                break  # the next table begins
            if stripped.startswith((f"{key} ", f"{key}=", f"[{key}]", f"[[{key}]]")):
                return number
        return header

    def where(self, key: str, table: SpecTable | None = None) -> str:
        """``spec.toml line 12 ([[configs]] table 2, key 'stride')``."""
        table = table or self.sources.get(key)
        line = self.line_of(key, table)
        where = f"{self.path} line {line}" if line else str(self.path)
        if table is not None:
            name, index = table
            label = f"[[configs]] table {index + 1}" if name == "configs" else f"[{name}]"
            where += f" ({label}, key {key!r})"
        return where

    def fail(self, key: str, message: str, table: SpecTable | None = None):
        raise SpecError(f"{self.where(key, table)}: {message}")

    def table(self, value, name: str) -> None:
        if not isinstance(value, dict):
            self.fail(name, f"{name} must be a table")

    def keys(self, table: dict, allowed: set, where: str, source: SpecTable | None = None) -> None:
        for key in table:
            if key not in allowed:
                self.fail(
                    key,
                    f"unknown key {key!r} in {where}; expected one of {', '.join(sorted(allowed))}",
                    source,
                )

    def config(self, config: dict, sources: dict[str, SpecTable]) -> dict:
        """One configuration with every key checked and normalised to plain JSON values;
        ``sources`` maps each key to the table that set it (none for built-in defaults)."""
        from convcli.hparams import from_file_value

        self.sources = sources

        for required in ("shape", "kernel", "cout"):
            if required not in config:
                raise SpecError(f"{self.path}: a configuration has no {required!r}: {config}")
        shape = config["shape"]
        if not (
            isinstance(shape, list)
            and 3 <= len(shape) <= 5
            and all(_is(v, int) and v > 0 for v in shape)
        ):
            self.fail(
                "shape", f"shape must be [n, *spatial, Cin] of positive integers, got {shape!r}"
            )
        rank = len(shape) - 2
        kernel = config["kernel"]
        kernel = [kernel] * rank if _is(kernel, int) else kernel
        if not (
            isinstance(kernel, list)
            and len(kernel) == rank
            and all(_is(v, int) and v > 0 for v in kernel)
        ):
            self.fail(
                "kernel",
                f"kernel must be an integer or one per spatial axis, got {config['kernel']!r}",
            )
        if not (_is(config["cout"], int) and config["cout"] > 0):
            self.fail("cout", f"cout must be a positive integer, got {config['cout']!r}")
        if config["dtype"] not in ("float32", "float64"):
            self.fail("dtype", f"dtype must be 'float32' or 'float64', got {config['dtype']!r}")
        if not _is(config["seed"], int):
            self.fail("seed", f"seed must be an integer, got {config['seed']!r}")
        normalised = {"shape": shape, "kernel": kernel, "cout": config["cout"]}
        for name, key in (
            ("stride", "stride"),
            ("padding", "pad"),
            ("dilation", "dilation"),
            ("groups", "groups"),
            ("padding_mode", "padding_mode"),
            ("layout", "layout"),
        ):
            try:
                value = from_file_value(name, config[key], self.where(key))
            except ConvcliError as error:
                raise SpecError(str(error)) from None
            normalised[key] = _plain(value)
        normalised["dtype"] = config["dtype"]
        normalised["seed"] = config["seed"]
        return normalised


def _plain(value):
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value


# ---------------------------------------------------------------------------------------------
# Running one configuration (in this process, a worker process, or a Dask worker)
# ---------------------------------------------------------------------------------------------


def run_config(config: dict, actions, gradcheck_options: dict, key: str) -> dict:
    """Run the actions on one configuration and return its result record.

    Never raises for a bad configuration or a failing run: the record's ``"status"`` is
    ``"errored"`` with a one-line ``"error"`` when an action raised, ``"failed"`` when the
    gradient check ran and failed, and ``"passed"`` otherwise.
    """
    from convcli.check import Tolerance, gradcheck
    from convcli.engine.fast import conv_backward, conv_forward
    from convcli.generate import generate_layer
    from convcli.spec import ConvSpec
    from convcli.stats import summarize

    record = {
        "key": key,
        "config": config,
        "actions": list(actions),
        "status": "passed",
        "error": None,
    }
    start = time.perf_counter()
    try:
        pad = config["pad"]
        spec = ConvSpec(
            stride=_hparam(config["stride"]),
            padding=_hparam(pad),
            dilation=_hparam(config["dilation"]),
            groups=config["groups"],
            padding_mode=config.get("padding_mode", "zeros"),
            layout=config.get("layout", "nhwc"),
        )
        tensors, _ = generate_layer(
            config["shape"],
            config["kernel"],
            config["cout"],
            spec,
            seed=config["seed"],
            dtype=config["dtype"],
        )
        x, w, b = tensors["x"], tensors["w"], tensors["b"]  # in the configuration's layout
        record["hparams"] = spec.geometry(x.shape, w.shape).hparams()
        if "forward" in actions or "backward" in actions:
            began = time.perf_counter()
            z, cache = conv_forward(x, w, b, spec)
            record["forward"] = {"z": summarize(z), "seconds": time.perf_counter() - began}
        if "backward" in actions:
            import numpy as np

            dz = np.random.default_rng(config["seed"] + 1).standard_normal(z.shape).astype(z.dtype)
            began = time.perf_counter()
            dx, dw, db = conv_backward(dz, cache)
            record["backward"] = {
                "dx": summarize(dx),
                "dw": summarize(dw),
                "db": summarize(db),
                "seconds": time.perf_counter() - began,
            }
        if "gradcheck" in actions:
            options = dict(gradcheck_options)
            tolerance = Tolerance(
                **{k: options.pop(k) for k in ("eps", "rtol", "atol") if k in options}
            )
            result = gradcheck(x, w, b, spec, seed=config["seed"], tolerance=tolerance, **options)
            record["gradcheck"] = {
                "passed": result.passed,
                "mode": result.mode,
                "forward_passes": result.forward_passes,
                "seconds": result.seconds,
                "tensors": {
                    name: {
                        k: check.to_json()[k]
                        for k in ("checked", "total", "max_abs_err", "max_rel_err", "passed")
                    }
                    for name, check in result.tensors.items()
                },
            }
            if not result.passed:
                record["status"] = "failed"
    except ConvcliError as error:
        record["status"], record["error"] = "errored", str(error)
    except Exception as error:  # a crash inside convcli: record it, the sweep goes on
        record["status"], record["error"] = "errored", f"{type(error).__name__}: {error}"
    record["seconds"] = time.perf_counter() - start
    return record


def _hparam(value):
    """JSON lists back to the tuples ConvSpec takes."""
    if isinstance(value, list):
        return tuple(_hparam(v) for v in value)
    return value


def _limit_blas_to_one_thread() -> None:
    """Process-pool initializer: parallel jobs should not each start a BLAS thread pool."""
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=1, user_api="blas")


# ---------------------------------------------------------------------------------------------
# The results file and the sweep
# ---------------------------------------------------------------------------------------------


def record_verdict(record: dict) -> str:
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


@dataclass
class SweepSummary:
    """What a sweep did: counts, and every record (resumed ones included) in spec order."""

    spec: str
    out: str
    records: list[dict]
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

    def to_json(self) -> dict:
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


def _fsync_folder(folder: Path) -> None:
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


def read_results(out: Path) -> dict[str, dict]:
    """Finished records in a results file, by key. A torn last line (the process was killed
    while writing it) is cut off the file, so appending goes on from a clean line end."""
    data = out.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        with open(out, "r+b") as handle:
            handle.truncate(end)
    return _parse_results(data[:end])


def _parse_results(data: bytes) -> dict[str, dict]:
    """The complete records (JSON objects with a key) in JSON Lines ``data``, by key."""
    records: dict[str, dict] = {}
    end = data.rfind(b"\n") + 1
    for line in data[:end].splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and "key" in record:
            records[record["key"]] = record
    return records


def _check_fingerprints(source: Path, out: Path, sweep: Sweep) -> None:
    """Refuse to resume ``source`` (results for ``out``) unless this spec wrote every record."""
    try:
        records = _parse_results(source.read_bytes())
    except OSError as error:
        raise OutputError(f"{out}: cannot read ({error.strerror})") from None
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


def run_sweep(
    sweep: Sweep,
    out,
    *,
    jobs: int = 1,
    resume: bool = False,
    append: bool = False,
    force: bool = False,
    scheduler: str | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> SweepSummary:
    """Run every configuration not already in ``out`` and append one JSON line per result.

    ``resume`` continues results that this spec wrote (every record holds its spec's
    fingerprint); ``append`` adds this spec's runs to results that any spec wrote, skipping
    runs already there (it implies ``resume``); ``force`` starts ``out`` over.

    Raises
    ------
    OutputError
        ``out`` exists and neither ``resume``, ``append`` nor ``force`` is given, or cannot
        be written.
    SpecMismatchError
        ``resume`` without ``append`` on results holding records of another spec (or records
        with no fingerprint); nothing is written.
    UsageError
        ``jobs`` < 1, ``force`` with ``resume`` or ``append``, or ``scheduler`` without the
        ``dask`` extra installed.
    """
    out = Path(out)
    if jobs < 1:
        raise UsageError(f"--jobs {jobs}: must be at least 1")
    if append and force:
        raise UsageError("append adds to the results and force starts them over: give one")
    if resume and force:
        raise UsageError("--resume continues a sweep and --force starts it over: give one")
    resume = resume or append
    if out.resolve() == sweep.path.resolve():
        raise OutputError(f"{out}: refusing to write results over the spec file")
    if out.is_dir():
        raise OutputError(f"{out}: is a directory")
    if not out.parent.is_dir():
        raise OutputError(f"{out}: folder {out.parent} does not exist")
    partial = partial_path(out)
    done: dict[str, dict] = {}
    if partial.exists() and not (resume or force):
        raise OutputError(
            f"{partial} holds the results of an interrupted sweep; pass --resume to continue "
            "it or --force to start over"
        )
    if out.exists() and not (resume or force):
        raise OutputError(
            f"{out} exists; pass --resume to continue the sweep or --force to start over"
        )
    source = partial if partial.exists() else out
    if resume and not append and source.exists():
        _check_fingerprints(source, out, sweep)
    fingerprint = sweep.fingerprint
    try:
        if resume and not partial.exists() and out.exists():
            shutil.copyfile(out, partial)
        if not resume:
            partial.unlink(missing_ok=True)
        if partial.exists():
            done = read_results(partial)
        handle = open(partial, "a", encoding="utf-8")  # noqa: SIM115
    except OSError as error:
        raise OutputError(f"{out}: cannot write ({error.strerror})") from None
    keys = [sweep.key(config) for config in sweep.configs]
    todo = [
        (key, config) for key, config in zip(keys, sweep.configs, strict=True) if key not in done
    ]
    todo = list({key: (key, config) for key, config in todo}.values())  # identical configs run once
    start = time.perf_counter()
    try:
        with handle:
            finished = 0

            def write(record: dict) -> None:
                nonlocal finished
                record["spec_fingerprint"] = fingerprint
                handle.write(json.dumps(record) + "\n")
                handle.flush()
                os.fsync(handle.fileno())
                done[record["key"]] = record
                finished += 1
                if progress is not None:
                    progress(finished, len(todo))

            if scheduler is not None:
                _run_on_dask(scheduler, sweep, todo, write)
            elif jobs == 1:
                for key, config in todo:
                    write(run_config(config, sweep.actions, sweep.gradcheck, key))
            else:
                _run_in_processes(jobs, sweep, todo, write)
    finally:  # finished results always reach the target, even when interrupted
        os.replace(partial, out)
        _fsync_folder(out.parent)
    records = [done[key] for key in dict.fromkeys(keys)]
    return SweepSummary(
        spec=str(sweep.path),
        out=str(out),
        records=records,
        skipped=len(records) - len(todo),
        seconds=time.perf_counter() - start,
        fingerprint=fingerprint,
    )


def _run_in_processes(jobs: int, sweep: Sweep, todo, write) -> None:
    from concurrent.futures import ProcessPoolExecutor, as_completed

    with ProcessPoolExecutor(max_workers=jobs, initializer=_limit_blas_to_one_thread) as pool:
        futures = {
            pool.submit(run_config, config, sweep.actions, sweep.gradcheck, key): (key, config)
            for key, config in todo
        }
        try:
            for future in as_completed(futures):
                write(_result(future, *futures[future], sweep))
        except BaseException:
            for future in futures:
                future.cancel()
            raise


def _run_on_dask(address: str, sweep: Sweep, todo, write) -> None:
    try:
        from distributed import Client, as_completed
    except ImportError:
        raise UsageError(
            "--scheduler needs Dask distributed: pip install 'convcli[dask]'"
        ) from None
    try:
        client = Client(address, timeout="10s")
    except (OSError, TimeoutError) as error:
        raise UsageError(
            f"--scheduler {address}: cannot reach a Dask scheduler there ({error}); "
            "check the address"
        ) from None
    with client:
        futures = [
            client.submit(
                run_config,
                config,
                sweep.actions,
                sweep.gradcheck,
                key,
                key=f"convcli-{key}",
                pure=False,
            )
            for key, config in todo
        ]
        runs = {future.key: run for future, run in zip(futures, todo, strict=True)}
        for future in as_completed(futures):
            write(_result(future, *runs[future.key], sweep))


def _result(future, key: str, config: dict, sweep: Sweep) -> dict:
    """A future's record, or a failed record when the worker itself died."""
    try:
        return future.result()
    except Exception as error:
        return {
            "key": key,
            "config": config,
            "actions": list(sweep.actions),
            "status": "errored",
            "error": f"worker failed: {type(error).__name__}: {error}",
            "seconds": 0.0,
        }
