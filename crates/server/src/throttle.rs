//! Throttling of failed sign-ins, per account and per source address.
//!
//! Every failed password check counts against the account named (whether
//! or not it exists, so that throttling tells nothing about which accounts
//! exist) and against the source address. Once an account reaches
//! `per_user` failures, or an address `per_source`, within the window,
//! further attempts are refused without checking the password, first for a
//! minute, doubling with each further failure up to fifteen minutes. A
//! successful sign-in clears the account's count (not the address's).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Failures older than this are forgotten (unless a lock-out is running).
const WINDOW: Duration = Duration::from_secs(15 * 60);
const FIRST_LOCK: Duration = Duration::from_secs(60);
const LONGEST_LOCK: Duration = Duration::from_secs(15 * 60);
/// Entries kept at most; beyond, the stale ones are dropped first.
const MAX_ENTRIES: usize = 100_000;

#[derive(Debug, Clone, Copy)]
struct Entry {
    failures: u32,
    first: Instant,
    locked_until: Option<Instant>,
}

pub struct Throttle {
    per_user: u32,
    per_source: u32,
    entries: Mutex<HashMap<String, Entry>>,
}

impl Throttle {
    /// `0` turns a limit off.
    pub fn new(per_user: u32, per_source: u32) -> Throttle {
        Throttle {
            per_user,
            per_source,
            entries: Mutex::new(HashMap::new()),
        }
    }

    fn keys(user: &str, source: &str) -> (String, String) {
        (
            format!("user:{}", user.trim().to_lowercase()),
            format!("source:{source}"),
        )
    }

    /// `Err(seconds to wait)` while either the account or the address is
    /// locked out.
    pub fn check(&self, user: &str, source: &str) -> Result<(), u64> {
        let now = Instant::now();
        let (user_key, source_key) = Self::keys(user, source);
        let entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        let wait = [user_key, source_key]
            .iter()
            .filter_map(|k| entries.get(k)?.locked_until)
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
        let (user_key, source_key) = Self::keys(user, source);
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        if entries.len() >= MAX_ENTRIES {
            entries.retain(|_, e| {
                now.duration_since(e.first) < WINDOW || e.locked_until.is_some_and(|u| u > now)
            });
        }
        for (key, limit) in [(user_key, self.per_user), (source_key, self.per_source)] {
            if limit == 0 {
                continue;
            }
            let entry = entries.entry(key).or_insert(Entry {
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

    pub fn succeeded(&self, user: &str) {
        let (user_key, _) = Self::keys(user, "");
        self.entries
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&user_key);
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
        throttle.succeeded("A@X");
        throttle.failed("a@x", "s");
        assert!(throttle.check("a@x", "s").is_ok());
        for _ in 0..50 {
            throttle.failed(&format!("{}@x", rand_name()), "s");
        }
        assert!(throttle.check("fresh@x", "s").is_ok());
    }

    fn rand_name() -> String {
        crate::crypto::new_guid()
    }
}
