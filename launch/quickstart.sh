#!/usr/bin/env bash
# Quickstart on a fresh Debian machine: install Fashion-MNIST and the package, then prune
# LeNet-300-100 to 95% with SAFE on the full Fashion-MNIST (about a minute on 2 CPU cores).
#   bash launch/quickstart.sh [WORKDIR]
set -euo pipefail
cd "$(dirname "$0")/.."
SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive

# Container images ship with empty package lists, where `apt-get install` finds nothing:
# refresh them once, before the first install (and only when something needs installing).
APT_UPDATED=""
apt_install() {
  if [ -z "$APT_UPDATED" ]; then
    # A failed update (offline, a broken mirror) still leaves whatever lists there are.
    $SUDO apt-get update -qq || true
    APT_UPDATED=1
  fi
  $SUDO apt-get install -y -qq "$@"
}

# Python venv support is a separate Debian package.
if ! python3 -c "import ensurepip, venv" 2>/dev/null; then
  apt_install python3-venv python3-pip
fi

# The data: the Debian package, else the official download (where the network allows).
# safe_dist finds either: /usr/share/datasets/fashion-mnist or ~/.cache/safe_dist/fashion_mnist.
FILES="train-images-idx3-ubyte train-labels-idx1-ubyte t10k-images-idx3-ubyte t10k-labels-idx1-ubyte"
CACHE="$HOME/.cache/safe_dist/fashion_mnist"
URL="http://fashion-mnist.s3-website.eu-central-1.amazonaws.com"
downloaded() { for f in $FILES; do [ -f "$CACHE/$f.gz" ] || return 1; done; }
if [ -z "${SAFE_DATA_DIR:-}" ] && ! dpkg -s dataset-fashion-mnist >/dev/null 2>&1 \
    && ! downloaded; then
  if ! apt_install dataset-fashion-mnist; then
    echo "quickstart: no Debian package dataset-fashion-mnist; downloading to $CACHE" >&2
    mkdir -p "$CACHE"
    for f in $FILES; do
      [ -f "$CACHE/$f.gz" ] && continue
      # Through a temporary name, so that a failed download never passes for the file.
      if ! curl -fsSL -o "$CACHE/$f.gz.part" "$URL/$f.gz"; then
        rm -f "$CACHE/$f.gz.part"
        cat >&2 <<MSG
quickstart: could not get Fashion-MNIST: \`apt-get install dataset-fashion-mnist\` failed
and so did the download of $URL/$f.gz.
Offline: copy the four files {train,t10k}-{images-idx3,labels-idx1}-ubyte.gz
(from the dataset-fashion-mnist .deb or https://github.com/zalandoresearch/fashion-mnist)
into $CACHE, or into a directory named by SAFE_DATA_DIR, then rerun this script.
MSG
        exit 1
      fi
      mv "$CACHE/$f.gz.part" "$CACHE/$f.gz"
    done
  fi
fi

[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q -e '.[dev,eval]'  # eval: also what the tests need
WORKDIR="${1:-runs/quickstart}"
exec .venv/bin/python -m safe_dist.train --config config:fashion_mnist_lenet --workdir "$WORKDIR"
