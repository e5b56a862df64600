//! A job's own network: a network namespace joined by the job and its nix-daemon, linked to
//! the host by a veth pair, reaching the outside world through the host's forwarding and an
//! nftables NAT — and nothing on the host or in another job.
//!
//! The kernel does the forwarding (veth, routing, conntrack); the agent only makes the pair,
//! its addresses and routes (rtnetlink, no helper process per job) and, once per process,
//! loads one nftables table that holds for every job by interface name:
//!
//! - a job's link on the host is `fwj<index>` (`fwm<index>` when its lane allows link-local
//!   metadata), with `10.213.0.0/16` addresses: the host end `.2i`, the job's end `.2i+1`
//!   (a /31), the job's default route through the host end;
//! - `input`: nothing from a job reaches the host itself (any of its addresses; its loopback
//!   is not routable from another namespace at all) except answers to the host's own
//!   connections, and for `fwm*` the link-local range;
//! - `forward`: nothing new enters a job's link (no job reaches another job, and nothing on the
//!   network reaches a job), `169.254.0.0/16` is dropped for `fwj*`, IPv6 is not forwarded;
//! - `postrouting`: what a job sends out is masqueraded behind the host's address.
//!
//! The namespace lives as long as a process of the job does: the agent drops its descriptor
//! once the job's processes are started, and when teardown has emptied the job's cgroup the
//! kernel removes the namespace and the veth pair with it.

mod netlink;

use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::process::Command;

use crate::reaper::Spawner;
use netlink::Netlink;

/// The addresses jobs get: `10.213.0.0/16`, a /31 per job.
pub const POOL: Ipv4Addr = Ipv4Addr::new(10, 213, 0, 0);
/// Job links whose lane allows the link-local range have indexes from here on.
const METADATA_BIT: u16 = 0x4000;
/// The name of the agent's nftables table (family `inet`).
pub const TABLE: &str = "flywheel";
/// The nftables table every job's isolation rests on, by interface name (loaded atomically:
/// the same text replaces itself, so agents on one host never disagree).
pub const RULES: &str = r#"table inet flywheel
delete table inet flywheel
table inet flywheel {
	chain input {
		type filter hook input priority filter; policy accept;
		iifname "fwj*" ct state established,related accept
		iifname "fwm*" ct state established,related accept
		iifname "fwm*" ip daddr 169.254.0.0/16 accept
		iifname "fwj*" drop
		iifname "fwm*" drop
	}
	chain forward {
		type filter hook forward priority filter; policy accept;
		oifname "fwj*" ct state established,related accept
		oifname "fwm*" ct state established,related accept
		oifname "fwj*" drop
		oifname "fwm*" drop
		iifname "fwj*" ip daddr 169.254.0.0/16 drop
		iifname "fwj*" meta nfproto ipv6 drop
		iifname "fwm*" meta nfproto ipv6 drop
	}
	chain postrouting {
		type nat hook postrouting priority srcnat; policy accept;
		iifname "fwj*" masquerade
		iifname "fwm*" masquerade
	}
}
"#;

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("the job's network: {what}: {source}")]
    Io {
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("the job's network: {0}")]
    Host(String),
}

fn io_err(what: &'static str) -> impl FnOnce(io::Error) -> NetError {
    move |source| NetError::Io { what, source }
}

/// A job's network namespace, made and linked; dropped once the job's processes joined it.
#[derive(Debug)]
pub struct JobNet {
    ns: OwnedFd,
    /// The host end of the job's veth pair.
    pub link: String,
    /// The job's address, and the host end's (its gateway).
    pub addr: Ipv4Addr,
    pub gateway: Ipv4Addr,
}

impl JobNet {
    /// The namespace's descriptor, for `setns` in the job's children.
    pub fn fd(&self) -> RawFd {
        self.ns.as_raw_fd()
    }

    /// A descriptor of the namespace of one's own (a daemon started later joins it).
    pub fn dup(&self) -> std::io::Result<OwnedFd> {
        self.ns.try_clone()
    }

    /// Make a namespace with its loopback up and a veth pair to the host (on a thread of its
    /// own: a network namespace is a thread's, and the agent's threads stay in the host's).
    pub fn create(allow_metadata: bool) -> Result<JobNet, NetError> {
        std::thread::Builder::new()
            .name("flywheel-netns".into())
            .spawn(move || build(allow_metadata))
            .map_err(io_err("start its thread"))?
            .join()
            .map_err(|_| NetError::Host("its thread panicked".into()))?
    }
}

