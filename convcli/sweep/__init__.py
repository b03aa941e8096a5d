"""Sweeps (``convcli sweep SPEC.toml``): many configurations from a TOML spec, run locally, in
processes or on Dask, results as JSON Lines.

- :mod:`convcli.sweep.schema`: the spec file, read and checked into a :class:`Sweep` of
  :class:`Config` values (:func:`load_sweep`); run keys and spec fingerprints.
- :mod:`convcli.sweep.runner`: running one configuration (:func:`run_config`) and a whole
  sweep (:func:`run_sweep`, with :class:`SweepOptions`).
- :mod:`convcli.sweep.results`: the results file (partial file, fsync, lock, resume, torn
  records, checks of every record and of fingerprints) and the verdicts
  (:func:`record_verdict`, :class:`SweepSummary`).

Example::

    from convcli.sweep import SweepOptions, load_sweep, run_sweep

    summary = run_sweep(load_sweep("sweep.toml"), "results.jsonl", SweepOptions(jobs=2))
    print(summary.counts)
"""

from convcli.sweep.results import (
    VERDICTS,
    ResultsBusyError,
    ResultsContent,
    ResultsContentError,
    ResultsExistError,
    ResultsFile,
    ResultsWriteError,
    SpecMismatchError,
    SweepSummary,
    check_record,
    lock_path,
    open_results,
    partial_path,
    read_results,
    record_verdict,
    scan_results,
)
from convcli.sweep.runner import (
    SweepOptions,
    config_memory_needs,
    probe_scheduler,
    run_config,
    run_sweep,
)
from convcli.sweep.schema import (
    ACTIONS,
    CONFIG_KEYS,
    DEFAULTS,
    MAX_CONFIGS,
    Config,
    GradcheckOptions,
    SpecError,
    Sweep,
    TooManyConfigsError,
    load_sweep,
)

__all__ = [
    "ACTIONS",
    "CONFIG_KEYS",
    "DEFAULTS",
    "MAX_CONFIGS",
    "VERDICTS",
    "Config",
    "GradcheckOptions",
    "ResultsBusyError",
    "ResultsContent",
    "ResultsContentError",
    "ResultsExistError",
    "ResultsFile",
    "ResultsWriteError",
    "SpecError",
    "SpecMismatchError",
    "Sweep",
    "SweepOptions",
    "SweepSummary",
    "TooManyConfigsError",
    "check_record",
    "config_memory_needs",
    "load_sweep",
    "lock_path",
    "open_results",
    "partial_path",
    "probe_scheduler",
    "read_results",
    "record_verdict",
    "run_config",
    "run_sweep",
    "scan_results",
]
