"""Summary statistics of a tensor: shape, dtype, mean, std, min, max.

Means and standard deviations accumulate in float64 whatever the tensor's dtype.
"""

from __future__ import annotations

import numpy as np


def summarize(array: np.ndarray) -> dict:
    """Return ``{"shape", "dtype", "mean", "std", "min", "max"}`` with plain Python values.

    Statistics of an empty array, and non-finite results, are ``None``.
    """
    array = np.asarray(array)
    summary = {"shape": list(array.shape), "dtype": str(array.dtype)}
    if array.size == 0:
        return summary | dict.fromkeys(("mean", "std", "min", "max"))
    values = {
        "mean": np.mean(array, dtype=np.float64),
        "std": np.std(array, dtype=np.float64),
        "min": np.min(array),
        "max": np.max(array),
    }
    for key, value in values.items():
        value = float(value)
        summary[key] = value if np.isfinite(value) else None
    return summary
