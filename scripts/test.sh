#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --detection  # the suite runs the Model Zoo detector too
echo "==> lint (ruff) and types (mypy --strict, see pyproject.toml)"
.venv/bin/ruff check .
.venv/bin/mypy
exec .venv/bin/python -m pytest -q "$@"
