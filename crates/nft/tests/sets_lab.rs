//! Set-based exclusions in the network lab: packets, not listings.
//!
//! Safety: everything runs in the namespaces of a `lab::Lab` (see
//! `crates/lab`): the firewall's netlink socket is opened on a thread that
//! joined host `m1`'s namespace, so Cordon's table only ever exists there;
//! addresses come from the lab's 198.18.0.0/15 and fd00::/8 prefixes. Needs
//! root; skips with a visible message otherwise.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use nft::Firewall;
use policy::{Exclusion, Isolation, Policy, Ruleset, Scope};

const TCP: u16 = 7;
const UDP: u16 = 9;
const HTTP: u16 = 80;
const PROBE: Duration = Duration::from_millis(800);

fn prefix(addr: impl Into<IpAddr>, len: u8) -> (IpAddr, u8) {
    (addr.into(), len)
}

/// An IPv4 address of the lab's /24 with this last byte.
fn v4_at(like: Ipv4Addr, last: u8) -> Ipv4Addr {
    let [a, b, c, _] = like.octets();
    Ipv4Addr::new(a, b, c, last)
}

/// An IPv6 address of the lab's /64 with this last group.
fn v6_at(like: Ipv6Addr, last: u16) -> Ipv6Addr {
    let mut s = like.segments();
    s[7] = last;
    Ipv6Addr::from(s)
}

fn exclusion(inbound: bool, remote: Vec<(IpAddr, u8)>, ports: Vec<(u16, u16)>) -> Exclusion {
    Exclusion {
        name: format!("{}{}", if inbound { "in" } else { "out" }, remote.len()),
        cgroup: None,
        inbound,
        outbound: !inbound,
        remote,
        ports,
    }
}

/// Many address rules of mixed shapes. Outbound to `far` on the TCP echo
/// port: 96-99 (/30) and 100-101 (/31, and .101/32 again) touch and
/// overlap, so they merge into .96-.101; IPv6 likewise ::60-::64. Inbound
/// from `ext` on the same port: `inbound` prefixes. Besides, 800 single
/// addresses of the same outbound shape (they share its sets) and 200 of
/// another shape, outside the lab's addresses.
fn ruleset(server: IpAddr, far: &lab::Host, inbound: Vec<(IpAddr, u8)>) -> Ruleset {
    let mut exclusions = vec![
        exclusion(
            false,
            vec![
                prefix(v4_at(far.v4, 100), 31),
                prefix(v4_at(far.v4, 101), 32),
                prefix(v4_at(far.v4, 96), 30),
                prefix(v6_at(far.v6, 0x60), 126),
                prefix(v6_at(far.v6, 0x64), 128),
                prefix(v6_at(far.v6, 0x62), 127),
            ],
            vec![(TCP, TCP)],
        ),
        exclusion(true, inbound, vec![(TCP, TCP)]),
    ];
    for i in 0..500u32 {
        let a = Ipv4Addr::from(0xc613_0000 + 2 * i);
        exclusions.push(exclusion(false, vec![prefix(a, 32)], vec![(TCP, TCP)]));
    }
    for i in 0..300u128 {
        let a = Ipv6Addr::from((0xfd00_ffff_u128 << 96) | (i * 2));
        exclusions.push(exclusion(false, vec![prefix(a, 128)], vec![(TCP, TCP)]));
    }
    for i in 0..200u32 {
        let a = Ipv4Addr::from(0xc613_8000 + 4 * i);
        exclusions.push(exclusion(true, vec![prefix(a, 31)], vec![]));
    }
    policy::render(&Policy::Isolated(Isolation {
        scope: Scope::Selective,
        server_addresses: vec![server],
        server_port: 8443,
        agent_gid: 61742,
        exclusions,
    }))
    .expect("isolated")
}

#[derive(Debug, Clone, Copy)]
enum Probe {
    /// TCP echo from m1 to far.
    OutTcp(IpAddr),
    /// HTTP from m1 to far (port 80: no rule names it).
    OutHttp(IpAddr),
    /// TCP echo from ext to m1.
    InTcp(IpAddr),
}

fn run(lab: &lab::Lab, hosts: (&lab::Host, &lab::Host), probe: Probe) -> bool {
    let (m1, ext) = hosts;
    match probe {
        Probe::OutTcp(to) => lab::tcp_echo(lab, m1, SocketAddr::new(to, TCP), PROBE),
        Probe::OutHttp(to) => {
            lab::http_get(lab, m1, SocketAddr::new(to, HTTP), PROBE).map(|body| body.is_some())
        }
        Probe::InTcp(to) => lab::tcp_echo(lab, ext, SocketAddr::new(to, TCP), PROBE),
    }
    .expect("lab probe")
}

