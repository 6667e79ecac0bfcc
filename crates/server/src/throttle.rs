//! Throttling of failed sign-ins, per account and per source address.
//!
//! Every failed password check counts against the account named (whether
//! or not it exists, so that throttling tells nothing about which accounts
//! exist) and against the source address. Once an account reaches
//! `per_user` failures, or an address `per_source`, within the window,
//! further attempts are refused without checking the password, first for a
//! minute, doubling with each further failure up to fifteen minutes. A
//! successful sign-in clears the account's count at that address (not the
//! address's count, nor the account's count elsewhere).
//!
//! An attempt reserves its place before the password is checked
//! ([`Throttle::begin`]), and attempts in flight count as failures until
//! they end: a burst of simultaneous guesses gets no more tries than guesses
//! one after another.
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
/// Longest account name kept (longer ones are cut: none is a real account).
const MAX_ACCOUNT: usize = 256;

/// What a count is kept for.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Key {
    /// An account, seen from addresses not familiar to it.
    User(String),
    /// An account at an address familiar to it.
    UserAt(String, String),
    Source(String),
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    failures: u32,
    /// Attempts begun and not yet ended.
    in_flight: u32,
    first: Instant,
    locked_until: Option<Instant>,
}

impl Entry {
    fn new(now: Instant) -> Entry {
        Entry {
            failures: 0,
            in_flight: 0,
            first: now,
            locked_until: None,
        }
    }

    fn locked(&self, now: Instant) -> bool {
        self.locked_until.is_some_and(|u| u > now)
    }

    /// Whether the entry still matters: a lock-out runs, an attempt is in
    /// flight, or its failures are within the window.
    fn live(&self, now: Instant) -> bool {
        self.locked(now) || self.in_flight > 0 || now.duration_since(self.first) < WINDOW
    }
}

pub struct Throttle {
    per_user: u32,
    per_source: u32,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    entries: HashMap<Key, Entry>,
    /// (account, address) → last successful sign-in.
    familiar: HashMap<(String, String), Instant>,
}

impl Inner {
    fn is_familiar(&self, account: &str, source: &str, now: Instant) -> bool {
        self.familiar
            .get(&(account.to_owned(), source.to_owned()))
            .is_some_and(|at| now.duration_since(*at) < FAMILIAR_FOR)
    }

    /// Makes room for a new entry, dropping stale ones first, then ones no
    /// lock-out or attempt holds, so memory stays bounded.
    fn make_room(&mut self, now: Instant) {
        if self.entries.len() < MAX_ENTRIES {
            return;
        }
        self.entries.retain(|_, e| e.live(now));
        if self.entries.len() >= MAX_ENTRIES {
            self.entries.retain(|_, e| e.locked(now) || e.in_flight > 0);
        }
        if self.entries.len() >= MAX_ENTRIES {
            self.entries.retain(|_, e| e.in_flight > 0);
        }
    }
}

fn account(user: &str) -> String {
    user.trim()
        .to_lowercase()
        .chars()
        .take(MAX_ACCOUNT)
        .collect()
}

/// A sign-in attempt under way: it counts as a failure until it ends with
/// [`Attempt::succeeded`] or [`Attempt::failed`] (dropped: it never happened).
pub struct Attempt<'a> {
    throttle: &'a Throttle,
    account: String,
    source: String,
    keys: Vec<(Key, u32)>,
    ended: bool,
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

    /// Begins an attempt to sign in as `user` from `source`; `Err(seconds
    /// to wait)` while the account or the address is locked out, or while
    /// attempts in flight would reach a limit.
    pub fn begin(&self, user: &str, source: &str) -> Result<Attempt<'_>, u64> {
        let now = Instant::now();
        let account = account(user);
        let mut inner = self.lock();
        let mut keys = Vec::new();
        if inner.is_familiar(&account, source, now) {
            keys.push((
                Key::UserAt(account.clone(), source.to_owned()),
                self.per_user,
            ));
        } else {
            keys.push((Key::User(account.clone()), self.per_user));
            keys.push((Key::Source(source.to_owned()), self.per_source));
        }
        keys.retain(|(_, limit)| *limit > 0);
        let mut wait: Option<Duration> = None;
        for (key, limit) in &keys {
            let Some(entry) = inner.entries.get_mut(key) else {
                continue;
            };
            if !entry.live(now) {
                *entry = Entry::new(now);
            }
            if let Some(until) = entry.locked_until.filter(|u| *u > now) {
                wait = wait.max(Some(until - now));
            } else if entry.locked_until.is_some() {
                // A lock-out ran and ended: one attempt at a time, each
                // failure locking again for twice as long.
                if entry.in_flight > 0 {
                    wait = wait.max(Some(Duration::from_secs(1)));
                }
            } else if entry.failures + entry.in_flight >= *limit {
                // Enough attempts are under way to reach the limit.
                wait = wait.max(Some(Duration::from_secs(1)));
            }
        }
        if let Some(wait) = wait {
            return Err(wait.as_secs().max(1));
        }
        for (key, _) in &keys {
            if !inner.entries.contains_key(key) {
                inner.make_room(now);
            }
            inner
                .entries
                .entry(key.clone())
                .or_insert_with(|| Entry::new(now))
                .in_flight += 1;
        }
        Ok(Attempt {
            throttle: self,
            account,
            source: source.to_owned(),
            keys,
            ended: false,
        })
    }
}

