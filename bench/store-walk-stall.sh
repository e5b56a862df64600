#!/usr/bin/env bash
# Benchmark (issue 26): does a job's report and publication over a big store stall the agent?
# One agent (`run`, the fake GitHub, the fake Runner.Listener, the fake Attic):
#  - `heavy` (1 runner, a Nix lane, a trusted push to main) waits while the bench gives its
#    daemon 100,000 build logs (in the job's own NIX_LOG_DIR, written during the job) and a
#    record naming one out path whose closure is 10,000 paths of the store (registered before
#    the agent starts, by the host's nix-store --register-validity: a binary tree of small
#    files), then ends. Its job-completed hook reads the logs, the record and the database for
#    the report and walks the closure, and the agent publishes the 10,000 paths to the fake
#    Attic; after the job the envelope reads them again and the hooks remove the logs.
#  - `quick` (2 runners, no Nix) runs short jobs (`sleep 0.1`) the whole time.
#  - `probe` (1 runner, no Nix) runs one job whose step asks its hook every 20 ms, twice over:
#    the hook script as the runner runs it (a process of the agent's binary each time), and a
#    request written straight to the job's hook socket by one python3 loop (the agent's answer
#    alone). The agent answers "already answered" after the first job-started.
# Measured from the heavy job's end (the bench lets it go) to its runner's end: /metrics polled
# every 20 ms; hook answers: the probe's two and the quick jobs' job-started hooks (their time
# as the fake runner reports it: bash, the hook client, the request and the agent's answer).
# Goal: p99 <= 50 ms and max <= 250 ms for each.
#
# usage: bench/store-walk-stall.sh [LOGS] [PATHS]   (root; real cgroups; nix-bin; BENCH_DIR: where)
#        FLYWHEEL_AGENT=/path/to/another/build bench/store-walk-stall.sh   (e.g. the commit before)
set -euo pipefail
LOGS=${1:-100000}
PATHS=${2:-10000}
# Not under /tmp: every job gets a private /tmp.
. "$(dirname "$0")/fake-pool.sh" "${BENCH_DIR:-/var/lib/flywheel-bench}" store-walk
. bench/nix-tarball.sh "$TMP" nopayload
S=$TMP/shared
mkdir -p "$TMP/nix" "$S" "$TMP/state"
chmod 755 "$TMP/state" "$TMP/nix"; chmod 1777 "$S"
in_store() {  # run "$@" in a private mount namespace whose /nix is the bench's store
  unshare -m -- sh -c 'mount --make-rprivate / && mount --bind "$0" /nix && shift && exec "$@"' "$TMP/nix" _ "$@"
}

# The fake Attic, its stdin held open on descriptor 4.
head -c 48 /dev/urandom | base64 -w0 > "$TMP/attic.key"
mkfifo "$TMP/attic.in"
"$T/fake-attic-serve" "$TMP/attic.key" bench < "$TMP/attic.in" > "$TMP/attic.url" &
ATTIC_PID=$!
exec 4> "$TMP/attic.in"
# Whatever ends the bench, the poller and the fakes end with it.
trap 'touch "$TMP/stop" 2>/dev/null; kill ${POLLER:-} "$ATTIC_PID" ${FAKE_PID:-} 2>/dev/null; cleanup' EXIT
until [ -s "$TMP/attic.url" ]; do sleep 0.05; done
ATTIC_URL=$(head -1 "$TMP/attic.url")

HEAVY="touch $S/ready; i=0; while [ ! -e $S/go ] && [ \$i -lt 60000 ]; do sleep 0.01; i=\$((i+1)); done; echo heavy-done"
cat > "$S/raw.py" <<'PY'
import os, socket, sys, time
req = b'{"op":"job-started","repository":"","run_id":"","run_attempt":"","event_name":"","git_ref":""}\n'
with open(sys.argv[2], "a") as out:
    while not os.path.exists(sys.argv[1]):
        a = time.time_ns()
        s = socket.socket(socket.AF_UNIX)
        s.connect(os.environ["FLYWHEEL_HOOK_SOCKET"])
        s.sendall(req)
        answer = b""
        while not answer.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            answer += chunk
        s.close()
        out.write(f"{a} {time.time_ns() - a}\n")
        out.flush()
        time.sleep(0.02)
