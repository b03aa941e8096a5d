"""The sweep spec: a TOML file read, checked and normalised into a :class:`Sweep`.

A spec is a TOML file::

    actions = ["forward", "backward", "gradcheck"]   # what to do per configuration

    [gradcheck]                 # options of the gradcheck action (all optional)
    mode = "auto"               # auto | exhaustive | sample | fast
    samples = 64
    probes = 8

    [defaults]                  # values for every configuration (all optional)
    dtype = "float64"           # float32 | float64
    seed = 0
    stride = 1                  # int or [sh, sw]
    pad = 0                     # int, [ph, pw], [top, bottom, left, right], "same", "valid"
    dilation = 1
    groups = 1

    [[configs]]                 # configurations listed one by one ...
    shape = [2, 8, 8, 3]        # x: [n, H, W, Cin]
    kernel = 3                  # int or [kh, kw]
    cout = 4

    [grid]                      # ... and/or the product of value lists
    shape = [[2, 8, 8, 3], [1, 7, 5, 4]]
    kernel = [1, 3]
    cout = [4]
    pad = [0, 1, "same"]

The hyperparameter keys, their defaults and how their values are read come from the
hyperparameter table (:data:`convcli.hparams.HPARAMS`, by :attr:`~convcli.hparams.Hparam.key`).
A value that cannot be used is a :class:`SpecError` citing the file, the line, the table
(``[[configs]] table 2``, ``[grid]``, ...) and the key that hold it.

A stack file for ``convcli plan`` lists ``[[layers]]`` tables with the same keys, read and
checked by the same rules (:class:`LayerTables`).

Each configuration's run has a key (:meth:`Sweep.key`), a hash of what runs, and the spec a
fingerprint (:attr:`Sweep.fingerprint`), a hash of its runs' keys: both ignore how the spec
is written (comments, key order, ``kernel = 3`` versus ``[3, 3]``, defaults spelled out).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, NoReturn, overload

from convcli.check.gradients import DEFAULT_PROBES, DEFAULT_SAMPLES, MODES
from convcli.check.tolerance import Tolerance
from convcli.errors import ConvcliError, DataError, InputFileError, UsageError
from convcli.hparams import HPARAMS, shown, spec_from
from convcli.io.detect import regular_file_size
from convcli.spec import MAX_INT, ConvSpec

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10
    import tomli as tomllib

ACTIONS = ("forward", "backward", "gradcheck")
# a configuration: the layer's sizes, the hyperparameters by their spec keys (``pad``), dtype, seed
CONFIG_KEYS = ("shape", "kernel", "cout", *(h.key for h in HPARAMS), "dtype", "seed")
DEFAULTS: dict[str, Any] = {**{h.key: h.default for h in HPARAMS}, "dtype": "float64", "seed": 0}
OMITTED_AT_DEFAULT = ("transposed", "output_padding")
"""Keys a record leaves out at their default, so that the records and run keys of plain
convolutions stay those of the versions before transposed convolutions."""
GRADCHECK_KEYS: dict[str, type] = {
    "mode": str,
    "samples": int,
    "probes": int,
    "eps": float,
    "rtol": float,
    "atol": float,
}
# gradcheck options with a lower bound: (name, bound, whether the bound itself is refused)
GRADCHECK_BOUNDS = (
    ("eps", 0, True),
    ("rtol", 0, False),
    ("atol", 0, False),
    ("samples", 1, False),
    ("probes", 1, False),
)
TOP_KEYS = {"actions", "gradcheck", "defaults", "configs", "grid"}
DTYPES = ("float32", "float64")
MAX_CONFIGS = 100_000  # configurations a spec may hold unless the caller allows more
MAX_SPEC_BYTES = 16 * 2**20  # a spec is text written by people: far less than this
SEED_LIMIT = 2**63  # seeds must be below this (64-bit integers)


class SpecError(DataError):
    """A sweep spec that cannot be used; the message names the file and line."""


class TooManyConfigsError(SpecError):
    """A spec holding more configurations than the caller's ``max_configs``, counted before
    any is made. ``count``: how many it holds; ``limit``: the caller's bound."""

    def __init__(self, message: str, *, count: int, limit: int) -> None:
        self.count = count
        self.limit = limit
        super().__init__(message, param="max_configs")


