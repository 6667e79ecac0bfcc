//! Self-tests of the network lab. They need root and network namespaces
//! (CI runs them as root) and skip with a visible message elsewhere.
//!
//! They run one at a time (see [`serial`]) so that the checks on what exists
//! in the kernel after a lab is dropped see only their own lab.

use std::net::{IpAddr, SocketAddr};
use std::process::Command;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use lab::{Lab, http_get, icmp_echo, open_tcp, tcp_echo, udp_echo};

const SHORT: Duration = Duration::from_secs(1);
const TCP_PORT: u16 = 7;
const UDP_PORT: u16 = 7;
const HTTP_PORT: u16 = 80;

static SERIAL: Mutex<()> = Mutex::new(());

/// One lab test at a time; a failed test does not block the others.
fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The root namespace's addresses, routes and interfaces, without the
/// lifetimes that count down by themselves.
fn root_snapshot() -> String {
    let mut text = String::new();
    for args in [
        &["addr"][..],
        &["route"][..],
        &["-6", "route"][..],
        &["-4", "rule"][..],
        &["-6", "rule"][..],
        &["-o", "link"][..],
    ] {
        text.push_str(&format!("## ip {}\n", args.join(" ")));
        for line in run("ip", args).lines() {
            let kept: Vec<&str> = line
                .split_whitespace()
                .filter(|w| {
                    !(w.ends_with("sec") && w[..w.len() - 3].bytes().all(|b| b.is_ascii_digit()))
                })
                .collect();
            text.push_str(&kept.join(" "));
            text.push('\n');
        }
    }
    text
}

fn lab_namespaces(prefix: &str) -> Vec<String> {
    run("ip", &["netns", "list"])
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(prefix))
        .map(str::to_string)
        .collect()
}

fn pid_prefix() -> String {
    format!("cdn-{}-", std::process::id())
}

#[test]
fn hosts_ping_each_other_over_ipv4_and_ipv6() {
    if lab::skip() {
        return;
    }
    let _serial = serial();
    let mut lab = Lab::new().unwrap();
    let srv = lab.add_host("srv").unwrap();
    let m1 = lab.add_host("m1").unwrap();
    assert!(srv.v4.octets().starts_with(&[198, 18]), "{srv:?}");
    assert_eq!(srv.v6.segments()[0], 0xfd00, "{srv:?}");
    for (from, to) in [(&m1, &srv), (&srv, &m1)] {
        for addr in to.addrs() {
            assert!(
                icmp_echo(&lab, from, addr, SHORT).unwrap(),
                "{} cannot ping {addr}",
                from.short
            );
        }
    }
    // Loopback works inside a host.
    assert!(icmp_echo(&lab, &m1, "127.0.0.1".parse().unwrap(), SHORT).unwrap());
    assert!(icmp_echo(&lab, &m1, "::1".parse().unwrap(), SHORT).unwrap());
    // An unused lab address does not answer.
    let unused = IpAddr::from(std::net::Ipv4Addr::new(198, 18, m1.v4.octets()[2], 200));
    assert!(!icmp_echo(&lab, &m1, unused, Duration::from_millis(300)).unwrap());
    // On-link routes only: nothing leads out of the lab.
    for host in [&srv, &m1] {
        let v4 = lab.exec_ok(host, "ip", &["-4", "route"]).unwrap();
        let v6 = lab.exec_ok(host, "ip", &["-6", "route"]).unwrap();
        assert!(
            !v4.contains("default") && !v6.contains("default"),
            "{v4}\n{v6}"
        );
        assert!(!v4.contains("via") && !v6.contains("via"), "{v4}\n{v6}");
    }
}

