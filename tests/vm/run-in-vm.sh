#!/usr/bin/env bash
# Run a binary inside a small VM with a pure cgroup v2 hierarchy (memory and pids enabled) and
# exit with its status. Usable as cargo's target runner:
#
#   CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUNNER=tests/vm/run-in-vm.sh cargo test --test v2
#
# The VM: a Debian cloud kernel (from linux-image-cloud-amd64's dependency, downloaded with
# `apt-get download` and cached in target/vm-cache), an uncompressed initramfs holding the
# binary, the flywheel-agent binary next to it, the host programs the tests call and every
# library they need (same paths), booted by QEMU under software emulation (TCG). The init
# mounts cgroup2 at /sys/fs/cgroup, enables +memory +pids, and runs the binary inside the
# cgroup /ci, which it did not create for the agent (nested delegation, as in a pod).
#
# Needs: qemu-system-x86, busybox-static, cpio (installed by .ci/run). Environment:
#   FLYWHEEL_VM_MEMORY (default 2048 MiB), FLYWHEEL_VM_CPUS (2), FLYWHEEL_VM_TIMEOUT (1500 s).
set -euo pipefail

[ $# -ge 1 ] || { echo "usage: $0 BINARY [ARGS...]" >&2; exit 64; }
bin=$(readlink -f "$1"); shift
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
cache=${FLYWHEEL_VM_CACHE:-$root/target/vm-cache}
mkdir -p "$cache"

for tool in qemu-system-x86_64 cpio; do
  command -v "$tool" >/dev/null || { echo "run-in-vm: $tool is missing: apt-get install qemu-system-x86 cpio busybox-static" >&2; exit 125; }
done
busybox=/bin/busybox
[ -x "$busybox" ] && "$busybox" --list >/dev/null 2>&1 || { echo "run-in-vm: busybox is missing: apt-get install busybox-static" >&2; exit 125; }

# --- the kernel (cached) -------------------------------------------------------------------
if [ ! -s "$cache/vmlinuz" ] || [ ! -s "$cache/overlay.ko" ]; then
  pkg=$(apt-cache depends linux-image-cloud-amd64 2>/dev/null | awk '/Depends: linux-image-/{print $2; exit}')
  [ -n "$pkg" ] || { echo "run-in-vm: cannot resolve linux-image-cloud-amd64 (run apt-get update)" >&2; exit 125; }
  dl=$(mktemp -d)
  (cd "$dl" && apt-get download "$pkg" >/dev/null 2>&1) || { echo "run-in-vm: apt-get download $pkg failed" >&2; exit 125; }
  mkdir -p "$dl/x"
  dpkg-deb --fsys-tarfile "$dl"/*.deb | tar -x -C "$dl/x" --wildcards './boot/vmlinuz-*' './lib/modules/*/kernel/fs/overlayfs/*'
  cp "$dl"/x/boot/vmlinuz-* "$cache/vmlinuz.tmp" && mv "$cache/vmlinuz.tmp" "$cache/vmlinuz"
  ko=$(find "$dl/x/lib/modules" -name 'overlay.ko*' | head -n1)
  case "$ko" in
    *.xz) xz -dc "$ko" > "$cache/overlay.ko.tmp" ;;
    *.zst) zstd -dcq "$ko" > "$cache/overlay.ko.tmp" ;;
    *) cp "$ko" "$cache/overlay.ko.tmp" ;;
  esac
  mv "$cache/overlay.ko.tmp" "$cache/overlay.ko"
  rm -rf "$dl"
fi

# --- the initramfs -------------------------------------------------------------------------
stage=$(mktemp -d)
chmod 0755 "$stage"
out=$(mktemp)
trap 'rm -rf "$stage" "$out"' EXIT
mkdir -p "$stage"/{usr/bin,usr/sbin,usr/lib,bbin,proc,sys,dev,tmp,run,etc,root,var/tmp}
ln -s usr/bin "$stage/bin"; ln -s usr/sbin "$stage/sbin"; ln -s usr/lib "$stage/lib"
[ -d /lib64 ] && ln -s usr/lib64 "$stage/lib64" && mkdir -p "$stage/usr/lib64"
cp "$busybox" "$stage/bbin/busybox"

copy() {  # copy a file and every library ldd lists, at the same paths
  local f=$1 real
  real=$(readlink -f "$f")
  mkdir -p "$stage$(dirname "$real")"
  cp -n "$real" "$stage$real" 2>/dev/null || true
  if [ "$real" != "$f" ] && [ ! -e "$stage$f" ]; then mkdir -p "$stage$(dirname "$f")"; ln -s "$real" "$stage$f"; fi
  ldd "$real" 2>/dev/null | grep -oE '/[^ ]+' | while read -r lib; do
    [ -e "$stage$lib" ] && continue
    local rl; rl=$(readlink -f "$lib")
    mkdir -p "$stage$(dirname "$rl")" "$stage$(dirname "$lib")"
    cp -n "$rl" "$stage$rl"
    [ -e "$stage$lib" ] || ln -s "$rl" "$stage$lib"
  done || true
}
copy "$bin"
agent="$(dirname "$bin")/../flywheel-agent"
[ -x "$agent" ] && copy "$(readlink -f "$agent")"
# Host programs the tests run inside jobs (GNU behaviour, same as on the host).
for p in sh dash bash tail sleep setsid env id cat grep wc cut ls touch mkdir chmod pwd true stat test rm dd mkfifo ln ipcmk ipcs; do
  path=$(command -v "$p" 2>/dev/null) || continue
  copy "$path"
done
printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n' > "$stage/etc/passwd"
printf 'root:x:0:\nnogroup:x:65534:\n' > "$stage/etc/group"
cp "$cache/overlay.ko" "$stage/overlay.ko"

# The command line and the environment the binary gets.
{
  printf 'cd %q 2>/dev/null || { mkdir -p %q; cd %q; }\n' "$PWD" "$PWD" "$PWD"
  for v in CI RUST_BACKTRACE RUST_TEST_THREADS RUST_LOG FLYWHEEL_LOG NO_COLOR; do
    [ -n "${!v+x}" ] && printf 'export %s=%q\n' "$v" "${!v}"
  done
  printf 'export FLYWHEEL_IN_VM=1\n'
  printf '%q ' "$bin" "$@"; printf '\n'
} > "$stage/cmd"

cat > "$stage/init" <<'INIT'
#!/bbin/busybox sh
/bbin/busybox --install -s /bbin
export PATH=/usr/local/bin:/usr/bin:/usr/sbin:/bbin HOME=/root
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
# /tmp and /run stay on the (writable) initramfs root: a tmpfs there would hide binaries of a
# checkout that lives under /tmp.
chmod 1777 /tmp /var/tmp
mkdir -p /dev/shm /run/lock /dev/mqueue && mount -t tmpfs -o mode=1777 tmpfs /dev/shm && chmod 1777 /run/lock
mount -t mqueue mqueue /dev/mqueue
chmod 0755 /run
# The tests' scratch, a filesystem of its own as tests/setup.sh gives it on the host (the VM's
# root is its initramfs, so a tmpfs changes nothing about where the memory is charged).
mkdir -p /var/lib/flywheel-tests/fs && mount -t tmpfs -o mode=0755 tmpfs /var/lib/flywheel-tests/fs
mount -t cgroup2 cgroup2 /sys/fs/cgroup
insmod /overlay.ko 2>/dev/null
echo "+memory +pids" > /sys/fs/cgroup/cgroup.subtree_control
mkdir /sys/fs/cgroup/ci
echo $$ > /sys/fs/cgroup/ci/cgroup.procs
echo "FLYWHEEL-VM-BOOTED $(uname -r) controllers: $(cat /sys/fs/cgroup/ci/cgroup.controllers)"
sh /cmd
echo "FLYWHEEL-VM-EXIT=$?"
poweroff -f
INIT
chmod +x "$stage/init"
(cd "$stage" && find . -print0 | cpio --null -o -H newc --quiet) > "$cache/initrd.$$.cpio"

# --- boot ----------------------------------------------------------------------------------
set +e
timeout "${FLYWHEEL_VM_TIMEOUT:-1500}" qemu-system-x86_64 -accel tcg -nodefaults -no-reboot \
  -m "${FLYWHEEL_VM_MEMORY:-2048}" -smp "${FLYWHEEL_VM_CPUS:-2}" \
  -display none -serial stdio -monitor none \
  -kernel "$cache/vmlinuz" -initrd "$cache/initrd.$$.cpio" \
  -append "console=ttyS0 panic=-1 quiet loglevel=3 rdinit=/init" </dev/null \
  | tr -d '\r' | tee "$out" | grep -v '^FLYWHEEL-VM-EXIT='
qemu_rc=${PIPESTATUS[0]}
set -e
rm -f "$cache/initrd.$$.cpio"
status=$(sed -n 's/^FLYWHEEL-VM-EXIT=\([0-9]*\)$/\1/p' "$out" | tail -n1)
if [ -z "$status" ]; then
  echo "run-in-vm: the VM ended without reporting an exit status (qemu exit $qemu_rc)" >&2
  exit 125
fi
exit "$status"
