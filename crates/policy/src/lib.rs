//! The isolation policy as plain data, and its rendering into rules.
//!
//! [`Policy`] says what is intended; [`render`] turns it into a [`Ruleset`]:
//! every set, chain and rule of Cordon's one table, in order, each rule a
//! list of [`Match`]es and an [`Action`]. No I/O happens here: the `nft`
//! crate turns a `Ruleset` into one netlink batch, and the `Display` form
//! (nft syntax) is what tests snapshot and what `cordon-agent status` shows.
//! `SECURITY.md` lists the same rules in prose; keep the two in step.

use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;

/// Name of Cordon's table (family `inet`).
pub const TABLE: &str = "cordon";
/// Connection mark for connections the agent opened under isolation.
pub const AGENT_MARK: u32 = 0x434f_5244;
/// Priority of Cordon's base chains: after conntrack (-200), before the
/// usual filter priority (0).
pub const PRIORITY: i32 = -10;
/// Connection mark for connections an exclusion rule let through.
pub const EXCLUDED_MARK: u32 = 0x434f_5245;
/// Named sets holding the management server's addresses.
pub const MGMT_V4: &str = "mgmt_v4";
pub const MGMT_V6: &str = "mgmt_v6";

/// What the agent intends to have in force.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Policy {
    /// Cordon has no table in the kernel.
    NotIsolated,
    Isolated(Isolation),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    Full,
    Selective,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Isolation {
    pub scope: Scope,
    /// Every resolved address of the server.
    pub server_addresses: Vec<IpAddr>,
    pub server_port: u16,
    /// The group id the agent's sockets are created with; only sockets of
    /// this group may use the management channel and DNS.
    pub agent_gid: u32,
    /// What Selective isolation lets through besides; Full ignores them.
    pub exclusions: Vec<Exclusion>,
}

/// One exclusion rule, resolved for this host. Conditions are ANDed; an
/// empty list or `None` matches anything.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exclusion {
    pub name: String,
    /// The processes it covers: sockets in this cgroup (v2).
    pub cgroup: Option<CgroupMatch>,
    pub inbound: bool,
    pub outbound: bool,
    /// Remote prefixes (address, prefix length).
    pub remote: Vec<(IpAddr, u8)>,
    /// Service ports (remote for outbound, local for inbound), inclusive ranges.
    pub ports: Vec<(u16, u16)>,
}

/// A cgroup v2 directory, as the kernel identifies it: its depth below the
/// root and its id (the directory's inode number).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CgroupMatch {
    pub level: u32,
    pub id: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Tcp,
    Udp,
    Icmpv6,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    Input,
    Output,
    Forward,
}

/// Conntrack states, as a bit set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CtStates {
    pub established: bool,
    pub related: bool,
}

/// One condition of a rule. The `nft` crate adds the implied protocol
/// checks (a port needs its protocol, an address its family).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Match {
    /// Arrived on a loopback interface.
    InputLoopback,
    /// Leaves on a loopback interface.
    OutputLoopback,
    Family(Family),
    Protocol(Protocol),
    /// Source address in a named set (of the given family).
    SourceInSet(Family, String),
    DestInSet(Family, String),
    /// Source address and destination port, as a pair, in a named set of
    /// `address . port` ranges (of the given family).
    SourceAndPortInSet(Family, String),
    /// Destination address and port, as a pair, in such a set.
    DestAndPortInSet(Family, String),
    /// Source address within a prefix.
    SourcePrefix(IpAddr, u8),
    /// Destination address within a prefix.
    DestPrefix(IpAddr, u8),
    /// Destination port within an inclusive range.
    DestPortRange(u16, u16),
    /// The packet's socket belongs to this cgroup (or one below it).
    SocketCgroup(CgroupMatch),
    SourcePort(u16),
    DestPort(u16),
    Ct(CtStates),
    CtMark(u32),
    /// The socket's group id (locally generated packets only).
    SocketGid(u32),
    Icmpv6Type(u8),
    /// IPv6 hop limit equals this (255: the packet did not cross a router).
    HopLimit(u8),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Accept,
    /// Set the connection's mark to this value, then accept.
    MarkAndAccept(u32),
    /// TCP reset.
    RejectTcpReset,
    /// ICMP(v6) administratively prohibited.
    RejectAdminProhibited,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub matches: Vec<Match>,
    pub action: Action,
    /// Why the rule exists (stored as the rule's comment).
    pub comment: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chain {
    pub name: &'static str,
    pub hook: Hook,
    pub priority: i32,
    /// Base policy: always drop.
    pub rules: Vec<Rule>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Set {
    pub name: String,
    pub family: Family,
    pub elements: Elements,
}

/// What a named set holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Elements {
    /// Single addresses (a plain set; duplicates count once).
    Addresses(Vec<IpAddr>),
    /// Inclusive address ranges: an interval set. Sorted, disjoint and not
    /// adjacent, as [`merge_prefixes`] makes them (the kernel refuses
    /// overlapping intervals).
    Ranges(Vec<(IpAddr, IpAddr)>),
    /// Address ranges each with a port range: an interval set of
    /// `address . port` concatenations. Disjoint, as
    /// [`disjoint_address_ports`] makes them.
    AddressPorts(Vec<AddressPort>),
}

/// An inclusive address range and an inclusive port range: every address of
/// the one with every port of the other.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AddressPort {
    pub first: IpAddr,
    pub last: IpAddr,
    pub ports: (u16, u16),
}

