"""Running a sweep: one configuration (:func:`run_config`), and every configuration of a spec
(:func:`run_sweep`) in this process, in a pool of processes or on a Dask cluster.

Every configuration gets random float inputs from its seed, in its dtype; its result record
says what each action found (:mod:`convcli.sweep.results` has the record's statuses and the
results file). The sweep goes on whatever one configuration does; it passes only when every
record passed.
"""

from __future__ import annotations

import importlib.util
import socket
import struct
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from convcli import __version__
from convcli.check import gradcheck
from convcli.engine.fast import (
    DEFAULT_WORKSPACE,
    blas_libraries,
    conv_backward,
    conv_forward,
    scratch_bytes,
)
from convcli.errors import ConvcliError, UsageError
from convcli.generate import generate_layer
from convcli.memory import check_memory, in_memory_run_needs, nbytes
from convcli.spec import ConvSpec, Geometry, in_layout
from convcli.stats import summarize
from convcli.sweep.results import ResultsFile, SweepSummary, open_results
from convcli.sweep.schema import Config, GradcheckOptions, Sweep

Progress = Callable[[int, int], None]
"""``progress(finished, total)``, called after each run of a sweep."""

# the runs still to do: (key, configuration), each key once, in spec order
Todo = list[tuple[str, Config]]


@dataclass(frozen=True)
class SweepOptions:
    """How to run a sweep, and what to do with the results already in its results file.

    Attributes
    ----------
    jobs : int
        Configurations run at a time, each in a worker process (1: one after another, in
        this process).
    resume : bool
        Skip the runs already in the results file, which this spec must have written (every
        record holds its spec's fingerprint); run the rest.
    append : bool
        Like ``resume``, but the results file may hold runs of other specs; this spec's runs
        are added to them.
    force : bool
        Start the results file over.
    scheduler : str, optional
        Address of a Dask scheduler to run the configurations on, ``tcp://HOST:PORT`` (needs
        the ``dask`` extra); ``jobs`` is then unused.
    max_memory : int, optional
        Bytes the runs in progress may need together (None: no limit). Each configuration
        is estimated before its tensors are made (:func:`config_memory_needs`) and one that
        needs more than its share — ``max_memory / jobs`` in local processes, all of it on
        a Dask worker — is recorded as errored, with the estimate, without running.

    Raises
    ------
    UsageError
        ``jobs`` < 1, or ``force`` with ``resume`` or ``append``.
    """

    jobs: int = 1
    resume: bool = False
    append: bool = False
    force: bool = False
    scheduler: str | None = None
    max_memory: int | None = None

    def __post_init__(self) -> None:
        if self.jobs < 1:
            raise UsageError(f"{{param}} {self.jobs}: must be at least 1", param="jobs")
        if self.append and self.force:
            raise UsageError(
                "append adds to the results and {param} starts them over: give one", param="force"
            )
        if self.resume and self.force:
            raise UsageError(
                "resume continues a sweep and {param} starts it over: give one", param="force"
            )


# ---------------------------------------------------------------------------------------------
# Running one configuration (in this process, a worker process, or a Dask worker)
# ---------------------------------------------------------------------------------------------


