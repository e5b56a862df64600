#!/usr/bin/env bash
# Benchmark the throwaway store layer (root; needs Debian's nix-bin for the tarball): an
# untrusted job (`exec --untrusted`: its daemon writes a kernel overlayfs layer over the store,
# discarded at teardown) against a trusted one (writes the store) on the same warm store.
# Each job builds a closure the store already has (~20 MiB, two paths) and then one new
# derivation. Reported per kind, mean of RUNS:
#  - time to first build: job start to the end of its first new build (goal: untrusted <= 1.2x)
#  - wall time of the whole `exec` (goal: <= 1.2x)
#  - paths built for what the store had (goal: 0)
#  - bytes copied up into the layer (the database on its first write, the new build)
#
# usage: bench/untrusted-layer.sh [RUNS]   (FLYWHEEL_AGENT: another build to measure)
set -euo pipefail
RUNS=${1:-5}
cd "$(dirname "$0")/.."
[ -n "${FLYWHEEL_AGENT:-}" ] || cargo build --release -q -p flywheel-agent
AGENT=${FLYWHEEL_AGENT:-$PWD/target/release/flywheel-agent}
# Not under /tmp: every job gets a private /tmp and would not see the expressions.
mkdir -p /var/lib/flywheel-bench
TMP=$(mktemp -d /var/lib/flywheel-bench/flywheel-bench-layer.XXXXXX)
chmod 755 "$TMP"
trap 'chmod -R u+w "$TMP" 2>/dev/null; rm -rf "$TMP"' EXIT
. bench/nix-tarball.sh "$TMP" nopayload
mkdir -p "$TMP/nix" "$TMP/shared"
chmod 755 "$TMP/nix"; chmod 1777 "$TMP/shared"
cat > "$TMP/agent.toml" <<TOML
[agent]
state_dir = "$TMP/state"
$(nix_toml "$TMP/etc/netrc" "$TMP/userpool")
[[lane]]
name = "bench"
memory = "2Gi"
min_free = "1Mi"
work_root = "$TMP/work"
nix_conf = "$TMP/etc/nix.conf"
TOML
TAG=$(date +%s%N)
warm_closure "$TMP/warm.nix" "$TAG"
in_store() {  # run "$@" in a private mount namespace whose /nix is the bench's store
  unshare -m -- sh -c 'mount --make-rprivate / && mount --bind "$0" /nix && shift && exec "$@"' "$TMP/nix" _ "$@"
}
now() { date +%s%N; }
in_store "$AGENT" nix bootstrap --config "$TMP/agent.toml" >/dev/null
in_store "$AGENT" exec --lane bench --config "$TMP/agent.toml" -- nix-build --no-out-link "$TMP/warm.nix" >/dev/null 2>&1
echo "warm store: $(du -sh "$TMP/nix/store" | cut -f1), db $(du -h "$TMP/nix/var/nix/db/db.sqlite" | cut -f1)"

job() {  # job KIND N: one job; prints "first_ms wall_ms built copied_bytes"
  local kind=$1 n=$2 extra=() new="$TMP/new-$1-$2.nix"
  [ "$kind" = untrusted ] && extra=(--untrusted)
  printf 'derivation { name = "bench-new-%s-%s-%s"; system = "x86_64-linux"; builder = "/bin/sh"; args = [ "-c" "echo new > $out" ]; }\n' "$kind" "$n" "$TAG" > "$new"
  chmod 644 "$new"
  rm -f "$TMP/shared/go" "$TMP/shared/done"
  local t0; t0=$(now)
  in_store "$AGENT" exec --lane bench --config "$TMP/agent.toml" --user nobody "${extra[@]}" -- sh -c "
    nix-build --no-out-link '$TMP/warm.nix' 2> '$TMP/shared/warm.log' >/dev/null && nix-build --no-out-link '$new' >/dev/null
    date +%s%N > '$TMP/shared/first'; touch '$TMP/shared/done'
    i=0; while [ ! -e '$TMP/shared/go' ] && [ \$i -lt 100 ]; do sleep 0.02; i=\$((i+1)); done" > "$TMP/out" 2>&1 &
  local pid=$! copied=0
  while [ ! -e "$TMP/shared/done" ] && kill -0 $pid 2>/dev/null; do sleep 0.01; done
  for u in "$TMP"/work/*.layer/upper; do [ -d "$u" ] && copied=$(du -sb "$u" | cut -f1); done
  touch "$TMP/shared/go"; wait $pid
  local t1; t1=$(now)
  # What the warm closure cost: Nix says `building '…'` or `copying path '…'` for each path.
  local built; built=$(grep -cE "^(building|copying path) '" "$TMP/shared/warm.log" || true)
  echo "$(( ($(cat "$TMP/shared/first") - t0) / 1000000 )) $(( (t1 - t0) / 1000000 )) $built $copied"
}
: > "$TMP/trusted.txt"; : > "$TMP/untrusted.txt"
for n in $(seq "$RUNS"); do  # interleaved, so that neither kind gets the quieter minutes
  for kind in trusted untrusted; do job "$kind" "$n" >> "$TMP/$kind.txt"; done
done
for kind in trusted untrusted; do
  awk -v k="$kind" '{f+=$1; w+=$2; b+=$3; c+=$4} END {printf "%-9s first build %6.1f ms  wall %6.1f ms  built for what the store had %d  copied up %.1f KiB  (mean of %d)\n", k, f/NR, w/NR, b, c/NR/1024, NR}' "$TMP/$kind.txt"
done
paste "$TMP/trusted.txt" "$TMP/untrusted.txt" | awk '{f1+=$1; w1+=$2; f2+=$5; w2+=$6} END {printf "untrusted/trusted: first build %.2fx, wall %.2fx (goal <= 1.2x)\n", f2/f1, w2/w1}'
