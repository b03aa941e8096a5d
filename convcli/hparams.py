"""Hyperparameters from files and command-line flags, merged into a :class:`ConvSpec`.

File values (HDF5 attributes, NPZ entries) arrive as plain Python values with a text
saying where they came from; flag values arrive as strings. Flags win over the file.
A bad value names itself and its origin: a flag is a usage error (exit 2), a file value
a data error (exit 65).
"""

from __future__ import annotations

import numbers

from convcli.errors import ConvcliError, HyperparameterError, UsageError
from convcli.spec import LAYOUTS, PADDING_MODES, ConvSpec

NAMES = ("stride", "padding", "dilation", "groups", "padding_mode", "layout")
DEFAULTS = {
    "stride": 1,
    "padding": 0,
    "dilation": 1,
    "groups": 1,
    "padding_mode": "zeros",
    "layout": "nhwc",
}
WORDS = {
    "padding_mode": PADDING_MODES,
    "layout": tuple(LAYOUTS),
}


def parse_flag(name: str, text: str):
    """Parse ``--stride``/``--dilation`` (``2`` or ``1,2``), ``--groups`` (``2``) or ``--pad``
    (``2``, ``1,2``, ``1,2,0,1`` = top,bottom,left,right, ``same``, ``valid``).

    Raises
    ------
    UsageError
        Naming the flag and the text.
    """
    flag = _flag(name)
    cleaned = text.strip().lower()
    if name in WORDS:
        if cleaned not in WORDS[name]:
            raise UsageError(f"{flag} {text!r}: {_expected(name)}")
        return cleaned
    if name == "padding" and cleaned in ("same", "valid"):
        return cleaned
    try:
        values = [int(part) for part in cleaned.split(",")]
    except ValueError:
        raise UsageError(f"{flag} {text!r}: {_expected(name)}") from None
    return _from_ints(name, values, f"{flag} {text!r}", UsageError)


def from_file_value(name: str, raw, origin: str):
    """Convert a raw file value (int, float, str, list, nested list) for ``name``.

    Integral floats (2.0) are accepted; 1.5, booleans and other types are refused with a
    HyperparameterError naming ``origin``.
    """
    where = f"{name} = {raw!r} from {origin}"
    if name in WORDS:
        if not isinstance(raw, str) or raw.strip().lower() not in WORDS[name]:
            raise HyperparameterError(f"{where}: {_expected(name)}")
        return raw.strip().lower()
    if isinstance(raw, str):
        if name == "padding" and raw.strip().lower() in ("same", "valid"):
            return raw.strip().lower()
        raise HyperparameterError(f"{where}: {_expected(name)}")
    if name == "padding" and isinstance(raw, list) and all(isinstance(v, list) for v in raw):
        if 1 <= len(raw) <= 3 and all(len(v) == 2 for v in raw):
            flat = [_file_int(name, v, where) for pair in raw for v in pair]
            return _from_ints(name, flat, where, HyperparameterError, pairs=True)
        raise HyperparameterError(f"{where}: {_expected(name)}")
    values = raw if isinstance(raw, list) else [raw]
    ints = [_file_int(name, v, where) for v in values]
    return _from_ints(name, ints, where, HyperparameterError)


def _file_int(name: str, value, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise HyperparameterError(f"{where}: {_expected(name)}")
    if isinstance(value, numbers.Integral):
        return int(value)
    if float(value).is_integer():
        return int(value)
    raise HyperparameterError(f"{where}: must be a whole number")


def _from_ints(name, values: list[int], where: str, error: type[ConvcliError], pairs=False):
    """Check counts and ranges; one value -> int, several -> tuple (pairs -> tuple of pairs)."""
    counts = (1, 2, 3, 4, 6) if name == "padding" else (1,) if name == "groups" else (1, 2, 3)
    if len(values) not in counts:
        raise error(f"{where}: {_expected(name)}")
    minimum = 0 if name == "padding" else 1
    if any(v < minimum for v in values):
        raise error(f"{where}: must be >= {minimum}")
    if pairs:
        return tuple((values[i], values[i + 1]) for i in range(0, len(values), 2))
    return values[0] if len(values) == 1 else tuple(values)


def _flag(name: str) -> str:
    return {"padding": "--pad", "padding_mode": "--padding-mode"}.get(name, f"--{name}")


def _expected(name: str) -> str:
    return {
        "stride": "expected an integer >= 1, or one per spatial axis like 1,2",
        "dilation": "expected an integer >= 1, or one per spatial axis like 1,2",
        "groups": "expected an integer >= 1",
        "padding": (
            "expected N, one per axis (PH,PW), before,after per axis (TOP,BOTTOM,LEFT,RIGHT), "
            "'same' or 'valid'"
        ),
        "padding_mode": f"expected one of {', '.join(PADDING_MODES)}",
        "layout": "expected nhwc (channels last) or nchw (channels first)",
    }[name]


def build_spec(file_values: dict, flags: dict) -> tuple[ConvSpec, dict[str, str]]:
    """Merge file hyperparameters and flags into a ConvSpec.

    Parameters
    ----------
    file_values : dict name -> (raw value, origin text), names from :data:`NAMES`
    flags : dict name -> flag text or None

    Returns
    -------
    spec : ConvSpec
    origins : dict name -> "flag", the file origin text, or "default"
    """
    values, origins = dict(DEFAULTS), dict.fromkeys(NAMES, "default")
    for name, (raw, origin) in file_values.items():
        values[name] = from_file_value(name, raw, origin)
        origins[name] = origin
    for name, text in flags.items():
        if text is not None:
            values[name] = parse_flag(name, text)
            origins[name] = "flag"
    return ConvSpec(**values), origins
