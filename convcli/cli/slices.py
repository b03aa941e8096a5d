"""``--slice`` expressions: ``z[3,2,1]``, ``dw[:,:,0,1]``, ``x[0,...,-1]``, a bare ``3,2,1``
(indexing the first output) or a bare name ``db`` (the whole tensor).

Only basic NumPy indexing is accepted — integers, ``start:stop:step`` and ``...`` — parsed
with :mod:`ast` and never evaluated.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from convcli.errors import UsageError

_EXPR = re.compile(r"^\s*(?:([A-Za-z_]\w*)\s*\[([^\[\]]*)\]|([^\[\]]*))\s*$", re.DOTALL)
MAX_INDEX = 2**62
MAX_TEXT = 10_000  # characters of an index: far more than any array's rank needs
MAX_SHOWN = 80  # characters of an expression quoted in a message


class Sliceable(Protocol):
    """An array, or a tensor left on disk that reads the part an index selects."""

    @property
    def shape(self) -> tuple[int, ...]: ...

    def __getitem__(self, index: Any) -> Any: ...


@dataclass(frozen=True)
class SliceExpr:
    """A parsed slice: tensor name (None = the first output) and the index tuple."""

    name: str | None
    index: tuple
    text: str

    def label(self, default_name: str) -> str:
        """Canonical text, e.g. ``z[3,2,1]``."""
        return f"{self.name or default_name}[{self.text}]"


def parse_slice(expr: str, flag: str = "--slice") -> SliceExpr:
    """Parse a ``--slice`` expression.

    Raises
    ------
    UsageError
        When the text is not ``NAME[INDEX]`` or ``INDEX`` with basic indexing only.
    """
    if re.fullmatch(r"\s*[A-Za-z_]\w*\s*", expr):  # a bare name: the whole tensor
        return SliceExpr(name=expr.strip(), index=(), text="...")
    match = _EXPR.match(expr)
    if not match or not (match.group(2) or match.group(3) or "").strip():
        raise UsageError(f"{flag} {_shown(expr)}: expected NAME[INDEX] like z[3,2,1], or INDEX")
    name = match.group(1)
    text = (match.group(2) if name else match.group(3)).strip()
    if len(text) > MAX_TEXT:
        raise UsageError(f"{flag} {_shown(expr)}: longer than {MAX_TEXT:,} characters")
    try:
        node = ast.parse(f"_[{text}]", mode="eval").body
    except (SyntaxError, RecursionError, MemoryError, ValueError):
        # too deeply nested for the parser is as unparseable as a typo
        raise UsageError(f"{flag} {_shown(expr)}: cannot parse the index") from None
    if not isinstance(node, ast.Subscript):  # "_[...]" parses as a subscript or not at all
        raise UsageError(f"{flag} {_shown(expr)}: cannot parse the index")
    index = _index(node.slice, f"{flag} {_shown(expr)}")
    index = index if isinstance(index, tuple) else (index,)
    return SliceExpr(name=name, index=index, text=re.sub(r"\s+", "", text))


def _shown(expr: str) -> str:
    """The expression quoted for a message, shortened when long (start and end kept)."""
    if len(expr) > MAX_SHOWN:
        expr = f"{expr[: MAX_SHOWN // 2]}...{expr[-MAX_SHOWN // 4 :]}"
    return repr(expr)


def _index(node, expr, nested: bool = False):
    if isinstance(node, ast.Tuple) and not nested:
        return tuple(_index(element, expr, nested=True) for element in node.elts)
    if isinstance(node, ast.Slice):
        return slice(
            *(
                None if part is None else _int(part, expr)
                for part in (node.lower, node.upper, node.step)
            )
        )
    if isinstance(node, ast.Constant) and node.value is Ellipsis:
        return Ellipsis
    return _int(node, expr)


def _int(node, where) -> int:
    sign = 1
    while isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):  # no recursion
        sign, node = -sign, node.operand
    if isinstance(node, ast.Constant) and type(node.value) is int:
        if abs(node.value) > MAX_INDEX:
            raise UsageError(f"{where}: index {node.value} is out of range")
        return sign * node.value
    raise UsageError(f"{where}: only integers, start:stop:step and ... are allowed in an index")


def take(expr: SliceExpr, tensors: Mapping[str, Sliceable], default_name: str) -> np.ndarray:
    """Apply the slice to the named tensor (or ``default_name``) and return the result.

    Raises
    ------
    UsageError
        For an unknown tensor name or an index that does not fit its shape.
    """
    name = expr.name or default_name
    if name not in tensors:
        raise UsageError(
            f"--slice {expr.label(default_name)}: no tensor {name!r}; "
            f"available: {', '.join(tensors)}"
        )
    array = tensors[name]
    _check_index(expr, name, tuple(array.shape), default_name)
    return np.asarray(array[expr.index])


def check_slice(
    expr: SliceExpr,
    shapes: Mapping[str, tuple[int, ...] | None],
    default_name: str,
    flag: str = "--slice",
) -> tuple[int, ...]:
    """Check, before any work is done, that ``expr`` names a tensor and fits its shape.

    ``shapes`` maps the tensors a command will have to their shapes (None: the tensor exists
    but cannot be sliced, e.g. streamed to disk without ``--out``). Returns the slice's shape.
    """
    name = expr.name or default_name
    if name not in shapes:
        raise UsageError(
            f"{flag} {expr.label(default_name)}: no tensor {name!r}; available: {', '.join(shapes)}"
        )
    shape = shapes[name]
    if shape is None:
        raise UsageError(
            f"{flag} {expr.label(default_name)}: {name} is streamed through, not kept; "
            "give --out FILE.h5 to slice it from the written file"
        )
    return _check_index(expr, name, tuple(shape), default_name, flag)


def _check_index(expr, name, shape, default_name, flag="--slice") -> tuple:
    """Apply the index to a zero-stride stand-in of ``shape`` (no memory) to validate it."""
    try:
        return np.broadcast_to(np.zeros((), dtype=np.int8), shape)[expr.index].shape
    except (IndexError, TypeError, ValueError) as error:
        raise UsageError(
            f"{flag} {expr.label(default_name)}: {error} (shape of {name} is {shape})"
        ) from None
