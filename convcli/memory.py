"""Memory estimates and the guard run before any work.

:func:`check_memory` refuses work whose estimated bytes exceed the caller's ``max_memory``
with a :class:`~convcli.errors.MemoryLimitError` that lists what needs the memory. The
engine's own scratch estimate lives with its tiling (:func:`convcli.engine.scratch_bytes`);
sizes as text are in :mod:`convcli.units`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np

from convcli.errors import MemoryLimitError
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


def nbytes(shape: Iterable[int], dtype) -> int:
    """Bytes of an array of ``shape`` and ``dtype`` (Python ints: no overflow)."""
    count = 1
    for size in shape:
        count *= int(size)
    return count * np.dtype(dtype).itemsize
