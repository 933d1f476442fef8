#!/usr/bin/env bash
# Set up (if needed) and run every benchmark; the tables go to stdout (bench/RESULTS.md).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m bench "$@"
