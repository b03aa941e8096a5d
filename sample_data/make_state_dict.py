"""Regenerate state_dict.safetensors: a small PyTorch-style state dict, written with the
``safetensors`` package (``pip install safetensors``; no PyTorch needed).

    python sample_data/make_state_dict.py

``conv1.weight`` (8, 3, 3, 3) and ``conv1.bias`` (8,) in float32, ``layer2.0.conv1.weight``
(8, 8, 1, 1) in float16: weights are OIHW, so runs with them take ``--layout nchw``.
"""

from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

HERE = Path(__file__).resolve().parent


def main() -> None:
    rng = np.random.default_rng(14)
    tensors = {
        "conv1.weight": rng.standard_normal((8, 3, 3, 3)).astype(np.float32),
        "conv1.bias": rng.standard_normal(8).astype(np.float32),
        "layer2.0.conv1.weight": rng.standard_normal((8, 8, 1, 1)).astype(np.float16),
    }
    save_file(tensors, str(HERE / "state_dict.safetensors"), metadata={"format": "pt"})


if __name__ == "__main__":
    main()
