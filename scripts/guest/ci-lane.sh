#!/usr/bin/env bash
# The guest lane of CI: boots Debian 12's stock kernel (6.1) under qemu with vgem loaded and runs
# the DRM backend tests against that real driver, the parity suite with device memory in vgem GEM
# objects, the SVM API suite and two samples with the SVM device's memory in a vgem GEM object,
# and the mirror and parity suites on the older kernel (no PAGEMAP_SCAN, PROCMAP_QUERY or
# UFFDIO_MOVE: the fallbacks). The parity suite runs once, with HMMKIT_DMIRROR_MEMORY=drm: the
# private devices' memory is in vgem GEM objects, the coherent ones keep memfds (vgem ignores mmap
# offsets), so that one run covers both. Device memory is 32 MiB per dmirror device: under
# software emulation (TCG) every GEM page fault is slow, and forked children build their own
# devices. Needs the gcc build (build/gcc). Exits 0 on success, 77 when qemu cannot start here (CI
# then skips the lane with the reason), anything else on failure.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
build=${1:-build/gcc}
cache=${GUEST_CACHE:-build/guest-cache}
B=$build/tests

bash scripts/guest/prepare.sh "$cache"
# HMMKIT_REQUIRE_DRM turns the vgem tests' "no device" skip into a failure inside the guest.
bash scripts/guest/run.sh --cache "$cache" --log "$build/guest-console.log" --strip-debug \
  --append hugepages=64 --env HMMKIT_REQUIRE_DRM=1 --env HMMKIT_DMIRROR_DEVICE_MB=32 \
  --timeout 1500 --cmd-timeout 600 \
  --run "dri:ls -l /dev/dri" \
  --run "drm_vgem_test:$B/drm_vgem_test --gtest_brief=1" \
  --run "drm_kernel_svm_test:$B/drm_kernel_svm_test --gtest_brief=1" \
  --run "parity_vgem_memory:HMMKIT_DMIRROR_MEMORY=drm $B/parity_test --gtest_brief=1" \
  --run "svm_api_vgem_memory:HMMKIT_DEVICE_MEMORY=drm $B/svm_api_test --gtest_brief=1" \
  --run "vector_add_vgem_memory:HMMKIT_DEVICE_MEMORY=drm $build/samples/vector_add" \
  --run "stencil_vgem_memory:HMMKIT_DEVICE_MEMORY=drm $build/samples/stencil" \
  --run "kernel_features_test:$B/kernel_features_test --gtest_brief=1" \
  --run "address_space_test:$B/address_space_test --gtest_brief=1" \
  --run "range_fault_test:$B/range_fault_test --gtest_brief=1" \
  --run "monitor_test:$B/monitor_test --gtest_brief=1" \
  --run "migrate_test:$B/migrate_test --gtest_brief=1" \
  --run "device_memory_test:$B/device_memory_test --gtest_brief=1"
