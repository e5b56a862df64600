#!/usr/bin/env bash
# Benchmark: does one runner's teardown of a big `_work` stall the agent? One lane of 4
# runners against the fake GitHub; one job makes 100k files in its `_work` and exits; the
# agent's /metrics is polled every 20 ms the whole time (it is served by the same runtime that
# supervises the runners, answers hooks and feeds the watchdog). Reports /metrics latency
# p50 / p99 / max and the teardown's time (goal, issue 16: p99 <= 50 ms).
#
# usage: bench/teardown-stall.sh [FILES]      (root; real cgroups; creates runner-0..3 if missing)
set -euo pipefail
FILES=${1:-100000}
. "$(dirname "$0")/fake-pool.sh" /var/lib/flywheel-bench stall
LANE=stall4
coproc FAKE { "$T/fake-github-serve" "$TMP/app.pem" "$LANE" 1 \
  "mkdir many && cd many && seq 1 $FILES | xargs touch && echo made-$FILES-files"; }
exec 3>&"${FAKE[1]}"
read -r URL <&"${FAKE[0]}"
PORT=$(( 20000 + RANDOM % 20000 ))
cat > "$TMP/agent.toml" <<TOML
[agent]
state_dir = "$TMP/state"
teardown_grace = "300ms"
reserve = "64Mi"
[metrics]
listen = "127.0.0.1:$PORT"
$(github_and_runner_toml "$URL" stall)
[[lane]]
name = "$LANE"
memory = "512Mi"
max_runners = 4
pids_max = 4096
min_free = "1Mi"
nix = false
work_root = "$TMP/work"
TOML
FLYWHEEL_LOG=info FLYWHEEL_LOG_FORMAT=json "$AGENT" run --config "$TMP/agent.toml" > "$TMP/agent.log" 2>&1 &
AGENT_PID=$!
until curl -s -o /dev/null "http://127.0.0.1:$PORT/metrics"; do sleep 0.05; done
done_at=
: > "$TMP/lat"
while :; do
  curl -s -o /dev/null -w '%{time_total}\n' "http://127.0.0.1:$PORT/metrics" >> "$TMP/lat"
  if [ -z "$done_at" ] && curl -s "$URL/_fake/stats" | grep -q '"completed":1'; then done_at=$SECONDS; fi
  [ -n "$done_at" ] && [ $((SECONDS - done_at)) -ge 3 ] && break
  sleep 0.02
done
kill -TERM "$AGENT_PID"; wait "$AGENT_PID" || true; AGENT_PID=
grep -q "made-$FILES-files" "$TMP/agent.log" || { echo "the job did not make its files" >&2; exit 1; }
teardown=$(grep -o '"teardown_ms":[0-9.]*' "$TMP/agent.log" | cut -d: -f2 | sort -n | tail -1)
sort -n "$TMP/lat" | awk -v td="$teardown" '{ a[NR] = $1 * 1000 } END {
  printf "/metrics polls: %d\n", NR
  printf "/metrics latency ms: p50 %.1f  p99 %.1f  max %.1f (goal p99 <= 50)\n", a[int(NR*0.5)], a[int(NR*0.99)], a[NR]
  printf "slowest teardown: %s ms\n", td }'
