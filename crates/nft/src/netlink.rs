//! Raw netlink plumbing: socket options, sending, receiving, and walking the
//! messages and attributes the kernel sends back.
//!
//! libnftnl (through `nftnl`) builds the batch we send, but the answers we
//! read (acknowledgements, dumps, change notifications) only need a header,
//! the `nfgenmsg` and a few flat attributes. Parsing those here in safe Rust
//! is shorter than going through libnftnl's object parsers over FFI, keeps
//! every `unsafe` call in one small place, and lets the parsers be tested
//! without a kernel.

use std::io;
use std::os::fd::RawFd;

/// `NFNL_SUBSYS_NFTABLES`: the high byte of every nftables message type.
pub(crate) const NFNL_SUBSYS_NFTABLES: u16 = 10;
/// `NFPROTO_INET`, the family of Cordon's table.
pub(crate) const NFPROTO_INET: u8 = 1;
/// `NFNETLINK_V0`.
const NFNETLINK_V0: u8 = 0;
const NLMSG_HDRLEN: usize = 16;
const NFGENMSG_LEN: usize = 4;
const NLA_HDRLEN: usize = 4;
/// Attribute type bits (without `NLA_F_NESTED` / `NLA_F_NET_BYTEORDER`).
const NLA_TYPE_MASK: u16 = 0x3fff;

/// Big enough for any single netlink datagram the kernel sends us: dump
/// chunks are at most 32 KiB, and the largest nftables notification (a set
/// element list) is a bit over 64 KiB.
pub(crate) const RECV_BUFFER: usize = 128 * 1024;

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

/// One netlink message as received.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Message<'a> {
    pub ty: u16,
    pub flags: u16,
    pub seq: u32,
    /// `nlmsg_pid`: for notifications, the port of the socket whose request
    /// caused the change (0 for changes made by the kernel itself).
    pub port: u32,
    /// Everything after the `nlmsghdr`.
    pub payload: &'a [u8],
}

impl<'a> Message<'a> {
    /// The nftables message type (`NFT_MSG_*`), if this message belongs to
    /// the nftables subsystem.
    pub fn nft_type(&self) -> Option<u16> {
        (self.ty >> 8 == NFNL_SUBSYS_NFTABLES).then_some(self.ty & 0xff)
    }

    /// The address family of an nftables message (`nfgenmsg.nfgen_family`).
    pub fn family(&self) -> Option<u8> {
        self.payload.first().copied()
    }

    /// The attributes that follow the `nfgenmsg` of an nftables message.
    pub fn attrs(&self) -> Attrs<'a> {
        Attrs {
            rest: self.payload.get(NFGENMSG_LEN..).unwrap_or(&[]),
        }
    }

    /// The first attribute of this type, if any.
    pub fn attr(&self, ty: u16) -> Option<&'a [u8]> {
        self.attrs().find(|(t, _)| *t == ty).map(|(_, data)| data)
    }

    /// A string attribute (NUL-terminated on the wire).
    pub fn str_attr(&self, ty: u16) -> Option<&'a str> {
        self.attr(ty).and_then(attr_str)
    }

    /// For an `NLMSG_ERROR` message: 0 for an acknowledgement, else the
    /// (positive) errno the kernel answered with.
    pub fn error_code(&self) -> Option<i32> {
        if i32::from(self.ty) != libc::NLMSG_ERROR {
            return None;
        }
        let raw: [u8; 4] = self.payload.get(..4)?.try_into().ok()?;
        Some(-i32::from_ne_bytes(raw))
    }

    /// Whether this is the `NLMSG_DONE` that ends a dump.
    pub fn is_done(&self) -> bool {
        i32::from(self.ty) == libc::NLMSG_DONE
    }

    /// Whether a dump was interrupted by a concurrent change.
    pub fn dump_interrupted(&self) -> bool {
        self.flags & libc::NLM_F_DUMP_INTR as u16 != 0
    }
}

/// The string value of an attribute, without its terminating NUL.
pub(crate) fn attr_str(data: &[u8]) -> Option<&str> {
    let end = data.iter().position(|b| *b == 0).unwrap_or(data.len());
    std::str::from_utf8(&data[..end]).ok()
}

/// Iterator over the netlink messages of one received datagram.
pub(crate) struct Messages<'a> {
    rest: &'a [u8],
}

/// Walks the messages of a received datagram. A malformed message ends the
/// walk with an error.
pub(crate) fn messages(buf: &[u8]) -> Messages<'_> {
    Messages { rest: buf }
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_ne_bytes([b[at], b[at + 1]])
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

