//! Encoding a [`policy::Ruleset`] as ONE nftables batch with libnftnl.
//!
//! Apply must be atomic (SECURITY.md, "Safety rules the agent keeps"): the batch
//! re-creates Cordon's whole table in a single transaction (add table,
//! delete table, add table, sets, elements, chains, rules), so the kernel
//! either switches to the new table at once or keeps the old one. Removing
//! the table is "add table + delete table", which succeeds whether or not
//! the table existed.
//!
//! Sets, as nft makes them: plain sets of addresses (the kernel keeps them
//! in a hash), interval sets of address ranges (each range a start element
//! and an element flagged interval-end just after it), and interval sets of
//! `address . port` concatenations (each element a key and a key end, the
//! port padded to 4 bytes; the rule loads the address into register 1 and
//! the port into the 4-byte register after it). Each set is created with its
//! exact size, which also caps it.
//!
//! The mapping of each [`Match`] to nftables expressions mirrors what the
//! `nft` tool emits for the `Display` form of the policy (checked with
//! `nft --debug=netlink`), so `nft list table inet cordon` reads our rules
//! back in nft syntax. Values the kernel keeps in host byte order (meta
//! keys, `ct mark`, `ct state`) are compared with native-endian bytes;
//! packet fields (ports, addresses) with network-order bytes.

use std::collections::HashSet;
use std::ffi::CString;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::ops::Range;
use std::ptr::NonNull;

use nftnl::expr::{
    Bitwise, Cmp, CmpOp, Conntrack, Expression, IcmpCode, Icmpv6HeaderField, Immediate,
    Ipv4HeaderField, Ipv6HeaderField, Meta, NetworkHeaderField, Payload, Register, RejectionType,
    Socket, SocketKey, States, TransportHeaderField, Verdict,
};
use nftnl::nftnl_sys as sys;
use nftnl::set::{Set, SetKey};
use nftnl::{Batch, Chain, ChainType, FinalizedBatch, MsgType, ProtoFamily, Rule, Table};
use policy::{Action, Elements, Family, Hook, Match, Protocol, Ruleset};

use crate::NftError;

/// One message of the batch, to say in plain words which one the kernel
/// refused.
#[derive(Debug, Clone)]
pub(crate) enum Step {
    AddTable,
    DeleteTable,
    AddSet(String),
    AddElements(String),
    AddChain(&'static str),
    AddRule {
        chain: &'static str,
        index: usize,
        comment: &'static str,
    },
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let table = policy::TABLE;
        match self {
            Step::AddTable => write!(f, "add table inet {table}"),
            Step::DeleteTable => write!(f, "delete table inet {table}"),
            Step::AddSet(name) => write!(f, "add set {name}"),
            Step::AddElements(name) => write!(f, "add the elements of set {name}"),
            Step::AddChain(name) => write!(f, "add chain {name}"),
            Step::AddRule {
                chain,
                index,
                comment,
            } => write!(f, "add rule {} of chain {chain} (\"{comment}\")", index + 1),
        }
    }
}

/// A finished batch and what each of its messages does.
pub(crate) struct Encoded {
    pub batch: FinalizedBatch,
    pub steps: Vec<Step>,
}

impl Encoded {
    /// Sequence numbers of the batch's own messages (not the batch begin and
    /// end markers); each carries `NLM_F_ACK`, so each gets an answer.
    pub fn step_seqs(&self) -> Range<u32> {
        let all = self.batch.sequence_numbers();
        // nftnl also numbers (and asks acks for) the begin and end markers
        // on kernels >= 6.10, where the kernel answers them.
        let framed = all.len() == self.steps.len() + 2;
        let first = all.start + u32::from(framed);
        first..first + self.steps.len() as u32
    }

    /// What the message with this sequence number asked for.
    pub fn describe(&self, seq: u32) -> String {
        let steps = self.step_seqs();
        if steps.contains(&seq) {
            format!(
                "the batch at \"{}\"",
                self.steps[(seq - steps.start) as usize]
            )
        } else {
            // The batch begin marker (seq 0 on kernels < 6.10, or the first
            // number) also carries errors of the commit as a whole.
            "the batch as a whole".to_owned()
        }
    }
}

fn cstring(what: &str, value: &str) -> Result<CString, NftError> {
    CString::new(value)
        .map_err(|_| NftError::Encode(format!("{what} {value:?} contains a NUL byte")))
}

