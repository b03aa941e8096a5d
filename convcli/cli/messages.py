"""Library errors in the command line's words: parameter names become flags, hints are added.

The library names the parameter at fault (``error.param``) and raises typed errors with the
facts (:mod:`convcli.errors`); only here do flags appear.
"""

from __future__ import annotations

import codecs

from convcli.compare import NoResultsError
from convcli.errors import (
    ConvcliError,
    MemoryLimitError,
    NonFiniteError,
    OutputExistsError,
    SparseDataError,
)
from convcli.hparams import BY_NAME
from convcli.sweep import (
    ResultsExistError,
    ResultsWriteError,
    SpecMismatchError,
    TooManyConfigsError,
)

# library parameters whose flag is not ``--`` + the name with dashes (hyperparameters: their
# key in the table, ``padding`` -> ``--pad``)
_FLAGS = {
    "spec": "SPEC",
    "workspace": "--max-workspace",
    "generate_out": "OUT",  # generate's positional output file
    "folder": "DIR",  # example's positional folder
}


def flag_for(param: str) -> str:
    """The flag (or argument) that sets the library parameter ``param``."""
    if param in BY_NAME:
        param = BY_NAME[param].key
    return _FLAGS.get(param, "--" + param.replace("_", "-"))


def explain(error: ConvcliError) -> str:
    """One line for ``convcli: error:``: the message with flags, then a hint when one helps."""
    text = error.describe(flag_for(error.param) if error.param else None)
    if isinstance(error, NonFiniteError):
        text += (
            "; pass --allow-nonfinite to run anyway"
            if error.allowable
            else "; gradient checks need finite values"
        )
    elif isinstance(error, SparseDataError):
        text += "; pass --allow-sparse to read it anyway"
    elif isinstance(error, MemoryLimitError):
        text += "; stream the input from HDF5, lower --max-workspace, or raise --max-memory"
    elif isinstance(error, ResultsExistError):
        text += (
            "; pass --resume to continue it or --force to start over"
            if error.interrupted
            else "; pass --resume to continue the sweep or --force to start over"
        )
    elif isinstance(error, TooManyConfigsError):
        text += f"; pass --max-configs {error.count} (or more) to run them all"
    elif isinstance(error, ResultsWriteError):
        text += (
            "; free some space and pass --resume to continue"
            if error.kept
            else "; free some space and run the sweep again"
        )
    elif isinstance(error, SpecMismatchError):
        text += ": pass --append to add this spec's runs to them, or --force to start over"
    elif isinstance(error, NoResultsError):
        text += (
            "; put them in the data file, give their own file as --expect FILE,"
            " or name one as --z FILE:KEY (likewise --dx, --dw, --db)"
        )
    elif isinstance(error, OutputExistsError):
        text += "; pass --force to overwrite"
    return text


# -- what reaches the terminal ------------------------------------------------------------

MAX_LINE = 500  # characters of one error or note line; longer ones keep their start and end
_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def one_line(text: str, limit: int = MAX_LINE) -> str:
    """``text`` as one printable line of at most about ``limit`` characters.

    Newlines, tabs and other control or format characters (ANSI escapes, bidi overrides)
    from paths, keys or user code are shown escaped (``\\n``, ``\\x1b``, ``\\u202e``); a
    longer text keeps its start and end, saying how much was left out.
    """
    if text.isprintable() and len(text) <= limit:
        return text
    text = "".join(c if c.isprintable() else _ESCAPES.get(c, _escaped(c)) for c in text)
    if len(text) <= limit:
        return text
    head, tail = limit * 3 // 5, limit // 4
    return f"{text[:head]} ... ({len(text) - head - tail:,} characters) ... {text[-tail:]}"


def _escaped(char: str) -> str:
    code = ord(char)
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


# Plain-ASCII spellings of the characters convcli prints, for a stdout or stderr that cannot
# encode them (PYTHONIOENCODING=ascii, a C locale); anything else becomes a \x.. escape.
ASCII = {
    "·": "-",
    "—": "-",
    "\u2013": "-",  # en dash
    "←": "<-",
    "→": "->",
    "…": "...",
    "½": "1/2",
    "²": "^2",
    "‖": "||",
    "Σ": "sum ",
    "∏": "prod ",
    "⊙": "*",
    "±": "+/-",
    "≤": "<=",
    "≥": ">=",
    "ᵀ": "^T",
    "⟨": "<",
    "⟩": ">",
    "Δ": "d",
    "\u00d7": "x",  # multiplication sign
    "─": "-",
    "━": "-",
    "│": "|",
}
ASCII_ERRORS = "convcli-ascii"


def _ascii_spelling(error: UnicodeError) -> tuple[str, int]:
    """A codec error handler: ASCII spellings from :data:`ASCII`, else backslash escapes."""
    if not isinstance(error, UnicodeEncodeError):
        raise error
    text = error.object[error.start : error.end]
    spelled = "".join(ASCII.get(c) or c.encode("ascii", "backslashreplace").decode() for c in text)
    return spelled, error.end


codecs.register_error(ASCII_ERRORS, _ascii_spelling)


def out_of_memory(error: MemoryError) -> str:
    """One line for an allocation that failed although the memory guard let the work start."""
    detail = f" ({error})" if str(error) else ""
    return (
        f"ran out of memory{detail}; the estimate made before the work fell short: stream "
        "the input from HDF5, lower --max-workspace, or set --max-memory to the memory this "
        "process may really use (default auto) so that such work is refused before it starts"
    )
