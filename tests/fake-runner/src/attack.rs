//! `fw-attack`: what a hostile job's step would run against a neighbour, for the isolation
//! tests. Each subcommand prints one line saying what it tried and what happened, so a test can
//! prove the attack ran before it asserts that it failed.
//!
//! - `ptrace PID`: `PTRACE_ATTACH` to PID (prints `ptrace PID: attached` or the errno).
//! - `hook SOCKET`: send a job-started request to a hook socket and print the answer.
//! - `flood SOCKET MIB`: send MIB MiB without a newline; print how much the agent took.
//! - `idle SOCKET N SECS`: open N connections, hold them SECS seconds; print how many opened
//!   and how many the agent closed meanwhile.
//! - `passfd DIR NAME`: what a non-sandboxed builder does: open DIR (another job's daemon
//!   socket directory) with `O_PATH` and send the descriptor over the abstract socket NAME.
//! - `recvfd NAME CMD…`: what the job does: take a descriptor from the abstract socket NAME,
//!   try to connect to `/proc/self/fd/N/socket`, then run CMD with
//!   `NIX_REMOTE=unix:///proc/self/fd/N/socket` and the descriptor inherited.
//! - `escape PID PATH…` (run as root): what code that took over process PID (a job's
//!   nix-daemon) could do: enter its namespaces (its user namespace too, as its root there,
//!   when it has one of its own; a child forked into its PID namespace does the rest, as a
//!   process the daemon started would), take its capabilities (bounding set and effective
//!   set, nothing more), then try to write each PATH (print `write PATH: ok` or
//!   the error), or for `connect:PATH` connect to the Unix socket PATH (`connect PATH: ok`).
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
/// Serves `text` to every connection on `addr`; with a port of 0 the kernel picks a free one and
/// `port_file` (when given) gets it, written whole under a temporary name and renamed, so a reader
/// never sees half a number. A fixed port on the host's network can be any connection's
/// ephemeral port at that moment (the bind then fails), which is why the tests take port 0.
fn serve(addr: &str, text: &str, port_file: &str) {
    let l = match listen_reusing(addr) {
        Ok(l) => l,
        Err(e) => return println!("serve {addr}: bind: {e}"),
    };
    let port = l.local_addr().map(|a| a.port()).unwrap_or(0);
    println!("serve {addr}: listening on port {port}");
    if !port_file.is_empty() {
        let tmp = format!("{port_file}.tmp");
        if let Err(e) = std::fs::write(&tmp, format!("{port}\n"))
            .and_then(|()| std::fs::rename(&tmp, port_file))
        {
            return println!("serve {addr}: {port_file}: {e}");
        }
    }
    for mut c in l.incoming().flatten() {
        let _ = writeln!(c, "{text}");
    }
}

/// A TCP listener on `addr` (IPv4) with SO_REUSEADDR, as servers set it: a connection of a run
/// before, still in TIME_WAIT on the same port, does not refuse the bind.
fn listen_reusing(addr: &str) -> std::io::Result<std::net::TcpListener> {
    use std::os::fd::FromRawFd;
    let sa: std::net::SocketAddrV4 = addr
        .parse()
        .map_err(|e| std::io::Error::other(format!("{addr}: {e}")))?;
    // SAFETY: plain socket calls on a descriptor this function owns until it is handed over.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let listener = std::net::TcpListener::from_raw_fd(fd);
        let one: libc::c_int = 1;
        let sin = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: sa.port().to_be(),
            sin_addr: libc::in_addr {
                s_addr: u32::from(*sa.ip()).to_be(),
            },
            sin_zero: [0; 8],
        };
        if libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_REUSEADDR,
            std::ptr::addr_of!(one).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        ) != 0
            || libc::bind(
                fd,
                std::ptr::addr_of!(sin).cast(),
                std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
            ) != 0
            || libc::listen(fd, 128) != 0
        {
            return Err(std::io::Error::last_os_error());
        }
        Ok(listener)
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

fn abstract_addr(name: &str) -> std::io::Result<std::os::unix::net::SocketAddr> {
    use std::os::linux::net::SocketAddrExt;
    std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())
}

/// The buffers of a one-byte message with room for one descriptor.
fn one_byte(byte: &mut [u8; 1]) -> (libc::iovec, Vec<u8>) {
    // SAFETY: CMSG_SPACE is a pure computation.
    let space = unsafe { libc::CMSG_SPACE(std::mem::size_of::<i32>() as u32) } as usize;
    (
        libc::iovec {
            iov_base: byte.as_mut_ptr().cast(),
            iov_len: 1,
        },
        vec![0u8; space],
    )
}

/// A message header over `one_byte`'s buffers (which must outlive its use).
fn one_fd_msg(iov: &mut libc::iovec, control: &mut [u8]) -> libc::msghdr {
    // SAFETY: a zeroed msghdr is valid; the caller keeps the buffers alive.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = control.len();
    msg
}

