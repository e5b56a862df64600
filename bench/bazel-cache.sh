#!/usr/bin/env bash
# Benchmark: a job's Bazel cache endpoint vs the same build pointed straight at the upstream
# (issue 25). The upstream is nginx from Debian (reads open, PUT behind basic auth) in a network
# namespace this script makes (10.252.0.2:8081): the agent reaches it over a veth pair, a job
# of the isolated lane through the host's NAT; no traffic leaves the machine.
#  1. Wall time: a workspace of G genrules (64 KiB each, and one tiny) is built once by a
#     trusted job through its endpoint (filling the upstream); then one untrusted job builds it
#     R times each way (after 8 uncounted warm-up pairs for the Bazel server's JIT), alternating,
#     `bazel clean` before each build so that every output comes from the remote cache; the
#     medians of the builds' wall times.  Goal: <= 1.05x.  The lane keeps CAS blobs in the
#     agent's memory (`memory_cache`, 64Mi by default: the first build through the endpoint
#     fills it, so the later ones get their outputs from it and only their action-cache
#     lookups go upstream); MEMORY_CACHE=0 measures the extra hop alone.
#  2. Added latency per request: M GETs of an action-cache entry (never kept in memory: every
#     one goes upstream) over one connection (curl's time_total per transfer): from inside the
#     job through its endpoint and straight (through the host's NAT), and from the host
#     straight (the agent's own leg to the upstream); p50 and p99 of each, and what the
#     endpoint adds to each.  Goal: p99 added <= 1 ms.  And M GETs of the tiny CAS blob
#     through the endpoint (from the agent's memory after the first).
#  3. The agent's peak RSS (VmHWM of the `exec` process) for that job, and for a job that
#     runs `true` on the same lane (the endpoint idle).
#
# usage: [MEMORY_CACHE=size] bench/bazel-cache.sh [G] [R] [M]   (root; needs bazel-bootstrap, nginx-light,
#        apache2-utils, curl, nftables, ip_forward=1; builds the release binary unless
#        AGENT=path is given)
set -euo pipefail
G=${1:-200}
R=${2:-10}
M=${3:-2000}
cd "$(dirname "$0")/.."
if [ -z "${AGENT:-}" ]; then
  cargo build --release -q -p flywheel-agent
  AGENT=$PWD/target/release/flywheel-agent
fi
TMP=$(mktemp -d /var/lib/flywheel-bench.XXXXXX)
chmod 0755 "$TMP"
NS=fwbz-$$
LINK=fwbz$$
UP=http://10.252.0.2:8081
cleanup() {
  [ -n "${NGINX:-}" ] && kill "$NGINX" 2>/dev/null || true
  ip link del "$LINK" 2>/dev/null || true
  ip netns del "$NS" 2>/dev/null || true
  rm -rf "$TMP"
}
trap cleanup EXIT

# The upstream.
ip netns add "$NS"
ip link add "$LINK" type veth peer name eth0 netns "$NS"
ip addr add 10.252.0.1/30 dev "$LINK"; ip link set "$LINK" up
ip -n "$NS" addr add 10.252.0.2/30 dev eth0; ip -n "$NS" link set eth0 up; ip -n "$NS" link set lo up
mkdir -p "$TMP/nginx/cache" "$TMP/nginx/tmp"
PW=pw-$RANDOM$RANDOM
htpasswd -bc "$TMP/nginx/htpasswd" writer "$PW" 2>/dev/null
cat > "$TMP/nginx/nginx.conf" <<NGINX
daemon off; user root root; worker_processes 1;
pid $TMP/nginx/nginx.pid; error_log $TMP/nginx/error.log;
events { worker_connections 512; }
http {
  access_log off; client_body_temp_path $TMP/nginx/tmp; client_max_body_size 1g;
  server {
    listen 10.252.0.2:8081; root $TMP/nginx/cache;
    location / {
      dav_methods PUT; create_full_put_path on;
      limit_except GET HEAD { auth_basic "bazel"; auth_basic_user_file $TMP/nginx/htpasswd; }
    }
  }
}
NGINX
ip netns exec "$NS" nginx -c "$TMP/nginx/nginx.conf" & NGINX=$!
( umask 077; echo "writer:$PW" > "$TMP/write.cred" )

cat > "$TMP/agent.toml" <<TOML
[agent]
state_dir = "$TMP/state"
[[lane]]
name = "bench"
memory = "4Gi"
max_runners = 1
pids_max = 4096
work_root = "$TMP/work"
min_free = "1Mi"
nix = false
network = "isolated"
dns = ["10.252.0.2"]
[lane.bazel]
upstream = "$UP"
write_credential_file = "$TMP/write.cred"
memory_cache = "${MEMORY_CACHE:-64Mi}"
TOML

