"""Tensor files: detecting a format, reading arrays and hyperparameters, writing atomically.

One module per format, each with a reader (and, for output formats, a writer) of one
interface (:mod:`convcli.io.reader`), listed in :mod:`convcli.io.formats`:

- :mod:`convcli.io.npy`, :mod:`convcli.io.npz`, :mod:`convcli.io.hdf5`,
  :mod:`convcli.io.safetensors`: the formats.
- :mod:`convcli.io.detect`: ``PATH[:KEY]`` references, regular-file checks, format by content.
- :mod:`convcli.io.tensorfile`: :class:`TensorFile` (any format, roles by name, memory guard)
  and :func:`read_tensor`.
- :mod:`convcli.io.loading`: which array is x, w, b or dz, and arrays left on disk to stream.
- :mod:`convcli.io.writing`: outputs written to a temporary file and renamed into place.
"""

from convcli.io.tensorfile import TensorFile, open_tensor_file, read_tensor
from convcli.io.writing import write_tensors

__all__ = ["TensorFile", "open_tensor_file", "read_tensor", "write_tensors"]
