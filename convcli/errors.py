"""Typed errors raised by the library and the exit codes the CLI maps them to.

The library never prints: it raises one of these, and the CLI turns it into a single
``convcli: error: ...`` line on stderr and the exit code named here.

An error about one argument carries its name in ``param`` (``param="max_memory"``), and its
message says ``{param}`` where that name belongs: ``str(error)`` reads "max_memory 1 GiB:
...", and the CLI, which knows its flags, calls :meth:`ConvcliError.describe` with
the flag's spelling instead. Library messages never spell a flag; the CLI adds the hints that
name one (see the subclasses below for the typed facts it uses).
"""

from __future__ import annotations

# Exit codes (BSD sysexits where one fits). The README documents this table.
EXIT_OK = 0
EXIT_CHECK_FAILED = 1
EXIT_USAGE = 2
EXIT_DATA = 65  # EX_DATAERR: bad shapes, dtypes, hyperparameters or unreadable content
EXIT_NO_INPUT = 66  # EX_NOINPUT: input file missing or unreadable
EXIT_INTERNAL = 70  # EX_SOFTWARE
EXIT_CANT_CREATE = 73  # EX_CANTCREAT: output exists (and may not be replaced) or cannot be written
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143  # 128 + SIGTERM


class Terminated(BaseException):
    """SIGTERM arrived: raised in the main thread by the console script's signal handler.

    A ``BaseException``, like ``KeyboardInterrupt``, so that it unwinds every ``finally`` and
    context manager (temporary files are removed) without being caught as an error.
    """


class ConvcliError(Exception):
    """Base class of every error convcli raises on purpose.

    Parameters
    ----------
    message : str
        The message; ``{param}`` in it stands for the parameter's name.
    param : str, optional
        The library parameter (``"padding"``, ``"out"``, ``"max_memory"``) whose value is at
        fault, when there is one.
    """

    exit_code = EXIT_INTERNAL

    def __init__(self, message: str, *, param: str | None = None) -> None:
        self.template = message
        self.param = param
        super().__init__(self.describe())

    def describe(self, label: str | None = None) -> str:
        """The message, with the parameter called ``label`` (default: its library name)."""
        if self.param is None:
            return self.template
        return self.template.replace("{param}", label or self.param)

    def __reduce__(self):
        # errors cross process boundaries (sweep workers): keep param and the typed facts
        return (_restore, (type(self), dict(self.__dict__)))


def _restore(cls: type[ConvcliError], state: dict) -> ConvcliError:
    error = cls.__new__(cls)
    error.__dict__.update(state)
    error.args = (error.describe(),)
    return error


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
    """An output file that cannot be created (a missing folder, no permission, ...)."""

    exit_code = EXIT_CANT_CREATE


class OutputExistsError(OutputError):
    """An output file that exists already and may not be replaced (``force`` not given)."""


class NonFiniteError(DataError):
    """An input holding NaN or Inf where finite values are required.

    ``allowable``: whether the caller may run anyway (``allow_nonfinite``); gradient checks
    never can.
    """

    def __init__(self, message: str, *, allowable: bool = True) -> None:
        self.allowable = allowable
        super().__init__(message, param="allow_nonfinite" if allowable else None)


class SparseDataError(DataError):
    """A tensor whose header declares far more data than the file stores (a never-written
    dataset or a compression bomb); the caller may read it anyway (``allow_sparse``)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, param="allow_sparse")


class MemoryLimitError(DataError):
    """Work whose estimated memory exceeds the caller's ``max_memory``.

    ``needs`` maps what needs memory ("inputs", "workspace", ...) to bytes; ``limit`` is the
    budget in bytes.
    """

    def __init__(self, message: str, *, needs: dict[str, int], limit: int) -> None:
        self.needs = dict(needs)
        self.limit = limit
        super().__init__(message, param="max_memory")


class ConvcliNotice(UserWarning):
    """Something the user should know but that does not stop the run (e.g. int -> float64)."""