# The workspace: G genrules of 64 KiB each, and a tiny one.
mkdir -p "$TMP/ws" "$TMP/shared"; chmod 1777 "$TMP/shared"
echo 'workspace(name = "bench")' > "$TMP/ws/WORKSPACE"
{
  echo 'genrule(name = "tiny", outs = ["tiny.txt"], cmd = "echo tiny > $@")'
  for i in $(seq "$G"); do
    echo "genrule(name = \"g$i\", outs = [\"g$i.bin\"], cmd = \"(echo g$i; head -c 65536 /dev/zero) > \$@\")"
  done
} > "$TMP/ws/BUILD"
chmod -R a+rX "$TMP/ws"
TINY=$UP/cas/$(echo tiny | sha256sum | cut -d' ' -f1)

vmhwm() { awk '/VmHWM/ {print $2}' "/proc/$1/status" 2>/dev/null || true; }
cpu_ticks() { awk '{print $14 + $15, $14, $15}' "/proc/$1/stat" 2>/dev/null || true; }
# Run a job; its agent's peak RSS (KiB) goes to $TMP/$1.rss, its CPU time (ticks) to $TMP/$1.cpu.
job() {
  local name=$1; shift
  "$AGENT" exec --lane bench --config "$TMP/agent.toml" --user nobody "$@" > "$TMP/$name.out" 2>&1 & local pid=$!
  local peak=0 cpu=0 v
  while kill -0 "$pid" 2>/dev/null; do
    v=$(vmhwm "$pid"); [ -n "$v" ] && peak=$v
    v=$(cpu_ticks "$pid"); [ -n "$v" ] && cpu=$v && echo "$v" > "$TMP/$name.cpusplit"
    sleep 0.2
  done
  wait "$pid" || { cat "$TMP/$name.out"; exit 1; }
  echo "$peak" > "$TMP/$name.rss"
  echo "${cpu%% *}" > "$TMP/$name.cpu"
}
BZ='bazel --output_user_root=$HOME/.bazel'
fill='cp -r '"$TMP"'/ws "$HOME/ws" && cd "$HOME/ws" && '"$BZ"' build --remote_cache=$BAZEL_REMOTE_CACHE --spawn_strategy=local //... > '"$TMP"'/shared/fill.log 2>&1'
job fill -- sh -c "$fill"
echo "filled: $(ls "$TMP/nginx/cache/cas" | wc -l) CAS blobs, $(ls "$TMP/nginx/cache/ac" | wc -l) AC entries upstream"
PROBE=$UP/ac/$(ls "$TMP/nginx/cache/ac" | sed -n 1p)

# The measured job: R builds each way, alternating; then M GETs each way.
cat > "$TMP/shared/measure.sh" <<'SH'
set -eu
S=$1; R=$2; M=$3; UP=$4; PROBE=$5; WS=$6; TINY=$7
cp -r "$WS" "$HOME/ws"; cd "$HOME/ws"
bz() { bazel --output_user_root="$HOME/.bazel" "$@"; }
bz build --spawn_strategy=local --remote_cache="$UP" //:tiny > /dev/null 2>&1  # the server up
W=8   # warm-up pairs (the server's JIT: its builds still get faster through about the eighth), not counted
for i in $(seq $((R + W))); do
  # Each pair in the other order than the one before (ABBA): the builds still get faster as
  # the server's JIT warms up, which would otherwise count against whichever way goes first.
  order="endpoint direct"; [ $((i % 2)) = 0 ] && order="direct endpoint"
  for mode in $order; do
    url=$UP; [ "$mode" = endpoint ] && url=$BAZEL_REMOTE_CACHE
    bz clean > /dev/null 2>&1
    t0=$(date +%s%N)
    bz build --spawn_strategy=local --remote_cache="$url" //... > "$S/build-$mode.log" 2>&1
    t1=$(date +%s%N)
    [ "$i" -gt "$W" ] && echo $(( (t1 - t0) / 1000 )) >> "$S/$mode.us"
    grep -o '[0-9]* remote cache hit' "$S/build-$mode.log" >> "$S/$mode.hits" || echo "0 remote cache hit" >> "$S/$mode.hits"
  done
