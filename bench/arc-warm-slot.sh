#!/usr/bin/env bash
# Benchmark warm node-local slots (root; needs Debian's nix-bin for the tarball and the builds).
# Two "pods" of one lane on one node, one after another, each in its own mount namespace with an
# empty pod-local /nix and /etc/nix, both on the node's slot volume. Both run the same job: build
# one derivation closure (a dependency that copies ~20 MiB, and a derivation on top). Reported,
# measured in this one run:
#  - bootstrap: the first pod's cold Nix bootstrap into the empty slot, the second pod's warm check;
#  - cold run: the first pod's job (builds the closure);
#  - warm run: the second pod's job (finds it in the slot's store: nothing built or fetched).
#
# usage: bench/arc-warm-slot.sh
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -q -p flywheel-agent
AGENT=$PWD/target/release/flywheel-agent
# Not under /tmp: every job gets a private /tmp and would not see the closure's expression.
mkdir -p /var/lib/flywheel-bench
TMP=$(mktemp -d /var/lib/flywheel-bench/flywheel-bench-slot.XXXXXX)
chmod 755 "$TMP"
trap 'chmod -R u+w "$TMP" 2>/dev/null; rm -rf "$TMP"' EXIT
. bench/nix-tarball.sh "$TMP" nopayload
# The job's closure: unique per run so the host's store cannot help.
TAG=$(date +%s%N)
cat > "$TMP/closure.nix" <<NIXEOF
let dep = derivation { name = "bench-dep-$TAG"; system = "x86_64-linux"; builder = "/bin/sh";
  args = [ "-c" "/bin/cp -r /usr/share/perl \$out" ]; };
in derivation { name = "bench-top-$TAG"; system = "x86_64-linux"; builder = "/bin/sh"; inherit dep;
  args = [ "-c" "echo \$dep > \$out" ]; }
NIXEOF
chmod 644 "$TMP/closure.nix"
mkdir -p "$TMP/slots"
pod() {  # pod N: a fresh /nix, /etc/nix, state and work; the shared slot volume
  local d=$TMP/pod-$1
  mkdir -p "$d/nix" "$d/etc" "$d/state" "$d/work"
  cat > "$d/agent.toml" <<TOML
[agent]
state_dir = "$d/state"
[nix]
tarball = "$TMP/nix.tar.xz"
sha256 = "$SHA"
version = "$V"
# Debian's Nix 2.8 (the bench tarball's programs) predates both advisories' fixes.
acknowledged_advisories = ["CVE-2026-39860", "CVE-2024-27297"]
netrc_file = "$d/etc/netrc"
sandbox = false
substituters = []
trusted_public_keys = []
[[lane]]
name = "bench"
memory = "1Gi"
min_free = "1Mi"
max_runners = 1
slots = 1
slot_root = "$TMP/slots"
work_root = "$d/work"
nix_conf = "$d/etc/nix.conf"
TOML
  FLYWHEEL_LOG=info FLYWHEEL_LOG_FORMAT=text unshare -m -- sh -c 'mount --make-rprivate / && mount --bind "$0" /nix && shift && exec "$@"' "$d/nix" _ \
    "$AGENT" exec --lane bench --config "$d/agent.toml" --user nobody -- \
    sh -c "nix-build $TMP/closure.nix --no-out-link 2>&1 | grep -c 'will be built' || true" > "$d/out.txt" 2> "$d/log.txt"
}
field() { sed -n "s/.*$1=\([0-9.]*\).*/\1/p" "$2" | tail -n1; }
pod 1
pod 2
for n in 1 2; do
  d=$TMP/pod-$n
  boot=$(grep -o 'nix [^ ]*: [a-z]* [^(]*([^)]*)' "$d/log.txt" | head -n1)
  store=$(grep -o 'store: node-local slot [^(]*' "$d/log.txt" | head -n1)
  echo "pod $n: $store| bootstrap: $boot"
  echo "pod $n: run $(field run_ms "$d/log.txt") ms (setup $(field setup_ms "$d/log.txt") ms), nix-build announced builds: $(cat "$d/out.txt")"
done
