"""Random layer data for ``convcli generate``: x, w, b (and dz) plus hyperparameters.

Layout: x NHWC ``(n, H, W, Cin)``, w HWIO ``(kh, kw, Cin / groups, Cout)``, b ``(Cout,)``,
dz ``(n, Ho, Wo, Cout)``; standard normal values from ``seed`` in ``dtype``.
"""

from __future__ import annotations

import numpy as np

from convcli.engine.operands import w_from_last, x_from_last
from convcli.errors import HyperparameterError, UsageError
from convcli.spec import ConvSpec, in_layout

DTYPES = ("float32", "float64")


def _kernel_for(kernel, rank: int) -> tuple[int, ...]:
    if len(kernel) == 1:
        return tuple(kernel) * rank
    if len(kernel) != rank:
        raise UsageError(
            f"{{param}} has {len(kernel)} values; give 1 or {rank} (one per spatial axis)",
            param="kernel",
        )
    return tuple(kernel)


def check_generated_memory(shape, kernel, cout, spec, max_memory, *, dz=True, itemsize=8):
    """Refuse, before allocating, random tensors that would exceed ``max_memory`` bytes."""
    import math

    from convcli.memory import check_memory

    n, *spatial, cin = (int(v) for v in shape)
    taps = math.prod(_kernel_for(kernel, len(spatial)))
    positions = n * math.prod(spatial)
    check_memory(
        {
            "x": positions * cin * itemsize,
            "w": taps * cin * cout * itemsize,
            # at most as many outputs as stride 1 with 'same' padding gives
            "z and dz": positions * cout * itemsize * (2 if dz else 1),
        },
        max_memory,
    )


def generate_layer(
    shape, kernel, cout: int, spec: ConvSpec, *, seed: int | None = 0, dtype="float64", dz=False
) -> tuple[dict[str, np.ndarray], dict]:
    """Tensors (in the spec's layout) and hyperparameter attributes for one layer.

    Parameters
    ----------
    shape : (n, *spatial, Cin) — always channels-last order, 1 to 3 spatial axes
    kernel : one size for every axis, or one per axis

    Returns
    -------
    tensors : dict with x, w, b (and dz when ``dz``); the same values whatever the layout
    attrs : resolved hyperparameters as the other commands read them back
    """
    if str(dtype) not in DTYPES:
        raise UsageError(f"{{param}} {dtype!r}: choose from {', '.join(DTYPES)}", param="dtype")
    n, *spatial, cin = (int(v) for v in shape)
    kernel = _kernel_for(kernel, len(spatial))
    if cin % spec.groups or (spec.transposed and cout % spec.groups):
        raise HyperparameterError(
            f"groups={spec.groups} must divide both Cin={cin} and Cout={cout}"
        )
    x_shape = (n, *spatial, cin)
    layout = spec.layout
    geometry = spec.geometry(in_layout(x_shape, "x", layout), spec.weight_shape(kernel, cin, cout))
    w_shape = geometry.w_shape
    rng = np.random.default_rng(seed)
    tensors = {
        "x": x_from_last(rng.standard_normal(x_shape).astype(dtype), layout),
        "w": w_from_last(rng.standard_normal(w_shape).astype(dtype), layout),
        "b": rng.standard_normal(cout).astype(dtype),
    }
    if dz:
        tensors["dz"] = x_from_last(rng.standard_normal(geometry.out_shape).astype(dtype), layout)
    return tensors, geometry.hparams()
