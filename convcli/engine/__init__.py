"""The conv engines: the fast vectorized one and the plain-loop reference beside it.

Both take and return arrays in the :class:`~convcli.spec.ConvSpec`'s layout (channels last by
default: x ``(n, *spatial, Cin)``, w ``(*kernel, Cin/groups, Cout)``, or ``(*kernel,
Cout/groups, Cin)`` for a transposed convolution), float32 or float64.

- :mod:`convcli.engine.operands`: checking and converting the arrays a call receives, the
  :class:`ConvCache` a forward pass hands to backward.
- :mod:`convcli.engine.fast`: the fast engine's two calls, its worker threads (and how
  parallel tiles stay race-free), the scratch kept between calls.
- :mod:`convcli.engine.tiling`: how a call is cut into cache-sized tiles under the workspace,
  each tile's patch matrix and padded buffers, the waves of tiles that may run together.
- :mod:`convcli.engine.kernels`: the arithmetic of a tile: grouped GEMM, depthwise einsum
  kernels, dx as a transposed convolution (or, depthwise, one per phase of the stride).
- :mod:`convcli.engine.reference`: one loop per output element; the readable oracle.
"""

from convcli.engine.fast import DEFAULT_WORKSPACE, conv_backward, conv_forward, scratch_bytes
from convcli.engine.operands import ConvCache
from convcli.engine.reference import conv_backward_reference, conv_forward_reference

__all__ = [
    "DEFAULT_WORKSPACE",
    "ConvCache",
    "conv_backward",
    "conv_backward_reference",
    "conv_forward",
    "conv_forward_reference",
    "scratch_bytes",
]