/// Builds the batch that makes the kernel's table equal `ruleset` (or
/// removes it, for `None`).
pub(crate) fn encode(ruleset: Option<&Ruleset>) -> Result<Encoded, NftError> {
    let table_name = cstring("table name", policy::TABLE)?;
    let table = Table::new(&table_name, ProtoFamily::Inet);
    let mut batch = Batch::new();
    let mut steps = Vec::new();

    // "add" first so that the "delete" cannot fail with ENOENT.
    batch.add(&table, MsgType::Add);
    steps.push(Step::AddTable);
    batch.add(&table, MsgType::Del);
    steps.push(Step::DeleteTable);

    if let Some(ruleset) = ruleset {
        batch.add(&table, MsgType::Add);
        steps.push(Step::AddTable);
        for (i, set) in ruleset.sets.iter().enumerate() {
            let id = set_id(i);
            match set.family {
                Family::V4 => add_set::<Ipv4Addr>(&mut batch, &mut steps, &table, set, id)?,
                Family::V6 => add_set::<Ipv6Addr>(&mut batch, &mut steps, &table, set, id)?,
            }
        }
        for chain in &ruleset.chains {
            let name = cstring("chain name", chain.name)?;
            let mut nft_chain = Chain::new(&name, &table);
            nft_chain.set_hook(
                match chain.hook {
                    Hook::Input => nftnl::Hook::In,
                    Hook::Output => nftnl::Hook::Out,
                    Hook::Forward => nftnl::Hook::Forward,
                },
                chain.priority,
            );
            nft_chain.set_type(ChainType::Filter);
            nft_chain.set_policy(nftnl::Policy::Drop);
            batch.add(&nft_chain, MsgType::Add);
            steps.push(Step::AddChain(chain.name));

            for (index, rule) in chain.rules.iter().enumerate() {
                let step = Step::AddRule {
                    chain: chain.name,
                    index,
                    comment: rule.comment,
                };
                let mut nft_rule = Rule::new(&nft_chain);
                for m in &rule.matches {
                    add_match(&mut nft_rule, m, ruleset)
                        .map_err(|e| NftError::Encode(format!("{step}: {e}")))?;
                }
                add_action(&mut nft_rule, rule.action);
                if !rule.comment.is_empty() {
                    let comment = cstring("rule comment", rule.comment)?;
                    nft_rule
                        .set_comment(&comment)
                        .map_err(|e| NftError::Encode(format!("{step}: {e}")))?;
                }
                batch.add(&nft_rule, MsgType::Add);
                steps.push(step);
            }
        }
    }
    Ok(Encoded {
        batch: batch.finalize(),
        steps,
    })
}

/// `NFT_SET_CONCAT` (linux/netfilter/nf_tables.h, not in libc): a set
/// whose key is a concatenation of fields.
const NFT_SET_CONCAT: u32 = 0x80;
/// nft's type id of `inet_service` (a port); a concatenation's type is
/// its fields' ids, 6 bits each.
const INET_SERVICE_TYPE: u32 = 13;

/// The lookup of the ruleset's set `name` (by its batch id when the set is
/// created in the same batch).
fn set_lookup(ruleset: &Ruleset, name: &str) -> Result<SetLookup, String> {
    let id = ruleset.sets.iter().position(|s| s.name == name).map(set_id);
    let name = CString::new(name).map_err(|_| format!("set name {name:?} contains NUL"))?;
    Ok(SetLookup { name, id })
}

/// Set ids name sets within one batch (rules refer to a new set by id);
/// they only need to be unique in the batch.
fn set_id(index: usize) -> u32 {
    index as u32 + 1
}

/// The elements of a set without duplicates (the kernel refuses a batch
/// that adds the same element twice), in their first order.
pub(crate) fn distinct(elements: &[IpAddr]) -> Vec<IpAddr> {
    // Strictly ascending (as the policy makes exclusion sets): nothing to drop.
    if elements.windows(2).all(|w| w[0] < w[1]) {
        return elements.to_vec();
    }
    let mut seen: HashSet<IpAddr> = HashSet::with_capacity(elements.len());
    elements
        .iter()
        .copied()
        .filter(|a| seen.insert(*a))
        .collect()
}

/// Longest key Cordon's sets use: an IPv6 address and a port (padded to
/// 4 bytes) concatenated.
const MAX_KEY: usize = 20;

/// One set element as the kernel holds it: the key's bytes (network
/// order, at most 20 kept), for a range of concatenations its end key, and
/// its flags (`NFT_SET_ELEM_INTERVAL_END` for the end of an address range).
/// Plain data, so thousands of them cost no allocation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct ElementKey {
    len: u8,
    bytes: [u8; MAX_KEY],
    end_len: u8,
    end: [u8; MAX_KEY],
    pub flags: u32,
}

