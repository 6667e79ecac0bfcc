//! [`Monitor`]: tamper detection through nftables change notifications.
//!
//! SECURITY.md promises that if anything removes or alters Cordon's table,
//! the agent restores it within a second. Rather than polling, the agent
//! subscribes to the kernel's nftables notifications (`NFNLGRP_NFTABLES`):
//! every committed change to any table is multicast to subscribers, each
//! notification naming its table and carrying, as `nlmsg_pid`, the netlink
//! port of the socket whose batch caused it. Changes made by our own
//! [`crate::Firewall`] are recognised by its port and ignored; so are
//! changes to other tables, which are not Cordon's business.

use std::io;
use std::os::fd::{AsRawFd, RawFd};

use crate::NftError;
use crate::firewall::set_cloexec;
use crate::netlink::{self, Message, NFPROTO_INET};

/// A large receive buffer makes an overflow (lost notifications) unlikely;
/// an overflow is still handled, as "maybe tampered".
const RCVBUF: usize = 4 << 20;

/// Subscribes to nftables change notifications (`NFNLGRP_NFTABLES` on a
/// `NETLINK_NETFILTER` socket), in the network namespace of the thread that
/// opened it.
pub struct Monitor {
    socket: mnl::Socket,
    buf: Vec<u8>,
}

// SAFETY: as for `Firewall`: libmnl's `struct mnl_socket` only holds a
// descriptor and its address, and the Monitor owns it exclusively.
unsafe impl Send for Monitor {}

impl std::fmt::Debug for Monitor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Monitor")
            .field("fd", &self.socket.as_raw_fd())
            .finish()
    }
}

impl Monitor {
    /// Opens the socket and joins the nftables notification group.
    pub fn open() -> Result<Monitor, NftError> {
        let socket = mnl::Socket::new(mnl::Bus::Netfilter).map_err(|source| NftError::Io {
            action: "open a netfilter netlink socket",
            source,
        })?;
        let fd = socket.as_raw_fd();
        set_cloexec(fd).map_err(|source| NftError::Io {
            action: "make the netlink socket close-on-exec",
            source,
        })?;
        netlink::set_int_opt(
            fd,
            libc::SOL_NETLINK,
            libc::NETLINK_ADD_MEMBERSHIP,
            libc::NFNLGRP_NFTABLES,
        )
        .map_err(|source| NftError::Io {
            action: "subscribe to nftables notifications",
            source,
        })?;
        netlink::grow_buffer(fd, libc::SO_RCVBUFFORCE, libc::SO_RCVBUF, RCVBUF);
        Ok(Monitor {
            socket,
            buf: vec![0; netlink::RECV_BUFFER],
        })
    }

    /// Blocks until at least one notification arrives, then drains what is
    /// queued without blocking; returns true if any of them concerns
    /// Cordon's table (family inet, table [`policy::TABLE`]) and was NOT
    /// caused by the netlink port `own_port` (our [`crate::Firewall`]).
    /// Notifications of other tables are ignored. A receive buffer overflow
    /// (`ENOBUFS`: notifications were lost) counts as "maybe tampered".
    ///
    /// With tokio's `AsyncFd` around [`Monitor::as_raw_fd`], call this once
    /// the descriptor is readable (it then does not block) and clear the
    /// readiness afterwards: it always reads until the socket is empty.
    pub fn wait_for_foreign_change(&mut self, own_port: u32) -> Result<bool, NftError> {
        let fd = self.socket.as_raw_fd();
        loop {
            netlink::wait_readable(fd, -1).map_err(|source| NftError::Io {
                action: "wait for nftables notifications",
                source,
            })?;
            let mut received = false;
            let mut foreign = false;
            loop {
                match netlink::recv_nowait(fd, &mut self.buf) {
                    Ok(Some(n)) => {
                        received = true;
                        foreign |= foreign_change(&self.buf[..n], own_port);
                    }
                    Ok(None) => break,
                    // Lost notifications (ENOBUFS) or one too large to read
                    // whole: we cannot tell what changed.
                    Err(e)
                        if e.raw_os_error() == Some(libc::ENOBUFS)
                            || e.kind() == io::ErrorKind::InvalidData =>
                    {
                        received = true;
                        foreign = true;
                    }
                    Err(source) => {
                        return Err(NftError::Io {
                            action: "receive nftables notifications",
                            source,
                        });
                    }
                }
            }
            if received {
                return Ok(foreign);
            }
        }
    }

