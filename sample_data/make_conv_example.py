"""Regenerate conv_example.npz, conv_example.h5 and sweep.toml: the classic NHWC exercise.

    python sample_data/make_conv_example.py

The same as ``convcli example sample_data --force``: A_prev (10, 4, 4, 3), W (2, 2, 3, 8),
b (1, 1, 1, 8), all float64, with pad = 2 and stride = 2 stored beside them (NPZ entries;
HDF5 root attributes), drawn from the exercise's own seed (see
:func:`convcli.examples.classic_layer`).
"""

from pathlib import Path

from convcli.examples import write_examples

HERE = Path(__file__).resolve().parent


def main() -> None:
    write_examples(HERE, force=True)


if __name__ == "__main__":
    main()
