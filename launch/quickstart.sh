#!/usr/bin/env bash
# Quickstart on a fresh Debian machine: install Fashion-MNIST and the package, then prune
# LeNet-300-100 to 95% with SAFE on the full Fashion-MNIST (about a minute on 2 CPU cores).
#   bash launch/quickstart.sh [WORKDIR]
set -euo pipefail
cd "$(dirname "$0")/.."
SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive

# Python venv support is a separate Debian package.
if ! python3 -c "import ensurepip, venv" 2>/dev/null; then
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq python3-venv python3-pip
fi

# The data: the Debian package, else the official download (where the network allows).
FMNIST=/usr/share/datasets/fashion-mnist
if [ -z "${SAFE_DATA_DIR:-}" ] && [ ! -d "$FMNIST" ]; then
  if ! $SUDO apt-get install -y -qq dataset-fashion-mnist; then
    FMNIST="$HOME/.cache/safe_dist/fashion_mnist"
    mkdir -p "$FMNIST"
    for f in train-images-idx3-ubyte train-labels-idx1-ubyte t10k-images-idx3-ubyte \
             t10k-labels-idx1-ubyte; do
      [ -f "$FMNIST/$f.gz" ] || curl -fsSL -o "$FMNIST/$f.gz" \
        "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/$f.gz"
    done
  fi
fi

[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q -e '.[dev,eval]'  # eval: also what the tests need
WORKDIR="${1:-runs/quickstart}"
exec .venv/bin/python -m safe_dist.train --config config:fashion_mnist_lenet --workdir "$WORKDIR"
