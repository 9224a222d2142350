#!/usr/bin/env bash
# Installs everything the test suite needs on a fresh Debian machine (run as root):
# Prometheus and promtool from Debian, the load client hey, a C compiler and the Python headers
# for the compiled request path, and the project with its dev and bench extras.
set -euo pipefail
cd "$(dirname "$0")/.."
has_headers() {
  python3 -c 'import os, sys, sysconfig; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))'
}
if ! command -v promtool >/dev/null || ! command -v prometheus >/dev/null || ! command -v hey >/dev/null \
    || ! command -v cc >/dev/null || ! has_headers; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  packages="prometheus hey"
  command -v cc >/dev/null || packages="$packages gcc"
  has_headers || packages="$packages python3-dev"
  apt-get install -y -qq --no-install-recommends $packages >/dev/null
fi
python3 -m pip install -q --disable-pip-version-check -e '.[dev,bench]'
