#!/usr/bin/env bash
# Benchmark agent-side publishing to Attic on loopback (root; needs Debian's nix-bin and curl).
# A closure of SIZE_MIB built by the host's Nix (two paths of random bytes, one referring to the
# other) is published to the fake Attic (which hashes and checks every NAR, keeping none):
#  - the agent: `flywheel-agent attic publish` (get-missing-paths, then each path's NAR streamed
#    from the store with a token minted per request), MiB/s and its peak RSS;
#  - the baseline: `nix-store --dump PATH | curl -T -` of the same paths to upload-path, to a
#    second cache so nothing is deduplicated.
# Goals: agent MiB/s >= 0.8x the baseline; agent RSS < 64 MiB even for a 500 MiB path
# (bench/attic-publish.sh 500).
#
# usage: bench/attic-publish.sh [SIZE_MIB]
set -euo pipefail
SIZE=${1:-200}
cd "$(dirname "$0")/.."
command -v curl >/dev/null || { echo "curl is missing: apt-get install curl" >&2; exit 1; }
cargo build --release -q -p flywheel-agent -p fake-attic
T=$PWD/target/release
mkdir -p /var/lib/flywheel-bench
TMP=$(mktemp -d /var/lib/flywheel-bench/flywheel-bench-attic.XXXXXX)
cleanup() { exec 3>&- 2>/dev/null || true; rm -rf "$TMP"; }
trap cleanup EXIT
head -c 48 /dev/urandom | base64 -w0 > "$TMP/attic.key"
coproc ATTIC { "$T/fake-attic-serve" "$TMP/attic.key" agent curl; }
exec 3>&"${ATTIC[1]}"
read -r URL <&"${ATTIC[0]}"
HALF=$((SIZE / 2))
TAG=$(date +%s%N)
cat > "$TMP/closure.nix" <<NIXEOF
let dep = derivation { name = "bench-dep-$TAG"; system = "x86_64-linux"; builder = "/bin/sh";
  args = [ "-c" "/usr/bin/head -c ${HALF}M /dev/urandom > \$out" ]; };
in derivation { name = "bench-top-$TAG"; system = "x86_64-linux"; builder = "/bin/sh"; inherit dep;
  args = [ "-c" "/usr/bin/head -c ${HALF}M /dev/urandom > \$out; echo \$dep >> \$out" ]; }
NIXEOF
export NIX_CONFIG=$'substituters =\nsandbox = false'
TOP=$(nix-build "$TMP/closure.nix" --no-out-link 2>"$TMP/build.log") || { cat "$TMP/build.log" >&2; exit 1; }
unset NIX_CONFIG
PATHS=$(nix-store -qR "$TOP")
cat > "$TMP/agent.toml" <<TOML
[agent]
state_dir = "$TMP/state"
[attic]
signing_key_file = "$TMP/attic.key"
upstream_keys = []
[[lane]]
name = "bench"
memory = "1Gi"
min_free = "1Mi"
work_root = "$TMP/work"
[lane.hints]
attic_server = "$URL"
attic_cache = "agent"
TOML
now() { date +%s%N; }
bytes=0
for p in $PATHS; do bytes=$((bytes + $(nix-store -q --size "$p"))); done
t0=$(now)
line=$("$T/flywheel-agent" attic publish --config "$TMP/agent.toml" --lane bench "$TOP")
t1=$(now)
TOKEN=$("$T/flywheel-agent" attic mint-token --config "$TMP/agent.toml" --cache curl --sub bench --validity 10m --push)
t2=$(now)
for p in $PATHS; do
  refs=$(nix-store -q --references "$p" | sed 's#/nix/store/##' | awk '{printf "%s\"%s\"", (NR>1?",":""), $0}')
  hash=$(nix-store -q --hash "$p"); size=$(nix-store -q --size "$p")
  info="{\"cache\":\"curl\",\"store_path_hash\":\"$(basename "$p" | cut -c1-32)\",\"store_path\":\"$p\",\"references\":[$refs],\"system\":null,\"deriver\":null,\"sigs\":[],\"ca\":null,\"nar_hash\":\"$hash\",\"nar_size\":$size}"
  nix-store --dump "$p" | curl -sS -f -X PUT -T - -H "Authorization: Bearer $TOKEN" \
    -H "X-Attic-Nar-Info: $info" -H "Content-Type: application/octet-stream" "$URL/_api/v1/upload-path" >/dev/null
done
t3=$(now)
mib=$(awk -v b="$bytes" 'BEGIN { printf "%.1f", b / 1048576 }')
agent_s=$(awk -v n=$((t1 - t0)) 'BEGIN { printf "%.2f", n / 1e9 }')
curl_s=$(awk -v n=$((t3 - t2)) 'BEGIN { printf "%.2f", n / 1e9 }')
echo "closure: $(echo "$PATHS" | wc -l) paths, $mib MiB of NAR"
echo "agent:   $line"
echo "agent:   $agent_s s, $(awk -v m="$mib" -v s="$agent_s" 'BEGIN { printf "%.0f", m / s }') MiB/s"
echo "curl:    $curl_s s, $(awk -v m="$mib" -v s="$curl_s" 'BEGIN { printf "%.0f", m / s }') MiB/s (nix-store --dump | curl -T -)"
echo "ratio:   $(awk -v a="$agent_s" -v c="$curl_s" 'BEGIN { printf "%.2f", c / a }')x the baseline's speed (goal >= 0.8x)"
