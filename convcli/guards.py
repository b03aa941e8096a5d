"""Guards run before any work: non-finite values and the memory a command would need.

Both raise :class:`~convcli.errors.DataError` (exit 65) with the numbers a user needs to act:
the count and first index of NaN/Inf values; the estimated bytes against ``--max-memory``.
"""

from __future__ import annotations

import numpy as np

from convcli.errors import DataError
from convcli.units import format_size


def check_finite(name: str, array, *, offset: int = 0, hint: str = "") -> None:
    """Refuse NaN or ±Inf in ``array`` (``offset`` shifts the first index, for chunks)."""
    array = np.asarray(array)
    if array.dtype.kind not in "fc":
        return
    finite = np.isfinite(array)
    if finite.all():
        return
    bad = array.size - int(np.count_nonzero(finite))
    first = [int(i) for i in np.argwhere(~finite)[0]]
    if first:
        first[0] += offset
    raise DataError(f"{name} has {bad} NaN/Inf values (first at {first}){hint}")


def check_memory(needs: dict[str, int], max_memory: int | None) -> None:
    """Refuse when the estimated total of ``needs`` (name -> bytes) exceeds ``max_memory``."""
    if max_memory is None:
        return
    total = sum(needs.values())
    if total > max_memory:
        parts = ", ".join(f"{name} {format_size(size)}" for name, size in needs.items() if size)
        raise DataError(
            f"this needs about {format_size(total)} ({parts}), more than --max-memory "
            f"{format_size(max_memory)}; stream the input from HDF5, lower --max-workspace, or "
            "raise --max-memory"
        )


def nbytes(shape, dtype) -> int:
    count = 1
    for size in shape:
        count *= int(size)
    return count * np.dtype(dtype).itemsize
