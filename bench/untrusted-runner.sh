#!/usr/bin/env bash
# Benchmark an untrusted *runner* job against a trusted one on the same warm store (root; needs
# Debian's nix-bin for the tarball and the builds). `flywheel-agent run` with the fake GitHub and
# the fake Runner.Listener, one Nix lane of one runner; the jobs take turns: a push to main
# (trusted: its daemon writes the shared store) and a fork's pull request (its store and daemon
# open at job-started on a throwaway layer). Each job builds a closure the store already has
# (~20 MiB, two paths) and then one new derivation. Reported per kind, mean of RUNS:
#  - time to first build: from the started hook's start (where the store opens) to the end of
#    the job's first new build (goal: untrusted <= 1.2x trusted)
#  - wall time of the job (the listener's run, the agent's `run_ms`; goal <= 1.2x)
#  - paths built or fetched for what the store had (goal 0)
#  - bytes copied up into the layer (the database on its first write, the new build)
#  - the started hook's time (trust decision, store and daemon start)
#
# usage: bench/untrusted-runner.sh [RUNS]   (FLYWHEEL_AGENT: another build to measure)
set -euo pipefail
RUNS=${1:-5}
# Not under /tmp: every job gets a private /tmp and would not see the expressions.
. "$(dirname "$0")/fake-pool.sh" /var/lib/flywheel-bench untrusted-runner
. bench/nix-tarball.sh "$TMP" nopayload
mkdir -p "$TMP/nix" "$TMP/shared" "$TMP/state"
chmod 755 "$TMP/state"  # the runners reach the hook scripts in it
chmod 755 "$TMP/nix"; chmod 1777 "$TMP/shared"
TAG=$(date +%s%N)
warm_closure "$TMP/warm.nix" "$TAG"
# The new derivation of job N.
cat > "$TMP/new.nix" <<NIXEOF
{ n }: derivation { name = "bench-new-\${n}-$TAG"; system = "x86_64-linux"; builder = "/bin/sh";
  args = [ "-c" "echo new > \$out" ]; }
NIXEOF
chmod 644 "$TMP/new.nix"
S=$TMP/shared
JOBS=$((2 * RUNS))
SCRIPT="t0=\$(date +%s%N)
nix-build --no-out-link $TMP/warm.nix 2> $S/warm-\$FLYWHEEL_BENCH_N.log > /dev/null && nix-build --no-out-link $TMP/new.nix --argstr n \$FLYWHEEL_BENCH_N > /dev/null
echo \$t0 \$(date +%s%N) > $S/first-\$FLYWHEEL_BENCH_N; touch $S/done-\$FLYWHEEL_BENCH_N
i=0; while [ ! -e $S/go-\$FLYWHEEL_BENCH_N ] && [ \$i -lt 200 ]; do sleep 0.01; i=\$((i+1)); done"
export FAKE_GITHUB_TRUST=push,pull_request
coproc FAKE { "$T/fake-github-serve" "$TMP/app.pem" bench "$JOBS" "$SCRIPT"; }
exec 3>&"${FAKE[1]}"
read -r URL <&"${FAKE[0]}"
cat > "$TMP/agent.toml" <<TOML
[agent]
state_dir = "$TMP/state"
teardown_grace = "300ms"
reserve = "64Mi"
[metrics]
listen = ""
$(github_and_runner_toml "$URL" bench)
[attic]
publish_repositories = ["tinyland/flywheel"]
$(nix_toml "$TMP/etc/netrc" "$TMP/userpool")
[[lane]]
name = "bench"
labels = ["bench"]
memory = "2Gi"
max_runners = 1
min_free = "1Mi"
work_root = "$TMP/work"
nix_conf = "$TMP/etc/nix.conf"
# The fake GitHub is on the host's loopback, which a job's own network would not reach.
network = "host"
TOML
in_store() {  # run "$@" in a private mount namespace whose /nix is the bench's store
  unshare -m -- sh -c 'mount --make-rprivate / && mount --bind "$0" /nix && shift && exec "$@"' "$TMP/nix" _ "$@"
}
in_store "$AGENT" nix bootstrap --config "$TMP/agent.toml" >/dev/null
in_store "$AGENT" exec --lane bench --config "$TMP/agent.toml" -- nix-build --no-out-link "$TMP/warm.nix" >/dev/null 2>&1
echo "warm store: $(du -sh "$TMP/nix/store" | cut -f1), db $(du -h "$TMP/nix/var/nix/db/db.sqlite" | cut -f1)"
# Not through in_store: $! is then the agent itself (unshare and sh exec it), which the
# cleanup stops.
FLYWHEEL_LOG=info FLYWHEEL_LOG_FORMAT=text unshare -m -- sh -c 'mount --make-rprivate / && mount --bind "$0" /nix && shift && exec "$@"' "$TMP/nix" _ \
  "$AGENT" run --config "$TMP/agent.toml" > "$TMP/agent.log" 2>&1 &