/// A key's bytes, and its length (kept whole even when longer than ours,
/// so such a key compares unequal to any of ours).
fn key_bytes(key: &[u8]) -> ([u8; MAX_KEY], u8) {
    let mut bytes = [0u8; MAX_KEY];
    let n = key.len().min(MAX_KEY);
    bytes[..n].copy_from_slice(&key[..n]);
    (bytes, u8::try_from(key.len()).unwrap_or(u8::MAX))
}

impl ElementKey {
    pub fn new(key: &[u8], flags: u32) -> ElementKey {
        let (bytes, len) = key_bytes(key);
        ElementKey {
            len,
            bytes,
            end_len: 0,
            end: [0; MAX_KEY],
            flags,
        }
    }

    /// The same element with an end key (`NFTA_SET_ELEM_KEY_END`).
    pub fn with_end(mut self, end: &[u8]) -> ElementKey {
        (self.end, self.end_len) = key_bytes(end);
        self
    }

    /// The key's bytes (the first 20 of a longer key).
    pub fn key(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len).min(MAX_KEY)]
    }

    /// The end key's bytes, if the element has one.
    pub fn key_end(&self) -> Option<&[u8]> {
        (self.end_len > 0).then(|| &self.end[..usize::from(self.end_len).min(MAX_KEY)])
    }
}

/// An address and a port as the kernel keys `address . port`: the
/// address's bytes, then the port in network order padded to 4 bytes.
fn address_port(address: IpAddr, port: u16) -> ([u8; MAX_KEY], usize) {
    let (a, n) = octets(address);
    let mut b = [0u8; MAX_KEY];
    b[..n].copy_from_slice(&a[..n]);
    b[n..n + 2].copy_from_slice(&port.to_be_bytes());
    (b, n + 4)
}

fn octets(address: IpAddr) -> ([u8; 16], usize) {
    let mut b = [0u8; 16];
    match address {
        IpAddr::V4(a) => {
            b[..4].copy_from_slice(&a.octets());
            (b, 4)
        }
        IpAddr::V6(a) => (a.octets(), 16),
    }
}

fn key_of(address: IpAddr, flags: u32) -> ElementKey {
    let (b, n) = octets(address);
    ElementKey::new(&b[..n], flags)
}

/// The elements the kernel holds for `set` once applied, in the order they
/// are sent. A plain set holds each distinct address. An interval set holds,
/// for each range, its first address and the address after its last one,
/// flagged as an interval end; a range that reaches the last address of the
/// family has no end element (it runs to the end). Like nft, an interval
/// set also holds an interval end at the family's first address unless a
/// range starts there.
pub(crate) fn element_keys(set: &policy::Set) -> Result<Vec<ElementKey>, String> {
    let want_v4 = set.family == Family::V4;
    let check = |a: &IpAddr| {
        if a.is_ipv4() == want_v4 {
            Ok(())
        } else {
            Err(format!(
                "set {} holds {} addresses, not {a}",
                set.name,
                if want_v4 { "IPv4" } else { "IPv6" }
            ))
        }
    };
    let mut keys = Vec::new();
    match &set.elements {
        Elements::Addresses(addresses) => {
            for a in distinct(addresses) {
                check(&a)?;
                keys.push(key_of(a, 0));
            }
        }
        Elements::AddressPorts(pairs) => {
            for e in pairs {
                check(&e.first)?;
                check(&e.last)?;
                let (start, n) = address_port(e.first, e.ports.0);
                let (end, _) = address_port(e.last, e.ports.1);
                keys.push(ElementKey::new(&start[..n], 0).with_end(&end[..n]));
            }
        }
        Elements::Ranges(ranges) => {
            // As nft does: an interval end at the first address of the
            // family, unless a range starts there, so that the kernel's
            // table is the one `nft -f` makes of the Display form.
            let end = libc::NFT_SET_ELEM_INTERVAL_END as u32;
            if let Some((first, _)) = ranges.first()
                && !first.is_unspecified()
            {
                keys.push(ElementKey::new(
                    &[0; 16][..if want_v4 { 4 } else { 16 }],
                    end,
                ));
            }
            for (start, last) in ranges {
                check(start)?;
                check(last)?;
                keys.push(key_of(*start, 0));
                let (mut after, n) = octets(*last);
                // Big-endian increment; all ones wraps to zero: no end element.
                let mut carry = true;
                for byte in after[..n].iter_mut().rev() {
                    let (b, c) = byte.overflowing_add(1);
                    *byte = b;
                    carry = c;
                    if !c {
                        break;
                    }
                }
                if !carry {
                    keys.push(ElementKey::new(&after[..n], end));
                }
            }
        }
    }
    Ok(keys)
}

