#!/usr/bin/env python3
"""Writes the seed corpus of tests/fuzz/corpus/<harness>/ (deterministic; rerun after changing a
harness's input encoding). Structured seeds walk the interesting paths on purpose (write, read
back, migrate, read from another device, snapshot, exclusive, remaps); the rest are random bytes
from fixed seeds. Each file is small; the whole corpus stays far below 200 KB."""
import os
import random
import sys

HERE = os.path.dirname(os.path.abspath(__file__))

# ---- fuzz_dmirror encoding (fuzz_dmirror.cpp, dmirror_arena.hpp) ----
READ, WRITE, TO_DEV, TO_SYS, SNAP, EXCL, CHECK_EXCL, RELEASE, FLAGS = range(9)
SLOT_PAGES = 4


def page(slot, i=0):
    return 1 + slot * SLOT_PAGES + i


def cmd(req, dev=0, first=1, npages=4, ptr=1, seed=None):
    out = [0, req, dev, 0, first, npages - 1, ptr]
    if req == FLAGS:
        out.append(1)
    if req == WRITE:
        out.append(seed if seed is not None else 0x42)
    return out


def remap(slot, kind, prot, fill=None):
    # kind: 0 private, 2 shared, 3 hole; prot: 0 RW, 2 RO, 3 NONE
    return [9, slot, kind, prot] + ([1, fill] if fill is not None else [0])


def protect(slot, prot):  # prot: 0 RW, 1 RO, 2 NONE
    return [11, slot, prot]


def cpu_write(slot, i, seed):
    return [12, slot, i, seed]


VERIFY = [14]


def close(dev):
    return [15, dev]


