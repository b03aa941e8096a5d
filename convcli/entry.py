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
    raise SystemExit(code) from None


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
    finally:
        # The command is over and its exit code decided: a Ctrl-C or SIGTERM now (during
        # interpreter shutdown) must not turn that code into death by signal.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