/// Adds the set and its elements (an interval set for ranges). nftnl's
/// `Set::add` has no element flags, so elements are added to its libnftnl
/// object here, and nftnl splits them into as many messages as needed.
fn add_set<K: SetKey>(
    batch: &mut Batch,
    steps: &mut Vec<Step>,
    table: &Table,
    set: &policy::Set,
    id: u32,
) -> Result<(), NftError> {
    let name = cstring("set name", &set.name)?;
    let keys = element_keys(set).map_err(NftError::Encode)?;
    let nft_set = Set::<K>::new_named(&name, id, table, ProtoFamily::Inet);
    let raw = nft_set.as_ptr().as_ptr();
    // The size is the number of elements: the kernel then keeps a plain set
    // in a fixed-size hash (an rhashtable that grows while it is filled
    // costs twice as much for a thousand elements), and refuses any element
    // beyond it, so nobody can add to Cordon's sets (the read-back and the
    // change notifications catch one taken away).
    //
    // SAFETY: `raw` is the live libnftnl set nft_set owns; the setters copy
    // the values; nftnl_set_elem_add hands each new element to the set,
    // which frees it with itself.
    unsafe {
        if !keys.is_empty() {
            sys::nftnl_set_set_u32(raw, sys::NFTNL_SET_DESC_SIZE as u16, keys.len() as u32);
        }
        match set.elements {
            Elements::Addresses(_) => {}
            Elements::Ranges(_) => {
                sys::nftnl_set_set_u32(
                    raw,
                    sys::NFTNL_SET_FLAGS as u16,
                    libc::NFT_SET_INTERVAL as u32,
                );
            }
            Elements::AddressPorts(_) => {
                // As nft declares `ipvN_addr . inet_service` with
                // intervals: the two types' ids combined, 4-byte fields,
                // and the fields' own lengths.
                let (type_id, address_len) = match set.family {
                    Family::V4 => (7, 4u8),
                    Family::V6 => (8, 16u8),
                };
                sys::nftnl_set_set_u32(
                    raw,
                    sys::NFTNL_SET_KEY_TYPE as u16,
                    (type_id << 6) | INET_SERVICE_TYPE,
                );
                sys::nftnl_set_set_u32(
                    raw,
                    sys::NFTNL_SET_KEY_LEN as u16,
                    u32::from(address_len) + 4,
                );
                sys::nftnl_set_set_u32(
                    raw,
                    sys::NFTNL_SET_FLAGS as u16,
                    libc::NFT_SET_INTERVAL as u32 | NFT_SET_CONCAT,
                );
                let fields = [address_len, 2];
                sys::nftnl_set_set_data(
                    raw,
                    sys::NFTNL_SET_DESC_CONCAT as u16,
                    fields.as_ptr().cast(),
                    fields.len() as u32,
                );
            }
        }

        for element in &keys {
            let (key, flags) = (element.key(), &element.flags);
            let Some(elem) = NonNull::new(sys::nftnl_set_elem_alloc()) else {
                std::process::abort();
            };
            sys::nftnl_set_elem_set(
                elem.as_ptr(),
                sys::NFTNL_SET_ELEM_KEY as u16,
                key.as_ptr().cast(),
                key.len() as u32,
            );
            if let Some(end) = element.key_end() {
                sys::nftnl_set_elem_set(
                    elem.as_ptr(),
                    sys::NFTNL_SET_ELEM_KEY_END as u16,
                    end.as_ptr().cast(),
                    end.len() as u32,
                );
            }
            if *flags != 0 {
                sys::nftnl_set_elem_set_u32(
                    elem.as_ptr(),
                    sys::NFTNL_SET_ELEM_FLAGS as u16,
                    *flags,
                );
            }
            sys::nftnl_set_elem_add(raw, elem.as_ptr());
        }
    }
    batch.add(&nft_set, MsgType::Add);
    steps.push(Step::AddSet(set.name.clone()));
    // An empty set yields no element message at all.
    for message in nft_set.elems_iter() {
        batch.add(&message, MsgType::Add);
        steps.push(Step::AddElements(set.name.clone()));
    }
    Ok(())
}

