# Thin aliases for the bash entry points (make is optional: a bare Debian 12 has none).
# scripts/demo.sh and scripts/test.sh run scripts/install.sh first, which is cheap to re-run.
VENV := .venv

.PHONY: install demo test lint

install:
	bash scripts/install.sh

demo:
	bash scripts/demo.sh

test:
	bash scripts/test.sh

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
