"""Library errors in the command line's words: parameter names become flags, hints are added.

The library names the parameter at fault (``error.param``) and raises typed errors with the
facts (:mod:`convcli.errors`); only here do flags appear.
"""

from __future__ import annotations

from convcli.errors import ConvcliError, MemoryLimitError, NonFiniteError, OutputExistsError
from convcli.hparams import BY_NAME
from convcli.sweep import ResultsExistError, SpecMismatchError

# library parameters whose flag is not ``--`` + the name with dashes (hyperparameters: their
# key in the table, ``padding`` -> ``--pad``)
_FLAGS = {
    "spec": "SPEC",
    "workspace": "--max-workspace",
    "generate_out": "OUT",  # generate's positional output file
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
    elif isinstance(error, MemoryLimitError):
        text += "; stream the input from HDF5, lower --max-workspace, or raise --max-memory"
    elif isinstance(error, ResultsExistError):
        text += (
            "; pass --resume to continue it or --force to start over"
            if error.interrupted
            else "; pass --resume to continue the sweep or --force to start over"
        )
    elif isinstance(error, SpecMismatchError):
        text += ": pass --append to add this spec's runs to them, or --force to start over"
    elif isinstance(error, OutputExistsError):
        text += "; pass --force to overwrite"
    return text


def out_of_memory(error: MemoryError) -> str:
    """One line for an allocation that failed although the memory guard let the work start."""
    detail = f" ({error})" if str(error) else ""
    return (
        f"ran out of memory{detail}; the estimate made before the work fell short: stream "
        "the input from HDF5, lower --max-workspace, or set --max-memory to the memory this "
        "process may really use (default auto) so that such work is refused before it starts"
    )
