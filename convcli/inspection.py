"""What a tensor file holds, for ``convcli inspect``: read from headers, never the data.

Its problems are what ``forward``/``backward`` would refuse about the file without reading
data: truncated or absurd headers, datasets declaring far more than the file stores (a
never-written dataset or a bomb), missing HDF5 filters, data in other files, ambiguous roles,
hyperparameters that cannot be read, and shapes that do not fit the roles.
"""

from __future__ import annotations

from typing import Any

from convcli.errors import DataError
from convcli.hparams import FILE_KEYS, build_spec
from convcli.io.tensorfile import ALIASES, TensorFile, open_tensor_file, origin_text
from convcli.run import check_shapes


def inspect_file(path) -> dict:
    """Tensors (key, shape, dtype, bytes), the tensor each role would use, and hyperparameters.

    Returns
    -------
    dict
        ``{"file", "format", "tensors": [{"key", "shape", "dtype", "bytes", "role"}], "roles":
        {"x": key or None, ...}, "layers": {name: {"weight", "bias", "scheme", "layout"}},
        "hparams": {name: value}, "origins": {name: text}, "metadata": {name: text}, "problems":
        [one-line messages]}``. ``layers`` are the convolution layers whose weights the file
        holds under a framework's names (the ``layer`` parameter); their tensors have
        ``"layer"``. A tensor convcli does not read (safetensors' FP8) has ``None`` for
        shape, dtype and bytes, and its refusal among the problems. A tensor read in another
        dtype than the file's has ``"stored_dtype"`` (safetensors' ``"bfloat16"``, read as
        float32); ``metadata`` is what the file says of
        itself (safetensors' ``__metadata__``; empty for other formats). ``hparams`` are what
        forward/backward would use without flags (padding resolved when x and w are both found).
    """
    problems: list[str] = []
    with open_tensor_file(path) as tensor_file:
        keys = tensor_file.keys()  # a TensorFile, not a dict
        tensors = [_entry(tensor_file, key, problems) for key in keys]
        metadata = tensor_file.reader.metadata()
        roles: dict[str, str | None] = {}
        if tensor_file.format != "npy":
            for role in ALIASES:
                try:
                    roles[role] = tensor_file.find(role)
                except DataError as error:
                    roles[role] = None
                    problems.append(str(error))
        by_key = {t["key"]: t for t in tensors}
        layers = _layers(tensor_file, by_key)
        for role, found in roles.items():
            if found is not None and found in by_key:
                by_key[found]["role"] = role
        for entry in tensors:
            if tensor_file.format == "npz" and entry["key"] in FILE_KEYS:
                entry["role"] = "hyperparameter"
        try:
            raw = tensor_file.hparams(near_key=roles.get("x"))
        except DataError as error:
            raw = {}
            problems.append(str(error))
        shapes = {
            role: by_key[key]["shape"]
            for role, key in roles.items()
            if key in by_key and by_key[key]["shape"] is not None
        }
        readable = {t["key"] for t in tensors if t["dtype"] is not None}
        dtypes = {
            role: tensor_file.shape_dtype(key)[1]
            for role, key in roles.items()
            if key is not None and key in readable
        }
        fmt = tensor_file.format
        where = {role: origin_text(tensor_file, key) for role, key in roles.items() if key}
    hparams: dict[str, Any] = {}
    origins: dict[str, str] = {}
    try:
        rank = len(shapes["x"]) - 2 if "x" in shapes else None
        resolved = build_spec(raw, {}, rank)
        spec, origins = resolved.spec, resolved.origins
        hparams = {  # as stored: one value for every axis, or per axis
            "stride": list(spec.stride),
            "padding": spec.padding if isinstance(spec.padding, str) else _plain(spec.padding),
            "dilation": list(spec.dilation),
            "groups": spec.groups,
            "padding_mode": spec.padding_mode,
            "layout": spec.layout,
        }
        if "x" in shapes and "w" in shapes:
            try:
                command = "backward" if "dz" in shapes else "forward"
                geometry, _ = check_shapes(command, shapes, dtypes, spec)
                hparams = geometry.hparams()
            except DataError as error:
                problems.append(str(error))
    except DataError as error:
        problems.append(str(error))
    return {
        "command": "inspect",
        "file": str(path),
        "format": fmt,
        "tensors": tensors,
        "roles": {role: where.get(role) for role in ALIASES} if fmt != "npy" else {},
        "layers": layers,
        "hparams": hparams,
        "origins": origins,
        "metadata": metadata,
        "problems": problems,
    }


def _entry(tensor_file: TensorFile, key: str, problems: list[str]) -> dict[str, Any]:
    """``key``'s row (key, shape, dtype, bytes, role), its refusals added to ``problems``."""
    try:
        shape, dtype = tensor_file.shape_dtype(key)
    except DataError as error:
        if tensor_file.format != "safetensors":
            raise  # a corrupt header; a safetensors header was checked whole on opening,
        problems.append(str(error))  # so this is a dtype convcli does not read (FP8)
        return {"key": key, "shape": None, "dtype": None, "bytes": None, "role": None}
    problems += _refusal(tensor_file, key)
    entry: dict[str, Any] = {
        "key": key,
        "shape": list(shape),
        "dtype": str(dtype),
        "bytes": int(dtype.itemsize * _count(shape)),
        "role": None,
    }
    stored = tensor_file.reader.stored_dtype(key)
    if stored is not None:  # read as dtype (safetensors' float16 as float32)
        entry["stored_dtype"] = stored
    return entry


def _layers(tensor_file: TensorFile, by_key: dict[str, dict]) -> dict[str, dict]:
    """The file's layers as JSON; each one's tensors in ``by_key`` get its name as "layer"."""
    layers = tensor_file.layers() if tensor_file.format != "npy" else {}
    for name, layer in layers.items():
        for key in (layer.weight, layer.bias):
            if key in by_key:
                by_key[key]["layer"] = name
    return {
        name: {
            "weight": layer.weight,
            "bias": layer.bias,
            "scheme": layer.scheme.name,
            "layout": layer.scheme.layout,
        }
        for name, layer in layers.items()
    }


def _refusal(tensor_file: TensorFile, key: str) -> list[str]:
    """What reading ``key`` would refuse from its header (empty: nothing), as messages."""
    try:
        tensor_file.check_readable(key)
    except DataError as error:
        return [str(error)]
    return []


def _plain(value):
    return [_plain(v) for v in value] if isinstance(value, tuple) else value


def _count(shape) -> int:
    total = 1
    for size in shape:
        total *= int(size)
    return total
