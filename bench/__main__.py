"""``python -m bench [--quick | --smoke] [--only …]``."""

from bench.run import main

main()
