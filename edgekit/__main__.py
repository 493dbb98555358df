"""`python -m edgekit` runs the command line (on devices where the console script is not on PATH)."""

from .cli import main

main()
