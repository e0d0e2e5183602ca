#!/usr/bin/env bash
# Run commands inside a qemu guest booting the stock Debian kernel prepared by
# prepare.sh, with vgem (and its dependencies) loaded.
#
# Usage: scripts/guest/run.sh [options] [-- CMD [ARGS...]]
#   --run NAME:CMDLINE  add a command (shell text, run by busybox sh); repeatable, runs in order
#   --file PATH         copy PATH (file or directory) to the same absolute path in the guest; repeatable
#   --env K=V           export K=V for the commands; repeatable
#   --module NAME       load this module too (with its dependencies); repeatable; vgem is always loaded
#   --cache DIR         prepare.sh's cache (default build/guest-cache)
#   --log FILE          console log (default CACHE/console.log)
#   --mem MB            guest memory (default 2048)
#   --smp N             guest CPUs (default 2)
#   --timeout SEC       whole run, boot included (default 900)
#   --cmd-timeout SEC   per command inside the guest, 0 = none (default 300)
#   --boot-timeout SEC  give up when the guest has not reached /init by then (default 180)
#   --no-kvm            force TCG even if /dev/kvm works
#   --append ARGS       extra kernel command line (e.g. hugepages=64 for hugetlb tests)
#   --strip-debug       strip debug info from the staged programs (-90% initramfs for
#                       RelWithDebInfo tests, faster boot); needs objcopy
# The program of each command (first word, if it is a path or a host program that
# busybox does not provide) is copied along with the libraries ldd lists for it.
# Commands start in the host's current directory, so relative paths work.
#
# Exit status: 0 every command ended with rc=0; 1 a command failed, or the guest did
# not finish (timeout, panic), or vgem did not come up; 2 usage or setup error;
# 77 qemu could not start or the guest never reached /init (CI may skip the lane).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cache=build/guest-cache log="" mem=2048 smp=2 timeout=900 cmd_timeout=300 boot_timeout=180 use_kvm=1 append="" strip=0
names=() cmds=() files=() envs=() modules=(vgem)

die() { echo "run.sh: error: $*" >&2; exit 2; }
log() { echo "run.sh: $*" >&2; }

# Single-quote a word for the guest's sh ($'..' from printf %q is not POSIX).
shq() { printf "'%s'" "${1//\'/\'\\\'\'}"; }