# ---------------------------------------------------------------------------------------------
# What a spec holds
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Config:
    """One configuration of a sweep, checked and normalised.

    Attributes
    ----------
    shape : tuple of int
        x's shape ``(n, *spatial, Cin)``, channels last whatever the layout; 1 to 3 spatial
        axes.
    kernel : tuple of int
        The kernel's size, one per spatial axis.
    cout : int
        Output channels.
    hparams : mapping of str to JSON value
        Every hyperparameter by its spec key (``"pad"``), as checked by the hyperparameter
        table and made plain JSON (tuples as lists): ``2``, ``[1, 2]``, ``[[1, 1], [0, 2]]``,
        ``"same"``. Not to be changed.
    dtype : ``"float32"`` or ``"float64"``
        The dtype of the random inputs.
    seed : int
        The seed of the random inputs (and of the gradient check).
    """

    shape: tuple[int, ...]
    kernel: tuple[int, ...]
    cout: int
    hparams: Mapping[str, Any]
    dtype: str
    seed: int

    @property
    def rank(self) -> int:
        """The number of spatial axes."""
        return len(self.shape) - 2

    def spec(self) -> ConvSpec:
        """The ConvSpec of this configuration.

        Raises
        ------
        HyperparameterError
            When the hyperparameters do not fit the rank (e.g. three strides for 2-D).
        """
        return spec_from({h.name: _spelling(self.hparams[h.key]) for h in HPARAMS}, self.rank)

    def to_json(self) -> dict[str, Any]:
        """The configuration as a result record holds it: every key of :data:`CONFIG_KEYS`,
        except those of :data:`OMITTED_AT_DEFAULT` at their default."""
        hparams = {
            key: value
            for key, value in self.hparams.items()
            if not (key in OMITTED_AT_DEFAULT and value == DEFAULTS[key])
        }
        return {
            "shape": list(self.shape),
            "kernel": list(self.kernel),
            "cout": self.cout,
            **hparams,
            "dtype": self.dtype,
            "seed": self.seed,
        }


@dataclass(frozen=True)
class GradcheckOptions:
    """The options of the gradcheck action (``[gradcheck]``), every one filled in.

    Attributes
    ----------
    mode : one of :data:`convcli.check.gradients.MODES`
    samples, probes : int
        Elements per tensor in sample mode; random projections in fast mode.
    tolerance : Tolerance
        The finite-difference step and the comparison tolerances.
    """

    mode: str = "auto"
    samples: int = DEFAULT_SAMPLES
    probes: int = DEFAULT_PROBES
    tolerance: Tolerance = field(default_factory=Tolerance)

    def to_json(self) -> dict[str, Any]:
        """``{"mode", "samples", "probes", "eps", "rtol", "atol"}``, as run keys hash them."""
        return {
            "mode": self.mode,
            "samples": self.samples,
            "probes": self.probes,
            "eps": self.tolerance.eps,
            "rtol": self.tolerance.rtol,
            "atol": self.tolerance.atol,
        }


@dataclass(frozen=True)
class Sweep:
    """A parsed spec: the configurations and what to do with each.

    Attributes
    ----------
    path : Path
        The spec file.
    configs : sequence of Config
        In spec order: the ``[[configs]]`` tables, then the ``[grid]`` product (made one at a
        time as it is iterated or indexed, never held whole, when read by :func:`load_sweep`).
    actions : tuple of str
        Of :data:`ACTIONS`, in that order, each once.
    gradcheck : GradcheckOptions
        The gradcheck action's options.
    """

    path: Path
    configs: Sequence[Config]
    actions: tuple[str, ...]
    gradcheck: GradcheckOptions = field(default_factory=GradcheckOptions)

    def key(self, config: Config) -> str:
        """Stable key of one run: a hash of its configuration, actions and gradcheck options
        (16 hex digits)."""
        what = {
            "config": _per_axis(config),
            "actions": list(self.actions),
            "gradcheck": self.gradcheck.to_json() if "gradcheck" in self.actions else None,
        }
        return _digest(what)

    @cached_property
    def keys(self) -> tuple[str, ...]:
        """The key of every configuration's run (:meth:`key`), in spec order."""
        return tuple(self.key(config) for config in self.configs)

    @cached_property
    def fingerprint(self) -> str:
        """A hash of what the spec asks to run: the set of its runs' keys (16 hex digits).

        Each key hashes a normalised configuration, the actions and the gradcheck options
        (defaults filled in), so comments, whitespace, key order, the order of the
        configurations, ``kernel = 3`` versus ``[3, 3]`` (likewise stride, pad and dilation:
        one value, one per axis, or before/after pairs that say the same) and defaults spelled
        out or left out do not change it; any change to what would run does.
        """
        return _digest(sorted(set(self.keys)))


