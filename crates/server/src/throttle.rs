//! Throttling of failed sign-ins, per account and per source address.
//!
//! Every failed password check counts against the account named (whether
//! or not it exists, so that throttling tells nothing about which accounts
//! exist) and against the source address. Once an account reaches
//! `per_user` failures, or an address `per_source`, within the window,
//! further attempts are refused without checking the password, first for a
//! minute, doubling with each further failure up to fifteen minutes. A
//! successful sign-in clears the account's count (not the address's).
//!
//! An address an account has signed in from in the last thirty days is
//! *familiar* to it (as with Entra ID's smart lockout): there, the account
//! has a count of its own and the address's lock-out does not apply, so an
//! attacker guessing from elsewhere, or sharing the address of an office's
//! NAT, cannot lock the account's owner out where they usually work.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Failures older than this are forgotten (unless a lock-out is running).
const WINDOW: Duration = Duration::from_secs(15 * 60);
const FIRST_LOCK: Duration = Duration::from_secs(60);
const LONGEST_LOCK: Duration = Duration::from_secs(15 * 60);
/// Entries kept at most; beyond, the stale ones are dropped first.
const MAX_ENTRIES: usize = 100_000;
/// How long an address stays familiar to an account after a sign-in.
const FAMILIAR_FOR: Duration = Duration::from_secs(30 * 24 * 3600);

#[derive(Debug, Clone, Copy)]
struct Entry {
    failures: u32,
    first: Instant,
    locked_until: Option<Instant>,
}

pub struct Throttle {
    per_user: u32,
    per_source: u32,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    entries: HashMap<String, Entry>,
    /// (account, address) → last successful sign-in.
    familiar: HashMap<(String, String), Instant>,
}

impl Inner {
    fn is_familiar(&self, account: &str, source: &str, now: Instant) -> bool {
        self.familiar
            .get(&(account.to_owned(), source.to_owned()))
            .is_some_and(|at| now.duration_since(*at) < FAMILIAR_FOR)
    }

    /// The account's key as seen from `source`, and whether the address's
    /// own count applies.
    fn keys(&self, account: &str, source: &str, now: Instant) -> (String, Option<String>) {
        if self.is_familiar(account, source, now) {
            (format!("user:{account}|{source}"), None)
        } else {
            (format!("user:{account}"), Some(format!("source:{source}")))
        }
    }
}

fn account(user: &str) -> String {
    user.trim().to_lowercase()
}

