"""Typed errors raised by the library and the exit codes the CLI maps them to.

The library never prints: it raises one of these, and the CLI turns it into a single
``convcli: error: ...`` line on stderr and the exit code named here.
"""

from __future__ import annotations

# Exit codes (BSD sysexits where one fits). The README documents this table.
EXIT_OK = 0
EXIT_CHECK_FAILED = 1
EXIT_USAGE = 2
EXIT_DATA = 65  # EX_DATAERR: bad shapes, dtypes, hyperparameters or unreadable content
EXIT_NO_INPUT = 66  # EX_NOINPUT: input file missing or unreadable
EXIT_INTERNAL = 70  # EX_SOFTWARE
EXIT_CANT_CREATE = 73  # EX_CANTCREAT: output exists (without --force) or cannot be written
EXIT_INTERRUPTED = 130


class ConvcliError(Exception):
    """Base class of every error convcli raises on purpose."""

    exit_code = EXIT_INTERNAL


class UsageError(ConvcliError, ValueError):
    """A command-line value that cannot be understood (bad flag value, bad slice expression)."""

    exit_code = EXIT_USAGE


class DataError(ConvcliError, ValueError):
    """Input data that cannot be used: shapes, dtypes, hyperparameters, file content."""

    exit_code = EXIT_DATA


class HyperparameterError(DataError):
    """A stride, padding, dilation or groups value that is invalid or does not fit the tensors."""


class ShapeError(DataError):
    """Tensors whose shapes do not fit together (e.g. Cin of x differs from w)."""


class DtypeError(DataError):
    """A tensor dtype the engine does not accept."""


class InputFileError(ConvcliError, OSError):
    """An input file that is missing, a directory, or unreadable."""

    exit_code = EXIT_NO_INPUT


class OutputError(ConvcliError, OSError):
    """An output file that cannot be created (exists without --force, bad folder, ...)."""

    exit_code = EXIT_CANT_CREATE


class ConvcliNotice(UserWarning):
    """Something the user should know but that does not stop the run (e.g. int -> float64)."""