AGENT_PID=$!
: > "$TMP/copied.txt"
for n in $(seq 0 $((JOBS - 1))); do
  t=0
  while [ ! -e "$S/done-$n" ]; do
    sleep 0.01; t=$((t + 1))
    [ $t -lt 12000 ] || { echo "job $n did not finish; the agent's log:" >&2; tail -50 "$TMP/agent.log" >&2; exit 1; }
  done
  copied=0
  for u in "$TMP"/work/*.layer/upper; do [ -d "$u" ] && copied=$(du -sb "$u" | cut -f1); done
  echo "$copied" >> "$TMP/copied.txt"
  touch "$S/go-$n"
done
while [ "$(curl -s "$URL/_fake/stats" | sed -n 's/.*"completed":\([0-9]*\).*/\1/p')" != "$JOBS" ]; do sleep 0.05; done
sleep 0.5
kill -TERM "$AGENT_PID"; wait "$AGENT_PID" || true; AGENT_PID=
# In job order (one runner): the started hook's time and the listener's run.
grep -o 'hook ACTIONS_RUNNER_HOOK_JOB_STARTED took [0-9.]*' "$TMP/agent.log" | awk '{print $NF}' > "$TMP/hook.txt"
grep 'job finished' "$TMP/agent.log" | sed -n 's/.*run_ms=\([0-9.]*\).*/\1/p' > "$TMP/run.txt"
for n in $(seq 0 $((JOBS - 1))); do
  read -r t0 t1 < "$S/first-$n"
  hook=$(sed -n "$((n + 1))p" "$TMP/hook.txt"); run=$(sed -n "$((n + 1))p" "$TMP/run.txt")
  built=$(grep -cE "^(building|copying path) '" "$S/warm-$n.log" || true)
  kind=trusted; [ $((n % 2)) = 1 ] && kind=untrusted
  echo "$kind $(awk -v h="$hook" -v a="$t0" -v b="$t1" 'BEGIN {printf "%.1f", h + (b - a) / 1e6}') $run $built $(sed -n "$((n + 1))p" "$TMP/copied.txt") $hook"
done > "$TMP/jobs.txt"
for kind in trusted untrusted; do
  awk -v k="$kind" '$1 == k {f+=$2; w+=$3; b+=$4; c+=$5; h+=$6; n++} END {printf "%-9s first build %6.1f ms  wall %7.1f ms  built for what the store had %d  copied up %.1f KiB  started hook %5.1f ms  (mean of %d)\n", k, f/n, w/n, b, c/n/1024, h/n, n}' "$TMP/jobs.txt"
done
awk '$1 == "trusted" {f1+=$2; w1+=$3} $1 == "untrusted" {f2+=$2; w2+=$3} END {printf "untrusted/trusted: first build %.2fx, wall %.2fx (goal <= 1.2x)\n", f2/f1, w2/w1}' "$TMP/jobs.txt"
