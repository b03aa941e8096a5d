"""Checking convolutions: gradient checks of the engine or of anyone's implementation.

- :mod:`convcli.check.gradients`: :func:`gradcheck`, its modes and results.
- :mod:`convcli.check.numgrad`: numerical gradients of a black-box function.
- :mod:`convcli.check.userimpl`: checking a user's ``conv_forward``/``conv_backward``, run in
  a child process (:mod:`convcli.check.userproc`, :mod:`convcli.check.impl_worker`).
"""

from convcli.check.gradients import GradcheckResult, Tolerance, gradcheck

__all__ = ["GradcheckResult", "Tolerance", "gradcheck"]
