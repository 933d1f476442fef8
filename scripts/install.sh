#!/usr/bin/env bash
# Install dicom-node as a service (run as root, from a checkout):
#
#   sudo bash scripts/install.sh
#
#   /opt/dicom-node               the code and its virtual environment (.venv)
#   /etc/dicom-node/config.yaml   the configuration (kept when it exists)
#   /var/lib/dicom-node           spool, results, state database, audit trail
#   /etc/systemd/system/dicom-node.service, /etc/logrotate.d/dicom-node
#
# The node runs as the system user dicom-node (created when missing), never as root.
# Then: edit /etc/dicom-node/config.yaml, `dicom-node check-config` it, and
# `systemctl enable --now dicom-node`. docs/service.md has the details.
#
# Options (for packaging and tests): --root DIR puts every path under DIR and does not
# touch systemd; --user NAME runs the node as an existing user instead.
set -euo pipefail
src="$(cd "$(dirname "$0")/.." && pwd)"
ROOT=""
NODE_USER="dicom-node"
while [ $# -gt 0 ]; do
  case "$1" in
    --root) ROOT="$(realpath -m "$2")"; shift 2 ;;
    --user) NODE_USER="$2"; shift 2 ;;
    *) echo "install.sh: unknown option $1 (known: --root DIR, --user NAME)" >&2; exit 2 ;;
  esac
done
if [ "$(id -u)" -ne 0 ]; then
  echo "install.sh: run as root (it creates a user and writes /opt, /etc and /var/lib)" >&2
  exit 3
fi
opt="$ROOT/opt/dicom-node"
etc="$ROOT/etc/dicom-node"
state="$ROOT/var/lib/dicom-node"

if ! id -u "$NODE_USER" >/dev/null 2>&1; then
  if [ -n "$ROOT" ]; then
    echo "install.sh: user $NODE_USER does not exist (with --root, name an existing user)" >&2
    exit 3
  fi
  echo "==> creating the system user $NODE_USER"
  useradd --system --user-group --home-dir /var/lib/dicom-node --no-create-home \
    --shell /usr/sbin/nologin "$NODE_USER"
fi
group="$(id -gn "$NODE_USER")"

echo "==> code in $opt"
mkdir -p "$opt"
tar -C "$src" --exclude=./.venv --exclude=./.git --exclude=./var --exclude=./demo-output \
  --exclude='*/__pycache__' -cf - . | tar -C "$opt" -xf -
# The venv's interpreter must be one the node's user can run: the system's, not one under
# /root (pyenv), which is closed to other users.
PYTHON="${PYTHON:-$(command -v /usr/bin/python3 || command -v python3)}"
if [ ! -x "$opt/.venv/bin/python" ]; then
  "$PYTHON" -m venv "$opt/.venv"
fi
if ! setpriv --reuid="$NODE_USER" --regid="$(id -g "$NODE_USER")" --clear-groups \
    test -x "$(readlink -f "$opt/.venv/bin/python")"; then
  echo "install failed: $NODE_USER cannot run $opt/.venv/bin/python ($(readlink -f "$opt/.venv/bin/python")):" \
    "set PYTHON to an interpreter outside private folders" >&2
  exit 3
fi
# torch first, pinned: the CPU wheel this machine provides, not a multi-GB CUDA build
if ! "$opt/.venv/bin/python" -c "import torch" >/dev/null 2>&1; then
  echo "==> installing torch 2.13.0"
  "$opt/.venv/bin/pip" install -q torch==2.13.0
fi
echo "==> installing dicom-node into $opt/.venv"
"$opt/.venv/bin/pip" install -q --upgrade "$opt" > "$opt/.venv/pip-install.log" 2>&1 \
  || { cat "$opt/.venv/pip-install.log" >&2; echo "install failed: pip (log above)" >&2; exit 1; }
chmod -R u=rwX,go=rX "$opt"

echo "==> configuration in $etc, data in $state"
mkdir -p "$etc" "$state"
if [ ! -e "$etc/config.yaml" ]; then
  sed "s#^\(  storage_dir:\) ./var\( *\)#\1 $state\2#" "$src/config/dicom-node.example.yaml" > "$etc/config.yaml"
  grep -q "storage_dir: $state" "$etc/config.yaml" \
    || { echo "install failed: storage_dir not set in $etc/config.yaml" >&2; exit 1; }
  echo "    wrote $etc/config.yaml (from config/dicom-node.example.yaml): edit it for your site"
else
  echo "    kept the existing $etc/config.yaml"
fi
chown "root:$group" "$etc" "$etc/config.yaml"
chmod 0750 "$etc"
chmod 0640 "$etc/config.yaml"
chown "$NODE_USER:$group" "$state"
chmod 0750 "$state"

unit="$ROOT/etc/systemd/system/dicom-node.service"
mkdir -p "$(dirname "$unit")" "$ROOT/etc/logrotate.d"
sed -e "s#/opt/dicom-node#$opt#g" -e "s#/etc/dicom-node#$etc#g" -e "s#/var/lib/dicom-node#$state#g" \
  -e "s#^User=dicom-node#User=$NODE_USER#" -e "s#^Group=dicom-node#Group=$group#" \
  "$src/config/systemd/dicom-node.service" > "$unit"
sed -e "s#/var/lib/dicom-node#$state#g" -e "s#dicom-node dicom-node#$NODE_USER $group#" \
  "$src/config/systemd/dicom-node.logrotate" > "$ROOT/etc/logrotate.d/dicom-node"
echo "==> $unit and $ROOT/etc/logrotate.d/dicom-node"

"$opt/.venv/bin/dicom-node" --version | head -1
if [ -z "$ROOT" ] && [ -d /run/systemd/system ]; then
  systemctl daemon-reload
  echo "==> next: edit $etc/config.yaml, then"
  echo "    $opt/.venv/bin/dicom-node check-config $etc/config.yaml && systemctl enable --now dicom-node"
else
  echo "==> installed (systemd not running here: start it with"
  echo "    setpriv --reuid=$NODE_USER --regid=$group --init-groups $opt/.venv/bin/dicom-node serve --config $etc/config.yaml)"
fi