#[test]
fn set_based_exclusions_let_through_exactly_their_addresses() {
    if lab::skip() {
        return;
    }
    let mut lab = lab::Lab::new().expect("lab");
    let srv = lab.add_host("srv").expect("host");
    let m1 = lab.add_host("m1").expect("host");
    let ext = lab.add_host("ext").expect("host");
    let far = lab.add_host("far").expect("host");
    // far answers on .95-.102 and ::5f-::65 besides its own addresses.
    for last in 95..=102u8 {
        let a = format!("{}/24", v4_at(far.v4, last));
        lab.exec_ok(&far, "ip", &["addr", "add", &a, "dev", "eth0"])
            .expect("address");
    }
    for last in 0x5f..=0x65u16 {
        let a = format!("{}/64", v6_at(far.v6, last));
        lab.exec_ok(&far, "ip", &["addr", "add", &a, "dev", "eth0", "nodad"])
            .expect("address");
    }
    let _far = lab
        .start_responders(&far, TCP, UDP, HTTP)
        .expect("responders");
    let _m1 = lab
        .start_responders(&m1, TCP, UDP, HTTP)
        .expect("responders");

    use Probe::*;
    let v4 = |last| IpAddr::V4(v4_at(far.v4, last));
    let v6 = |last| IpAddr::V6(v6_at(far.v6, last));
    // (probe, let through with the first rules, with the second)
    let probes = [
        (OutTcp(v4(96)), true, true),
        (OutTcp(v4(99)), true, true),
        (OutTcp(v4(101)), true, true),
        (OutTcp(v4(95)), false, false),
        (OutTcp(v4(102)), false, false),
        (OutTcp(far.v4.into()), false, false),
        (OutHttp(v4(101)), false, false),
        (OutHttp(v6(0x60)), false, false),
        (OutTcp(v6(0x60)), true, true),
        (OutTcp(v6(0x64)), true, true),
        (OutTcp(v6(0x5f)), false, false),
        (OutTcp(v6(0x65)), false, false),
        (InTcp(m1.v4.into()), true, false),
        (InTcp(m1.v6.into()), true, false),
    ];
    let hosts = (&m1, &ext);
    // Without Cordon's table every probe gets through, so a refusal below
    // is the firewall's doing.
    for (probe, _, _) in probes {
        assert!(run(&lab, hosts, probe), "{probe:?} fails without isolation");
    }

    // ext's addresses (.3 and ::3 of the lab) inside a prefix, then just
    // outside prefixes on both sides of them.
    let first = ruleset(
        srv.v4.into(),
        &far,
        vec![
            prefix(v4_at(ext.v4, 0), 30),
            prefix(v4_at(ext.v4, 200), 32),
            prefix(v6_at(ext.v6, 0), 126),
            prefix(v6_at(ext.v6, 200), 128),
        ],
    );
    // .0/31 and .2 touch and merge into .0-.2; .4 is next above: .3 is the
    // one address left out.
    let around = |last: u8| {
        let l6 = u16::from(last);
        vec![
            prefix(v4_at(ext.v4, last - 3), 31),
            prefix(v4_at(ext.v4, last - 1), 32),
            prefix(v4_at(ext.v4, last + 1), 32),
            prefix(v6_at(ext.v6, l6 - 3), 127),
            prefix(v6_at(ext.v6, l6 - 1), 128),
            prefix(v6_at(ext.v6, l6 + 1), 128),
        ]
    };
    assert_eq!(
        ext.v4.octets()[3],
        3,
        "lab numbering changed; update this test"
    );
    let second = ruleset(srv.v4.into(), &far, around(3));
    for rs in [&first, &second] {
        // The addresses with their port are pairs in `address . port` sets,
        // in both directions and families.
        let pairs = rs
            .sets
            .iter()
            .filter(|s| matches!(s.elements, policy::Elements::AddressPorts(_)))
            .count();
        assert_eq!(pairs, 4, "{rs}");
        let rules: usize = rs.chains.iter().map(|c| c.rules.len()).sum();
        // Full's 22, the 2 reply rules, and per set (or lone prefix) one
        // rule, two (TCP and UDP) for addresses with ports, against one
        // rule per address and port before.
        assert!(rules <= 41, "{rules} rules for 1,000 address rules");
        assert!(rs.sets.len() <= 11, "{:?}", rs.sets.len());
    }

    let mut fw = lab
        .in_host(&m1, || Firewall::open().expect("netlink socket in m1"))
        .expect("m1");
    for (n, rs) in [(1, &first), (2, &second)] {
        fw.apply_verified(Some(rs)).expect("apply");
        for (probe, in_first, in_second) in probes {
            let want = if n == 1 { in_first } else { in_second };
            assert_eq!(
                run(&lab, hosts, probe),
                want,
                "rules {n}: {probe:?} should be {}",
                if want { "let through" } else { "refused" }
            );
        }
    }
    fw.apply_verified(None).expect("remove");
}
