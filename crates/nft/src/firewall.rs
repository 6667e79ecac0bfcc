//! [`Firewall`]: applies and reads back Cordon's table over one netfilter
//! netlink socket that stays open for the agent's life.
//!
//! Why one long-lived socket: releasing a netfilter socket right after a
//! batch waits for the kernel's deferred clean-up (6 to 24 ms measured on
//! a 2-core machine with kernel 6.18), which is most of what `nft -f` costs; a batch on an open
//! socket is in force in about 0.1 ms.
//!
//! Why acknowledgements per message: the kernel processes a whole batch
//! inside `sendmsg`, and every message we send carries `NLM_F_ACK`, so when
//! `sendmsg` returns the socket already holds one answer per message (an
//! ack, or the error that aborted the transaction). We drain them without
//! blocking. We do not rely on an ack for the batch *end* marker: kernels
//! before 6.10 never send one, so waiting for it would hang there.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

use policy::Ruleset;

use crate::encode::{self, ElementKey, Encoded};
use crate::netlink::{self, Attrs, Message, NFPROTO_INET, Request};
use crate::{NftError, TableSummary};

/// How long to wait for an answer the kernel owes us before giving up.
/// Batches and the first dump chunk are answered inside `sendmsg`, so this
/// is only a safety net.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);
/// Receive buffer for the answers of a large batch (one ack per message).
const RCVBUF: usize = 1 << 20;
/// Our own request sequence numbers start here, far from the 1..N that
/// libnftnl gives the messages of a batch.
const FIRST_OWN_SEQ: u32 = 0x4000_0000;
/// Reading the table back takes several dumps; if the ruleset generation
/// changes meanwhile, read again, this many times at most.
const READ_ATTEMPTS: usize = 5;

// Attribute numbers from linux/netfilter/nf_tables.h.
const NFTA_TABLE_NAME: u16 = 1;
const NFTA_TABLE_FLAGS: u16 = 2;
const NFT_TABLE_F_DORMANT: u32 = 1;
const NFTA_CHAIN_HOOK: u16 = 4;
const NFTA_CHAIN_POLICY: u16 = 5;
const NFTA_CHAIN_TYPE: u16 = 7;
const NFTA_HOOK_HOOKNUM: u16 = 1;
const NFTA_HOOK_PRIORITY: u16 = 2;
const NFTA_CHAIN_TABLE: u16 = 1;
const NFTA_CHAIN_NAME: u16 = 3;
const NFTA_RULE_TABLE: u16 = 1;
const NFTA_RULE_CHAIN: u16 = 2;
const NFTA_SET_TABLE: u16 = 1;
const NFTA_SET_NAME: u16 = 2;
const NFTA_SET_ELEM_LIST_TABLE: u16 = 1;
const NFTA_SET_ELEM_LIST_SET: u16 = 2;
const NFTA_SET_ELEM_LIST_ELEMENTS: u16 = 3;
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_SET_ELEM_KEY: u16 = 1;
const NFTA_SET_ELEM_FLAGS: u16 = 3;
const NFTA_SET_ELEM_KEY_END: u16 = 10;
const NFTA_DATA_VALUE: u16 = 1;
const NFTA_GEN_ID: u16 = 1;

fn io_error(action: &'static str) -> impl FnOnce(io::Error) -> NftError {
    move |source| NftError::Io { action, source }
}