/// The addresses of the pair with `index`: the host end's and the job's.
pub fn pair(index: u16) -> (Ipv4Addr, Ipv4Addr) {
    let base = u32::from(POOL) + 2 * u32::from(index);
    (Ipv4Addr::from(base), Ipv4Addr::from(base + 1))
}

fn build(allow_metadata: bool) -> Result<JobNet, NetError> {
    let mut host = Netlink::open().map_err(io_err("open rtnetlink"))?;
    // SAFETY: unshare(2) of this thread's network namespace only.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        return Err(io_err(
            "make a network namespace (the agent needs CAP_SYS_ADMIN)",
        )(io::Error::last_os_error()));
    }
    let ns: OwnedFd = std::fs::File::open("/proc/thread-self/ns/net")
        .map_err(io_err("open the namespace"))?
        .into();
    let mut inner = Netlink::open().map_err(io_err("open rtnetlink in the namespace"))?;
    inner.up(1).map_err(io_err("bring the job's loopback up"))?;
    for _ in 0..64 {
        let index = fastrand::u16(1..METADATA_BIT) | if allow_metadata { METADATA_BIT } else { 0 };
        let link = format!("{}{index:04x}", if allow_metadata { "fwm" } else { "fwj" });
        match host.add_veth(&link, "eth0", ns.as_raw_fd()) {
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => continue,
            r => r.map_err(io_err(
                "create the veth pair (the agent needs CAP_NET_ADMIN)",
            ))?,
        }
        let (gateway, addr) = pair(index);
        let linked = (|| {
            let h = host.index(&link)?;
            host.add_addr(h, gateway, 31)?;
            host.up(h)?;
            let j = inner.index("eth0")?;
            inner.add_addr(j, addr, 31)?;
            inner.up(j)?;
            inner.default_route(j, gateway)
        })();
        if let Err(e) = linked {
            let _ = host.delete(&link);
            return Err(io_err("address and route the veth pair")(e));
        }
        return Ok(JobNet {
            ns,
            link,
            addr,
            gateway,
        });
    }
    Err(NetError::Host(
        "64 tries found no free link name: are thousands of jobs running?".into(),
    ))
}

