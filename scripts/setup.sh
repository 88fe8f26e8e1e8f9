#!/usr/bin/env bash
# Installs the Debian 12 packages uhmm needs to build and test, if any are missing.
# Idempotent: does nothing (no apt-get update) when everything is already installed.
set -euo pipefail

PACKAGES=(
  build-essential
  cmake
  ninja-build
  g++
  libgtest-dev
  libgmock-dev
  libbenchmark-dev
  libfmt-dev
  libcli11-dev
  nlohmann-json3-dev
  libspdlog-dev
  pkg-config
  clang
)

missing=()
for pkg in "${PACKAGES[@]}"; do
  # dpkg -s also reports removed-but-configured packages; require "install ok installed".
  status=$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true)
  if [[ "$status" != "install ok installed" ]]; then
    missing+=("$pkg")
  fi
done

if [[ ${#missing[@]} -eq 0 ]]; then
  echo "setup: all required packages are installed"
  exit 0
fi

echo "setup: installing missing packages: ${missing[*]}"

SUDO=()
if [[ $(id -u) -ne 0 ]]; then
  if command -v sudo >/dev/null 2>&1; then
    SUDO=(sudo)
  else
    echo "setup: not root and sudo is not available; install manually: ${missing[*]}" >&2
    exit 1
  fi
fi

export DEBIAN_FRONTEND=noninteractive
"${SUDO[@]}" apt-get update
"${SUDO[@]}" apt-get install -y --no-install-recommends "${missing[@]}"
echo "setup: done"