/// Marks a descriptor close-on-exec: libmnl opens its sockets without
/// `SOCK_CLOEXEC`, and programs the agent starts must not inherit a socket
/// that can rewrite the firewall.
pub(crate) fn set_cloexec(fd: RawFd) -> io::Result<()> {
    // SAFETY: fcntl on a descriptor we own; no pointers involved.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above.
    if unsafe { libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Owns one netfilter netlink socket, kept open for its whole life, and
/// uses it to replace, remove, read back and verify Cordon's table.
///
/// The socket belongs to the network namespace of the thread that called
/// [`Firewall::open`], whichever thread uses it later.
pub struct Firewall {
    socket: mnl::Socket,
    port: u32,
    seq: u32,
    buf: Vec<u8>,
}

// SAFETY: `mnl::Socket` is a pointer to libmnl's `struct mnl_socket`, which
// only holds a descriptor and its bound address; libmnl keeps no
// thread-local state about it. The Firewall owns it exclusively, so moving
// it to another thread is sound. (It is deliberately not `Sync`.)
unsafe impl Send for Firewall {}

impl std::fmt::Debug for Firewall {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Firewall")
            .field("fd", &self.socket.as_raw_fd())
            .field("port", &self.port)
            .finish()
    }
}

impl Firewall {
    /// Opens the netfilter netlink socket (in the calling thread's network
    /// namespace). Changing nftables needs `CAP_NET_ADMIN` there.
    pub fn open() -> Result<Firewall, NftError> {
        let socket = mnl::Socket::new(mnl::Bus::Netfilter)
            .map_err(io_error("open a netfilter netlink socket"))?;
        let fd = socket.as_raw_fd();
        set_cloexec(fd).map_err(io_error("make the netlink socket close-on-exec"))?;
        // Errors then come back as a short header instead of an echo of the
        // whole refused message. Best effort: only makes answers smaller.
        let _ = netlink::set_int_opt(fd, libc::SOL_NETLINK, libc::NETLINK_CAP_ACK, 1);
        netlink::grow_buffer(fd, libc::SO_RCVBUFFORCE, libc::SO_RCVBUF, RCVBUF);
        let port = socket.portid();
        Ok(Firewall {
            socket,
            port,
            seq: FIRST_OWN_SEQ,
            buf: vec![0; netlink::RECV_BUFFER],
        })
    }

    /// This socket's netlink port id (notifications caused by our own
    /// batches carry it).
    pub fn port_id(&self) -> u32 {
        self.port
    }

    /// Replaces Cordon's whole table with `ruleset` in one batch (add table,
    /// delete table, add table, sets, elements, chains, rules: all in one
    /// transaction), or, for `None`, removes the table if it exists (add
    /// table and delete table in one batch, so it is not an error when
    /// absent). The kernel's answer is checked: an error aborts the whole
    /// batch (the previous table stays as it was) and is returned.
    pub fn apply(&mut self, ruleset: Option<&Ruleset>) -> Result<(), NftError> {
        let encoded = encode::encode(ruleset)?;
        let fd = self.socket.as_raw_fd();
        self.discard_pending()?;
        let parts: Vec<&[u8]> = encoded.batch.iter().collect();
        let total: usize = parts.iter().map(|p| p.len()).sum();
        // The kernel refuses a datagram larger than the send buffer.
        let sndbuf = netlink::get_int_opt(fd, libc::SOL_SOCKET, libc::SO_SNDBUF).unwrap_or(0);
        if usize::try_from(sndbuf).unwrap_or(0) < total + 4096 {
            netlink::grow_buffer(fd, libc::SO_SNDBUFFORCE, libc::SO_SNDBUF, 2 * total + 4096);
        }
        netlink::send_to_kernel(fd, &parts).map_err(io_error("send the batch to the kernel"))?;
        self.collect_batch_answers(&encoded)
    }

    /// Like [`Firewall::apply`], then reads the table back and returns
    /// [`NftError::Mismatch`] if it is not what was applied.
    pub fn apply_verified(&mut self, ruleset: Option<&Ruleset>) -> Result<(), NftError> {
        self.apply(ruleset)?;
        let reading = self.read()?;
        match mismatch(ruleset, reading.as_ref()) {
            None => Ok(()),
            Some(reason) => Err(NftError::Mismatch {
                reason,
                expected: ruleset.map(TableSummary::expected),
                found: reading.map(|r| r.summary),
            }),
        }
    }

    /// Reads back what is in the kernel: `None` if Cordon's table is
    /// absent, else for each chain of the table its name and rule count, and
    /// for each set its element count. Used after apply to verify.
    pub fn read_back(&mut self) -> Result<Option<TableSummary>, NftError> {
        Ok(self.read()?.map(|r| r.summary))
    }

    /// Whether the kernel's table matches `ruleset` (`None` = no table),
    /// comparing chains, rule counts, sets and every set element (key and
    /// flags, so an address swapped for another is caught too), and also
    /// that the table is not dormant and each base chain still has its
    /// hook, priority, type and drop policy (changes that leave the counts
    /// alone but open the firewall).
    pub fn verify(&mut self, ruleset: Option<&Ruleset>) -> Result<bool, NftError> {
        let reading = self.read()?;
        Ok(mismatch(ruleset, reading.as_ref()).is_none())
    }

    /// Reads the table. The several dumps this takes are bracketed by reads
    /// of the ruleset generation; if anything changed in between, it reads
    /// again.
    fn read(&mut self) -> Result<Option<Reading>, NftError> {
        for _ in 0..READ_ATTEMPTS {
            let before = self.generation()?;
            let result = self.read_once();
            let after = self.generation()?;
            match result {
                Ok((reading, false)) if before == after => return Ok(reading),
                Err(e) if before == after => return Err(e),
                // Changed while we read: what we saw may be a mix.
                _ => continue,
            }
        }
        Err(NftError::Protocol(format!(
            "nftables changed during each of {READ_ATTEMPTS} attempts to read the table back"
        )))
    }

    fn next_seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1).max(FIRST_OWN_SEQ);
        self.seq
    }

    /// Drops answers left over from an earlier exchange (for example the
    /// acks that follow the first error of a refused batch), so they cannot
    /// be mistaken for answers to the next one.
    fn discard_pending(&mut self) -> Result<(), NftError> {
        let fd = self.socket.as_raw_fd();
        loop {
            match netlink::recv_nowait(fd, &mut self.buf) {
                Ok(Some(_)) => continue,
                Ok(None) => return Ok(()),
                // Leftovers that overflowed or did not fit the buffer are
                // leftovers all the same.
                Err(e)
                    if e.raw_os_error() == Some(libc::ENOBUFS)
                        || e.kind() == io::ErrorKind::InvalidData =>
                {
                    continue;
                }
                Err(e) => {
                    return Err(NftError::Io {
                        action: "clear the netlink socket",
                        source: e,
                    });
                }
            }
        }
    }

    /// Reads the answers to a batch: one ack per message, or the error that
    /// aborted it. Stops at the first error once nothing more is queued.
    fn collect_batch_answers(&mut self, encoded: &Encoded) -> Result<(), NftError> {
        let fd = self.socket.as_raw_fd();
        let wanted = encoded.step_seqs();
        let mut acked = vec![false; wanted.len()];
        let mut missing = wanted.len();
        let mut first_error: Option<(u32, i32)> = None;
        let deadline = Instant::now() + ANSWER_TIMEOUT;
        loop {
            let n = match netlink::recv_nowait(fd, &mut self.buf) {
                Ok(Some(n)) => n,
                Ok(None) => {
                    if first_error.is_some() || missing == 0 {
                        break;
                    }
                    let left = deadline.saturating_duration_since(Instant::now());
                    let ready = netlink::wait_readable(fd, left.as_millis() as i32)
                        .map_err(io_error("wait for the kernel's answer to the batch"))?;
                    if !ready {
                        return Err(NftError::Protocol(format!(
                            "the kernel did not answer {missing} of the {} messages of the batch \
                             within {ANSWER_TIMEOUT:?}",
                            wanted.len()
                        )));
                    }
                    continue;
                }
                Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                    return Err(NftError::Protocol(
                        "the kernel's answers to the batch overflowed the socket's receive \
                         buffer, so whether it was applied is unknown; read the table back"
                            .to_owned(),
                    ));
                }
                Err(e) => {
                    return Err(NftError::Io {
                        action: "receive the kernel's answer to the batch",
                        source: e,
                    });
                }
            };
            for message in netlink::messages(&self.buf[..n]) {
                let message = message.map_err(NftError::Protocol)?;
                match message.error_code() {
                    // Any error aborts the whole transaction, whatever
                    // message it names (commit errors name the batch begin).
                    Some(errno) if errno != 0 => {
                        first_error.get_or_insert((message.seq, errno));
                    }
                    Some(_) if wanted.contains(&message.seq) => {
                        let i = (message.seq - wanted.start) as usize;
                        if !acked[i] {
                            acked[i] = true;
                            missing -= 1;
                        }
                    }
                    _ => {}
                }
            }
        }
        match first_error {
            Some((seq, errno)) => Err(NftError::Kernel {
                request: encoded.describe(seq),
                errno,
            }),
            None => Ok(()),
        }
    }

    /// Sends one request and hands each answer to `each`. A dump ends with
    /// `NLMSG_DONE`; any other request is sent with `NLM_F_ACK` and ends
    /// with its ack. Returns whether a dump was interrupted by a change.
    fn request(
        &mut self,
        what: &str,
        seq: u32,
        request: &[u8],
        mut each: impl FnMut(&Message<'_>),
    ) -> Result<bool, NftError> {
        let fd = self.socket.as_raw_fd();
        self.discard_pending()?;
        netlink::send_to_kernel(fd, &[request])
            .map_err(io_error("send a request to the kernel"))?;
        let mut interrupted = false;
        loop {
            let n = match netlink::recv_nowait(fd, &mut self.buf) {
                Ok(Some(n)) => n,
                Ok(None) => {
                    let ready = netlink::wait_readable(fd, ANSWER_TIMEOUT.as_millis() as i32)
                        .map_err(io_error("wait for the kernel's answer"))?;
                    if !ready {
                        return Err(NftError::Protocol(format!(
                            "the kernel did not answer the request to {what} within \
                             {ANSWER_TIMEOUT:?}"
                        )));
                    }
                    continue;
                }
                Err(e) => {
                    return Err(NftError::Io {
                        action: "receive the kernel's answer",
                        source: e,
                    });
                }
            };
            for message in netlink::messages(&self.buf[..n]) {
                let message = message.map_err(NftError::Protocol)?;
                if message.seq != seq {
                    continue;
                }
                interrupted |= message.dump_interrupted();
                if message.is_done() {
                    // NLMSG_DONE carries the dump's own status.
                    let status = message
                        .payload
                        .get(..4)
                        .map_or(0, |b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]));
                    if status < 0 {
                        return Err(NftError::Kernel {
                            request: format!("the request to {what}"),
                            errno: -status,
                        });
                    }
                    return Ok(interrupted);
                }
                match message.error_code() {
                    Some(0) => return Ok(interrupted),
                    Some(errno) => {
                        return Err(NftError::Kernel {
                            request: format!("the request to {what}"),
                            errno,
                        });
                    }
                    None => each(&message),
                }
            }
        }
    }

    /// The ruleset generation id: it changes with every committed batch.
    fn generation(&mut self) -> Result<u32, NftError> {
        let seq = self.next_seq();
        let request = Request::new(
            libc::NFT_MSG_GETGEN as u16,
            libc::AF_UNSPEC as u8,
            libc::NLM_F_ACK as u16,
            seq,
        )
        .finish();
        let mut generation = None;
        self.request("read the ruleset generation", seq, &request, |m| {
            if m.nft_type() == Some(libc::NFT_MSG_NEWGEN as u16) {
                generation = be32(m.attr(NFTA_GEN_ID));
            }
        })?;
        generation.ok_or_else(|| {
            NftError::Protocol("the kernel's answer about the generation had no id".to_owned())
        })
    }

    fn dump_request(&mut self, nft_msg: i32) -> (u32, Request) {
        let seq = self.next_seq();
        let request = Request::new(nft_msg as u16, NFPROTO_INET, libc::NLM_F_DUMP as u16, seq);
        (seq, request)
    }

    /// One read of the table; the bool says a dump saw a concurrent change.
    fn read_once(&mut self) -> Result<(Option<Reading>, bool), NftError> {
        let table = policy::TABLE;
        let seq = self.next_seq();
        let request = Request::new(
            libc::NFT_MSG_GETTABLE as u16,
            NFPROTO_INET,
            libc::NLM_F_ACK as u16,
            seq,
        )
        .str_attr(NFTA_TABLE_NAME, table)
        .finish();
        let mut dormant = false;
        let result = self.request("read table inet cordon", seq, &request, |m| {
            if m.nft_type() == Some(libc::NFT_MSG_NEWTABLE as u16) {
                dormant = be32(m.attr(NFTA_TABLE_FLAGS)).unwrap_or(0) & NFT_TABLE_F_DORMANT != 0;
            }
        });
        match result {
            Ok(_) => {}
            Err(NftError::Kernel {
                errno: libc::ENOENT,
                ..
            }) => return Ok((None, false)),
            Err(e) => return Err(e),
        }
        let ours = |m: &Message<'_>, nft_msg: i32, table_attr: u16| {
            m.nft_type() == Some(nft_msg as u16)
                && m.family() == Some(NFPROTO_INET)
                && m.str_attr(table_attr) == Some(table)
        };

        let mut chains: Vec<(String, usize)> = Vec::new();
        let mut shapes: Vec<ChainShape> = Vec::new();
        let (seq, request) = self.dump_request(libc::NFT_MSG_GETCHAIN);
        let request = request.str_attr(NFTA_CHAIN_TABLE, table).finish();
        let mut interrupted = self.request("list the chains", seq, &request, |m| {
            if ours(m, libc::NFT_MSG_NEWCHAIN, NFTA_CHAIN_TABLE)
                && let Some(name) = m.str_attr(NFTA_CHAIN_NAME)
            {
                chains.push((name.to_owned(), 0));
                shapes.push(ChainShape::parse(name, m));
            }
        })?;

        let (seq, request) = self.dump_request(libc::NFT_MSG_GETRULE);
        let request = request.str_attr(NFTA_RULE_TABLE, table).finish();
        interrupted |= self.request("list the rules", seq, &request, |m| {
            if ours(m, libc::NFT_MSG_NEWRULE, NFTA_RULE_TABLE) {
                let chain = m.str_attr(NFTA_RULE_CHAIN).unwrap_or_default();
                match chains.iter_mut().find(|(name, _)| name == chain) {
                    Some((_, count)) => *count += 1,
                    // A chain added after we listed them: the generation
                    // check will make us read again.
                    None => chains.push((chain.to_owned(), 1)),
                }
            }
        })?;

        let mut sets: Vec<(String, usize)> = Vec::new();
        let (seq, request) = self.dump_request(libc::NFT_MSG_GETSET);
        let request = request.str_attr(NFTA_SET_TABLE, table).finish();
        interrupted |= self.request("list the sets", seq, &request, |m| {
            if ours(m, libc::NFT_MSG_NEWSET, NFTA_SET_TABLE)
                && let Some(name) = m.str_attr(NFTA_SET_NAME)
            {
                sets.push((name.to_owned(), 0));
            }
        })?;

        let mut elements: Vec<(String, Vec<ElementKey>)> = Vec::with_capacity(sets.len());
        for (name, count) in &mut sets {
            let (seq, request) = self.dump_request(libc::NFT_MSG_GETSETELEM);
            let request = request
                .str_attr(NFTA_SET_ELEM_LIST_TABLE, table)
                .str_attr(NFTA_SET_ELEM_LIST_SET, name)
                .finish();
            let what = format!("list the elements of set {name}");
            let mut keys: Vec<ElementKey> = Vec::new();
            let result = self.request(&what, seq, &request, |m| {
                if ours(m, libc::NFT_MSG_NEWSETELEM, NFTA_SET_ELEM_LIST_TABLE)
                    && let Some(list) = m.attr(NFTA_SET_ELEM_LIST_ELEMENTS)
                {
                    keys.extend(
                        Attrs::nested(list)
                            .filter(|(ty, _)| *ty == NFTA_LIST_ELEM)
                            .map(|(_, elem)| element_key(elem)),
                    );
                }
            });
            match result {
                Ok(i) => interrupted |= i,
                // The set went away after we listed it.
                Err(NftError::Kernel {
                    errno: libc::ENOENT,
                    ..
                }) => interrupted = true,
                Err(e) => return Err(e),
            }
            *count = keys.len();
            keys.sort_unstable();
            elements.push((name.clone(), keys));
        }
        let reading = Reading {
            summary: TableSummary { chains, sets },
            dormant,
            shapes,
            elements,
        };
        Ok((Some(reading), interrupted))
    }
}

