//! The few rtnetlink requests a job's network needs (a veth pair, an address, a link up, a
//! default route), written as the kernel's structures on a `NETLINK_ROUTE` socket. A socket
//! stays in the network namespace it was made in, whatever its thread does afterwards.

use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// `VETH_INFO_PEER` (linux/veth.h), not in libc.
const VETH_INFO_PEER: u16 = 1;
const NLMSG_HDRLEN: usize = 16;

/// One rtnetlink socket.
pub(super) struct Netlink {
    fd: OwnedFd,
    seq: u32,
}

/// A message under construction: header, fixed part, attributes.
struct Msg {
    buf: Vec<u8>,
    nests: Vec<usize>,
}

impl Msg {
    fn new(kind: u16, flags: u16) -> Msg {
        let mut buf = vec![0u8; NLMSG_HDRLEN];
        buf[4..6].copy_from_slice(&kind.to_ne_bytes());
        let flags = flags | libc::NLM_F_REQUEST as u16 | libc::NLM_F_ACK as u16;
        buf[6..8].copy_from_slice(&flags.to_ne_bytes());
        Msg {
            buf,
            nests: Vec::new(),
        }
    }

    fn bytes(&mut self, b: &[u8]) -> &mut Msg {
        self.buf.extend_from_slice(b);
        while self.buf.len() % 4 != 0 {
            self.buf.push(0);
        }
        self
    }

    /// `struct ifinfomsg`: family, type, index, flags, change.
    fn ifinfo(&mut self, index: i32, flags: u32, change: u32) -> &mut Msg {
        let mut b = [0u8; 16];
        b[4..8].copy_from_slice(&index.to_ne_bytes());
        b[8..12].copy_from_slice(&flags.to_ne_bytes());
        b[12..16].copy_from_slice(&change.to_ne_bytes());
        self.bytes(&b)
    }

    fn attr(&mut self, kind: u16, data: &[u8]) -> &mut Msg {
        let len = u16::try_from(4 + data.len()).unwrap_or(u16::MAX);
        let mut h = Vec::with_capacity(4 + data.len());
        h.extend_from_slice(&len.to_ne_bytes());
        h.extend_from_slice(&kind.to_ne_bytes());
        h.extend_from_slice(data);
        self.bytes(&h)
    }

    fn name(&mut self, kind: u16, name: &str) -> &mut Msg {
        let mut d = name.as_bytes().to_vec();
        d.push(0);
        self.attr(kind, &d)
    }

    fn begin(&mut self, kind: u16) -> &mut Msg {
        self.nests.push(self.buf.len());
        self.attr(kind, &[])
    }

    fn end(&mut self) -> &mut Msg {
        if let Some(at) = self.nests.pop() {
            let len = u16::try_from(self.buf.len() - at).unwrap_or(u16::MAX);
            self.buf[at..at + 2].copy_from_slice(&len.to_ne_bytes());
        }
        self
    }
}

impl Netlink {
    /// An rtnetlink socket in the calling thread's network namespace.
    pub(super) fn open() -> io::Result<Netlink> {
        Self::open_protocol(libc::NETLINK_ROUTE)
    }

    fn open_protocol(protocol: i32) -> io::Result<Netlink> {
        // SAFETY: socket(2) with constant arguments; the descriptor is owned at once.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                protocol,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh descriptor nobody else owns.
        Ok(Netlink {
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
            seq: 0,
        })
    }

    /// Send one request and read its answer: the kernel's error, or the first reply message.
    fn call(&mut self, msg: &mut Msg) -> io::Result<Vec<u8>> {
        self.seq += 1;
        let len = u32::try_from(msg.buf.len()).map_err(io::Error::other)?;
        msg.buf[0..4].copy_from_slice(&len.to_ne_bytes());
        msg.buf[8..12].copy_from_slice(&self.seq.to_ne_bytes());
        // SAFETY: sending our buffer on our socket (the kernel is the default destination).
        let sent = unsafe {
            libc::send(
                self.fd.as_raw_fd(),
                msg.buf.as_ptr().cast(),
                msg.buf.len(),
                0,
            )
        };
        if sent < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut reply = None;
        let mut buf = vec![0u8; 16384];
        loop {
            // SAFETY: receiving into our buffer.
            let n =
                unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            let mut at = 0usize;
            let n = usize::try_from(n).unwrap_or(0);
            while at + NLMSG_HDRLEN <= n {
                let word =
                    |o: usize| u32::from_ne_bytes([buf[o], buf[o + 1], buf[o + 2], buf[o + 3]]);
                let mlen = word(at) as usize;
                let kind = u16::from_ne_bytes([buf[at + 4], buf[at + 5]]);
                let seq = word(at + 8);
                if mlen < NLMSG_HDRLEN || at + mlen > n {
                    return Err(io::Error::other("a truncated netlink answer"));
                }
                if seq == self.seq {
                    if kind == libc::NLMSG_ERROR as u16 {
                        let code = i32::from_ne_bytes([
                            buf[at + 16],
                            buf[at + 17],
                            buf[at + 18],
                            buf[at + 19],
                        ]);
                        return match code {
                            0 => Ok(reply.unwrap_or_default()),
                            e => Err(io::Error::from_raw_os_error(-e)),
                        };
                    }
                    if reply.is_none() {
                        reply = Some(buf[at..at + mlen].to_vec());
                    }
                }
                at += (mlen + 3) & !3;
            }
        }
    }

