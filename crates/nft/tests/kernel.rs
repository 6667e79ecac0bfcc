//! Tests against the real kernel, each in a fresh network namespace.
//!
//! Why this shape: applying Cordon's table in the root network namespace
//! would cut this machine off (ARCHITECTURE.md, "The network lab"). Each test
//! runs its body on a dedicated thread that first calls
//! `unshare(CLONE_NEWNET)`; namespaces are per thread, so that thread, the
//! netlink sockets it opens and the processes it starts all live in the new
//! namespace, which disappears with them. The helper refuses to go on if
//! the thread's namespace is still the original one. The `nft` binary is
//! only used to cross-check, through `nsenter --net=<that namespace>`.
//! Tests need root (`CAP_NET_ADMIN`); otherwise they print a "skipped" line
//! and pass. Run with `-- --nocapture` to see nft's listing of the applied
//! table next to the policy's `Display` form.

use std::io::{self, Write};
use std::net::IpAddr;
use std::os::unix::fs::MetadataExt;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use nft::{Firewall, Monitor, NftError, TableSummary};
use policy::{Action, Elements, Family, Isolation, Match, Policy, Rule, Ruleset, Scope};

fn netns_inode(path: &str) -> u64 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("stat {path}: {e}"))
        .ino()
}

/// The fresh network namespace a test body runs in.
struct Netns {
    pid: u32,
    tid: libc::pid_t,
    inode: u64,
}

impl Netns {
    fn path(&self) -> String {
        format!("/proc/{}/task/{}/ns/net", self.pid, self.tid)
    }

    /// Runs `nft` inside this namespace (never anywhere else).
    fn nft(&self, args: &[&str]) -> Output {
        let path = self.path();
        assert_eq!(
            netns_inode(&path),
            self.inode,
            "{path} is not the test namespace"
        );
        Command::new("nsenter")
            .arg(format!("--net={path}"))
            .arg("nft")
            .args(args)
            .output()
            .expect("run nsenter nft")
    }