/// `lookup` of register 1 in a named set. nftnl's own `Lookup` needs the
/// `Set` object; this one names the set (and its batch id when the set is
/// created in the same batch), so a rule can refer to any set by name.
struct SetLookup {
    name: CString,
    id: Option<u32>,
}

impl Expression for SetLookup {
    fn to_expr(&self, _rule: &Rule) -> NonNull<sys::nftnl_expr> {
        // SAFETY: nftnl_expr_alloc returns a fresh expression or NULL
        // (checked); the setters copy the values (the string included), and
        // the caller (Rule::add_expr) hands ownership to the rule.
        unsafe {
            let Some(expr) = NonNull::new(sys::nftnl_expr_alloc(c"lookup".as_ptr())) else {
                // Out of memory for a few bytes: do what libstd does.
                std::process::abort();
            };
            sys::nftnl_expr_set_u32(
                expr.as_ptr(),
                sys::NFTNL_EXPR_LOOKUP_SREG as u16,
                libc::NFT_REG_1 as u32,
            );
            sys::nftnl_expr_set_str(
                expr.as_ptr(),
                sys::NFTNL_EXPR_LOOKUP_SET as u16,
                self.name.as_ptr(),
            );
            if let Some(id) = self.id {
                sys::nftnl_expr_set_u32(expr.as_ptr(), sys::NFTNL_EXPR_LOOKUP_SET_ID as u16, id);
            }
            expr
        }
    }
}

/// A packet field loaded into a given register (nftnl's `Payload` always
/// loads into register 1): the fields of a concatenation go into
/// consecutive 4-byte registers.
struct PayloadInto {
    base: u32,
    offset: u32,
    len: u32,
    register: u32,
}

impl Expression for PayloadInto {
    fn to_expr(&self, _rule: &Rule) -> NonNull<sys::nftnl_expr> {
        // SAFETY: as for SetLookup: a fresh expression (checked), setters
        // that copy, ownership handed to the rule by the caller.
        unsafe {
            let Some(expr) = NonNull::new(sys::nftnl_expr_alloc(c"payload".as_ptr())) else {
                std::process::abort();
            };
            let e = expr.as_ptr();
            sys::nftnl_expr_set_u32(e, sys::NFTNL_EXPR_PAYLOAD_DREG as u16, self.register);
            sys::nftnl_expr_set_u32(e, sys::NFTNL_EXPR_PAYLOAD_BASE as u16, self.base);
            sys::nftnl_expr_set_u32(e, sys::NFTNL_EXPR_PAYLOAD_OFFSET as u16, self.offset);
            sys::nftnl_expr_set_u32(e, sys::NFTNL_EXPR_PAYLOAD_LEN as u16, self.len);
            expr
        }
    }
}

/// Transport header field at `offset`, `len` bytes (`th sport/dport`).
fn transport(offset: u32, len: u32) -> Payload {
    // nftnl names these fields `*_bits` but passes them on unchanged as the
    // kernel's byte offset and length.
    Payload::Transport(TransportHeaderField::Raw {
        offset_bits: offset,
        length_bits: len,
    })
}

fn address(family: Family, source: bool) -> Payload {
    Payload::Network(match (family, source) {
        (Family::V4, true) => NetworkHeaderField::Ipv4(Ipv4HeaderField::Saddr),
        (Family::V4, false) => NetworkHeaderField::Ipv4(Ipv4HeaderField::Daddr),
        (Family::V6, true) => NetworkHeaderField::Ipv6(Ipv6HeaderField::Saddr),
        (Family::V6, false) => NetworkHeaderField::Ipv6(Ipv6HeaderField::Daddr),
    })
}

