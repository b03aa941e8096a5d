"""The ``convcli`` console script: Ctrl-C while the heavy modules load still exits cleanly."""

import sys


def main() -> None:
    try:
        from convcli.cli import main as run
    except KeyboardInterrupt:
        sys.stderr.write("convcli: error: interrupted\n")
        raise SystemExit(130) from None
    run()
