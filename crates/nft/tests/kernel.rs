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
use policy::{Action, Family, Isolation, Match, Policy, Rule, Ruleset, Scope};

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
fn timing_a_thousand_address_rules() {
    in_fresh_netns("timing_a_thousand_address_rules", |_ns| {
        let exclusions: Vec<policy::Exclusion> = (0..1000u32)
            .map(|i| policy::Exclusion {
                name: format!("r{i}"),
                cgroup: None,
                inbound: false,
                outbound: true,
                remote: vec![(IpAddr::V4(std::net::Ipv4Addr::from(0xc612_0000 + i)), 32)],
                ports: vec![],
            })
            .collect();
        let big = policy::render(&Policy::Isolated(Isolation {
            scope: Scope::Selective,
            server_addresses: vec!["198.18.0.1".parse().unwrap()],
            server_port: 8443,
            agent_gid: 61742,
            exclusions,
        }))
        .unwrap();
        let small = full();
        let mut fw = Firewall::open().unwrap();
        let mut time = |rs: &Ruleset| {
            let mut runs: Vec<Duration> = (0..21)
                .map(|_| {
                    let start = Instant::now();
                    fw.apply(Some(rs)).unwrap();
                    start.elapsed()
                })
                .collect();
            runs.sort();
            runs[runs.len() / 2]
        };
        let (full_time, big_time) = (time(&small), time(&big));
        assert!(fw.verify(Some(&big)).unwrap());
        eprintln!(
            "timing: apply Full ({} rules) median {full_time:?}; Selective with 1,000 address rules ({} rules) median {big_time:?}",
            small.chains.iter().map(|c| c.rules.len()).sum::<usize>(),
            big.chains.iter().map(|c| c.rules.len()).sum::<usize>(),
        );
    });
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
                Match::SourceInSet(Family::V4, "no_such_set"),
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

        ns.nft_ok(&[
            "add",
            "element",
            "inet",
            "cordon",
            "mgmt_v4",
            "{ 198.18.0.66 }",
        ]);
        assert!(changed(&mut monitor, port), "an element added by nft");
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

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

#[test]
fn timing_apply_versus_nft() {
    in_fresh_netns("timing_apply_versus_nft", |ns| {
        let rs = full();
        let mut fw = Firewall::open().unwrap();
        let mut ours = Vec::new();
        for _ in 0..100 {
            let start = Instant::now();
            fw.apply(Some(&rs)).unwrap();
            ours.push(start.elapsed());
        }
        assert!(fw.verify(Some(&rs)).unwrap());

        // The same change for nft: replace the table, in nft syntax.
        let file = std::env::temp_dir().join(format!("cordon-nft-timing-{}.nft", ns.tid));
        std::fs::write(
            &file,
            format!("table inet cordon\ndelete table inet cordon\n{rs}\n"),
        )
        .unwrap();
        let path = file.to_str().unwrap().to_owned();
        let check = ns.nft(&["-c", "-f", &path]);
        if !check.status.success() {
            let _ = std::fs::remove_file(&file);
            panic!(
                "nft -c rejects the policy's Display form: {}",
                String::from_utf8_lossy(&check.stderr)
            );
        }

        // Time nft itself, started straight from this thread (children
        // inherit its namespace: checked first), without nsenter's own exec.
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
        let mut theirs = Vec::new();
        for _ in 0..50 {
            let start = Instant::now();
            let status = Command::new("nft").args(["-f", &path]).status().unwrap();
            theirs.push(start.elapsed());
            assert!(status.success());
        }
        let _ = std::fs::remove_file(&file);
        // nft encodes `ct state { established, related }` with anonymous
        // sets, so its table reads back with more sets than ours.
        let after_nft = fw.read_back().unwrap().unwrap();
        eprintln!("read back after nft -f: {after_nft:?}");
        assert!(after_nft.sets.len() > rs.sets.len());
        fw.apply_verified(Some(&rs)).unwrap();

        // Uncaptured too, so the figures show in a normal run.
        let _ = writeln!(
            io::stderr(),
            "timing: Firewall::apply (open socket) median {:?} over 100; \
             `nft -f` (process, same ruleset) median {:?} over 50",
            median(ours),
            median(theirs)
        );
    });
}
