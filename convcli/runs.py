"""One forward or backward run: the library behind ``convcli forward`` / ``convcli backward``.

Takes arrays (NHWC x, HWIO w, b, optional dz) and a :class:`ConvSpec`, runs an engine and
returns a :class:`RunResult` holding every tensor with its role and origin. No I/O here.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field

import numpy as np

from convcli.engine import DEFAULT_WORKSPACE, conv_backward, conv_forward
from convcli.errors import ConvcliNotice, UsageError
from convcli.reference import conv_backward_reference, conv_forward_reference
from convcli.spec import ConvSpec

ENGINES = {
    "fast": (conv_forward, conv_backward),
    "reference": (conv_forward_reference, conv_backward_reference),
}
UPSTREAMS = ("z", "ones", "random")


@dataclass
class Tensor:
    """A tensor in a run: its array, role ("input" or "output") and where it came from."""

    array: np.ndarray
    role: str
    origin: str


@dataclass
class RunResult:
    """Everything a run produced, in display order (inputs first)."""

    command: str
    engine: str
    hparams: dict
    tensors: dict[str, Tensor]
    seconds: float
    outputs: tuple[str, ...]
    notices: list[str] = field(default_factory=list)

    def arrays(self) -> dict[str, np.ndarray]:
        return {name: tensor.array for name, tensor in self.tensors.items()}


def _engine(name: str):
    if name not in ENGINES:
        raise UsageError(f"unknown engine {name!r}; choose from {', '.join(ENGINES)}")
    return ENGINES[name]


def run_forward(
    arrays: dict[str, np.ndarray],
    spec: ConvSpec,
    *,
    engine: str = "fast",
    origins: dict[str, str] | None = None,
    workspace: int = DEFAULT_WORKSPACE,
) -> RunResult:
    """Run ``z = conv(x, w) + b``; ``arrays`` holds x (n,H,W,Cin), w (kh,kw,Cin/g,Cout), b."""
    forward, _ = _engine(engine)
    origins = origins or {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvcliNotice)
        start = time.perf_counter()
        z, cache = forward(arrays["x"], arrays["w"], arrays.get("b"), spec, workspace=workspace)
        seconds = time.perf_counter() - start
    tensors = _inputs(arrays, ("x", "w", "b"), origins)
    tensors["z"] = Tensor(z, "output", "computed")
    return RunResult(
        command="forward",
        engine=engine,
        hparams=cache.geometry.hparams(),
        tensors=tensors,
        seconds=seconds,
        outputs=("z",),
        notices=_notices(caught),
    )


def run_backward(
    arrays: dict[str, np.ndarray],
    spec: ConvSpec,
    *,
    engine: str = "fast",
    upstream: str = "z",
    seed: int | None = None,
    origins: dict[str, str] | None = None,
    workspace: int = DEFAULT_WORKSPACE,
) -> RunResult:
    """Run forward then backward; dz is ``arrays["dz"]`` when present, else from ``upstream``.

    ``upstream``: ``"z"`` (dz = z, the loss ½‖z‖²), ``"ones"`` (loss Σz) or ``"random"``
    (standard normal, seeded by ``seed``).
    """
    forward, backward = _engine(engine)
    if upstream not in UPSTREAMS:
        raise UsageError(f"--upstream {upstream!r}: choose from {', '.join(UPSTREAMS)}")
    origins = dict(origins or {})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvcliNotice)
        start = time.perf_counter()
        z, cache = forward(arrays["x"], arrays["w"], arrays.get("b"), spec, workspace=workspace)
        dz = arrays.get("dz")
        if dz is None:
            dz = _upstream(z, upstream, seed)
            origins["dz"] = f"--upstream {upstream}" + (
                f" --seed {seed}" if upstream == "random" else ""
            )
        dx, dw, db = backward(dz, cache)
        seconds = time.perf_counter() - start
    tensors = _inputs(arrays, ("x", "w", "b"), origins)
    tensors["z"] = Tensor(z, "output", "computed")
    tensors["dz"] = Tensor(np.asarray(dz), "input", origins.get("dz", "given"))
    outputs = ("dx", "dw") if db is None else ("dx", "dw", "db")
    for name, value in zip(("dx", "dw", "db"), (dx, dw, db), strict=True):
        if value is not None:
            tensors[name] = Tensor(value, "output", "computed")
    return RunResult(
        command="backward",
        engine=engine,
        hparams=cache.geometry.hparams(),
        tensors=tensors,
        seconds=seconds,
        outputs=outputs,
        notices=_notices(caught),
    )


def _upstream(z: np.ndarray, mode: str, seed: int | None) -> np.ndarray:
    if mode == "z":
        return z.copy()
    if mode == "ones":
        return np.ones_like(z)
    return np.random.default_rng(seed).standard_normal(z.shape).astype(z.dtype)


def _inputs(arrays, names, origins) -> dict[str, Tensor]:
    return {
        name: Tensor(np.asarray(arrays[name]), "input", origins.get(name, "given"))
        for name in names
        if arrays.get(name) is not None
    }


def _notices(caught) -> list[str]:
    return [str(w.message) for w in caught if issubclass(w.category, ConvcliNotice)]
