"""Layers' weights by the names frameworks save them under: one table of naming schemes.

A file saved by a framework holds many layers' weights under names such as
``layer2.0.conv1.weight``; :func:`find_layers` reads those names (the keys alone, whatever
the file's format) and finds each layer's weight and bias:

============ ===================================== ===================================== ======
scheme       weight key                            bias key                              layout
============ ===================================== ===================================== ======
PyTorch      ``NAME.weight`` (state dict)          ``NAME.bias``                         nchw
Keras 3      ``…layers/NAME/vars/0`` (.weights.h5) ``…layers/NAME/vars/1``               nhwc
Keras 2      ``…/NAME/kernel:0`` (.h5)             ``…/NAME/bias:0``                     nhwc
============ ===================================== ===================================== ======

PyTorch stores convolution weights OIHW ``(Cout, Cin/groups, *kernel)``, convcli's ``nchw``
layout; Keras stores them HWIO ``(*kernel, Cin/groups, Cout)``, convcli's ``nhwc``. In a
Keras 2 file the layer's group holds its variables under the layer's name again
(``model_weights/conv2d/conv2d/kernel:0``); NAME is the component before ``kernel:0``.
Keras 3 names that occur in two places (nested models) are given as their full group path.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class Scheme:
    """One way frameworks name a layer's weights.

    Attributes
    ----------
    name : str
        Who saves files this way (``"PyTorch"``).
    weight : re.Pattern
        Matches a weight key; group ``name`` is the layer's name, group ``group`` the part
        of the key that the bias key shares.
    bias : str
        The bias key, as a template of ``group`` (``"{group}.bias"``).
    layout : str
        The layout its weights imply: ``"nchw"`` (OIHW weights) or ``"nhwc"`` (HWIO).
    """

    name: str
    weight: re.Pattern
    bias: str
    layout: str


SCHEMES: tuple[Scheme, ...] = (
    Scheme("PyTorch", re.compile(r"(?P<group>(?P<name>[^/]+))\.weight"), "{group}.bias", "nchw"),
    Scheme(
        "Keras 3",
        re.compile(r"(?P<group>(?:.*/)?layers/(?P<name>[^/]+))/vars/0"),
        "{group}/vars/1",
        "nhwc",
    ),
    Scheme(
        "Keras 2",
        re.compile(r"(?P<group>(?:.*/)?(?P<name>[^/]+))/kernel:0"),
        "{group}/bias:0",
        "nhwc",
    ),
)


@dataclass(frozen=True)
class Layer:
    """One layer's weights in a file: its name, the keys of its weight and bias, its scheme."""

    name: str
    weight: str
    bias: str | None
    scheme: Scheme

    def describe(self) -> str:
        """``"conv1.weight, conv1.bias"``: the keys it uses."""
        return ", ".join(key for key in (self.weight, self.bias) if key is not None)


def find_layers(keys: Iterable[str], rank: Callable[[str], int] | None = None) -> dict[str, Layer]:
    """Every layer whose weights ``keys`` hold, by name, in the order of ``keys``.

    Parameters
    ----------
    keys : iterable of str
        The file's tensor keys (HDF5 paths without the leading ``/``).
    rank : callable, optional
        Number of axes of a key's tensor; when given, only layers whose weight has 3 to 5
        axes (a 1-D to 3-D convolution kernel) are kept: batch norms and dense layers also
        have weights.

    Returns
    -------
    dict of str to Layer
        The layer's name (the Keras 3 group path when its name occurs twice; the weight's
        key when two schemes give the same group) -> Layer.
    """
    keys = list(keys)
    present = set(keys)
    found: list[Layer] = []
    for key in keys:
        for scheme in SCHEMES:
            match = scheme.weight.fullmatch(key)
            if match is not None:
                bias = scheme.bias.format(group=match["group"])
                found.append(Layer(match["name"], key, bias if bias in present else None, scheme))
                break
    if rank is not None:
        found = [layer for layer in found if 3 <= rank(layer.weight) <= 5]
    counts: dict[str, int] = {}
    for layer in found:
        counts[layer.name] = counts.get(layer.name, 0) + 1
    names = [layer.name if counts[layer.name] == 1 else _group(layer) for layer in found]
    taken: dict[str, int] = {}
    for name in names:
        taken[name] = taken.get(name, 0) + 1
    layers: dict[str, Layer] = {}
    for layer, name in zip(found, names, strict=True):
        if taken[name] > 1:  # two schemes, one group (conv1.weight, conv1/kernel:0): the key
            name = layer.weight
        layers[name] = Layer(name, layer.weight, layer.bias, layer.scheme)
    return layers


def _group(layer: Layer) -> str:
    """The key of ``layer``'s weight without the scheme's suffix (a unique name)."""
    match = layer.scheme.weight.fullmatch(layer.weight)
    return match["group"] if match is not None else layer.weight
