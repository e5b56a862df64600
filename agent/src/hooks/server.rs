//! A runner's hook socket: who may talk to it, how much, how long, and once per op.
//!
//! Only processes of the runner's own job are answered (the peer's pid from `SO_PEERCRED`,
//! looked up in the job's cgroup); anyone else is closed before a byte is read, so a refused
//! caller never uses up the job's one answer. A request is at most 16 KiB and must arrive
//! within 5 s; at most 4 connections are served at once. An accepted request becomes a
//! [`HookEvent`] for the job's lifecycle, and the answer it sends back is written out.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};
use tracing::warn;

use super::{HookEvent, HookRequest, HookResponse};

/// The largest hook request: a few `GITHUB_*` values.
const MAX_REQUEST: usize = 16 * 1024;
/// Connections of one runner's job answered at once; more are closed at once.
const MAX_CONNECTIONS: usize = 4;
/// How long a connection may take to send its request.
const READ_DEADLINE: Duration = Duration::from_secs(5);

/// Why a connection's request was not read.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error("no request within {} s", READ_DEADLINE.as_secs())]
    Timeout,
    #[error("cannot read the request: {0}")]
    Read(#[from] std::io::Error),
    #[error("no request")]
    Empty,
    #[error("a hook request is at most {MAX_REQUEST} bytes")]
    TooLarge,
    #[error("not a hook request: {0}")]
    NotJson(#[from] serde_json::Error),
}

/// Which ops this runner's job has been answered (each is, once).
#[derive(Debug, Default)]
struct Asked {
    started: bool,
    completed: bool,
}

/// Is this pid a process of the runner's job?
pub type Member = Arc<dyn Fn(i32) -> bool + Send + Sync>;

/// Listen on `<dir>/socket` for this runner's hooks until the returned task is aborted; each
/// accepted request goes to `events`.
pub fn serve(
    dir: &Path,
    runner_name: &str,
    member: Member,
    events: mpsc::Sender<HookEvent>,
    bg: &crate::tasks::Background,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    std::fs::create_dir_all(dir)?;
    std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o711))?;
    let path = dir.join("socket");
    let listener = tokio::net::UnixListener::bind(&path)?;
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o666))?;
    let asked = Arc::new(Mutex::new(Asked::default()));
    let runner: Arc<str> = Arc::from(runner_name);
    let permits = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let conns = bg.clone();
    Ok(bg.spawn_service(async move {
        let mut backoff = crate::accept::Backoff::default();
        // Refusals are logged at 1, 2, 4, 8, … so a flood cannot flood the log too.
        let (mut outsiders, mut excess) = (0u64, 0u64);
        loop {
            let stream = match listener.accept().await {
                Ok((s, _)) => {
                    backoff.accepted();
                    s
                }
                Err(e) => {
                    warn!(runner = %runner, error = %e, wait_ms = backoff.next_wait().as_millis() as u64, "cannot accept a hook connection");
                    backoff.failed().await;
                    continue;
                }
            };
            let cred = stream.peer_cred().ok();
            let pid = cred.and_then(|c| c.pid());
            if !pid.is_some_and(|p| member(p)) {
                outsiders += 1;
                if outsiders.is_power_of_two() {
                    warn!(
                        runner = %runner,
                        peer_pid = pid.unwrap_or(0),
                        peer_uid = cred.map_or(u32::MAX, |c| c.uid()),
                        refused = outsiders,
                        "refused a hook connection from outside this runner's job"
                    );
                }
                let _ = stream.try_write(b"{\"ok\":false,\"lines\":[\"flywheel: not a process of this runner's job\"]}\n");
                continue;
            }
            let Ok(permit) = permits.clone().try_acquire_owned() else {
                excess += 1;
                if excess.is_power_of_two() {
                    warn!(runner = %runner, closed = excess, "too many hook connections at once; closed the excess");
                }
                continue;
            };
            let (runner, asked, events) = (runner.clone(), asked.clone(), events.clone());
            conns.spawn(async move {
                let _permit = permit;
                let (r, mut w) = stream.into_split();
                let answer = match read_request(r).await {
                    Ok(req) => answer(&runner, &asked, &events, req).await,
                    Err(why) => HookResponse::refused(why),
                };
                let text = serde_json::to_string(&answer).unwrap_or_default();
                let _ = tokio::time::timeout(READ_DEADLINE, async {
                    w.write_all(text.as_bytes()).await?;
                    w.write_all(b"\n").await
                })
                .await;
            });
        }
    }))
}

