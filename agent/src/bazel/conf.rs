//! `[lane.bazel]`: the lane's upstream Bazel cache and the credentials only the agent holds.
//! Pure: `config.rs` calls [`check`] with the raw table and turns a [`Bad`] into
//! `FILE:LINE:COL`; the credential files themselves are read by `config::check_host` and at
//! start.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

/// What a lane's `[lane.bazel]` says, checked.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct BazelSettings {
    /// The upstream HTTP cache (`/ac/…`, `/cas/…` under it), without a trailing slash.
    pub upstream: String,
    /// `user:password` for reads, when the upstream wants them (root's, 0600).
    pub read_credential_file: Option<PathBuf>,
    /// `user:password` for writes; without one, no job's writes go upstream (root's, 0600).
    pub write_credential_file: Option<PathBuf>,
    /// The port of the job's endpoint on the loopback of the job's own network namespace.
    pub port: u16,
    /// The largest blob or action-cache entry the endpoint passes on.
    pub max_blob_bytes: u64,
    /// How long the upstream may take to answer, or between two pieces of a body.
    pub timeout: Duration,
    /// How many bytes of the upstream's CAS blobs the agent keeps in its memory (0: none).
    pub memory_cache_bytes: u64,
    /// Line and column of the credential keys in the document, for `FILE:LINE:COL` when the
    /// file itself is wrong.
    #[serde(skip)]
    pub read_at: Option<(usize, usize)>,
    #[serde(skip)]
    pub write_at: Option<(usize, usize)>,
}

pub const DEFAULT_PORT: u16 = 8980;
pub const DEFAULT_MAX_BLOB: u64 = 1 << 30;
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
pub const DEFAULT_MEMORY_CACHE: u64 = 64 << 20;
/// The most `memory_cache` may be.
pub const MAX_MEMORY_CACHE: u64 = 16 << 30;
/// The least it may be, but for 0 (none).
pub const MIN_MEMORY_CACHE: u64 = 1 << 20;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBazel {
    upstream: Option<Spanned<String>>,
    protocol: Option<Spanned<String>>,
    read_credential_file: Option<Spanned<PathBuf>>,
    write_credential_file: Option<Spanned<PathBuf>>,
    port: Option<Spanned<u16>>,
    max_blob_size: Option<Spanned<String>>,
    timeout: Option<Spanned<String>>,
    memory_cache: Option<Spanned<String>>,
}

/// A rejected `[lane.bazel]`: where (a byte offset) and why.
#[derive(Debug)]
pub struct Bad {
    pub at: Option<usize>,
    pub message: String,
}

fn bad<T>(s: &Spanned<T>, message: String) -> Bad {
    Bad {
        at: Some(s.span().start),
        message,
    }
}

