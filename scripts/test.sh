#!/usr/bin/env bash
# Install everything (scripts/install.sh: cheap when already done), then run the test suite.
# Needs only bash. Arguments go to pytest:
#   bash scripts/test.sh                              # the whole suite
#   bash scripts/test.sh tests/test_settings.py -q    # some of it
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/install.sh
exec .venv/bin/pytest "$@"
