"""Tensor files: detecting a format, reading arrays and hyperparameters, writing atomically.

- :mod:`convcli.io.tensorfile`: format detection and :class:`TensorFile` (npy, npz, HDF5).
- :mod:`convcli.io.loading`: which array is x, w, b or dz, and streaming HDF5 datasets.
- :mod:`convcli.io.writing`: outputs written to a temporary file and renamed into place.
"""

from convcli.io.tensorfile import TensorFile, open_tensor_file
from convcli.io.writing import write_tensors

__all__ = ["TensorFile", "open_tensor_file", "write_tensors"]
