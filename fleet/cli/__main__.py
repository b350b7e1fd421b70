"""`python -m fleet.cli ...`: the `fleet` command without its console script."""

from fleet.cli import main

main()
