"""convcli: run and check convolution layers (1 to 3 spatial axes, channels last or first).

Layout by default: activations NHWC ``(n, H, W, C)``, weights HWIO ``(kh, kw, Cin / groups,
Cout)``; ``ConvSpec(layout="nchw")`` takes PyTorch's NCHW / OIHW.

>>> from convcli import ConvSpec, conv_forward, conv_backward
>>> z, cache = conv_forward(x, w, b, ConvSpec(stride=2, padding=2))   # doctest: +SKIP
>>> dx, dw, db = conv_backward(dz, cache)                             # doctest: +SKIP

Names are imported on first use (so ``convcli --version`` and Ctrl-C during start-up stay
cheap and clean).
"""

from importlib import import_module
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("convcli")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0+unknown"

_EXPORTS = {
    # the engines (layouts and dtypes: see conv_forward's docstring)
    "DEFAULT_WORKSPACE": "convcli.engine",
    "ConvCache": "convcli.engine",
    "conv_backward": "convcli.engine",
    "conv_forward": "convcli.engine",
    "conv_backward_reference": "convcli.engine",
    "conv_forward_reference": "convcli.engine",
    # hyperparameters and shapes
    "ConvSpec": "convcli.spec",
    "Geometry": "convcli.spec",
    "output_size": "convcli.spec",
    "onnx_transposed_padding": "convcli.spec",
    "transposed_output_size": "convcli.spec",
    # checking
    "GradcheckResult": "convcli.check",
    "Tolerance": "convcli.check",
    "gradcheck": "convcli.check",
    # comparing saved results with convcli's
    "CompareRun": "convcli.compare",
    "run_compare": "convcli.compare",
    # planning a layer or a stack from shapes alone
    "LayerPlan": "convcli.plan",
    "StackPlan": "convcli.plan",
    "layer_shapes": "convcli.plan",
    "plan_file": "convcli.plan",
    "plan_layer": "convcli.plan",
    "plan_stack": "convcli.plan",
    # tensor files
    "open_tensor_file": "convcli.io",
    "read_tensor": "convcli.io",
    "write_tensors": "convcli.io",
    # errors
    "ConvcliError": "convcli.errors",
    "ConvcliNotice": "convcli.errors",
    "DataError": "convcli.errors",
    "DtypeError": "convcli.errors",
    "HyperparameterError": "convcli.errors",
    "InputFileError": "convcli.errors",
    "MemoryLimitError": "convcli.errors",
    "NonFiniteError": "convcli.errors",
    "OutputError": "convcli.errors",
    "OutputExistsError": "convcli.errors",
    "ShapeError": "convcli.errors",
    "UsageError": "convcli.errors",
}

__all__ = ["__version__", *sorted(_EXPORTS)]


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'convcli' has no attribute {name!r}")


def __dir__():
    return __all__