/// What the host must give before a job gets a network of its own: forwarding on, and the
/// agent's nftables table there. Looked at before every job (a netlink question, well under a
/// millisecond), because a firewall reload (`nftables.service` flushes the whole ruleset)
/// would otherwise leave jobs' links open to the host; loaded with `nft` when missing.
pub fn ensure_host(sp: &dyn Spawner) -> Result<(), NetError> {
    static LOADING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one = LOADING
        .lock()
        .map_err(|_| NetError::Host("a poisoned lock".into()))?;
    let fwd = std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward")
        .map_err(io_err("read /proc/sys/net/ipv4/ip_forward"))?;
    if fwd.trim() != "1" {
        return Err(NetError::Host("net.ipv4.ip_forward is 0, so a job's namespace cannot reach the outside world: set it to 1 (systemd/flywheel-agent.sysctl.conf into /etc/sysctl.d/, then `sysctl --system`), or give the lane network = \"host\"".into()));
    }
    if Netlink::nft_table_exists(TABLE).map_err(io_err("ask nftables for the agent's table"))? {
        return Ok(());
    }
    let nft = ["/usr/sbin/nft", "/sbin/nft", "/usr/bin/nft"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .ok_or_else(|| {
            NetError::Host(
                "nft is missing: install nftables (the jobs' NAT and isolation rules), or give the lane network = \"host\"".into(),
            )
        })?;
    let out = sp
        .output(Command::new(nft).arg(RULES))
        .map_err(io_err("run nft"))?;
    if !out.status.success() {
        return Err(NetError::Host(format!(
            "nft refused the agent's table (does the kernel have nf_tables with nat and conntrack?): {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    if !Netlink::nft_table_exists(TABLE).map_err(io_err("ask nftables for the agent's table"))? {
        return Err(NetError::Host(format!(
            "nft loaded the table inet {TABLE}, but it is not there"
        )));
    }
    Ok(())
}

/// The `resolv.conf` a job sees: the lane's nameservers, else the host's — except those on
/// the host's loopback (systemd-resolved's `127.0.0.53`, a local dnsmasq), which a job's
/// namespace cannot reach; for those, the upstream servers systemd-resolved lists in
/// `/run/systemd/resolve/resolv.conf`. `None` when no usable nameserver is left.
pub fn job_resolv(lane_dns: &[Ipv4Addr], host: &str, resolved: Option<&str>) -> Option<String> {
    let mut out = String::from("# Written by flywheel-agent for this job's network namespace.\n");
    let keep = |text: &str, out: &mut String| {
        for l in text.lines() {
            let w = l.split_whitespace().next().unwrap_or_default();
            if matches!(w, "search" | "domain" | "options") {
                out.push_str(l.trim());
                out.push('\n');
            }
        }
    };
    if !lane_dns.is_empty() {
        keep(host, &mut out);
        for ip in lane_dns {
            out.push_str(&format!("nameserver {ip}\n"));
        }
        return Some(out);
    }
    let usable = |text: &str| -> Vec<Ipv4Addr> {
        text.lines()
            .filter_map(|l| l.trim().strip_prefix("nameserver"))
            .filter_map(|ip| ip.trim().parse::<Ipv4Addr>().ok())
            .filter(|ip| !ip.is_loopback() && !ip.is_unspecified())
            .collect()
    };
    let (from, servers) = match usable(host) {
        s if !s.is_empty() => (host, s),
        _ => {
            let r = resolved?;
            (r, usable(r))
        }
    };
    if servers.is_empty() {
        return None;
    }
    keep(from, &mut out);
    for ip in servers {
        out.push_str(&format!("nameserver {ip}\n"));
    }
    Some(out)
}

/// [`job_resolv`] from this host's files, or why there is none.
pub fn host_resolv(lane_dns: &[Ipv4Addr]) -> Result<String, NetError> {
    let host = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
    let resolved = std::fs::read_to_string("/run/systemd/resolve/resolv.conf").ok();
    job_resolv(lane_dns, &host, resolved.as_deref()).ok_or_else(|| {
        NetError::Host("the host's /etc/resolv.conf names no nameserver a job's namespace can reach (only loopback ones, and no /run/systemd/resolve/resolv.conf): give the lane dns = [\"ADDRESS\"]".into())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_resolver_on_the_hosts_loopback_is_replaced_by_its_upstreams() {
        let stub = "# stub\nnameserver 127.0.0.53\noptions edns0 trust-ad\nsearch corp.example\n";
        let upstream = "nameserver 192.0.2.1\nnameserver 2001:db8::1\nnameserver 192.0.2.2\nsearch corp.example\n";
        let r = job_resolv(&[], stub, Some(upstream)).expect("upstreams");
        assert!(!r.contains("127.0.0.53"), "{r}");
        assert!(
            r.contains("nameserver 192.0.2.1\nnameserver 192.0.2.2\n"),
            "{r}"
        );
        assert!(!r.contains("2001:db8"), "no IPv6 in a job's network: {r}");
        assert!(r.contains("search corp.example"), "{r}");
        // A plain host resolver is kept; the lane's servers win over both.
        let plain = "nameserver 192.0.2.9\n";
        assert!(job_resolv(&[], plain, None)
            .expect("kept")
            .contains("nameserver 192.0.2.9"));
        let lane = job_resolv(&[Ipv4Addr::new(198, 51, 100, 7)], stub, None).expect("lane");
        assert!(
            lane.contains("nameserver 198.51.100.7") && !lane.contains("127.0.0.53"),
            "{lane}"
        );
        // Only loopback, and no systemd-resolved file: nothing usable.
        assert_eq!(job_resolv(&[], stub, None), None);
    }

    #[test]
    fn pairs_are_a_slash_31_each_inside_the_pool() {
        assert_eq!(
            pair(1),
            (Ipv4Addr::new(10, 213, 0, 2), Ipv4Addr::new(10, 213, 0, 3))
        );
        assert_eq!(
            pair(0x7fff),
            (
                Ipv4Addr::new(10, 213, 255, 254),
                Ipv4Addr::new(10, 213, 255, 255)
            )
        );
    }
}