done
bz shutdown > /dev/null 2>&1 || true
for mode in endpoint direct memory; do
  path=${PROBE#http://*/}; [ "$mode" = memory ] && path=${TINY#http://*/}
  base=$UP; [ "$mode" != direct ] && base=$BAZEL_REMOTE_CACHE
  : > "$S/curl-$mode.conf"
  for i in $(seq "$M"); do printf 'url = "%s/%s"\noutput = "/dev/null"\n' "$base" "$path" >> "$S/curl-$mode.conf"; done
  curl -s -K "$S/curl-$mode.conf" -w '%{http_code} %{time_total}\n' > "$S/lat-$mode.txt"
done
SH
job measure --untrusted -- sh "$TMP/shared/measure.sh" "$TMP/shared" "$R" "$M" "$UP" "$PROBE" "$TMP/ws" "$TINY"
job idle --untrusted -- sleep 2
# The agent's own leg: the same GETs from the host's namespace straight to the upstream.
curl -s -K "$TMP/shared/curl-direct.conf" -w '%{http_code} %{time_total}\n' > "$TMP/shared/lat-host.txt"

median() { sort -n | awk '{v[NR]=$1} END {if (NR%2) print v[(NR+1)/2]; else print (v[NR/2]+v[NR/2+1])/2}'; }
pct() { sort -n | awk -v p="$1" '{v[NR]=$1} END {i=int(NR*p/100+0.999999); if (i<1) i=1; print v[i]}'; }
S=$TMP/shared
we=$(median < "$S/endpoint.us"); wd=$(median < "$S/direct.us")
echo "remote cache hits per build: endpoint $(sort -u "$S/endpoint.hits" | tr '\n' ' '), direct $(sort -u "$S/direct.hits" | tr '\n' ' ')"
echo "builds (ms), endpoint: $(awk '{printf "%d ", $1/1000}' "$S/endpoint.us")"
echo "builds (ms), direct:   $(awk '{printf "%d ", $1/1000}' "$S/direct.us")"
pairs=$(paste "$S/endpoint.us" "$S/direct.us" | awk '{printf "%.4f\n", $1/$2}' | median)
echo "wall (median of $R builds of $G+1 cached genrules): endpoint $(awk -v a="$we" 'BEGIN{printf "%.0f", a/1000}') ms, direct $(awk -v a="$wd" 'BEGIN{printf "%.0f", a/1000}') ms, ratio $(awk -v a="$we" -v b="$wd" 'BEGIN{printf "%.3f", a/b}'), median of the $R back-to-back pairs' ratios $pairs (goal <= 1.05); load average $(cut -d' ' -f1-3 /proc/loadavg)"
for mode in endpoint direct host memory; do
  bad=$(awk '$1 != 200' "$S/lat-$mode.txt" | wc -l)
  [ "$bad" = 0 ] || { echo "$mode: $bad GETs did not answer 200"; exit 1; }
  awk '{printf "%.0f\n", $2*1000000}' "$S/lat-$mode.txt" > "$S/lat-$mode.us"
done
p50e=$(pct 50 < "$S/lat-endpoint.us"); p99e=$(pct 99 < "$S/lat-endpoint.us")
p50d=$(pct 50 < "$S/lat-direct.us"); p99d=$(pct 99 < "$S/lat-direct.us")
p50h=$(pct 50 < "$S/lat-host.us"); p99h=$(pct 99 < "$S/lat-host.us")
p50m=$(pct 50 < "$S/lat-memory.us"); p99m=$(pct 99 < "$S/lat-memory.us")
echo "per GET of an action-cache entry over one connection ($M each): the job through its endpoint p50 ${p50e} us p99 ${p99e} us; the job straight to the upstream (through the host's NAT) p50 ${p50d} us p99 ${p99d} us; the host straight to the upstream (the agent's own leg) p50 ${p50h} us p99 ${p99h} us"
echo "added by the endpoint: vs the job straight p50 $((p50e - p50d)) us p99 $((p99e - p99d)) us; vs the agent's own leg p50 $((p50e - p50h)) us p99 $((p99e - p99h)) us (goal p99 <= 1000 us)"
echo "per GET of the tiny CAS blob through the endpoint, from the agent's memory (memory_cache ${MEMORY_CACHE:-64Mi}; with 0 it goes upstream): p50 ${p50m} us p99 ${p99m} us"
echo "agent peak RSS: $(cat "$TMP/measure.rss") KiB serving the measured job, $(cat "$TMP/idle.rss") KiB for a job that runs sleep 2 (the endpoint idle)"
line=$(grep 'bazel cache:' "$TMP/measure.out" || true)
echo "$line"
hits=$(echo "$line" | grep -o '[0-9]* hits' | cut -d' ' -f1)
echo "agent CPU for the measured job: $(cat "$TMP/measure.cpu") ticks of 1/$(getconf CLK_TCK) s (user, system: $(cut -d" " -f2,3 "$TMP/measure.cpusplit"); the job's own setup and teardown included), $(awk -v c="$(cat "$TMP/measure.cpu")" -v t="$(getconf CLK_TCK)" -v h="${hits:-1}" 'BEGIN{printf "%.1f", c/t*1e6/h}') us per request served"
