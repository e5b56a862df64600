//! Log pumps: a child's output, read as bytes, logged line by line with the job's span.

use std::io;
use std::os::fd::OwnedFd;

use tracing::{info, Instrument};

/// Log a child's output line by line with the job's span.
pub(super) fn log_lines(
    fd: OwnedFd,
    stream: &'static str,
    span: tracing::Span,
    bg: &crate::tasks::Background,
) -> io::Result<tokio::task::JoinHandle<()>> {
    log_lines_at(fd, stream, tracing::Level::INFO, span, bg)
}

pub(super) fn log_lines_at(
    fd: OwnedFd,
    stream: &'static str,
    level: tracing::Level,
    span: tracing::Span,
    bg: &crate::tasks::Background,
) -> io::Result<tokio::task::JoinHandle<()>> {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt};
    /// A line longer than this is logged in pieces: a job's output never grows the agent.
    const MAX_LINE: u64 = 64 << 10;
    let rx = tokio::net::unix::pipe::Receiver::from_owned_fd(fd)?;
    Ok(bg.spawn(
        async move {
            // Bytes, not text: a job may print anything (a build tool's binary output), and the
            // pipe must be read to its end whatever comes, or the writer dies of EPIPE.
            let mut reader = tokio::io::BufReader::new(rx);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                match (&mut reader)
                    .take(MAX_LINE)
                    .read_until(b'\n', &mut buf)
                    .await
                {
                    Ok(0) => return,
                    Ok(_) => {
                        if buf.last() == Some(&b'\n') {
                            buf.pop();
                        }
                        if buf.last() == Some(&b'\r') {
                            buf.pop();
                        }
                        let line = String::from_utf8_lossy(&buf);
                        if level == tracing::Level::DEBUG {
                            tracing::debug!(stream, "{line}");
                        } else {
                            info!(stream, "{line}");
                        }
                    }
                    Err(_) => break,
                }
            }
            // A read error: keep the pipe drained to its end all the same.
            let _ = tokio::io::copy(&mut reader, &mut tokio::io::sink()).await;
        }
        .instrument(span),
    ))
}
