"""Memory estimates and the guard run before any work.

:func:`check_memory` refuses work whose estimated bytes exceed the caller's ``max_memory``
with a :class:`~convcli.errors.MemoryLimitError` that lists what needs the memory.
:func:`in_memory_run_needs` and :func:`streamed_run_needs` are the estimates of a forward or
backward run; :func:`chunk_images` sizes the blocks a streamed run reads. The engine's own
scratch estimate lives with its tiling (:func:`convcli.engine.scratch_bytes`); sizes as text
are in :mod:`convcli.units`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np

from convcli.errors import MemoryLimitError
from convcli.spec import Geometry
from convcli.units import format_size


def check_memory(needs: Mapping[str, int], max_memory: int | None) -> None:
    """Refuse when the estimated total of ``needs`` (name -> bytes) exceeds ``max_memory``.

    ``max_memory=None`` means no limit.
    """
    if max_memory is None:
        return
    total = sum(needs.values())
    if total > max_memory:
        parts = ", ".join(f"{name} {format_size(size)}" for name, size in needs.items() if size)
        raise MemoryLimitError(
            f"this needs about {format_size(total)} ({parts}), more than {{param}} "
            f"{format_size(max_memory)}",
            needs=dict(needs),
            limit=max_memory,
        )


def nbytes(shape: Iterable[int], dtype: np.dtype | type) -> int:
    """Bytes of an array of ``shape`` and ``dtype`` (Python ints: no overflow)."""
    count = 1
    for size in shape:
        count *= int(size)
    return count * np.dtype(dtype).itemsize


def in_memory_run_needs(
    geometry: Geometry, dtype: np.dtype, *, input_bytes: int, scratch: int, backward: bool
) -> dict[str, int]:
    """What a run with every tensor in memory needs, by kind (name -> bytes).

    Parameters
    ----------
    geometry : Geometry
        The convolution's shapes.
    dtype : numpy.dtype
        The dtype the engine computes in (float32 or float64).
    input_bytes : int
        Bytes of the tensors given (x, w, b, dz), as they are held.
    scratch : int
        The engine's scratch estimate (:func:`convcli.engine.scratch_bytes`).
    backward : bool
        Also dz (when made from z), dx and dw.
    """
    z = nbytes(geometry.out_shape, dtype)
    needs = {
        "inputs": input_bytes,
        "outputs": z * (2 if backward else 1),  # z, and dz when it is made
        "workspace": scratch,
    }
    if backward:
        shapes = geometry.user_shapes()
        needs["gradients"] = nbytes(shapes["x"], dtype) + nbytes(shapes["w"], dtype)
    return needs


def streamed_run_needs(*, weight_bytes: int, workspace: int) -> dict[str, int]:
    """What a streamed run needs: w and b (and their gradients), and the whole workspace.

    The blocks of the batch take half of ``workspace`` (see :func:`chunk_images`) and the
    engine's scratch the other half, whatever the batch size.
    """
    return {"weights": 2 * weight_bytes, "workspace": workspace}


def chunk_images(geometry: Geometry, dtype: np.dtype | type, workspace: int, backward: bool) -> int:
    """Images per block of a streamed run, so that a block's arrays take at most half the
    workspace (at least one image, at most the batch).

    A block holds x as read and as converted, and z; ``backward`` adds dz (read and
    converted) and dx.
    """
    itemsize = np.dtype(dtype).itemsize
    x_elems = int(np.prod(geometry.in_sizes)) * geometry.cin
    z_elems = int(np.prod(geometry.out_sizes)) * geometry.cout
    per_image = 2 * x_elems + z_elems + (2 * z_elems + x_elems if backward else 0)
    return max(1, min(geometry.n, (workspace // 2) // (per_image * itemsize)))
