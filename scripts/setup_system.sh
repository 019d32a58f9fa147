#!/usr/bin/env bash
# System packages: Fashion-MNIST (Debian's dataset-fashion-mnist) and Google's adb client
# (used to prove our ADB test device speaks the real protocol). Quick when already present.
set -euo pipefail
need=()
[ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] || need+=(dataset-fashion-mnist)
command -v adb >/dev/null 2>&1 || need+=(adb)
command -v cmake >/dev/null 2>&1 || need+=(cmake)
command -v g++ >/dev/null 2>&1 || need+=(g++)
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing system packages: ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null
  apt-get install -y -qq "${need[@]}" >/dev/null
elif command -v sudo >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
  echo "installing system packages with sudo: ${need[*]}"
  sudo apt-get update -qq >/dev/null && sudo apt-get install -y -qq "${need[@]}" >/dev/null
else
  echo "note: cannot install ${need[*]} (no apt-get as root)." >&2
  echo "      Fashion-MNIST: pass --data-dir DIR or set AMC_DATA_DIR to a folder of the IDX .gz files." >&2
fi
