//! The isolation policy as plain data, and its rendering into rules.
//!
//! [`Policy`] says what is intended; [`render`] turns it into a [`Ruleset`]:
//! every set, chain and rule of Cordon's one table, in order, each rule a
//! list of [`Match`]es and an [`Action`]. No I/O happens here: the `nft`
//! crate turns a `Ruleset` into one netlink batch, and the `Display` form
//! (nft syntax) is what tests snapshot and what `cordon-agent status` shows.
//! `SECURITY.md` lists the same rules in prose; keep the two in step.

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
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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
    SourceInSet(Family, &'static str),
    DestInSet(Family, &'static str),
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
    pub name: &'static str,
    pub family: Family,
    pub elements: Vec<IpAddr>,
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
                SourceInSet(family, set),
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
    let (excluded_in, excluded_out) = exclusion_rules(selective);
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
                DestInSet(family, set),
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

    Some(Ruleset {
        sets: vec![
            Set {
                name: MGMT_V4,
                family: self::Family::V4,
                elements: v4,
            },
            Set {
                name: MGMT_V6,
                family: self::Family::V6,
                elements: v6,
            },
        ],
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

/// The input and output rules of Selective isolation's exclusions: one rule
/// per combination of remote prefix, port range (TCP and UDP) and direction.
fn exclusion_rules(exclusions: &[Exclusion]) -> (Vec<Rule>, Vec<Rule>) {
    let (mut input, mut output) = (Vec::new(), Vec::new());
    for exclusion in exclusions {
        let prefixes: Vec<Option<(IpAddr, u8)>> = if exclusion.remote.is_empty() {
            vec![None]
        } else {
            exclusion.remote.iter().copied().map(Some).collect()
        };
        let ports: Vec<Option<(Protocol, u16, u16)>> = if exclusion.ports.is_empty() {
            vec![None]
        } else {
            exclusion
                .ports
                .iter()
                .flat_map(|&(first, last)| {
                    [Protocol::Tcp, Protocol::Udp].map(|p| Some((p, first, last)))
                })
                .collect()
        };
        for prefix in &prefixes {
            for port in &ports {
                for inbound in [true, false] {
                    if (inbound && !exclusion.inbound) || (!inbound && !exclusion.outbound) {
                        continue;
                    }
                    let mut matches = Vec::new();
                    if let Some((addr, _)) = prefix {
                        matches.push(Match::Family(if addr.is_ipv4() {
                            Family::V4
                        } else {
                            Family::V6
                        }));
                    }
                    if let Some((protocol, _, _)) = port {
                        matches.push(Match::Protocol(*protocol));
                    }
                    if let Some((addr, len)) = prefix {
                        matches.push(if inbound {
                            Match::SourcePrefix(*addr, *len)
                        } else {
                            Match::DestPrefix(*addr, *len)
                        });
                    }
                    if let Some((_, first, last)) = port {
                        matches.push(Match::DestPortRange(*first, *last));
                    }
                    if let Some(cgroup) = exclusion.cgroup {
                        matches.push(Match::SocketCgroup(cgroup));
                    }
                    let rule = Rule {
                        matches,
                        action: Action::MarkAndAccept(EXCLUDED_MARK),
                        comment: "exclusion",
                    };
                    if inbound {
                        input.push(rule);
                    } else {
                        output.push(rule);
                    }
                }
            }
        }
    }
    (input, output)
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
                write!(f, "ct state {{ {} }}", words.join(", "))
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
            let elements: Vec<String> = set.elements.iter().map(ToString::to_string).collect();
            writeln!(
                f,
                "  set {} {{ type {kind}; elements = {{ {} }} }}",
                set.name,
                elements.join(", ")
            )?;
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
                "ct mark 0x434f5245 ct state { established, related } accept",
                "meta nfproto ipv4 meta l4proto tcp ip saddr 198.18.0.4/32 th dport 8080 ct mark set 0x434f5245 accept",
                "meta nfproto ipv4 meta l4proto udp ip saddr 198.18.0.4/32 th dport 8080 ct mark set 0x434f5245 accept",
                "meta nfproto ipv4 meta l4proto tcp ip saddr 198.18.0.4/32 th dport 9000-9100 ct mark set 0x434f5245 accept",
                "meta nfproto ipv4 meta l4proto udp ip saddr 198.18.0.4/32 th dport 9000-9100 ct mark set 0x434f5245 accept",
                "meta nfproto ipv6 meta l4proto tcp ip6 saddr fd00::/64 th dport 8080 ct mark set 0x434f5245 accept",
                "meta nfproto ipv6 meta l4proto udp ip6 saddr fd00::/64 th dport 8080 ct mark set 0x434f5245 accept",
                "meta nfproto ipv6 meta l4proto tcp ip6 saddr fd00::/64 th dport 9000-9100 ct mark set 0x434f5245 accept",
                "meta nfproto ipv6 meta l4proto udp ip6 saddr fd00::/64 th dport 9000-9100 ct mark set 0x434f5245 accept",
            ]
        );
        let out = lines(&rules, 1);
        assert_eq!(
            out[0],
            "ct mark 0x434f5245 ct state { established, related } accept"
        );
        assert_eq!(
            out[1],
            "socket cgroupv2 level 2 4242 ct mark set 0x434f5245 accept"
        );
        assert_eq!(out.len(), 10);
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
    meta nfproto ipv4 meta l4proto tcp ip saddr @mgmt_v4 th sport 8443 ct state { established } accept comment "replies from the management server"
    meta nfproto ipv6 meta l4proto tcp ip6 saddr @mgmt_v6 th sport 8443 ct state { established } accept comment "replies from the management server"
    ct mark 0x434f5244 ct state { established, related } accept comment "replies to the agent's own connections (DNS)"
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
    ct mark 0x434f5244 ct state { established, related } accept comment "the rest of the agent's own connections"
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
}