impl<'a> Iterator for Messages<'a> {
    type Item = Result<Message<'a>, String>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.rest.len() < NLMSG_HDRLEN {
            return None;
        }
        let b = self.rest;
        let len = u32_at(b, 0) as usize;
        if len < NLMSG_HDRLEN || len > b.len() {
            self.rest = &[];
            return Some(Err(format!(
                "malformed netlink message: length {len} with {} bytes left",
                b.len()
            )));
        }
        let message = Message {
            ty: u16_at(b, 4),
            flags: u16_at(b, 6),
            seq: u32_at(b, 8),
            port: u32_at(b, 12),
            payload: &b[NLMSG_HDRLEN..len],
        };
        self.rest = &b[align4(len).min(b.len())..];
        Some(Ok(message))
    }
}

/// Iterator over flat netlink attributes: `(type, value)`.
#[derive(Clone)]
pub(crate) struct Attrs<'a> {
    rest: &'a [u8],
}

impl<'a> Attrs<'a> {
    /// The attributes nested inside an attribute's value.
    pub fn nested(data: &'a [u8]) -> Self {
        Attrs { rest: data }
    }
}

impl<'a> Iterator for Attrs<'a> {
    type Item = (u16, &'a [u8]);

    fn next(&mut self) -> Option<Self::Item> {
        let b = self.rest;
        if b.len() < NLA_HDRLEN {
            return None;
        }
        let len = usize::from(u16_at(b, 0));
        if len < NLA_HDRLEN || len > b.len() {
            self.rest = &[];
            return None;
        }
        let ty = u16_at(b, 2) & NLA_TYPE_MASK;
        self.rest = &b[align4(len).min(b.len())..];
        Some((ty, &b[NLA_HDRLEN..len]))
    }
}

/// Builds one nftables request message (header, `nfgenmsg`, attributes).
pub(crate) struct Request {
    buf: Vec<u8>,
}

impl Request {
    pub fn new(nft_msg: u16, family: u8, flags: u16, seq: u32) -> Self {
        let mut buf = Vec::with_capacity(64);
        buf.extend_from_slice(&0u32.to_ne_bytes()); // length, set by finish
        buf.extend_from_slice(&((NFNL_SUBSYS_NFTABLES << 8) | nft_msg).to_ne_bytes());
        buf.extend_from_slice(&(libc::NLM_F_REQUEST as u16 | flags).to_ne_bytes());
        buf.extend_from_slice(&seq.to_ne_bytes());
        buf.extend_from_slice(&0u32.to_ne_bytes()); // port: the kernel fills it in
        buf.push(family);
        buf.push(NFNETLINK_V0);
        buf.extend_from_slice(&0u16.to_be_bytes()); // res_id
        Request { buf }
    }

    /// Appends a NUL-terminated string attribute.
    pub fn str_attr(mut self, ty: u16, value: &str) -> Self {
        let len = NLA_HDRLEN + value.len() + 1;
        self.buf
            .extend_from_slice(&u16::try_from(len).unwrap_or(u16::MAX).to_ne_bytes());
        self.buf.extend_from_slice(&ty.to_ne_bytes());
        self.buf.extend_from_slice(value.as_bytes());
        self.buf.push(0);
        self.buf.resize(align4(self.buf.len()), 0);
        self
    }

    pub fn finish(mut self) -> Vec<u8> {
        let len = self.buf.len() as u32;
        self.buf[..4].copy_from_slice(&len.to_ne_bytes());
        self.buf
    }
}

/// Sends `parts` as ONE datagram to the kernel. A batch must arrive in a
/// single `sendmsg`: the kernel processes a batch only within one skb, so
/// the page-sized pieces libnftnl hands out must not be sent separately.
pub(crate) fn send_to_kernel(fd: RawFd, parts: &[&[u8]]) -> io::Result<()> {
    let mut iov: Vec<libc::iovec> = parts
        .iter()
        .map(|p| libc::iovec {
            iov_base: p.as_ptr() as *mut libc::c_void,
            iov_len: p.len(),
        })
        .collect();
    let total: usize = parts.iter().map(|p| p.len()).sum();
    // SAFETY: sockaddr_nl is plain data; all-zero is a valid value.
    let mut kernel: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    kernel.nl_family = libc::AF_NETLINK as libc::sa_family_t;
    // SAFETY: msghdr is plain data; all-zero is a valid value.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_name = (&raw mut kernel).cast();
    msg.msg_namelen = std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t;
    msg.msg_iov = iov.as_mut_ptr();
    msg.msg_iovlen = iov.len() as _;
    loop {
        // SAFETY: msg points at live buffers (iov, kernel, parts) for the call.
        let n = unsafe { libc::sendmsg(fd, &msg, 0) };
        if n >= 0 {
            if n as usize != total {
                return Err(io::Error::other(format!(
                    "sent {n} of {total} bytes of a netlink message"
                )));
            }
            return Ok(());
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

/// Receives one datagram without blocking: `Ok(None)` when nothing is queued.
pub(crate) fn recv_nowait(fd: RawFd, buf: &mut [u8]) -> io::Result<Option<usize>> {
    loop {
        // SAFETY: buf is valid for writes of buf.len() bytes. MSG_TRUNC makes
        // the call return the datagram's real length, to detect truncation.
        let n = unsafe {
            libc::recv(
                fd,
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT | libc::MSG_TRUNC,
            )
        };
        if n >= 0 {
            let n = n as usize;
            if n > buf.len() {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "a {n}-byte netlink message did not fit the {}-byte buffer",
                        buf.len()
                    ),
                ));
            }
            return Ok(Some(n));
        }
        let err = io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::EAGAIN) => return Ok(None),
            _ => return Err(err),
        }
    }
}

