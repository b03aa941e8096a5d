"""The calling conventions ("signatures") a user's convolution may have, as one table.

Each :class:`Adapter` says which names a user's file defines for it, how the arrays are laid
out, how the hyperparameters are passed and which hyperparameters it can express. The
checker always works channels last (x ``(n, *spatial, Cin)``, w ``(*kernel, Cin/groups,
Cout)``, b ``(Cout,)``, z ``(n, *out, Cout)``, float64); :meth:`Adapter.to_user` and
:meth:`Adapter.from_user` convert to and from the user's layout. The child process
(:mod:`convcli.check.impl_worker`) makes the calls with the same ``calling`` convention:

========== ============================================ ======== =========================
signature  functions                                    layout   hyperparameters
========== ============================================ ======== =========================
classic    conv_forward(A_prev, W, b, hparameters)       NHWC     {"stride": s, "pad": p}
           -> (Z, cache); conv_backward(dZ, cache)
           -> (dA_prev, dW, db); b (1, 1, 1, Cout)
cs231n     conv_forward_naive(x, w, b, conv_param)       NCHW     {"stride": s, "pad": p}
           -> (out, cache); conv_backward_naive(dout,
           cache) -> (dx, dw, db); also the ``_fast``
           names; w (F, C, HH, WW), b (F,)
callable   forward(x, w, b, *, stride, padding,         given    keyword arguments the
           dilation, groups) -> z; optional             (nhwc)   function accepts
           backward(dz, x, w, b, *, ...) -> (dx, dw,
           db); any rank
========== ============================================ ======== =========================
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from convcli.engine.operands import w_from_last, w_to_last, x_from_last, x_to_last
from convcli.errors import UsageError

HPARAMS = ("stride", "padding", "dilation", "groups")


@dataclass(frozen=True)
class Adapter:
    """One signature.

    ``pairs`` are the (forward, backward) function names that identify it in a file (empty
    for ``callable``, whose names are given); ``names`` the user's names for (z, dx, dw, db);
    ``calling`` how the child calls the functions ("hparameters" dict and a cache, or
    "keywords"); ``ranks`` the spatial ranks; ``features`` the hyperparameters beyond one
    integer stride and pad it can express ("dilation", "groups", "nonsquare" kernels,
    "padding_forms": padding "same" and "valid", "per_axis": a stride or dilation per axis
    and padding as ``(before, after)`` per axis).
    """

    name: str
    pairs: tuple[tuple[str, str], ...]
    names: tuple[str, str, str, str]
    calling: str
    ranks: tuple[int, ...]
    features: frozenset[str]
    layout: str = "nhwc"
    bias_4d: bool = False
    accepted: tuple[str, ...] = ("stride", "padding")

    def hparams(self, stride, pad, dilation, groups: int) -> dict:
        """The hyperparameters as the user's functions take them: the ``hparameters`` dict
        or the keyword arguments among :attr:`accepted`."""
        if self.calling == "hparameters":
            return {"stride": stride, "pad": pad}
        given = {"stride": stride, "padding": pad, "dilation": dilation, "groups": groups}
        return {name: value for name, value in given.items() if name in self.accepted}

    def to_user(self, x, w, b, dz=None) -> dict[str, np.ndarray]:
        """x, w, b (and dz) from channels last to the user's layout, keyed by role."""
        arrays = {
            "x": x_from_last(x, self.layout),
            "w": w_from_last(w, self.layout),
            "b": np.reshape(b, (1, 1, 1, -1)) if self.bias_4d else np.reshape(b, -1),
        }
        if dz is not None:
            arrays["dz"] = x_from_last(dz, self.layout)
        return arrays

    def user_shapes(self, x_shape, w_shape, z_shape) -> dict[str, tuple]:
        """The shapes the user's z, dx, dw, db must have, in the user's layout."""

        def moved(shape, to):
            return to(np.empty(shape, dtype=np.uint8), self.layout).shape

        cout = int(w_shape[-1])
        return {
            "z": moved(z_shape, x_from_last),
            "dx": moved(x_shape, x_from_last),
            "dw": moved(w_shape, w_from_last),
            "db": (1, 1, 1, cout) if self.bias_4d else (cout,),
        }

    def from_user(self, role: str, array: np.ndarray) -> np.ndarray:
        """One of the user's results (role z, dx, dw or db) back to channels last."""
        if role in ("z", "dx"):
            return np.ascontiguousarray(x_to_last(array, self.layout))
        if role == "dw":
            return np.ascontiguousarray(w_to_last(array, self.layout))
        return array.reshape(-1)


