#!/usr/bin/env bash
# Benchmark: what a job's own network costs (issue 24).
#  1. Setup and teardown: N `exec -- true` jobs with network = "isolated" and N with "host",
#     interleaved; the medians of the agent's setup_ms and teardown_ms (its "job finished" line)
#     and of net_ms (the namespace, veth pair, addresses, routes, nftables check).
#     Goal: the namespace adds at most 20 ms to a job's setup at the median.
#  2. Egress throughput: iperf3 from the host and from a job (same lane, isolated) to a server
#     in a network namespace this script makes (10.251.0.2; no traffic leaves the machine).
#     Goal: the job gets at least 0.9x the host's throughput.
#
# usage: bench/job-network.sh [N] [SECONDS]   (root; needs nftables, iperf3, ip_forward=1;
#        builds the release binary unless AGENT=path is given)
set -euo pipefail
N=${1:-100}
SECS=${2:-5}
cd "$(dirname "$0")/.."
if [ -z "${AGENT:-}" ]; then
  cargo build --release -q -p flywheel-agent
  AGENT=$PWD/target/release/flywheel-agent
fi
TMP=$(mktemp -d /var/lib/flywheel-bench.XXXXXX)
chmod 0755 "$TMP"   # the job (nobody) walks to its work root
NS=fwbench-$$
LINK=fwbench$$
cleanup() {
  [ -n "${SERVER:-}" ] && kill "$SERVER" 2>/dev/null || true
  ip link del "$LINK" 2>/dev/null || true
  ip netns del "$NS" 2>/dev/null || true
  rm -rf "$TMP"
}
trap cleanup EXIT
for mode in isolated host; do
  cat > "$TMP/$mode.toml" <<TOML
[agent]
state_dir = "$TMP/state-$mode"
[[lane]]
name = "bench"
memory = "256Mi"
max_runners = 1
pids_max = 512
work_root = "$TMP/work-$mode"
min_free = "1Mi"
nix = false
network = "$mode"
$( [ "$mode" = isolated ] && echo 'dns = ["10.251.0.2"]' )
TOML
done

median() { sort -n | awk '{v[NR]=$1} END {if (NR%2) print v[(NR+1)/2]; else print (v[NR/2]+v[NR/2+1])/2}'; }
field() { grep -o "$1=[0-9.]*" | head -n1 | cut -d= -f2; }

for i in $(seq "$N"); do
  for mode in isolated host; do
    log=$("$AGENT" exec --lane bench --config "$TMP/$mode.toml" --user nobody -- true 2>&1)
    echo "$log" | grep "job finished" | field setup_ms >> "$TMP/$mode.setup"
    echo "$log" | grep "job finished" | field teardown_ms >> "$TMP/$mode.teardown"
    [ "$mode" = isolated ] && echo "$log" | grep "network namespace is linked" | field net_ms >> "$TMP/net"
  done
done
si=$(median < "$TMP/isolated.setup"); sh=$(median < "$TMP/host.setup")
ti=$(median < "$TMP/isolated.teardown"); th=$(median < "$TMP/host.teardown")
net=$(median < "$TMP/net")
echo "setup    median: isolated ${si} ms, host ${sh} ms, added $(awk -v a="$si" -v b="$sh" 'BEGIN{printf "%.2f", a-b}') ms (goal <= 20 ms); net_ms median ${net} ms"
echo "teardown median: isolated ${ti} ms, host ${th} ms (the namespace itself goes asynchronously, with the job's last process)"

# The "internet": a namespace with an iperf3 server.
ip netns add "$NS"
ip link add "$LINK" type veth peer name eth0 netns "$NS"
ip addr add 10.251.0.1/30 dev "$LINK"; ip link set "$LINK" up
ip -n "$NS" addr add 10.251.0.2/30 dev eth0; ip -n "$NS" link set eth0 up; ip -n "$NS" link set lo up
ip netns exec "$NS" iperf3 -s -B 10.251.0.2 >/dev/null 2>&1 & SERVER=$!
sleep 0.5
rate() { awk '/receiver/{print $(NF-2)}'; }
host=$(iperf3 -c 10.251.0.2 -t "$SECS" -f m | rate)
job=$("$AGENT" exec --lane bench --config "$TMP/isolated.toml" --user nobody -- iperf3 -c 10.251.0.2 -t "$SECS" -f m 2>/dev/null | rate)
echo "egress: host ${host} Mbit/s, job ${job} Mbit/s, ratio $(awk -v a="$job" -v b="$host" 'BEGIN{printf "%.2f", a/b}') (goal >= 0.9)"