/// Waits until the socket is readable; `timeout_ms` < 0 waits forever.
/// Returns false on timeout.
pub(crate) fn wait_readable(fd: RawFd, timeout_ms: i32) -> io::Result<bool> {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    loop {
        // SAFETY: one valid pollfd.
        let n = unsafe { libc::poll(&mut pfd, 1, timeout_ms) };
        if n >= 0 {
            return Ok(n > 0);
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

/// Sets an integer socket option.
pub(crate) fn set_int_opt(fd: RawFd, level: i32, name: i32, value: i32) -> io::Result<()> {
    // SAFETY: passes a pointer to a live c_int and its size.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&raw const value).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Reads an integer socket option.
pub(crate) fn get_int_opt(fd: RawFd, level: i32, name: i32) -> io::Result<i32> {
    let mut value: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: passes a pointer to a live c_int and its size.
    let rc = unsafe { libc::getsockopt(fd, level, name, (&raw mut value).cast(), &mut len) };
    if rc == 0 {
        Ok(value)
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Grows a socket buffer to at least `bytes`: with `SO_*BUFFORCE` (root,
/// ignores `net.core.*mem_max`) if allowed, else as far as the limit allows.
pub(crate) fn grow_buffer(fd: RawFd, force: i32, plain: i32, bytes: usize) {
    let bytes = i32::try_from(bytes).unwrap_or(i32::MAX);
    if set_int_opt(fd, libc::SOL_SOCKET, force, bytes).is_err() {
        let _ = set_int_opt(fd, libc::SOL_SOCKET, plain, bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_round_trips_through_the_parser() {
        let req = Request::new(
            libc::NFT_MSG_GETTABLE as u16,
            NFPROTO_INET,
            libc::NLM_F_ACK as u16,
            7,
        )
        .str_attr(1, "cordon")
        .str_attr(3, "x")
        .finish();
        assert_eq!(req.len() % 4, 0);
        let all: Vec<_> = messages(&req).collect::<Result<_, _>>().unwrap();
        assert_eq!(all.len(), 1);
        let m = all[0];
        assert_eq!(m.nft_type(), Some(libc::NFT_MSG_GETTABLE as u16));
        assert_eq!(m.family(), Some(NFPROTO_INET));
        assert_eq!(m.seq, 7);
        assert_eq!(m.str_attr(1), Some("cordon"));
        assert_eq!(m.str_attr(3), Some("x"));
        assert_eq!(m.str_attr(2), None);
        assert_eq!(m.error_code(), None);
    }

    #[test]
    fn truncated_message_is_an_error() {
        let mut req = Request::new(0, NFPROTO_INET, 0, 1).finish();
        req[0] = 200; // claims more bytes than there are
        let first = messages(&req).next().unwrap();
        assert!(first.is_err());
    }

    #[test]
    fn error_message_carries_the_errno() {
        let mut msg = Vec::new();
        msg.extend_from_slice(&36u32.to_ne_bytes());
        msg.extend_from_slice(&(libc::NLMSG_ERROR as u16).to_ne_bytes());
        msg.extend_from_slice(&0u16.to_ne_bytes());
        msg.extend_from_slice(&5u32.to_ne_bytes());
        msg.extend_from_slice(&0u32.to_ne_bytes());
        msg.extend_from_slice(&(-libc::ENOENT).to_ne_bytes());
        msg.extend_from_slice(&[0u8; 16]);
        let m = messages(&msg).next().unwrap().unwrap();
        assert_eq!(m.error_code(), Some(libc::ENOENT));
        assert_eq!(m.seq, 5);
    }
}
