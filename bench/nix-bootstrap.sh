#!/usr/bin/env bash
# Benchmark the Nix bootstrap (root; needs Debian's nix-bin for building the tarball).
#  - warm: `nix bootstrap` on a store that is already right (goal: median <= 20 ms)
#  - cold: `nix bootstrap` into an empty /nix, against `tar -xJf` of the same tarball plus
#    moving the store paths into place and `nix-store --load-db` (goal: <= 1.25x)
# The tarball: bench/nix-tarball.sh.
#
# usage: bench/nix-bootstrap.sh [COLD_RUNS] [WARM_RUNS]
set -euo pipefail
COLD=${1:-5}
WARM=${2:-50}
cd "$(dirname "$0")/.."
cargo build --release -q -p flywheel-agent
AGENT=${FLYWHEEL_AGENT:-$PWD/target/release/flywheel-agent}  # FLYWHEEL_AGENT: another build to measure
TMP=$(mktemp -d /tmp/flywheel-bench-nix.XXXXXX)
chmod 755 "$TMP"
trap 'rm -rf "$TMP"' EXIT
. bench/nix-tarball.sh "$TMP"
cat > "$TMP/agent.toml" <<TOML
[agent]
state_dir = "$TMP/state"
[nix]
tarball = "$TMP/nix.tar.xz"
sha256 = "$SHA"
version = "$V"
# Debian's Nix 2.8 (the bench tarball's programs) predates both advisories' fixes.
acknowledged_advisories = ["CVE-2026-39860", "CVE-2024-27297"]
netrc_file = "$TMP/etc/netrc"
[[lane]]
name = "bench"
memory = "1Gi"
min_free = "1Mi"
work_root = "$TMP/work"
nix_conf = "$TMP/etc/nix.conf"
TOML
in_fresh() {  # run "$@" in a private mount namespace with an empty /nix
  local fresh; fresh=$(mktemp -d "$TMP/fresh.XXXX"); chmod 755 "$fresh"
  unshare -m -- sh -c 'mount --make-rprivate / && mount --bind "$0" /nix && shift && exec "$@"' "$fresh" _ "$@"
  rm -rf "$TMP/etc"
  chmod -R u+w "$fresh" 2>/dev/null; rm -rf "$fresh"
}
now() { date +%s%N; }
ms() { awk -v n="$1" 'BEGIN { printf "%.1f", n / 1e6 }'; }
echo "tarball: $(du -h "$TMP/nix.tar.xz" | cut -f1) xz, $(echo "$CLOSURE" | wc -l) store paths, $(du -sh "$TOP/store" | cut -f1) unpacked"

agent_total=0; base_total=0
for i in $(seq "$COLD"); do
  t0=$(now); in_fresh "$AGENT" nix bootstrap --config "$TMP/agent.toml" >/dev/null; t1=$(now)
  in_fresh sh -c "mkdir -p /nix/store /nix/.s && tar -xJf '$TMP/nix.tar.xz' -C /nix/.s && mv /nix/.s/nix-$V-x86_64-linux/store/* /nix/store/ && /nix/store/*-nix-$V/bin/nix-store --load-db < /nix/.s/nix-$V-x86_64-linux/.reginfo"; t2=$(now)
  agent_total=$((agent_total + t1 - t0)); base_total=$((base_total + t2 - t1))
done
agent_ms=$(ms $((agent_total / COLD))); base_ms=$(ms $((base_total / COLD)))
echo "cold bootstrap:   $agent_ms ms mean of $COLD (agent: verify + unpack + register + configure + receipt)"
echo "tar -xJf+load-db: $base_ms ms mean of $COLD"
echo "cold ratio:       $(awk -v a="$agent_ms" -v b="$base_ms" 'BEGIN{printf "%.2f", a/b}')x (goal <= 1.25x)"

fresh=$(mktemp -d "$TMP/warm.XXXX"); chmod 755 "$fresh"
unshare -m -- sh -c 'mount --make-rprivate / && mount --bind "$0" /nix && shift && exec "$@"' "$fresh" _ bash -c "
  '$AGENT' nix bootstrap --config '$TMP/agent.toml' >/dev/null
  for i in \$(seq $WARM); do '$AGENT' nix bootstrap --config '$TMP/agent.toml' --summary-only; done" > "$TMP/warm.txt"
internal=$(sed -n 's/.*verified in \([0-9.]*\) ms.*/\1/p' "$TMP/warm.txt" | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}')
t0=$(now)
unshare -m -- sh -c 'mount --make-rprivate / && mount --bind "$0" /nix && shift && exec "$@"' "$fresh" _ bash -c "
  for i in \$(seq $WARM); do '$AGENT' nix bootstrap --config '$TMP/agent.toml' --summary-only >/dev/null; done"
t1=$(now)
echo "warm check:       median $internal ms inside the agent; $(ms $(( (t1 - t0) / WARM ))) ms per whole 'nix bootstrap' process (goal: median <= 20 ms)"
