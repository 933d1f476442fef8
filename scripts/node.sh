#!/usr/bin/env bash
# Set up (if needed) and run the node on the embedded default configuration.
# Extra arguments go to `dicom-node serve` (e.g. --port 11112 --storage-dir ./var).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/dicom-node serve "$@"
