#!/usr/bin/env bash
# Installs a built tree into a temporary prefix and builds small consumers against it: a mirror
# program with find_package(hmmkit), an SVM application with find_package (hmmkit::svm) and the
# mirror program with pkg-config; then runs them and the installed hmmctl.
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

# 2. An SVM application with find_package (hmmkit::svm pulls in the driver libraries it needs):
# a kernel on the emulated device over mmap'd memory, checked by the CPU afterwards.
mkdir -p "$work/svm"
cat >"$work/svm/main.cpp" <<'CPP'
#include <sys/mman.h>

#include <cstdio>
#include <memory>

#include "hmmkit/svm.hpp"

namespace svm = hmmkit::svm;

int main() {
  auto dev = svm::Device::Open();
  if (!dev.ok()) {
    std::fprintf(stderr, "open: %s\n", dev.status().ToString().c_str());
    return 1;
  }
  const size_t n = size_t(1) << 18;
  void* mem = mmap(nullptr, n * sizeof(unsigned), PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (mem == MAP_FAILED) return 1;
  auto* v = static_cast<unsigned*>(mem);
  for (size_t i = 0; i < n; ++i) v[i] = unsigned(i);
  hmmkit::Status st = (*dev)->Launch(
      n, [v](svm::KernelContext& k, size_t i) { k.Store(&v[i], k.Load(&v[i]) * 3 + 1); });
  if (!st.ok()) {
    std::fprintf(stderr, "launch: %s\n", st.ToString().c_str());
    return 1;
  }
  size_t bad = 0;
  for (size_t i = 0; i < n; ++i) bad += v[i] != unsigned(i) * 3 + 1 ? 1 : 0;
  std::printf("%zu of %zu results wrong, %llu bytes migrated to the device\n", bad, n,
              static_cast<unsigned long long>((*dev)->stats().bytes_to_device));
  munmap(mem, n * sizeof(unsigned));
  return bad == 0 ? 0 : 1;
}
CPP
cat >"$work/svm/CMakeLists.txt" <<'CMAKE'
cmake_minimum_required(VERSION 3.25)
project(hmmkit_svm_consumer LANGUAGES CXX)
find_package(hmmkit 0.1 REQUIRED)
add_executable(svm_consumer main.cpp)
target_link_libraries(svm_consumer PRIVATE hmmkit::svm)
CMAKE
cmake -S "$work/svm" -B "$work/svm-build" "${generator[@]}" -DCMAKE_PREFIX_PATH="$prefix" >/dev/null
cmake --build "$work/svm-build" >/dev/null
echo -n "check-install: find_package SVM application: "
"$work/svm-build/svm_consumer"

# 3. pkg-config.
pcdir=$(dirname "$(find "$prefix" -name hmmkit.pc -print -quit)")
flags=$(PKG_CONFIG_PATH="$pcdir" pkg-config --cflags --libs hmmkit)
echo "check-install: pkg-config --cflags --libs hmmkit: $flags"
# shellcheck disable=SC2086  # word splitting of the flags is intended
"${CXX:-c++}" -std=c++20 "$work/src/main.cpp" -o "$work/consumer-pc" $flags
echo -n "check-install: pkg-config consumer: "
"$work/consumer-pc"
echo "check-install: ok"
