"""Library errors in the command line's words: parameter names become flags, hints are added.

The library names the parameter at fault (``error.param``) and raises typed errors with the
facts (:mod:`convcli.errors`); only here do flags appear.
"""

from __future__ import annotations

from convcli.errors import ConvcliError, MemoryLimitError, NonFiniteError, OutputExistsError

# parameters whose flag is not ``--`` + the name with dashes
_FLAGS = {
    "padding": "--pad",
    "spec": "SPEC",
    "workspace": "--max-workspace",
    "generate_out": "OUT",  # generate's positional output file
}


def flag_for(param: str) -> str:
    """The flag (or argument) that sets the library parameter ``param``."""
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
    elif isinstance(error, OutputExistsError):
        text += "; pass --force to overwrite"
    return text