fn passfd(dir: &str, name: &str) {
    let Ok(path) = std::ffi::CString::new(dir) else {
        println!("passfd {dir}: bad path");
        return;
    };
    // SAFETY: open(2) with a NUL-terminated path.
    let fd = unsafe { libc::open(path.as_ptr(), libc::O_PATH | libc::O_DIRECTORY) };
    if fd < 0 {
        println!("passfd {dir}: open: {}", std::io::Error::last_os_error());
        return;
    }
    let t = Instant::now();
    let stream = loop {
        match abstract_addr(name).and_then(|a| UnixStream::connect_addr(&a)) {
            Ok(s) => break s,
            Err(e) if t.elapsed() > Duration::from_secs(20) => {
                println!("passfd {dir}: connect @{name}: {e}");
                return;
            }
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    };
    use std::os::fd::AsRawFd;
    let mut byte = [b'x'];
    let (mut iov, mut control) = one_byte(&mut byte);
    let msg = one_fd_msg(&mut iov, &mut control);
    // SAFETY: the control buffer holds one cmsg with one descriptor (CMSG_SPACE above).
    let sent = unsafe {
        let c = libc::CMSG_FIRSTHDR(&msg);
        (*c).cmsg_level = libc::SOL_SOCKET;
        (*c).cmsg_type = libc::SCM_RIGHTS;
        (*c).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<i32>() as u32) as usize;
        std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<i32>(), fd);
        libc::sendmsg(stream.as_raw_fd(), &msg, 0)
    };
    if sent == 1 {
        println!("passfd {dir}: sent");
    } else {
        println!("passfd {dir}: sendmsg: {}", std::io::Error::last_os_error());
    }
}