    /// The raw fd, so a caller can poll it / wrap it in tokio's `AsyncFd`.
    pub fn as_raw_fd(&self) -> RawFd {
        self.socket.as_raw_fd()
    }
}

impl AsRawFd for Monitor {
    fn as_raw_fd(&self) -> RawFd {
        self.socket.as_raw_fd()
    }
}

/// Whether a datagram of notifications holds a change to Cordon's table
/// made by another socket than `own_port`. A malformed datagram counts as a
/// change: we cannot rule one out.
pub(crate) fn foreign_change(datagram: &[u8], own_port: u32) -> bool {
    netlink::messages(datagram).any(|m| match m {
        Ok(m) => concerns_cordon(&m) && m.port != own_port,
        Err(_) => true,
    })
}

/// Whether a notification is about an object of Cordon's table. Every
/// nftables object message (table, chain, rule, set, set element, stateful
/// object, flowtable) carries its table's name as attribute 1; generation
/// messages (`NEWGEN`, sent after every commit) and traces do not describe
/// an object and are skipped.
fn concerns_cordon(m: &Message<'_>) -> bool {
    let Some(nft_msg) = m.nft_type() else {
        return false;
    };
    if nft_msg == libc::NFT_MSG_NEWGEN as u16 || nft_msg == libc::NFT_MSG_TRACE as u16 {
        return false;
    }
    m.family() == Some(NFPROTO_INET) && m.str_attr(1) == Some(policy::TABLE)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::netlink::Request;

    fn notification(nft_msg: i32, family: u8, table: &str, port: u32) -> Vec<u8> {
        let mut m = Request::new(nft_msg as u16, family, 0, 0)
            .str_attr(1, table)
            .finish();
        m[12..16].copy_from_slice(&port.to_ne_bytes());
        m
    }

    #[test]
    fn own_changes_are_not_foreign() {
        let d = notification(libc::NFT_MSG_DELTABLE, NFPROTO_INET, "cordon", 42);
        assert!(!foreign_change(&d, 42));
        assert!(foreign_change(&d, 43));
    }

    #[test]
    fn other_tables_and_families_are_ignored() {
        let other = notification(libc::NFT_MSG_NEWTABLE, NFPROTO_INET, "other", 7);
        assert!(!foreign_change(&other, 42));
        let ip = notification(libc::NFT_MSG_DELRULE, libc::NFPROTO_IPV4 as u8, "cordon", 7);
        assert!(!foreign_change(&ip, 42));
    }

    #[test]
    fn generation_messages_are_skipped() {
        // NEWGEN's attribute 1 is the generation id, not a table name.
        let gen_msg = notification(libc::NFT_MSG_NEWGEN, 0, "cordon", 7);
        assert!(!foreign_change(&gen_msg, 42));
    }

    #[test]
    fn any_foreign_message_in_a_datagram_counts() {
        let mut d = notification(libc::NFT_MSG_NEWTABLE, NFPROTO_INET, "other", 7);
        d.extend(notification(
            libc::NFT_MSG_NEWRULE,
            NFPROTO_INET,
            "cordon",
            7,
        ));
        assert!(foreign_change(&d, 42));
    }

    #[test]
    fn malformed_datagram_counts_as_a_change() {
        let mut d = notification(libc::NFT_MSG_NEWTABLE, NFPROTO_INET, "other", 7);
        d[0] = 0xff;
        assert!(foreign_change(&d, 42));
    }
}