fn be32(attr: Option<&[u8]>) -> Option<u32> {
    let b = attr?.get(..4)?;
    Some(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
}

/// One element of a set dump: its key's bytes and its flags.
fn element_key(elem: &[u8]) -> ElementKey {
    let value = |data| {
        Attrs::nested(data)
            .find(|(t, _)| *t == NFTA_DATA_VALUE)
            .map(|(_, v)| v)
    };
    let (mut key, mut end): (&[u8], Option<&[u8]>) = (&[], None);
    let mut flags = 0;
    for (ty, data) in Attrs::nested(elem) {
        match ty {
            NFTA_SET_ELEM_KEY => key = value(data).unwrap_or_default(),
            NFTA_SET_ELEM_KEY_END => end = value(data),
            NFTA_SET_ELEM_FLAGS => flags = be32(Some(data)).unwrap_or(0),
            _ => {}
        }
    }
    let element = ElementKey::new(key, flags);
    match end {
        Some(end) => element.with_end(end),
        None => element,
    }
}

/// A key in words: an address, an address and a port, or bytes in hex.
fn describe_bytes(key: &[u8]) -> String {
    let address = |b: &[u8]| match b.len() {
        4 => Some(std::net::Ipv4Addr::from([b[0], b[1], b[2], b[3]]).to_string()),
        16 => {
            let mut a = [0u8; 16];
            a.copy_from_slice(b);
            Some(std::net::Ipv6Addr::from(a).to_string())
        }
        _ => None,
    };
    if let Some(text) = address(key) {
        return text;
    }
    // address . port (the port padded to 4 bytes)
    if key.len() == 8 || key.len() == 20 {
        let (a, p) = key.split_at(key.len() - 4);
        if let Some(text) = address(a) {
            return format!("{text} . {}", u16::from_be_bytes([p[0], p[1]]));
        }
    }
    key.iter().map(|b| format!("{b:02x}")).collect()
}

/// An element in words.
fn describe_key(element: &ElementKey) -> String {
    let mut text = describe_bytes(element.key());
    if let Some(end) = element.key_end() {
        text = format!("{text} to {}", describe_bytes(end));
    }
    if element.flags & libc::NFT_SET_ELEM_INTERVAL_END as u32 != 0 {
        text.push_str(" (end of a range)");
    }
    text
}

/// What one read of the table found: the public summary, and what
/// [`Firewall::verify`] also checks.
struct Reading {
    summary: TableSummary,
    dormant: bool,
    shapes: Vec<ChainShape>,
    /// Each set's elements, sorted.
    elements: Vec<(String, Vec<ElementKey>)>,
}

/// How a chain is hooked in: the part of a chain that rule counts miss.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ChainShape {
    name: String,
    /// Hook number and priority; `None` for a regular (non-base) chain.
    hook: Option<(u32, i32)>,
    policy: Option<u32>,
    kind: Option<String>,
}

