#!/usr/bin/env bash
# Benchmark what sampling a job's memory for its summary costs: 4 jobs at once (`exec -- sleep`),
# each agent sampling its job's cgroup every 250 ms. Reports the agents' CPU time over a window
# in the middle of the jobs, as a fraction of one core (goal: under 1% for the 4 together).
#
# usage: bench/sampling-cost.sh [SECONDS]      (root)
set -euo pipefail
SECS=${1:-20}
cd "$(dirname "$0")/.."
cargo build --release -q -p flywheel-agent
AGENT=$PWD/target/release/flywheel-agent
mkdir -p /var/lib/flywheel-bench
TMP=$(mktemp -d /var/lib/flywheel-bench/flywheel-bench-sample.XXXXXX)
trap 'rm -rf "$TMP"' EXIT
cat > "$TMP/agent.toml" <<TOML
[agent]
state_dir = "$TMP/state"
[[lane]]
name = "bench"
memory = "256Mi"
max_runners = 4
min_free = "1Mi"
nix = false
work_root = "$TMP/work"
TOML
pids=()
for i in 0 1 2 3; do
  FLYWHEEL_LOG=off "$AGENT" exec --lane bench --config "$TMP/agent.toml" --slot "$i" -- sleep $((SECS + 4)) 2>/dev/null &
  pids+=($!)
done
ticks() {  # utime + stime of the agents, in clock ticks
  local sum=0 p
  for p in "${pids[@]}"; do
    set -- $(cut -d' ' -f14,15 "/proc/$p/stat")
    sum=$((sum + $1 + $2))
  done
  echo "$sum"
}
sleep 2
a=$(ticks); t0=$(date +%s%N)
sleep "$SECS"
b=$(ticks); t1=$(date +%s%N)
wait
hz=$(getconf CLK_TCK)
awk -v d=$((b - a)) -v hz="$hz" -v ns=$((t1 - t0)) 'BEGIN {
  cpu = d / hz; wall = ns / 1e9
  printf "4 jobs sampled every 250 ms for %.1f s: %.3f s of CPU for the 4 agents = %.3f%% of one core (goal < 1%%)\n", wall, cpu, 100 * cpu / wall }'
