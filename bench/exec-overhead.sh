#!/usr/bin/env bash
# Benchmark: `flywheel-agent exec -- true` against a shell script doing the same kernel work by
# hand (mkdir the job cgroup, write the limits, join, exec `true`, rmdir), in one run.
# Goal (issue 2): the agent takes at most 1.5x the script's time per job.
#
# usage: bench/exec-overhead.sh [ITERATIONS]      (root; builds the release binary first)
#        BENCH_USER=nobody bench/exec-overhead.sh  (the job as an unprivileged user: setgroups,
#        setuid, no_new_privs; every job also gets its private /tmp, HOME and /proc)
set -euo pipefail
N=${1:-200}
cd "$(dirname "$0")/.."
cargo build --release -q
AGENT=$PWD/target/release/flywheel-agent
TMP=$(mktemp -d /tmp/flywheel-bench.XXXXXX)
trap 'rm -rf "$TMP"' EXIT
cat > "$TMP/agent.toml" <<TOML
[agent]
state_dir = "$TMP/state"
[[lane]]
name = "bench"
memory = "64Mi"
max_runners = 1
pids_max = 512
work_root = "$TMP/work"
min_free = "1Mi"
nix = false
TOML

# The script's cgroups: the same hierarchies the agent uses on this host.
own() { awk -F: -v c="$1" '($2==c){print $3}' /proc/self/cgroup; }
if [ -f /sys/fs/cgroup/cgroup.controllers ]; then
  layout=v2
  base=/sys/fs/cgroup$(own "")
  # Same delegation the agent does (it has run before, so this is a no-op here).
  "$AGENT" exec --lane bench --config "$TMP/agent.toml" -- true 2>/dev/null
  base=/sys/fs/cgroup$(own "" | sed 's#/flywheel-agent$##')/flywheel-jobs
else
  layout=hybrid
  mem=/sys/fs/cgroup/memory$(own memory)/flywheel-jobs
  pids=/sys/fs/cgroup/pids$(own pids)/flywheel-jobs
  uni=/sys/fs/cgroup/unified$(own "")/flywheel-jobs
  mkdir -p "$mem" "$pids" "$uni"
fi

script_job() {
  local i=$1
  if [ "$layout" = v2 ]; then
    local d=$base/script-$i
    mkdir "$d"; echo $((64<<20)) > "$d/memory.max"; echo 0 > "$d/memory.swap.max"; echo 512 > "$d/pids.max"
    ( echo "$BASHPID" > "$d/cgroup.procs"; exec true )
    rmdir "$d"
  else
    local m=$mem/script-$i p=$pids/script-$i u=$uni/script-$i
    mkdir "$m" "$p" "$u"
    echo $((64<<20)) > "$m/memory.limit_in_bytes"; echo 512 > "$p/pids.max"
    ( echo "$BASHPID" > "$m/cgroup.procs"; echo "$BASHPID" > "$p/cgroup.procs"; echo "$BASHPID" > "$u/cgroup.procs"; exec true )
    rmdir "$m" "$p" "$u"
  fi
}

now() { date +%s%N; }
# Warm up both paths once.
script_job warm
FLYWHEEL_LOG=off "$AGENT" exec --lane bench --config "$TMP/agent.toml" -- true

t0=$(now)
for i in $(seq "$N"); do script_job "$i"; done
t1=$(now)
user_args=()
[ -n "${BENCH_USER:-}" ] && user_args=(--user "$BENCH_USER")
for i in $(seq "$N"); do FLYWHEEL_LOG=off "$AGENT" exec --lane bench --config "$TMP/agent.toml" "${user_args[@]}" -- true; done
t2=$(now)

script_us=$(( (t1 - t0) / N / 1000 ))
agent_us=$(( (t2 - t1) / N / 1000 ))
ratio=$(awk -v a="$agent_us" -v s="$script_us" 'BEGIN { printf "%.2f", a / s }')
echo "layout=$layout iterations=$N user=${BENCH_USER:-root}"
echo "script: ${script_us} us/job"
echo "agent:  ${agent_us} us/job"
echo "ratio:  ${ratio}x (goal <= 1.5x)"
