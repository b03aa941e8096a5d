"""Forward and backward on HDF5 inputs bigger than memory: the batch streamed in chunks.

x (and dz, when it is an HDF5 dataset too) is read a block of images at a time, through
one open handle per file for the whole run; after every block the file is checked to be
the version that was loaded (:meth:`~convcli.io.loading.OpenDataset.verify`), so a file
replaced or written during the run fails it instead of mixing two versions. Each
block goes through the engine; outputs are written block by block into the ``--out`` HDF5
file (through a temporary file renamed into place, as every output); summary statistics
are merged chunk by chunk (:class:`~convcli.stats.RunningStats`); ``backward`` accumulates
dw and db across chunks. Memory stays bounded by the workspace budget whatever n is: half
of it holds the chunk (x, z and, backward, dz and dx), the engine's scratch gets the rest.
"""

from __future__ import annotations

import contextlib
import os
import time
import warnings
from pathlib import Path

import h5py
import numpy as np

from convcli.engine.operands import as_float_array
from convcli.errors import ConvcliNotice, ShapeError, UsageError
from convcli.io.loading import DatasetRef, FileIdentity
from convcli.io.writing import atomic_output, check_target, output_format, write_hdf5_attrs
from convcli.spec import ConvSpec
from convcli.stats import RunningStats