def _per_axis(config: Config) -> dict[str, Any]:
    """``config`` as JSON with stride and dilation one value per spatial axis and pad as
    ``[[before, after], ...]`` (or ``"same"``), so equal runs spelled differently share a key.
    A configuration whose values do not fit its rank is left as written (it will fail)."""
    values = config.to_json()
    try:
        spec = config.spec()
        stride, dilation = spec.per_axis(config.rank)
        padding = spec.explicit_padding(config.rank)
    except ConvcliError:
        return values
    pad = padding if isinstance(padding, str) else [list(pair) for pair in padding]
    return {**values, "stride": list(stride), "dilation": list(dilation), "pad": pad}


def _digest(value: object) -> str:
    text = json.dumps(value, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _spelling(value: Any) -> Any:
    """JSON lists back to the tuples ConvSpec takes."""
    if isinstance(value, list):
        return tuple(_spelling(v) for v in value)
    return value


def _plain(value: Any) -> Any:
    """Tuples (as the hyperparameter table returns them) as JSON lists."""
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value


# ---------------------------------------------------------------------------------------------
# Reading a spec
# ---------------------------------------------------------------------------------------------


_ARRAYS = ("configs", "layers")  # arrays of tables: [[configs]] (sweeps), [[layers]] (stacks)


@dataclass(frozen=True)
class SpecTable:
    """A table of the spec: ``SpecTable("configs", 1)`` is the second ``[[configs]]``."""

    name: str
    index: int = 0

    @property
    def header(self) -> str:
        """The header line that opens it: ``[[configs]]``, ``[grid]``."""
        return f"[[{self.name}]]" if self.name in _ARRAYS else f"[{self.name}]"

    @property
    def label(self) -> str:
        """How messages name it: ``[[configs]] table 2``, ``[grid]``."""
        return f"{self.header} table {self.index + 1}" if self.name in _ARRAYS else self.header


def load_sweep(path: str | Path, *, max_configs: int = MAX_CONFIGS) -> Sweep:
    """Parse and check a sweep spec.

    Parameters
    ----------
    path : str or Path
        A UTF-8 TOML file in the format this module's docstring shows.
    max_configs : int
        The most configurations the spec may hold (``[[configs]]`` tables plus the grid's
        combinations), counted from the lengths of the grid's lists before any combination
        is made.

    Raises
    ------
    InputFileError
        The file is missing, not a regular file, or unreadable.
    SpecError
        TOML syntax errors, nesting too deep to parse, unknown keys, wrong types or values;
        the message cites the line, and the table and key that hold the bad value.
    TooManyConfigsError
        More configurations than ``max_configs``.
    UsageError
        ``max_configs`` is below 1.
    """
    if isinstance(max_configs, bool) or not isinstance(max_configs, int) or max_configs < 1:
        raise UsageError(f"{{param}} must be at least 1, got {max_configs!r}", param="max_configs")
    path = Path(path)
    text, data = _read_toml(path)
    checker = _Checker(path, text)
    checker.keys(data, TOP_KEYS, "the top level")
    actions = _actions(data, checker)
    gradcheck = _gradcheck_options(data, checker)
    configs = _configs(data, checker)
    if not configs:
        raise SpecError(f"{path}: no configurations: add [[configs]] tables or a [grid]")
    if len(configs) > max_configs:
        raise TooManyConfigsError(
            f"{path}: {configs.describe()} make {len(configs)} configurations, more than "
            f"{{param}} {max_configs}",
            count=len(configs),
            limit=max_configs,
        )
    sweep = Sweep(path=path, configs=configs, actions=actions, gradcheck=gradcheck)
    sweep.keys  # noqa: B018  # checks every configuration (and keeps the keys) before any run
    return sweep


class _ConfigSequence(Sequence[Config]):
    """Configurations made on demand: a subclass gives ``__len__`` and :meth:`_at`."""

    @overload
    def __getitem__(self, index: int) -> Config: ...

    @overload
    def __getitem__(self, index: slice) -> Sequence[Config]: ...

    def __getitem__(self, index: int | slice) -> Config | Sequence[Config]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(index)
        return self._at(index)

    def _at(self, index: int) -> Config:
        """Configuration ``index``, with ``0 <= index < len(self)``."""
        raise NotImplementedError


class LayerTables(_ConfigSequence):
    """The ``[[layers]]`` of a stack file, the input of ``convcli.plan.plan_stack``: a
    network's layers in order, each a table with the keys of a sweep configuration, over an
    optional ``[defaults]``.

    Only the first layer needs a ``shape``; each later one takes the previous layer's output
    ``(n, *out, Cout)`` (channels last, like every configuration's shape), which
    :meth:`config` is given. A later layer that states a shape must state that one.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        text, data = _read_toml(self.path)
        self._checker = checker = _Checker(self.path, text)
        checker.keys(data, {"layers", "defaults"}, "the top level")
        given = checker.table(data.get("defaults", {}), "defaults")
        checker.keys(given, set(CONFIG_KEYS), "[defaults]", SpecTable("defaults"))
        defaults, sources = DEFAULTS | given, dict.fromkeys(given, SpecTable("defaults"))
        layers = data.get("layers", [])
        if not isinstance(layers, list) or not all(isinstance(t, dict) for t in layers):
            checker.fail("layers", "[[layers]] must be a list of tables")
        if not layers:
            raise SpecError(f"{self.path}: no layers: add [[layers]] tables")
        self._written: list[_Written] = []
        for index, entry in enumerate(layers):
            table = SpecTable("layers", index)
            checker.keys(entry, set(CONFIG_KEYS), "[[layers]]", table)
            self._written.append((defaults | entry, sources | dict.fromkeys(entry, table)))

    def __len__(self) -> int:
        return len(self._written)

    def _at(self, index: int) -> Config:
        return self.config(index)

    def config(self, index: int, shape: Sequence[int] | None = None) -> Config:
        """Layer ``index`` checked like a sweep configuration; ``shape`` is the previous
        layer's output (channels last), used when the table gives none."""
        written, sources = self._written[index]
        if shape is not None:
            shape = [int(v) for v in shape]
            if "shape" in written and written["shape"] != shape:
                self._checker.fail(
                    "shape",
                    f"shape {shown(written['shape'])} is not the previous layer's output "
                    f"{shown(shape)}",
                    sources.get("shape"),
                )
            written = {**written, "shape": shape}
        return self._checker.config(written, sources)


def _read_toml(path: Path) -> tuple[str, dict[str, Any]]:
    """The text of the spec and its TOML tables."""
    if path.is_dir():
        raise InputFileError(f"{path}: is a directory, not a sweep spec")
    size = regular_file_size(path)
    if size > MAX_SPEC_BYTES:
        raise SpecError(f"{path}: {size} bytes is too big for a sweep spec (at most 16 MiB)")
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise InputFileError(f"{path}: cannot read ({error.strerror or error})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise SpecError(f"{path}: not a UTF-8 text file ({error.reason})") from None
    try:
        return text, tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise SpecError(f"{path}: {error}") from None
    except RecursionError:
        raise SpecError(f"{path}: values nested too deeply to read") from None


def _actions(data: dict[str, Any], checker: _Checker) -> tuple[str, ...]:
    """The actions, normalised: in the order of :data:`ACTIONS`, each once."""
    actions = data.get("actions", ["forward", "gradcheck"])
    if not isinstance(actions, list) or not actions or any(a not in ACTIONS for a in actions):
        checker.fail(
            "actions", f"actions must be a list of {', '.join(ACTIONS)}, got {shown(actions)}"
        )
    return tuple(a for a in ACTIONS if a in actions)


def _gradcheck_options(data: dict[str, Any], checker: _Checker) -> GradcheckOptions:
    """The ``[gradcheck]`` table checked, with every option filled in (floats as floats)."""
    given = checker.table(data.get("gradcheck", {}), "gradcheck")
    table = SpecTable("gradcheck")
    checker.keys(given, set(GRADCHECK_KEYS), "[gradcheck]", table)
    for name, kind in GRADCHECK_KEYS.items():
        if name in given and not _is(given[name], kind):
            message = f"gradcheck {name} must be a {kind.__name__}, got {shown(given[name])}"
            checker.fail(name, message, table)
    for name, low, strict in GRADCHECK_BOUNDS:
        value = given.get(name)
        if value is not None and (value <= low if strict else value < low):
            bound = f"> {low}" if strict else f">= {low}"
            checker.fail(name, f"gradcheck {name} must be {bound}, got {shown(value)}", table)
    if "mode" in given and given["mode"] not in MODES:
        checker.fail("mode", f"gradcheck mode must be one of {', '.join(MODES)}", table)
    default = Tolerance()
    try:  # the one validation of tolerances (finite, in range); a spec's error is data
        tolerance = Tolerance(
            eps=given.get("eps", default.eps),
            rtol=given.get("rtol", default.rtol),
            atol=given.get("atol", default.atol),
        )
    except UsageError as error:
        checker.fail(error.param or "gradcheck", f"gradcheck {error.describe()}", table)
    return GradcheckOptions(
        mode=given.get("mode", "auto"),
        samples=given.get("samples", DEFAULT_SAMPLES),
        probes=given.get("probes", DEFAULT_PROBES),
        tolerance=tolerance,
    )


# a configuration as written (defaults merged in), and the table each of its keys came from
_Written = tuple[dict[str, Any], dict[str, SpecTable]]


class SpecConfigs(_ConfigSequence):
    """The configurations of a spec in spec order: the ``[[configs]]`` tables, then the
    ``[grid]`` product (first key slowest), each checked and made only when it is reached.

    Its length is counted from the grid's list lengths, so a grid of 10⁹ combinations costs
    nothing until it is iterated.
    """

    def __init__(
        self,
        checker: _Checker,
        listed: list[_Written],
        grid: dict[str, list[Any]],
        base: _Written,
    ) -> None:
        self._checker = checker
        self._listed = listed
        self._names = list(grid)
        self._values = [grid[name] for name in self._names]
        self._base = base
        self._combinations = math.prod(len(v) for v in self._values) if grid else 0

    def __len__(self) -> int:
        return len(self._listed) + self._combinations

    def _at(self, index: int) -> Config:
        if index < len(self._listed):
            return self._checker.config(*self._listed[index])
        rest, combination = index - len(self._listed), []
        for values in reversed(self._values):  # the last key varies fastest
            rest, position = divmod(rest, len(values))
            combination.append(values[position])
        return self._combined(combination[::-1])

    def __iter__(self) -> Iterator[Config]:
        for written in self._listed:
            yield self._checker.config(*written)
        if self._combinations:
            for combination in itertools.product(*self._values):
                yield self._combined(combination)

    def _combined(self, combination: Sequence[Any]) -> Config:
        defaults, sources = self._base
        table = SpecTable("grid")
        written = defaults | dict(zip(self._names, combination, strict=True))
        return self._checker.config(written, sources | dict.fromkeys(self._names, table))

    def describe(self) -> str:
        """What makes the configurations: ``2 [[configs]] table(s) and [grid] 10 x 10 x 3``."""
        parts = []
        if self._listed:
            parts.append(f"{len(self._listed)} [[configs]] table(s)")
        if self._values:
            parts.append("[grid] " + " x ".join(str(len(v)) for v in self._values))
        return " and ".join(parts)


def _configs(data: dict[str, Any], checker: _Checker) -> SpecConfigs:
    """Every configuration, in spec order: the ``[[configs]]`` tables, then the grid."""
    given = checker.table(data.get("defaults", {}), "defaults")
    checker.keys(given, set(CONFIG_KEYS), "[defaults]", SpecTable("defaults"))
    defaults = DEFAULTS | given
    sources = dict.fromkeys(given, SpecTable("defaults"))
    grid = checker.table(data.get("grid", {}), "grid")
    table = SpecTable("grid")
    checker.keys(grid, set(CONFIG_KEYS), "[grid]", table)
    for name, values in grid.items():
        if not isinstance(values, list) or not values:
            checker.fail(name, f"grid {name} must be a non-empty list of values", table)
    return SpecConfigs(
        checker, _listed(data, checker, defaults, sources), grid, (defaults, sources)
    )


def _listed(
    data: dict[str, Any],
    checker: _Checker,
    defaults: dict[str, Any],
    sources: dict[str, SpecTable],
) -> list[_Written]:
    """The ``[[configs]]`` tables over the defaults."""
    listed = data.get("configs", [])
    if not isinstance(listed, list) or not all(isinstance(c, dict) for c in listed):
        checker.fail("configs", "[[configs]] must be a list of tables")
    configs = []
    for index, entry in enumerate(listed):
        table = SpecTable("configs", index)
        checker.keys(entry, set(CONFIG_KEYS), "[[configs]]", table)
        configs.append((defaults | entry, sources | dict.fromkeys(entry, table)))
    return configs


def _is(value: object, kind: type) -> bool:
    """Whether a TOML value is of ``kind`` (an int is a float; a bool is neither)."""
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, kind) and not isinstance(value, bool)


def _positive_ints(value: object, count: range | int) -> bool:
    counts = range(count, count + 1) if isinstance(count, int) else count
    return (
        isinstance(value, list)
        and len(value) in counts
        and all(_is(v, int) and 0 < v <= MAX_INT for v in value)
    )


class _Checker:
    """Type checks of a parsed spec, with errors that cite the line, the table and the key
    that hold a bad value."""

    def __init__(self, path: Path, text: str):
        self.path = path
        self.lines = text.splitlines()
        self._places: dict[tuple[str, SpecTable | None], str] = {}

    def _header_line(self, table: SpecTable) -> int | None:
        seen = -1
        for number, line in enumerate(self.lines, start=1):
            if line.split("#", 1)[0].strip() == table.header:
                seen += 1
                if seen == table.index:
                    return number
        return None

    def line_of(self, key: str, table: SpecTable | None) -> int | None:
        """The line holding ``key`` in ``table``, else the table's header line; for top-level
        keys (``table`` None), the first line that sets ``key``."""
        header = self._header_line(table) if table else None
        for number in range(header + 1 if header else 1, len(self.lines) + 1):
            stripped = self.lines[number - 1].strip()
            if header and stripped.startswith("["):
                break  # the next table begins
            if stripped.startswith((f"{key} ", f"{key}=", f"[{key}]", f"[[{key}]]")):
                return number
        return header

    def where(self, key: str, table: SpecTable | None) -> str:
        """``spec.toml line 12 ([[configs]] table 2, key 'stride')`` (found once per key and
        table: every configuration of a grid asks again)."""
        place = self._places.get((key, table))
        if place is None:
            line = self.line_of(key, table)
            place = f"{self.path} line {line}" if line else str(self.path)
            if table is not None:
                place += f" ({table.label}, key {shown(key)})"
            self._places[(key, table)] = place
        return place

    def fail(self, key: str, message: str, table: SpecTable | None = None) -> NoReturn:
        raise SpecError(f"{self.where(key, table)}: {message}")

    def table(self, value: object, name: str) -> dict[str, Any]:
        """``value``, the top-level key ``name``, if it is a table."""
        if not isinstance(value, dict):
            self.fail(name, f"{name} must be a table")
        return value

    def keys(
        self, table: dict, allowed: set[str], where: str, source: SpecTable | None = None
    ) -> None:
        for key in table:
            if key not in allowed:
                self.fail(
                    key,
                    f"unknown key {shown(key)} in {where}; "
                    f"expected one of {', '.join(sorted(allowed))}",
                    source,
                )

    def config(self, config: dict[str, Any], sources: Mapping[str, SpecTable]) -> Config:
        """One configuration with every key checked and normalised to plain JSON values;
        ``sources`` maps each key to the table that set it (none for built-in defaults)."""

        def fail(key: str, message: str) -> NoReturn:
            self.fail(key, message, sources.get(key))

        for required in ("shape", "kernel", "cout"):
            if required not in config:
                raise SpecError(f"{self.path}: a configuration has no {required!r}")
        shape = config["shape"]
        if not _positive_ints(shape, range(3, 6)):
            fail(
                "shape",
                f"shape must be [n, *spatial, Cin] of integers 1 to {MAX_INT}, got {shown(shape)}",
            )
        rank = len(shape) - 2
        kernel = [config["kernel"]] * rank if _is(config["kernel"], int) else config["kernel"]
        if not _positive_ints(kernel, rank):
            message = (
                f"kernel must be an integer 1 to {MAX_INT} or one per spatial axis, "
                f"got {shown(config['kernel'])}"
            )
            fail("kernel", message)
        if not (_is(config["cout"], int) and 0 < config["cout"] <= MAX_INT):
            fail("cout", f"cout must be an integer 1 to {MAX_INT}, got {shown(config['cout'])}")
        if not (isinstance(config["dtype"], str) and config["dtype"] in DTYPES):
            fail("dtype", f"dtype must be 'float32' or 'float64', got {shown(config['dtype'])}")
        if not (_is(config["seed"], int) and 0 <= config["seed"] < SEED_LIMIT):
            message = f"seed must be an integer from 0 to 2**63 - 1, got {shown(config['seed'])}"
            fail("seed", message)
        hparams = {}
        for hparam in HPARAMS:
            origin = self.where(hparam.key, sources.get(hparam.key))
            try:
                hparams[hparam.key] = _plain(hparam.from_value(config[hparam.key], origin))
            except ConvcliError as error:
                raise SpecError(str(error)) from None
        return Config(
            shape=tuple(shape),
            kernel=tuple(kernel),
            cout=config["cout"],
            hparams=hparams,
            dtype=config["dtype"],
            seed=config["seed"],
        )