impl Throttle {
    /// `0` turns a limit off.
    pub fn new(per_user: u32, per_source: u32) -> Throttle {
        Throttle {
            per_user,
            per_source,
            inner: Mutex::new(Inner::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `Err(seconds to wait)` while either the account or the address is
    /// locked out.
    pub fn check(&self, user: &str, source: &str) -> Result<(), u64> {
        let now = Instant::now();
        let inner = self.lock();
        let (user_key, source_key) = inner.keys(&account(user), source, now);
        let wait = std::iter::once(user_key)
            .chain(source_key)
            .filter_map(|k| inner.entries.get(&k)?.locked_until)
            .filter(|until| *until > now)
            .map(|until| until - now)
            .max();
        match wait {
            Some(wait) => Err(wait.as_secs().max(1)),
            None => Ok(()),
        }
    }

    pub fn failed(&self, user: &str, source: &str) {
        let now = Instant::now();
        let mut inner = self.lock();
        let (user_key, source_key) = inner.keys(&account(user), source, now);
        if inner.entries.len() >= MAX_ENTRIES {
            inner.entries.retain(|_, e| {
                now.duration_since(e.first) < WINDOW || e.locked_until.is_some_and(|u| u > now)
            });
        }
        let counts = std::iter::once((user_key, self.per_user))
            .chain(source_key.map(|k| (k, self.per_source)));
        for (key, limit) in counts {
            if limit == 0 {
                continue;
            }
            let entry = inner.entries.entry(key).or_insert(Entry {
                failures: 0,
                first: now,
                locked_until: None,
            });
            let lock_running = entry.locked_until.is_some_and(|u| u > now);
            if !lock_running && now.duration_since(entry.first) > WINDOW {
                *entry = Entry {
                    failures: 0,
                    first: now,
                    locked_until: None,
                };
            }
            entry.failures += 1;
            if entry.failures >= limit {
                let doublings = (entry.failures - limit).min(10);
                let lock = (FIRST_LOCK * 2u32.pow(doublings)).min(LONGEST_LOCK);
                entry.locked_until = Some(now + lock);
            }
        }
    }

    /// Clears the account's counts and makes `source` familiar to it.
    pub fn succeeded(&self, user: &str, source: &str) {
        let now = Instant::now();
        let account = account(user);
        let mut inner = self.lock();
        inner.entries.remove(&format!("user:{account}"));
        inner.entries.remove(&format!("user:{account}|{source}"));
        if inner.familiar.len() >= MAX_ENTRIES {
            inner
                .familiar
                .retain(|_, at| now.duration_since(*at) < FAMILIAR_FOR);
            if inner.familiar.len() >= MAX_ENTRIES {
                inner.familiar.clear();
            }
        }
        inner.familiar.insert((account, source.to_owned()), now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_account_is_locked_after_its_limit_of_failures() {
        let throttle = Throttle::new(3, 100);
        for _ in 0..2 {
            assert!(throttle.check("Alice@x", "10.0.0.1").is_ok());
            throttle.failed("alice@x", "10.0.0.1");
        }
        assert!(throttle.check("alice@x", "10.0.0.2").is_ok());
        throttle.failed("ALICE@x", "10.0.0.2");
        // Locked from any address, and only this account.
        let wait = throttle.check("alice@x", "10.0.0.3").unwrap_err();
        assert!((59..=60).contains(&wait), "{wait}");
        assert!(throttle.check("bob@x", "10.0.0.3").is_ok());
        // Each further failure doubles the lock-out.
        throttle.failed("alice@x", "10.0.0.3");
        assert!(throttle.check("alice@x", "10.0.0.3").unwrap_err() > 100);
    }

    #[test]
    fn an_address_is_locked_after_its_limit_across_accounts() {
        let throttle = Throttle::new(100, 4);
        for n in 0..4 {
            throttle.failed(&format!("user{n}@x"), "10.0.0.9");
        }
        assert!(throttle.check("someone-new@x", "10.0.0.9").is_err());
        assert!(throttle.check("someone-new@x", "10.0.0.8").is_ok());
    }

    #[test]
    fn success_clears_the_account_and_zero_turns_a_limit_off() {
        let throttle = Throttle::new(2, 0);
        throttle.failed("a@x", "s");
        throttle.succeeded("A@X", "s");
        throttle.failed("a@x", "s");
        assert!(throttle.check("a@x", "s").is_ok());
        for _ in 0..50 {
            throttle.failed(&format!("{}@x", rand_name()), "s");
        }
        assert!(throttle.check("fresh@x", "s").is_ok());
    }

    #[test]
    fn failures_elsewhere_do_not_lock_an_account_out_of_a_familiar_address() {
        let throttle = Throttle::new(3, 5);
        throttle.succeeded("alice@x", "10.0.0.1");
        // An attacker elsewhere locks the account, and their own address…
        for _ in 0..5 {
            throttle.failed("alice@x", "192.0.2.66");
        }
        assert!(throttle.check("alice@x", "192.0.2.66").is_err());
        assert!(throttle.check("alice@x", "192.0.2.77").is_err());
        // …but not the owner where they signed in before.
        assert!(throttle.check("alice@x", "10.0.0.1").is_ok());
        // A password spray from the owner's address doesn't lock them out…
        for n in 0..5 {
            throttle.failed(&format!("user{n}@x"), "10.0.0.1");
        }
        assert!(throttle.check("bob@x", "10.0.0.1").is_err());
        assert!(throttle.check("alice@x", "10.0.0.1").is_ok());
        // …while their own failures there still count, against their own count.
        for _ in 0..3 {
            throttle.failed("alice@x", "10.0.0.1");
        }
        assert!(throttle.check("alice@x", "10.0.0.1").is_err());
    }

    fn rand_name() -> String {
        crate::crypto::new_guid()
    }
}
