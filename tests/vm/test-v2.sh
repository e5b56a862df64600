#!/usr/bin/env bash
# The envelope's privileged tests and the v2-only tests, inside a VM with a pure cgroup v2
# kernel (tests/vm/run-in-vm.sh as cargo's target runner).
set -euo pipefail
cd "$(dirname "$0")/../.."
export CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUNNER="$PWD/tests/vm/run-in-vm.sh"
exec cargo test -p flywheel-agent --test envelope --test v2 "$@"
