"""The ``convcli`` console script: Ctrl-C at any moment ends it with one line and exit 130,
SIGTERM with one line and exit 143 (temporary files removed, as for Ctrl-C), or, once the
command is over, lets it exit with its own code."""

import os
import signal
import sys

from convcli.errors import EXIT_INTERRUPTED, EXIT_TERMINATED, Terminated

_MAIN_PID = os.getpid()


def _terminate(signum: int, frame: object) -> None:
    """SIGTERM handler: unwind the command like Ctrl-C does (see :class:`Terminated`)."""
    if os.getpid() != _MAIN_PID:  # a forked worker inherited this handler: die as before
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)
        return
    raise Terminated()


def _stop(message: str, code: int) -> None:
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)
    sys.stderr.write(f"convcli: error: {message}\n")
    _exit_now(code)


def _exit_now(code: int) -> None:
    """End an interrupted or terminated run with ``code``, now.

    Everything the command opened has been unwound already. Exiting through the interpreter
    instead can turn the code into death by SIGINT: when the Ctrl-C landed inside Python code
    that an extension module runs while it is imported, CPython remembers the interrupt as
    unhandled and kills itself with SIGINT on the way out, whatever convcli did with it.
    """
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def main() -> None:
    signal.signal(signal.SIGTERM, _terminate)
    try:
        from convcli.cli import main as run

        run()
    except KeyboardInterrupt:
        # while the heavy modules load, or in the last moments after the command's own
        # handling (which prints the same line and exits 130 itself)
        _stop("interrupted", EXIT_INTERRUPTED)
    except Terminated:
        _stop("terminated", EXIT_TERMINATED)
    except SystemExit as done:
        if done.code in (EXIT_INTERRUPTED, EXIT_TERMINATED):  # the line is printed already
            _exit_now(done.code)
        raise
    finally:
        # The command is over and its exit code decided: a Ctrl-C or SIGTERM now (during
        # interpreter shutdown) must not turn that code into death by signal.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
