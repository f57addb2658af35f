"""``python -m cli``: the same as ``vmorch``."""

from .app import main

main()
