#!/usr/bin/env bash
# Set up a fresh machine: Debian packages (dcmtk, dicom3tools, orthanc) and a Python
# virtual environment in .venv with the project installed. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

missing=()
command -v storescu >/dev/null 2>&1 || missing+=(dcmtk)
command -v dciodvfy >/dev/null 2>&1 || missing+=(dicom3tools)
command -v Orthanc >/dev/null 2>&1 || missing+=(orthanc)
if [ ${#missing[@]} -gt 0 ]; then
  echo "==> installing Debian packages: ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  echo "==> creating .venv"
  "$PYTHON" -m venv .venv
fi
# torch first, pinned: this takes the CPU wheel the machine provides instead of a CUDA build.
if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
  echo "==> installing torch 2.13.0"
  .venv/bin/pip install -q torch==2.13.0
fi
echo "==> installing dicom-node"
if ! .venv/bin/pip install -q -e ".[test]" > .venv/pip-install.log 2>&1; then
  cat .venv/pip-install.log >&2
  echo "setup failed: pip could not install the project (log above)" >&2
  exit 1
fi
.venv/bin/python -c "import dicom_node, plugin, torch, monai, highdicom, pynetdicom" \
  || { echo "setup failed: the project does not import" >&2; exit 1; }