def run_config(
    config: Config,
    actions: Sequence[str],
    gradcheck_options: GradcheckOptions,
    key: str,
    max_memory: int | None = None,
) -> dict[str, Any]:
    """Run the actions on one configuration and return its result record.

    Parameters
    ----------
    config : Config
        The layer: x of ``config.shape`` ``(n, *spatial, Cin)`` (channels last; the tensors
        are made in the configuration's layout), random from ``config.seed``.
    actions : sequence of str
        Of ``"forward"``, ``"backward"``, ``"gradcheck"``.
    gradcheck_options : GradcheckOptions
        For the gradcheck action.
    key : str
        The run's key (:meth:`Sweep.key`), stored in the record.
    max_memory : int, optional
        Refuse the configuration, before making its tensors, when its estimate
        (:func:`config_memory_needs`) exceeds this many bytes (None: no limit).

    Returns
    -------
    dict
        The record: ``key``, ``config`` (as JSON), ``actions``, ``status``, ``error``, and
        as far as the run got, ``hparams`` (resolved), ``forward`` (summary of z),
        ``backward`` (summaries of dx, dw, db), ``gradcheck`` (verdict per gradient); then
        ``seconds`` and ``provenance`` (:func:`provenance`, of the process that ran it).

    Never raises for a bad configuration or a failing run: the record's ``"status"`` is
    ``"errored"`` with a one-line ``"error"`` when an action raised or the configuration
    needs more memory than ``max_memory`` (the message gives the estimate), ``"failed"`` when the
    gradient check ran and failed, and ``"passed"`` otherwise.
    """
    record: dict[str, Any] = {
        "key": key,
        "config": config.to_json(),
        "actions": list(actions),
        "status": "passed",
        "error": None,
    }
    started = _now()
    start = time.perf_counter()
    try:
        check_memory(config_memory_needs(config, actions), max_memory)
        _run_actions(record, config, actions, gradcheck_options)
    except ConvcliError as error:
        record["status"], record["error"] = "errored", str(error)
    except Exception as error:  # a crash inside convcli: record it, the sweep goes on
        record["status"], record["error"] = "errored", f"{type(error).__name__}: {error}"
    record["seconds"] = time.perf_counter() - start
    record["provenance"] = provenance(started, _now())
    return record


def provenance(started: datetime, ended: datetime) -> dict[str, Any]:
    """What produced a record, and when: for comparing results across machines and runs.

    Returns
    -------
    dict
        ``convcli`` and ``numpy`` (versions), ``blas`` (:func:`~convcli.engine.fast.blas_libraries`:
        internal_api, version, threading_layer, num_threads per library), ``host`` (this
        machine's name), ``started`` and ``ended`` (ISO 8601 in UTC, e.g.
        ``"2026-12-03T16:05:09.123Z"``).
    """
    return {
        "convcli": __version__,
        "numpy": np.__version__,
        "blas": blas_libraries(),
        "host": socket.gethostname(),
        "started": _iso(started),
        "ended": _iso(ended),
    }


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _iso(moment: datetime) -> str:
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def config_memory_needs(config: Config, actions: Sequence[str]) -> dict[str, int]:
    """The memory estimate of one configuration's run, by kind (name -> bytes), as
    ``forward`` and ``backward`` estimate theirs (:func:`convcli.memory.in_memory_run_needs`):
    x, w, b, the outputs, the engine's scratch, and with ``backward`` or ``gradcheck`` the
    gradients (gradcheck computes in float64).

    Raises
    ------
    DataError
        The configuration's shapes and hyperparameters do not fit together.
    """
    spec = config.spec()
    geometry = _geometry(config, spec)
    made = np.dtype(config.dtype)
    dtype = np.dtype("float64") if "gradcheck" in actions else made
    shapes = geometry.user_shapes()
    given = nbytes(shapes["x"], made) + nbytes(shapes["w"], made)
    return in_memory_run_needs(
        geometry,
        dtype,
        input_bytes=given + nbytes((geometry.cout,), made),
        scratch=scratch_bytes(geometry, dtype, DEFAULT_WORKSPACE),
        backward="backward" in actions or "gradcheck" in actions,
    )


def _geometry(config: Config, spec: ConvSpec) -> Geometry:
    """The geometry of ``config``'s tensors, from sizes alone (nothing is made)."""
    x_shape = in_layout(config.shape, "x", spec.layout)
    return spec.geometry(x_shape, spec.weight_shape(config.kernel, config.shape[-1], config.cout))


