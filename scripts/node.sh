#!/usr/bin/env bash
# Set up (if needed), show the demo (a chest-CT phantom in, findings table and PNG
# preview out, in ./demo-output), then run the node on the embedded default
# configuration until Ctrl-C. Extra arguments go to `dicom-node serve`
# (e.g. --port 11112 --storage-dir ./var). Set DEMO=0 to skip the demo.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [ "${DEMO:-1}" != "0" ]; then
  .venv/bin/dicom-node demo --out demo-output
fi
echo "==> running the node (embedded default configuration); stop with Ctrl-C"
exec .venv/bin/dicom-node serve "$@"
