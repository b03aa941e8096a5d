"""Summary statistics of a tensor: shape, dtype, mean, std, min, max — in memory or streamed.

:class:`RunningStats` takes a tensor in chunks along its first axis and merges them with
Chan et al.'s pairwise update of (count, mean, M2), so a streamed tensor gets the same
numbers as one in memory (to rounding). Accumulation is in float64 whatever the dtype.
"""

from __future__ import annotations

import numpy as np


class RunningStats:
    """Mean, standard deviation, min and max of a tensor seen in chunks (first axis)."""

    def __init__(self, shape, dtype):
        self.shape = tuple(int(v) for v in shape)
        self.dtype = np.dtype(dtype)
        self.count = 0
        self.mean = 0.0
        self.m2 = 0.0  # sum of squared deviations from the mean
        self.min = np.inf
        self.max = -np.inf
        self.nonfinite = 0  # NaN and ±Inf values seen

    def update(self, chunk: np.ndarray) -> None:
        """Merge one chunk (any shape; its values are what counts)."""
        chunk = np.asarray(chunk)
        count = chunk.size
        if count == 0:
            return
        self.nonfinite += count - int(np.count_nonzero(np.isfinite(chunk)))
        with np.errstate(all="ignore"):  # NaN/Inf make NaN statistics, reported as None
            self._merge(chunk, count)

    def _merge(self, chunk: np.ndarray, count: int) -> None:
        mean = float(np.mean(chunk, dtype=np.float64))
        deviations = chunk.astype(np.float64, copy=False) - mean
        m2 = float(np.vdot(deviations.ravel(), deviations.ravel()))
        total = self.count + count
        delta = mean - self.mean
        self.mean += delta * count / total
        self.m2 += m2 + delta * delta * self.count * count / total
        self.count = total
        # np.minimum / np.maximum let a NaN through, as np.min does on the whole tensor
        self.min = float(np.minimum(self.min, np.min(chunk)))
        self.max = float(np.maximum(self.max, np.max(chunk)))

    def summary(self) -> dict:
        """``{"shape", "dtype", "nonfinite", "mean", "std", "min", "max"}``, plain Python.

        ``nonfinite`` counts NaN and ±Inf values. Statistics of an empty tensor, and
        non-finite results (any NaN makes the mean NaN), are ``None``.
        """
        summary = {"shape": list(self.shape), "dtype": str(self.dtype), "nonfinite": self.nonfinite}
        if self.count == 0:
            return summary | dict.fromkeys(("mean", "std", "min", "max"))
        values = {
            "mean": self.mean,
            "std": float(np.sqrt(self.m2 / self.count)) if np.isfinite(self.m2) else self.m2,
            "min": self.min,
            "max": self.max,
        }
        for key, value in values.items():
            summary[key] = value if np.isfinite(value) else None
        return summary


CHUNK_ELEMENTS = 2**22  # float64 temporaries of at most 32 MiB


def summarize(array: np.ndarray) -> dict:
    """Summary of an array in memory, taken in chunks so temporaries stay small."""
    array = np.asarray(array)
    stats = RunningStats(array.shape, array.dtype)
    flat = array.reshape(-1)
    for start in range(0, flat.size, CHUNK_ELEMENTS):
        stats.update(flat[start : start + CHUNK_ELEMENTS])
    return stats.summary()