impl ChainShape {
    fn parse(name: &str, m: &Message<'_>) -> ChainShape {
        let hook = m.attr(NFTA_CHAIN_HOOK).and_then(|nest| {
            let attr = |ty| Attrs::nested(nest).find(|(t, _)| *t == ty).map(|(_, d)| d);
            Some((
                be32(attr(NFTA_HOOK_HOOKNUM))?,
                be32(attr(NFTA_HOOK_PRIORITY))? as i32,
            ))
        });
        ChainShape {
            name: name.to_owned(),
            hook,
            policy: be32(m.attr(NFTA_CHAIN_POLICY)),
            kind: m.str_attr(NFTA_CHAIN_TYPE).map(str::to_owned),
        }
    }

    fn expected(chain: &policy::Chain) -> ChainShape {
        let hook = match chain.hook {
            policy::Hook::Input => libc::NF_INET_LOCAL_IN,
            policy::Hook::Output => libc::NF_INET_LOCAL_OUT,
            policy::Hook::Forward => libc::NF_INET_FORWARD,
        };
        ChainShape {
            name: chain.name.to_owned(),
            hook: Some((hook as u32, chain.priority)),
            policy: Some(libc::NF_DROP as u32),
            kind: Some("filter".to_owned()),
        }
    }
}

/// Why the kernel's table is not `ruleset`, in plain words; None if it is.
fn mismatch(ruleset: Option<&Ruleset>, reading: Option<&Reading>) -> Option<String> {
    let (ruleset, reading) = match (ruleset, reading) {
        (None, None) => return None,
        (None, Some(_)) => return Some("the table exists but should not".to_owned()),
        (Some(_), None) => return Some("the table is missing".to_owned()),
        (Some(r), Some(k)) => (r, k),
    };
    // Each set's elements, computed once for the counts and the contents.
    let mut wanted: Vec<Vec<ElementKey>> = Vec::with_capacity(ruleset.sets.len());
    for set in &ruleset.sets {
        match encode::element_keys(set) {
            Ok(mut keys) => {
                keys.sort_unstable();
                wanted.push(keys);
            }
            Err(_) => return Some(format!("set {} cannot be encoded", set.name)),
        }
    }
    let expected = TableSummary {
        chains: ruleset
            .chains
            .iter()
            .map(|c| (c.name.to_owned(), c.rules.len()))
            .collect(),
        sets: ruleset
            .sets
            .iter()
            .zip(&wanted)
            .map(|(s, keys)| (s.name.clone(), keys.len()))
            .collect(),
    };
    if !TableSummary::same(Some(&expected), Some(&reading.summary)) {
        return Some("its chains, rule counts, sets or element counts differ".to_owned());
    }
    if reading.dormant {
        return Some("the table is dormant (not filtering)".to_owned());
    }
    // Same counts; now the elements themselves.
    for (set, want) in ruleset.sets.iter().zip(&wanted) {
        let found = reading
            .elements
            .iter()
            .find(|(name, _)| *name == set.name)
            .map_or(&[][..], |(_, keys)| &keys[..]);
        if want[..] != *found {
            let missing = want.iter().find(|k| found.binary_search(k).is_err());
            let extra = found.iter().find(|k| want.binary_search(k).is_err());
            return Some(format!(
                "set {} holds other elements than applied ({})",
                set.name,
                match (missing, extra) {
                    (Some(k), _) => format!("{} is missing", describe_key(k)),
                    (None, Some(k)) => format!("{} is extra", describe_key(k)),
                    (None, None) => "duplicates differ".to_owned(),
                }
            ));
        }
    }
    for chain in &ruleset.chains {
        let want = ChainShape::expected(chain);
        match reading.shapes.iter().find(|s| s.name == chain.name) {
            Some(found) if *found == want => {}
            found => {
                return Some(format!("chain {} is {found:?}, not {want:?}", chain.name));
            }
        }
    }
    None
}

impl AsRawFd for Firewall {
    fn as_raw_fd(&self) -> RawFd {
        self.socket.as_raw_fd()
    }
}