impl Attempt<'_> {
    /// Ends the attempt; `failed` counts it.
    fn end(&mut self, failed: bool) {
        if self.ended {
            return;
        }
        self.ended = true;
        let now = Instant::now();
        let mut inner = self.throttle.lock();
        for (key, limit) in &self.keys {
            let Some(entry) = inner.entries.get_mut(key) else {
                continue;
            };
            entry.in_flight = entry.in_flight.saturating_sub(1);
            if !failed {
                continue;
            }
            if !entry.locked(now) && now.duration_since(entry.first) > WINDOW {
                entry.failures = 0;
                entry.first = now;
            }
            entry.failures += 1;
            if entry.failures >= *limit {
                let doublings = (entry.failures - limit).min(10);
                let lock = (FIRST_LOCK * 2u32.pow(doublings)).min(LONGEST_LOCK);
                entry.locked_until = Some(now + lock);
            }
        }
    }

    pub fn failed(mut self) {
        self.end(true);
    }

    /// Clears the account's count at this address and makes the address
    /// familiar to the account. Failures elsewhere stay counted.
    pub fn succeeded(mut self) {
        self.end(false);
        let now = Instant::now();
        let mut inner = self.throttle.lock();
        inner
            .entries
            .remove(&Key::UserAt(self.account.clone(), self.source.clone()));
        if inner.familiar.len() >= MAX_ENTRIES {
            inner
                .familiar
                .retain(|_, at| now.duration_since(*at) < FAMILIAR_FOR);
            if inner.familiar.len() >= MAX_ENTRIES {
                inner.familiar.clear();
            }
        }
        inner
            .familiar
            .insert((self.account.clone(), self.source.clone()), now);
    }
}

