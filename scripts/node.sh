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
config="the embedded default configuration"
if [ -n "${DICOM_NODE_CONFIG:-}" ]; then config="$DICOM_NODE_CONFIG"; fi
prev=""
for arg in "$@"; do
  case "$arg" in --config=*) config="${arg#--config=}" ;; esac
  if [ "$prev" = "--config" ]; then config="$arg"; fi
  prev="$arg"
done
echo "==> running the node ($config); stop with Ctrl-C"
exec .venv/bin/dicom-node serve "$@"