    /// Like `nft`, and asserts that it succeeded; returns its stdout.
    fn nft_ok(&self, args: &[&str]) -> String {
        let out = self.nft(args);
        assert!(
            out.status.success(),
            "nft {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

/// Runs `body` on a new thread inside a fresh network namespace, or prints
/// a skip line and returns None when not root.
fn in_fresh_netns<T: Send + 'static>(
    test: &str,
    body: impl FnOnce(&Netns) -> T + Send + 'static,
) -> Option<T> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        // Straight to stderr, past the test harness's capture: a skip must
        // be visible in a normal `cargo test` run.
        let _ = writeln!(
            io::stderr(),
            "{test}: skipped: needs root (CAP_NET_ADMIN in a fresh network namespace)"
        );
        return None;
    }
    let original = netns_inode("/proc/thread-self/ns/net");
    let handle = std::thread::spawn(move || {
        // SAFETY: unshare only affects the calling thread here.
        let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
        assert_eq!(
            rc,
            0,
            "unshare(CLONE_NEWNET): {}",
            io::Error::last_os_error()
        );
        let inode = netns_inode("/proc/thread-self/ns/net");
        assert_ne!(inode, original, "still in the original network namespace");
        // Also unlike init's, where that is visible (not in every sandbox).
        if let Ok(init) = std::fs::metadata("/proc/1/ns/net") {
            assert_ne!(inode, init.ino(), "in init's network namespace");
        }
        let netns = Netns {
            pid: std::process::id(),
            // SAFETY: gettid has no preconditions.
            tid: unsafe { libc::gettid() },
            inode,
        };
        body(&netns)
    });
    match handle.join() {
        Ok(v) => Some(v),
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

fn ruleset(addresses: &[&str]) -> Ruleset {
    policy::render(&Policy::Isolated(Isolation {
        scope: Scope::Full,
        server_addresses: addresses
            .iter()
            .map(|a| a.parse::<IpAddr>().unwrap())
            .collect(),
        server_port: 8443,
        agent_gid: 61742,
        exclusions: Vec::new(),
    }))
    .expect("an isolated policy has a table")
}

fn full() -> Ruleset {
    ruleset(&["198.18.0.1", "fd00::1"])
}

fn summary(chains: &[(&str, usize)], sets: &[(&str, usize)]) -> TableSummary {
    TableSummary {
        chains: chains.iter().map(|(n, c)| (n.to_string(), *c)).collect(),
        sets: sets.iter().map(|(n, c)| (n.to_string(), *c)).collect(),
    }
}

#[test]
fn full_ruleset_applies_reads_back_and_nft_agrees() {
    in_fresh_netns("full_ruleset_applies_reads_back_and_nft_agrees", |ns| {
        let rs = full();
        let mut fw = Firewall::open().unwrap();
        fw.apply(Some(&rs)).unwrap();

        let found = fw.read_back().unwrap().expect("table present");
        let chains: Vec<(&str, usize)> = rs.rule_counts();
        assert_eq!(found, summary(&chains, &[("mgmt_v4", 1), ("mgmt_v6", 1)]));
        assert_eq!(
            chains,
            vec![("input", 9), ("output", 13), ("forward", 0)],
            "policy changed; update this test"
        );
        assert!(fw.verify(Some(&rs)).unwrap());
        assert!(!fw.verify(None).unwrap());

        let listing = ns.nft_ok(&["list", "table", "inet", "cordon"]);
        eprintln!(
            "--- nft list table inet cordon (test namespace) ---\n{listing}\
             --- the policy's Display form ---\n{rs}\n---"
        );
        for expected in [
            "table inet cordon",
            "type ipv4_addr",
            "elements = { 198.18.0.1 }",
            "type ipv6_addr",
            "elements = { fd00::1 }",
            "type filter hook input priority filter - 10; policy drop;",
            "type filter hook output priority filter - 10; policy drop;",
            "type filter hook forward priority filter - 10; policy drop;",
            "meta iiftype loopback accept comment \"loopback\"",
            "meta oiftype loopback accept",
            "ip saddr @mgmt_v4",
            "ip6 daddr @mgmt_v6",
            "sport 8443",
            "dport 8443",
            "ct state established",
            "ct mark 0x434f5244",
            "skgid 61742",
            "ct mark set 0x434f5244 accept",
            "ip6 saddr fe80::/10",
            "icmpv6 type nd-neighbor-solicit ip6 hoplimit 255 accept",
            "meta l4proto tcp reject with tcp reset",
            "reject with icmpx admin-prohibited",
            "comment \"the agent's management channel\"",
        ] {
            assert!(
                listing.contains(expected),
                "nft's listing lacks {expected:?}"
            );
        }
        assert_eq!(listing.matches("policy drop").count(), 3);
    });
}

#[test]
fn selective_exclusions_apply_with_cgroup_prefix_and_port_range_matches() {
    in_fresh_netns(
        "selective_exclusions_apply_with_cgroup_prefix_and_port_range_matches",
        |ns| {
            use std::os::unix::fs::MetadataExt;
            let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
            let root = mounts
                .lines()
                .find_map(|l| {
                    let (left, right) = l.split_once(" - ")?;
                    right
                        .starts_with("cgroup2 ")
                        .then(|| left.split_whitespace().nth(4).unwrap().to_owned())
                })
                .expect("cgroup2 mounted");
            let id = std::fs::metadata(&root).unwrap().ino();
            let rs = policy::render(&Policy::Isolated(Isolation {
                scope: Scope::Selective,
                server_addresses: vec!["198.18.0.1".parse().unwrap()],
                server_port: 8443,
                agent_gid: 61742,
                exclusions: vec![
                    policy::Exclusion {
                        name: "app".into(),
                        cgroup: Some(policy::CgroupMatch { level: 0, id }),
                        inbound: false,
                        outbound: true,
                        remote: vec![],
                        ports: vec![],
                    },
                    policy::Exclusion {
                        name: "web".into(),
                        cgroup: None,
                        inbound: true,
                        outbound: true,
                        remote: vec![
                            ("198.18.0.0".parse().unwrap(), 24),
                            ("fd00::".parse().unwrap(), 64),
                        ],
                        ports: vec![(9000, 9100)],
                    },
                ],
            }))
            .unwrap();
            let mut fw = Firewall::open().unwrap();
            fw.apply(Some(&rs)).unwrap();
            assert!(fw.verify(Some(&rs)).unwrap());
            let listing = ns.nft_ok(&["list", "table", "inet", "cordon"]);
            for expected in [
                "socket cgroupv2 level 0",
                "ip daddr 198.18.0.0/24",
                "ip6 saddr fd00::/64",
                "9000",
                "9100",
                "ct mark set 0x434f5245",
            ] {
                assert!(
                    listing.contains(expected),
                    "nft's listing lacks {expected:?}:\n{listing}"
                );
            }
        },
    );
}

#[test]
fn removal_is_idempotent_and_leaves_other_tables_alone() {
    in_fresh_netns(
        "removal_is_idempotent_and_leaves_other_tables_alone",
        |ns| {
            let mut fw = Firewall::open().unwrap();
            // Nothing there yet: removing is still fine.
            fw.apply(None).unwrap();
            assert_eq!(fw.read_back().unwrap(), None);

            ns.nft_ok(&["add", "table", "inet", "host"]);
            ns.nft_ok(&[
                "add",
                "chain",
                "inet",
                "host",
                "in",
                "{ type filter hook input priority 0; }",
            ]);
            fw.apply(Some(&full())).unwrap();
            assert!(fw.read_back().unwrap().is_some());

            fw.apply(None).unwrap();
            assert_eq!(fw.read_back().unwrap(), None);
            assert!(fw.verify(None).unwrap());
            fw.apply(None).unwrap();
            assert_eq!(fw.read_back().unwrap(), None);

            let tables = ns.nft_ok(&["list", "tables"]);
            assert!(tables.contains("table inet host"), "{tables}");
            assert!(!tables.contains("cordon"), "{tables}");
        },
    );
}

#[test]
fn apply_replaces_the_whole_table() {
    in_fresh_netns("apply_replaces_the_whole_table", |ns| {
        let a = full();
        // Only IPv4 addresses: the IPv6 set is empty.
        let b = ruleset(&["198.18.0.2", "198.18.0.3"]);
        let mut fw = Firewall::open().unwrap();
        fw.apply(Some(&a)).unwrap();
        fw.apply(Some(&b)).unwrap();

        let found = fw.read_back().unwrap().unwrap();
        assert_eq!(
            found.sets,
            summary(&[], &[("mgmt_v4", 2), ("mgmt_v6", 0)]).sets
        );
        assert_eq!(found, TableSummary::expected(&b));
        assert!(fw.verify(Some(&b)).unwrap());
        assert!(!fw.verify(Some(&a)).unwrap());

        let listing = ns.nft_ok(&["list", "ruleset"]);
        assert_eq!(listing.matches("table inet cordon").count(), 1);
        assert!(listing.contains("198.18.0.2"));
        assert!(!listing.contains("198.18.0.1"), "{listing}");
        assert!(!listing.contains("fd00::1"), "{listing}");
        assert_eq!(listing.matches("chain input").count(), 1);
    });
}

#[test]
fn refused_batch_changes_nothing() {
    in_fresh_netns("refused_batch_changes_nothing", |_ns| {
        let a = full();
        let mut fw = Firewall::open().unwrap();
        fw.apply(Some(&a)).unwrap();

        // A rule that looks up a set that does not exist: the kernel refuses
        // it after the batch has already deleted the old table.
        let mut bad = ruleset(&["198.18.0.9"]);
        bad.chains[0].rules.push(Rule {
            matches: vec![
                Match::Family(Family::V4),
                Match::SourceInSet(Family::V4, "no_such_set".to_owned()),
            ],
            action: Action::Accept,
            comment: "refers to a missing set",
        });
        let err = fw.apply(Some(&bad)).unwrap_err();
        eprintln!("refused batch: {err}");
        assert!(matches!(err, NftError::Kernel { .. }), "{err:?}");
        assert_eq!(err.errno(), Some(libc::ENOENT), "{err}");
        assert!(err.to_string().contains("refers to a missing set"), "{err}");

        // The previous table is intact.
        assert!(fw.verify(Some(&a)).unwrap());
        assert_eq!(fw.read_back().unwrap(), Some(TableSummary::expected(&a)));

        // And the socket is clean for the next batch.
        let b = ruleset(&["198.18.0.2"]);
        fw.apply_verified(Some(&b)).unwrap();
        assert!(fw.verify(Some(&b)).unwrap());
    });
}

#[test]
fn verify_catches_changes_that_keep_the_counts() {
    in_fresh_netns("verify_catches_changes_that_keep_the_counts", |ns| {
        let a = full();
        let mut fw = Firewall::open().unwrap();

        fw.apply_verified(Some(&a)).unwrap();
        ns.nft_ok(&["chain", "inet", "cordon", "input", "{ policy accept; }"]);
        assert_eq!(fw.read_back().unwrap(), Some(TableSummary::expected(&a)));
        assert!(!fw.verify(Some(&a)).unwrap(), "input chain now accepts");

        fw.apply_verified(Some(&a)).unwrap();
        ns.nft_ok(&["add", "table", "inet", "cordon", "{ flags dormant; }"]);
        assert_eq!(fw.read_back().unwrap(), Some(TableSummary::expected(&a)));
        assert!(!fw.verify(Some(&a)).unwrap(), "dormant table");

        // A new apply restores it.
        fw.apply_verified(Some(&a)).unwrap();
        assert!(fw.verify(Some(&a)).unwrap());
        fw.apply_verified(None).unwrap();
        assert!(fw.verify(None).unwrap());
    });
}

/// Waits (at most 5 s, so a bug fails instead of hanging) until the monitor
/// has something to read, then asks it.
fn changed(monitor: &mut Monitor, own_port: u32) -> bool {
    let mut pfd = libc::pollfd {
        fd: monitor.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    let n = unsafe { libc::poll(&mut pfd, 1, 5000) };
    assert_eq!(n, 1, "no nftables notification within 5 s");
    monitor.wait_for_foreign_change(own_port).unwrap()
}

#[test]
fn monitor_tells_foreign_changes_from_ours() {
    in_fresh_netns("monitor_tells_foreign_changes_from_ours", |ns| {
        let a = full();
        let mut monitor = Monitor::open().unwrap();
        let mut fw = Firewall::open().unwrap();
        let port = fw.port_id();

        fw.apply(Some(&a)).unwrap();
        assert!(!changed(&mut monitor, port), "our own apply");

        let mut other = Firewall::open().unwrap();
        assert_ne!(other.port_id(), port);
        other.apply(None).unwrap();
        assert!(changed(&mut monitor, port), "removal by another socket");

        fw.apply(Some(&a)).unwrap();
        assert!(!changed(&mut monitor, port), "our own restore");

        ns.nft_ok(&["add", "table", "inet", "other"]);
        assert!(!changed(&mut monitor, port), "another table");

        ns.nft_ok(&["delete", "table", "inet", "cordon"]);
        assert!(changed(&mut monitor, port), "nft delete table");

        fw.apply(Some(&a)).unwrap();
        assert!(!changed(&mut monitor, port), "our own restore");
        ns.nft_ok(&["add", "rule", "inet", "cordon", "input", "accept"]);
        assert!(changed(&mut monitor, port), "a rule added by nft");
        assert!(
            !fw.verify(Some(&a)).unwrap(),
            "read-back sees the extra rule"
        );

        fw.apply(Some(&a)).unwrap();
        assert!(!changed(&mut monitor, port), "our own restore");
        // A set holds no more elements than applied (its size), so an
        // element can only be taken away.
        let add = ns.nft(&[
            "add",
            "element",
            "inet",
            "cordon",
            "mgmt_v4",
            "{ 198.18.0.66 }",
        ]);
        assert!(!add.status.success(), "a full set took another element");
        ns.nft_ok(&[
            "delete",
            "element",
            "inet",
            "cordon",
            "mgmt_v4",
            "{ 198.18.0.1 }",
        ]);
        assert!(changed(&mut monitor, port), "an element deleted by nft");
        assert!(!fw.verify(Some(&a)).unwrap(), "read-back sees it missing");
    });
}

#[test]
fn lost_notifications_count_as_maybe_tampered() {
    in_fresh_netns("lost_notifications_count_as_maybe_tampered", |_ns| {
        let mut monitor = Monitor::open().unwrap();
        // Shrink the monitor's buffer (the kernel rounds up to its minimum)
        // so that our own batches overflow it.
        let tiny: libc::c_int = 1;
        // SAFETY: a valid pointer to a c_int and its size.
        let rc = unsafe {
            libc::setsockopt(
                monitor.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVBUF,
                (&raw const tiny).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        assert_eq!(rc, 0);
        let mut fw = Firewall::open().unwrap();
        for _ in 0..5 {
            fw.apply(Some(&full())).unwrap();
        }
        assert!(
            changed(&mut monitor, fw.port_id()),
            "an overflow must count as a possible change"
        );
    });
}

/// Selective isolation with 1,000 single-address outbound exclusion rules.
/// The addresses are two apart, so that none merge: 1,000 ranges.
fn policy_of_thousand() -> Policy {
    let exclusions: Vec<policy::Exclusion> = (0..1000u32)
        .map(|i| policy::Exclusion {
            name: format!("r{i}"),
            cgroup: None,
            inbound: false,
            outbound: true,
            remote: vec![(
                IpAddr::V4(std::net::Ipv4Addr::from(0xc612_0000 + 2 * i)),
                32,
            )],
            ports: vec![],
        })
        .collect();
    Policy::Isolated(Isolation {
        scope: Scope::Selective,
        server_addresses: vec!["198.18.0.1".parse().unwrap(), "fd00::1".parse().unwrap()],
        server_port: 8443,
        agent_gid: 61742,
        exclusions,
    })
}

fn thousand_address_rules() -> Ruleset {
    policy::render(&policy_of_thousand()).unwrap()
}

/// Selective isolation with 1,000 outbound exclusion rules, each naming
/// its own address and its own port.
fn thousand_address_port_rules() -> Ruleset {
    let Policy::Isolated(mut isolation) = policy_of_thousand() else {
        unreachable!()
    };
    for (i, x) in isolation.exclusions.iter_mut().enumerate() {
        x.ports = vec![(1000 + i as u16, 1000 + i as u16)];
    }
    policy::render(&Policy::Isolated(isolation)).unwrap()
}

/// Selective isolation with address rules of mixed shapes: both families,
/// overlapping and adjacent prefixes, ports, both directions, ranges that
/// reach the end of the address space. (No cgroup: nft only takes a cgroup
/// by path, the Display form shows its id.)
fn mixed_address_rules() -> Ruleset {
    let p = |s: &str| {
        let (a, l) = s.split_once('/').unwrap();
        (a.parse::<IpAddr>().unwrap(), l.parse::<u8>().unwrap())
    };
    let rule =
        |name: &str, inbound, outbound, remote: &[&str], ports: &[(u16, u16)]| policy::Exclusion {
            name: name.into(),
            cgroup: None,
            inbound,
            outbound,
            remote: remote.iter().map(|r| p(r)).collect(),
            ports: ports.to_vec(),
        };
    let mut exclusions = vec![
        rule("a", false, true, &["198.18.4.0/24", "198.18.4.128/25"], &[]),
        rule(
            "b",
            false,
            true,
            &["198.18.5.0/24", "198.18.7.7/32", "fd00:4::/64"],
            &[],
        ),
        rule(
            "c",
            true,
            true,
            &["198.19.0.0/16", "fd00:9::1/128"],
            &[(22, 22)],
        ),
        rule(
            "d",
            true,
            false,
            &["198.19.255.255/32", "ff00::/8"],
            &[(22, 22)],
        ),
        rule("e", false, true, &["0.0.0.0/0"], &[(53, 53), (8000, 8100)]),
    ];
    for i in 0..300u32 {
        let v6 = std::net::Ipv6Addr::from((0xfd00_u128 << 112) | (u128::from(i) << 8));
        exclusions.push(rule(&format!("v6 {i}"), true, true, &[], &[(443, 443)]));
        exclusions.last_mut().unwrap().remote = vec![(IpAddr::V6(v6), 120)];
    }
    policy::render(&Policy::Isolated(Isolation {
        scope: Scope::Selective,
        server_addresses: vec!["198.18.0.1".parse().unwrap()],
        server_port: 8443,
        agent_gid: 61742,
        exclusions,
    }))
    .unwrap()
}

/// A script that makes `nft -f` replace Cordon's table with `rs`, in one
/// transaction, as the agent's batch does.
fn nft_script(ns: &Netns, rs: &Ruleset, what: &str) -> std::path::PathBuf {
    let file = std::env::temp_dir().join(format!("cordon-nft-{what}-{}.nft", ns.tid));
    std::fs::write(
        &file,
        format!("table inet cordon\ndelete table inet cordon\n{rs}\n"),
    )
    .unwrap();
    file
}

#[test]
fn nft_reads_the_display_form_as_the_same_table() {
    in_fresh_netns("nft_reads_the_display_form_as_the_same_table", |ns| {
        let mut fw = Firewall::open().unwrap();
        for (what, rs) in [
            ("full", full()),
            ("thousand", thousand_address_rules()),
            ("thousand ports", thousand_address_port_rules()),
            ("mixed", mixed_address_rules()),
        ] {
            if what == "mixed" {
                // Every kind of set is covered.
                for kind in ["Addresses", "Ranges", "AddressPorts"] {
                    assert!(
                        rs.sets
                            .iter()
                            .skip(2)
                            .any(|s| format!("{:?}", s.elements).starts_with(kind)),
                        "no {kind} set in {rs}"
                    );
                }
            }
            let file = nft_script(ns, &rs, what);
            let out = ns.nft(&["-f", file.to_str().unwrap()]);
            let _ = std::fs::remove_file(&file);
            assert!(
                out.status.success(),
                "nft -f rejects the {what} ruleset's Display form: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            // nft's table has the same chains, hooks, rule counts, sets and
            // elements (keys and flags) as the one we apply.
            let found = fw.read_back().unwrap();
            assert_eq!(found, Some(TableSummary::expected(&rs)), "{what}");
            assert!(fw.verify(Some(&rs)).unwrap(), "{what}");
            fw.apply_verified(Some(&rs)).unwrap();
            fw.apply_verified(None).unwrap();
        }
    });
}

#[test]
fn read_back_sees_a_missing_or_swapped_set_element() {
    in_fresh_netns("read_back_sees_a_missing_or_swapped_set_element", |ns| {
        let mut fw = Firewall::open().unwrap();

        // A single address taken out of the plain set.
        let rs = thousand_address_rules();
        let singles = &rs.sets[2];
        assert!(matches!(&singles.elements, Elements::Addresses(a) if a.len() == 1000));
        fw.apply_verified(Some(&rs)).unwrap();
        ns.nft_ok(&[
            "delete",
            "element",
            "inet",
            "cordon",
            &singles.name,
            "{ 198.18.0.10 }",
        ]);
        assert!(!fw.verify(Some(&rs)).unwrap(), "a missing address");
        assert_ne!(fw.read_back().unwrap(), Some(TableSummary::expected(&rs)));

        // The same counts, one address swapped for another (a table
        // rebuilt by someone else): only the elements tell.
        let mut other = rs.clone();
        let Elements::Addresses(addresses) = &mut other.sets[2].elements else {
            unreachable!()
        };
        addresses[5] = "198.18.0.11".parse().unwrap();
        let file = nft_script(ns, &other, "swapped");
        ns.nft_ok(&["-f", file.to_str().unwrap()]);
        let _ = std::fs::remove_file(&file);
        assert_eq!(fw.read_back().unwrap(), Some(TableSummary::expected(&rs)));
        assert!(!fw.verify(Some(&rs)).unwrap(), "a swapped address");
        assert!(fw.verify(Some(&other)).unwrap());

        // A range taken out of an interval set.
        let rs = mixed_address_rules();
        let range = rs
            .sets
            .iter()
            .find(|s| {
                s.elements
                    == Elements::Ranges(vec![(
                        "198.18.4.0".parse().unwrap(),
                        "198.18.5.255".parse().unwrap(),
                    )])
            })
            .expect("the merged /23");
        fw.apply_verified(Some(&rs)).unwrap();
        assert!(fw.verify(Some(&rs)).unwrap());
        ns.nft_ok(&[
            "delete",
            "element",
            "inet",
            "cordon",
            &range.name,
            "{ 198.18.4.0/23 }",
        ]);
        assert!(!fw.verify(Some(&rs)).unwrap(), "a missing range");
        fw.apply_verified(Some(&rs)).unwrap();
        assert!(fw.verify(Some(&rs)).unwrap());
    });
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn p90(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[(v.len() * 9).div_ceil(10) - 1]
}

fn ms(d: Duration) -> String {
    format!("{:.3} ms", d.as_secs_f64() * 1e3)
}

/// The benchmark of BENCHMARKS.md ("The agent, in the kernel"): Full,
/// Selective with 1,000 address rules, and with 1,000 rules of an address
/// and a port each, each applied on the agent's open
/// socket (apply alone, and apply + read-back as the agent does) and with
/// `nft -f` of the same ruleset, medians and p90 side by side. Run it on a
/// release build:
/// `cargo test --release -p nft --test kernel timing -- --ignored --nocapture`.
#[test]
#[ignore = "benchmark: run with --release -- --ignored --nocapture"]
fn timing_apply_full_and_selective_versus_nft() {
    in_fresh_netns("timing_apply_full_and_selective_versus_nft", |ns| {
        // nft is started straight from this thread (children inherit its
        // namespace: checked first), without nsenter's own exec.
        let child_ns = Command::new("readlink")
            .arg("/proc/self/ns/net")
            .output()
            .unwrap();
        let child_ns = String::from_utf8_lossy(&child_ns.stdout).trim().to_owned();
        assert_eq!(
            child_ns,
            format!("net:[{}]", ns.inode),
            "child not in the namespace"
        );
        let mut fw = Firewall::open().unwrap();
        let mut lines = Vec::new();
        for (what, rs, runs) in [
            ("Full", full(), 200),
            (
                "Selective, 1,000 address rules",
                thousand_address_rules(),
                200,
            ),
            (
                "Selective, 1,000 address rules with a port each",
                thousand_address_port_rules(),
                200,
            ),
        ] {
            let rules: usize = rs.chains.iter().map(|c| c.rules.len()).sum();
            let elements: usize = TableSummary::expected(&rs).sets.iter().map(|s| s.1).sum();
            let timed = |f: &mut dyn FnMut()| -> Vec<Duration> {
                (0..runs)
                    .map(|_| {
                        let start = Instant::now();
                        f();
                        start.elapsed()
                    })
                    .collect()
            };
            let apply = timed(&mut || fw.apply(Some(&rs)).unwrap());
            let verified = timed(&mut || fw.apply_verified(Some(&rs)).unwrap());
            let file = nft_script(ns, &rs, "timing");
            let path = file.to_str().unwrap().to_owned();
            let nft: Vec<Duration> = (0..runs / 4)
                .map(|_| {
                    let start = Instant::now();
                    let status = Command::new("nft").args(["-f", &path]).status().unwrap();
                    let took = start.elapsed();
                    assert!(status.success(), "nft -f {path}");
                    took
                })
                .collect();
            let _ = std::fs::remove_file(&file);
            // What nft put in force is the same table.
            assert!(fw.verify(Some(&rs)).unwrap(), "{what}: nft's table differs");
            lines.push(format!(
                "timing: {what} ({rules} rules, {} sets, {elements} set elements, {} chains):\n\
                 \x20 Firewall::apply (open socket)             median {} p90 {} over {runs}\n\
                 \x20 Firewall::apply_verified (+ read-back)    median {} p90 {} over {runs}\n\
                 \x20 nft -f (a process, same ruleset)          median {} p90 {} over {}",
                rs.sets.len(),
                rs.chains.len(),
                ms(median(apply.clone())),
                ms(p90(apply)),
                ms(median(verified.clone())),
                ms(p90(verified)),
                ms(median(nft.clone())),
                ms(p90(nft.clone())),
                nft.len(),
            ));
        }
        fw.apply_verified(None).unwrap();
        // Uncaptured, so the figures show in any run.
        let _ = writeln!(io::stderr(), "{}", lines.join("\n"));
    });
}