impl Drop for Attempt<'_> {
    fn drop(&mut self) {
        if !self.ended {
            // Ended by neither outcome (the store was unavailable): release
            // its place without counting it.
            self.ended = true;
            let mut inner = self.throttle.lock();
            for (key, _) in &self.keys {
                if let Some(entry) = inner.entries.get_mut(key) {
                    entry.in_flight = entry.in_flight.saturating_sub(1);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One attempt that fails.
    fn fail(throttle: &Throttle, user: &str, source: &str) {
        throttle.begin(user, source).unwrap().failed();
    }

    #[test]
    fn an_account_is_locked_after_its_limit_of_failures() {
        let throttle = Throttle::new(3, 100);
        fail(&throttle, "Alice@x", "10.0.0.1");
        fail(&throttle, " alice@X ", "10.0.0.1");
        fail(&throttle, "ALICE@x", "10.0.0.2");
        // Locked from any address, and only this account.
        let wait = throttle.begin("alice@x", "10.0.0.3").err().unwrap();
        assert!((59..=60).contains(&wait), "{wait}");
        assert!(throttle.begin("bob@x", "10.0.0.3").is_ok());
    }

    /// Once its lock-out ends, an account gets one attempt at a time (the
    /// right password gets in); each further failure locks it again for
    /// twice as long. (The count of failures stays for the whole window, so
    /// a lock-out that ended once answered "wait 1 s" for fifteen minutes.)
    #[test]
    fn after_a_lock_out_ends_one_attempt_at_a_time_and_failures_lock_longer() {
        let throttle = Throttle::new(3, 100);
        for _ in 0..3 {
            fail(&throttle, "alice@x", "10.0.0.1");
        }
        assert!(throttle.begin("alice@x", "10.0.0.1").is_err());
        let end_lock = |throttle: &Throttle| {
            let mut inner = throttle.lock();
            let entry = inner.entries.get_mut(&Key::User("alice@x".into())).unwrap();
            entry.locked_until = Some(Instant::now() - Duration::from_secs(1));
        };
        end_lock(&throttle);
        // One attempt; a second at the same time waits for it.
        let attempt = throttle.begin("alice@x", "10.0.0.1").unwrap();
        assert_eq!(throttle.begin("alice@x", "10.0.0.1").err(), Some(1));
        attempt.failed();
        let wait = throttle.begin("alice@x", "10.0.0.1").err().unwrap();
        assert!((119..=120).contains(&wait), "locked again for {wait} s");
        end_lock(&throttle);
        throttle.begin("alice@x", "10.0.0.1").unwrap().succeeded();
    }

    #[test]
    fn attempts_in_flight_count_so_a_burst_gets_no_more_tries() {
        let throttle = Throttle::new(3, 100);
        let burst: Vec<_> = (0..10)
            .map(|_| throttle.begin("alice@x", "10.0.0.1"))
            .collect();
        assert_eq!(burst.iter().filter(|a| a.is_ok()).count(), 3);
        for attempt in burst.into_iter().flatten() {
            attempt.failed();
        }
        assert!(throttle.begin("alice@x", "10.0.0.1").is_err());
        // An attempt that ends with neither outcome gives its place back.
        let other = Throttle::new(1, 0);
        drop(other.begin("bob@x", "s").unwrap());
        assert!(other.begin("bob@x", "s").is_ok());
    }

    #[test]
    fn an_address_is_locked_after_its_limit_across_accounts() {
        let throttle = Throttle::new(100, 4);
        for n in 0..4 {
            fail(&throttle, &format!("user{n}@x"), "10.0.0.9");
        }
        assert!(throttle.begin("someone-new@x", "10.0.0.9").is_err());
        assert!(throttle.begin("someone-new@x", "10.0.0.8").is_ok());
    }

    #[test]
    fn success_clears_the_count_at_its_address_and_zero_turns_a_limit_off() {
        let throttle = Throttle::new(2, 0);
        fail(&throttle, "a@x", "s");
        throttle.begin("A@X", "s").unwrap().succeeded();
        fail(&throttle, "a@x", "s");
        assert!(throttle.begin("a@x", "s").is_ok());
        for _ in 0..50 {
            fail(&throttle, &format!("{}@x", crate::crypto::new_guid()), "s");
        }
        assert!(throttle.begin("fresh@x", "s").is_ok());
    }

    #[test]
    fn failures_elsewhere_do_not_lock_an_account_out_of_a_familiar_address() {
        let throttle = Throttle::new(3, 5);
        throttle.begin("alice@x", "10.0.0.1").unwrap().succeeded();
        // An attacker elsewhere locks the account, and their own address…
        for _ in 0..5 {
            let _ = throttle.begin("alice@x", "192.0.2.66").map(Attempt::failed);
        }
        assert!(throttle.begin("alice@x", "192.0.2.66").is_err());
        assert!(throttle.begin("alice@x", "192.0.2.77").is_err());
        // …but not the owner where they signed in before, and the owner's
        // success there does not reset the count the attacker built up.
        throttle.begin("alice@x", "10.0.0.1").unwrap().succeeded();
        assert!(throttle.begin("alice@x", "192.0.2.77").is_err());
        // A name made to look like the owner's key at that address is just
        // another unknown account.
        for _ in 0..3 {
            fail(&throttle, "alice@x|10.0.0.1", "192.0.2.88");
        }
        assert!(throttle.begin("alice@x", "10.0.0.1").is_ok());
        // A password spray from the owner's address doesn't lock them out…
        for n in 0..5 {
            fail(&throttle, &format!("user{n}@x"), "10.0.0.1");
        }
        assert!(throttle.begin("bob@x", "10.0.0.1").is_err());
        assert!(throttle.begin("alice@x", "10.0.0.1").is_ok());
        // …while their own failures there still count, against their own count.
        for _ in 0..3 {
            fail(&throttle, "alice@x", "10.0.0.1");
        }
        assert!(throttle.begin("alice@x", "10.0.0.1").is_err());
    }

    #[test]
    fn memory_stays_bounded_and_long_names_are_cut() {
        let throttle = Throttle::new(5, 0);
        let long = "x".repeat(10_000);
        fail(&throttle, &long, "s");
        let inner = throttle.lock();
        assert!(inner.entries.keys().all(|k| match k {
            Key::User(a) => a.len() <= MAX_ACCOUNT,
            _ => true,
        }));
    }
}