def _run_actions(
    record: dict[str, Any], config: Config, actions: Sequence[str], options: GradcheckOptions
) -> None:
    """Run the actions on ``config``, adding what each found to ``record`` as it goes."""
    spec = config.spec()
    tensors, _ = generate_layer(
        config.shape, config.kernel, config.cout, spec, seed=config.seed, dtype=config.dtype
    )
    x, w, b = tensors["x"], tensors["w"], tensors["b"]  # in the configuration's layout
    record["hparams"] = spec.geometry(x.shape, w.shape).hparams()
    if "forward" in actions or "backward" in actions:
        began = time.perf_counter()
        z, cache = conv_forward(x, w, b, spec)
        record["forward"] = {"z": summarize(z), "seconds": time.perf_counter() - began}
    if "backward" in actions:
        dz = np.random.default_rng(config.seed + 1).standard_normal(z.shape).astype(z.dtype)
        began = time.perf_counter()
        dx, dw, db = conv_backward(dz, cache)
        record["backward"] = {
            "dx": summarize(dx),
            "dw": summarize(dw),
            "db": None if db is None else summarize(db),
            "seconds": time.perf_counter() - began,
        }
    if "gradcheck" in actions:
        record["gradcheck"] = _gradcheck_record(x, w, b, spec, config.seed, options)
        if not record["gradcheck"]["passed"]:
            record["status"] = "failed"


def _gradcheck_record(
    x: np.ndarray,
    w: np.ndarray,
    b: np.ndarray,
    spec: ConvSpec,
    seed: int,
    options: GradcheckOptions,
) -> dict[str, Any]:
    """The gradient check of one layer, as a record holds it (the verdict per gradient)."""
    result = gradcheck(
        x,
        w,
        b,
        spec,
        mode=options.mode,
        samples=options.samples,
        probes=options.probes,
        seed=seed,
        tolerance=options.tolerance,
    )
    return {
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


def _limit_blas_to_one_thread() -> None:
    """Process-pool initializer: parallel jobs should not each start a BLAS thread pool."""
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=1, user_api="blas")


# ---------------------------------------------------------------------------------------------
# Running a sweep
# ---------------------------------------------------------------------------------------------


def run_sweep(
    sweep: Sweep,
    out: str | Path,
    options: SweepOptions | None = None,
    *,
    progress: Progress | None = None,
) -> SweepSummary:
    """Run every configuration not already in ``out`` and append one JSON line per result.

    Parameters
    ----------
    sweep : Sweep
        The spec (:func:`~convcli.sweep.load_sweep`).
    out : str or Path
        The results file, JSON Lines (see :mod:`convcli.sweep.results`).
    options : SweepOptions, optional
        Jobs, Dask scheduler, and what to do with existing results (default: run here, one
        configuration at a time, into a results file that must not exist).
    progress : callable(finished, total), optional
        Called after each run.

    Returns
    -------
    SweepSummary
        Every record of the spec's runs, resumed ones included, in spec order.

    Raises
    ------
    ResultsExistError
        ``out`` exists and neither ``resume``, ``append`` nor ``force`` is given.
    OutputError
        ``out`` cannot be written.
    SpecMismatchError
        ``resume`` without ``append`` on results holding records of another spec (or records
        with no fingerprint); nothing is written.
    UsageError
        ``scheduler`` without the ``dask`` extra installed, or no Dask scheduler at that
        address.
    """
    options = options or SweepOptions()
    if options.scheduler is not None:
        probe_scheduler(options.scheduler)  # before the results file is touched
    keys = sweep.keys
    results = open_results(
        Path(out), sweep, resume=options.resume, append=options.append, force=options.force
    )
    start = time.perf_counter()
    with results:  # finished results always reach ``out``, even when interrupted
        todo = _todo(keys, sweep.configs, results.done)
        _run_all(sweep, todo, options, _writer(results, len(todo), progress))
    records = [results.done[key] for key in dict.fromkeys(keys)]
    return SweepSummary(
        spec=str(sweep.path),
        out=str(results.out),
        records=records,
        skipped=len(records) - len(todo),
        seconds=time.perf_counter() - start,
        fingerprint=sweep.fingerprint,
    )


