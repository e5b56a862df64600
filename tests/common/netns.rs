//! The tests' "internet": a network namespace the test makes, linked to the host by a veth
//! pair, holding a TCP server (port 8080, answering `remote-ok`), a DNS server (dnsmasq)
//! that knows `remote.flywheel.test`, and a link-local address standing in for a cloud's
//! metadata service. Test traffic goes only there and to loopback.

use std::net::Ipv4Addr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const NAME: &str = "remote.flywheel.test";
pub const PORT: u16 = 8080;

pub struct Internet {
    pub ns: String,
    pub link: String,
    /// The host's address on the link, and the remote end's.
    pub host: Ipv4Addr,
    pub remote: Ipv4Addr,
    /// A link-local address (`169.254.77.N`) routed to the remote end.
    pub link_local: Ipv4Addr,
    dns: Child,
}

fn ip(args: &[&str]) {
    let o = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        o.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

impl Internet {
    pub fn new() -> Internet {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        let k = (pid * 4 + n) % 250;
        let ns = format!("fwt-inet-{pid}-{n}");
        let link = format!("fwti{}{n}", pid % 100_000);
        let host = Ipv4Addr::new(10, 250, k as u8, 1);
        let remote = Ipv4Addr::new(10, 250, k as u8, 2);
        let link_local = Ipv4Addr::new(169, 254, 77, k as u8 + 1);
        ip(&["netns", "add", &ns]);
        ip(&[
            "link", "add", &link, "type", "veth", "peer", "name", "eth0", "netns", &ns,
        ]);
        ip(&["addr", "add", &format!("{host}/30"), "dev", &link]);
        ip(&["link", "set", &link, "up"]);
        ip(&[
            "route",
            "add",
            &format!("{link_local}/32"),
            "via",
            &remote.to_string(),
        ]);
        for args in [
            vec!["link", "set", "lo", "up"],
            vec!["addr", "add", &format!("{remote}/30"), "dev", "eth0"],
            vec!["addr", "add", &format!("{link_local}/32"), "dev", "eth0"],
            vec!["link", "set", "eth0", "up"],
        ] {
            let mut a = vec!["-n", ns.as_str()];
            a.extend(args.iter().map(|s| &**s));
            ip(&a);
        }
        // The server: a thread of this process in the namespace (its socket stays there).
        let path = format!("/run/netns/{ns}");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let f = std::fs::File::open(&path).expect("open the namespace");
            nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
            let l = std::net::TcpListener::bind(("0.0.0.0", PORT)).expect("bind");
            tx.send(()).expect("ready");
            for mut c in l.incoming().flatten() {
                use std::io::Write;
                let _ = writeln!(c, "remote-ok");
            }
        });
        rx.recv_timeout(Duration::from_secs(5)).expect("server up");
        let dns = Command::new("ip")
            .args(["netns", "exec", &ns, "dnsmasq", "--keep-in-foreground"])
            .args([
                "--conf-file=/dev/null",
                "--no-resolv",
                "--no-hosts",
                "--bind-interfaces",
            ])
            .arg(format!("--listen-address={remote}"))
            .arg(format!("--address=/{NAME}/{remote}"))
            .args([
                "--user=root",
                "--group=root",
                "--pid-file",
                "--log-facility=-",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("dnsmasq (tests/setup.sh installs dnsmasq-base)");
        let net = Internet {
            ns,
            link,
            host,
            remote,
            link_local,
            dns,
        };
        // Listening once port 53 (0035) is bound in the namespace.
        let t = Instant::now();
        loop {
            let udp = Command::new("ip")
                .args(["netns", "exec", &net.ns, "cat", "/proc/net/udp"])
                .output()
                .expect("cat");
            if String::from_utf8_lossy(&udp.stdout).contains(":0035 ") {
                break;
            }
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "dnsmasq did not listen"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        net
    }

    /// `ADDRESS:PORT` of the remote server.
    pub fn server(&self) -> String {
        format!("{}:{PORT}", self.remote)
    }
}

impl Drop for Internet {
    fn drop(&mut self) {
        let _ = self.dns.kill();
        let _ = self.dns.wait();
        let _ = Command::new("ip")
            .args(["route", "del", &format!("{}/32", self.link_local)])
            .output();
        let _ = Command::new("ip")
            .args(["link", "del", &self.link])
            .output();
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).output();
    }
}
