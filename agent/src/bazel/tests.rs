//! The endpoint against an upstream that keeps what it is given (PUT behind basic auth, as
//! the tests' nginx and bazel-remote with `--htpasswd_file` do), and each way an upstream
//! fails; the configuration's errors; the credential files.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sha2::{Digest, Sha256};

use super::*;
use crate::config::{parse, HostFacts, Origin};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Good,
    ServerError,
    Denied,
    /// Writes taken without a credential (the misconfiguration the agent refuses to use).
    Open,
    /// CAS writes need the credential, action-cache writes do not.
    AcOpen,
    /// Every write without a credential is answered 429 (a rate limit), not refused.
    RateLimited,
}

#[derive(Debug, Default)]
struct Store {
    blobs: HashMap<String, Vec<u8>>,
    puts: u32,
    /// `PUT`s without a credential, whatever was answered.
    anonymous_puts: u32,
}

/// `user:password` the upstream takes for writes (base64 in the header).
const WRITER: &str = "writer:s3cret-w";

async fn upstream(mode: Mode) -> (String, Arc<Mutex<Store>>) {
    use axum::http::{HeaderMap, Method, StatusCode, Uri};
    let store = Arc::new(Mutex::new(Store::default()));
    let st = store.clone();
    let app = axum::Router::new().fallback(
        move |method: Method, uri: Uri, headers: HeaderMap, body: axum::body::Bytes| {
            let st = st.clone();
            async move {
                match mode {
                    Mode::ServerError => return (StatusCode::SERVICE_UNAVAILABLE, Vec::new()),
                    Mode::Denied => return (StatusCode::UNAUTHORIZED, Vec::new()),
                    Mode::Good | Mode::Open | Mode::AcOpen | Mode::RateLimited => {}
                }
                let mut s = st.lock().unwrap();
                match method {
                    Method::GET => match s.blobs.get(uri.path()) {
                        Some(b) => (StatusCode::OK, b.clone()),
                        None => (StatusCode::NOT_FOUND, Vec::new()),
                    },
                    Method::PUT => {
                        use base64::Engine;
                        let want = format!(
                            "Basic {}",
                            base64::engine::general_purpose::STANDARD.encode(WRITER)
                        );
                        let anonymous = headers.get("authorization").is_none();
                        if anonymous {
                            s.anonymous_puts += 1;
                        }
                        let open = mode == Mode::Open
                            || (mode == Mode::AcOpen && uri.path().starts_with("/ac/"));
                        if mode == Mode::RateLimited && anonymous {
                            return (StatusCode::TOO_MANY_REQUESTS, Vec::new());
                        }
                        if !open
                            && headers.get("authorization").and_then(|v| v.to_str().ok())
                                != Some(want.as_str())
                        {
                            return (StatusCode::UNAUTHORIZED, Vec::new());
                        }
                        s.puts += 1;
                        s.blobs.insert(uri.path().to_owned(), body.to_vec());
                        (StatusCode::CREATED, Vec::new())
                    }
                    _ => (StatusCode::METHOD_NOT_ALLOWED, Vec::new()),
                }
            }
        },
    );
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        let _ = axum::serve(l, app).await;
    });
    (format!("http://{addr}"), store)
}

fn settings(upstream: &str) -> BazelSettings {
    BazelSettings {
        upstream: upstream.to_owned(),
        read_credential_file: None,
        write_credential_file: None,
        port: 0,
        max_blob_bytes: 1 << 20,
        timeout: Duration::from_millis(400),
        // Off unless a test is about it: every read goes upstream.
        memory_cache_bytes: 0,
        read_at: None,
        write_at: None,
    }
}

/// An endpoint on the host's loopback (the namespace part is `tests/bazel.rs`'s).
fn endpoint_for(up: &str, write: Option<&str>, trusted: bool) -> (Arc<JobCache>, String) {
    endpoint_with(up, write, trusted, None)
}

fn endpoint_with(
    up: &str,
    write: Option<&str>,
    trusted: bool,
    telemetry: Option<Arc<crate::telemetry::Telemetry>>,
) -> (Arc<JobCache>, String) {
    let u = Upstream::with_credentials(
        "l",
        &settings(up),
        None,
        write.map(|w| Secret::new(w.to_owned())),
    )
    .unwrap();
    let c = JobCache::new(u, telemetry);
    if trusted {
        c.allow_writes();
    }
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    c.serve(l, &crate::tasks::Background::new()).unwrap();
    let base = format!("http://{addr}{}", c.base_path());
    (c, base)
}

fn sha(b: &[u8]) -> String {
    Sha256::digest(b)
        .iter()
        .map(|x| format!("{x:02x}"))
        .collect()
}