def _todo(keys: Sequence[str], configs: Sequence[Config], done: Mapping[str, object]) -> Todo:
    """The runs not ``done``, in spec order; identical configurations run once."""
    todo: dict[str, tuple[str, Config]] = {}
    for key, config in zip(keys, configs, strict=True):
        if key not in done and key not in todo:
            todo[key] = (key, config)
    return list(todo.values())


def _writer(
    results: ResultsFile, total: int, progress: Progress | None
) -> Callable[[dict[str, Any]], None]:
    """A function that writes one record to ``results`` and reports progress."""
    finished = 0

    def write(record: dict[str, Any]) -> None:
        nonlocal finished
        results.write(record)
        finished += 1
        if progress is not None:
            progress(finished, total)

    return write


def _run_all(
    sweep: Sweep, todo: Todo, options: SweepOptions, write: Callable[[dict[str, Any]], None]
) -> None:
    """Run ``todo`` where ``options`` says, writing each record as it finishes."""
    budget = options.max_memory
    if options.scheduler is not None:
        _run_on_dask(options.scheduler, sweep, todo, write, budget)
    elif options.jobs == 1:
        for key, config in todo:
            write(run_config(config, sweep.actions, sweep.gradcheck, key, budget))
    else:
        share = None if budget is None else budget // options.jobs
        _run_in_processes(options.jobs, sweep, todo, write, share)


def _run_in_processes(
    jobs: int,
    sweep: Sweep,
    todo: Todo,
    write: Callable[[dict[str, Any]], None],
    max_memory: int | None,
) -> None:
    with ProcessPoolExecutor(max_workers=jobs, initializer=_limit_blas_to_one_thread) as pool:
        futures = {
            pool.submit(run_config, config, sweep.actions, sweep.gradcheck, key, max_memory): (
                key,
                config,
            )
            for key, config in todo
        }
        try:
            for future in as_completed(futures):
                key, config = futures[future]
                write(_result(future, key, config, sweep))
        except BaseException:
            for future in futures:
                future.cancel()
            raise


# ---------------------------------------------------------------------------------------------
# Dask
# ---------------------------------------------------------------------------------------------

SCHEDULER_TIMEOUT = 3.0  # seconds to connect to a scheduler and read its first message
HANDSHAKE_LIMIT = 64 * 2**10  # bytes: a scheduler's first message (its handshake) is ~60


def probe_scheduler(address: str, timeout: float = SCHEDULER_TIMEOUT) -> None:
    """Check that a Dask scheduler answers at ``address`` before Dask is handed the address.

    Dask's client trusts the size its peer declares for each message and allocates it; a
    server that is not a scheduler (or noise on the port) could make it allocate any amount.
    So convcli connects first itself, within ``timeout`` seconds, reads at most
    :data:`HANDSHAKE_LIMIT` bytes, and requires Dask's handshake: a length-prefixed set of
    frames, one of them a msgpack map with the keys Dask's handshake holds. Only ``tcp://``
    addresses (or ``HOST:PORT``) are accepted.

    Raises
    ------
    UsageError
        (``param="scheduler"``) A malformed address, Dask distributed not installed, no
        answer within ``timeout``, or a server whose first message is not Dask's handshake.
    """
    host, port = _endpoint(address)
    try:
        if importlib.util.find_spec("distributed") is None:
            raise ImportError("distributed")
        import msgpack  # type: ignore[import-untyped]  # a dependency of Dask distributed
    except ImportError:
        raise UsageError(
            "{param} needs Dask distributed: pip install 'convcli[dask]'", param="scheduler"
        ) from None
    deadline = time.monotonic() + timeout
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            (length,) = struct.unpack("Q", _receive(sock, 8, deadline))
            if not 8 < length <= HANDSHAKE_LIMIT:
                raise _not_a_scheduler(address, f"its first message declares {length} bytes")
            body = _receive(sock, length, deadline)
    except OSError as error:
        timed_out = isinstance(error, TimeoutError)
        reason = f"no answer within {timeout:g} s" if timed_out else error.strerror or error
        raise UsageError(
            f"{{param}} {address}: cannot reach a Dask scheduler there ({reason}); "
            "check the address",
            param="scheduler",
        ) from None
    if not _is_handshake(body, msgpack):
        raise _not_a_scheduler(address, "its first message is not a Dask handshake")