#[test]
fn responders_on_ext_are_reachable_from_m1() {
    if lab::skip() {
        return;
    }
    let _serial = serial();
    let mut lab = Lab::new().unwrap();
    let m1 = lab.add_host("m1").unwrap();
    let ext = lab.add_host("ext").unwrap();
    let responders = lab
        .start_responders(&ext, TCP_PORT, UDP_PORT, HTTP_PORT)
        .unwrap();
    for ip in ext.addrs() {
        assert!(
            tcp_echo(&lab, &m1, SocketAddr::new(ip, TCP_PORT), SHORT).unwrap(),
            "tcp {ip}"
        );
        assert!(
            udp_echo(&lab, &m1, SocketAddr::new(ip, UDP_PORT), SHORT).unwrap(),
            "udp {ip}"
        );
        assert_eq!(
            http_get(&lab, &m1, SocketAddr::new(ip, HTTP_PORT), SHORT)
                .unwrap()
                .as_deref(),
            Some("ext"),
            "http {ip}"
        );
        // A closed port fails fast.
        let started = Instant::now();
        assert!(!tcp_echo(&lab, &m1, SocketAddr::new(ip, 9), SHORT).unwrap());
        assert!(!udp_echo(&lab, &m1, SocketAddr::new(ip, 9), SHORT).unwrap());
        assert!(
            http_get(&lab, &m1, SocketAddr::new(ip, 9), SHORT)
                .unwrap()
                .is_none()
        );
        assert!(
            started.elapsed() < SHORT,
            "refusals took {:?}",
            started.elapsed()
        );
    }
    // Stopped responders no longer answer.
    drop(responders);
    assert!(!tcp_echo(&lab, &m1, SocketAddr::new(ext.v4.into(), TCP_PORT), SHORT).unwrap());
    assert!(
        http_get(&lab, &m1, SocketAddr::new(ext.v6.into(), HTTP_PORT), SHORT)
            .unwrap()
            .is_none()
    );
}

#[test]
fn open_connection_is_cut_by_a_drop_rule_in_m1() {
    if lab::skip() {
        return;
    }
    let _serial = serial();
    let mut lab = Lab::new().unwrap();
    let m1 = lab.add_host("m1").unwrap();
    let ext = lab.add_host("ext").unwrap();
    let _responders = lab
        .start_responders(&ext, TCP_PORT, UDP_PORT, HTTP_PORT)
        .unwrap();
    lab.track_connections(&m1).unwrap();
    let to = SocketAddr::new(ext.v4.into(), TCP_PORT);
    let mut conn = open_tcp(&lab, &m1, to).unwrap();
    let mut conn6 = open_tcp(&lab, &m1, SocketAddr::new(ext.v6.into(), TCP_PORT)).unwrap();
    assert!(conn.alive(SHORT));
    assert!(conn6.alive(SHORT));
    assert!(conn.alive(SHORT), "still alive on a second exchange");

    // The host firewall's `ct state established` rule matched: the
    // connection was being tracked before the cut.
    let hostfw = lab
        .exec_ok(&m1, "nft", &["list", "table", "inet", "hostfw"])
        .unwrap();
    let packets: u64 = hostfw
        .split_whitespace()
        .skip_while(|w| *w != "packets")
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no counter in:\n{hostfw}"));
    assert!(packets > 0, "{hostfw}");

    lab.nft(
        &m1,
        &format!(
            "table inet cut {{\n\
             \tchain output {{\n\
             \t\ttype filter hook output priority filter; policy accept;\n\
             \t\ttcp dport {TCP_PORT} drop\n\
             \t}}\n\
             }}\n"
        ),
    )
    .unwrap();
    assert!(
        !conn.alive(SHORT),
        "connection opened before the cut survived"
    );
    assert!(
        !conn6.alive(SHORT),
        "IPv6 connection opened before the cut survived"
    );
    assert!(!tcp_echo(&lab, &m1, to, SHORT).unwrap());
    // Other traffic is untouched, and the cut is in m1 only.
    assert!(udp_echo(&lab, &m1, SocketAddr::new(ext.v4.into(), UDP_PORT), SHORT).unwrap());
    assert_eq!(
        http_get(&lab, &m1, SocketAddr::new(ext.v4.into(), HTTP_PORT), SHORT)
            .unwrap()
            .as_deref(),
        Some("ext")
    );
    let ruleset = lab.exec_ok(&ext, "nft", &["list", "ruleset"]).unwrap();
    assert!(
        !ruleset.contains("cut") && !ruleset.contains("hostfw"),
        "{ruleset}"
    );
}

