//! The only code of Cordon that talks netlink to nftables.
//!
//! It applies a rendered [`policy::Ruleset`] (or removes Cordon's table) as
//! ONE atomic netlink batch ([`Firewall::apply`]), reads the table back to
//! verify it ([`Firewall::read_back`], [`Firewall::verify`]), and watches
//! for changes made by anyone else ([`Monitor`], tamper detection). No
//! `nft` binary is needed at run time.
//!
//! # Library choice
//!
//! - [`nftnl`] 0.9 (MIT OR Apache-2.0), safe bindings to libnftnl (LGPL-2.1+,
//!   linked dynamically), builds the batch messages. The feature
//!   `nftnl-1-2-0` is on: Debian 12 ships libnftnl 1.2.4, and that feature
//!   enables the socket (cgroup v2) expression Cordon needs later to match
//!   the agent's own process.
//! - [`mnl`] 0.3 (MIT OR Apache-2.0, libmnl LGPL-2.1+) opens the netlink
//!   socket.
//! - Answers, dumps and notifications are parsed here (see `netlink`): they
//!   are a header and a few flat attributes, simpler to read in safe Rust
//!   than through libnftnl's parsers.
//! - `rustables` was rejected because it is GPL-3.0.
//!
//! Building needs the Debian packages libnftnl-dev, libmnl-dev and
//! pkg-config.
//!
//! Selective isolation's `address . port` sets (interval sets of
//! concatenations, the kernel's `pipapo` set) need Linux 5.6 or later and
//! libnftnl 1.1.6 or later (element key ends, concatenation field lengths).
//!
//! # Safety of tests
//!
//! Applying Cordon's table in the root network namespace of a development
//! or CI machine cuts the machine off. Every test here that touches the
//! kernel first moves its own thread into a fresh network namespace
//! (`unshare(CLONE_NEWNET)`; namespaces are per thread, and so are the
//! netlink sockets it then opens), and skips with a visible message when
//! not root.

mod encode;
mod firewall;
mod monitor;
mod netlink;

use std::io;

pub use firewall::Firewall;
pub use monitor::Monitor;
use policy::Ruleset;

/// What went wrong talking to nftables.
#[derive(Debug, thiserror::Error)]
pub enum NftError {
    /// A system call on the netlink socket failed.
    #[error("could not {action}: {source}")]
    Io {
        action: &'static str,
        #[source]
        source: io::Error,
    },
    /// The kernel refused a request; for a batch, nothing of it was applied.
    #[error("the kernel refused {request}: {}", io::Error::from_raw_os_error(*errno))]
    Kernel {
        /// Which request (for a batch: which of its messages).
        request: String,
        /// The positive errno the kernel answered with.
        errno: i32,
    },
    /// The ruleset cannot be expressed as nftables messages (nothing was
    /// sent).
    #[error("cannot encode the ruleset: {0}")]
    Encode(String),
    /// The kernel's answer was missing, late or malformed.
    #[error("unexpected answer from the kernel: {0}")]
    Protocol(String),
    /// After an apply, the table read back is not the one applied.
    #[error(
        "the table in the kernel is not the one applied: {reason} (expected {}, found {})",
        TableSummary::describe(expected.as_ref()),
        TableSummary::describe(found.as_ref())
    )]
    Mismatch {
        /// What differs, in plain words.
        reason: String,
        expected: Option<TableSummary>,
        found: Option<TableSummary>,
    },
}

impl NftError {
    /// The errno of a kernel refusal or a failed system call.
    pub fn errno(&self) -> Option<i32> {
        match self {
            NftError::Kernel { errno, .. } => Some(*errno),
            NftError::Io { source, .. } => source.raw_os_error(),
            _ => None,
        }
    }
}

/// What Cordon's table holds, in counts: each chain's name and rule count,
/// each set's name and element count (in the kernel's order).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableSummary {
    pub chains: Vec<(String, usize)>,
    pub sets: Vec<(String, usize)>,
}

impl TableSummary {
    /// The summary the kernel should report once `ruleset` is applied
    /// (duplicate set elements count once, as in the kernel; a range of an
    /// interval set counts as its start and end elements).
    pub fn expected(ruleset: &Ruleset) -> TableSummary {
        TableSummary {
            chains: ruleset
                .chains
                .iter()
                .map(|c| (c.name.to_owned(), c.rules.len()))
                .collect(),
            sets: ruleset
                .sets
                .iter()
                .map(|s| {
                    let n = encode::element_keys(s).map_or(s.elements.len(), |k| k.len());
                    (s.name.clone(), n)
                })
                .collect(),
        }
    }

    /// Same chains, rule counts, sets and element counts, in any order.
    fn same(a: Option<&TableSummary>, b: Option<&TableSummary>) -> bool {
        fn sorted(v: &[(String, usize)]) -> Vec<(String, usize)> {
            let mut v = v.to_vec();
            v.sort();
            v
        }
        match (a, b) {
            (None, None) => true,
            (Some(a), Some(b)) => {
                sorted(&a.chains) == sorted(&b.chains) && sorted(&a.sets) == sorted(&b.sets)
            }
            _ => false,
        }
    }

    fn describe(summary: Option<&TableSummary>) -> String {
        let Some(s) = summary else {
            return "no table".to_owned();
        };
        let chains: Vec<String> = s
            .chains
            .iter()
            .map(|(n, c)| format!("{n} ({c} rules)"))
            .collect();
        let sets: Vec<String> = s
            .sets
            .iter()
            .map(|(n, c)| format!("{n} ({c} elements)"))
            .collect();
        format!("chains [{}], sets [{}]", chains.join(", "), sets.join(", "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn summary(chains: &[(&str, usize)], sets: &[(&str, usize)]) -> TableSummary {
        TableSummary {
            chains: chains.iter().map(|(n, c)| (n.to_string(), *c)).collect(),
            sets: sets.iter().map(|(n, c)| (n.to_string(), *c)).collect(),
        }
    }

    #[test]
    fn comparison_ignores_order_but_not_counts() {
        let a = summary(&[("input", 2), ("output", 3)], &[("s", 1)]);
        let b = summary(&[("output", 3), ("input", 2)], &[("s", 1)]);
        let c = summary(&[("output", 3), ("input", 1)], &[("s", 1)]);
        assert!(TableSummary::same(Some(&a), Some(&b)));
        assert!(!TableSummary::same(Some(&a), Some(&c)));
        assert!(!TableSummary::same(Some(&a), None));
        assert!(TableSummary::same(None, None));
    }

    #[test]
    fn errors_say_what_failed_in_plain_words() {
        let e = NftError::Kernel {
            request: "the batch at \"add rule 2 of chain input\"".to_owned(),
            errno: libc::ENOENT,
        };
        let text = e.to_string();
        assert!(text.contains("add rule 2 of chain input"), "{text}");
        assert!(text.contains("No such file or directory"), "{text}");
        assert_eq!(e.errno(), Some(libc::ENOENT));
        let m = NftError::Mismatch {
            reason: "the table is missing".to_owned(),
            expected: Some(summary(&[("input", 2)], &[("s", 1)])),
            found: None,
        };
        assert!(m.to_string().contains("found no table"), "{m}");
    }
}