fn recvfd(name: &str, cmd: &[String]) -> ExitCode {
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;
    let listener =
        match abstract_addr(name).and_then(|a| std::os::unix::net::UnixListener::bind_addr(&a)) {
            Ok(l) => l,
            Err(e) => {
                println!("recvfd @{name}: bind: {e}");
                return ExitCode::from(1);
            }
        };
    // Not forever: a builder that could not open the directory never connects.
    let _ = listener.set_nonblocking(true);
    let t = Instant::now();
    let stream = loop {
        match listener.accept() {
            Ok((s, _)) => break s,
            Err(_) if t.elapsed() > Duration::from_secs(30) => {
                println!("recvfd @{name}: no descriptor came within 30 s");
                return ExitCode::from(1);
            }
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    };
    let _ = stream.set_nonblocking(false);
    let mut byte = [0u8; 1];
    let (mut iov, mut control) = one_byte(&mut byte);
    let mut msg = one_fd_msg(&mut iov, &mut control);
    // SAFETY: recvmsg into the buffers above; the cmsg is read only if the kernel filled one.
    let fd = unsafe {
        if libc::recvmsg(stream.as_raw_fd(), &mut msg, 0) != 1 {
            println!(
                "recvfd @{name}: recvmsg: {}",
                std::io::Error::last_os_error()
            );
            return ExitCode::from(1);
        }
        let c = libc::CMSG_FIRSTHDR(&msg);
        if c.is_null() || (*c).cmsg_type != libc::SCM_RIGHTS {
            println!("recvfd @{name}: no descriptor came");
            return ExitCode::from(1);
        }
        std::ptr::read_unaligned(libc::CMSG_DATA(c).cast::<i32>())
    };
    let seen = std::fs::read_link(format!("/proc/self/fd/{fd}")).unwrap_or_default();
    let socket = format!("/proc/self/fd/{fd}/socket");
    match UnixStream::connect(&socket) {
        Ok(_) => println!("recvfd @{name}: got {}; connect: connected", seen.display()),
        Err(e) => println!("recvfd @{name}: got {}; connect: {e}", seen.display()),
    }
    let _ = std::io::stdout().flush();
    let Some((program, args)) = cmd.split_first() else {
        return ExitCode::SUCCESS;
    };
    // SAFETY: clearing FD_CLOEXEC on a descriptor we own, so that CMD inherits it.
    unsafe { libc::fcntl(fd, libc::F_SETFD, 0) };
    let e = std::process::Command::new(program)
        .args(args)
        .env("NIX_REMOTE", format!("unix://{socket}"))
        .exec();
    println!("recvfd @{name}: exec {program}: {e}");
    ExitCode::from(1)
}

/// A capability set from `/proc/PID/status` (`CapBnd:`, `CapEff:`), hex.
fn cap_set(status: &str, key: &str) -> u64 {
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap_or(0)
}

fn escape(pid: &str, paths: &[String]) -> ExitCode {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let (bnd, eff) = (cap_set(&status, "CapBnd:"), cap_set(&status, "CapEff:"));
    let mut nss = Vec::new();
    for ns in ["cgroup", "ipc", "uts", "net", "pid", "mnt"] {
        match std::fs::File::open(format!("/proc/{pid}/ns/{ns}")) {
            Ok(f) => nss.push((ns, f)),
            Err(e) => {
                println!("escape {pid}: open ns/{ns}: {e}");
                return ExitCode::from(1);
            }
        }
    }
    // Its user namespace (a daemon's own, when it has one), opened while `/proc` is the
    // host's.
    let own = std::fs::read_link("/proc/self/ns/user").ok();
    let theirs = std::fs::read_link(format!("/proc/{pid}/ns/user")).ok();
    let userns = match std::fs::File::open(format!("/proc/{pid}/ns/user")) {
        Ok(f) => (theirs.is_some() && theirs != own).then_some(f),
        Err(e) => {
            println!("escape {pid}: open ns/user: {e}");
            return ExitCode::from(1);
        }
    };
    use std::os::fd::AsRawFd;
    for (ns, f) in &nss {
        // SAFETY: setns(2) on a namespace descriptor we hold.
        if unsafe { libc::setns(f.as_raw_fd(), 0) } != 0 {
            println!(
                "escape {pid}: setns {ns}: {}",
                std::io::Error::last_os_error()
            );
            return ExitCode::from(1);
        }
    }
    // Its user namespace last, as root of the host (entering it first would leave no right
    // to enter the others), then its root there.
    if let Some(f) = &userns {
        // SAFETY: setns(2) on a namespace descriptor we hold, then plain id changes.
        let ok = unsafe {
            libc::setns(f.as_raw_fd(), libc::CLONE_NEWUSER) == 0
                && libc::setgroups(0, std::ptr::null()) == 0
                && libc::setresgid(0, 0, 0) == 0
                && libc::setresuid(0, 0, 0) == 0
        };
        if !ok {
            println!(
                "escape {pid}: setns user: {}",
                std::io::Error::last_os_error()
            );
            return ExitCode::from(1);
        }
    }
    let _ = std::env::set_current_dir("/");
    let _ = std::io::stdout().flush();
    // SAFETY: fork(2) in this single-threaded tool; the child runs on, the parent waits.
    let child = unsafe { libc::fork() };
    if child < 0 {
        println!("escape {pid}: fork: {}", std::io::Error::last_os_error());
        return ExitCode::from(1);
    }
    if child > 0 {
        let mut status = 0;
        // SAFETY: waitpid(2) on our own child.
        unsafe { libc::waitpid(child, &mut status, 0) };
        return ExitCode::SUCCESS;
    }
    for cap in 0..64 {
        if bnd & (1 << cap) == 0 {
            // SAFETY: prctl with integer arguments; EINVAL for caps the kernel lacks.
            unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) };
        }
    }
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    let header = Header {
        version: 0x2008_0522,
        pid: 0,
    };
    let data = [
        Data {
            effective: eff as u32,
            permitted: eff as u32,
            inheritable: 0,
        },
        Data {
            effective: (eff >> 32) as u32,
            permitted: (eff >> 32) as u32,
            inheritable: 0,
        },
    ];
    // SAFETY: capset(2) with a version-3 header and two data structs.
    if unsafe { libc::syscall(libc::SYS_capset, &header, data.as_ptr()) } != 0 {
        println!("escape {pid}: capset: {}", std::io::Error::last_os_error());
        return ExitCode::from(1);
    }
    // SAFETY: getuid(2) cannot fail.
    let uid = unsafe { libc::getuid() };
    println!(
        "escape {pid}: entered its namespaces as uid {uid} there with CapBnd={bnd:016x} CapEff={eff:016x}"
    );
    for p in paths {
        if let Some(socket) = p.strip_prefix("connect:") {
            match UnixStream::connect(socket) {
                Ok(_) => println!("connect {socket}: ok"),
                Err(e) => println!("connect {socket}: {e}"),
            }
            continue;
        }
        let r = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(p)
            .and_then(|mut f| f.write_all(b"escaped\n"));
        match r {
            Ok(()) => println!("write {p}: ok"),
            Err(e) => println!("write {p}: {e}"),
        }
    }
    let _ = std::io::stdout().flush();
    // SAFETY: the forked child ends here, its output flushed.
    unsafe { libc::_exit(0) }
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
        "serve" => serve(&arg(2), &arg(3), &arg(4)),
        "connect" => connect(&arg(2)),
        "source" => source(&arg(2)),
        "passfd" => passfd(&arg(2), &arg(3)),
        "recvfd" => return recvfd(&arg(2), args.get(3..).unwrap_or_default()),
        "escape" => return escape(&arg(2), args.get(3..).unwrap_or_default()),
        _ => {
            eprintln!(
                "usage: fw-attack ptrace PID | hook SOCKET | flood SOCKET MIB | idle SOCKET N SECS | serve ADDR TEXT [PORT_FILE] | connect HOST:PORT | source ADDR:PORT | passfd DIR NAME | recvfd NAME CMD… | escape PID PATH…"
            );
            return ExitCode::from(64);
        }
    }
    ExitCode::SUCCESS
}
