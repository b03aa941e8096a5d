"""The command line: the Typer app (:mod:`convcli.cli.commands`) and everything that prints.

This subpackage is the only place that imports ``typer`` and ``rich`` (a test checks): the
library below it raises typed errors and returns data; here flags are parsed, the library
is called, and results are rendered as tables (:mod:`~convcli.cli.render` for forward /
backward / inspect / sweep, :mod:`~convcli.cli.report` for gradcheck), heatmaps
(:mod:`~convcli.cli.heatmap`) or JSON, with ``--slice`` expressions parsed by
:mod:`~convcli.cli.slices`.
"""

from convcli.cli.commands import app, main

__all__ = ["app", "main"]
