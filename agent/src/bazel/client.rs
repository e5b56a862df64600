//! The agent's HTTP client to a lane's upstream: hyper's pooled HTTP/1.1 client (TLS by rustls
//! with the webpki roots, as the agent's other clients), with what every request shares made
//! once per lane: the upstream's base, the credentials' `Authorization` headers. A request
//! costs one URI parse of `<upstream>/<kind>/<hash>`, no URL or IDNA processing, no redirect
//! or decompression layers (none would apply: redirects are not followed).

use std::time::Duration;

use flywheel_jit_config::Secret;
use http_body_util::combinators::UnsyncBoxBody;
use hyper::body::{Bytes, Incoming};
use hyper::header::{HeaderValue, AUTHORIZATION, CONTENT_LENGTH};
use hyper::{Method, Request, Response};
use hyper_util::client::legacy::connect::HttpConnector;

/// A request body to the upstream.
pub(super) type ReqBody = UnsyncBoxBody<Bytes, std::io::Error>;

type Connector = hyper_rustls::HttpsConnector<HttpConnector>;

/// Idle connections kept to the upstream.
const IDLE_PER_HOST: usize = 32;

/// Why the upstream gave no answer.
#[derive(Debug, thiserror::Error)]
pub(super) enum SendError {
    /// Not in time (connecting, or the answer's head).
    #[error("{0}")]
    Slow(String),
    /// Not reachable, or the connection failed.
    #[error("{0}")]
    Down(String),
}

/// A lane's upstream as a client sees it.
pub(super) struct Client {
    http: hyper_util::client::legacy::Client<Connector, ReqBody>,
    /// `scheme://authority[/prefix]`, without a trailing slash.
    base: String,
    timeout: Duration,
    read_auth: Option<Secret<String>>,
    write_auth: Option<Secret<String>>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("base", &self.base)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

/// Which credential a request carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum As {
    Anonymous,
    Reader,
    Writer,
}

impl Client {
    /// A client of `base` (`http://` or `https://`), connecting within `timeout`, with the
    /// lane's `user:password` credentials.
    pub(super) fn new(
        base: &str,
        timeout: Duration,
        read: Option<&Secret<String>>,
        write: Option<&Secret<String>>,
    ) -> Result<Client, String> {
        let mut tcp = HttpConnector::new();
        tcp.enforce_http(false);
        tcp.set_nodelay(true);
        tcp.set_connect_timeout(Some(timeout));
        let tls = hyper_rustls::HttpsConnectorBuilder::new()
            .with_provider_and_webpki_roots(rustls::crypto::ring::default_provider())
            .map_err(|e| e.to_string())?
            .https_or_http()
            .enable_http1()
            .wrap_connector(tcp);
        let http =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .pool_max_idle_per_host(IDLE_PER_HOST)
                .pool_idle_timeout(Duration::from_secs(90))
                .pool_timer(hyper_util::rt::TokioTimer::new())
                .build(tls);
        Ok(Client {
            http,
            base: base.trim_end_matches('/').to_owned(),
            timeout,
            read_auth: read.map(basic),
            write_auth: write.map(basic),
        })
    }

    /// Send `method` for `<upstream>/<kind>/<hash>` with `body` (of `len` bytes when given) as `who`;
    /// the answer's head within the timeout (the body is the caller's to bound).
    pub(super) async fn send(
        &self,
        method: Method,
        (kind, hash): (&str, &str),
        who: As,
        len: Option<u64>,
        body: ReqBody,
        deadline: Duration,
    ) -> Result<Response<Incoming>, SendError> {
        let mut rq = Request::builder()
            .method(method)
            .uri(format!("{}/{kind}/{hash}", self.base));
        let auth = match who {
            As::Anonymous => None,
            As::Reader => self.read_auth.as_ref(),
            As::Writer => self.write_auth.as_ref(),
        };
        if let Some(a) = auth {
            match HeaderValue::from_str(a.expose()) {
                Ok(mut v) => {
                    v.set_sensitive(true);
                    rq = rq.header(AUTHORIZATION, v);
                }
                Err(_) => return Err(SendError::Down("the credential is no header value".into())),
            }
        }
        if let Some(l) = len {
            rq = rq.header(CONTENT_LENGTH, l);
        }
        let rq = rq
            .body(body)
            .map_err(|e| SendError::Down(format!("cannot make the request: {e}")))?;
        match tokio::time::timeout(deadline, self.http.request(rq)).await {
            Ok(Ok(r)) => Ok(r),
            Ok(Err(e)) => Err(classify(&e)),
            Err(_) => Err(SendError::Slow("no answer in time".into())),
        }
    }

    /// Whether the agent holds a write credential.
    pub(super) fn can_write(&self) -> bool {
        self.write_auth.is_some()
    }
}

/// `Basic base64(user:password)`.
fn basic(cred: &Secret<String>) -> Secret<String> {
    use base64::Engine;
    Secret::new(format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(cred.expose())
    ))
}

/// A connect that timed out is slow; anything else that gave no answer is down.
fn classify(e: &hyper_util::client::legacy::Error) -> SendError {
    let mut src: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(s) = src {
        if s.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::TimedOut)
        {
            return SendError::Slow(chain(e));
        }
        src = s.source();
    }
    SendError::Down(chain(e))
}

/// An error and its causes, on one line.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}

/// A content-length header's value.
pub(super) fn content_length(h: &hyper::HeaderMap) -> Option<u64> {
    h.get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
}
