"""Checking convolutions: gradient checks of the engine or of anyone's implementation.

- :mod:`convcli.check.tolerance`: the one pass rule (:class:`Tolerance`) and element comparison.
- :mod:`convcli.check.gradients`: :func:`gradcheck`, its modes (a table of strategies) and
  results; :mod:`convcli.check.exhaustive`: the exhaustive mode's grouped perturbations.
- :mod:`convcli.check.numgrad`: numerical gradients of a black-box function.
- :mod:`convcli.check.userimpl`: checking a user's own forward and backward, in any of the
  signatures of :mod:`convcli.check.adapters`, run in a child process
  (:mod:`convcli.check.userproc`, :mod:`convcli.check.impl_worker`).
"""

from convcli.check.gradients import GradcheckResult, gradcheck
from convcli.check.tolerance import Tolerance

__all__ = ["GradcheckResult", "Tolerance", "gradcheck"]