fn add_match(rule: &mut Rule<'_>, m: &Match, ruleset: &Ruleset) -> Result<(), String> {
    match *m {
        Match::InputLoopback | Match::OutputLoopback => {
            rule.add_expr(if *m == Match::InputLoopback {
                &Meta::IifType
            } else {
                &Meta::OifType
            });
            // dev->type is a u16 in host byte order.
            rule.add_expr(&Cmp::new(CmpOp::Eq, libc::ARPHRD_LOOPBACK));
        }
        Match::Family(family) => {
            rule.add_expr(&Meta::NfProto);
            let proto = match family {
                Family::V4 => libc::NFPROTO_IPV4,
                Family::V6 => libc::NFPROTO_IPV6,
            };
            rule.add_expr(&Cmp::new(CmpOp::Eq, proto as u8));
        }
        Match::Protocol(protocol) => {
            rule.add_expr(&Meta::L4Proto);
            let number = match protocol {
                Protocol::Tcp => libc::IPPROTO_TCP,
                Protocol::Udp => libc::IPPROTO_UDP,
                Protocol::Icmpv6 => libc::IPPROTO_ICMPV6,
            };
            rule.add_expr(&Cmp::new(CmpOp::Eq, number as u8));
        }
        Match::SourceInSet(family, ref name) | Match::DestInSet(family, ref name) => {
            let source = matches!(m, Match::SourceInSet(..));
            rule.add_expr(&address(family, source));
            rule.add_expr(&set_lookup(ruleset, name)?);
        }
        Match::SourceAndPortInSet(family, ref name) | Match::DestAndPortInSet(family, ref name) => {
            let source = matches!(m, Match::SourceAndPortInSet(..));
            // `ip daddr . th dport`: the address from register 1 on, the
            // port in the 4-byte register after it.
            let (offset, len, port_register) = match (family, source) {
                (Family::V4, true) => (12, 4, libc::NFT_REG32_01),
                (Family::V4, false) => (16, 4, libc::NFT_REG32_01),
                (Family::V6, true) => (8, 16, libc::NFT_REG32_04),
                (Family::V6, false) => (24, 16, libc::NFT_REG32_04),
            };
            rule.add_expr(&PayloadInto {
                base: libc::NFT_PAYLOAD_NETWORK_HEADER as u32,
                offset,
                len,
                register: libc::NFT_REG_1 as u32,
            });
            rule.add_expr(&PayloadInto {
                base: libc::NFT_PAYLOAD_TRANSPORT_HEADER as u32,
                offset: 2,
                len: 2,
                register: port_register as u32,
            });
            rule.add_expr(&set_lookup(ruleset, name)?);
        }
        Match::SourcePrefix(prefix, len) | Match::DestPrefix(prefix, len) => {
            let source = matches!(m, Match::SourcePrefix(..));
            let (family, bytes) = match prefix {
                IpAddr::V4(a) => (Family::V4, a.octets().to_vec()),
                IpAddr::V6(a) => (Family::V6, a.octets().to_vec()),
            };
            let bits = bytes.len() * 8;
            let len = usize::from(len);
            if len > bits {
                return Err(format!("prefix {prefix}/{len} is longer than {bits} bits"));
            }
            let mask: Vec<u8> = (0..bytes.len())
                .map(|i| {
                    let ones = len.saturating_sub(i * 8).min(8);
                    (0xff_u16 << (8 - ones)) as u8
                })
                .collect();
            let network: Vec<u8> = bytes.iter().zip(&mask).map(|(b, m)| b & m).collect();
            rule.add_expr(&address(family, source));
            if len < bits {
                let zeros = vec![0u8; bytes.len()];
                rule.add_expr(&Bitwise::new(&mask[..], &zeros[..]));
            }
            rule.add_expr(&Cmp::new(CmpOp::Eq, &network[..]));
        }
        Match::SourcePort(port) | Match::DestPort(port) => {
            let offset = if matches!(m, Match::SourcePort(_)) {
                0
            } else {
                2
            };
            rule.add_expr(&transport(offset, 2));
            // Packet bytes: network order (nftnl's u16 would be host order).
            rule.add_expr(&Cmp::new(CmpOp::Eq, &port.to_be_bytes()[..]));
        }
        Match::DestPortRange(first, last) => {
            if first > last {
                return Err(format!("port range {first}-{last} is empty"));
            }
            rule.add_expr(&transport(2, 2));
            // Network byte order compares like the numbers (the kernel memcmps).
            if first == last {
                rule.add_expr(&Cmp::new(CmpOp::Eq, &first.to_be_bytes()[..]));
            } else {
                rule.add_expr(&Cmp::new(CmpOp::Gte, &first.to_be_bytes()[..]));
                rule.add_expr(&Cmp::new(CmpOp::Lte, &last.to_be_bytes()[..]));
            }
        }
        Match::SocketCgroup(cgroup) => {
            // The id of the socket's cgroup ancestor at `level` (host order, 8 bytes).
            rule.add_expr(&Socket::new(SocketKey::CgroupV2, cgroup.level));
            rule.add_expr(&Cmp::new(CmpOp::Eq, cgroup.id));
        }
        Match::Ct(states) => {
            let mut mask = States::empty();
            mask.set(States::ESTABLISHED, states.established);
            mask.set(States::RELATED, states.related);
            if mask.is_empty() {
                return Err("a ct state match with no state never matches".to_owned());
            }
            rule.add_expr(&Conntrack::State);
            rule.add_expr(&Bitwise::new(mask.bits(), 0u32));
            rule.add_expr(&Cmp::new(CmpOp::Neq, 0u32));
        }
        Match::CtMark(mark) => {
            rule.add_expr(&Conntrack::Mark { set: false });
            rule.add_expr(&Cmp::new(CmpOp::Eq, mark));
        }
        Match::SocketGid(gid) => {
            rule.add_expr(&Meta::SkGid);
            rule.add_expr(&Cmp::new(CmpOp::Eq, gid));
        }
        Match::Icmpv6Type(t) => {
            rule.add_expr(&Payload::Transport(TransportHeaderField::Icmpv6(
                Icmpv6HeaderField::Type,
            )));
            rule.add_expr(&Cmp::new(CmpOp::Eq, t));
        }
        Match::HopLimit(h) => {
            rule.add_expr(&Payload::Network(NetworkHeaderField::Ipv6(
                Ipv6HeaderField::HopLimit,
            )));
            rule.add_expr(&Cmp::new(CmpOp::Eq, h));
        }
    }
    Ok(())
}

