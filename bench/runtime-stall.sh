#!/usr/bin/env bash
# Benchmark (issue 16): does one runner's slow setup or teardown stall the others? One agent,
# 4 runners against the fake GitHub: `boot` (1 runner) does a cold Nix bootstrap of the test
# tarball (the agent runs in a private mount namespace with an empty /nix), `big` (1 runner)
# makes 100k files in `_work` and exits (teardown removes them), and `quick` (2 runners) runs
# short jobs (`sleep 0.1`) the whole time. Measured for the other two: the job-started hook's time as the
# fake runner reports it (bash + request + the agent's answer), and /metrics polled every
# 20 ms. Goal: p99 <= 50 ms for both.
#
# Each round is a fresh agent, fake GitHub and empty /nix; the figures are over all rounds.
#
# usage: bench/runtime-stall.sh [ROUNDS] [FILES] [QUICK_JOBS]   (root; real cgroups; nix-bin)
set -euo pipefail
ROUNDS=${1:-3}
FILES=${2:-100000}
QUICK=${3:-60}
. "$(dirname "$0")/fake-pool.sh" /var/lib/flywheel-bench stall
. bench/nix-tarball.sh "$TMP"
: > "$TMP/lat"; : > "$TMP/hook"; : > "$TMP/summary"
round() {
  local r=$1 R=$TMP/round-$1
  mkdir -m 755 "$R" "$R/fresh-nix"
  coproc FAKE { "$T/fake-github-serve" "$R/app.pem" \
    boot 1 "echo booted" \
    big 1 "mkdir many && cd many && seq 1 $FILES | xargs touch && echo made-$FILES-files" \
    quick "$QUICK" "sleep 0.1"; }
  exec 3>&"${FAKE[1]}"
  local url; read -r url <&"${FAKE[0]}"
  local port=$(( 20000 + RANDOM % 20000 ))
  cat > "$R/agent.toml" <<TOML
[agent]
state_dir = "$R/state"
teardown_grace = "300ms"
reserve = "64Mi"
[metrics]
listen = "127.0.0.1:$port"
[nix]
tarball = "$TMP/nix.tar.xz"
sha256 = "$SHA"
version = "$V"
# Debian's Nix 2.8 (the bench tarball's programs) predates both advisories' fixes.
acknowledged_advisories = ["CVE-2026-39860", "CVE-2024-27297"]
netrc_file = "$R/etc/netrc"
$(TMP=$R github_and_runner_toml "$url" "stall$r")
[[lane]]
name = "boot"
memory = "1Gi"
min_free = "1Mi"
work_root = "$R/work"
nix_conf = "$R/etc/nix.conf"
[[lane]]
name = "big"
memory = "512Mi"
pids_max = 4096
min_free = "1Mi"
nix = false
work_root = "$R/work"
[[lane]]
name = "quick"
memory = "256Mi"
max_runners = 2
min_free = "1Mi"
nix = false
work_root = "$R/work"
TOML
  sed -i "s|install_dir = .*|install_dir = \"$TMP/install\"|" "$R/agent.toml"
  # Polled from before the agent listens (refused connections are not counted), so the first
  # jobs' setup, the cold bootstrap among them, is measured too.
  ( while [ ! -e "$R/stop" ]; do curl -s -o /dev/null -w '%{http_code} %{time_total}\n' "http://127.0.0.1:$port/metrics" || true; sleep 0.02; done ) \
    >> "$TMP/lat.raw" &
  local poller=$!
  FLYWHEEL_LOG=info FLYWHEEL_LOG_FORMAT=json unshare -m -- sh -c \
    'mount --make-rprivate / && mount --bind "$0" /nix && shift && exec "$@"' "$R/fresh-nix" _ \
    "$AGENT" run --config "$R/agent.toml" > "$R/agent.log" 2>&1 &
  AGENT_PID=$!
  until curl -s "$url/_fake/stats" | grep -q "\"completed\":$((QUICK + 2))"; do sleep 0.2; done
  touch "$R/stop"; wait "$poller" || true
  kill -TERM "$AGENT_PID"; wait "$AGENT_PID" || true; AGENT_PID=
  exec 3>&-; eval "exec ${FAKE[1]}>&-"; wait "$FAKE_PID" 2>/dev/null || true
  grep -q "made-$FILES-files" "$R/agent.log" || { echo "round $r: the big job did not make its files" >&2; exit 1; }
  grep -q "booted" "$R/agent.log" || { echo "round $r: the boot job did not run" >&2; exit 1; }
  grep '"lane":"quick"' "$R/agent.log" | grep -o 'hook ACTIONS_RUNNER_HOOK_JOB_STARTED took [0-9.]*' \
    | awk '{print $NF / 1000}' >> "$TMP/hook"
  echo "round $r: $(grep -o 'cold bootstrap in [0-9.]* m*s' "$R/agent.log" | head -1); slowest teardown $(grep -o '"teardown_ms":[0-9.]*' "$R/agent.log" | cut -d: -f2 | sort -n | tail -1) ms" >> "$TMP/summary"
}
for r in $(seq "$ROUNDS"); do round "$r"; done
# A stall shows as one slow sample (the poller waits for it), so the count over 50 ms and the
# max matter as much as p99.
pct() { sort -n "$1" | awk -v what="$2" '{ a[NR] = $1 * 1000; if (a[NR] > 50) over++ } END {
  printf "%s: %d samples, ms p50 %.1f  p99 %.1f  max %.1f, %d over 50 ms (goal p99 <= 50)\n", what, NR, a[int(NR*0.5)], a[int(NR*0.99)], a[NR], over }'; }
cat "$TMP/summary"
awk '$1 == 200 { print $2 }' "$TMP/lat.raw" > "$TMP/lat"
pct "$TMP/lat" "/metrics"
pct "$TMP/hook" "job-started hook of the quick lane's runners"
