"""The classic exercise's files, written anywhere: what the help examples' ``sample_data/`` holds.

The layer of the classic NHWC convolution exercise — A_prev ``(10, 4, 4, 3)``, W
``(2, 2, 3, 8)``, b ``(1, 1, 1, 8)``, float64, pad 2 and stride 2 stored beside them — is made
again from the exercise's own seed (NumPy's global generator seeded with 1, as the exercise
does) rather than shipped twice, as ``conv_example.npz`` and ``conv_example.h5``; the commented
sweep spec ``sweep.toml`` is package data. A clone's ``sample_data/`` holds the same files
(a test keeps them equal).
"""

from __future__ import annotations

import os
from importlib.resources import files
from pathlib import Path

import numpy as np

from convcli.errors import OutputError, OutputExistsError
from convcli.io.writing import atomic_output, check_target, write_tensors

EXAMPLE_FILES = ("conv_example.npz", "conv_example.h5", "sweep.toml")
_TEXT_FILES = ("sweep.toml",)


def classic_layer() -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """The classic exercise's tensors and hyperparameters.

    Returns
    -------
    tensors : dict of str to numpy.ndarray
        ``A_prev`` of shape ``(10, 4, 4, 3)`` (NHWC), ``W`` of shape ``(2, 2, 3, 8)`` (HWIO),
        ``b`` of shape ``(1, 1, 1, 8)``, float64, standard normal from the exercise's seed.
    hparams : dict of str to int
        ``{"pad": 2, "stride": 2}``.
    """
    # The exercise seeds NumPy's global generator; a private RandomState with the same
    # seed draws the same numbers without touching the caller's global state.
    rng = np.random.RandomState(1)
    tensors = {
        "A_prev": rng.randn(10, 4, 4, 3),
        "W": rng.randn(2, 2, 3, 8),
        "b": rng.randn(1, 1, 1, 8),
    }
    return tensors, {"pad": 2, "stride": 2}


def write_examples(folder: str | os.PathLike[str], *, force: bool = False) -> list[Path]:
    """Write :data:`EXAMPLE_FILES` into ``folder`` (made, with its parents, when missing).

    Parameters
    ----------
    folder : str or os.PathLike
        Where to write.
    force : bool
        Overwrite files of these names already there (each is replaced whole, atomically).

    Returns
    -------
    list of pathlib.Path
        The files written, in :data:`EXAMPLE_FILES` order.

    Raises
    ------
    OutputExistsError
        Without ``force``, when any of the files exists (``param="force"``); nothing is
        written then.
    OutputError
        ``folder`` cannot be made (a file is in the way) or written to (``param="folder"``).
    """
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"{folder}: cannot make the folder ({exc.strerror or exc})") from exc
    targets = [folder / name for name in EXAMPLE_FILES]
    existing = [str(path) for path in targets if os.path.lexists(path)]
    if existing and not force:
        raise OutputExistsError(
            f"{', '.join(existing)} {'exists' if len(existing) == 1 else 'exist'}; "
            "nothing was written",
            param="force",
        )
    for path in targets:
        check_target(path, force=force, protect=(), param="folder")
    tensors, hparams = classic_layer()
    for path in targets:
        if path.name in _TEXT_FILES:
            data = files(__name__).joinpath(path.name).read_bytes()
            with atomic_output(path) as (fd, _):
                _write_all(fd, data)
        else:
            write_tensors(path, tensors, hparams, force=force, param="folder")
    return targets


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
