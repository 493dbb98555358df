"""`python -m edgekit.cli` runs the command line."""

from . import main

main()
