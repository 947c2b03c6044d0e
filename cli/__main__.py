"""`python -m cli ...` runs the `surgery` command."""

from .main import main

main()
