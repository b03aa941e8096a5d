"""Library errors in the command line's words: parameter names become flags, hints are added.

The library names the parameter at fault (``error.param``) and raises typed errors with the
facts (:mod:`convcli.errors`); only here do flags appear.
"""

from __future__ import annotations

from convcli.errors import ConvcliError, MemoryLimitError, NonFiniteError, OutputExistsError
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
    elif isinstance(error, OutputExistsError):
        text += "; pass --force to overwrite"
    return text