    /// A veth pair: `name` here, `peer` moved into the namespace `peer_ns`. `EEXIST` when
    /// either name is taken.
    pub(super) fn add_veth(&mut self, name: &str, peer: &str, peer_ns: RawFd) -> io::Result<()> {
        let mut m = Msg::new(
            libc::RTM_NEWLINK,
            (libc::NLM_F_CREATE | libc::NLM_F_EXCL) as u16,
        );
        m.ifinfo(0, 0, 0)
            .name(libc::IFLA_IFNAME, name)
            .begin(libc::IFLA_LINKINFO)
            .name(libc::IFLA_INFO_KIND, "veth")
            .begin(libc::IFLA_INFO_DATA)
            .begin(VETH_INFO_PEER)
            .ifinfo(0, 0, 0)
            .name(libc::IFLA_IFNAME, peer)
            .attr(libc::IFLA_NET_NS_FD, &peer_ns.to_ne_bytes())
            .end()
            .end()
            .end();
        self.call(&mut m).map(drop)
    }

    /// The index of the link called `name`.
    pub(super) fn index(&mut self, name: &str) -> io::Result<i32> {
        let mut m = Msg::new(libc::RTM_GETLINK, 0);
        m.ifinfo(0, 0, 0).name(libc::IFLA_IFNAME, name);
        let r = self.call(&mut m)?;
        let at = NLMSG_HDRLEN + 4;
        r.get(at..at + 4)
            .map(|b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
            .ok_or_else(|| io::Error::other(format!("no link {name}")))
    }

    pub(super) fn up(&mut self, index: i32) -> io::Result<()> {
        let up = libc::IFF_UP as u32;
        let mut m = Msg::new(libc::RTM_NEWLINK, 0);
        m.ifinfo(index, up, up);
        self.call(&mut m).map(drop)
    }

    /// `addr/prefix` on the link `index`.
    pub(super) fn add_addr(&mut self, index: i32, addr: Ipv4Addr, prefix: u8) -> io::Result<()> {
        let mut m = Msg::new(
            libc::RTM_NEWADDR,
            (libc::NLM_F_CREATE | libc::NLM_F_EXCL) as u16,
        );
        let mut ifa = [0u8; 8];
        ifa[0] = libc::AF_INET as u8;
        ifa[1] = prefix;
        ifa[4..8].copy_from_slice(&index.to_ne_bytes());
        m.bytes(&ifa)
            .attr(libc::IFA_LOCAL, &addr.octets())
            .attr(libc::IFA_ADDRESS, &addr.octets());
        self.call(&mut m).map(drop)
    }

    /// The default route through `gateway` on the link `index`.
    pub(super) fn default_route(&mut self, index: i32, gateway: Ipv4Addr) -> io::Result<()> {
        let mut m = Msg::new(
            libc::RTM_NEWROUTE,
            (libc::NLM_F_CREATE | libc::NLM_F_EXCL) as u16,
        );
        let rt = [
            libc::AF_INET as u8,
            0,
            0,
            0,
            libc::RT_TABLE_MAIN,
            libc::RTPROT_BOOT,
            libc::RT_SCOPE_UNIVERSE,
            libc::RTN_UNICAST,
            0,
            0,
            0,
            0,
        ];
        m.bytes(&rt)
            .attr(libc::RTA_GATEWAY, &gateway.octets())
            .attr(libc::RTA_OIF, &index.to_ne_bytes());
        self.call(&mut m).map(drop)
    }

    /// Whether the nftables table `inet <name>` exists (nfnetlink: no `nft` process).
    pub(super) fn nft_table_exists(name: &str) -> io::Result<bool> {
        let mut nl = Self::open_protocol(libc::NETLINK_NETFILTER)?;
        // NFNL_SUBSYS_NFTABLES << 8 | NFT_MSG_GETTABLE; struct nfgenmsg (inet, v0, res 0).
        let mut m = Msg::new((10 << 8) | 1, 0);
        m.bytes(&[libc::NFPROTO_INET as u8, 0, 0, 0]).name(1, name);
        match nl.call(&mut m) {
            Ok(_) => Ok(true),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Delete the link called `name` (a veth: both ends go).
    pub(super) fn delete(&mut self, name: &str) -> io::Result<()> {
        let mut m = Msg::new(libc::RTM_DELLINK, 0);
        m.ifinfo(0, 0, 0).name(libc::IFLA_IFNAME, name);
        self.call(&mut m).map(drop)
    }
}