PY
chmod 644 "$S/raw.py"
PROBE="python3 $S/raw.py $S/stop-probe $S/hook-raw & while [ ! -e $S/stop-probe ]; do a=\$(date +%s%N); \"\$ACTIONS_RUNNER_HOOK_JOB_STARTED\" > /dev/null 2>&1; b=\$(date +%s%N); echo \"\$a \$((b - a))\" >> $S/hook-probe; sleep 0.02; done; wait"
export FAKE_GITHUB_TRUST=push
coproc FAKE { "$T/fake-github-serve" "$TMP/app.pem" heavy 1 "$HEAVY" probe 1 "$PROBE" quick 100000 "sleep 0.1"; }
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
$(github_and_runner_toml "$URL" walk)
[attic]
signing_key_file = "$TMP/attic.key"
publish_repositories = ["tinyland/flywheel"]
upstream_keys = []
$(nix_toml "$TMP/etc/netrc" "$TMP/userpool")
[[lane]]
name = "heavy"
memory = "2Gi"
max_runners = 1
min_free = "1Mi"
work_root = "$TMP/work"
nix_conf = "$TMP/etc/nix.conf"
# The fake GitHub and Attic are on the host's loopback, which a job's own network would not reach.
network = "host"
[lane.hints]
attic_server = "$ATTIC_URL"
attic_cache = "bench"
[[lane]]
name = "probe"
memory = "256Mi"
max_runners = 1
min_free = "1Mi"
nix = false
work_root = "$TMP/work"
[[lane]]
name = "quick"
memory = "256Mi"
max_runners = 2
min_free = "1Mi"
nix = false
work_root = "$TMP/work"
TOML
in_store "$AGENT" nix bootstrap --config "$TMP/agent.toml" >/dev/null

# The closure: path i refers to paths 2i+1 and 2i+2, so path 0's closure is all of them. The
# hash part is the number in 32 digits (digits are Nix base-32); nix-store hashes the files.
t=$(date +%s%N)
awk -v n="$PATHS" -v d="$TMP/nix/store" 'function p(i) { return sprintf("/nix/store/%032d-fwbench-%d", i, i) }
  BEGIN { for (i = 0; i < n; i++) {
    f = sprintf("%s/%032d-fwbench-%d", d, i, i); print "fwbench " i > f; close(f)
    refs = 0; r = ""
    for (c = 2 * i + 1; c <= 2 * i + 2; c++) if (c < n) { refs++; r = r p(c) "\n" }
    printf "%s\n\n%d\n%s", p(i), refs, r > (d "/../reginfo") } }'
in_store env NIX_CONFIG=$'build-users-group =' nix-store --register-validity < "$TMP/nix/reginfo"
rm "$TMP/nix/reginfo"
TOP=$(printf '/nix/store/%032d-fwbench-0' 0)
echo "store: $(in_store nix-store -qR "$TOP" | wc -l) paths in the closure of $TOP, registered in $(( ($(date +%s%N) - t) / 1000000 )) ms"

: > "$TMP/metrics.raw"
( while [ -d "$TMP" ] && [ ! -e "$TMP/stop" ]; do
    printf '%s ' "$EPOCHREALTIME"
    curl -s -o /dev/null -w '%{http_code} %{time_total}\n' "http://127.0.0.1:$PORT/metrics" || echo
    sleep 0.02
  done ) >> "$TMP/metrics.raw" 3>&- 4>&- &
POLLER=$!
FLYWHEEL_LOG=info FLYWHEEL_LOG_FORMAT=json unshare -m -- sh -c 'mount --make-rprivate / && mount --bind "$0" /nix && shift && exec "$@"' "$TMP/nix" _ \
  "$AGENT" run --config "$TMP/agent.toml" > "$TMP/agent.log" 2>&1 &
AGENT_PID=$!
n=0
until [ -e "$S/ready" ]; do
  sleep 0.05; n=$((n + 1))
  [ $n -lt 2400 ] || { echo "the heavy job did not start; the agent's log:" >&2; tail -30 "$TMP/agent.log" >&2; exit 1; }
