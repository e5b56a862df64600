//! One job's Bazel HTTP cache endpoint: HTTP/1.1 on a listener in the job's network namespace,
//! reads passed through to the upstream, writes forwarded only for a trusted job.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{Stream, StreamExt};
use http_body_util::{combinators::UnsyncBoxBody, BodyExt, Empty, Full, StreamBody};
use hyper::body::{Bytes, Frame, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use sha2::{Digest, Sha256};
use tracing::warn;

use super::client::{content_length, As, SendError};
use super::{Cause, Failure, Guard, Shared, Unused};

type Body = UnsyncBoxBody<Bytes, std::io::Error>;

/// Connections of one job served at once; more wait in the kernel's backlog until one
/// closes. Above Bazel's `--remote_max_connections` default (100), which it keeps open, each
/// one request at a time: with fewer, the requests on the connections past the limit waited
/// for the whole `--remote_timeout`. A hostile job's connections hold at most this many
/// answers in memory at once (`WHOLE_BODY` each).
const MAX_CONNECTIONS: usize = 256;
/// Entries up to this size are read whole before they are answered; larger ones stream.
const WHOLE_BODY: u64 = 256 << 10;
/// How long a client may take to send a request's headers.
const HEADER_TIMEOUT: Duration = Duration::from_secs(30);

/// Serve `listener` for one job until the task is aborted (its connections go with it).
pub(super) fn spawn(
    listener: tokio::net::TcpListener,
    job: Arc<Shared>,
    bg: &crate::tasks::Background,
    on: &tokio::runtime::Handle,
) -> tokio::task::JoinHandle<()> {
    let permits = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    bg.spawn_service_on(async move {
        let mut backoff = crate::accept::Backoff::default();
        let mut live = tokio::task::JoinSet::new();
        loop {
            let Ok(permit) = permits.clone().acquire_owned().await else {
                return;
            };
            let stream = match listener.accept().await {
                Ok((s, _)) => {
                    backoff.accepted();
                    s
                }
                Err(e) => {
                    warn!(lane = %job.upstream.lane, error = %e, wait_ms = backoff.next_wait().as_millis() as u64, "cannot accept a bazel cache connection");
                    backoff.failed().await;
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            while live.try_join_next().is_some() {}
            let job = job.clone();
            live.spawn(async move {
                let _permit = permit;
                let svc = hyper::service::service_fn(move |req| {
                    let job = job.clone();
                    async move { Ok::<_, Infallible>(handle(&job, req).await) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(HEADER_TIMEOUT)
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                    .await;
            });
        }
    }, on)
}

/// `/<token>/ac/<sha256>` or `/<token>/cas/<sha256>` (lowercase hex), the job's own token
/// compared in constant time: the kind and the hash.
pub(super) fn key<'a>(path: &'a str, token: &str) -> Option<(&'static str, &'a str)> {
    let rest = path.strip_prefix('/')?;
    let given = rest.get(..token.len())?;
    let same = given.len() == token.len()
        && given
            .bytes()
            .zip(token.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0;
    if !same {
        return None;
    }
    let path = &rest[token.len()..];
    let (kind, h) = if let Some(h) = path.strip_prefix("/ac/") {
        ("ac", h)
    } else {
        ("cas", path.strip_prefix("/cas/")?)
    };
    (h.len() == 64 && h.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
        .then_some((kind, h))
}

fn empty() -> Body {
    Empty::new()
        .map_err(|e: Infallible| match e {})
        .boxed_unsync()
}

/// A body of these bytes.
pub(super) fn full(b: Bytes) -> Body {
    Full::new(b)
        .map_err(|e: Infallible| match e {})
        .boxed_unsync()
}

fn answer(status: StatusCode) -> Response<Body> {
    let mut r = Response::new(empty());
    *r.status_mut() = status;
    r
}

async fn handle(job: &Arc<Shared>, req: Request<Incoming>) -> Response<Body> {
    let Some((kind, hash)) = key(req.uri().path(), &job.token) else {
        return answer(StatusCode::NOT_FOUND);
    };
    let hash = hash.to_owned();
    let guard = job.upstream.guard().await;
    let not_used = match &guard {
        Guard::Refuses => None,
        Guard::Open(_) => Some(Failure::NotUsed(Unused::Open)),
        // An upstream that did not answer the probe would not have answered the request.
        Guard::Unverified(_, Cause::Down) => Some(Failure::Down),
        Guard::Unverified(_, Cause::Slow) => Some(Failure::Slow),
        Guard::Unverified(_, Cause::ServerError) => Some(Failure::ServerError),
        Guard::Unverified(_, Cause::Other) => Some(Failure::NotUsed(Unused::Unverified)),
    };
    if let Some(f) = not_used {
        job.failed(f, &format!("{guard:?}"));
        return match *req.method() {
            Method::PUT => {
                let up = &job.upstream.settings;
                let whole = drain(job, req.into_body(), up.max_blob_bytes, up.timeout).await;
                job.dropped();
                answer(if whole {
                    StatusCode::OK
                } else {
                    StatusCode::PAYLOAD_TOO_LARGE
                })
            }
            _ => {
                job.miss();
                answer(StatusCode::NOT_FOUND)
            }
        };
    }
    match *req.method() {
        Method::GET | Method::HEAD => read(job, req.method().clone(), kind, &hash).await,
        Method::PUT => write(job, req, kind, &hash).await,
        _ => answer(StatusCode::METHOD_NOT_ALLOWED),
    }
}

fn failure_of_status(s: StatusCode) -> Failure {
    match s.as_u16() {
        401 | 403 | 407 => Failure::Denied,
        500..=599 => Failure::ServerError,
        _ => Failure::Other,
    }
}

fn failure_of_error(e: &SendError) -> Failure {
    match e {
        SendError::Slow(_) => Failure::Slow,
        SendError::Down(_) => Failure::Down,
    }
}

/// A read: the upstream's body streamed back on a hit; a miss for anything else (a failing
/// upstream is counted, and the build goes on without the cache).
async fn read(job: &Arc<Shared>, method: Method, kind: &'static str, hash: &str) -> Response<Body> {
    let up = &job.upstream;
    let timeout = up.settings.timeout;
    if kind == "cas" {
        if let Some(blob) = up.memory.get(hash) {
            job.memory_hit();
            let r = Response::builder()
                .status(StatusCode::OK)
                .header(hyper::header::CONTENT_LENGTH, blob.len());
            let body = if method == Method::HEAD {
                empty()
            } else {
                job.read_bytes(blob.len() as u64);
                full(blob)
            };
            return r
                .body(body)
                .unwrap_or_else(|_| answer(StatusCode::NOT_FOUND));
        }
    }
    let sent = up
        .http
        .send(
            method.clone(),
            (kind, hash),
            As::Reader,
            None,
            empty(),
            timeout,
        )
        .await;
    let resp = match sent {
        Ok(r) => r,
        Err(e) => {
            job.failed(failure_of_error(&e), &e.to_string());
            job.miss();
            return answer(StatusCode::NOT_FOUND);
        }
    };
    match resp.status() {
        StatusCode::OK => {}
        StatusCode::NOT_FOUND => {
            job.miss();
            return answer(StatusCode::NOT_FOUND);
        }
        s => {
            job.failed(failure_of_status(s), &format!("answered {s} to a read"));
            job.miss();
            return answer(StatusCode::NOT_FOUND);
        }
    }
    let len = content_length(resp.headers());
    if len.is_some_and(|l| l > up.settings.max_blob_bytes) {
        job.miss();
        return answer(StatusCode::NOT_FOUND);
    }
    let mut r = Response::builder().status(StatusCode::OK);
    if let Some(l) = len {
        r = r.header(hyper::header::CONTENT_LENGTH, l);
    }
    if method == Method::HEAD {
        job.hit();
        return r
            .body(empty())
            .unwrap_or_else(|_| answer(StatusCode::NOT_FOUND));
    }
    // Most entries are small: read whole, they go back in one write (fewer frames, fewer
    // system calls); larger ones are streamed.
    if let Some(l) = len.filter(|l| *l <= WHOLE_BODY) {
        let whole = tokio::time::timeout(timeout, resp.into_body().collect()).await;
        return match whole.map(|b| b.map(|b| b.to_bytes())) {
            Ok(Ok(b)) if b.len() as u64 == l => {
                job.hit();
                job.read_bytes(l);
                if kind == "cas" {
                    // Kept only when it hashes to its name.
                    up.memory.put(hash, &b);
                }
                r.body(full(b))
                    .unwrap_or_else(|_| answer(StatusCode::NOT_FOUND))
            }
            _ => {
                // Nothing was answered yet: a miss, and the client builds the action itself.
                job.failed(Failure::Slow, "the body did not come whole in time");
                job.miss();
                answer(StatusCode::NOT_FOUND)
            }
        };
    }
    job.hit();
    let counted = job.clone();
    // Each piece must come within the timeout, as for a whole body.
    let stream = futures_util::stream::unfold(resp.into_body(), move |mut b| async move {
        match tokio::time::timeout(timeout, b.frame()).await {
            Ok(Some(Ok(f))) => Some((Ok(f), b)),
            Ok(Some(Err(e))) => Some((Err(std::io::Error::other(e)), b)),
            Ok(None) => None,
            Err(_) => Some((
                Err(std::io::Error::other("the upstream stalled in a body")),
                b,
            )),
        }
    })
    .map(move |f| {
        if let Ok(d) = f.as_ref().map(|f| f.data_ref()) {
            counted.read_bytes(d.map_or(0, |d| d.len() as u64));
        }
        f
    });
    r.body(StreamBody::new(stream).boxed_unsync())
        .unwrap_or_else(|_| answer(StatusCode::NOT_FOUND))
}

/// A write. Forwarded only for a trusted job and with the agent's write credential; a CAS
/// blob only when it hashes to its name (the body is passed on as it arrives, its last piece
/// held back until the hash is known: a body that does not match never completes upstream).
/// An untrusted job's write is read to its end, dropped and answered `200`, so its build
/// carries on as if the cache had taken it.
async fn write(
    job: &Arc<Shared>,
    req: Request<Incoming>,
    kind: &'static str,
    hash: &str,
) -> Response<Body> {
    let up = &job.upstream;
    let max = up.settings.max_blob_bytes;
    let len = content_length(req.headers());
    if len.is_some_and(|l| l > max) {
        job.refused();
        return answer(StatusCode::PAYLOAD_TOO_LARGE);
    }
    if !(job.writes_allowed() && up.can_write()) {
        let whole = drain(job, req.into_body(), max, up.settings.timeout).await;
        job.dropped();
        return answer(if whole {
            StatusCode::OK
        } else {
            StatusCode::PAYLOAD_TOO_LARGE
        });
    }
    let Some(len) = len else {
        job.refused();
        return answer(StatusCode::LENGTH_REQUIRED);
    };
    let (tx, rx) = tokio::sync::oneshot::channel::<Result<u64, &'static str>>();
    let body = checked(
        req.into_body(),
        (kind == "cas").then(|| hash.to_owned()),
        len,
        up.settings.timeout,
        tx,
    );
    let body = StreamBody::new(body.map(|r| r.map(Frame::data))).boxed_unsync();
    let deadline = write_deadline(up.settings.timeout, len);
    let sent = up
        .http
        .send(
            Method::PUT,
            (kind, hash),
            As::Writer,
            Some(len),
            body,
            deadline,
        )
        .await;
    let body = match tokio::time::timeout(Duration::from_secs(1), rx).await {
        Ok(Ok(r)) => r,
        _ => Err(NOT_READ),
    };
    match (body, sent) {
        (Err(why), _) if why != NOT_READ => {
            job.refused();
            warn!(lane = %up.lane, kind, hash, why, "refused a bazel cache write from a trusted job; nothing completed upstream");
            answer(StatusCode::BAD_REQUEST)
        }
        (Ok(n), Ok(r)) if r.status().is_success() => {
            job.written(n);
            answer(StatusCode::OK)
        }
        // The upstream failed (before or after reading the body): the build goes on.
        (_, Ok(r)) => {
            job.failed(
                failure_of_status(r.status()),
                &format!("answered {} to a write", r.status()),
            );
            job.dropped();
            answer(StatusCode::OK)
        }
        (_, Err(e)) => {
            job.failed(failure_of_error(&e), &e.to_string());
            job.dropped();
            answer(StatusCode::OK)
        }
    }
}

/// The slowest upload a trusted write may take, below which it is given up (dropped, the
/// build goes on): a large blob to a slow upstream still completes.
const SLOWEST_UPLOAD: u64 = 1 << 20;

/// How long a trusted write of `len` bytes may take in all: six of the upstream's `timeout`,
/// and a second for each MiB on top (each piece of the body must still come within
/// `timeout`; this bounds an upstream that stops reading).
pub(super) fn write_deadline(timeout: Duration, len: u64) -> Duration {
    timeout * 6 + Duration::from_secs(len / SLOWEST_UPLOAD)
}

/// The body of a trusted write was not read to its end (the upstream failed first).
const NOT_READ: &str = "the body was not read to its end";

/// Read a write that goes nowhere to its end (at most `max` bytes, no piece later than
/// `timeout`), no faster than the job's budget for such bytes: true when it ended whole.
async fn drain(job: &Shared, mut body: Incoming, max: u64, timeout: Duration) -> bool {
    let mut seen = 0u64;
    loop {
        match tokio::time::timeout(timeout, body.frame()).await {
            Ok(Some(Ok(f))) => {
                let n = f.data_ref().map_or(0, |d| d.len() as u64);
                seen += n;
                if seen > max {
                    return false;
                }
                let wait = job.dropped_budget.take(n, std::time::Instant::now());
                if !wait.is_zero() {
                    tokio::time::sleep(wait).await;
                }
            }
            Ok(None) => return true,
            _ => return false,
        }
    }
}

struct Checked {
    body: Incoming,
    want: Option<String>,
    len: u64,
    seen: u64,
    timeout: Duration,
    sha: Sha256,
    held: Option<Bytes>,
    done: Option<tokio::sync::oneshot::Sender<Result<u64, &'static str>>>,
}

impl Checked {
    fn fail(&mut self, why: &'static str) -> std::io::Error {
        if let Some(d) = self.done.take() {
            let _ = d.send(Err(why));
        }
        std::io::Error::other(why)
    }
}

/// The request body as a stream for the upstream: exactly `len` bytes, hashing to `want`
/// when given; the last piece is held back until both are known, and an error ends the
/// stream instead (the upstream then never sees a complete request). The outcome goes to
/// `done`.
fn checked(
    body: Incoming,
    want: Option<String>,
    len: u64,
    timeout: Duration,
    done: tokio::sync::oneshot::Sender<Result<u64, &'static str>>,
) -> impl Stream<Item = Result<Bytes, std::io::Error>> + Send + 'static {
    let st = Checked {
        body,
        want,
        len,
        seen: 0,
        timeout,
        sha: Sha256::new(),
        held: None,
        done: Some(done),
    };
    futures_util::stream::unfold(st, |mut st| async move {
        loop {
            st.done.as_ref()?;
            match tokio::time::timeout(st.timeout, st.body.frame()).await {
                Ok(Some(Ok(f))) => {
                    let Ok(data) = f.into_data() else { continue };
                    st.seen += data.len() as u64;
                    if st.seen > st.len {
                        let e = st.fail("the body is longer than its content-length");
                        return Some((Err(e), st));
                    }
                    st.sha.update(&data);
                    if let Some(prev) = st.held.replace(data) {
                        return Some((Ok(prev), st));
                    }
                }
                Ok(Some(Err(_))) | Err(_) => {
                    let e = st.fail("the body was cut off or stalled");
                    return Some((Err(e), st));
                }
                Ok(None) => {
                    if st.seen != st.len {
                        let e = st.fail("the body is shorter than its content-length");
                        return Some((Err(e), st));
                    }
                    if let Some(w) = &st.want {
                        if hex(&st.sha.clone().finalize()) != *w {
                            let e = st.fail("the blob does not hash to its name");
                            return Some((Err(e), st));
                        }
                    }
                    let n = st.seen;
                    if let Some(d) = st.done.take() {
                        let _ = d.send(Ok(n));
                    }
                    return st.held.take().map(|b| (Ok(b), st));
                }
            }
        }
    })
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}