def _endpoint(address: str) -> tuple[str, int]:
    """``(host, port)`` of a ``tcp://HOST:PORT`` or ``HOST:PORT`` address."""
    scheme, sep, rest = address.strip().partition("://")
    if not sep:
        scheme, rest = "tcp", address.strip()
    host, colon, port = rest.rpartition(":")
    host = host.strip("[]")
    valid = scheme == "tcp" and colon and host and port.isdigit() and 0 < int(port) < 65536
    if not valid or any(c.isspace() for c in host):
        raise UsageError(
            f"{{param}} {address!r}: expected a Dask scheduler's address, tcp://HOST:PORT",
            param="scheduler",
        )
    return host, int(port)


def _receive(sock: socket.socket, count: int, deadline: float) -> bytes:
    """Exactly ``count`` bytes from ``sock`` before ``deadline`` (TimeoutError otherwise)."""
    chunks, left = [], count
    while left:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("timed out")
        sock.settimeout(remaining)
        chunk = sock.recv(min(left, 65536))
        if not chunk:
            raise ConnectionError("the server closed the connection")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _is_handshake(body: bytes, msgpack: Any) -> bool:
    """Whether ``body`` is Dask's handshake: ``n``, ``n`` frame lengths, the frames (8-byte
    native integers, as Dask writes them), one of them a msgpack map naming the peer's
    Python, pickle protocol and compression."""
    (count,) = struct.unpack_from("Q", body)
    if not 0 < count <= 16 or len(body) < 8 * (count + 1):
        return False
    lengths = struct.unpack_from(f"{count}Q", body, 8)
    if 8 * (count + 1) + sum(lengths) != len(body):
        return False
    start = 8 * (count + 1)
    for length in lengths:
        try:
            frame = msgpack.unpackb(body[start : start + length], raw=False)
        except Exception:  # any malformed frame: not Dask's
            frame = None
        if isinstance(frame, dict) and {"python", "pickle-protocol"} <= frame.keys():
            return True
        start += length
    return False


def _not_a_scheduler(address: str, why: str) -> UsageError:
    return UsageError(
        f"{{param}} {address}: the server there is not a Dask scheduler ({why}); check the address",
        param="scheduler",
    )


def _run_on_dask(
    address: str,
    sweep: Sweep,
    todo: Todo,
    write: Callable[[dict[str, Any]], None],
    max_memory: int | None,
) -> None:
    try:
        from distributed import Client, as_completed
    except ImportError:
        raise UsageError(
            "{param} needs Dask distributed: pip install 'convcli[dask]'", param="scheduler"
        ) from None
    try:
        client = Client(address, timeout="10s")
    except (OSError, TimeoutError) as error:
        raise UsageError(
            f"{{param}} {address}: cannot reach a Dask scheduler there ({error}); "
            "check the address",
            param="scheduler",
        ) from None
    with client:
        futures = [
            client.submit(
                run_config,
                config,
                sweep.actions,
                sweep.gradcheck,
                key,
                max_memory,
                key=f"convcli-{key}",
                pure=False,
            )
            for key, config in todo
        ]
        runs = {future.key: run for future, run in zip(futures, todo, strict=True)}
        for future in as_completed(futures):
            key, config = runs[future.key]
            write(_result(future, key, config, sweep))


def _result(future: Any, key: str, config: Config, sweep: Sweep) -> dict[str, Any]:
    """A future's record (a process pool's or Dask's), or an errored record when the worker
    itself died."""
    try:
        return future.result()
    except Exception as error:
        now = _now()  # no run to time: when the failure was seen, by this process
        return {
            "key": key,
            "config": config.to_json(),
            "actions": list(sweep.actions),
            "status": "errored",
            "error": f"worker failed: {type(error).__name__}: {error}",
            "seconds": 0.0,
            "provenance": provenance(now, now),
        }
