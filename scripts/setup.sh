#!/usr/bin/env bash
# Set up a fresh machine: Debian packages (dcmtk, dicom3tools, orthanc, orthanc-dicomweb, systemd, postgresql,
# redis-server, haproxy, rabbitmq-server) and a Python virtual environment in .venv with the project installed. Safe to run again.
#
#   bash scripts/setup.sh               the node (torch 2.13.0, CPU build)
#   bash scripts/setup.sh --detection   plus detection bundles (lung_nodule_ct_detection):
#                                       torch 2.14.1 + torchvision 0.29.1 and pytorch-ignite.
#                                       PyPI's torchvision does not import beside the CPU
#                                       torch 2.13.0; this pair does (a CUDA build that also
#                                       runs on the CPU: about 5.5 GB, about 1 min to install
#                                       from this machine's local wheel store).
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

missing=()
command -v storescu >/dev/null 2>&1 || missing+=(dcmtk)
command -v dciodvfy >/dev/null 2>&1 || missing+=(dicom3tools)
command -v Orthanc >/dev/null 2>&1 || missing+=(orthanc)
[ -e /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] || missing+=(orthanc-dicomweb)  # web viewers
command -v systemd-analyze >/dev/null 2>&1 || missing+=(systemd)  # the service unit's test
# scale-out (docs/scale-out.md): the tests start their own PostgreSQL, Redis and RabbitMQ servers
compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || missing+=(postgresql)
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v haproxy >/dev/null 2>&1 || missing+=(haproxy)  # the load-balancer example's test
[ -x /usr/lib/rabbitmq/bin/rabbitmq-server ] || missing+=(rabbitmq-server)  # the AMQP broker's test (starts in ~5 s)
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
DETECTION=0
for arg in "$@"; do
  case "$arg" in
    --detection) DETECTION=1 ;;
    *) echo "setup.sh: unknown option $arg (known: --detection)" >&2; exit 2 ;;
  esac
done
extras="test"
if [ "$DETECTION" = 1 ]; then
  extras="test,detection"
  # the pair that imports together; taken from the local wheel store, not downloaded
  if [ "$(uname -m)" = "aarch64" ]; then pair=(torch==2.9.1 torchvision==0.24.1); else pair=(torch==2.14.1 torchvision==0.29.1); fi
  if ! .venv/bin/python -c "import torchvision" >/dev/null 2>&1; then
    echo "==> installing ${pair[*]} for detection bundles (about 5.5 GB)"
    .venv/bin/pip install -q "${pair[@]}"
  fi
# torch first, pinned: this takes the CPU wheel the machine provides instead of a CUDA build.
elif ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
  echo "==> installing torch 2.13.0"
  .venv/bin/pip install -q torch==2.13.0
fi
echo "==> installing dicom-node"
if ! .venv/bin/pip install -q -e ".[$extras]" > .venv/pip-install.log 2>&1; then
  cat .venv/pip-install.log >&2
  echo "setup failed: pip could not install the project (log above)" >&2
  exit 1
fi
.venv/bin/python -c "import dicom_node, plugin, torch, monai, highdicom, pynetdicom" \
  || { echo "setup failed: the project does not import" >&2; exit 1; }
if [ "$DETECTION" = 1 ]; then
  .venv/bin/python -c "import torchvision, ignite" \
    || { echo "setup failed: torchvision or pytorch-ignite does not import (detection bundles)" >&2; exit 1; }
fi
