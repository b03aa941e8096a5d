"""convcli: run and check 2-D convolution layers.

Layout: activations NHWC ``(n, H, W, C)``, weights HWIO ``(kh, kw, Cin / groups, Cout)``.

>>> from convcli import ConvSpec, conv_forward, conv_backward
>>> z, cache = conv_forward(x, w, b, ConvSpec(stride=2, padding=2))   # doctest: +SKIP
>>> dx, dw, db = conv_backward(dz, cache)                             # doctest: +SKIP
"""

from importlib.metadata import PackageNotFoundError, version

from convcli.engine import DEFAULT_WORKSPACE, conv_backward, conv_forward
from convcli.errors import (
    ConvcliError,
    ConvcliNotice,
    DataError,
    DtypeError,
    HyperparameterError,
    InputFileError,
    OutputError,
    ShapeError,
    UsageError,
)
from convcli.operands import ConvCache
from convcli.reference import conv_backward_reference, conv_forward_reference
from convcli.spec import ConvSpec, Geometry, output_size

try:
    __version__ = version("convcli")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0+unknown"

__all__ = [
    "DEFAULT_WORKSPACE",
    "ConvCache",
    "ConvSpec",
    "ConvcliError",
    "ConvcliNotice",
    "DataError",
    "DtypeError",
    "Geometry",
    "HyperparameterError",
    "InputFileError",
    "OutputError",
    "ShapeError",
    "UsageError",
    "__version__",
    "conv_backward",
    "conv_backward_reference",
    "conv_forward",
    "conv_forward_reference",
    "output_size",
]