async fn put(base: &str, path: &str, body: Vec<u8>) -> u16 {
    reqwest::Client::new()
        .put(format!("{base}{path}"))
        .body(body)
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

async fn get(base: &str, path: &str) -> (u16, Vec<u8>) {
    let r = reqwest::get(format!("{base}{path}")).await.unwrap();
    let s = r.status().as_u16();
    (s, r.bytes().await.unwrap().to_vec())
}

#[tokio::test]
async fn an_untrusted_jobs_writes_are_answered_and_never_reach_the_upstream() {
    let (up, store) = upstream(Mode::Good).await;
    let (c, ep) = endpoint_for(&up, Some(WRITER), false);
    let blob = b"pr output".to_vec();
    let ac = format!("/ac/{}", sha(b"some action"));
    assert_eq!(
        put(&ep, &format!("/cas/{}", sha(&blob)), blob.clone()).await,
        200
    );
    assert_eq!(put(&ep, &ac, b"poisoned action result".to_vec()).await, 200);
    let t = c.tally();
    assert_eq!((t.writes_dropped, t.writes, t.trusted), (2, 0, false));
    let s = store.lock().unwrap();
    assert_eq!(
        (s.puts, s.blobs.len()),
        (0, 0),
        "nothing reached the upstream"
    );
}

#[tokio::test]
async fn a_trusted_jobs_writes_go_upstream_with_the_agents_credential_and_are_read_back() {
    let (up, store) = upstream(Mode::Good).await;
    let (c, ep) = endpoint_for(&up, Some(WRITER), true);
    let blob: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let cas = format!("/cas/{}", sha(&blob));
    let ac = format!("/ac/{}", sha(b"an action"));
    assert_eq!(put(&ep, &cas, blob.clone()).await, 200);
    assert_eq!(put(&ep, &ac, b"action result".to_vec()).await, 200);
    assert_eq!(store.lock().unwrap().blobs.get(&cas), Some(&blob));
    assert_eq!(get(&ep, &cas).await, (200, blob.clone()));
    assert_eq!(get(&ep, &ac).await, (200, b"action result".to_vec()));
    assert_eq!(get(&ep, &format!("/cas/{}", sha(b"absent"))).await.0, 404);
    let t = c.tally();
    assert_eq!((t.writes, t.hits, t.misses), (2, 2, 1));
    assert_eq!(t.bytes_written, blob.len() as u64 + 13);
    assert_eq!(t.bytes_read, blob.len() as u64 + 13);
}

#[tokio::test]
async fn an_upstream_that_takes_writes_without_credentials_is_used_by_no_job() {
    let (up, store) = upstream(Mode::Open).await;
    // The attack runs: a write with no credential, straight to the upstream, is taken.
    let poisoned = format!("/ac/{}", sha(b"an action main will run"));
    assert_eq!(
        put(&up, &poisoned, b"poisoned action result".to_vec()).await,
        201
    );
    assert!(store.lock().unwrap().blobs.contains_key(&poisoned));
    let (c, ep) = endpoint_for(&up, Some(WRITER), true);
    // The trusted job is not served the poisoned entry, and its writes are not forwarded.
    assert_eq!(get(&ep, &poisoned).await.0, 404);
    let blob = b"main's output".to_vec();
    let cas = format!("/cas/{}", sha(&blob));
    assert_eq!(put(&ep, &cas, blob).await, 200);
    let t = c.tally();
    assert_eq!(t.unused, Some(Unused::Open), "{t:?}");
    assert_eq!((t.hits, t.misses, t.writes, t.writes_dropped), (0, 1, 0, 1));
    assert_eq!(t.upstream_failures, 2);
    let s = store.lock().unwrap();
    assert!(
        !s.blobs.contains_key(&cas),
        "the trusted write went nowhere"
    );
    // What the agent wrote is its probes alone: a CAS blob under its own hash and an empty
    // action result under a random key.
    let mut probes: Vec<_> = s.blobs.iter().filter(|(k, _)| **k != poisoned).collect();
    probes.sort();
    assert_eq!(probes.len(), 2, "{:?}", s.blobs.keys());
    assert!(probes[0].0.starts_with("/ac/") && probes[0].1.is_empty());
    assert_eq!(*probes[1].0, format!("/cas/{}", sha(probes[1].1)));
    assert!(crate::summary::bazel_section(&t).contains("[!CAUTION]"));
    assert!(crate::summary::bazel_line(&t).contains("not used"));
    assert!(
        c.started_line().contains("not used"),
        "{}",
        c.started_line()
    );
}

#[tokio::test]
async fn an_upstream_that_refuses_writes_without_credentials_is_asked_once_and_used() {
    let (up, store) = upstream(Mode::Good).await;
    let (c, ep) = endpoint_for(&up, Some(WRITER), true);
    let blob = b"main's output".to_vec();
    let cas = format!("/cas/{}", sha(&blob));
    assert_eq!(put(&ep, &cas, blob.clone()).await, 200);
    assert_eq!(get(&ep, &cas).await, (200, blob));
    for _ in 0..20 {
        assert_eq!(get(&ep, &cas).await.0, 200);
    }
    let t = c.tally();
    assert_eq!(t.unused, None);
    assert_eq!((t.hits, t.writes, t.upstream_failures), (21, 1, 0));
    assert_eq!(c.shared.upstream.guard_now(), (Guard::Refuses, true));
    let s = store.lock().unwrap();
    assert_eq!(s.blobs.len(), 1, "only the job's blob");
    assert_eq!(s.anonymous_puts, 2, "asked once (one CAS and one AC probe)");
}

/// An upstream is used only when it refuses both anonymous probes: one that keeps the action
/// cache open (the entries that point a build at any blob), or that answers a rate limit
/// instead of a refusal, is used by no job, and the job says why.
#[tokio::test]
async fn an_upstream_that_does_not_refuse_both_probes_is_used_by_no_job() {
    for (mode, unused, label) in [
        (Mode::AcOpen, Unused::Open, "open_to_anonymous_writes"),
        (Mode::RateLimited, Unused::Unverified, "unverified"),
    ] {
        let t = Arc::new(crate::telemetry::Telemetry::new(&[], "pool"));
        let (up, store) = upstream(mode).await;
        // The attack runs (AcOpen): an anonymous action result is taken.
        let ac = format!("/ac/{}", sha(b"an action"));
        let direct = put(&up, &ac, b"poisoned".to_vec()).await;
        assert_eq!(
            direct,
            if mode == Mode::AcOpen { 201 } else { 429 },
            "{mode:?}"
        );
        let (c, ep) = endpoint_with(&up, Some(WRITER), true, Some(t.clone()));
        assert_eq!(get(&ep, &ac).await.0, 404, "{mode:?}: not served");
        let blob = b"main's output".to_vec();
        let cas = format!("/cas/{}", sha(&blob));
        assert_eq!(put(&ep, &cas, blob).await, 200, "{mode:?}");
        let tally = c.tally();
        assert_eq!(tally.unused, Some(unused), "{mode:?}");
        assert_eq!((tally.hits, tally.writes, tally.writes_dropped), (0, 0, 1));
        assert!(!store.lock().unwrap().blobs.contains_key(&cas), "{mode:?}");
        assert!(
            crate::summary::bazel_line(&tally).contains("not used"),
            "{mode:?}"
        );
        let m = t.encode();
        let line = format!(
            "flywheel_bazel_cache_upstream_failures_total{{lane=\"l\",result=\"{label}\"}} 2"
        );
        assert!(m.contains(&line), "{line}\n{m}");
        assert!(
            c.started_line().contains("not used"),
            "{}",
            c.started_line()
        );
    }
}

#[tokio::test]
async fn a_cas_blob_read_once_is_answered_from_memory_and_an_action_result_never_is() {
    let (up, store) = upstream(Mode::Good).await;
    let blob = b"an output".to_vec();
    let cas = format!("/cas/{}", sha(&blob));
    let ac = format!("/ac/{}", sha(b"an action"));
    let lie = format!("/cas/{}", sha(b"what the name says"));
    {
        let mut s = store.lock().unwrap();
        s.blobs.insert(cas.clone(), blob.clone());
        s.blobs.insert(ac.clone(), b"result 1".to_vec());
        s.blobs.insert(lie.clone(), b"something else".to_vec());
    }
    // Two jobs of the lane: the second reads what the first read, from the agent's memory.
    let on = BazelSettings {
        memory_cache_bytes: super::conf::DEFAULT_MEMORY_CACHE,
        ..settings(&up)
    };
    let u = Upstream::with_credentials("l", &on, None, None).unwrap();
    let job = |u: &Arc<Upstream>| {
        let c = JobCache::new(u.clone(), None);
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let base = format!("http://{}{}", l.local_addr().unwrap(), c.base_path());
        c.serve(l, &crate::tasks::Background::new()).unwrap();
        (c, base)
    };
    let (first, a) = job(&u);
    assert_eq!(get(&a, &cas).await, (200, blob.clone()));
    assert_eq!(get(&a, &ac).await, (200, b"result 1".to_vec()));
    // A blob that does not hash to its name is passed on as the upstream served it (Bazel
    // checks what it downloads), and never kept.
    assert_eq!(get(&a, &lie).await, (200, b"something else".to_vec()));
    assert_eq!(first.tally().from_memory, 0);
    // Gone from the upstream, replaced there: the blob comes from memory, the action result
    // and the lie from the upstream as it is now.
    {
        let mut s = store.lock().unwrap();
        s.blobs.remove(&cas);
        s.blobs.insert(ac.clone(), b"result 2".to_vec());
        s.blobs.remove(&lie);
    }
    let (second, b) = job(&u);
    assert_eq!(get(&b, &cas).await, (200, blob.clone()));
    let head = reqwest::Client::new()
        .head(format!("{b}{cas}"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        (
            head.status().as_u16(),
            head.headers()
                .get("content-length")
                .and_then(|v| v.to_str().ok())
        ),
        (200, Some(blob.len().to_string().as_str()))
    );
    assert_eq!(get(&b, &ac).await, (200, b"result 2".to_vec()));
    assert_eq!(get(&b, &lie).await.0, 404);
    let t = second.tally();
    assert_eq!((t.hits, t.from_memory, t.misses), (3, 2, 1));
    assert_eq!(t.bytes_read, blob.len() as u64 + 8);
    // Once the upstream is found open to anonymous writes, nothing is read through the
    // agent, not even a kept blob (the guard comes first).
    {
        let mut g = u.guard.lock().unwrap();
        *g = super::guard::GuardState::answered(Guard::Open("took a write".into()));
    }
    let (fourth, d) = job(&u);
    assert_eq!(get(&d, &cas).await.0, 404);
    let t = fourth.tally();
    assert_eq!((t.hits, t.from_memory, t.misses), (0, 0, 1));
    assert_eq!(t.unused, Some(Unused::Open));
    // Off: every read goes to the upstream.
    let off = Upstream::with_credentials(
        "l",
        &BazelSettings {
            memory_cache_bytes: 0,
            ..settings(&up)
        },
        None,
        None,
    )
    .unwrap();
    store
        .lock()
        .unwrap()
        .blobs
        .insert(cas.clone(), blob.clone());
    let (third, c) = job(&off);
    assert_eq!(get(&c, &cas).await, (200, blob.clone()));
    store.lock().unwrap().blobs.remove(&cas);
    assert_eq!(get(&c, &cas).await.0, 404);
    assert_eq!(third.tally().from_memory, 0);
}

#[tokio::test]
async fn a_blob_that_does_not_hash_to_its_name_never_completes_upstream() {
    let (up, store) = upstream(Mode::Good).await;
    let (c, ep) = endpoint_for(&up, Some(WRITER), true);
    let blob: Vec<u8> = vec![7; 200_000];
    let name = format!("/cas/{}", sha(b"something else"));
    // The attack runs: a trusted job's (say, a compromised step's) write under a wrong name.
    let status = put(&ep, &name, blob).await;
    assert_eq!(status, 400);
    assert_eq!(c.tally().writes_refused, 1);
    let s = store.lock().unwrap();
    assert!(s.blobs.is_empty(), "the upstream kept {:?}", s.blobs.keys());
}

#[tokio::test]
async fn without_a_write_credential_even_a_trusted_jobs_writes_are_dropped() {
    let (up, store) = upstream(Mode::Good).await;
    let (c, ep) = endpoint_for(&up, None, true);
    let blob = b"x".to_vec();
    assert_eq!(put(&ep, &format!("/cas/{}", sha(&blob)), blob).await, 200);
    assert_eq!(c.tally().writes_dropped, 1);
    assert_eq!(store.lock().unwrap().puts, 0);
}

#[tokio::test]
async fn every_way_the_upstream_fails_is_a_miss_or_a_dropped_write_and_is_counted() {
    let blob = b"b".to_vec();
    let cas = format!("/cas/{}", sha(&blob));
    // 5xx and 401.
    for mode in [Mode::ServerError, Mode::Denied] {
        let (up, _) = upstream(mode).await;
        let (c, ep) = endpoint_for(&up, Some(WRITER), true);
        assert_eq!(get(&ep, &cas).await.0, 404, "{mode:?}");
        assert_eq!(put(&ep, &cas, blob.clone()).await, 200, "{mode:?}");
        let t = c.tally();
        assert_eq!(
            (t.misses, t.writes_dropped, t.upstream_failures),
            (1, 1, 2),
            "{mode:?}"
        );
    }
    // Down: nothing listens there.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let down = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let (c, ep) = endpoint_for(&down, Some(WRITER), true);
    assert_eq!(get(&ep, &cas).await.0, 404);
    assert_eq!(put(&ep, &cas, blob.clone()).await, 200);
    assert_eq!(c.tally().upstream_failures, 2);
    // Slow: it accepts and never answers; the endpoint answers within its timeout.
    let slow = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let slow_url = format!("http://{}", slow.local_addr().unwrap());
    let (c, ep) = endpoint_for(&slow_url, Some(WRITER), true);
    let t0 = std::time::Instant::now();
    assert_eq!(get(&ep, &cas).await.0, 404);
    assert!(t0.elapsed() < Duration::from_secs(3), "{:?}", t0.elapsed());
    assert_eq!(c.tally().upstream_failures, 1);
    drop(slow);
}

#[tokio::test]
async fn writes_are_dropped_until_job_started_allows_them_and_metrics_name_each_failure() {
    let t = Arc::new(crate::telemetry::Telemetry::new(&[], "pool"));
    let (up, store) = upstream(Mode::Good).await;
    let (c, ep) = endpoint_with(&up, Some(WRITER), false, Some(t.clone()));
    let (a, b) = (b"before".to_vec(), b"after".to_vec());
    assert_eq!(put(&ep, &format!("/cas/{}", sha(&a)), a.clone()).await, 200);
    c.allow_writes();
    assert_eq!(put(&ep, &format!("/cas/{}", sha(&b)), b.clone()).await, 200);
    let keys: Vec<String> = store.lock().unwrap().blobs.keys().cloned().collect();
    assert_eq!(keys, vec![format!("/cas/{}", sha(&b))]);
    assert_eq!(get(&ep, &format!("/cas/{}", sha(&b))).await.0, 200);
    // Each way an upstream fails, by name.
    for (mode, label) in [(Mode::ServerError, "5xx"), (Mode::Denied, "denied")] {
        let (up, _) = upstream(mode).await;
        let (_c, ep) = endpoint_with(&up, Some(WRITER), true, Some(t.clone()));
        assert_eq!(
            get(&ep, &format!("/cas/{}", sha(&a))).await.0,
            404,
            "{label}"
        );
    }
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let down = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let (_c, ep) = endpoint_with(&down, Some(WRITER), true, Some(t.clone()));
    assert_eq!(get(&ep, &format!("/cas/{}", sha(&a))).await.0, 404);
    let slow = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let slow_url = format!("http://{}", slow.local_addr().unwrap());
    let (_c, ep) = endpoint_with(&slow_url, Some(WRITER), true, Some(t.clone()));
    assert_eq!(get(&ep, &format!("/cas/{}", sha(&a))).await.0, 404);
    let m = t.encode();
    for line in [
        "flywheel_bazel_cache_writes_total{lane=\"l\",result=\"dropped\"} 1",
        "flywheel_bazel_cache_writes_total{lane=\"l\",result=\"forwarded\"} 1",
        "flywheel_bazel_cache_reads_total{lane=\"l\",result=\"hit\"} 1",
        "flywheel_bazel_cache_bytes_total{lane=\"l\",result=\"written\"} 5",
        "flywheel_bazel_cache_upstream_failures_total{lane=\"l\",result=\"5xx\"} 1",
        "flywheel_bazel_cache_upstream_failures_total{lane=\"l\",result=\"denied\"} 1",
        "flywheel_bazel_cache_upstream_failures_total{lane=\"l\",result=\"down\"} 1",
        "flywheel_bazel_cache_upstream_failures_total{lane=\"l\",result=\"slow\"} 1",
    ] {
        assert!(m.contains(line), "{line}\n{m}");
    }
    drop(slow);
}

#[tokio::test]
async fn anything_but_ac_and_cas_by_sha256_is_not_found_and_not_forwarded() {
    let (up, store) = upstream(Mode::Good).await;
    let (c, ep) = endpoint_for(&up, Some(WRITER), true);
    for p in [
        "/",
        "/ac/../cas/x",
        "/cas/ABC",
        "/other/0000",
        &format!("/cas/{}x", sha(b"")),
    ] {
        assert_eq!(get(&ep, p).await.0, 404, "{p}");
        assert_eq!(put(&ep, p, b"x".to_vec()).await, 404, "{p}");
    }
    // Without the job's own first segment, or with another, nothing is served either.
    let root = ep.rsplit_once('/').unwrap().0.to_owned();
    let name = format!("/cas/{}", sha(b"x"));
    for base in [root.clone(), format!("{root}/{}", "0".repeat(32))] {
        assert_eq!(get(&base, &name).await.0, 404, "{base}");
        assert_eq!(put(&base, &name, b"x".to_vec()).await, 404, "{base}");
    }
    assert_eq!(store.lock().unwrap().puts, 0);
    assert_eq!(
        c.tally(),
        Tally {
            trusted: true,
            can_write: true,
            ..Tally::default()
        }
    );
}

#[test]
fn writes_that_go_nowhere_are_read_at_the_budgets_pace_after_a_burst() {
    let b = Budget::new(1 << 20, 2 << 20);
    let t0 = std::time::Instant::now();
    let at = |ms: u64| t0 + Duration::from_millis(ms);
    // The burst passes at once.
    assert_eq!(b.take(1 << 20, at(0)), Duration::ZERO);
    assert_eq!(b.take(1 << 20, at(0)), Duration::ZERO);
    // Then each MiB owes a second, less what time has refilled.
    assert_eq!(b.take(1 << 20, at(0)), Duration::from_secs(1));
    assert_eq!(b.take(1 << 19, at(1000)), Duration::from_millis(500));
    // Idle time saves up to the burst, no more.
    assert_eq!(b.take(2 << 20, at(60_000)), Duration::ZERO);
    assert_eq!(b.take(1 << 20, at(60_000)), Duration::from_secs(1));
}

#[tokio::test]
async fn a_flood_of_writes_that_go_nowhere_is_read_no_faster_than_its_budget() {
    let (up, _store) = upstream(Mode::Good).await;
    let (c, ep) = endpoint_for(&up, Some(WRITER), false);
    // This job has spent its burst and 47 MiB more: its next MiB waits for 48 MiB of pace,
    // 0.75 s at 64 MiB/s.
    let now = std::time::Instant::now();
    assert_eq!(
        c.shared.dropped_budget.take(DROPPED_BYTES_PER_SEC, now),
        Duration::ZERO
    );
    assert!(c.shared.dropped_budget.take(47 << 20, now) > Duration::ZERO);
    let blob = vec![1u8; 1 << 20];
    assert_eq!(put(&ep, &format!("/cas/{}", sha(&blob)), blob).await, 200);
    let took = now.elapsed();
    let owed = Duration::from_secs_f64((48 << 20) as f64 / DROPPED_BYTES_PER_SEC as f64);
    assert!(took >= owed.mul_f64(0.9), "{took:?} < {owed:?}");
    assert_eq!(c.tally().writes_dropped, 1);
}

/// Bazel keeps up to `--remote_max_connections` (100 by default) connections open to the
/// cache at once, each one request at a time: all of them are served.
#[tokio::test]
async fn as_many_connections_as_bazel_keeps_open_are_all_served() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (up, store) = upstream(Mode::Good).await;
    let blob = b"an output".to_vec();
    let cas = format!("/cas/{}", sha(&blob));
    store.lock().unwrap().blobs.insert(cas.clone(), blob);
    let (_c, ep) = endpoint_for(&up, Some(WRITER), false);
    let (addr, base) = {
        let rest = ep.strip_prefix("http://").unwrap();
        let (a, b) = rest.split_once('/').unwrap();
        (a.to_owned(), format!("/{b}"))
    };
    let mut held = Vec::new();
    for i in 0..101 {
        let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
        let req = format!("GET {base}{cas} HTTP/1.1\r\nHost: x\r\n\r\n");
        s.write_all(req.as_bytes()).await.unwrap();
        let mut buf = vec![0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .unwrap_or_else(|_| panic!("connection {i} was not answered"))
            .unwrap();
        assert!(
            buf[..n].starts_with(b"HTTP/1.1 200"),
            "connection {i}: {}",
            String::from_utf8_lossy(&buf[..n])
        );
        held.push(s);
    }
}

#[test]
fn a_large_trusted_write_gets_time_for_its_size() {
    let t = Duration::from_secs(10);
    assert_eq!(proxy::write_deadline(t, 4096), Duration::from_secs(60));
    assert_eq!(
        proxy::write_deadline(t, 1 << 30),
        Duration::from_secs(60 + 1024)
    );
}

#[test]
fn keys_are_ac_or_cas_and_lowercase_sha256() {
    let h = sha(b"");
    let t = "0123456789abcdef0123456789abcdef";
    let key = |p: &str| proxy::key(p, t).map(|(k, h)| (k, h.to_owned()));
    assert_eq!(key(&format!("/{t}/ac/{h}")), Some(("ac", h.clone())));
    assert_eq!(key(&format!("/{t}/cas/{h}")), Some(("cas", h.clone())));
    assert_eq!(key(&format!("/{t}/cas/{}", h.to_uppercase())), None);
    assert_eq!(key(&format!("/{t}/x/cas/{h}")), None);
    assert_eq!(key(&format!("/{t}/cas/")), None);
    assert_eq!(key(&format!("/cas/{h}")), None, "no token");
    assert_eq!(
        key(&format!("/{}/cas/{h}", "f".repeat(32))),
        None,
        "another token"
    );
    assert_eq!(
        key(&format!("/{}/cas/{h}", &t[..31])),
        None,
        "a shorter token"
    );
    assert_eq!(key(&format!("/{t}0/cas/{h}")), None, "a longer token");
}

#[test]
fn credential_files_must_be_roots_and_private() {
    use std::os::unix::fs::PermissionsExt;
    let d = tempfile::tempdir().unwrap();
    let f = d.path().join("cred");
    std::fs::write(&f, "writer:pw\n").unwrap();
    std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).unwrap();
    let e = read_credential(&f).unwrap_err().to_string();
    assert!(e.contains("mode 0600") && !e.contains("pw"), "{e}");
    std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).unwrap();
    if nix::unistd::geteuid().is_root() {
        assert_eq!(read_credential(&f).unwrap().expose(), "writer:pw");
        // As a Kubernetes Secret volume lays it out: cred -> ..data/cred, ..data -> ..<stamp>.
        let stamp = d.path().join("..2026_12_06");
        std::fs::create_dir(&stamp).unwrap();
        std::fs::rename(&f, stamp.join("cred")).unwrap();
        std::os::unix::fs::symlink("..2026_12_06", d.path().join("..data")).unwrap();
        std::os::unix::fs::symlink("..data/cred", &f).unwrap();
        assert_eq!(
            read_credential(&f).unwrap().expose(),
            "writer:pw",
            "a Secret volume's link is followed"
        );
        std::os::unix::fs::chown(stamp.join("cred"), Some(65534), None).unwrap();
        let e = read_credential(&f).unwrap_err().to_string();
        assert!(
            e.contains("root's") && e.contains("uid 65534"),
            "a link to a file not root's: {e}"
        );
        std::os::unix::fs::chown(stamp.join("cred"), Some(0), None).unwrap();
        std::fs::set_permissions(stamp.join("cred"), std::fs::Permissions::from_mode(0o640))
            .unwrap();
        let e = read_credential(&f).unwrap_err().to_string();
        assert!(
            e.contains("mode 640"),
            "a link to a file others can read: {e}"
        );
        std::fs::remove_file(&f).unwrap();
        std::fs::rename(stamp.join("cred"), &f).unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    std::fs::write(&f, "no-colon\n").unwrap();
    if nix::unistd::geteuid().is_root() {
        let e = read_credential(&f).unwrap_err().to_string();
        assert!(
            e.contains("user:password") && !e.contains("no-colon"),
            "{e}"
        );
    }
}

const HOST: HostFacts = HostFacts {
    memory_bytes: 64 << 30,
    cpus: 8,
};

fn lane_with(extra: &str) -> Result<crate::config::Config, crate::config::ConfigError> {
    parse(
        &format!("[[lane]]\nname = \"b\"\nmemory = \"1Gi\"\n{extra}"),
        &Origin::File("lanes.toml".into()),
        &HOST,
    )
}

#[test]
fn bazel_settings_parse_and_the_hint_is_the_jobs_own_endpoint() {
    let c = lane_with("[lane.bazel]\nupstream = \"http://cache.example:8080/\"\nwrite_credential_file = \"/etc/flywheel/bazel-write\"\nport = 9090\ntimeout = \"3s\"\n").unwrap();
    let b = c.lanes[0].bazel.clone().unwrap();
    assert_eq!(b.upstream, "http://cache.example:8080");
    assert_eq!(b.port, 9090);
    assert_eq!(b.timeout, Duration::from_secs(3));
    assert_eq!(b.memory_cache_bytes, 64 << 20);
    // Admission keeps it free beside agent.reserve (512Mi by default).
    assert_eq!(c.admission_reserve_bytes(), (512 << 20) + (64 << 20));
    for zero in ["0", "0Mi", "00"] {
        assert_eq!(
            lane_with(&format!(
                "[lane.bazel]\nupstream = \"http://x\"\nmemory_cache = \"{zero}\"\n"
            ))
            .unwrap()
            .lanes[0]
                .bazel
                .as_ref()
                .map(|b| b.memory_cache_bytes),
            Some(0),
            "{zero}"
        );
    }
    assert_eq!(b.write_at, Some((6, 25)));
    // The lane's hints hold no endpoint: each job's is its own (port and token).
    assert!(crate::hints::job_env(&c.lanes[0], 1 << 30, 2)
        .iter()
        .all(|(k, _)| k != "BAZEL_REMOTE_CACHE"));
    let b = BazelSettings {
        write_credential_file: None,
        ..b
    };
    let ep = JobCache::new(Upstream::new("l", &b).unwrap(), None).endpoint();
    let token = ep.strip_prefix("http://127.0.0.1:9090/").unwrap();
    assert_eq!(token.len(), 32, "{ep}");
    assert!(token.bytes().all(|c| c.is_ascii_hexdigit()), "{ep}");
    assert_ne!(
        JobCache::new(Upstream::new("l", &b).unwrap(), None).endpoint(),
        ep
    );
    // No Bazel cache: no hint.
    let none = lane_with("").unwrap();
    assert!(crate::hints::job_env(&none.lanes[0], 1 << 30, 2)
        .iter()
        .all(|(k, _)| k != "BAZEL_REMOTE_CACHE"));
}

#[test]
fn bad_bazel_settings_are_file_line_col() {
    for (extra, at, says) in [
        ("[lane.bazel]\nport = 1\n", "lanes.toml:4:1:", "needs upstream"),
        ("[lane.bazel]\nupstream = \"ftp://x\"\n", "lanes.toml:5:12:", "http:// or https://"),
        ("[lane.bazel]\nupstream = \"http://u:p@x\"\n", "lanes.toml:5:12:", "holds a credential"),
        ("[lane.bazel]\nupstream = \"http://x\"\nprotocol = \"grpc\"\n", "lanes.toml:6:12:", "not served"),
        ("[lane.bazel]\nupstream = \"http://x\"\nwrite_credential_file = \"w\"\n", "lanes.toml:6:25:", "absolute"),
        ("[lane.bazel]\nupstream = \"http://x\"\ntimeout = \"1h\"\n", "lanes.toml:6:11:", "600s"),
        ("[lane.bazel]\nupstream = \"http://x\"\nport = 0\n", "lanes.toml:6:8:", "no port"),
        ("[lane.bazel]\nupstream = \"http://x\"\nmax_blob_size = \"lots\"\n", "lanes.toml:6:17:", "max_blob_size"),
        ("[lane.bazel]\nupstream = \"http://x\"\nmemory_cache = \"some\"\n", "lanes.toml:6:16:", "memory_cache"),
        ("[lane.bazel]\nupstream = \"http://x\"\nmemory_cache = \"17Gi\"\n", "lanes.toml:6:16:", "outside every job's envelope"),
        ("[lane.bazel]\nupstream = \"http://x\"\nmemory_cache = \"64Ki\"\n", "lanes.toml:6:16:", "at least \"1Mi\""),
        ("[lane.bazel]\nupstream = \"http://x\"\nwrite_token = \"x\"\n", "lanes.toml:6:1:", "unknown field"),
        ("network = \"host\"\n[lane.bazel]\nupstream = \"http://x\"\n", "lanes.toml:5:1:", "needs network = \"isolated\""),
        ("[lane.hints]\nbazel_remote_cache = \"grpc://x:1\"\n[lane.bazel]\nupstream = \"http://x\"\n", "lanes.toml:5:22:", "both name a Bazel cache"),
    ] {
        let e = lane_with(extra).unwrap_err().to_string();
        assert!(e.starts_with(at) && e.contains(says), "{extra:?}: {e}");
    }
}

#[test]
fn the_summary_says_what_the_cache_did() {
    let t = Tally {
        hits: 3,
        from_memory: 2,
        misses: 1,
        bytes_read: 2048,
        writes_dropped: 2,
        ..Tally::default()
    };
    let line = crate::summary::bazel_line(&t);
    assert!(
        line.contains("3 hits (2 from the agent's memory), 1 misses")
            && line.contains("2 writes dropped (not a trusted job)"),
        "{line}"
    );
    let md = crate::summary::bazel_section(&t);
    assert!(
        md.contains(
            "75% hits (2 answered from the agent's memory); writes are answered and dropped"
        ),
        "{md}"
    );
    assert!(md.contains("| 3 | 1 | 2.0 KiB | 0 B | 2 | 0 | 0 |"), "{md}");
    // A trusted job is told whether its writes can go anywhere.
    for (can_write, says) in [
        (true, "writes go to the lane's cache (a trusted job)"),
        (false, "reads only: the agent holds no write credential"),
    ] {
        let md = crate::summary::bazel_section(&Tally {
            trusted: true,
            can_write,
            ..t
        });
        assert!(md.contains(says), "{md}");
    }
}