def dmirror_seeds():
    s = {}
    rw0 = remap(0, 0, 0, 7)
    s["write_read"] = rw0 + cmd(WRITE, 0, page(0)) + cmd(READ, 0, page(0)) + VERIFY
    s["migrate_read"] = rw0 + cmd(TO_DEV, 0, page(0)) + cmd(READ, 0, page(0)) + VERIFY
    s["migrate_remote"] = rw0 + cmd(TO_DEV, 0, page(0)) + cmd(READ, 1, page(0)) + cmd(
        TO_DEV, 1, page(0)) + cmd(SNAP, 0, 0, 26) + VERIFY
    s["coherent"] = rw0 + cmd(TO_DEV, 2, page(0)) + cmd(WRITE, 3, page(0)) + cmd(
        TO_SYS, 2, page(0)) + VERIFY
    s["migrate_cpu_back"] = rw0 + cmd(TO_DEV, 1, page(0)) + cpu_write(0, 1, 9) + cmd(
        READ, 1, page(0)) + cmd(TO_DEV, 1, page(0)) + VERIFY
    s["release"] = rw0 + cmd(TO_DEV, 0, page(0)) + cmd(RELEASE, 0) + VERIFY
    s["read_only"] = remap(1, 0, 2, 3) + cmd(READ, 0, page(1)) + cmd(WRITE, 0, page(1)) + protect(
        1, 0) + cmd(WRITE, 0, page(1)) + VERIFY
    s["rw_then_ro"] = rw0 + cmd(WRITE, 0, page(0)) + protect(0, 1) + cmd(WRITE, 0, page(0)) + cmd(
        READ, 0, page(0))
    s["prot_none"] = remap(2, 0, 3) + cmd(READ, 0, page(2)) + cmd(TO_DEV, 0, page(2)) + cmd(
        SNAP, 0, page(2))
    s["shared"] = remap(3, 2, 0, 5) + cmd(WRITE, 0, page(3)) + cmd(TO_DEV, 0, page(3)) + cmd(
        READ, 1, page(3)) + VERIFY
    s["hole"] = remap(4, 3, 0) + cmd(READ, 0, page(4)) + cmd(WRITE, 0, page(4)) + cmd(
        TO_DEV, 0, page(4)) + cmd(EXCL, 0, page(4)) + cmd(SNAP, 0, page(4))
    s["exclusive"] = rw0 + cmd(EXCL, 0, page(0)) + cmd(CHECK_EXCL, 0, page(0)) + cpu_write(
        0, 0, 3) + cmd(CHECK_EXCL, 0, page(0)) + VERIFY
    s["fail_alloc"] = rw0 + cmd(FLAGS, 0, page(0)) + cmd(TO_DEV, 0, page(0)) + cmd(
        FLAGS, 1, page(0)) + cmd(TO_DEV, 1, page(0)) + cmd(TO_SYS, 1, page(0))
    s["span_slots"] = rw0 + remap(1, 0, 0, 8) + remap(2, 2, 0, 9) + cmd(WRITE, 0, page(0), 12) + cmd(
        TO_DEV, 0, page(0), 12) + cmd(READ, 0, page(0), 12) + VERIFY
    s["unmap_after_migrate"] = rw0 + cmd(TO_DEV, 0, page(0)) + remap(0, 3, 0) + cmd(
        READ, 0, page(0)) + remap(0, 0, 0, 2) + cmd(READ, 0, page(0)) + VERIFY
    s["remap_over_device"] = rw0 + cmd(TO_DEV, 1, page(0)) + remap(0, 0, 0, 4) + cmd(
        READ, 1, page(0)) + VERIFY
    s["close_reopen"] = rw0 + cmd(READ, 0, page(0)) + close(0) + [0, READ, 16, 0, 1, 0, 1] + cmd(
        READ, 0, page(0))
    s["guards"] = rw0 + cmd(READ, 0, 0, 2) + cmd(READ, 0, 25, 1) + cmd(SNAP, 0, 0, 26)
    s["invalid_ranges"] = [0, READ, 0, 11, 3, 7, 1, 1] + [0, WRITE, 0, 12, 3, 1, 9] + [
        0, SNAP, 0, 13, 1, 5, 1, 1] + [0, TO_DEV, 0, 14, 2, 1, 1, 1]
    s["huge"] = rw0 + [0, READ, 0, 15, 1, 3, 0, 1] + [0, WRITE, 0, 15, 1, 0, 0, 1, 9] + [
        0, TO_DEV, 0, 15, 1, 2, 0, 1]
    # npages 2^21 from slot 0: the upper guard stops READ/WRITE, MIGRATE_TO_DEV sees it first.
    huge = [15, 1, 5, 0, 1]
    s["huge_npages"] = rw0 + [0, READ, 0] + huge + [0, WRITE, 0] + huge + [9] + [
        0, TO_DEV, 0] + huge + [0, RELEASE, 0] + huge + [0, READ, 0] + huge + [
        0, WRITE, 0] + huge + [9] + [0, TO_DEV, 0] + huge + [0, RELEASE, 0] + huge
    s["null_ptr"] = rw0 + cmd(READ, 0, page(0), ptr=0) + cmd(SNAP, 0, page(0), ptr=0)
    s["unknown"] = [0, 200, 0, 0, 1, 0, 1, 5] + [0, 201, 0, 0, 1, 0, 1, 3] + [
        0, 203, 0, 0, 1, 0, 1] + [1, 2, 3, 4, 5, 6, 7, 8]
    s["bad_handle"] = [0, READ, 17, 0, 1, 0, 1] + [0, WRITE, 18, 0, 1, 0, 1, 1]
    rng = random.Random(1)
    for i in range(14):
        s[f"random_{i:02d}"] = [rng.randrange(256) for _ in range(rng.randrange(16, 160))]
    return s


# ---- fuzz_svm encoding (fuzz_svm.cpp) ----
def u16(v):
    return [v & 0xFF, (v >> 8) & 0xFF]


def svm_range(mode, off=0, length=16):
    """ChooseRange: mode byte, offset, then what the mode reads."""
    out = [mode] + u16(off)
    if mode < 6:
        out += u16(length - 1)
    elif mode == 6:
        out += u16(0)
    elif mode in (7, 8):
        out += u16(length - 1)
    else:
        out += [0] + u16(0)
    return out


