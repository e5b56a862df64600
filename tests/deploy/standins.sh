#!/usr/bin/env bash
# Stand-ins for the bases the Containerfile names, built locally: no image registry is reachable
# here. Cached: the Debian rootfs in $FLYWHEEL_TEST_CACHE, the images in podman's store, each
# tagged with a hash of what made it, so a second run only looks them up.
#
#   tests/deploy/standins.sh FAKE_LISTENER      prints NAME=IMAGE lines:
#     debian   a minbase bookworm (the Nix stage's base, and the others')
#     rust     debian + this machine's Rust toolchain (the build stage's base)
#     runner   like ghcr.io/actions/actions-runner: user runner (uid 1001) in groups sudo and
#              docker, `%sudo ALL=(ALL:ALL) NOPASSWD:ALL`, the fake Runner.Listener in
#              /home/runner/bin; Debian's nix-bin, which the test Nix tarball's programs call
#     systemd  debian with systemd and dbus, to boot as PID 1 (the Sting unit's tests)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
listener=${1:?usage: standins.sh FAKE_LISTENER}
cache=${FLYWHEEL_TEST_CACHE:-/var/cache/flywheel-tests}
export CONTAINERS_CONF=${CONTAINERS_CONF:-$here/containers.conf}
mkdir -p "$cache"

key() { cat "$@" | sha256sum | cut -c1-12; }
have() { podman image exists "$1"; }

packages=ca-certificates,xz-utils,sudo,passwd,procps,nix-bin,gcc,libc6-dev,systemd,systemd-sysv,dbus
base_key=$(printf '%s' "$packages" | cat - "$here/standins.sh" | sha256sum | cut -c1-12)
debian=localhost/flywheel-standin/debian:$base_key
if ! have "$debian"; then
  tar="$cache/bookworm-$base_key.tar"
  if [ ! -s "$tar" ]; then
    echo "standins: mmdebstrap bookworm ($packages)" >&2
    mmdebstrap --quiet --format=tar --variant=minbase --include="$packages" bookworm "$tar.part"
    mv "$tar.part" "$tar"
  fi
  podman import --quiet "$tar" "$debian" >/dev/null
fi
echo "debian=$debian"

sysroot=$(rustc --print sysroot)
rust_key=$(printf "%s %s" "$base_key" "$(rustc --version)" | cat - "$here/standins/rust.Containerfile" | sha256sum | cut -c1-12)
rust=localhost/flywheel-standin/rust:$rust_key
if ! have "$rust"; then
  echo "standins: rust from $sysroot" >&2
  podman build --quiet --pull=never --network host --build-arg BASE="$debian" \
    -v "$sysroot:/mnt/toolchain:ro" -t "$rust" -f "$here/standins/rust.Containerfile" \
    "$here/standins" >/dev/null
fi
echo "rust=$rust"

ctx=$(mktemp -d)
trap 'rm -rf "$ctx"' EXIT
cp "$listener" "$ctx/Runner.Listener"
runner_key=$(printf '%s' "$base_key" | cat - "$here/standins/runner.Containerfile" "$listener" | sha256sum | cut -c1-12)
runner=localhost/flywheel-standin/actions-runner:$runner_key
if ! have "$runner"; then
  echo "standins: runner base" >&2
  podman build --quiet --pull=never --format docker --network host --build-arg BASE="$debian" \
    -t "$runner" -f "$here/standins/runner.Containerfile" "$ctx" >/dev/null
fi
echo "runner=$runner"
echo "systemd=$debian"