/// Check `[lane.bazel]` of lane `name`; `table` is where the table starts, `own_network` whether
/// each job has a network namespace of its own (`isolated`, or `pod`) (the endpoint lives there); `pos`
/// turns a byte offset into line and column.
pub fn check(
    name: &str,
    raw: RawBazel,
    table: Option<usize>,
    own_network: bool,
    pos: &dyn Fn(usize) -> (usize, usize),
) -> Result<BazelSettings, Bad> {
    let Some(up) = raw.upstream else {
        return Err(Bad {
            at: table,
            message: format!("lane {name:?}: [lane.bazel] needs upstream = \"http://…\" (the cache every job reads through the agent)"),
        });
    };
    let u = up.get_ref().trim_end_matches('/');
    let rest = u
        .strip_prefix("http://")
        .or_else(|| u.strip_prefix("https://"));
    match rest {
        Some(r) if r.contains('@') => return Err(bad(&up, format!("lane {name:?}: bazel.upstream {:?} holds a credential: put it in read_credential_file or write_credential_file (root's, mode 0600) instead", up.get_ref()))),
        // Parsed as the client will (a host, a port that exists), not only by its prefix.
        Some(r)
            if !r.is_empty()
                && !r.contains(['?', '#', ' '])
                && reqwest::Url::parse(u).is_ok_and(|p| p.host_str().is_some_and(|h| !h.is_empty())) => {}
        _ => return Err(bad(&up, format!("lane {name:?}: bazel.upstream {:?} must be an http:// or https:// URL (e.g. \"http://bazel-cache.example:8080\")", up.get_ref()))),
    }
    if let Some(p) = &raw.protocol {
        if p.get_ref() != "http" {
            return Err(bad(p, format!("lane {name:?}: bazel.protocol {:?} is not served: use \"http\" (Bazel's /ac and /cas HTTP cache protocol; REAPI over gRPC is not supported yet)", p.get_ref())));
        }
    }
    if !own_network {
        return Err(Bad {
            at: table,
            message: format!("lane {name:?}: [lane.bazel] needs network = \"isolated\" (or \"pod\" in an ARC runner pod): each job's cache endpoint is on the loopback of the job's own network namespace, and with network = \"host\" every job could reach every other job's endpoint"),
        });
    }
    let file = |f: Option<Spanned<PathBuf>>, key: &str| -> Result<Option<PathBuf>, Bad> {
        match f {
            Some(p) if !p.get_ref().is_absolute() => Err(bad(
                &p,
                format!(
                    "lane {name:?}: bazel.{key} {:?} must be an absolute path",
                    p.get_ref()
                ),
            )),
            Some(p) => Ok(Some(p.into_inner())),
            None => Ok(None),
        }
    };
    let port = match raw.port {
        Some(p) if *p.get_ref() == 0 => {
            return Err(bad(
                &p,
                format!("lane {name:?}: bazel.port 0 is no port: leave it out for {DEFAULT_PORT}"),
            ))
        }
        Some(p) => p.into_inner(),
        None => DEFAULT_PORT,
    };
    let max_blob_bytes = match &raw.max_blob_size {
        Some(s) => crate::size::parse_size(s.get_ref())
            .map_err(|e| bad(s, format!("lane {name:?}: bazel.max_blob_size: {e}")))?,
        None => DEFAULT_MAX_BLOB,
    };
    let timeout = match &raw.timeout {
        Some(t) => match crate::size::parse_duration(t.get_ref()) {
            Ok(d) if d >= Duration::from_millis(100) && d <= Duration::from_secs(600) => d,
            _ => {
                return Err(bad(
                    t,
                    format!(
                        "lane {name:?}: bazel.timeout {:?} must be a duration from \"100ms\" to \"600s\"",
                        t.get_ref()
                    ),
                ))
            }
        },
        None => DEFAULT_TIMEOUT,
    };
    let memory_cache_bytes = match &raw.memory_cache {
        Some(s) => match crate::size::parse_size(s.get_ref()) {
            Err(crate::size::SizeError::Zero(_)) => 0,
            Ok(n) if n > MAX_MEMORY_CACHE => {
                return Err(bad(
                    s,
                    format!("lane {name:?}: bazel.memory_cache {:?} is more than \"16Gi\": the blobs are kept in the agent's own memory, outside every job's envelope", s.get_ref()),
                ))
            }
            Ok(n) if n < MIN_MEMORY_CACHE => {
                return Err(bad(
                    s,
                    format!("lane {name:?}: bazel.memory_cache {:?} would keep next to nothing (a blob may take at most an eighth of it): use \"0\" for none, or at least \"1Mi\"", s.get_ref()),
                ))
            }
            Ok(n) => n,
            Err(e) => {
                return Err(bad(
                    s,
                    format!("lane {name:?}: bazel.memory_cache: {e} (\"0\" keeps none)"),
                ))
            }
        },
        None => DEFAULT_MEMORY_CACHE,
    };
    let read_at = raw
        .read_credential_file
        .as_ref()
        .map(|s| pos(s.span().start));
    let write_at = raw
        .write_credential_file
        .as_ref()
        .map(|s| pos(s.span().start));
    Ok(BazelSettings {
        upstream: u.to_owned(),
        read_credential_file: file(raw.read_credential_file, "read_credential_file")?,
        write_credential_file: file(raw.write_credential_file, "write_credential_file")?,
        port,
        max_blob_bytes,
        timeout,
        memory_cache_bytes,
        read_at,
        write_at,
    })
}