fn add_action(rule: &mut Rule<'_>, action: Action) {
    match action {
        Action::Accept => rule.add_expr(&Verdict::Accept),
        Action::MarkAndAccept(mark) => {
            rule.add_expr(&Immediate::new(mark, Register::Reg1));
            rule.add_expr(&Conntrack::Mark { set: true });
            rule.add_expr(&Verdict::Accept);
        }
        Action::RejectTcpReset => rule.add_expr(&Verdict::Reject(RejectionType::TcpRst)),
        // In an inet table nftnl encodes this as icmpx (type 2), code 3.
        Action::RejectAdminProhibited => rule.add_expr(&Verdict::Reject(RejectionType::Icmp(
            IcmpCode::AdminProhibited,
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use policy::{Isolation, Policy, Scope};

    fn full() -> Ruleset {
        policy::render(&Policy::Isolated(Isolation {
            scope: Scope::Full,
            server_addresses: vec!["198.18.0.1".parse().unwrap(), "fd00::1".parse().unwrap()],
            server_port: 8443,
            agent_gid: 61742,
            exclusions: Vec::new(),
        }))
        .unwrap()
    }

    #[test]
    fn full_ruleset_is_one_message_per_object() {
        let ruleset = full();
        let encoded = encode(Some(&ruleset)).unwrap();
        let rules: usize = ruleset.chains.iter().map(|c| c.rules.len()).sum();
        // add, delete, add table; 2 sets with one element message each;
        // 3 chains; the rules.
        assert_eq!(encoded.steps.len(), 3 + 2 * 2 + 3 + rules);
        assert_eq!(encoded.step_seqs().len(), encoded.steps.len());
        let bytes: usize = encoded.batch.iter().map(<[u8]>::len).sum();
        assert!(bytes > 0);
        let seqs = encoded.step_seqs();
        assert_eq!(
            encoded.describe(seqs.end - 1),
            "the batch at \"add chain forward\""
        );
        assert_eq!(
            encoded.describe(seqs.start + 8),
            "the batch at \"add rule 1 of chain input (\"loopback\")\""
        );
        assert_eq!(encoded.describe(0), "the batch as a whole");
    }

    #[test]
    fn removal_is_add_then_delete() {
        let encoded = encode(None).unwrap();
        assert!(matches!(
            encoded.steps[..],
            [Step::AddTable, Step::DeleteTable]
        ));
    }

    #[test]
    fn empty_set_has_no_element_message() {
        let mut ruleset = full();
        ruleset.sets[1].elements = Elements::Addresses(Vec::new());
        let encoded = encode(Some(&ruleset)).unwrap();
        let element_steps = encoded
            .steps
            .iter()
            .filter(|s| matches!(s, Step::AddElements(_)))
            .count();
        assert_eq!(element_steps, 1);
    }

    #[test]
    fn address_of_the_wrong_family_is_refused_before_sending() {
        let mut ruleset = full();
        ruleset.sets[0].elements = Elements::Addresses(vec![
            "198.18.0.1".parse().unwrap(),
            "fd00::2".parse().unwrap(),
        ]);
        let err = encode(Some(&ruleset)).err().unwrap();
        assert!(err.to_string().contains("mgmt_v4"), "{err}");
    }

    #[test]
    fn duplicates_are_dropped() {
        let a: IpAddr = "198.18.0.1".parse().unwrap();
        let b: IpAddr = "198.18.0.2".parse().unwrap();
        assert_eq!(distinct(&[a, b, a]), vec![a, b]);
    }

    fn ranges(family: Family, ranges: &[(&str, &str)]) -> policy::Set {
        policy::Set {
            name: "r".to_owned(),
            family,
            elements: Elements::Ranges(
                ranges
                    .iter()
                    .map(|(a, b)| (a.parse().unwrap(), b.parse().unwrap()))
                    .collect(),
            ),
        }
    }

    #[test]
    fn a_range_is_its_start_and_the_address_after_it() {
        let end = libc::NFT_SET_ELEM_INTERVAL_END as u32;
        let pairs = |keys: Vec<ElementKey>| -> Vec<(Vec<u8>, u32)> {
            keys.iter().map(|k| (k.key().to_vec(), k.flags)).collect()
        };
        let keys = pairs(
            element_keys(&ranges(
                Family::V4,
                &[
                    ("198.18.0.0", "198.18.1.255"),
                    ("198.18.3.5", "198.18.3.5"),
                    ("255.255.255.0", "255.255.255.255"),
                ],
            ))
            .unwrap(),
        );
        assert_eq!(
            keys,
            [
                (vec![0, 0, 0, 0], end),
                (vec![198, 18, 0, 0], 0),
                (vec![198, 18, 2, 0], end),
                (vec![198, 18, 3, 5], 0),
                (vec![198, 18, 3, 6], end),
                // Runs to the end of the address space: no end element.
                (vec![255, 255, 255, 0], 0),
            ]
        );
        let v6 = pairs(element_keys(&ranges(Family::V6, &[("fd00::", "fd00::ffff")])).unwrap());
        let mut after = [0u8; 16];
        after[0] = 0xfd;
        after[13] = 1;
        assert_eq!(v6[2], (after.to_vec(), end));
        // A range from the first address needs no end element before it.
        let from_zero =
            pairs(element_keys(&ranges(Family::V4, &[("0.0.0.0", "0.0.0.9")])).unwrap());
        assert_eq!(from_zero, [(vec![0; 4], 0), (vec![0, 0, 0, 10], end)]);
        let err = element_keys(&ranges(Family::V6, &[("198.18.0.1", "198.18.0.1")])).unwrap_err();
        assert!(err.contains("IPv6"), "{err}");
    }

    #[test]
    fn a_thousand_address_rules_make_a_small_batch() {
        let exclusions: Vec<policy::Exclusion> = (0..1000u32)
            .map(|i| policy::Exclusion {
                name: format!("r{i}"),
                cgroup: None,
                inbound: false,
                outbound: true,
                remote: vec![(IpAddr::V4(Ipv4Addr::from(0xc612_0000 + 2 * i)), 32)],
                ports: vec![],
            })
            .collect();
        let ruleset = policy::render(&Policy::Isolated(Isolation {
            scope: Scope::Selective,
            server_addresses: vec!["198.18.0.1".parse().unwrap()],
            server_port: 8443,
            agent_gid: 61742,
            exclusions,
        }))
        .unwrap();
        let encoded = encode(Some(&ruleset)).unwrap();
        let rules = encoded
            .steps
            .iter()
            .filter(|s| matches!(s, Step::AddRule { .. }))
            .count();
        let element_messages = encoded
            .steps
            .iter()
            .filter(|s| matches!(s, Step::AddElements(n) if n.starts_with("excl_")))
            .count();
        assert_eq!(rules, 22 + 3);
        // 2,001 elements (start and end of each address) in a few messages.
        assert!((1..=20).contains(&element_messages), "{element_messages}");
    }

    #[test]
    fn an_address_port_pair_is_a_key_and_a_key_end() {
        let set = policy::Set {
            name: "p".to_owned(),
            family: Family::V4,
            elements: Elements::AddressPorts(vec![policy::AddressPort {
                first: "198.18.0.0".parse().unwrap(),
                last: "198.18.0.255".parse().unwrap(),
                ports: (8000, 8100),
            }]),
        };
        let keys = element_keys(&set).unwrap();
        assert_eq!(keys.len(), 1);
        assert_eq!(keys[0].key(), [198, 18, 0, 0, 0x1f, 0x40, 0, 0]);
        assert_eq!(
            keys[0].key_end(),
            Some(&[198, 18, 0, 255, 0x1f, 0xa4, 0, 0][..])
        );
        assert_eq!(keys[0].flags, 0);
        let mut v6 = set.clone();
        v6.family = Family::V6;
        assert!(element_keys(&v6).unwrap_err().contains("IPv6"));
    }
}
