"""``python -m convcli``: the same as the ``convcli`` command."""

from convcli.entry import main

main()
