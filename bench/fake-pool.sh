# Sourced by the `run` benches: builds the release binaries, makes $TMP (cleaned up on exit,
# with the agent in $AGENT_PID stopped), the runner users runner-0..3 (a fixed user is refused
# for a lane of 4) and a runner installation with the fake Runner.Listener in $TMP/install.
# usage: . bench/fake-pool.sh TMP_PARENT NAME
cd "$(dirname "${BASH_SOURCE[0]}")/.."
cargo build --release -q -p flywheel-agent -p fake-runner -p fake-github
T=$PWD/target/release
# FLYWHEEL_AGENT: another build of the agent to measure (e.g. the commit before a change).
AGENT=${FLYWHEEL_AGENT:-$T/flywheel-agent}
mkdir -p "$1"
TMP=$(mktemp -d "$1/flywheel-bench-$2.XXXXXX")
chmod 755 "$TMP"
cleanup() { exec 3>&- 2>/dev/null || true; [ -n "${AGENT_PID:-}" ] && kill "$AGENT_PID" 2>/dev/null; [ -n "${KEEP:-}" ] || rm -rf "$TMP"; }
trap cleanup EXIT
for i in 0 1 2 3; do
  id "runner-$i" >/dev/null 2>&1 || useradd --system --user-group --no-create-home \
    --home-dir /nonexistent --shell /usr/sbin/nologin "runner-$i"
done
mkdir -p "$TMP/install/bin" "$TMP/install/externals"
cp "$T/fake-runner-listener" "$TMP/install/bin/Runner.Listener"

# The [github] and [runner] sections for the fake GitHub at $1, runner names prefixed $2.
github_and_runner_toml() {
  cat <<TOML
[github]
api_url = "$1"
scope = "org"
target = "tinyland"
app_id = "Iv1.flywheeltest"
private_key_file = "$TMP/app.pem"
[runner]
install_dir = "$TMP/install"
user = "runner-{n}"
name_prefix = "$2"
drain_grace = "5s"
TOML
}
