"""`python -m dualstpm` is the `dualstpm` command."""

from dualstpm.cli import main

main()
