"""``python -m worker``: the same as ``vmorch worker``."""

import sys

from cli.app import main

main(["worker", *sys.argv[1:]])
