"""Random layer data for ``convcli generate``: x, w, b (and dz) plus hyperparameters.

Layout: x NHWC ``(n, H, W, Cin)``, w HWIO ``(kh, kw, Cin / groups, Cout)``, b ``(Cout,)``,
dz ``(n, Ho, Wo, Cout)``; standard normal values from ``seed`` in ``dtype``.
"""

from __future__ import annotations

import numpy as np

from convcli.errors import UsageError
from convcli.spec import ConvSpec

DTYPES = ("float32", "float64")


def check_generated_memory(shape, kernel, cout, spec, max_memory, *, dz=True, itemsize=8):
    """Refuse, before allocating, random tensors that would exceed ``max_memory`` bytes."""
    from convcli.guards import check_memory

    n, h, w, cin = (int(v) for v in shape)
    kh, kw = (kernel[0], kernel[0]) if len(kernel) == 1 else kernel
    out_estimate = n * h * w * cout  # at most as many outputs as stride-1 'same' gives
    check_memory(
        {
            "x": n * h * w * cin * itemsize,
            "w": kh * kw * cin * cout * itemsize,
            "z and dz": out_estimate * itemsize * (2 if dz else 1),
        },
        max_memory,
    )


def generate_layer(
    shape, kernel, cout: int, spec: ConvSpec, *, seed: int | None = 0, dtype="float64", dz=False
) -> tuple[dict[str, np.ndarray], dict]:
    """Tensors and hyperparameter attributes for one layer.

    Returns
    -------
    tensors : dict with x, w, b (and dz when ``dz``)
    attrs : {"stride": [sh, sw], "padding": "same" or [[top, bottom], [left, right]],
             "dilation": [dh, dw], "groups": g}, as the other commands read them back
    """
    if str(dtype) not in DTYPES:
        raise UsageError(f"--dtype {dtype!r}: choose from {', '.join(DTYPES)}")
    n, h, w, cin = shape
    kh, kw = (kernel[0], kernel[0]) if len(kernel) == 1 else kernel
    if cin % spec.groups:
        from convcli.errors import HyperparameterError

        raise HyperparameterError(
            f"groups={spec.groups} must divide both Cin={cin} and Cout={cout}"
        )
    geometry = spec.geometry((n, h, w, cin), (kh, kw, cin // spec.groups, cout))
    rng = np.random.default_rng(seed)
    tensors = {
        "x": rng.standard_normal((n, h, w, cin)).astype(dtype),
        "w": rng.standard_normal((kh, kw, cin // spec.groups, cout)).astype(dtype),
        "b": rng.standard_normal(cout).astype(dtype),
    }
    if dz:
        tensors["dz"] = rng.standard_normal(geometry.out_shape).astype(dtype)
    padding = spec.padding if spec.padding == "same" else [list(p) for p in spec.padding]
    attrs = {
        "stride": list(spec.stride),
        "padding": padding,
        "dilation": list(spec.dilation),
        "groups": spec.groups,
    }
    return tensors, attrs