def svm_seeds():
    s = {}

    def launch(first, n, atomic):
        return [0] + u16(first) + u16(n) + [atomic]

    def prefetch(mode, loc, length=4096, off=0):
        return [5] + svm_range(mode, off, length) + [1, loc]

    def advise(mode, advice, loc=0):
        return [7] + svm_range(mode, 0, 4096) + [1, advice, loc]

    def residency(mode):
        return [8] + svm_range(mode, 0, 4096) + [1]

    def probe(op, where):
        return [3, op, 5, 0, where, 1, 0, 0]

    check = [14]
    s["launch_check"] = launch(0, 64, 0) + launch(10, 20, 1) + check
    s["launch_all"] = launch(0, 4096, 1) + check + launch(0, 4096, 0) + check
    s["probes"] = sum((probe(op, w) for op in range(4) for w in range(6)), [])
    s["prefetch_device"] = prefetch(0, 0, 16384) + residency(0) + prefetch(0, 1, 16384) + check
    s["prefetch_then_launch"] = prefetch(0, 0, 8192) + launch(0, 2048, 0) + check
    s["prefetch_bad"] = sum((prefetch(m, l) for m in range(5, 12) for l in (0, 1, 6, 7)), [])
    s["advise"] = sum((advise(m, a) for m in (0, 4, 5, 7) for a in (0, 2, 4, 241)), [])
    s["advise_then_launch"] = advise(0, 2) + launch(0, 512, 0) + advise(0, 4) + launch(
        0, 512, 1) + advise(0, 0, 1) + launch(0, 512, 0) + check
    s["residency"] = sum((residency(m) for m in range(12)), [])
    create = [9, 0]
    s["streams"] = create + [10, 1, 0, 1] + u16(5) + u16(40) + [0] + [11, 3, 0, 1] + svm_range(
        0, 0, 4096) + [0] + [11, 5, 0, 0, 0, 1] + [9, 4, 0] + [9, 7, 0] + check
    s["two_streams"] = create + [9, 0, 0] + [10, 1, 0, 0] + u16(0) + u16(30) + [1] + [
        10, 1, 1, 1] + u16(5) + u16(30) + [0] + [9, 4, 1] + check
    s["stream_bad_prefetch"] = create + [11, 3, 0, 1] + svm_range(7) + [0] + [
        11, 5, 0, 0, 1, 0] + [9, 4, 0]
    s["bad_calls"] = sum(([12, i] for i in range(12)), [])
    s["open_other"] = sum(([13, 0, b, m, u, r] + u16(100) + [1] for b in (2, 4)
                           for m in (0, 2, 3, 6) for u in (1, 4) for r in (0, 1)), [])
    rng = random.Random(2)
    for i in range(14):
        s[f"random_{i:02d}"] = [rng.randrange(256) for _ in range(rng.randrange(16, 120))]
    return s


# Seeds that hit a known, unfixed library bug (known_bugs.hpp) go to regressions/ instead: the
# corpus must pass in every build. Random seeds that hit one are dropped.
KNOWN_BUG_SEEDS = {
    "hole": "dmirror-device-read-after-munmap",
    "remap_over_device": "dmirror-device-read-after-munmap",
    "unmap_after_migrate": "dmirror-device-read-after-munmap",
    "prefetch_bad": "prefetch-system-unmapped-ok",
    "stream_bad_prefetch": "prefetch-system-unmapped-ok",
}
DROPPED = {("svm", "random_04"), ("svm", "random_08"), ("svm", "random_11"), ("svm", "random_12")}


def write(harness, seeds):
    for name, data in seeds.items():
        if (harness, name) in DROPPED:
            continue
        bug = KNOWN_BUG_SEEDS.get(name)
        d = os.path.join(HERE, "regressions" if bug else "corpus", harness)
        os.makedirs(d, exist_ok=True)
        fname = f"{bug}.seed_{name}" if bug else "seed_" + name
        with open(os.path.join(d, fname), "wb") as f:
            f.write(bytes(b & 0xFF for b in data))


if __name__ == "__main__":
    write("dmirror", dmirror_seeds())
    write("svm", svm_seeds())
    sys.exit(0)