impl Elements {
    /// Number of addresses, ranges or pairs.
    pub fn len(&self) -> usize {
        match self {
            Elements::Addresses(a) => a.len(),
            Elements::Ranges(r) => r.len(),
            Elements::AddressPorts(r) => r.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Cordon's whole table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ruleset {
    pub sets: Vec<Set>,
    pub chains: Vec<Chain>,
}

impl Ruleset {
    /// Number of rules in each chain, by chain name (used to read back).
    pub fn rule_counts(&self) -> Vec<(&'static str, usize)> {
        self.chains
            .iter()
            .map(|c| (c.name, c.rules.len()))
            .collect()
    }
}

const ESTABLISHED: CtStates = CtStates {
    established: true,
    related: false,
};
const ESTABLISHED_RELATED: CtStates = CtStates {
    established: true,
    related: true,
};

/// ICMPv6 neighbour discovery types a host needs to keep its addresses:
/// router solicitation/advertisement, neighbour solicitation/advertisement.
const ND_IN: [u8; 3] = [134, 135, 136];
const ND_OUT: [u8; 3] = [133, 135, 136];

fn rule(matches: Vec<Match>, action: Action, comment: &'static str) -> Rule {
    Rule {
        matches,
        action,
        comment,
    }
}

/// The table for a policy; `None` when no table should exist.
pub fn render(policy: &Policy) -> Option<Ruleset> {
    let Policy::Isolated(isolation) = policy else {
        return None;
    };
    let v4: Vec<IpAddr> = isolation
        .server_addresses
        .iter()
        .filter(|a| a.is_ipv4())
        .copied()
        .collect();
    let v6: Vec<IpAddr> = isolation
        .server_addresses
        .iter()
        .filter(|a| a.is_ipv6())
        .copied()
        .collect();
    let port = isolation.server_port;
    let gid = isolation.agent_gid;
    use Action::*;
    use Match::*;

    let mut input = vec![rule(vec![InputLoopback], Accept, "loopback")];
    for (family, set) in [(self::Family::V4, MGMT_V4), (self::Family::V6, MGMT_V6)] {
        input.push(rule(
            vec![
                Family(family),
                Protocol(self::Protocol::Tcp),
                SourceInSet(family, set.to_owned()),
                SourcePort(port),
                Ct(ESTABLISHED),
            ],
            Accept,
            "replies from the management server",
        ));
    }
    input.push(rule(
        vec![CtMark(AGENT_MARK), Ct(ESTABLISHED_RELATED)],
        Accept,
        "replies to the agent's own connections (DNS)",
    ));
    input.push(rule(
        vec![
            Family(self::Family::V4),
            Protocol(self::Protocol::Udp),
            SourcePort(67),
            DestPort(68),
        ],
        Accept,
        "DHCPv4 client",
    ));
    input.push(rule(
        vec![
            Family(self::Family::V6),
            Protocol(self::Protocol::Udp),
            SourcePrefix("fe80::".parse().expect("address"), 10),
            SourcePort(547),
            DestPort(546),
        ],
        Accept,
        "DHCPv6 client",
    ));
    for t in ND_IN {
        input.push(rule(
            vec![
                Family(self::Family::V6),
                Protocol(self::Protocol::Icmpv6),
                Icmpv6Type(t),
                HopLimit(255),
            ],
            Accept,
            "IPv6 neighbour and router discovery (on-link only)",
        ));
    }

    let selective: &[Exclusion] = if isolation.scope == Scope::Selective {
        &isolation.exclusions
    } else {
        &[]
    };
    let Exclusions {
        input: excluded_in,
        output: excluded_out,
        sets: excluded_sets,
    } = exclusion_rules(selective);
    if !selective.is_empty() {
        input.push(rule(
            vec![CtMark(EXCLUDED_MARK), Ct(ESTABLISHED_RELATED)],
            Accept,
            "replies on connections an exclusion let through",
        ));
    }
    input.extend(excluded_in);

    let mut output = vec![rule(vec![OutputLoopback], Accept, "loopback")];
    for (family, set) in [(self::Family::V4, MGMT_V4), (self::Family::V6, MGMT_V6)] {
        output.push(rule(
            vec![
                Family(family),
                Protocol(self::Protocol::Tcp),
                SocketGid(gid),
                DestInSet(family, set.to_owned()),
                DestPort(port),
            ],
            MarkAndAccept(AGENT_MARK),
            "the agent's management channel",
        ));
    }
    output.push(rule(
        vec![CtMark(AGENT_MARK), Ct(ESTABLISHED_RELATED)],
        Accept,
        "the rest of the agent's own connections",
    ));
    for protocol in [self::Protocol::Udp, self::Protocol::Tcp] {
        output.push(rule(
            vec![Protocol(protocol), SocketGid(gid), DestPort(53)],
            MarkAndAccept(AGENT_MARK),
            "DNS from the agent only",
        ));
    }
    output.push(rule(
        vec![
            Family(self::Family::V4),
            Protocol(self::Protocol::Udp),
            SourcePort(68),
            DestPort(67),
        ],
        Accept,
        "DHCPv4 client",
    ));
    output.push(rule(
        vec![
            Family(self::Family::V6),
            Protocol(self::Protocol::Udp),
            SourcePort(546),
            DestPort(547),
        ],
        Accept,
        "DHCPv6 client",
    ));
    for t in ND_OUT {
        output.push(rule(
            vec![
                Family(self::Family::V6),
                Protocol(self::Protocol::Icmpv6),
                Icmpv6Type(t),
                HopLimit(255),
            ],
            Accept,
            "IPv6 neighbour and router discovery (on-link only)",
        ));
    }
    if !selective.is_empty() {
        output.push(rule(
            vec![CtMark(EXCLUDED_MARK), Ct(ESTABLISHED_RELATED)],
            Accept,
            "replies on connections an exclusion let through",
        ));
    }
    output.extend(excluded_out);
    output.push(rule(
        vec![Protocol(self::Protocol::Tcp)],
        RejectTcpReset,
        "everything else: fail fast",
    ));
    output.push(rule(
        vec![],
        RejectAdminProhibited,
        "everything else: fail fast",
    ));

    let mut sets = vec![
        Set {
            name: MGMT_V4.to_owned(),
            family: self::Family::V4,
            elements: Elements::Addresses(v4),
        },
        Set {
            name: MGMT_V6.to_owned(),
            family: self::Family::V6,
            elements: Elements::Addresses(v6),
        },
    ];
    sets.extend(excluded_sets);
    Some(Ruleset {
        sets,
        chains: vec![
            Chain {
                name: "input",
                hook: Hook::Input,
                priority: PRIORITY,
                rules: input,
            },
            Chain {
                name: "output",
                hook: Hook::Output,
                priority: PRIORITY,
                rules: output,
            },
            Chain {
                name: "forward",
                hook: Hook::Forward,
                priority: PRIORITY,
                rules: Vec::new(),
            },
        ],
    })
}

/// What Selective isolation's exclusions add: rules for the input and output
/// chains, and the sets of remote addresses (or address and port pairs)
/// those rules look up.
struct Exclusions {
    input: Vec<Rule>,
    output: Vec<Rule>,
    sets: Vec<Set>,
}

impl Exclusions {
    /// An exclusion rule: `matches`, then the application's cgroup if the
    /// rule has one, marking and accepting what it matches, in the input
    /// chain (`inbound`) or the output chain.
    fn push_rule(&mut self, inbound: bool, mut matches: Vec<Match>, cgroup: Option<CgroupMatch>) {
        if let Some(cgroup) = cgroup {
            matches.push(Match::SocketCgroup(cgroup));
        }
        let rule = Rule {
            matches,
            action: Action::MarkAndAccept(EXCLUDED_MARK),
            comment: "exclusion",
        };
        if inbound {
            self.input.push(rule);
        } else {
            self.output.push(rule);
        }
    }
}

/// An exclusion in one direction, without its remote addresses. Exclusions
/// of the same shape share their rules, and their addresses are merged into
/// sets per family, so the number of rules depends on the number of
/// distinct shapes, not on the number of addresses. (Exclusions with both
/// addresses and ports go further: see [`exclusion_rules`].)
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Shape {
    inbound: bool,
    cgroup: Option<CgroupMatch>,
    /// As [`merge_ports`] makes them; empty: any port of any protocol.
    ports: Vec<(u16, u16)>,
}

/// What the remote address of an exclusion rule must be.
enum Target {
    Any,
    Prefix(Family, IpAddr, u8),
    /// In the named set.
    Set(Family, String),
}

struct Group {
    shape: Shape,
    /// An exclusion of this shape names no address: every address matches,
    /// which makes the shape's address sets redundant.
    any_address: bool,
    v4: Vec<(IpAddr, u8)>,
    v6: Vec<(IpAddr, u8)>,
}

/// The rules and sets of Selective isolation's exclusions.
///
/// Every exclusion rule has the same action (mark the connection, accept),
/// so the rules are an OR of conditions and neither their order nor their
/// grouping changes what they let through. Exclusions that name both
/// addresses and ports are grouped by direction and cgroup: their address
/// and port ranges become disjoint pairs ([`disjoint_address_ports`]) in
/// one `address . port` interval set per family, looked up by one rule per
/// protocol (TCP, UDP); a lone pair of a prefix and a port range is matched
/// in the rules instead. The others are grouped by [`Shape`] (direction,
/// cgroup, port ranges); each group gets, per address
/// family it names, one rule per port range and protocol (TCP and UDP) for
/// each of its two named sets: a plain set of the single addresses
/// (`/32`, `/128`; a hash lookup, cheap to fill) and an interval set of the
/// shorter prefixes, merged ([`split_prefixes`]). When a family's addresses
/// come down to one prefix, the rule matches it directly (no set). A group
/// in which some exclusion names no address gets rules without an address
/// match.
fn exclusion_rules(exclusions: &[Exclusion]) -> Exclusions {
    let mut groups: Vec<Group> = Vec::new();
    let mut index: HashMap<Shape, usize> = HashMap::new();
    for exclusion in exclusions {
        let ports = merge_ports(&exclusion.ports);
        for inbound in [true, false] {
            if (inbound && !exclusion.inbound) || (!inbound && !exclusion.outbound) {
                continue;
            }
            let shape = Shape {
                inbound,
                cgroup: exclusion.cgroup,
                ports: ports.clone(),
            };
            let i = *index.entry(shape.clone()).or_insert_with(|| {
                groups.push(Group {
                    shape,
                    any_address: false,
                    v4: Vec::new(),
                    v6: Vec::new(),
                });
                groups.len() - 1
            });
            let group = &mut groups[i];
            group.any_address |= exclusion.remote.is_empty();
            for &(addr, len) in &exclusion.remote {
                match addr {
                    IpAddr::V4(_) => group.v4.push((addr, len)),
                    IpAddr::V6(_) => group.v6.push((addr, len)),
                }
            }
        }
    }

    let mut out = Exclusions {
        input: Vec::new(),
        output: Vec::new(),
        sets: Vec::new(),
    };
    // Address rules with ports, by direction and cgroup: their address and
    // port ranges go into `address . port` sets, whatever their ports.
    type Rectangles = [Vec<(u128, u128, u16, u16)>; 2];
    let mut buckets: Vec<((bool, Option<CgroupMatch>), Rectangles)> = Vec::new();
    for group in &groups {
        if group.any_address || group.shape.ports.is_empty() {
            continue;
        }
        let key = (group.shape.inbound, group.shape.cgroup);
        let i = match buckets.iter().position(|(k, _)| *k == key) {
            Some(i) => i,
            None => {
                buckets.push((key, [Vec::new(), Vec::new()]));
                buckets.len() - 1
            }
        };
        for (f, prefixes) in [&group.v4, &group.v6].into_iter().enumerate() {
            for &(addr, len) in prefixes {
                let (bits, value) = address_bits(addr);
                let host = host_mask(bits, u32::from(len));
                for &(first, last) in &group.shape.ports {
                    buckets[i].1[f].push((value & !host, value | host, first, last));
                }
            }
        }
    }
    let groups = groups
        .into_iter()
        .filter(|g| g.any_address || g.shape.ports.is_empty());
    for group in groups {
        let inbound = group.shape.inbound;
        // Any address, one prefix, or the sets of the addresses.
        let mut targets: Vec<Target> = Vec::new();
        if group.any_address {
            targets.push(Target::Any);
        } else {
            for (family, prefixes) in [(Family::V4, &group.v4), (Family::V6, &group.v6)] {
                let (singles, ranges) = split_prefixes(prefixes);
                // One prefix alone is matched in the rule, as nft would:
                // a set of one element only costs more.
                let lone = match (&singles[..], &ranges[..]) {
                    ([a], []) => Some((*a, address_bits(*a).0 as u8)),
                    ([], [(start, end)]) => range_prefix(*start, *end),
                    _ => None,
                };
                if let Some((addr, len)) = lone {
                    targets.push(Target::Prefix(family, addr, len));
                    continue;
                }
                for elements in [Elements::Ranges(ranges), Elements::Addresses(singles)] {
                    if elements.is_empty() {
                        continue;
                    }
                    let name = format!(
                        "excl_{}_{}{}",
                        out.sets.len(),
                        if inbound { "in" } else { "out" },
                        match family {
                            Family::V4 => "4",
                            Family::V6 => "6",
                        }
                    );
                    out.sets.push(Set {
                        name: name.clone(),
                        family,
                        elements,
                    });
                    targets.push(Target::Set(family, name));
                }
            }
        }
        let ports: Vec<Option<(Protocol, u16, u16)>> = if group.shape.ports.is_empty() {
            vec![None]
        } else {
            group
                .shape
                .ports
                .iter()
                .flat_map(|&(first, last)| {
                    [Protocol::Tcp, Protocol::Udp].map(|p| Some((p, first, last)))
                })
                .collect()
        };
        for target in &targets {
            for port in &ports {
                let mut matches = Vec::new();
                match target {
                    Target::Any => {}
                    Target::Prefix(family, ..) | Target::Set(family, _) => {
                        matches.push(Match::Family(*family));
                    }
                }
                if let Some((protocol, _, _)) = port {
                    matches.push(Match::Protocol(*protocol));
                }
                match target {
                    Target::Any => {}
                    Target::Prefix(_, addr, len) => matches.push(if inbound {
                        Match::SourcePrefix(*addr, *len)
                    } else {
                        Match::DestPrefix(*addr, *len)
                    }),
                    Target::Set(family, name) => matches.push(if inbound {
                        Match::SourceInSet(*family, name.clone())
                    } else {
                        Match::DestInSet(*family, name.clone())
                    }),
                }
                if let Some((_, first, last)) = port {
                    matches.push(Match::DestPortRange(*first, *last));
                }
                out.push_rule(inbound, matches, group.shape.cgroup);
            }
        }
    }
    for ((inbound, cgroup), rectangles) in buckets {
        for (family, rects) in [Family::V4, Family::V6].into_iter().zip(rectangles) {
            if rects.is_empty() {
                continue;
            }
            let v4 = family == Family::V4;
            let elements = disjoint_address_ports(v4, rects);
            // One prefix with one port range is matched in the rule.
            let lone = match &elements[..] {
                [e] => range_prefix(e.first, e.last).map(|p| (p, e.ports)),
                _ => None,
            };
            let name = format!(
                "excl_{}_{}{}p",
                out.sets.len(),
                if inbound { "in" } else { "out" },
                if v4 { "4" } else { "6" }
            );
            if lone.is_none() {
                out.sets.push(Set {
                    name: name.clone(),
                    family,
                    elements: Elements::AddressPorts(elements),
                });
            }
            for protocol in [Protocol::Tcp, Protocol::Udp] {
                let mut matches = vec![Match::Family(family), Match::Protocol(protocol)];
                match lone {
                    Some(((addr, len), (first, last))) => {
                        matches.push(if inbound {
                            Match::SourcePrefix(addr, len)
                        } else {
                            Match::DestPrefix(addr, len)
                        });
                        matches.push(Match::DestPortRange(first, last));
                    }
                    None => matches.push(if inbound {
                        Match::SourceAndPortInSet(family, name.clone())
                    } else {
                        Match::DestAndPortInSet(family, name.clone())
                    }),
                }
                out.push_rule(inbound, matches, cgroup);
            }
        }
    }
    out
}

/// Address ranges with port ranges (start, end, first port, last port, of
/// one family) as disjoint pairs that hold exactly the same (address, port)
/// points: the address line is cut wherever a range starts or ends, each
/// piece gets the merged ports of the ranges over it, and touching pieces
/// with the same ports are joined again. An interval set of concatenations
/// refuses overlapping elements. Sorted by address, then port. An empty
/// port range (first > last) holds no point and is dropped.
pub fn disjoint_address_ports(
    v4: bool,
    mut rects: Vec<(u128, u128, u16, u16)>,
) -> Vec<AddressPort> {
    let max = if v4 { u128::from(u32::MAX) } else { u128::MAX };
    rects.retain(|r| r.2 <= r.3);
    rects.sort_unstable();
    let mut bounds: Vec<u128> = Vec::with_capacity(rects.len() * 2);
    for &(start, end, _, _) in &rects {
        bounds.push(start);
        if end < max {
            bounds.push(end + 1);
        }
    }
    bounds.sort_unstable();
    bounds.dedup();
    // (first address, last address, ports), touching pieces joined.
    type Piece = (u128, u128, Vec<(u16, u16)>);
    let mut pieces: Vec<Piece> = Vec::new();
    let mut active: Vec<(u128, u16, u16)> = Vec::new();
    let mut next = 0;
    for (i, &lo) in bounds.iter().enumerate() {
        let hi = bounds.get(i + 1).map_or(max, |b| b - 1);
        while next < rects.len() && rects[next].0 == lo {
            let (_, end, first, last) = rects[next];
            active.push((end, first, last));
            next += 1;
        }
        active.retain(|&(end, _, _)| end >= lo);
        if active.is_empty() {
            continue;
        }
        let ports: Vec<(u16, u16)> = active.iter().map(|&(_, f, l)| (f, l)).collect();
        let ports = merge_ports(&ports);
        match pieces.last_mut() {
            Some(prev) if prev.1.checked_add(1) == Some(lo) && prev.2 == ports => prev.1 = hi,
            _ => pieces.push((lo, hi, ports)),
        }
    }
    pieces
        .into_iter()
        .flat_map(|(lo, hi, ports)| {
            ports.into_iter().map(move |p| AddressPort {
                first: address_of(v4, lo),
                last: address_of(v4, hi),
                ports: p,
            })
        })
        .collect()
}

/// Port ranges sorted and merged where they overlap or touch; they match
/// the same ports. An empty range (first > last) is kept as it is, so the
/// encoder refuses it rather than it silently matching any port (in an
/// `address . port` set it holds nothing, see [`disjoint_address_ports`]).
pub fn merge_ports(ranges: &[(u16, u16)]) -> Vec<(u16, u16)> {
    let mut valid: Vec<(u16, u16)> = ranges.iter().filter(|(f, l)| f <= l).copied().collect();
    let empty = ranges.iter().filter(|(f, l)| f > l).copied();
    valid.sort_unstable();
    let mut merged: Vec<(u16, u16)> = Vec::with_capacity(valid.len());
    for (first, last) in valid {
        match merged.last_mut() {
            Some(prev) if u32::from(first) <= u32::from(prev.1) + 1 => {
                prev.1 = prev.1.max(last);
            }
            _ => merged.push((first, last)),
        }
    }
    merged.extend(empty);
    merged
}

/// Prefixes of one family split into single addresses (full-length
/// prefixes, for a plain set: sorted, without duplicates and without those
/// a shorter prefix covers) and the shorter prefixes as merged ranges (for
/// an interval set, see [`merge_prefixes`]). Together they hold exactly the
/// addresses of the prefixes.
pub fn split_prefixes(prefixes: &[(IpAddr, u8)]) -> (Vec<IpAddr>, Vec<(IpAddr, IpAddr)>) {
    let full = |&(a, len): &(IpAddr, u8)| u32::from(len) >= address_bits(a).0;
    let shorter: Vec<(IpAddr, u8)> = prefixes.iter().filter(|p| !full(p)).copied().collect();
    let ranges = merge_prefixes(&shorter);
    let bounds: Vec<(bool, u128, u128)> = ranges
        .iter()
        .map(|&(s, e)| (s.is_ipv4(), address_bits(s).1, address_bits(e).1))
        .collect();
    let mut singles: Vec<IpAddr> = prefixes
        .iter()
        .filter(|p| full(p))
        .map(|&(a, _)| a)
        .filter(|a| {
            let (v4, v) = (a.is_ipv4(), address_bits(*a).1);
            // Ranges are sorted by family (IPv4 first), then start.
            let i = bounds.partition_point(|&(rv4, s, _)| (!rv4, s) <= (!v4, v));
            i == 0 || {
                let (rv4, _, e) = bounds[i - 1];
                rv4 != v4 || e < v
            }
        })
        .collect();
    singles.sort_unstable();
    singles.dedup();
    (singles, ranges)
}

/// Bits of an address of this kind, and its value as a number.
fn address_bits(addr: IpAddr) -> (u32, u128) {
    match addr {
        IpAddr::V4(a) => (32, u128::from(u32::from(a))),
        IpAddr::V6(a) => (128, u128::from(a)),
    }
}

fn address_of(v4: bool, value: u128) -> IpAddr {
    if v4 {
        IpAddr::V4(std::net::Ipv4Addr::from(value as u32))
    } else {
        IpAddr::V6(std::net::Ipv6Addr::from(value))
    }
}

/// The mask of the host bits of a prefix of `len` in an address of `bits`.
fn host_mask(bits: u32, len: u32) -> u128 {
    let host = bits - len.min(bits);
    if host == 0 {
        0
    } else {
        u128::MAX >> (128 - host)
    }
}

/// Prefixes as the inclusive address ranges an interval set holds: for each
/// family, sorted, with overlapping and adjacent ranges merged into one (the
/// kernel refuses overlapping intervals; merging changes no address's
/// membership). IPv4 ranges come first. Host bits of a prefix are ignored
/// (`10.1.2.3/8` is `10.0.0.0/8`), and a prefix length longer than the
/// address is taken as the whole address.
pub fn merge_prefixes(prefixes: &[(IpAddr, u8)]) -> Vec<(IpAddr, IpAddr)> {
    let mut out = Vec::new();
    for v4 in [true, false] {
        let mut ranges: Vec<(u128, u128)> = prefixes
            .iter()
            .filter(|(a, _)| a.is_ipv4() == v4)
            .map(|&(a, len)| {
                let (bits, value) = address_bits(a);
                let host = host_mask(bits, u32::from(len));
                (value & !host, value | host)
            })
            .collect();
        ranges.sort_unstable();
        let mut merged: Vec<(u128, u128)> = Vec::with_capacity(ranges.len());
        for (start, end) in ranges {
            match merged.last_mut() {
                Some(prev) if start <= prev.1.saturating_add(1) => prev.1 = prev.1.max(end),
                _ => merged.push((start, end)),
            }
        }
        out.extend(
            merged
                .into_iter()
                .map(|(s, e)| (address_of(v4, s), address_of(v4, e))),
        );
    }
    out
}

/// The prefix a range is, if it is one.
fn range_prefix(start: IpAddr, end: IpAddr) -> Option<(IpAddr, u8)> {
    let (bits, s) = address_bits(start);
    let (_, e) = address_bits(end);
    let host = e.checked_sub(s)?;
    // A prefix: the host part is all ones and the start has none of it.
    (start.is_ipv4() == end.is_ipv4() && host & host.wrapping_add(1) == 0 && s & host == 0)
        .then(|| (start, (bits - host.count_ones()) as u8))
}

/// A range in nft syntax: an address, a prefix, or `first-last`.
fn range_text(start: IpAddr, end: IpAddr) -> String {
    if start == end {
        return start.to_string();
    }
    match range_prefix(start, end) {
        Some((addr, len)) => format!("{addr}/{len}"),
        None => format!("{start}-{end}"),
    }
}

fn family_word(family: Family) -> &'static str {
    match family {
        Family::V4 => "ip",
        Family::V6 => "ip6",
    }
}

impl fmt::Display for Match {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Match::InputLoopback => write!(f, "iiftype loopback"),
            Match::OutputLoopback => write!(f, "oiftype loopback"),
            Match::Family(family) => write!(
                f,
                "meta nfproto {}",
                match family {
                    Family::V4 => "ipv4",
                    Family::V6 => "ipv6",
                }
            ),
            Match::Protocol(p) => write!(
                f,
                "meta l4proto {}",
                match p {
                    Protocol::Tcp => "tcp",
                    Protocol::Udp => "udp",
                    Protocol::Icmpv6 => "ipv6-icmp",
                }
            ),
            Match::SourceInSet(family, set) => write!(f, "{} saddr @{set}", family_word(*family)),
            Match::DestInSet(family, set) => write!(f, "{} daddr @{set}", family_word(*family)),
            Match::SourceAndPortInSet(family, set) => {
                write!(f, "{} saddr . th dport @{set}", family_word(*family))
            }
            Match::DestAndPortInSet(family, set) => {
                write!(f, "{} daddr . th dport @{set}", family_word(*family))
            }
            Match::SourcePrefix(addr, len) => {
                let word = if addr.is_ipv4() { "ip" } else { "ip6" };
                write!(f, "{word} saddr {addr}/{len}")
            }
            Match::DestPrefix(addr, len) => {
                let word = if addr.is_ipv4() { "ip" } else { "ip6" };
                write!(f, "{word} daddr {addr}/{len}")
            }
            Match::DestPortRange(first, last) if first == last => write!(f, "th dport {first}"),
            Match::DestPortRange(first, last) => write!(f, "th dport {first}-{last}"),
            Match::SocketCgroup(c) => write!(f, "socket cgroupv2 level {} {}", c.level, c.id),
            Match::SourcePort(p) => write!(f, "th sport {p}"),
            Match::DestPort(p) => write!(f, "th dport {p}"),
            Match::Ct(states) => {
                let mut words = Vec::new();
                if states.established {
                    words.push("established");
                }
                if states.related {
                    words.push("related");
                }
                // A flag list, which nft encodes as a bit mask, as we do
                // (`{ a, b }` would make it an anonymous set).
                write!(f, "ct state {}", words.join(","))
            }
            Match::CtMark(mark) => write!(f, "ct mark {mark:#010x}"),
            Match::SocketGid(gid) => write!(f, "meta skgid {gid}"),
            Match::Icmpv6Type(t) => write!(f, "icmpv6 type {t}"),
            Match::HopLimit(h) => write!(f, "ip6 hoplimit {h}"),
        }
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Action::Accept => write!(f, "accept"),
            Action::MarkAndAccept(mark) => write!(f, "ct mark set {mark:#010x} accept"),
            Action::RejectTcpReset => write!(f, "reject with tcp reset"),
            Action::RejectAdminProhibited => write!(f, "reject with icmpx admin-prohibited"),
        }
    }
}

