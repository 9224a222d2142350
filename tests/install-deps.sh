#!/usr/bin/env bash
# Installs everything the test suite needs on a fresh Debian machine (run as root):
# Prometheus and promtool from Debian, the load client hey, and the project with its dev extra.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v promtool >/dev/null || ! command -v prometheus >/dev/null || ! command -v hey >/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends prometheus hey >/dev/null
fi
python3 -m pip install -q --disable-pip-version-check -e '.[dev,bench]'
