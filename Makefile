# Entry points; scripts/install.sh prepares a fresh Debian 12 machine (run as root) and is
# cheap to re-run, so every target that needs the .venv depends on it.
VENV := .venv

.PHONY: install demo test lint

install:
	bash scripts/install.sh

demo: install
	bash scripts/demo.sh

test: install
	$(VENV)/bin/pytest

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
