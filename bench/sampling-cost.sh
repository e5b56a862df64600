#!/usr/bin/env bash
# Benchmark what sampling a job's memory for its summary costs: 4 jobs at once (`exec -- sleep`),
# each agent sampling its job's cgroup every 250 ms, and walking the job's processes for the
# memory of each build (one `/proc/PID/status` read per process a sample). Reports the agents'
# CPU time over a window in the middle of the jobs, as a fraction of one core (goal: under 1%
# for the 4 together). PROCS: processes per job (default 1; a build of `make -j16` has dozens).
# KIND: `job` (the job user's processes, skipped after the first sample) or `build` (processes
# of another user, as a Nix build's are: their memory read at every sample).
#
# usage: bench/sampling-cost.sh [SECONDS] [PROCS] [KIND]      (root)
set -euo pipefail
SECS=${1:-20}
PROCS=${2:-1}
KIND=${3:-job}
case $KIND in
  job) as=(--user nobody); run=() ;;
  build) as=(); run=(setpriv --reuid=30999 --regid=30999 --clear-groups) ;;
  *) echo "KIND is job or build" >&2; exit 64 ;;
esac
cd "$(dirname "$0")/.."
cargo build --release -q -p flywheel-agent
AGENT=$PWD/target/release/flywheel-agent
mkdir -p /var/lib/flywheel-bench
TMP=$(mktemp -d /var/lib/flywheel-bench/flywheel-bench-sample.XXXXXX)
trap 'rm -rf "$TMP"' EXIT
chmod 755 "$TMP"  # the jobs run as nobody, as a runner's jobs run as its user
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
  FLYWHEEL_LOG=off "$AGENT" exec --lane bench --config "$TMP/agent.toml" --slot "$i" "${as[@]}" -- \
    "${run[@]}" sh -c 'n=$1; while [ "$n" -gt 1 ]; do sleep "$2" & n=$((n - 1)); done; exec sleep "$2"' sh "$PROCS" $((SECS + 4)) 2>/dev/null &
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
awk -v d=$((b - a)) -v hz="$hz" -v ns=$((t1 - t0)) -v procs="$PROCS" -v kind="$KIND" 'BEGIN {
  cpu = d / hz; wall = ns / 1e9
  printf "4 jobs of %d processes (%s) sampled every 250 ms for %.1f s: %.3f s of CPU for the 4 agents = %.3f%% of one core (goal < 1%%)\n", procs, kind, wall, cpu, 100 * cpu / wall }'