impl fmt::Display for Ruleset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "table inet {TABLE} {{")?;
        for set in &self.sets {
            let kind = match set.family {
                Family::V4 => "ipv4_addr",
                Family::V6 => "ipv6_addr",
            };
            let kind = match set.elements {
                Elements::AddressPorts(_) => format!("{kind} . inet_service"),
                _ => kind.to_owned(),
            };
            let (flags, elements): (&str, Vec<String>) = match &set.elements {
                Elements::Addresses(a) => ("", a.iter().map(ToString::to_string).collect()),
                Elements::AddressPorts(r) => (
                    " flags interval;",
                    r.iter()
                        .map(|e| {
                            let ports = match e.ports {
                                (p, q) if p == q => p.to_string(),
                                (p, q) => format!("{p}-{q}"),
                            };
                            format!("{} . {ports}", range_text(e.first, e.last))
                        })
                        .collect(),
                ),
                Elements::Ranges(r) => (
                    " flags interval;",
                    r.iter().map(|&(s, e)| range_text(s, e)).collect(),
                ),
            };
            let elements = if elements.is_empty() {
                String::new()
            } else {
                format!(" elements = {{ {} }}", elements.join(", "))
            };
            writeln!(f, "  set {} {{ type {kind};{flags}{elements} }}", set.name)?;
        }
        for chain in &self.chains {
            let hook = match chain.hook {
                Hook::Input => "input",
                Hook::Output => "output",
                Hook::Forward => "forward",
            };
            writeln!(f, "  chain {} {{", chain.name)?;
            writeln!(
                f,
                "    type filter hook {hook} priority {}; policy drop;",
                chain.priority
            )?;
            for rule in &chain.rules {
                let mut words: Vec<String> = rule.matches.iter().map(ToString::to_string).collect();
                words.push(rule.action.to_string());
                writeln!(f, "    {} comment \"{}\"", words.join(" "), rule.comment)?;
            }
            writeln!(f, "  }}")?;
        }
        write!(f, "}}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn full() -> Policy {
        Policy::Isolated(Isolation {
            scope: Scope::Full,
            server_addresses: vec!["198.18.0.1".parse().unwrap(), "fd00::1".parse().unwrap()],
            server_port: 8443,
            agent_gid: 61742,
            exclusions: vec![Exclusion {
                name: "ignored by Full".into(),
                cgroup: None,
                inbound: true,
                outbound: true,
                remote: vec![("198.18.0.9".parse().unwrap(), 32)],
                ports: vec![],
            }],
        })
    }

    fn selective(exclusions: Vec<Exclusion>) -> Ruleset {
        let Policy::Isolated(mut isolation) = full() else {
            unreachable!()
        };
        isolation.scope = Scope::Selective;
        isolation.exclusions = exclusions;
        render(&Policy::Isolated(isolation)).unwrap()
    }

    fn lines(ruleset: &Ruleset, chain: usize) -> Vec<String> {
        ruleset.chains[chain]
            .rules
            .iter()
            .filter(|r| r.comment.contains("exclusion"))
            .map(|r| {
                let mut words: Vec<String> = r.matches.iter().map(ToString::to_string).collect();
                words.push(r.action.to_string());
                words.join(" ")
            })
            .collect()
    }

    #[test]
    fn selective_lets_through_exactly_the_exclusions() {
        let rules = selective(vec![
            Exclusion {
                name: "curl to ext".into(),
                cgroup: Some(CgroupMatch { level: 2, id: 4242 }),
                inbound: false,
                outbound: true,
                remote: vec![],
                ports: vec![],
            },
            Exclusion {
                name: "web".into(),
                cgroup: None,
                inbound: true,
                outbound: true,
                remote: vec![
                    ("198.18.0.4".parse().unwrap(), 32),
                    ("fd00::".parse().unwrap(), 64),
                ],
                ports: vec![(8080, 8080), (9000, 9100)],
            },
        ]);
        assert_eq!(
            lines(&rules, 0),
            [
                "ct mark 0x434f5245 ct state established,related accept",
                "meta nfproto ipv4 meta l4proto tcp ip saddr . th dport @excl_0_in4p ct mark set 0x434f5245 accept",
                "meta nfproto ipv4 meta l4proto udp ip saddr . th dport @excl_0_in4p ct mark set 0x434f5245 accept",
                "meta nfproto ipv6 meta l4proto tcp ip6 saddr . th dport @excl_1_in6p ct mark set 0x434f5245 accept",
                "meta nfproto ipv6 meta l4proto udp ip6 saddr . th dport @excl_1_in6p ct mark set 0x434f5245 accept",
            ]
        );
        // Addresses with ports: pairs of address and port ranges, per
        // direction and family.
        let text = rules.to_string();
        for line in [
            "  set excl_0_in4p { type ipv4_addr . inet_service; flags interval; elements = { 198.18.0.4 . 8080, 198.18.0.4 . 9000-9100 } }",
            "  set excl_1_in6p { type ipv6_addr . inet_service; flags interval; elements = { fd00::/64 . 8080, fd00::/64 . 9000-9100 } }",
            "  set excl_2_out4p { type ipv4_addr . inet_service; flags interval; elements = { 198.18.0.4 . 8080, 198.18.0.4 . 9000-9100 } }",
        ] {
            assert!(text.lines().any(|l| l == line), "{line}\n{text}");
        }
        assert_eq!(rules.sets.len(), 6);
        let out = lines(&rules, 1);
        assert_eq!(
            out[0],
            "ct mark 0x434f5245 ct state established,related accept"
        );
        assert_eq!(
            out[1],
            "socket cgroupv2 level 2 4242 ct mark set 0x434f5245 accept"
        );
        assert_eq!(out.len(), 6);
        // The exclusions come before the final rejects.
        let output = &rules.chains[1].rules;
        assert_eq!(
            output[output.len() - 1].action,
            Action::RejectAdminProhibited
        );
    }

    #[test]
    fn full_ignores_the_exclusions_always() {
        let rendered = render(&full()).unwrap();
        assert!(lines(&rendered, 0).is_empty() && lines(&rendered, 1).is_empty());
    }

    #[test]
    fn not_isolated_has_no_table() {
        assert_eq!(render(&Policy::NotIsolated), None);
    }

    #[test]
    fn full_isolation_snapshot() {
        let expected = r#"table inet cordon {
  set mgmt_v4 { type ipv4_addr; elements = { 198.18.0.1 } }
  set mgmt_v6 { type ipv6_addr; elements = { fd00::1 } }
  chain input {
    type filter hook input priority -10; policy drop;
    iiftype loopback accept comment "loopback"
    meta nfproto ipv4 meta l4proto tcp ip saddr @mgmt_v4 th sport 8443 ct state established accept comment "replies from the management server"
    meta nfproto ipv6 meta l4proto tcp ip6 saddr @mgmt_v6 th sport 8443 ct state established accept comment "replies from the management server"
    ct mark 0x434f5244 ct state established,related accept comment "replies to the agent's own connections (DNS)"
    meta nfproto ipv4 meta l4proto udp th sport 67 th dport 68 accept comment "DHCPv4 client"
    meta nfproto ipv6 meta l4proto udp ip6 saddr fe80::/10 th sport 547 th dport 546 accept comment "DHCPv6 client"
    meta nfproto ipv6 meta l4proto ipv6-icmp icmpv6 type 134 ip6 hoplimit 255 accept comment "IPv6 neighbour and router discovery (on-link only)"
    meta nfproto ipv6 meta l4proto ipv6-icmp icmpv6 type 135 ip6 hoplimit 255 accept comment "IPv6 neighbour and router discovery (on-link only)"
    meta nfproto ipv6 meta l4proto ipv6-icmp icmpv6 type 136 ip6 hoplimit 255 accept comment "IPv6 neighbour and router discovery (on-link only)"
  }
  chain output {
    type filter hook output priority -10; policy drop;
    oiftype loopback accept comment "loopback"
    meta nfproto ipv4 meta l4proto tcp meta skgid 61742 ip daddr @mgmt_v4 th dport 8443 ct mark set 0x434f5244 accept comment "the agent's management channel"
    meta nfproto ipv6 meta l4proto tcp meta skgid 61742 ip6 daddr @mgmt_v6 th dport 8443 ct mark set 0x434f5244 accept comment "the agent's management channel"
    ct mark 0x434f5244 ct state established,related accept comment "the rest of the agent's own connections"
    meta l4proto udp meta skgid 61742 th dport 53 ct mark set 0x434f5244 accept comment "DNS from the agent only"
    meta l4proto tcp meta skgid 61742 th dport 53 ct mark set 0x434f5244 accept comment "DNS from the agent only"
    meta nfproto ipv4 meta l4proto udp th sport 68 th dport 67 accept comment "DHCPv4 client"
    meta nfproto ipv6 meta l4proto udp th sport 546 th dport 547 accept comment "DHCPv6 client"
    meta nfproto ipv6 meta l4proto ipv6-icmp icmpv6 type 133 ip6 hoplimit 255 accept comment "IPv6 neighbour and router discovery (on-link only)"
    meta nfproto ipv6 meta l4proto ipv6-icmp icmpv6 type 135 ip6 hoplimit 255 accept comment "IPv6 neighbour and router discovery (on-link only)"
    meta nfproto ipv6 meta l4proto ipv6-icmp icmpv6 type 136 ip6 hoplimit 255 accept comment "IPv6 neighbour and router discovery (on-link only)"
    meta l4proto tcp reject with tcp reset comment "everything else: fail fast"
    reject with icmpx admin-prohibited comment "everything else: fail fast"
  }
  chain forward {
    type filter hook forward priority -10; policy drop;
  }
}"#;
        assert_eq!(render(&full()).unwrap().to_string(), expected);
    }

    #[test]
    fn every_server_address_lands_in_its_family_set() {
        let Policy::Isolated(mut isolation) = full() else {
            unreachable!()
        };
        isolation.server_addresses = vec![
            "198.18.0.1".parse().unwrap(),
            "198.18.0.2".parse().unwrap(),
            "fd00::2".parse().unwrap(),
        ];
        let rules = render(&Policy::Isolated(isolation)).unwrap();
        assert_eq!(rules.sets[0].elements.len(), 2);
        assert_eq!(rules.sets[1].elements.len(), 1);
        assert_eq!(
            rules.rule_counts(),
            vec![("input", 9), ("output", 13), ("forward", 0)]
        );
    }

    #[test]
    fn only_the_agents_group_reaches_the_server_and_dns() {
        let rules = render(&full()).unwrap();
        let output = &rules.chains[1];
        for rule in &output.rules {
            let to_server_or_dns = rule
                .matches
                .iter()
                .any(|m| matches!(m, Match::DestInSet(..)) || *m == Match::DestPort(53));
            if to_server_or_dns {
                assert!(rule.matches.contains(&Match::SocketGid(61742)), "{rule:?}");
            }
        }
    }

    fn p(s: &str) -> (IpAddr, u8) {
        let (a, l) = s.split_once('/').unwrap();
        (a.parse().unwrap(), l.parse().unwrap())
    }

    fn texts(ranges: &[(IpAddr, IpAddr)]) -> Vec<String> {
        ranges.iter().map(|&(s, e)| range_text(s, e)).collect()
    }

    #[test]
    fn overlapping_and_adjacent_prefixes_merge_into_disjoint_ranges() {
        let prefixes: Vec<(IpAddr, u8)> = [
            "fd00:0:0:1::/64",
            "198.18.3.7/32",
            "198.18.0.0/24",
            "198.18.0.128/25",
            "198.18.1.0/24",
            "198.18.3.5/32",
            "fd00::1/128",
            "198.18.3.6/32",
            "10.1.2.3/8",
            "fd00::/64",
            "198.18.9.9/40",
        ]
        .iter()
        .map(|s| p(s))
        .collect();
        assert_eq!(
            texts(&merge_prefixes(&prefixes)),
            [
                "10.0.0.0/8",
                "198.18.0.0/23",
                "198.18.3.5-198.18.3.7",
                "198.18.9.9",
                "fd00::/63",
            ]
        );
        // The whole address space, and ranges that reach its end.
        assert_eq!(
            texts(&merge_prefixes(&[
                p("0.0.0.0/0"),
                p("198.18.0.1/32"),
                p("::/0")
            ])),
            ["0.0.0.0/0", "::/0"]
        );
        assert_eq!(
            texts(&merge_prefixes(&[
                p("255.255.255.255/32"),
                p("255.255.255.254/32")
            ])),
            ["255.255.255.254/31"]
        );
        assert!(merge_prefixes(&[]).is_empty());
    }

    #[test]
    fn single_addresses_go_apart_unless_a_prefix_covers_them() {
        let (singles, ranges) = split_prefixes(&[
            p("198.18.0.9/32"),
            p("198.18.1.0/24"),
            p("198.18.1.7/32"),
            p("198.18.0.9/32"),
            p("fd00::1/128"),
            p("198.18.2.0/32"),
            p("fd00:1::/64"),
            p("fd00:1::5/128"),
        ]);
        let singles: Vec<String> = singles.iter().map(ToString::to_string).collect();
        assert_eq!(singles, ["198.18.0.9", "198.18.2.0", "fd00::1"]);
        assert_eq!(texts(&ranges), ["198.18.1.0/24", "fd00:1::/64"]);
    }

    #[test]
    fn address_and_port_ranges_become_disjoint_pairs() {
        let v = |s: &str| address_bits(s.parse().unwrap()).1;
        let pairs = disjoint_address_ports(
            true,
            vec![
                // 198.18.0.0/24 on 22 and 80, .128/25 of it on 22-25 too,
                // 198.18.1.0/24 on 22 and 80 (touches the first: joined),
                // 198.18.9.9 on 443 twice.
                (v("198.18.0.0"), v("198.18.0.255"), 22, 22),
                (v("198.18.0.0"), v("198.18.0.255"), 80, 80),
                (v("198.18.0.128"), v("198.18.0.255"), 22, 25),
                (v("198.18.1.0"), v("198.18.1.255"), 80, 80),
                (v("198.18.1.0"), v("198.18.1.255"), 22, 22),
                (v("198.18.9.9"), v("198.18.9.9"), 443, 443),
                (v("198.18.9.9"), v("198.18.9.9"), 443, 443),
                (v("255.255.255.255"), v("255.255.255.255"), 1, 2),
            ],
        );
        let text: Vec<String> = pairs
            .iter()
            .map(|e| {
                format!(
                    "{} {}-{}",
                    range_text(e.first, e.last),
                    e.ports.0,
                    e.ports.1
                )
            })
            .collect();
        assert_eq!(
            text,
            [
                "198.18.0.0/25 22-22",
                "198.18.0.0/25 80-80",
                "198.18.0.128/25 22-25",
                "198.18.0.128/25 80-80",
                "198.18.1.0/24 22-22",
                "198.18.1.0/24 80-80",
                "198.18.9.9 443-443",
                "255.255.255.255 1-2",
            ]
        );
    }

    #[test]
    fn port_ranges_merge_but_empty_ones_stay_to_be_refused() {
        assert_eq!(
            merge_ports(&[(9000, 9100), (22, 22), (8080, 8999), (23, 23), (9050, 9060)]),
            [(22, 23), (8080, 9100)]
        );
        assert_eq!(merge_ports(&[(65535, 65535), (1, 65534)]), [(1, 65535)]);
        assert_eq!(merge_ports(&[(10, 5), (1, 2)]), [(1, 2), (10, 5)]);
    }

    fn address_rule(name: String, remote: Vec<(IpAddr, u8)>) -> Exclusion {
        Exclusion {
            name,
            cgroup: None,
            inbound: false,
            outbound: true,
            remote,
            ports: vec![],
        }
    }

    #[test]
    fn a_thousand_address_rules_of_one_shape_are_one_rule_and_one_set() {
        let exclusions: Vec<Exclusion> = (0..1000u32)
            .map(|i| {
                let a = IpAddr::V4(std::net::Ipv4Addr::from(0xc612_0000 + 2 * i));
                address_rule(format!("r{i}"), vec![(a, 32)])
            })
            .collect();
        let rules = selective(exclusions);
        // The replies rule and one rule for all 1,000 addresses.
        assert_eq!(
            lines(&rules, 1),
            [
                "ct mark 0x434f5245 ct state established,related accept",
                "meta nfproto ipv4 ip daddr @excl_0_out4 ct mark set 0x434f5245 accept",
            ]
        );
        assert_eq!(rules.sets.len(), 3);
        assert_eq!(rules.sets[2].elements.len(), 1000);
        assert_eq!(
            rules.rule_counts(),
            vec![("input", 10), ("output", 15), ("forward", 0)]
        );
    }

    #[test]
    fn a_thousand_rules_each_with_its_own_port_are_two_rules_and_one_set() {
        let exclusions: Vec<Exclusion> = (0..1000u32)
            .map(|i| {
                let a = IpAddr::V4(std::net::Ipv4Addr::from(0xc612_0000 + 2 * i));
                let mut rule = address_rule(format!("r{i}"), vec![(a, 32)]);
                rule.ports = vec![(1000 + i as u16, 1000 + i as u16)];
                rule
            })
            .collect();
        let rules = selective(exclusions);
        assert_eq!(
            lines(&rules, 1)[1..],
            [
                "meta nfproto ipv4 meta l4proto tcp ip daddr . th dport @excl_0_out4p ct mark set 0x434f5245 accept",
                "meta nfproto ipv4 meta l4proto udp ip daddr . th dport @excl_0_out4p ct mark set 0x434f5245 accept",
            ]
        );
        assert_eq!(rules.sets.len(), 3);
        let Elements::AddressPorts(pairs) = &rules.sets[2].elements else {
            panic!("{:?}", rules.sets[2])
        };
        assert_eq!(pairs.len(), 1000);
        assert_eq!(
            pairs[7],
            AddressPort {
                first: "198.18.0.14".parse().unwrap(),
                last: "198.18.0.14".parse().unwrap(),
                ports: (1007, 1007),
            }
        );
    }

    #[test]
    fn a_rule_without_addresses_makes_its_shapes_sets_redundant() {
        let mut any = address_rule("any".into(), vec![]);
        any.ports = vec![(443, 443)];
        let mut some = address_rule("some".into(), vec![p("198.18.0.0/24")]);
        some.ports = vec![(443, 443)];
        let rules = selective(vec![some, any]);
        assert_eq!(rules.sets.len(), 2, "{:?}", rules.sets);
        assert_eq!(
            lines(&rules, 1)[1..],
            [
                "meta l4proto tcp th dport 443 ct mark set 0x434f5245 accept",
                "meta l4proto udp th dport 443 ct mark set 0x434f5245 accept",
            ]
        );
    }

    #[test]
    fn interval_sets_display_in_nft_syntax() {
        let rules = selective(vec![
            address_rule("a".into(), vec![p("198.18.0.0/24"), p("198.18.1.0/24")]),
            address_rule("b".into(), vec![p("198.18.3.5/32"), p("198.18.3.6/31")]),
            address_rule("c".into(), vec![p("fd00::9/128")]),
        ]);
        let text = rules.to_string();
        for line in [
            "  set excl_0_out4 { type ipv4_addr; flags interval; elements = { 198.18.0.0/23, 198.18.3.6/31 } }",
            "  set excl_1_out4 { type ipv4_addr; elements = { 198.18.3.5 } }",
            "    meta nfproto ipv4 ip daddr @excl_0_out4 ct mark set 0x434f5245 accept comment \"exclusion\"",
            "    meta nfproto ipv4 ip daddr @excl_1_out4 ct mark set 0x434f5245 accept comment \"exclusion\"",
            "    meta nfproto ipv6 ip6 daddr fd00::9/128 ct mark set 0x434f5245 accept comment \"exclusion\"",
        ] {
            assert!(text.lines().any(|l| l == line), "{line}\n{text}");
        }
        assert_eq!(rules.sets.len(), 4, "{text}");
    }

    /// A packet as the exclusion rules see it.
    #[derive(Debug, Clone, Copy)]
    struct Packet {
        inbound: bool,
        remote: IpAddr,
        protocol: Option<Protocol>,
        /// The service port (remote for outbound, local for inbound).
        port: u16,
        cgroup: Option<CgroupMatch>,
    }

    /// What the exclusions say, straight from their definition.
    fn excluded_by_definition(exclusions: &[Exclusion], pk: &Packet) -> bool {
        exclusions.iter().any(|x| {
            (if pk.inbound { x.inbound } else { x.outbound })
                && (x.cgroup.is_none() || x.cgroup == pk.cgroup)
                && (x.remote.is_empty()
                    || x.remote.iter().any(|&(a, len)| {
                        let (bits, v) = address_bits(a);
                        let (pbits, pv) = address_bits(pk.remote);
                        let host = host_mask(bits, u32::from(len));
                        bits == pbits && (v & !host) == (pv & !host)
                    }))
                && (x.ports.is_empty()
                    || (matches!(pk.protocol, Some(Protocol::Tcp | Protocol::Udp))
                        && x.ports.iter().any(|&(f, l)| f <= pk.port && pk.port <= l)))
        })
    }

    /// What the rendered exclusion rules and sets let through.
    fn excluded_by_rules(rules: &Ruleset, pk: &Packet) -> bool {
        let chain = &rules.chains[if pk.inbound { 0 } else { 1 }];
        let family = if pk.remote.is_ipv4() {
            Family::V4
        } else {
            Family::V6
        };
        let in_set = |f: &Family, name: &str| {
            let set = rules.sets.iter().find(|s| s.name == name).unwrap();
            let (_, v) = address_bits(pk.remote);
            *f == family
                && match &set.elements {
                    Elements::Ranges(ranges) => ranges.iter().any(|&(s, e)| {
                        s.is_ipv4() == pk.remote.is_ipv4()
                            && address_bits(s).1 <= v
                            && v <= address_bits(e).1
                    }),
                    Elements::Addresses(a) => a.contains(&pk.remote),
                    Elements::AddressPorts(_) => panic!("{name} holds address . port"),
                }
        };
        chain
            .rules
            .iter()
            .filter(|r| r.comment == "exclusion")
            .any(|r| {
                r.matches.iter().all(|m| match m {
                    Match::Family(f) => *f == family,
                    Match::Protocol(p) => pk.protocol == Some(*p),
                    Match::SourceInSet(f, name) => pk.inbound && in_set(f, name),
                    Match::DestInSet(f, name) => !pk.inbound && in_set(f, name),
                    Match::SourceAndPortInSet(f, name) | Match::DestAndPortInSet(f, name) => {
                        let set = rules.sets.iter().find(|s| s.name == *name).unwrap();
                        let Elements::AddressPorts(pairs) = &set.elements else {
                            panic!("{name} is not a set of address . port")
                        };
                        let (_, v) = address_bits(pk.remote);
                        pk.inbound == matches!(m, Match::SourceAndPortInSet(..))
                            && *f == family
                            && pairs.iter().any(|e| {
                                e.first.is_ipv4() == pk.remote.is_ipv4()
                                    && address_bits(e.first).1 <= v
                                    && v <= address_bits(e.last).1
                                    && e.ports.0 <= pk.port
                                    && pk.port <= e.ports.1
                            })
                    }
                    Match::SourcePrefix(a, len) | Match::DestPrefix(a, len) => {
                        pk.inbound == matches!(m, Match::SourcePrefix(..)) && {
                            let (bits, v) = address_bits(*a);
                            let (pbits, pv) = address_bits(pk.remote);
                            let host = host_mask(bits, u32::from(*len));
                            bits == pbits && (v & !host) == (pv & !host)
                        }
                    }
                    Match::DestPortRange(f, l) => *f <= pk.port && pk.port <= *l,
                    Match::SocketCgroup(c) => pk.cgroup == Some(*c),
                    other => panic!("unexpected match in an exclusion rule: {other:?}"),
                })
            })
    }

    /// A small deterministic generator (xorshift), so failures reproduce.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
        /// An address near the others, so prefixes overlap and touch.
        fn address(&mut self) -> IpAddr {
            if self.below(2) == 0 {
                IpAddr::V4(std::net::Ipv4Addr::from(
                    0xc612_0000 + self.below(1024) as u32,
                ))
            } else {
                IpAddr::V6(std::net::Ipv6Addr::from(
                    0xfd00_u128 << 112 | u128::from(self.below(1024)),
                ))
            }
        }
    }

    #[test]
    fn grouped_rules_let_through_exactly_what_the_exclusions_say() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let cgroups = [
            None,
            Some(CgroupMatch { level: 2, id: 7 }),
            Some(CgroupMatch { level: 3, id: 9 }),
        ];
        let protocols = [
            None,
            Some(Protocol::Tcp),
            Some(Protocol::Udp),
            Some(Protocol::Icmpv6),
        ];
        let mut checked = 0;
        for round in 0..60 {
            let exclusions: Vec<Exclusion> = (0..1 + rng.below(40))
                .map(|i| {
                    let direction = rng.below(3);
                    let remote = (0..rng.below(4))
                        .map(|_| {
                            let a = rng.address();
                            let len = if a.is_ipv4() {
                                25 + rng.below(8)
                            } else {
                                121 + rng.below(8)
                            };
                            (a, len as u8)
                        })
                        .collect();
                    // Few port lists, so that shapes repeat and share sets.
                    let ports = match rng.below(4) {
                        0 | 1 => vec![],
                        2 => vec![(22, 22)],
                        _ => vec![(30, 35), (22, 22), (33, 40)],
                    };
                    Exclusion {
                        name: format!("r{round}.{i}"),
                        cgroup: cgroups[rng.below(3) as usize],
                        inbound: direction != 1,
                        outbound: direction != 0,
                        remote,
                        ports,
                    }
                })
                .collect();
            let rules = selective(exclusions.clone());
            // Every edge of every prefix, and the addresses just outside.
            let mut edges: Vec<IpAddr> = Vec::new();
            for &(a, len) in exclusions.iter().flat_map(|x| &x.remote) {
                let (bits, v) = address_bits(a);
                let host = host_mask(bits, u32::from(len));
                for edge in [
                    (v & !host).wrapping_sub(1),
                    v & !host,
                    v | host,
                    (v | host) + 1,
                ] {
                    edges.push(address_of(bits == 32, edge));
                }
            }
            for _ in 0..400 {
                let remote = if !edges.is_empty() && rng.below(2) == 0 {
                    edges[rng.below(edges.len() as u64) as usize]
                } else {
                    rng.address()
                };
                let pk = Packet {
                    inbound: rng.below(2) == 0,
                    remote,
                    protocol: protocols[rng.below(4) as usize],
                    port: 20 + rng.below(22) as u16,
                    cgroup: cgroups[rng.below(3) as usize],
                };
                let want = excluded_by_definition(&exclusions, &pk);
                assert_eq!(
                    excluded_by_rules(&rules, &pk),
                    want,
                    "{pk:?}\n{exclusions:#?}\n{rules}"
                );
                checked += usize::from(want);
            }
        }
        // The generator must hit both outcomes plenty.
        assert!(checked > 1000, "only {checked} packets let through");
    }
}
