#!/usr/bin/env bash
# Installs a built tree into a temporary prefix and builds two small consumers against it, one with
# find_package(hmmkit) and one with pkg-config, then runs them and the installed hmmctl.
# Usage: scripts/check-install.sh [build-dir]   (default: build/gcc, already built)
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
build=${1:-$root/build/gcc}
work=$(mktemp -d "${TMPDIR:-/tmp}/hmmkit-check-install.XXXXXX")
trap 'rm -rf "$work"' EXIT
prefix=$work/prefix

cmake --install "$build" --prefix "$prefix" >/dev/null
echo "check-install: installed $build into $prefix"
"$prefix/bin/hmmctl" --help >/dev/null

mkdir -p "$work/src"
cat >"$work/src/main.cpp" <<'CPP'
#include <cstdio>

#include "hmmkit/mirror/kernel_features.hpp"

int main() {
  const hmmkit::KernelFeatures& f = hmmkit::KernelFeatures::Get();
  std::printf("Linux %s, userfaultfd: %s, %zu mechanism rows\n", f.kernel_release.c_str(),
              hmmkit::ToString(f.uffd_mode), hmmkit::ChooseMechanisms(f).size());
  return f.kernel_release.empty() ? 1 : 0;
}
CPP
cat >"$work/src/CMakeLists.txt" <<'CMAKE'
cmake_minimum_required(VERSION 3.25)
project(hmmkit_consumer LANGUAGES CXX)
find_package(hmmkit 0.1 REQUIRED)
add_executable(consumer main.cpp)
target_link_libraries(consumer PRIVATE hmmkit::mirror)
CMAKE

# 1. CMake package.
generator=()
command -v ninja >/dev/null && generator=(-G Ninja)
cmake -S "$work/src" -B "$work/build" "${generator[@]}" -DCMAKE_PREFIX_PATH="$prefix" >/dev/null
cmake --build "$work/build" >/dev/null
echo -n "check-install: find_package consumer: "
"$work/build/consumer"

# 2. pkg-config.
pcdir=$(dirname "$(find "$prefix" -name hmmkit.pc -print -quit)")
flags=$(PKG_CONFIG_PATH="$pcdir" pkg-config --cflags --libs hmmkit)
echo "check-install: pkg-config --cflags --libs hmmkit: $flags"
# shellcheck disable=SC2086  # word splitting of the flags is intended
"${CXX:-c++}" -std=c++20 "$work/src/main.cpp" -o "$work/consumer-pc" $flags
echo -n "check-install: pkg-config consumer: "
"$work/consumer-pc"
echo "check-install: ok"
