//! `fw-attack`: what a hostile job's step would run against a neighbour, for the isolation
//! tests. Each subcommand prints one line saying what it tried and what happened, so a test can
//! prove the attack ran before it asserts that it failed.
//!
//! - `ptrace PID`: `PTRACE_ATTACH` to PID (prints `ptrace PID: attached` or the errno).
//! - `hook SOCKET`: send a job-started request to a hook socket and print the answer.
//! - `flood SOCKET MIB`: send MIB MiB without a newline; print how much the agent took.
//! - `idle SOCKET N SECS`: open N connections, hold them SECS seconds; print how many opened
//!   and how many the agent closed meanwhile.
#![allow(clippy::print_stdout)]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::process::ExitCode;
use std::time::{Duration, Instant};

fn ptrace(pid: i32) {
    // SAFETY: plain ptrace(2); detaching again if it worked.
    let r = unsafe {
        libc::ptrace(
            libc::PTRACE_ATTACH,
            pid,
            std::ptr::null_mut::<libc::c_void>(),
            std::ptr::null_mut::<libc::c_void>(),
        )
    };
    if r == 0 {
        println!("ptrace {pid}: attached");
        // SAFETY: as above.
        unsafe {
            libc::ptrace(
                libc::PTRACE_DETACH,
                pid,
                std::ptr::null_mut::<libc::c_void>(),
                std::ptr::null_mut::<libc::c_void>(),
            )
        };
    } else {
        println!("ptrace {pid}: {}", std::io::Error::last_os_error());
    }
}

fn hook(socket: &str) {
    let req = r#"{"op":"job-started","repository":"tinyland/flywheel","run_id":"101","run_attempt":"1","event_name":"push","git_ref":"refs/heads/main"}"#;
    match UnixStream::connect(socket) {
        Err(e) => println!("hook {socket}: connect: {e}"),
        Ok(mut s) => {
            let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
            let _ = s.write_all(req.as_bytes());
            let _ = s.write_all(b"\n");
            let mut out = String::new();
            let _ = s.read_to_string(&mut out);
            println!("hook {socket}: answer {}", out.trim());
        }
    }
}

fn flood(socket: &str, mib: usize) {
    match UnixStream::connect(socket) {
        Err(e) => println!("flood {socket}: connect: {e}"),
        Ok(mut s) => {
            let _ = s.set_write_timeout(Some(Duration::from_secs(10)));
            let chunk = vec![b'x'; 1 << 20];
            let mut sent = 0usize;
            for _ in 0..mib {
                match s.write(&chunk) {
                    Ok(n) => sent += n,
                    Err(_) => break,
                }
                if sent < chunk.len() {
                    break;
                }
            }
            let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
            let mut out = String::new();
            let _ = s.read_to_string(&mut out);
            println!(
                "flood {socket}: sent {sent} bytes of {} before the agent stopped reading; answer {}",
                mib << 20,
                out.trim()
            );
        }
    }
}

fn idle(socket: &str, n: usize, secs: u64) {
    let mut conns = Vec::new();
    let mut failed = 0;
    for _ in 0..n {
        match UnixStream::connect(socket) {
            Ok(s) => conns.push(s),
            Err(_) => failed += 1,
        }
    }
    std::thread::sleep(Duration::from_secs(secs));
    let t = Instant::now();
    let mut closed = 0;
    for s in &mut conns {
        let _ = s.set_read_timeout(Some(Duration::from_millis(10)));
        let mut b = [0u8; 1];
        // EOF or an answer: the agent let go of this connection.
        if s.read(&mut b).is_ok() {
            closed += 1;
        }
    }
    println!(
        "idle {socket}: opened {} (failed {failed}), closed by the agent {closed}, checked in {} ms",
        conns.len(),
        t.elapsed().as_millis()
    );
}

/// Serve `text` on `addr` (TCP) to every connection, until killed.
fn serve(addr: &str, text: &str) {
    let l = match std::net::TcpListener::bind(addr) {
        Ok(l) => l,
        Err(e) => return println!("serve {addr}: bind: {e}"),
    };
    println!("serve {addr}: listening");
    for mut c in l.incoming().flatten() {
        let _ = writeln!(c, "{text}");
    }
}

/// Connect to `target` (`HOST:PORT`, the host a name or an address) within 2 s and print the
/// first line it sends: `connect TARGET: got LINE`, or why not.
fn connect(target: &str) {
    use std::net::ToSocketAddrs;
    let addr = match target.to_socket_addrs().map(|mut a| a.next()) {
        Ok(Some(a)) => a,
        Ok(None) => return println!("connect {target}: resolve: no address"),
        Err(e) => return println!("connect {target}: resolve: {e}"),
    };
    match std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
        Err(e) => println!("connect {target} ({addr}): refused or unreachable: {e}"),
        Ok(mut s) => {
            let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
            // An HTTP server (the agent's /metrics) answers a request; the tests' line servers
            // ignore it.
            let _ = s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n");
            let mut line = String::new();
            let _ = std::io::BufRead::read_line(&mut std::io::BufReader::new(&mut s), &mut line);
            println!("connect {target} ({addr}): got {}", line.trim());
        }
    }
}

/// The address this process sends from towards `addr` (a UDP socket's route; nothing is sent).
fn source(addr: &str) {
    let s = std::net::UdpSocket::bind("0.0.0.0:0").and_then(|s| {
        s.connect(addr)?;
        s.local_addr()
    });
    match s {
        Ok(a) => println!("{}", a.ip()),
        Err(e) => println!("source {addr}: {e}"),
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let arg = |i: usize| args.get(i).cloned().unwrap_or_default();
    match arg(1).as_str() {
        "ptrace" => ptrace(arg(2).parse().unwrap_or(0)),
        "hook" => hook(&arg(2)),
        "flood" => flood(&arg(2), arg(3).parse().unwrap_or(1)),
        "idle" => idle(
            &arg(2),
            arg(3).parse().unwrap_or(1),
            arg(4).parse().unwrap_or(1),
        ),
        "serve" => serve(&arg(2), &arg(3)),
        "connect" => connect(&arg(2)),
        "source" => source(&arg(2)),
        _ => {
            eprintln!(
                "usage: fw-attack ptrace PID | hook SOCKET | flood SOCKET MIB | idle SOCKET N SECS | serve ADDR TEXT | connect HOST:PORT | source ADDR:PORT"
            );
            return ExitCode::from(64);
        }
    }
    ExitCode::SUCCESS
}
