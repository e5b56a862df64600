//! The Bazel remote cache as an acceleration layer, with the real client (Debian's
//! `bazel-bootstrap`) and a real cache (nginx from Debian: reads open, `PUT` behind basic auth)
//! in the tests' "internet" namespace, where both the agent and the jobs reach it: every job
//! reads, only a trusted job's results land, a pull request cannot write by any route, and no
//! way the upstream fails breaks a build.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::bazel::{self as bz, Nginx};
use common::rig::{as_fork_pr, as_push, term, wait_exit, Rig};
use common::{privileged, section, stderr, Fixture};

fn wait_for(path: &Path, secs: u64, log: impl Fn() -> String) {
    common::wait_for_file(path, secs, log);
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// A counter's value in OpenMetrics text (0 when absent).
fn counter(metrics: &str, name: &str, lane: &str, result: &str) -> u64 {
    let want = format!("{name}{{lane=\"{lane}\",result=\"{result}\"}} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&want))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

#[test]
fn a_trusted_push_fills_the_cache_and_a_fork_pull_request_beside_it_reads_but_never_writes() {
    if !privileged("bazel-trust") || !bz::tools("bazel-trust") {
        return;
    }
    let net = common::netns::Internet::new();
    let rig = Rig::new(&[("bz", "3Gi", 2)], "5s");
    let nginx = Nginx::start(&rig.dir.path().join("nginx"), Some(&net.ns), net.remote);
    let cred = bz::credential_file(rig.dir.path(), &nginx);
    let cfg = read(&rig.config).replace(
        "network = \"host\"",
        &format!("network = \"isolated\"\ndns = [\"{}\"]", net.remote),
    );
    std::fs::write(
        &rig.config,
        format!(
            "{cfg}[lane.bazel]\nupstream = \"{}\"\nwrite_credential_file = \"{}\"\n\n[attic]\npublish_repositories = [\"tinyland/flywheel\"]\n",
            nginx.url(bz::CACHE),
            cred.display()
        ),
    )
    .unwrap();
    rig.push_and_fork_pr_runs();
    let shared = common::shared_dir(rig.dir.path());
    let s = shared.display().to_string();
    let ws = bz::workspace(rig.dir.path());
    let poison = "poison-c\n";
    let poison_sha = bz::sha256_hex(poison.as_bytes());
    let forged_ac = bz::sha256_hex(b"an action digest the attacker picked");
    let up = nginx.url(bz::CACHE);

    let mut push = rig.job(
        0,
        &format!(
            r#"ip -4 -o addr show dev eth0 | awk '{{print $4}}' | cut -d/ -f1 > {s}/push.addr
env > {s}/push.env
{build}
touch {s}/push.built
for i in $(seq 1800); do [ -e {s}/pr.done ] && break; sleep 0.1; done"#,
            build = bz::build_lines(&ws, "//:a //:b", None, &shared.join("push.log")),
        ),
    );
    as_push(&mut push);

    let mut pr = rig.job(
        0,
        &format!(
            r#"for i in $(seq 1800); do [ -e {s}/push.built ] && break; sleep 0.1; done
env > {s}/pr.env
{build1}
(cd "$HOME/ws" && {bazel} --batch --output_user_root="$HOME/.bazel" clean > {s}/pr1-clean.log 2>&1) || echo "clean failed: $?" >> {s}/pr1b.log
{build1b}
cp -r {ws} "$HOME/ws2" && chmod -R u+w "$HOME/ws2"
echo 'genrule(name = "c", outs = ["c.txt"], cmd = "printf poison-c\\\\n > $@")' >> "$HOME/ws2/BUILD"
cd "$HOME/ws2"
set +e
{bazel} --batch --output_user_root="$HOME/.bazel" build --remote_cache=$BAZEL_REMOTE_CACHE --spawn_strategy=local //:c > {s}/pr2.log 2>&1
echo "bazel exit $?" >> {s}/pr2.log
printf 'poison-c\n' > {s}/poison
T=$(cat {s}/push.addr)
G=$(ip route | awk '/^default/ {{print $3}}')
{{
echo "attacker at $(ip -4 -o addr show dev eth0 | awk '{{print $4}}') while the trusted job runs: $(test -e {s}/push.built && test ! -e {s}/pr.done && echo yes)"
echo '== upstream cas without a credential'; curl -s -m 10 -o /dev/null -w '%{{http_code}}\n' -X PUT --data-binary @{s}/poison {up}/cas/{poison_sha}
echo '== upstream ac without a credential'; curl -s -m 10 -o /dev/null -w '%{{http_code}}\n' -X PUT --data-binary @{s}/poison {up}/ac/{forged_ac}
echo '== upstream read'; curl -s -m 10 -o /dev/null -w '%{{http_code}}\n' {up}/cas/{hello_a}
echo "== trusted endpoint at its job's address"; curl -s -m 5 -o /dev/null -w '%{{http_code}}\n' -X PUT --data-binary @{s}/poison http://$T:8980/ac/{forged_ac}; echo "curl exit $?"
echo '== trusted endpoint at the gateway'; curl -s -m 5 -o /dev/null -w '%{{http_code}}\n' -X PUT --data-binary @{s}/poison http://$G:8980/ac/{forged_ac}; echo "curl exit $?"
echo '== own endpoint'; curl -s -m 10 -o /dev/null -w '%{{http_code}}\n' -X PUT --data-binary @{s}/poison $BAZEL_REMOTE_CACHE/ac/{forged_ac}
echo '== credential file'; cat {cred}
echo '== credential in the environment'; env | grep -c '^BAZEL_WRITE\|writer:' 
echo '== end'
}} > {s}/attack.log 2>&1
touch {s}/pr.done"#,
            build1 = bz::build_lines(&ws, "//:a //:b", None, &shared.join("pr1.log")),
            build1b = bz::build_lines(&ws, "//:a //:b", None, &shared.join("pr1b.log")),
            ws = ws.display(),
            bazel = bz::BAZEL,
            hello_a = bz::sha256_hex(b"hello-a\n"),
            cred = cred.display(),
        ),
    );
    as_fork_pr(&mut pr);
    rig.gh.push_job(pr);
    rig.gh.push_job(push);

    let agent = rig.start();
    wait_for(&shared.join("push.built"), 300, || rig.log());
    // What the trusted job left upstream, before the pull request ran.
    let (ac_after_push, cas_after_push) = (nginx.entries("ac"), nginx.entries("cas"));
    wait_for(&shared.join("pr.done"), 300, || rig.log());
    // Both completed hooks have answered (their summary lines are in the log).
    let t = Instant::now();
    while rig.log().matches("flywheel: bazel cache: ").count() < 2 {
        assert!(t.elapsed() < Duration::from_secs(60), "{}", rig.log());
        std::thread::sleep(Duration::from_millis(100));
    }
    let metrics_at = common::metrics_address(&rig.log()).expect("metrics address");
    let metrics = common::http_get(&metrics_at, "/metrics");
    term(&agent, nix::sys::signal::Signal::SIGTERM);
    let (code, log) = wait_exit(&rig, agent, Duration::from_secs(60));
    assert_eq!(code, 0, "{log}");

    // The trusted job built, and its results landed upstream.
    let push_log = read(&shared.join("push.log"));
    assert!(push_log.contains("bazel exit 0"), "{push_log}");
    for out in ["hello-a\n", "hello-a\nhello-b\n"] {
        assert!(
            cas_after_push.contains(&bz::sha256_hex(out.as_bytes())),
            "{out:?} not upstream: {cas_after_push:?}\n{push_log}"
        );
    }
    assert!(ac_after_push.len() >= 2, "{ac_after_push:?}");
    // The pull request got hits for what was there, and built its own target.
    let pr1 = read(&shared.join("pr1.log"));
    assert!(
        pr1.contains("bazel exit 0") && pr1.contains("remote cache hit"),
        "{pr1}"
    );
    // Built again from clean, its outputs came from the agent's memory (what the upstream
    // served it the first time, each blob checked against its name), and Bazel, which
    // checks what it downloads, took them.
    let pr1b = read(&shared.join("pr1b.log"));
    assert!(
        pr1b.contains("bazel exit 0") && pr1b.contains("remote cache hit"),
        "{pr1b}"
    );
    let pr2 = read(&shared.join("pr2.log"));
    assert!(pr2.contains("bazel exit 0"), "{pr2}");
    // The attack ran while the trusted job was still busy (its endpoint open).
    let attack = read(&shared.join("attack.log"));
    assert!(
        attack.contains("while the trusted job runs: yes"),
        "{attack}"
    );
    // Its results never landed: not through its own endpoint, not straight upstream.
    assert_eq!(nginx.entries("ac"), ac_after_push, "{attack}");
    assert_eq!(nginx.entries("cas"), cas_after_push, "{attack}");
    assert!(!nginx.entries("cas").contains(&poison_sha));
    // Upstream directly: reached (reads work), writes refused for want of the credential.
    assert_eq!(section(&attack, "upstream read").trim(), "200", "{attack}");
    assert_eq!(
        section(&attack, "upstream cas without a credential").trim(),
        "401",
        "{attack}"
    );
    assert_eq!(
        section(&attack, "upstream ac without a credential").trim(),
        "401",
        "{attack}"
    );
    // The trusted job's endpoint is in another namespace: no address of it answers.
    for route in [
        "trusted endpoint at its job's address",
        "trusted endpoint at the gateway",
    ] {
        let r = section(&attack, route);
        assert!(
            r.contains("000") && !r.contains("curl exit 0"),
            "{route}: {attack}"
        );
    }
    // Its own endpoint answers its writes, and drops them.
    assert_eq!(section(&attack, "own endpoint").trim(), "200", "{attack}");
    assert!(
        section(&attack, "credential file").contains("Permission denied"),
        "{attack}"
    );
    // No write credential in any job, nor in the agent's log.
    for (what, text) in [
        ("attack", attack.as_str()),
        ("push env", &read(&shared.join("push.env"))),
        ("pr env", &read(&shared.join("pr.env"))),
        ("agent log", &log),
    ] {
        assert!(
            !text.contains(&nginx.password),
            "the write credential is in the {what}"
        );
    }
    // Each job's endpoint carries a token of its own as its first path segment.
    let hint = |who: &str| {
        read(&shared.join(format!("{who}.env")))
            .lines()
            .find_map(|l| l.strip_prefix("BAZEL_REMOTE_CACHE=").map(str::to_owned))
            .unwrap_or_default()
    };
    let (push_hint, pr_hint) = (hint("push"), hint("pr"));
    for h in [&push_hint, &pr_hint] {
        let token = h.strip_prefix("http://127.0.0.1:8980/").unwrap_or_default();
        assert!(
            token.len() == 32 && token.bytes().all(|b| b.is_ascii_hexdigit()),
            "{h}"
        );
    }
    assert_ne!(push_hint, pr_hint);
    // What each job was told, and what its summary says.
    assert!(
        log.contains("bazel cache http://127.0.0.1:8980: reads and writes go to the lane's cache"),
        "{log}"
    );
    assert!(
        log.contains("this job's writes are answered and dropped (not a trusted job)"),
        "{log}"
    );
    let pr_line = log
        .lines()
        .find(|l| l.contains("flywheel: bazel cache: ") && l.contains("not a trusted job"))
        .unwrap_or_else(|| panic!("{log}"));
    assert!(!pr_line.contains(" 0 hits"), "{pr_line}");
    assert!(pr_line.contains("from the agent's memory)"), "{pr_line}");
    // And /metrics, by lane.
    let lane = &rig.lanes[0];
    for (name, result, least) in [
        ("reads", "hit", 2),
        ("reads", "hit_memory", 2),
        ("writes", "forwarded", 2),
        ("writes", "dropped", 2),
        ("bytes", "written", 1),
    ] {
        let name = format!("flywheel_bazel_cache_{name}_total");
        assert!(
            counter(&metrics, &name, lane, result) >= least,
            "{name} {result}: {metrics}"
        );
    }
    eprintln!("push: {push_log}\npr: {pr1}\nattack: {attack}\nlines: {pr_line}");
}

#[test]
fn every_way_the_upstream_fails_leaves_the_build_working_and_is_counted() {
    if !privileged("bazel-upstream-failures") || !bz::tools("bazel-upstream-failures") {
        return;
    }
    let net = common::netns::Internet::new();
    let dir = common::open_tempdir("flywheel-bazel");
    let nginx = Nginx::start(&dir.path().join("nginx"), Some(&net.ns), net.remote);
    let cred = bz::credential_file(dir.path(), &nginx);
    let ws = bz::workspace(dir.path());
    let shared = common::shared_dir(dir.path());
    let user = common::runner_pool().replace("{n}", "12");
    for (mode, port) in [
        ("down", 8089),
        ("slow", bz::SLOW),
        ("5xx", bz::FAILS_5XX),
        ("401", bz::FAILS_401),
    ] {
        let f = Fixture::with_tail(
            "bzf",
            "2Gi",
            &format!("network = \"isolated\"\ndns = [\"{}\"]", net.remote),
            &format!(
                "[lane.bazel]\nupstream = \"{}\"\nwrite_credential_file = \"{}\"\ntimeout = \"1s\"\n",
                nginx.url(port),
                cred.display()
            ),
        );
        let log = shared.join(format!("{mode}.log"));
        let summary = shared.join(format!("{mode}.md"));
        let o = f.exec(
            &["--user", &user, "--summary", summary.to_str().unwrap()],
            &["sh", "-c", &bz::build_lines(&ws, "//:a //:b", None, &log)],
        );
        let blog = std::fs::read_to_string(&log).unwrap_or_default();
        assert_eq!(o.status.code(), Some(0), "{mode}: {}\n{blog}", stderr(&o));
        assert!(
            blog.contains("bazel exit 0") && blog.contains("Build completed successfully"),
            "{mode}: {blog}"
        );
        let err = stderr(&o);
        let line = err
            .lines()
            .find(|l| l.contains("flywheel: bazel cache: "))
            .unwrap_or_else(|| panic!("{mode}: {err}"));
        assert!(
            line.contains("upstream failures (the build went on without the cache)"),
            "{mode}: {line}"
        );
        let md = read(&summary);
        assert!(md.contains("### Bazel remote cache"), "{mode}: {md}");
        let warns: Vec<&str> = blog.lines().filter(|l| l.contains("WARNING")).collect();
        eprintln!("{mode}: {line}\n  bazel: {warns:?}");
    }
}

#[test]
fn bazel_settings_are_checked_before_anything_runs() {
    let dir = common::open_tempdir("flywheel-bazel-conf");
    let cred = dir.path().join("w.cred");
    std::fs::write(&cred, "writer:pw\n").unwrap();
    std::fs::set_permissions(&cred, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let conf = dir.path().join("agent.toml");
    for (tail, at, says) in [
        (
            format!("[lane.bazel]\nupstream = \"http://cache.example\"\nwrite_credential_file = \"{}\"\n", cred.display()),
            ":6:25:",
            "mode 0600",
        ),
        ("[lane.bazel]\nupstream = \"grpc://cache.example\"\n".to_owned(), ":5:12:", "http:// or https://"),
        ("network = \"host\"\n[lane.bazel]\nupstream = \"http://x\"\n".to_owned(), ":5:1:", "needs network = \"isolated\""),
    ] {
        std::fs::write(&conf, format!("[[lane]]\nname = \"b\"\nmemory = \"1Gi\"\n{tail}")).unwrap();
        let o = Command::new(common::AGENT)
            .args(["check-config", "--config"])
            .arg(&conf)
            .output()
            .unwrap();
        let e = stderr(&o);
        assert_eq!(o.status.code(), Some(78), "{e}");
        assert!(e.contains(&format!("{}{at}", conf.display())) && e.contains(says), "{e}");
        assert!(!e.contains("writer:pw"), "{e}");
    }
}

#[test]
fn through_real_nginx_a_trusted_jobs_blob_lands_only_under_its_own_hash_and_an_untrusted_jobs_never(
) {
    if !privileged("bazel-blob-names") || !bz::tools("bazel-blob-names") {
        return;
    }
    let net = common::netns::Internet::new();
    let dir = common::open_tempdir("flywheel-bazel-blobs");
    let nginx = Nginx::start(&dir.path().join("nginx"), Some(&net.ns), net.remote);
    let cred = bz::credential_file(dir.path(), &nginx);
    let shared = common::shared_dir(dir.path());
    let s = shared.display();
    let f = Fixture::with_tail(
        "bzb",
        "256Mi",
        &format!("network = \"isolated\"\ndns = [\"{}\"]", net.remote),
        &format!(
            "[lane.bazel]\nupstream = \"{}\"\nwrite_credential_file = \"{}\"\n",
            nginx.url(bz::CACHE),
            cred.display()
        ),
    );
    let user = common::runner_pool().replace("{n}", "13");
    let (good, forged, untrusted) = (
        "a blob under its own name\n",
        "a blob under the name of another\n",
        "a blob of an untrusted job\n",
    );
    let put = |body: &str, name: &str, out: &str| {
        format!(
            "printf '{}' > $HOME/b && curl -s -o /dev/null -w '%{{http_code}}\\n' -X PUT --data-binary @$HOME/b $BAZEL_REMOTE_CACHE/cas/{name} >> {s}/{out}",
            body.replace('\n', "\\n")
        )
    };
    let trusted = format!(
        "{}; {}",
        put(good, &bz::sha256_hex(good.as_bytes()), "trusted"),
        put(
            forged,
            &bz::sha256_hex(good.as_bytes()).replace('a', "b"),
            "trusted"
        ),
    );
    let o = f.exec(&["--user", &user], &["sh", "-c", &trusted]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let o = f.exec(
        &["--user", &user, "--untrusted"],
        &[
            "sh",
            "-c",
            &put(
                untrusted,
                &bz::sha256_hex(untrusted.as_bytes()),
                "untrusted",
            ),
        ],
    );
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    // The writes were made and answered: the good one and the untrusted one 200, the forged 400.
    assert_eq!(read(&shared.join("trusted")), "200\n400\n");
    assert_eq!(read(&shared.join("untrusted")), "200\n");
    assert!(
        stderr(&o).contains("1 writes dropped (not a trusted job)"),
        "{}",
        stderr(&o)
    );
    // Upstream: only the good blob, under its own name, with its bytes.
    let cas = nginx.entries("cas");
    assert_eq!(cas, vec![bz::sha256_hex(good.as_bytes())]);
    assert_eq!(read(&nginx.root.join("cas").join(&cas[0])), good);
}

/// A cache that takes writes without credentials can be written by anything that reaches it:
/// a fork's pull request writes its action results straight to it, past its endpoint. A
/// trusted job of a lane pointed at it is then served none of it and writes nothing to it,
/// and says why.
#[test]
fn a_cache_that_takes_writes_without_credentials_is_used_by_no_job() {
    if !privileged("bazel-open-upstream") || !bz::tools("bazel-open-upstream") {
        return;
    }
    let net = common::netns::Internet::new();
    let dir = common::open_tempdir("flywheel-bazel-open");
    let nginx = Nginx::start(&dir.path().join("nginx"), Some(&net.ns), net.remote);
    let cred = bz::credential_file(dir.path(), &nginx);
    let ws = bz::workspace(dir.path());
    let shared = common::shared_dir(dir.path());
    let f = Fixture::with_tail(
        "bzo",
        "2Gi",
        &format!("network = \"isolated\"\ndns = [\"{}\"]", net.remote),
        &format!(
            "[lane.bazel]\nupstream = \"{}\"\nwrite_credential_file = \"{}\"\n",
            nginx.url(bz::OPEN),
            cred.display()
        ),
    );
    let user = common::runner_pool().replace("{n}", "14");
    // The attack runs: the pull request's build writes its results straight to the cache.
    let pr_log = shared.join("pr.log");
    let o = f.exec(
        &["--user", &user, "--untrusted"],
        &[
            "sh",
            "-c",
            &bz::build_lines(&ws, "//:a //:b", Some(&nginx.url(bz::OPEN)), &pr_log),
        ],
    );
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    // Its action results (the agent's own probe, an empty one, is not among them).
    let open_ac = nginx.root.with_file_name("open").join("ac");
    let pr_ac: Vec<String> = nginx
        .open_entries("ac")
        .into_iter()
        .filter(|h| std::fs::metadata(open_ac.join(h)).is_ok_and(|m| m.len() > 0))
        .collect();
    // What a build straight at this cache gets: the pull request's action results.
    let straight_log = shared.join("straight.log");
    let o = f.exec(
        &["--user", &user, "--untrusted"],
        &[
            "sh",
            "-c",
            &bz::build_lines(&ws, "//:a //:b", Some(&nginx.url(bz::OPEN)), &straight_log),
        ],
    );
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(
        read(&straight_log).contains("2 remote cache hit"),
        "the poisoned entries are there to be served: {}",
        read(&straight_log)
    );
    let open_root = nginx.root.with_file_name("open");
    let stamps = || -> Vec<(String, std::time::SystemTime)> {
        let mut v = Vec::new();
        for k in ["ac", "cas"] {
            for h in nginx.open_entries(k) {
                let p = format!("{k}/{h}");
                let m = std::fs::metadata(open_root.join(&p))
                    .unwrap()
                    .modified()
                    .unwrap();
                v.push((p, m));
            }
        }
        v
    };
    let before = stamps();
    assert_eq!(
        pr_ac.len(),
        2,
        "the pull request's action results landed: {}",
        read(&pr_log)
    );
    // A trusted job would now be served them (2 hits) through an endpoint that passed reads on.
    let main_log = shared.join("main.log");
    let summary = shared.join("main.md");
    let o = f.exec(
        &["--user", &user, "--summary", summary.to_str().unwrap()],
        &[
            "sh",
            "-c",
            &bz::build_lines(&ws, "//:a //:b", None, &main_log),
        ],
    );
    let (err, blog) = (stderr(&o), read(&main_log));
    assert_eq!(o.status.code(), Some(0), "{err}\n{blog}");
    assert!(blog.contains("bazel exit 0"), "{blog}");
    assert!(
        !blog.contains("remote cache hit"),
        "the trusted build was served the pull request's entries: {blog}"
    );
    assert!(
        err.contains("took a write without credentials"),
        "the agent says why: {err}"
    );
    assert!(
        err.contains("not used: the lane's cache takes writes without credentials"),
        "{err}"
    );
    assert!(
        read(&summary).contains("> [!CAUTION]"),
        "{}",
        read(&summary)
    );
    // Nothing of the trusted job reached the cache: every entry the PR left is as it was (a
    // write of the same key would have replaced it), and the new entries are the agent's
    // probes (a CAS blob under its own hash, an empty action result).
    let after = stamps();
    let mut new: Vec<_> = after.iter().filter(|e| !before.contains(e)).collect();
    new.sort();
    assert_eq!(new.len(), 2, "before {before:?}\nafter {after:?}");
    assert!(new[0].0.starts_with("ac/"), "{new:?}");
    assert_eq!(read(&open_root.join(&new[0].0)), "");
    let probe = &new[1].0;
    let body = read(&open_root.join(probe));
    assert!(body.starts_with("flywheel-agent: "), "{probe}: {body}");
    assert_eq!(*probe, format!("cas/{}", bz::sha256_hex(body.as_bytes())));
    assert!(before.iter().all(|e| after.contains(e)));
    // The credentialed cache of the same nginx was never touched.
    assert!(nginx.entries("ac").is_empty() && nginx.entries("cas").is_empty());
}

#[test]
fn in_an_arc_pods_own_network_the_endpoint_is_the_pods_and_a_pool_refuses_that_network() {
    if !privileged("bazel-pod-network") || !bz::tools("bazel-pod-network") {
        return;
    }
    // The "pod": the namespace the upstream runs in stands for a pod's own network, where the
    // agent (its entrypoint) and its one job run.
    let net = common::netns::Internet::new();
    let dir = common::open_tempdir("flywheel-bazel-pod");
    let nginx = Nginx::start(&dir.path().join("nginx"), Some(&net.ns), net.remote);
    let cred = bz::credential_file(dir.path(), &nginx);
    let shared = common::shared_dir(dir.path());
    let f = Fixture::with_tail(
        "bzp",
        "256Mi",
        "network = \"pod\"",
        &format!(
            "[lane.bazel]\nupstream = \"{}\"\nwrite_credential_file = \"{}\"\n",
            nginx.url(bz::CACHE),
            cred.display()
        ),
    );
    let user = common::runner_pool().replace("{n}", "14");
    let blob = "a blob written from a pod\n";
    let name = bz::sha256_hex(blob.as_bytes());
    let out = shared.join("pod");
    let script = format!(
        "echo $BAZEL_REMOTE_CACHE > {o}; printf 'a blob written from a pod\\n' > $HOME/b && curl -s -o /dev/null -w '%{{http_code}}\\n' -X PUT --data-binary @$HOME/b $BAZEL_REMOTE_CACHE/cas/{name} >> {o}; curl -s -o /dev/null -w '%{{http_code}}\\n' $BAZEL_REMOTE_CACHE/cas/{name} >> {o}",
        o = out.display()
    );
    let c = f.exec_cmd(&["--user", &user], &["sh", "-c", &script]);
    let mut in_pod = Command::new("nsenter");
    in_pod
        .arg(format!("--net=/run/netns/{}", net.ns))
        .arg(c.get_program())
        .args(c.get_args());
    for (k, v) in c.get_envs() {
        if let Some(v) = v {
            in_pod.env(k, v);
        }
    }
    let o = in_pod.output().unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    // The job's endpoint was on the pod's loopback: its write went up with the agent's
    // credential (the job holds none) and its read came back through it.
    let said = read(&out);
    let (hint, answers) = said.split_once('\n').unwrap();
    let token = hint
        .strip_prefix("http://127.0.0.1:8980/")
        .unwrap_or_default();
    assert!(
        token.len() == 32 && token.bytes().all(|b| b.is_ascii_hexdigit()),
        "the job's endpoint carries its own first path segment: {said}"
    );
    assert_eq!(answers, "200\n200\n");
    assert_eq!(nginx.entries("cas"), vec![name.clone()]);
    assert_eq!(read(&nginx.root.join("cas").join(&name)), blob);
    // A pool of runners would share that network: `run` refuses it before anything runs.
    let o = Command::new(common::AGENT)
        .args(["run", "--config"])
        .arg(&f.config)
        .env_remove("ACTIONS_RUNNER_INPUT_JITCONFIG")
        .output()
        .unwrap();
    let e = stderr(&o);
    assert_eq!(o.status.code(), Some(78), "{e}");
    assert!(
        e.contains("network = \"pod\", the network of an ARC runner pod"),
        "{e}"
    );
}
