#!/usr/bin/env bash
# Benchmark `flywheel-agent run` in steady state against the fake GitHub on loopback, with the
# fake Runner.Listener, one lane of 4 runners and JOBS short jobs (root; real cgroups).
# Reports: GitHub API calls per registered runner (goal 1), agent-side time from JIT config
# received to listener started (goal <= 50 ms), agent RSS with 4 runners (goal <= 20 MiB).
#
# usage: bench/run-steady-state.sh [JOBS]
set -euo pipefail
JOBS=${1:-40}
. "$(dirname "$0")/fake-pool.sh" /tmp run
LANE=bench4
coproc FAKE { "$T/fake-github-serve" "$TMP/app.pem" "$LANE" "$JOBS" "sleep 0.3"; }
exec 3>&"${FAKE[1]}"
read -r URL <&"${FAKE[0]}"
cat > "$TMP/agent.toml" <<TOML
[agent]
state_dir = "$TMP/state"
teardown_grace = "300ms"
reserve = "64Mi"
$(github_and_runner_toml "$URL" bench)
[[lane]]
name = "$LANE"
memory = "256Mi"
max_runners = 4
min_free = "1Mi"
nix = false
work_root = "$TMP/work"
TOML
stats() { curl -s "$URL/_fake/stats"; }
FLYWHEEL_LOG=info FLYWHEEL_LOG_FORMAT=json "$T/flywheel-agent" run --config "$TMP/agent.toml" > "$TMP/agent.log" 2>&1 &
AGENT_PID=$!
rss_max=0
while :; do
  s=$(stats)
  done_=$(echo "$s" | sed -n 's/.*"completed":\([0-9]*\).*/\1/p')
  rss=$(awk '/VmRSS/ {print $2}' /proc/$AGENT_PID/status)
  [ "$rss" -gt "$rss_max" ] && rss_max=$rss
  [ "${done_:-0}" -ge "$JOBS" ] && break
  sleep 0.2
done
kill -TERM "$AGENT_PID"; wait "$AGENT_PID" || true; AGENT_PID=
s=$(stats)
reg=$(echo "$s" | sed -n 's/.*"registrations":\([0-9]*\).*/\1/p')
gen=$(echo "$s" | sed -n 's/.*"generate-jitconfig":\([0-9]*\).*/\1/p')
del=$(echo "$s" | sed -n 's/.*"delete-runner":\([0-9]*\).*/\1/p')
launch=$(grep -o '"mean_launch_ms":[0-9.]*' "$TMP/agent.log" | cut -d: -f2)
echo "jobs completed:                 $JOBS"
echo "runners registered:             $reg"
echo "generate-jitconfig calls:       $gen (per registered runner: $(awk -v g="$gen" -v r="$reg" 'BEGIN{printf "%.2f", g/r}'))"
echo "delete-runner calls:            ${del:-0} (the drain's idle runners)"
echo "all API calls:                  $(echo "$s" | grep -o '"calls":{[^}]*}')"
echo "JIT config -> listener started: ${launch} ms mean (goal <= 50 ms)"
echo "agent peak RSS, 4 runners:      $((rss_max / 1024)).$(( (rss_max % 1024) * 10 / 1024 )) MiB (goal <= 20 MiB)"
