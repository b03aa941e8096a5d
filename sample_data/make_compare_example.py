"""Regenerate compare_float32.npz, compare_mistakes.npz and framework_dump.npz: results to
check with `compare`.

    python sample_data/make_compare_example.py

Both hold results for the layer of conv_example.npz (pad 2, stride 2), under the names a
course's code uses (``Z``, ``dA_prev``, ``dW``, ``db``), with dz = Z (the loss ½‖Z‖²):

- compare_float32.npz: convcli's engine run in float32 (a correct float32 computation);
- compare_mistakes.npz: Z computed with pad 1 instead of 2, dW divided by the batch size
  (a mean instead of a sum), dA_prev and db correct.

framework_dump.npz stands in for arrays dumped from a framework's Conv2d (here computed by
convcli's engine in float32, since PyTorch is not a dependency): channels first, float32,
under PyTorch's names (``input``, ``weight``, ``bias``, ``output``, ``grad_output``,
``grad_input``, ``grad_weight``, ``grad_bias``), with stride 2, padding 1 and layout nchw
stored beside them.
"""

from pathlib import Path

import numpy as np

from convcli import ConvSpec, conv_backward, conv_forward

HERE = Path(__file__).resolve().parent


def main() -> None:
    layer = np.load(HERE / "conv_example.npz")
    x, w, b = layer["A_prev"], layer["W"], layer["b"]
    spec = ConvSpec(stride=2, padding=2)
    z32, cache = conv_forward(*(a.astype(np.float32) for a in (x, w, b)), spec)
    dx32, dw32, db32 = conv_backward(z32, cache)
    np.savez(HERE / "compare_float32.npz", Z=z32, dA_prev=dx32, dW=dw32, db=db32)
    z, cache = conv_forward(x, w, b, spec)
    dx, dw, db = conv_backward(z, cache)
    z_pad1 = conv_forward(x, w, b, ConvSpec(stride=2, padding=1))[0]
    np.savez(HERE / "compare_mistakes.npz", Z=z_pad1, dA_prev=dx, dW=dw / len(x), db=db)
    framework_dump(np.random.default_rng(2026))


def framework_dump(rng: np.random.Generator) -> None:
    x = rng.standard_normal((2, 3, 9, 9)).astype(np.float32)  # (N, C, H, W)
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)  # (Cout, Cin, kh, kw)
    b = rng.standard_normal(4).astype(np.float32)
    spec = ConvSpec(stride=2, padding=1, layout="nchw")
    z, cache = conv_forward(x, w, b, spec)
    g = rng.standard_normal(z.shape).astype(np.float32)
    dx, dw, db = conv_backward(g, cache)
    np.savez(
        HERE / "framework_dump.npz",
        input=x,
        weight=w,
        bias=b,
        output=z,
        grad_output=g,
        grad_input=dx,
        grad_weight=dw,
        grad_bias=db,
        stride=np.int64(2),
        padding=np.int64(1),
        layout=np.str_("nchw"),
    )


if __name__ == "__main__":
    main()