/// One request line: at most [`MAX_REQUEST`] bytes within [`READ_DEADLINE`].
async fn read_request(r: impl tokio::io::AsyncRead + Unpin) -> Result<HookRequest, RequestError> {
    use tokio::io::AsyncReadExt;
    let mut buf = Vec::new();
    let limited = r.take(MAX_REQUEST as u64 + 1);
    let read = tokio::time::timeout(
        READ_DEADLINE,
        tokio::io::BufReader::new(limited).read_until(b'\n', &mut buf),
    )
    .await
    .map_err(|_| RequestError::Timeout)?;
    match read? {
        0 => Err(RequestError::Empty),
        _ if buf.len() > MAX_REQUEST => Err(RequestError::TooLarge),
        _ => Ok(serde_json::from_slice(&buf)?),
    }
}

/// The first request of its op goes to the lifecycle; a repeated or unknown one is refused.
async fn answer(
    runner: &str,
    asked: &Mutex<Asked>,
    events: &mpsc::Sender<HookEvent>,
    req: HookRequest,
) -> HookResponse {
    let first = {
        let Ok(mut s) = asked.lock() else {
            return HookResponse::refused("internal error");
        };
        match req.op.as_str() {
            "job-started" if s.started => false,
            "job-started" => {
                s.started = true;
                true
            }
            "job-completed" if s.completed || !s.started => false,
            "job-completed" => {
                s.completed = true;
                true
            }
            _ => return HookResponse::refused(format_args!("unknown hook {:?}", req.op)),
        }
    };
    if !first {
        warn!(runner = %runner, op = %req.op, "refused a repeated hook request");
        return HookResponse::refused(format_args!(
            "{} was already answered for this runner; a job gets one",
            req.op
        ));
    }
    let (reply, answered) = oneshot::channel();
    let event = match req.op.as_str() {
        "job-started" => HookEvent::Started {
            claims: req.claims(runner),
            reply,
        },
        _ => HookEvent::Completed { reply },
    };
    if events.send(event).await.is_err() {
        return HookResponse::refused("this runner's job is over; nothing answers its hooks");
    }
    answered
        .await
        .unwrap_or_else(|_| HookResponse::refused("this runner's job ended before its answer"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader, Read, Write};
    use std::os::unix::net::UnixStream;
    use std::sync::atomic::{AtomicBool, Ordering};

    struct Rig {
        _dir: tempfile::TempDir,
        socket: std::path::PathBuf,
        _rt: tokio::runtime::Runtime,
        task: tokio::task::JoinHandle<()>,
    }

    /// A server whose job is this test process (or nobody), and a lifecycle that answers
    /// each event with a line naming it (counted in `seen`).
    fn rig(member: Arc<AtomicBool>, seen: Arc<Mutex<Vec<String>>>) -> Rig {
        let dir = tempfile::tempdir().unwrap();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let bg = crate::tasks::Background::new();
        let (tx, mut rx) = mpsc::channel(4);
        let me = std::process::id() as i32;
        let task = {
            let _in = rt.enter();
            let task = serve(
                &dir.path().join("s"),
                "runner-1",
                Arc::new(move |pid| member.load(Ordering::SeqCst) && pid == me),
                tx,
                &bg,
            )
            .unwrap();
            tokio::spawn(async move {
                while let Some(ev) = rx.recv().await {
                    match ev {
                        HookEvent::Started { claims, reply } => {
                            seen.lock().unwrap().push(format!(
                                "started {} {} {}",
                                claims.repository, claims.run_id, claims.runner_name
                            ));
                            let _ = reply.send(HookResponse {
                                ok: true,
                                lines: vec!["flywheel: started".into()],
                                ..HookResponse::default()
                            });
                        }
                        HookEvent::Completed { reply } => {
                            seen.lock().unwrap().push("completed".into());
                            let _ = reply.send(HookResponse {
                                ok: true,
                                lines: vec!["flywheel: completed".into()],
                                ..HookResponse::default()
                            });
                        }
                    }
                }
            });
            task
        };
        Rig {
            socket: dir.path().join("s/socket"),
            _dir: dir,
            _rt: rt,
            task,
        }
    }

    fn ask(r: &Rig, body: &[u8]) -> HookResponse {
        try_ask(r, body).unwrap()
    }

    /// One request and its answer; a connection closed unanswered is an error.
    fn try_ask(r: &Rig, body: &[u8]) -> std::io::Result<HookResponse> {
        let mut s = UnixStream::connect(&r.socket)?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        let _ = s.write_all(body);
        let _ = s.shutdown(std::net::Shutdown::Write);
        let mut line = String::new();
        BufReader::new(&s).read_line(&mut line)?;
        serde_json::from_str(&line).map_err(|e| std::io::Error::other(format!("{e}: {line:?}")))
    }

    fn request(op: &str) -> Vec<u8> {
        let mut v = serde_json::to_vec(&HookRequest {
            op: op.into(),
            repository: "o/r".into(),
            run_id: "42".into(),
            ..HookRequest::default()
        })
        .unwrap();
        v.push(b'\n');
        v
    }

    #[test]
    fn each_op_is_delivered_once_and_its_answer_written_back() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let r = rig(Arc::new(AtomicBool::new(true)), seen.clone());
        let early = ask(&r, &request("job-completed"));
        assert!(!early.ok, "completed before started: {early:?}");
        let a = ask(&r, &request("job-started"));
        assert!(a.ok, "{a:?}");
        assert_eq!(a.lines, ["flywheel: started"]);
        let again = ask(&r, &request("job-started"));
        assert!(!again.ok);
        assert!(again.lines[0].contains("already answered"), "{again:?}");
        let c = ask(&r, &request("job-completed"));
        assert_eq!(c.lines, ["flywheel: completed"]);
        let c2 = ask(&r, &request("job-completed"));
        assert!(c2.lines[0].contains("already answered"), "{c2:?}");
        let odd = ask(&r, &request("job-finished"));
        assert!(odd.lines[0].contains("unknown hook"), "{odd:?}");
        assert_eq!(
            *seen.lock().unwrap(),
            ["started o/r 42 runner-1", "completed"],
            "the lifecycle saw each op once, with the agent's runner name"
        );
        r.task.abort();
    }

    #[test]
    fn a_process_outside_the_job_is_refused_and_uses_up_nothing() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let member = Arc::new(AtomicBool::new(false));
        let r = rig(member.clone(), seen.clone());
        let mut s = UnixStream::connect(&r.socket).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).unwrap();
        assert!(
            text.contains("not a process of this runner's job"),
            "{text}"
        );
        assert!(
            seen.lock().unwrap().is_empty(),
            "nothing reached the lifecycle"
        );
        // The job's own process still gets its one answer.
        member.store(true, Ordering::SeqCst);
        assert!(ask(&r, &request("job-started")).ok);
        assert_eq!(seen.lock().unwrap().len(), 1);
        r.task.abort();
    }

    #[test]
    fn an_oversized_or_malformed_request_is_refused_without_an_event() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let r = rig(Arc::new(AtomicBool::new(true)), seen.clone());
        let big = vec![b'x'; MAX_REQUEST + 10];
        let a = ask(&r, &big);
        assert!(!a.ok);
        assert!(a.lines[0].contains("at most 16384 bytes"), "{a:?}");
        let b = ask(&r, b"{not json\n");
        assert!(b.lines[0].contains("not a hook request"), "{b:?}");
        let c = ask(&r, b"");
        assert!(c.lines[0].contains("no request"), "{c:?}");
        // The job's one job-started is still there.
        assert!(ask(&r, &request("job-started")).ok);
        assert_eq!(seen.lock().unwrap().len(), 1);
        r.task.abort();
    }

    #[test]
    fn a_fifth_connection_at_once_is_closed_unanswered() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let r = rig(Arc::new(AtomicBool::new(true)), seen.clone());
        let held: Vec<UnixStream> = (0..MAX_CONNECTIONS)
            .map(|_| UnixStream::connect(&r.socket).unwrap())
            .collect();
        // Accepted in the order they connected: the four hold every permit (each waits for
        // its request) when the fifth is looked at.
        let mut fifth = UnixStream::connect(&r.socket).unwrap();
        fifth
            .set_read_timeout(Some(Duration::from_secs(2)))
            .unwrap();
        let mut text = String::new();
        let read = fifth.read_to_string(&mut text);
        assert!(
            matches!(read, Ok(0)),
            "closed at once, no answer: {read:?} {text:?}"
        );
        drop(held);
        // Their permits are back: the job is answered.
        let t = std::time::Instant::now();
        loop {
            match try_ask(&r, &request("job-started")) {
                Ok(a) => {
                    assert!(a.ok, "{a:?}");
                    break;
                }
                Err(e) => assert!(t.elapsed() < Duration::from_secs(5), "{e}"),
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(seen.lock().unwrap().len(), 1);
        r.task.abort();
    }

    #[test]
    fn a_request_that_never_ends_is_cut_at_the_deadline() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let e = rt.block_on(async {
            let (_keep, r) = tokio::io::duplex(64);
            read_request(r).await.unwrap_err()
        });
        assert!(matches!(e, RequestError::Timeout), "{e}");
        assert_eq!(e.to_string(), "no request within 5 s");
    }

    #[test]
    fn an_answer_never_given_is_a_refusal() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let a = rt.block_on(async {
            let (tx, mut rx) = mpsc::channel(1);
            let drop_it = tokio::spawn(async move { drop(rx.recv().await) });
            let asked = Mutex::new(Asked::default());
            let req = HookRequest {
                op: "job-started".into(),
                ..HookRequest::default()
            };
            let a = answer("r", &asked, &tx, req).await;
            drop_it.await.unwrap();
            a
        });
        assert!(!a.ok);
        assert!(a.lines[0].contains("ended before its answer"), "{a:?}");
    }
}
