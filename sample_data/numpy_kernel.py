"""A forward-only convolution in another library's style, to try the ``callable`` signature:

    convcli gradcheck --impl sample_data/numpy_kernel.py:conv --layout nchw

It stands in for a wrapper around your own kernel (CUDA, Triton, a framework op): convcli
calls ``conv(x, w, b, stride=..., padding=...)`` with channels-first NumPy arrays of any
rank and reads back anything with ``__array__``. ``dilation`` and ``groups`` are not
parameters here, so the suite leaves them out.
"""

import math

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view


def _per_axis(value, rank):
    """One value per spatial axis: a tuple as given, anything else repeated."""
    return tuple(value) if isinstance(value, (tuple, list)) else (value,) * rank


def _pads(size, k, stride, padding):
    """(before, after) along one axis for an int, a (before, after) pair, "valid" or "same"
    (extra at the end)."""
    if isinstance(padding, (tuple, list)):
        return tuple(padding)
    if padding == "valid":
        return 0, 0
    if padding == "same":
        total = max((math.ceil(size / stride) - 1) * stride + k - size, 0)
        return total // 2, total - total // 2
    return padding, padding


def conv(x, w, b, *, stride=1, padding=0):
    """x (N, C, *spatial), w (F, C, *kernel), b (F,) or None -> (N, F, *out).

    stride: an int, or one per axis; padding: an int, "same", "valid", or one per axis
    (each an int or a (before, after) pair).
    """
    rank = x.ndim - 2
    kernel = w.shape[2:]
    strides, paddings = _per_axis(stride, rank), _per_axis(padding, rank)
    pads = [_pads(x.shape[2 + i], kernel[i], strides[i], paddings[i]) for i in range(rank)]
    x = np.pad(x, [(0, 0), (0, 0), *pads])
    spatial = tuple(range(2, 2 + rank))
    windows = sliding_window_view(x, kernel, axis=spatial)  # (N, C, *positions, *kernel)
    windows = windows[(slice(None), slice(None), *[slice(None, None, s) for s in strides])]
    z = np.tensordot(windows, w, axes=([1, *range(2 + rank, 2 + 2 * rank)], [1, *spatial]))
    z = np.moveaxis(z, -1, 1)  # (N, *out, F) -> (N, F, *out)
    return z if b is None else z + b.reshape(1, -1, *[1] * rank)
