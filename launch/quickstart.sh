#!/usr/bin/env bash
# Quickstart on a fresh Debian machine: install Fashion-MNIST and the package, then prune
# LeNet-300-100 to 95% with SAFE on 2 CPU cores (a few minutes).
set -euo pipefail
cd "$(dirname "$0")/.."
SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
if [ ! -d /usr/share/datasets/fashion-mnist ] && [ -z "${SAFE_DATA_DIR:-}" ]; then
  $SUDO apt-get install -y dataset-fashion-mnist
fi
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q -e '.[dev]'
WORKDIR="${1:-runs/quickstart}"
exec .venv/bin/python -m safe_dist.train --config config:fashion_mnist_lenet --workdir "$WORKDIR"
