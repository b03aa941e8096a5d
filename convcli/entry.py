"""The ``convcli`` console script: Ctrl-C at any moment ends it with one line and exit 130,
or, once the command is over, lets it exit with its own code."""

import signal
import sys


def main() -> None:
    try:
        from convcli.cli import main as run

        run()
    except KeyboardInterrupt:
        # while the heavy modules load, or in the last moments after the command's own
        # handling (which prints the same line and exits 130 itself)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        sys.stderr.write("convcli: error: interrupted\n")
        raise SystemExit(130) from None
    finally:
        # The command is over and its exit code decided: a Ctrl-C now (during interpreter
        # shutdown) must not turn that code into death by SIGINT.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
