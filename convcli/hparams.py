"""The hyperparameter table: one row per convolution hyperparameter, read by every layer.

Each :class:`Hparam` row says, once, for one field of :class:`~convcli.spec.ConvSpec`: its
library name, the key files, sweep specs and the command line use (``pad`` for ``padding``)
and the other names files may use, its default, the values it takes and how to show it.
From the table come

- file reading (:data:`FILE_KEYS`; :meth:`Hparam.from_value` for HDF5 attributes, NPZ
  entries and TOML values),
- the command line's options (``convcli.cli`` builds one per row; :meth:`Hparam.from_text`
  parses its text),
- the sweep spec schema (:data:`SPELLINGS` keys and defaults),
- rendering and JSON (:func:`format_hparams`, :meth:`Hparam.format`).

Values are first read as *spellings* (what a person wrote: ``2``, ``(1, 2)``, ``"same"``, flat
before/after lists such as ``(1, 2, 0, 1)``), then made into a ConvSpec by :func:`spec_from`,
which needs the number of spatial axes to read a flat padding list: ``1,2`` is before/after
in 1-D but one value per axis in 2-D. Flat lists are a file and command-line spelling only;
``ConvSpec(padding=...)`` takes an int, one int per axis, ``((before, after), ...)``,
``"same"`` or ``"valid"``.

A bad value names itself and its origin: a command-line text is a usage error (exit 2,
``param`` set so the CLI names its flag), a file value a data error (exit 65) naming the file.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from convcli.errors import ConvcliError, HyperparameterError, UsageError
from convcli.spec import LAYOUTS, MAX_INT, MAX_SPATIAL_DIMS, PADDING_MODES, ConvSpec

Spelling = int | str | tuple
"""A hyperparameter as written: an int, a word, a tuple of ints or of (before, after) pairs."""


@dataclass(frozen=True)
class Hparam:
    """One row of the table.

    Attributes
    ----------
    name : str
        The ConvSpec field and library parameter (``"padding"``).
    key : str
        The name in files, sweep specs and on the command line (``"pad"``).
    aliases : tuple of str
        Other names accepted in files (``("padding",)``); sweep specs use :attr:`key` only.
    default : int or str
        The value when nothing is given.
    kind : str
        ``"ints"`` (one value, or one per spatial axis), ``"int"`` (one value), ``"padding"``
        (ints, before/after pairs, or a word), ``"word"`` (one of :attr:`words`) or
        ``"flag"`` (0 or 1; also true/false, yes/no; read as 0 or 1).
    words : tuple of str
        Accepted words (``"word"`` kind; ``same``/``valid`` for padding).
    expected : str
        What a valid value looks like, for messages.
    help : str
        One line for the command line's help (says nothing of flags).
    metavar : str
        The placeholder in the command line's help.
    shown_when_default : bool
        Whether :func:`format_hparams` shows the value when it is the default.
    minimum : int
        The smallest value of an integer kind.
    """

    name: str
    key: str
    aliases: tuple[str, ...]
    default: int | str
    kind: str
    expected: str
    help: str
    metavar: str
    words: tuple[str, ...] = ()
    shown_when_default: bool = True
    minimum: int = 1

    @property
    def file_keys(self) -> tuple[str, ...]:
        """Every name a file may use for this hyperparameter (:attr:`key` first)."""
        return tuple(dict.fromkeys((self.key, *self.aliases)))

    def from_text(self, text: str) -> Spelling:
        """Parse command-line text (``2``, ``1,2``, ``1,2,0,1``, ``same``, ``reflect``).

        Raises
        ------
        UsageError
            With ``param`` set to :attr:`name`, quoting the text.
        """
        cleaned = text.strip().lower()
        where = f"{{param}} {text!r}"
        if self.kind == "flag":
            if cleaned not in FLAG_WORDS:
                raise UsageError(f"{where}: {self.expected}", param=self.name)
            return FLAG_WORDS[cleaned]
        if self.kind == "word" or (self.kind == "padding" and cleaned in self.words):
            if cleaned not in self.words:
                raise UsageError(f"{where}: {self.expected}", param=self.name)
            return cleaned
        try:
            values = [int(part) for part in cleaned.split(",")]
        except ValueError:
            raise UsageError(f"{where}: {self.expected}", param=self.name) from None
        return self._checked(values, where, _usage(self.name))

    def from_value(self, raw: object, origin: str) -> Spelling:
        """Convert a value read from ``origin`` (an HDF5 attribute, NPZ entry, TOML value).

        ``raw`` is an int, float, str, list or nested list (NumPy values already made plain).
        Integral floats (2.0) are accepted; 1.5, booleans and other types are refused.

        Raises
        ------
        HyperparameterError
            Naming the value and ``origin``.
        """
        where = f"{self.name} = {shown(raw)} from {origin}"
        if self.kind == "flag":
            return _flag(raw, where, self.expected)
        if isinstance(raw, str):
            cleaned = raw.strip().lower()
            if cleaned in self.words:
                return cleaned
            raise HyperparameterError(f"{where}: {self.expected}")
        if self.kind == "word":
            raise HyperparameterError(f"{where}: {self.expected}")
        if self.kind == "padding" and isinstance(raw, list) and raw and _all_lists(raw):
            if len(raw) <= MAX_SPATIAL_DIMS and all(len(pair) == 2 for pair in raw):
                flat = [_whole(v, where) for pair in raw for v in pair]
                pairs = self._checked(flat, where, HyperparameterError, pairs=True)
                return pairs
            raise HyperparameterError(f"{where}: {self.expected}")
        values = raw if isinstance(raw, list) else [raw]
        return self._checked([_whole(v, where) for v in values], where, HyperparameterError)

    def _checked(
        self, values: list[int], where: str, error: Callable[[str], ConvcliError], pairs=False
    ) -> Spelling:
        """Check counts and ranges; one value -> int, several -> tuple (or tuple of pairs)."""
        counts = {"padding": (1, 2, 3, 4, 6), "int": (1,)}.get(self.kind, (1, 2, 3))
        if len(values) not in counts:
            raise error(f"{where}: {self.expected}")
        minimum = self.minimum
        if any(v < minimum for v in values):
            raise error(f"{where}: must be >= {minimum}")
        if any(v > MAX_INT for v in values):
            raise error(f"{where}: must be at most {MAX_INT:,}")
        if pairs:
            return tuple((values[i], values[i + 1]) for i in range(0, len(values), 2))
        return values[0] if len(values) == 1 else tuple(values)

    def format(self, value: object) -> str:
        """A resolved value (as in :meth:`~convcli.spec.Geometry.hparams`) for one line of text:
        ``[2, 2]`` -> ``2``, ``[[1, 1], [0, 0]]`` -> ``1,0``, ``[[1, 2]]`` -> ``1,2``."""
        if isinstance(value, bool):
            return str(int(value))
        if isinstance(value, str | int):
            return str(value)
        values = list(value)  # type: ignore[call-overload]  # a sequence by the table's kinds
        if values and isinstance(values[0], list | tuple):
            flat = [v for pair in values for v in pair]
            if len(set(flat)) == 1:
                return str(flat[0])
            if all(a == b for a, b in values):
                return ",".join(str(a) for a, _ in values)
            return ",".join(map(str, flat))
        return str(values[0]) if len(set(values)) == 1 else ",".join(map(str, values))


#: Values of a list shown in a message before it is abbreviated.
MAX_SHOWN = 16


def shown(raw: object) -> str:
    """``repr`` of a value read from a file, abbreviated: never more than about 200 characters
    (``array of 2000000 values``), whatever the file holds."""
    if isinstance(raw, list | tuple) and len(raw) > MAX_SHOWN:
        return f"array of {len(raw)} values"
    text = repr(raw)
    return text if len(text) <= 200 else text[:150] + f"... ({len(text):,} characters)"


FLAG_WORDS = {"0": 0, "1": 1, "false": 0, "true": 1, "no": 0, "yes": 1}
"""How a ``"flag"`` hyperparameter may be written, and the value each spelling means."""


def _flag(raw: object, where: str, expected: str) -> int:
    """A flag read from a file: a boolean, 0 or 1 (2.0-style floats too), or a flag word."""
    if isinstance(raw, str) and raw.strip().lower() in FLAG_WORDS:
        return FLAG_WORDS[raw.strip().lower()]
    if isinstance(raw, list) and len(raw) == 1:
        raw = raw[0]
    if isinstance(raw, bool):
        return int(raw)
    if isinstance(raw, numbers.Real) and raw in (0, 1):
        return 1 if raw == 1 else 0
    raise HyperparameterError(f"{where}: {expected}")


def _usage(name: str) -> Callable[[str], ConvcliError]:
    def error(message: str) -> ConvcliError:
        return UsageError(message, param=name)

    return error


def _all_lists(values: list) -> bool:
    return all(isinstance(v, list) for v in values)


def _whole(value: object, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise HyperparameterError(f"{where}: expected whole numbers")
    if isinstance(value, numbers.Integral):
        return int(value)
    number = float(value)
    if number.is_integer():
        return int(number)
    raise HyperparameterError(f"{where}: must be a whole number")


_PER_AXIS = "expected an integer >= 1, or one per spatial axis like 1,2"

HPARAMS: tuple[Hparam, ...] = (
    Hparam(
        name="stride",
        key="stride",
        aliases=(),
        default=1,
        kind="ints",
        expected=_PER_AXIS,
        help="N, or one per axis (H,W).",
        metavar="S",
    ),
    Hparam(
        name="padding",
        key="pad",
        aliases=("padding",),
        default=0,
        kind="padding",
        words=("same", "same_upper", "same_lower", "valid"),
        expected=(
            "expected N, one per axis (PH,PW), before,after per axis (TOP,BOTTOM,LEFT,RIGHT), "
            "'same' (or 'same_upper'), 'same_lower' or 'valid'"
        ),
        help=(
            "N; one per axis (H,W); before,after per axis (TOP,BOTTOM,LEFT,RIGHT); same "
            "(extra pixel last; also same_upper); same_lower (extra pixel first); valid."
        ),
        metavar="P",
        minimum=0,
    ),
    Hparam(
        name="dilation",
        key="dilation",
        aliases=(),
        default=1,
        kind="ints",
        expected=_PER_AXIS,
        help="N, or one per axis (1 = none).",
        metavar="D",
    ),
    Hparam(
        name="groups",
        key="groups",
        aliases=(),
        default=1,
        kind="int",
        expected="expected an integer >= 1",
        help="Channel groups.",
        metavar="G",
    ),
    Hparam(
        name="padding_mode",
        key="padding_mode",
        aliases=(),
        default="zeros",
        kind="word",
        words=PADDING_MODES,
        expected=f"expected one of {', '.join(PADDING_MODES)}",
        help="zeros, reflect, replicate or circular (PyTorch's).",
        metavar="MODE",
        shown_when_default=False,
    ),
    Hparam(
        name="layout",
        key="layout",
        aliases=(),
        default="nhwc",
        kind="word",
        words=tuple(LAYOUTS),
        expected="expected nhwc (channels last) or nchw (channels first)",
        help="nhwc (channels last, weights HWIO) or nchw (channels first, weights OIHW); any rank.",
        metavar="L",
        shown_when_default=False,
    ),
    Hparam(
        name="transposed",
        key="transposed",
        aliases=(),
        default=0,
        kind="flag",
        expected="expected 1 (a transposed convolution) or 0",
        help="1: a transposed convolution (ConvTranspose); w is (*kernel,Cout/g,Cin).",
        metavar="0|1",
        shown_when_default=False,
    ),
    Hparam(
        name="output_padding",
        key="output_padding",
        aliases=(),
        default=0,
        kind="ints",
        expected="expected an integer >= 0, or one per spatial axis like 1,0",
        help="Transposed: positions added at the end, N or one per axis (< stride or dilation).",
        metavar="OP",
        shown_when_default=False,
        minimum=0,
    ),
)

BY_NAME: dict[str, Hparam] = {h.name: h for h in HPARAMS}
NAMES: tuple[str, ...] = tuple(BY_NAME)
DEFAULTS: dict[str, int | str] = {h.name: h.default for h in HPARAMS}
FILE_KEYS: dict[str, str] = {key: h.name for h in HPARAMS for key in h.file_keys}
"""Every name a file may give a hyperparameter, to the library name (``pad`` -> ``padding``)."""
SPELLINGS: dict[str, str] = {h.key: h.name for h in HPARAMS}
"""The key of each hyperparameter in sweep specs and records, to the library name."""


def spec_from(values: Mapping[str, Spelling], rank: int | None = None) -> ConvSpec:
    """A ConvSpec from spellings by library name (missing names take their defaults).

    ``rank`` (the number of spatial axes of x) reads a flat padding list: ``rank`` values are
    one per axis, ``2 * rank`` values before/after per axis. Without it, 2 or 3 values are
    taken as one per axis and 4 or 6 as before/after pairs.

    Raises
    ------
    HyperparameterError
        When a flat padding list fits neither reading for ``rank``, or ConvSpec refuses a value.
    """
    merged = {**DEFAULTS, **values}
    merged["padding"] = resolve_flat_padding(merged["padding"], rank)
    return ConvSpec(**merged)  # type: ignore[arg-type]  # validated by ConvSpec itself


def resolve_flat_padding(padding: Spelling, rank: int | None) -> Spelling:
    """A flat before/after padding list as ``((before, after), ...)``; other values unchanged."""
    if not isinstance(padding, tuple) or not padding or not all(_is_int(v) for v in padding):
        return padding
    count = len(padding)
    if count == 1 or count == rank or (rank is None and count <= MAX_SPATIAL_DIMS):
        return padding
    if count == 2 * (rank or 0) or (rank is None and count in (4, 6)):
        return tuple((padding[i], padding[i + 1]) for i in range(0, count, 2))
    axes = f"{rank} spatial {'axis' if rank == 1 else 'axes'}"
    raise HyperparameterError(
        f"padding has {count} values; x has {axes}, so give 1, {rank} or {2 * (rank or 0)} "
        "(before and after per axis)"
    )


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


@dataclass(frozen=True)
class ResolvedHparams:
    """A ConvSpec and where each of its values came from ("flag", a file origin, "default")."""

    spec: ConvSpec
    origins: dict[str, str]


def build_spec(
    file_values: Mapping[str, tuple[object, str]],
    texts: Mapping[str, str | None],
    rank: int | None = None,
) -> ResolvedHparams:
    """Merge file hyperparameters and command-line texts (which win) into a ConvSpec.

    Parameters
    ----------
    file_values : mapping of library name -> (raw value, origin text)
    texts : mapping of library name -> command-line text, or None when not given
    rank : int, optional
        Spatial axes of x, to read flat padding lists (see :func:`spec_from`).
    """
    values: dict[str, Spelling] = {}
    origins = dict.fromkeys(NAMES, "default")
    for name, (raw, origin) in file_values.items():
        values[name] = BY_NAME[name].from_value(raw, origin)
        origins[name] = origin
    for name, text in texts.items():
        if text is not None:
            values[name] = BY_NAME[name].from_text(text)
            origins[name] = "flag"
    return ResolvedHparams(spec_from(values, rank), origins)


def format_hparams(hparams: Mapping[str, object]) -> str:
    """``stride=2 padding=2 dilation=1 groups=1``, then the rows not shown at their default
    (padding_mode, layout) when they differ. ``hparams`` as :meth:`Geometry.hparams` gives."""
    parts = []
    for h in HPARAMS:
        value = hparams.get(h.name, h.default)
        if h.shown_when_default or value != h.default:
            parts.append(f"{h.name}={h.format(value)}")
    return " ".join(parts)
