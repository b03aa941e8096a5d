"""Regenerate conv_example.npz and conv_example.h5: the classic NHWC convolution exercise.

    python sample_data/make_conv_example.py

A_prev (10, 4, 4, 3), W (2, 2, 3, 8), b (1, 1, 1, 8), all float64, with pad = 2 and
stride = 2 stored beside them (NPZ entries; HDF5 root attributes). The exercise seeds
NumPy's global generator, so this script does too, to reproduce its exact numbers.
"""

from pathlib import Path

import h5py
import numpy as np

HERE = Path(__file__).resolve().parent


def main() -> None:
    np.random.seed(1)  # noqa: NPY002 - the exercise's own seeding, kept to reproduce it
    a_prev = np.random.randn(10, 4, 4, 3)  # noqa: NPY002
    w = np.random.randn(2, 2, 3, 8)  # noqa: NPY002
    b = np.random.randn(1, 1, 1, 8)  # noqa: NPY002
    np.savez(HERE / "conv_example.npz", A_prev=a_prev, W=w, b=b, pad=2, stride=2)
    with h5py.File(HERE / "conv_example.h5", "w") as f:
        f.create_dataset("A_prev", data=a_prev)
        f.create_dataset("W", data=w)
        f.create_dataset("b", data=b)
        f.attrs["pad"] = 2
        f.attrs["stride"] = 2


if __name__ == "__main__":
    main()