while [ $# -gt 0 ]; do
    case $1 in
        --run) [[ ${2-} == ?*:?* ]] || die "--run wants NAME:CMDLINE"
               names+=("${2%%:*}"); cmds+=("${2#*:}"); shift 2 ;;
        --file) files+=("${2:?--file wants a path}"); shift 2 ;;
        --env) [[ ${2-} == [A-Za-z_]*=* ]] || die "--env wants K=V"; envs+=("$2"); shift 2 ;;
        --module) modules+=("${2:?}"); shift 2 ;;
        --cache) cache=${2:?}; shift 2 ;;
        --log) log=${2:?}; shift 2 ;;
        --mem) mem=${2:?}; shift 2 ;;
        --smp) smp=${2:?}; shift 2 ;;
        --timeout) timeout=${2:?}; shift 2 ;;
        --cmd-timeout) cmd_timeout=${2:?}; shift 2 ;;
        --boot-timeout) boot_timeout=${2:?}; shift 2 ;;
        --no-kvm) use_kvm=0; shift ;;
        --append) append=${2:?}; shift 2 ;;
        --strip-debug) strip=1; shift ;;
        --) shift
            [ $# -gt 0 ] || die "nothing after --"
            line="exec"
            for a in "$@"; do line+=" $(shq "$a")"; done
            names+=("$(basename "$1")"); cmds+=("$line"); break ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown option $1 (see --help)" ;;
    esac
done
[ ${#cmds[@]} -gt 0 ] || die "no command given (--run NAME:CMDLINE or -- CMD ARGS)"
declare -A seen=()
for n in "${names[@]}"; do
    [[ $n =~ ^[A-Za-z0-9_.+-]+$ ]] || die "command name '$n': use [A-Za-z0-9_.+-] only"
    [ -z "${seen[$n]-}" ] || die "command name '$n' given twice"
    seen[$n]=1
done

# --- qemu and kernel --------------------------------------------------------
qemu=$(command -v qemu-system-x86_64 || true)
if [ -z "$qemu" ]; then
    echo "run.sh: SKIP: qemu-system-x86_64 not found (run scripts/guest/prepare.sh)" >&2
    exit 77
fi
[ -f "$cache/kernel-root" ] || die "no kernel in $cache: run scripts/guest/prepare.sh $cache first"
kroot=$(cat "$cache/kernel-root")
krel=$(cat "$cache/kernel-release")
kmods=$kroot/lib/modules/$krel
if [ ! -f "$kroot/boot/vmlinuz-$krel" ] || [ ! -f "$kmods/modules.dep" ]; then
    die "kernel cache $kroot incomplete: re-run prepare.sh"
fi
# The guest has no libc of its own for busybox: it must be the static build.
busybox=$(command -v busybox || true)
if [ -z "$busybox" ] || [[ $(LC_ALL=C ldd "$busybox" 2>&1 || true) != *"not a dynamic"* ]]; then
    die "need busybox-static on the host (run scripts/guest/prepare.sh)"
fi
if [ "$strip" = 1 ] && ! command -v objcopy >/dev/null; then
    log "note: no objcopy, --strip-debug ignored"
    strip=0
fi
log=${log:-$cache/console.log}
mkdir -p "$(dirname "$log")"

stage=$(mktemp -d "${TMPDIR:-/tmp}/guest-stage.XXXXXX")
initrd="$stage.cpio"
trap 'rm -rf "$stage" "$initrd"' EXIT   # replaced once qemu runs

# --- staging ----------------------------------------------------------------
# Mirror merged-/usr links (/lib -> usr/lib ...) so every path ldd prints, and
# every PT_INTERP, resolves in the guest exactly as on the host.
for d in /bin /sbin /lib /lib32 /lib64 /libx32; do
    if [ -L "$d" ]; then ln -s "$(readlink "$d")" "$stage$d"; mkdir -p "$stage$(realpath "$d")"; fi
done
mkdir -p "$stage/bin" "$stage/guest/cmds"

# Copy host path $1 to the same absolute path in the stage (content of symlinks followed).
# Directories are merged: a program from inside one may already be staged.
add_path() {
    local p real
    p=$(realpath -s "$1") real=$(realpath "$1")
    if [ -d "$real" ]; then
        mkdir -p "$stage$real"
        cp -a -L "$real/." "$stage$real/"
    elif [ ! -e "$stage$real" ]; then
        mkdir -p "$(dirname "$stage$real")"
        cp -a -L "$real" "$stage$real"
    fi
    if [ "$p" != "$real" ] && [ ! -e "$stage$p" ] && [ ! -L "$stage$p" ]; then
        mkdir -p "$(dirname "$stage$p")"
        ln -s "$real" "$stage$p"
    fi
}
# A dynamic program plus its loader and libraries (RPATHs into the build tree included).
add_program() {
    local f
    # ldd fails for static binaries and scripts: nothing more to copy then.
    for f in "$1" $(LC_ALL=C ldd "$1" 2>/dev/null | grep -o '/[^ ]*' || true); do
        add_path "$f"
        # Only our build outputs carry debug info; distro libraries are already stripped.
        if [ "$strip" = 1 ] && [[ $(realpath "$f") != /usr/* ]]; then
            objcopy --strip-debug "$stage$(realpath "$f")" 2>/dev/null || true
        fi
    done
}

cp "$busybox" "$stage/bin/busybox"
cp "$here/init.sh" "$stage/init"
chmod 755 "$stage/init"
applets=" $("$busybox" --list | tr '\n' ' ') "

for f in ${files[@]+"${files[@]}"}; do
    [ -e "$f" ] || die "--file $f: no such file"
    if [ -f "$f" ] && [ -x "$f" ]; then add_program "$f"; else add_path "$f"; fi
done

for i in "${!cmds[@]}"; do
    # First word that is not an assignment; `exec` is our own prefix for `--` commands.
    prog=""
    read -ra words <<< "${cmds[i]}"
    for w in "${words[@]}"; do
        w=${w//\'/}
        [[ $w == exec || $w =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] && continue
        prog=$w; break
    done
    if [[ $prog == */* ]]; then
        [ -e "$prog" ] || die "command '${names[i]}': $prog not found on the host"
        add_program "$prog"
    elif [ -n "$prog" ] && [[ $applets != *" $prog "* ]] && command -v "$prog" >/dev/null; then
        add_program "$(command -v "$prog")"
    fi
    printf '%s\n' "${cmds[i]}" > "$stage/guest/cmds/$(printf %03d "$i")-${names[i]}.sh"
done

{ for e in ${envs[@]+"${envs[@]}"}; do printf 'export %s\n' "$(shq "$e")"; done; } > "$stage/guest/env"
pwd > "$stage/guest/cwd"
echo "$cmd_timeout" > "$stage/guest/cmd_timeout"

# Modules in load order: dependencies (recursively, from modules.dep) before users.
declare -A dep_line=() loaded=()
while IFS= read -r line; do
    key=${line%%:*}; key=${key##*/}; key=${key%%.ko*}; key=${key//-/_}
    dep_line[$key]=$line
done < "$kmods/modules.dep"
order=()
visit() {
    local name=${1//-/_} d line
    [ -n "${loaded[$name]-}" ] && return 0
    line=${dep_line[$name]-}
    [ -n "$line" ] || die "module $1 not in $kmods/modules.dep"
    for d in ${line#*:}; do d=${d##*/}; visit "${d%%.ko*}"; done
    loaded[$name]=1
    order+=("${line%%:*}")
}
for m in "${modules[@]}"; do visit "$m"; done
: > "$stage/guest/modules"
for rel in "${order[@]}"; do
    dst="$stage/lib/modules/$krel/${rel%.ko*}.ko"
    mkdir -p "$(dirname "$dst")"
    # busybox insmod hands the file to init_module(): decompress on the host.
    case $rel in
        *.ko) cp "$kmods/$rel" "$dst" ;;
        *.ko.xz) xz -dc "$kmods/$rel" > "$dst" ;;
        *.ko.gz) "$busybox" gunzip -c "$kmods/$rel" > "$dst" ;;
        *.ko.zst) command -v zstd >/dev/null || die "need zstd for $rel"; zstd -qdc "$kmods/$rel" > "$dst" ;;
        *) die "unknown module format: $rel" ;;
    esac
    echo "/lib/modules/$krel/${rel%.ko*}.ko" >> "$stage/guest/modules"
done
log "kernel $krel, modules: $(tr '\n' ' ' < "$stage/guest/modules")"

# Uncompressed newc: building and unpacking it is faster than gzip for our sizes.
(cd "$stage" && find . -mindepth 1 | "$busybox" cpio -o -H newc -R 0:0 2>/dev/null) > "$initrd"
log "initramfs: $(du -h "$initrd" | cut -f1)"

# --- boot -------------------------------------------------------------------
# /dev/kvm opening is not enough: paravirtual KVM flavours (e.g. kvm_pvm inside a
# cloud VM) expose /dev/kvm without vmx/svm and cannot boot a stock kernel (it
# hangs right after decompression). Require hardware virtualisation as well.
accel=(-accel tcg -cpu max)
if [ "$use_kvm" = 1 ]; then
    if ! { : <>/dev/kvm; } 2>/dev/null; then
        log "KVM: /dev/kvm cannot be opened read-write, using TCG"
    elif ! grep -qwE 'vmx|svm' /proc/cpuinfo; then
        log "KVM: /dev/kvm opens but the CPU has no vmx/svm (paravirtual KVM?), using TCG"
    else
        accel=(-enable-kvm -cpu host)
    fi
fi

# Markers are looked up anywhere in a line: a command whose output lacks a final
# newline pushes the next marker to the middle of a line.
marker() { grep -o "GUEST-$1.*" "$log" | head -n1 || true; }
# The END marker of command $1 (exact name match).
end_marker() { grep -o 'GUEST-END .*' "$log" | awk -v n="$1" '$2 == n { print; exit }' || true; }

qpid="" tpid=""
trap 'kill $qpid $tpid 2>/dev/null || true; rm -rf "$stage" "$initrd"' EXIT

# Boot once; sets qrc (qemu's status, 124 = overall timeout) and hung=1 when the
# guest did not reach /init within boot_limit seconds.
boot() {
    local boot_limit=$1 waited=0 kernel="$kroot/boot/vmlinuz-$krel" start
    start=$(date +%s.%N)
    # TCG: the unpacked ELF (PVH entry) skips ~5 s of emulated xz decompression.
    # KVM: decompression is instant, keep the stock bzImage boot path.
    if [ "${accel[0]}" != -enable-kvm ] && [ -s "$kroot/boot/vmlinux-$krel" ]; then
        kernel="$kroot/boot/vmlinux-$krel"
    fi
    log "starting qemu (${accel[*]}, ${kernel##*/}), timeout ${timeout}s, boot limit ${boot_limit}s, log $log"
    : > "$log"
    # -nodefaults: no NIC/VGA (no option ROMs to load); stdin detached so a CI
    # runner's stdin cannot reach the guest, and Ctrl-C still stops qemu by hand.
    timeout -k 10 "$timeout" "$qemu" "${accel[@]}" -nodefaults -no-user-config -no-reboot \
        -display none -serial stdio -monitor none -m "$mem" -smp "$smp" \
        -kernel "$kernel" -initrd "$initrd" \
        -append "console=ttyS0 panic=-1 quiet $append" </dev/null >>"$log" 2>&1 &
    qpid=$!
    tail -n +1 -f --pid="$qpid" "$log" &
    tpid=$!
    hung=0
    # A kernel that hangs before /init would otherwise burn the whole timeout.
    while kill -0 "$qpid" 2>/dev/null && [ -z "$(marker INIT)" ]; do
        if [ "$waited" -ge $((boot_limit * 2)) ]; then
            hung=1
            kill "$qpid" 2>/dev/null || true
            break
        fi
        sleep 0.5
        waited=$((waited + 1))
    done
    boot_s=$(awk -v a="$start" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
    qrc=0
    wait "$qpid" || qrc=$?
    wait "$tpid" 2>/dev/null || true
    qpid="" tpid=""
    sed -i 's/\r$//' "$log"
}

t0=$(date +%s.%N)
if [ "${accel[0]}" = -enable-kvm ]; then
    # KVM boots in a few seconds; fall back to TCG on any start failure or hang.
    boot $((boot_timeout < 60 ? boot_timeout : 60))
    if [ -z "$(marker INIT)" ]; then
        log "qemu with KVM failed (rc=$qrc hung=$hung): $(grep -m1 -i 'error' "$log" || true); retrying with TCG"
        cp "$log" "$log.kvm-failed"
        accel=(-accel tcg -cpu max)
        t0=$(date +%s.%N)
        boot "$boot_timeout"
    fi
else
    boot "$boot_timeout"
fi
wall=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')

# --- verdict ----------------------------------------------------------------
echo
echo "===== guest summary (${accel[*]}, ${wall}s wall, qemu rc=$qrc) ====="
init_line=$(marker INIT)
if [ -z "$init_line" ]; then
    if [ "$hung" = 1 ]; then why="no /init after ${boot_timeout}s"
    elif [ "$qrc" = 124 ] || [ "$qrc" = 137 ]; then why="timeout after ${timeout}s"
    else why="qemu rc=$qrc: $(grep -m1 -i 'error' "$log" || true)"; fi
    grep -q 'Kernel panic' "$log" && why="kernel panic: $(grep -m1 'Kernel panic' "$log")"
    echo "SKIP: guest never reached /init ($why); see $log"
    exit 77
fi
echo "$init_line (host: /init reached ${boot_s}s after qemu start, +-0.5s)"
status=0
dri=$(marker 'DRI ok')
if [ -n "$dri" ]; then
    echo "$dri"
else
    echo "FAIL: vgem did not come up: $(marker 'DRI missing')"
    grep -o 'GUEST-MODULE FAILED.*' "$log" || true
    status=1
fi
for n in "${names[@]}"; do
    end=$(end_marker "$n")
    if [ -n "$end" ]; then
        rc=${end#*rc=}; rc=${rc%% *}
        if [ "$rc" = 0 ]; then echo "ok    $n (${end##*time=})"
        else echo "FAIL  $n rc=${end#*rc=}"; status=1; fi
    elif grep -o 'GUEST-BEGIN .*' "$log" | awk -v n="$n" '$2 == n { f = 1 } END { exit !f }'; then
        echo "FAIL  $n: started, never ended"; status=1
    else
        echo "FAIL  $n: never started"; status=1
    fi
done
if [ -z "$(marker ALL-DONE)" ]; then
    status=1
    if grep -q 'Kernel panic' "$log"; then echo "FAIL: guest did not finish: $(grep -m1 'Kernel panic' "$log")"
    elif [ "$qrc" = 124 ] || [ "$qrc" = 137 ]; then echo "FAIL: guest did not finish: timeout after ${timeout}s"
    else echo "FAIL: guest did not finish (qemu rc=$qrc)"; fi
fi
if [ "$status" = 0 ]; then echo "PASS"; else echo "FAILED (console log: $log)"; fi
exit "$status"
