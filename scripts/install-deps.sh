#!/usr/bin/env bash
# Installs the Debian 12 packages hmmkit builds and tests with. Idempotent; run as root.
set -euo pipefail

packages=(
  build-essential cmake ninja-build pkg-config git
  g++ clang clang-format clang-tidy libclang-rt-dev
  libdrm-dev libboost-dev libspdlog-dev libfmt-dev
  libgtest-dev libgmock-dev libvulkan-dev libbenchmark-dev mesa-vulkan-drivers
  gdb  # backtraces of every thread when hmmkit_stress's watchdog reports a hang (tests/stress)
  doxygen  # the generated API reference, warnings are errors (scripts/doxygen.sh, CI lane "docs")
)

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done

if [ ${#missing[@]} -eq 0 ]; then
  echo "install-deps: all ${#packages[@]} packages present"
  exit 0
fi

echo "install-deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
sudo_cmd=()
[ "$(id -u)" -eq 0 ] || sudo_cmd=(sudo)
"${sudo_cmd[@]}" apt-get update -q
"${sudo_cmd[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}"
