"""``python -m medexp <command> ...``: the ``medexp`` command without its console script."""

from medexp.cli import main

main()