#[test]
fn four_host_lab_is_removed_on_drop_and_root_is_unchanged() {
    if lab::skip() {
        return;
    }
    let _serial = serial();
    let root_before = root_snapshot();

    let started = Instant::now();
    let mut lab = Lab::new().unwrap();
    let hosts: Vec<_> = ["srv", "m1", "m2", "ext"]
        .iter()
        .map(|s| lab.add_host(s).unwrap())
        .collect();
    let setup = started.elapsed();

    let prefix = format!("{}-", lab.prefix());
    let mut names = lab_namespaces(&prefix);
    names.sort();
    let mut want: Vec<String> = hosts.iter().map(|h| h.name.clone()).collect();
    want.push(lab.bridge_netns().to_string());
    want.sort();
    assert_eq!(names, want);
    // Every host reaches every other one.
    for from in &hosts {
        for to in &hosts {
            assert!(icmp_echo(&lab, from, to.v6.into(), SHORT).unwrap());
        }
    }
    // A spawned process runs inside its host, and dies with the lab.
    let pid = lab
        .spawn(&hosts[1], {
            let mut c = Command::new("sleep");
            c.arg("60");
            c
        })
        .unwrap();
    let ns_of = |p: &str| std::fs::metadata(p).map(|m| std::os::unix::fs::MetadataExt::ino(&m));
    assert_eq!(
        ns_of(&format!("/proc/{pid}/ns/net")).unwrap(),
        ns_of(hosts[1].netns_path.to_str().unwrap()).unwrap()
    );
    let _responders = lab
        .start_responders(&hosts[3], TCP_PORT, UDP_PORT, HTTP_PORT)
        .unwrap();

    let started = Instant::now();
    drop(lab);
    let teardown = started.elapsed();
    eprintln!("4-host lab: setup {setup:?}, teardown {teardown:?}");

    assert_eq!(lab_namespaces(&pid_prefix()), Vec::<String>::new());
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "spawned process survived"
    );
    assert_eq!(root_snapshot(), root_before, "the root namespace changed");
}

#[test]
fn a_panicking_test_still_removes_its_lab() {
    if lab::skip() {
        return;
    }
    let _serial = serial();
    let prefix = Mutex::new(String::new());
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let mut lab = Lab::new().unwrap();
        *prefix.lock().unwrap() = format!("{}-", lab.prefix());
        lab.add_host("m1").unwrap();
        panic!("test failure inside a lab");
    }));
    assert!(result.is_err());
    let prefix = prefix.into_inner().unwrap();
    assert!(!prefix.is_empty());
    assert_eq!(lab_namespaces(&prefix), Vec::<String>::new());
}

#[test]
fn stale_namespaces_of_dead_processes_are_removed() {
    if lab::skip() {
        return;
    }
    let _serial = serial();
    // A pid above pid_max is never a running process.
    let pid_max: u64 = std::fs::read_to_string("/proc/sys/kernel/pid_max")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let dead = format!("cdn-{}-{}-br", pid_max + 4321, std::process::id());
    let ours = format!("{}999-x", pid_prefix());
    run("ip", &["netns", "add", &dead]);
    run("ip", &["netns", "add", &ours]);
    let lab = Lab::new().unwrap();
    let left = lab_namespaces("cdn-");
    run("ip", &["netns", "delete", &ours]);
    assert!(!left.contains(&dead), "stale namespace kept: {left:?}");
    assert!(
        left.contains(&ours),
        "live process's namespace removed: {left:?}"
    );
    drop(lab);
}

#[test]
fn exec_in_host_and_hosts_file() {
    if lab::skip() {
        return;
    }
    let _serial = serial();
    let mut lab = Lab::new().unwrap();
    let m1 = lab.add_host("m1").unwrap();
    let srv = lab.add_host("srv").unwrap();
    let addrs = lab.exec_ok(&m1, "ip", &["-br", "addr"]).unwrap();
    assert!(addrs.contains(&m1.v4.to_string()), "{addrs}");
    assert!(addrs.contains(&m1.v6.to_string()), "{addrs}");
    assert!(!addrs.contains(&srv.v4.to_string()), "{addrs}");
    // in_host sees the host's interfaces only.
    let devs = lab
        .in_host(&m1, || {
            std::fs::read_to_string("/proc/thread-self/net/dev").unwrap()
        })
        .unwrap();
    let devs: Vec<&str> = devs
        .lines()
        .skip(2)
        .filter_map(|l| l.split(':').next())
        .map(str::trim)
        .collect();
    assert_eq!(devs.len(), 2, "{devs:?}");
    assert!(devs.contains(&"lo") && devs.contains(&"eth0"), "{devs:?}");

    let path = lab.add_name("cordon.lab", &srv.addrs()).unwrap();
    assert_eq!(lab.add_name("ext.lab", &[m1.v4.into()]).unwrap(), path);
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.contains(&format!("{} cordon.lab\n", srv.v4)), "{text}");
    assert!(text.contains(&format!("{} cordon.lab\n", srv.v6)), "{text}");
    assert!(text.contains(&format!("{} ext.lab\n", m1.v4)), "{text}");
    drop(lab);
    assert!(!path.exists());
}