def chunk_images(geometry, dtype, workspace: int, backward: bool) -> int:
    """Images per chunk so that the chunk's arrays take at most half the workspace."""
    itemsize = np.dtype(dtype).itemsize
    x_elems = int(np.prod(geometry.in_sizes)) * geometry.cin
    z_elems = int(np.prod(geometry.out_sizes)) * geometry.cout
    # x as read and as converted, z; backward adds dz (read and converted) and dx
    per_image = 2 * x_elems + z_elems + (2 * z_elems + x_elems if backward else 0)
    return max(1, min(geometry.n, (workspace // 2) // (per_image * itemsize)))


def stream_run(
    command: str,
    arrays: dict,
    spec: ConvSpec,
    *,
    engine: str = "fast",
    upstream: str = "z",
    seed: int | None = None,
    origins: dict[str, str] | None = None,
    workspace: int,
    threads: int | None = None,
    out=None,
    force: bool = False,
    protect=(),
    progress=None,
    allow_nonfinite: bool = False,
    max_memory: int | None = None,
):
    """Run ``command`` ("forward" or "backward") with x a :class:`DatasetRef`.

    Returns the same :class:`~convcli.run.RunResult` as an in-memory run; streamed tensors
    carry their statistics, and (for ``--slice``) read from the input or output file.
    """
    from convcli.run import (
        RunResult,
        Tensor,
        engine_functions,
        notices_of,
        tensor_shapes,
        upstream_gradient,
        upstream_origin,
    )

    forward, backward = engine_functions(engine)
    x_ref: DatasetRef = arrays["x"]
    w, b = arrays["w"], arrays.get("b")
    origins = dict(origins or {})
    if out is not None:
        out = Path(out)
        if output_format(out) != "hdf5":
            raise UsageError(
                f"--out {out}: x is streamed from disk (larger than the workspace), so outputs "
                "are written chunk by chunk to HDF5; use --out FILE.h5"
            )
        check_target(out, force=force, protect=protect)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvcliNotice)
        w_checked = as_float_array("w", w)
        dtype = np.result_type(*_float_dtypes(x_ref.dtype, w_checked, b))
    geometry = spec.geometry(x_ref.shape, w_checked.shape)
    shapes = tensor_shapes(command, geometry, None if b is None else np.shape(b))
    dz_source = arrays.get("dz")
    if dz_source is not None and tuple(dz_source.shape) != shapes["z"]:
        raise ShapeError(
            f"dz has shape {tuple(dz_source.shape)}; the forward output z has shape {shapes['z']}"
        )
    backward_run = command == "backward"
    per_chunk = chunk_images(geometry, dtype, workspace, backward_run)
    from convcli.engine.operands import check_finite
    from convcli.memory import check_memory

    check_memory(
        {
            "weights": 2 * (np.asarray(w).nbytes + (0 if b is None else np.asarray(b).nbytes)),
            "workspace": workspace,
        },
        max_memory,
    )
    if not allow_nonfinite:
        check_finite("w", w)
        if b is not None:
            check_finite("b", b)
    engine_workspace = max(1, workspace - workspace // 2)
    starts = list(range(0, geometry.n, per_chunk))
    stats = {"x": RunningStats(shapes["x"], x_ref.dtype), "z": RunningStats(shapes["z"], dtype)}
    if backward_run:
        dz_dtype = dtype if dz_source is None else dz_source.dtype
        stats["dz"] = RunningStats(shapes["dz"], dz_dtype)
        stats["dx"] = RunningStats(shapes["dx"], np.result_type(dtype, dz_dtype))
    rng = np.random.default_rng(seed)
    dw_total = db_total = None

    start_time = time.perf_counter()
    with contextlib.ExitStack() as stack:
        h5 = _open_output(stack, out)
        # each input file is read through one handle, and must stay the version it was
        inputs = {"x": stack.enter_context(x_ref.open("x"))}
        if isinstance(dz_source, DatasetRef):
            inputs["dz"] = stack.enter_context(dz_source.open("dz"))
        dz_rows = inputs.get("dz", dz_source)
        with warnings.catch_warnings(record=True) as caught_run:
            warnings.simplefilter("always", ConvcliNotice)
            for number, start in enumerate(starts, start=1):
                stop = min(start + per_chunk, geometry.n)
                x = inputs["x"].read(start, stop)
                if not allow_nonfinite:
                    check_finite(f"x (images {start}-{stop - 1})", x, offset=start)
                stats["x"].update(x)
                z, cache = forward(x, w, b, spec, workspace=engine_workspace, threads=threads)
                stats["z"].update(z)
                if not backward_run:
                    _write_rows(h5, "z", shapes["z"], z, start, stop)
                else:
                    if dz_rows is not None:
                        dz = np.asarray(dz_rows[start:stop])
                        if not allow_nonfinite:
                            check_finite(f"dz (images {start}-{stop - 1})", dz, offset=start)
                    else:
                        dz = upstream_gradient(z, upstream, rng)
                    stats["dz"].update(dz)
                    dx, dw, db = backward(dz, cache)
                    stats["dx"].update(dx)
                    _write_rows(h5, "dx", shapes["dx"], dx, start, stop)
                    dw_total = dw if dw_total is None else dw_total + dw
                    if db is not None:
                        db_total = db if db_total is None else db_total + db
                if progress is not None:
                    progress(number, len(starts))
                for opened in inputs.values():  # after every block, so after the last too
                    opened.verify()
        if h5 is not None:
            if backward_run:
                h5.create_dataset("dw", data=dw_total)
                if db_total is not None:
                    h5.create_dataset("db", data=db_total)
            write_hdf5_attrs(h5, geometry.hparams())
    seconds = time.perf_counter() - start_time

    if backward_run and dz_source is None:
        origins["dz"] = upstream_origin(upstream, seed)
    written = "dx" if backward_run else "z"
    reader = None
    if out is not None:  # --slice reads the streamed output back from the file
        reader = DatasetRef(
            path=out.resolve(),
            key=f"/{written}",
            shape=stats[written].shape,
            dtype=stats[written].dtype,
            origin=f"{out}:/{written}",
            identity=FileIdentity.of(out.stat()),
        )
    tensors = {"x": Tensor(x_ref, "input", origins.get("x", x_ref.origin), stats["x"].summary())}
    tensors["w"] = Tensor(np.asarray(w), "input", origins.get("w", "given"))
    if b is not None:
        tensors["b"] = Tensor(np.asarray(b), "input", origins.get("b", "given"))
    z_reader = None if backward_run else reader
    tensors["z"] = Tensor(z_reader, "output", "computed", stats["z"].summary())
    if backward_run:
        dz_origin = origins.get("dz", "given")
        tensors["dz"] = Tensor(dz_source, "input", dz_origin, stats["dz"].summary())
        tensors["dx"] = Tensor(reader, "output", "computed", stats["dx"].summary())
        tensors["dw"] = Tensor(dw_total, "output", "computed")
        if db_total is not None:
            tensors["db"] = Tensor(db_total, "output", "computed")
    outputs = ("z",)
    if backward_run:
        outputs = ("dx", "dw") if db_total is None else ("dx", "dw", "db")
    return RunResult(
        command=command,
        engine=engine,
        hparams=geometry.hparams(),
        tensors=tensors,
        seconds=seconds,
        outputs=outputs,
        notices=notices_of([*caught, *caught_run]),
        streamed=True,
    )


def _float_dtypes(x_dtype, w, b):
    """The dtypes the engine will compute with (integers count as float64)."""
    dtypes = [x_dtype, w.dtype] + ([np.asarray(b).dtype] if b is not None else [])
    return [np.float64 if np.dtype(d).kind in "iu" else d for d in dtypes]


def _open_output(stack: contextlib.ExitStack, out: Path | None):
    """An HDF5 file being written to a temporary path, renamed over ``out`` on success."""
    if out is None:
        return None
    fd, temp = stack.enter_context(atomic_output(out))
    os.close(fd)
    return stack.enter_context(h5py.File(temp, "w"))


def _write_rows(h5, name: str, shape, rows: np.ndarray, start: int, stop: int) -> None:
    if h5 is None:
        return
    if name not in h5:
        h5.create_dataset(name, shape=shape, dtype=rows.dtype)
    h5[name][start:stop] = rows
