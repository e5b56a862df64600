#!/usr/bin/env bash
# Benchmark: how long teardown's removal of a job's `_work` takes against `rm -rf` of the same
# tree (issue 26, goal <= 1.1x). Each round makes two identical trees (one directory of FILES
# empty files, a few nested directories and symlinks to outside, never followed), drops nothing
# from the page cache, and times `rm -rf` on one and the agent's descriptor walk
# (`workdir::remove_tree`, via `examples/remove-tree.rs`) on the other; prints the medians.
#
# usage: bench/remove-tree.sh [FILES] [ROUNDS]     (any user; a directory under /var/lib)
set -euo pipefail
FILES=${1:-100000}
ROUNDS=${2:-3}
cd "$(dirname "$0")/.."
cargo build -q --release --example remove-tree
BIN=target/release/examples/remove-tree
BASE=${BENCH_DIR:-/var/lib/flywheel-bench}/remove-tree
mkdir -p "$BASE"
make_tree() {
  # The issue's shape (and bench/teardown-stall.sh's job): one directory of FILES files, beside
  # a few nested directories and symlinks to outside.
  mkdir -p "$1/many" "$1/a/b/c"
  (cd "$1/many" && seq 1 "$FILES" | xargs touch && ln -s /etc link)
  ln -s /etc "$1/a/b/c/link"; touch "$1/a/b/c/file"
}
rm_ms=(); agent_ms=()
for r in $(seq 1 "$ROUNDS"); do
  make_tree "$BASE/rm"; make_tree "$BASE/agent"; sync
  t0=$(date +%s%N); rm -rf "$BASE/rm"; t1=$(date +%s%N)
  rm_ms+=("$(( (t1 - t0) / 1000000 ))")
  agent_ms+=("$("$BIN" "$BASE/agent" | cut -d. -f1)")
  echo "round $r: rm -rf ${rm_ms[-1]} ms, remove_tree ${agent_ms[-1]} ms"
done
median() { printf '%s\n' "$@" | sort -n | awk '{ a[NR] = $1 } END { print a[int((NR + 1) / 2)] }'; }
m_rm=$(median "${rm_ms[@]}"); m_agent=$(median "${agent_ms[@]}")
echo "median of $ROUNDS: rm -rf $m_rm ms, remove_tree $m_agent ms, ratio $(awk -v a="$m_agent" -v b="$m_rm" 'BEGIN { printf "%.2f", a / b }')x (goal <= 1.1x)"
rmdir "$BASE" 2>/dev/null || true