done
# The heavy job's daemon's build logs and record (its job name is its log directory's).
JOB=$(ls "$TMP/state/nix-logs")
[ "$(echo "$JOB" | wc -l)" = 1 ] || { echo "expected one job's log directory, found: $JOB" >&2; exit 1; }
t=$(date +%s%N)
for d in $(seq -w 0 99); do
  mkdir -p "$TMP/state/nix-logs/$JOB/drvs/$d"
  (cd "$TMP/state/nix-logs/$JOB/drvs/$d" && seq -f "%06g-fwlog.drv" $(( 10#$d * LOGS / 100 )) $(( (10#$d + 1) * LOGS / 100 - 1 )) | xargs touch)
done
echo "$TOP" >> "$TMP/state/nix-sockets/$JOB.built"
echo "job $JOB: $(find "$TMP/state/nix-logs/$JOB/drvs" -type f | wc -l) build logs written in $(( ($(date +%s%N) - t) / 1000000 )) ms"
T0=$EPOCHREALTIME
touch "$S/go"
n=0
until grep -q '"message":"runner finished".*"lane":"heavy"\|"lane":"heavy".*"message":"runner finished"' "$TMP/agent.log"; do
  sleep 0.05; n=$((n + 1))
  [ $n -lt 12000 ] || { echo "the heavy job did not finish; the agent's log:" >&2; tail -30 "$TMP/agent.log" >&2; exit 1; }
done
T1=$EPOCHREALTIME
touch "$TMP/stop" "$S/stop-probe"; wait "$POLLER" || true
kill -TERM "$AGENT_PID"; wait "$AGENT_PID" || true; AGENT_PID=
exec 3>&- 4>&-
grep -q heavy-done "$TMP/agent.log" || { echo "the heavy job did not run to its end" >&2; exit 1; }
echo "heavy job: $(grep -o '[a-z ]*published [^"]*' "$TMP/agent.log" | head -1)"
echo "heavy job: $(grep '"lane":"heavy"' "$TMP/agent.log" | grep -o 'hook ACTIONS_RUNNER_HOOK_JOB_COMPLETED took [0-9.]* ms' | head -1); window $(awk -v a="$T0" -v b="$T1" 'BEGIN { printf "%.1f", b - a }') s"
# The samples inside the window: /metrics by the poller's clock, hooks by the agent log's.
awk -v a="$T0" -v b="$T1" '$1 >= a && $1 <= b && $2 == 200 { print $3 }' "$TMP/metrics.raw" > "$TMP/metrics"
W0=$(date -u -d "@$T0" +%Y-%m-%dT%H:%M:%S.%6NZ); W1=$(date -u -d "@$T1" +%Y-%m-%dT%H:%M:%S.%6NZ)
grep '"lane":"quick"' "$TMP/agent.log" | grep 'hook ACTIONS_RUNNER_HOOK_JOB_STARTED took' \
  | sed -n 's/^{"timestamp":"\([^"]*\)".*hook ACTIONS_RUNNER_HOOK_JOB_STARTED took \([0-9.]*\) ms.*/\1 \2/p' \
  | awk -v a="$W0" -v b="$W1" '$1 >= a && $1 <= b { print $2 / 1000 }' > "$TMP/hook"
pct() { sort -n "$1" | awk -v what="$2" '{ a[NR] = $1 * 1000; if (a[NR] > 50) over++ } END {
  if (NR == 0) { printf "%s: no samples\n", what; exit }
  p50 = int(NR * 0.5); if (p50 < 1) p50 = 1; p99 = int(NR * 0.99); if (p99 < 1) p99 = 1
  printf "%s: %d samples, ms p50 %.1f  p99 %.1f  max %.1f, %d over 50 ms (goal p99 <= 50, max <= 250)\n", what, NR, a[p50], a[p99], a[NR], over }'; }
for f in hook-probe hook-raw; do
  awk -v a="$T0" -v b="$T1" '$1 / 1e9 >= a && $1 / 1e9 <= b { print $2 / 1e9 }' "$S/$f" > "$TMP/$f"
done
pct "$TMP/metrics" "/metrics"
pct "$TMP/hook-raw" "hook answers on the job's socket (every 20 ms)"
pct "$TMP/hook-probe" "hook client runs in the job (every 20 ms)"
pct "$TMP/hook" "job-started hook of the quick lane's runners"