ADAPTERS: dict[str, Adapter] = {
    "classic": Adapter(
        name="classic",
        pairs=(("conv_forward", "conv_backward"),),
        names=("Z", "dA_prev", "dW", "db"),
        calling="hparameters",
        ranks=(2,),
        features=frozenset(),
        bias_4d=True,
    ),
    "cs231n": Adapter(
        name="cs231n",
        pairs=(
            ("conv_forward_naive", "conv_backward_naive"),
            ("conv_forward_fast", "conv_backward_fast"),
        ),
        names=("out", "dx", "dw", "db"),
        calling="hparameters",
        ranks=(2,),
        features=frozenset({"nonsquare"}),
        layout="nchw",
    ),
    "callable": Adapter(
        name="callable",
        pairs=(),
        names=("z", "dx", "dw", "db"),
        calling="keywords",
        ranks=(1, 2, 3),
        features=frozenset({"nonsquare", "dilation", "groups", "padding_forms", "per_axis"}),
        accepted=HPARAMS,
    ),
}

SIGNATURES = tuple(ADAPTERS)


def callable_adapter(layout: str, accepted: tuple[str, ...]) -> Adapter:
    """The ``callable`` adapter in ``layout`` ("nhwc" or "nchw"), supporting only the
    hyperparameters among ``accepted`` (the keyword names the user's forward takes)."""
    base = ADAPTERS["callable"]
    features = {f for f in base.features if f in accepted or f in ("nonsquare", "per_axis")}
    if "padding" in accepted:
        features.add("padding_forms")
    return Adapter(
        name=base.name,
        pairs=(),
        names=base.names,
        calling=base.calling,
        ranks=base.ranks,
        features=frozenset(features),
        layout=layout,
        accepted=tuple(h for h in HPARAMS if h in accepted),
    )


def detect(defined: set[str], signature: str | None = None) -> tuple[str, str, str | None]:
    """``(signature, forward name, backward name or None)`` from the names a file defines.

    Parameters
    ----------
    defined : set of str
        The callable names the user's file defines (those of :data:`ADAPTERS`' pairs).
    signature : str or None
        A signature to use instead of detecting one.

    Raises
    ------
    UsageError
        When ``signature`` is not a known name, or is ``callable`` (whose names are given).
    ValueError
        When no known forward is defined; the message lists what is expected.
    """
    if signature is not None and signature not in ADAPTERS:
        raise UsageError(
            f"{{param}} {signature!r}: must be one of {', '.join(SIGNATURES)}", param="signature"
        )
    if signature == "callable":
        raise UsageError(
            "{param} 'callable' needs the function names after the file: "
            "FILE.py:FORWARD[,BACKWARD]",
            param="signature",
        )
    candidates = [ADAPTERS[signature]] if signature else list(ADAPTERS.values())
    for adapter in candidates:
        for forward, backward in adapter.pairs:
            if forward in defined:
                return adapter.name, forward, backward if backward in defined else None
    expected = "; ".join(
        f"{a.name}: {' or '.join(f for f, _ in a.pairs)}" for a in candidates if a.pairs
    )
    raise ValueError(f"defines no function of a known signature ({expected})")


def known_names() -> tuple[str, ...]:
    """Every function name some adapter looks for in a user's file."""
    return tuple(name for a in ADAPTERS.values() for pair in a.pairs for name in pair)


@dataclass(frozen=True)
class Binding:
    """A user's file bound to a signature: the adapter and the function names to call
    (``backward`` None for a forward-only file)."""

    adapter: Adapter
    forward: str
    backward: str | None

    def name(self, role: str) -> str:
        """The user's name for role z, dx, dw or db."""
        return dict(zip(ROLES, self.adapter.names, strict=True)).get(role, role)

    def header(self, op: str, shapes: dict, hparams: dict) -> dict:
        """The child's request header for ``op`` ("forward" or "backward")."""
        return {
            "op": op,
            "calling": self.adapter.calling,
            "forward": self.forward,
            "backward": self.backward,
            "hparams": hparams,
            "names": dict(zip(ROLES, self.adapter.names, strict=True)),
            "expect": {role: list(shape) for role, shape in shapes.items()},
        }


ROLES = ("z", "dx", "dw", "db")
