#!/usr/bin/env bash
# Prepare the guest lane: host tools (qemu, busybox-static, kmod, xz) and a stock Debian
# kernel unpacked into a cache directory.
#
# Usage: scripts/guest/prepare.sh [CACHE_DIR]     (default: build/guest-cache)
#
# The kernel package is only downloaded and unpacked, never installed: installing
# linux-image-* would run initramfs/bootloader hooks on the CI host.
# Re-running is cheap: nothing is installed or downloaded twice.
# On success the last line of stdout is the prepared kernel release (e.g. 6.1.0-56-amd64),
# and CACHE_DIR/kernel-release names it for run.sh.
set -euo pipefail

cache=${1:-build/guest-cache}
meta=${GUEST_KERNEL_META:-linux-image-amd64}   # override to test another flavour
PATH=$PATH:/usr/sbin:/sbin                     # depmod lives there; non-login root shells may lack it

die() { echo "prepare.sh: error: $*" >&2; exit 1; }
log() { echo "prepare.sh: $*" >&2; }

mkdir -p "$cache/debs"
cache=$(cd "$cache" && pwd)
# apt/dpkg chatter goes to a log so the CI output stays readable; shown on failure.
aptlog="$cache/apt.log"
: > "$aptlog"
apt_run() { "$@" >>"$aptlog" 2>&1 || { tail -n 30 "$aptlog" >&2; return 1; }; }

# apt lists may be absent (fresh container) or stale (a point release removed the
# old .deb from the mirror); refresh them at most once per run, and only on need.
apt_updated=0
apt_update() {
    [ "$apt_updated" = 1 ] && return 0
    log "apt-get update"
    apt_run apt-get update || die "apt-get update failed"
    apt_updated=1
}

# --- host tools -------------------------------------------------------------
# package:command pairs; a package is installed only if its command is missing.
missing=()
# kmod: the kernel package ships no modules.dep (its postinst runs depmod), so we run depmod.
# xz-utils: to unpack the kernel image (below); busybox-static also gives run.sh its cpio.
for pc in qemu-system-x86:qemu-system-x86_64 busybox-static:busybox kmod:depmod xz-utils:xz; do
    command -v "${pc#*:}" >/dev/null 2>&1 || missing+=("${pc%%:*}")
done
# busybox (the dynamic one) would not run inside the initramfs; we need the static build.
if [[ ! " ${missing[*]} " =~ " busybox-static " ]] && ! dpkg -s busybox-static >/dev/null 2>&1; then
    missing+=(busybox-static)
fi
if [ ${#missing[@]} -gt 0 ]; then
    [ "$(id -u)" = 0 ] || die "need root to install: ${missing[*]}"
    log "installing: ${missing[*]}"
    apt_update
    # recommends of qemu-system-x86 pull in hundreds of MB (firmware, GUI bits) we do not use
    DEBIAN_FRONTEND=noninteractive apt_run apt-get install -y --no-install-recommends "${missing[@]}" \
        || die "apt-get install ${missing[*]} failed"
fi

# --- kernel -----------------------------------------------------------------
# The meta package depends on exactly one concrete image package (linux-image-<abi>-amd64).
resolve_kernel_pkg() {
    apt-cache depends "$meta" 2>/dev/null \
        | awk '$1 == "Depends:" && $2 ~ /^linux-image-[0-9]/ { print $2; exit }'
}
pkg=$(resolve_kernel_pkg || true)
if [ -z "$pkg" ]; then
    apt_update
    pkg=$(resolve_kernel_pkg || true)
fi
[ -n "$pkg" ] || die "cannot resolve the kernel package that $meta depends on (apt-cache depends $meta)"
ver=$(apt-cache show --no-all-versions "$pkg" | awk '/^Version:/ { print $2; exit }')
[ -n "$ver" ] || die "no version known for $pkg"
log "kernel package: $pkg $ver"

# dpkg file names encode ':' of an epoch as %3a; kernel versions have no epoch, keep it simple.
deb="$cache/debs/${pkg}_${ver}_amd64.deb"
if [ ! -s "$deb" ]; then
    dl() { (cd "$cache/debs" && apt_run apt-get download "$pkg=$ver"); }
    if ! dl; then
        apt_update
        dl || die "apt-get download $pkg=$ver failed"
    fi
fi
[ -s "$deb" ] || die "download did not produce $deb"

root="$cache/unpacked/${pkg}_${ver}"
if [ ! -e "$root/.unpacked" ]; then
    rm -rf "$root"
    mkdir -p "$root"
    dpkg-deb -x "$deb" "$root" || die "dpkg-deb -x $deb failed"
fi

# The release string is the name of the only modules directory in the package.
krel=$(basename "$(find "$root/lib/modules" -mindepth 1 -maxdepth 1 -type d | head -n1)")
if [ -z "$krel" ] || [ ! -f "$root/boot/vmlinuz-$krel" ]; then
    die "unexpected layout in $deb (no boot/vmlinuz-<release>)"
fi
if [ ! -e "$root/.unpacked" ]; then
    depmod -b "$root" "$krel" || die "depmod -b $root $krel failed"
    touch "$root/.unpacked"
fi
[ -f "$root/lib/modules/$krel/modules.dep" ] || die "depmod produced no modules.dep"
grep -qE '(^|/)vgem\.ko(\.[a-z]+)?:' "$root/lib/modules/$krel/modules.dep" \
    || die "kernel $krel has no vgem module"

# Without KVM the guest spends ~5 s unpacking the xz bzImage; qemu can instead boot the
# uncompressed ELF through its PVH entry point (CONFIG_PVH), so keep an unpacked copy.
# Optional: run.sh boots the bzImage when this is missing.
vmlinuz="$root/boot/vmlinuz-$krel" vmlinux="$root/boot/vmlinux-$krel"
if [ ! -s "$vmlinux" ] && grep -q '^CONFIG_PVH=y' "$root/boot/config-$krel"; then
    off=$(LC_ALL=C grep -obUaP '\xfd7zXZ\x00' "$vmlinuz" | head -n1 | cut -d: -f1 || true)
    # xz stops at the end of its stream: tail's SIGPIPE is expected, not an error.
    if [ -n "$off" ] && { tail -c +"$((off + 1))" "$vmlinuz" || true; } | xz -dc --single-stream > "$vmlinux.tmp" 2>/dev/null \
        && [ "$(head -c4 "$vmlinux.tmp" | od -An -c | tr -d ' ')" = '177ELF' ]; then
        mv "$vmlinux.tmp" "$vmlinux"
    else
        rm -f "$vmlinux.tmp"
        log "note: could not unpack an ELF vmlinux from $vmlinuz; TCG boots will be ~5 s slower"
    fi
fi

# Older kernels left by earlier runs would only grow a CI cache: keep the current one.
find "$cache/debs" -maxdepth 1 -name '*.deb' ! -name "${deb##*/}" -delete
find "$cache/unpacked" -mindepth 1 -maxdepth 1 ! -name "${root##*/}" -exec rm -rf {} +

# run.sh reads these; written last so an interrupted run never leaves a half-valid pointer.
printf '%s\n' "$root" > "$cache/kernel-root.tmp"
printf '%s\n' "$krel" > "$cache/kernel-release.tmp"
mv "$cache/kernel-root.tmp" "$cache/kernel-root"
mv "$cache/kernel-release.tmp" "$cache/kernel-release"
log "kernel $krel ready in $root"
echo "$krel"
