//! When to try the server again: exponential backoff with full jitter,
//! and never sooner than the server asked.
//!
//! A server with as much set-up work in progress as it takes turns agents
//! away with a time to come back (`retryAfterSeconds` in a session's
//! `refused`, `Retry-After` on an enrollment's 503 or 429), which it
//! spreads over the crowd. The agent waits at least that long, plus a
//! random part of up to a quarter of it so that the agents told the same
//! second don't all come back in the same instant. Such a refusal is
//! expected under load: it doesn't count as a failed attempt (the backoff
//! doesn't grow), and the agent never gives up over it.
//!
//! Public so that simulated agents (a fleet benchmark's) follow the same
//! policy as the real one.

use std::time::Duration;

use aws_lc_rs::rand::{SecureRandom, SystemRandom};

/// The first attempt's backoff ceiling; it doubles with each failed attempt.
pub const BASE: Duration = Duration::from_millis(500);
/// The longest wait a server's hint is honoured up to (a hint beyond is
/// taken as this).
pub const MAX_HINT: Duration = Duration::from_secs(600);
/// The random part added to a server's hint, as a share of the hint.
pub const HINT_JITTER: f64 = 0.25;

/// The agent's retry policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Longest backoff of the agent's own (`--max-backoff`).
    pub max_backoff: Duration,
}

impl Default for RetryPolicy {
    /// The agent's default, a backoff of at most 60 seconds.
    fn default() -> RetryPolicy {
        RetryPolicy {
            max_backoff: Duration::from_secs(60),
        }
    }
}

impl RetryPolicy {
    pub fn new(max_backoff: Duration) -> RetryPolicy {
        RetryPolicy { max_backoff }
    }

    /// Exponential backoff with full jitter after `attempt` failed
    /// attempts in a row (0: the first retry): a random wait in
    /// [0, min(max_backoff, 500 ms · 2^attempt)].
    pub fn backoff(&self, attempt: u32) -> Duration {
        let ceiling = BASE
            .saturating_mul(1u32 << attempt.min(16))
            .min(self.max_backoff);
        ceiling.mul_f64(random_fraction())
    }

    /// How long to wait before the next attempt: the backoff, or, when the
    /// server said when to come back, that time plus a random part of up
    /// to a quarter of it, if longer. Never shorter than the hint (capped
    /// at [`MAX_HINT`]).
    pub fn next_wait(&self, attempt: u32, server_hint: Option<Duration>) -> Duration {
        let backoff = self.backoff(attempt);
        match server_hint {
            Some(hint) => {
                let hint = hint.min(MAX_HINT);
                backoff.max(hint + hint.mul_f64(HINT_JITTER * random_fraction()))
            }
            None => backoff,
        }
    }
}

/// What a failed attempt to open a session means for the next one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterFailure {
    /// The server no longer accepts this machine (revoked, or unknown):
    /// trying again is pointless.
    GiveUp,
    /// The server is busy and said when to come back: no failure of the
    /// agent's, the backoff doesn't grow.
    Busy(Duration),
    /// Anything else (unreachable, TLS, a refusal without a time): the
    /// backoff grows.
    Failed,
}

impl AfterFailure {
    /// Reads the error [`crate::Session::open`] returned.
    pub fn of(error: &anyhow::Error) -> AfterFailure {
        match error.downcast_ref::<crate::session::Refused>() {
            Some(refused) if refused.is_final() => AfterFailure::GiveUp,
            Some(crate::session::Refused {
                retry_after: Some(wait),
                ..
            }) => AfterFailure::Busy(*wait),
            _ => AfterFailure::Failed,
        }
    }
}

/// An agent's reconnection state: the failed attempts in a row, and the
/// policy that turns them (and the server's hints) into waits.
#[derive(Debug, Clone)]
pub struct Reconnect {
    pub policy: RetryPolicy,
    attempt: u32,
}

impl Reconnect {
    pub fn new(policy: RetryPolicy) -> Reconnect {
        Reconnect { policy, attempt: 0 }
    }

    /// Failed attempts in a row so far (refusals of a busy server excepted).
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// A session opened: the next failure starts from the shortest backoff.
    pub fn connected(&mut self) {
        self.attempt = 0;
    }

    /// How long to wait after an attempt that ended with `server_hint`
    /// (`Some`: the server was busy and said when to come back, which
    /// doesn't grow the backoff; `None`: a failure, which does).
    pub fn next_wait(&mut self, server_hint: Option<Duration>) -> Duration {
        let wait = self.policy.next_wait(self.attempt, server_hint);
        if server_hint.is_none() {
            self.attempt = self.attempt.saturating_add(1);
        }
        wait
    }
}

/// [`RetryPolicy::next_wait`] of the default policy.
pub fn next_wait(attempt: u32, server_hint: Option<Duration>) -> Duration {
    RetryPolicy::default().next_wait(attempt, server_hint)
}

/// A `Retry-After` header's value in seconds (the HTTP-date form is not
/// used by Cordon and is ignored).
pub fn parse_retry_after(value: &str) -> Option<Duration> {
    value.trim().parse::<u64>().ok().map(Duration::from_secs)
}

/// A uniform random number in [0, 1).
fn random_fraction() -> f64 {
    let mut bytes = [0u8; 8];
    let _ = SystemRandom::new().fill(&mut bytes);
    (u64::from_le_bytes(bytes) >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_has_full_jitter_under_an_exponential_cap() {
        let policy = RetryPolicy::new(Duration::from_secs(60));
        for attempt in 0..20 {
            let ceiling = BASE
                .saturating_mul(1u32 << attempt.min(16))
                .min(policy.max_backoff);
            let waits: Vec<Duration> = (0..50).map(|_| policy.backoff(attempt)).collect();
            assert!(waits.iter().all(|w| *w <= ceiling), "attempt {attempt}");
            assert!(waits.iter().any(|w| *w != waits[0]), "jittered");
        }
    }

    #[test]
    fn a_servers_hint_is_never_cut_short_and_is_jittered() {
        let policy = RetryPolicy::new(Duration::from_secs(60));
        let hint = Duration::from_secs(8);
        // Early attempts: the backoff (at most 0.5 s, 1 s) is shorter, so
        // the hint rules, with up to a quarter more.
        for attempt in 0..2 {
            let waits: Vec<Duration> = (0..200)
                .map(|_| policy.next_wait(attempt, Some(hint)))
                .collect();
            assert!(waits.iter().all(|w| *w >= hint), "{waits:?}");
            assert!(
                waits.iter().all(|w| *w <= hint + hint / 4),
                "at most a quarter more: {waits:?}"
            );
            assert!(waits.iter().any(|w| *w != waits[0]), "jittered");
            let spread = *waits.iter().max().unwrap() - *waits.iter().min().unwrap();
            assert!(spread >= Duration::from_millis(500), "spread {spread:?}");
        }
        // A backoff grown longer than the hint wins.
        let long = RetryPolicy::new(Duration::from_secs(600));
        assert!(
            (0..200)
                .any(|_| long.next_wait(16, Some(Duration::from_secs(1))) > Duration::from_secs(2))
        );
        // A hint beyond the cap is taken as the cap.
        let huge = policy.next_wait(0, Some(Duration::from_secs(86_400)));
        assert!(
            huge >= MAX_HINT && huge <= MAX_HINT + MAX_HINT / 4,
            "{huge:?}"
        );
        // No hint: the plain backoff.
        assert!(policy.next_wait(0, None) <= BASE);
        assert!(next_wait(0, Some(Duration::ZERO)) <= BASE);
    }

    #[test]
    fn a_busy_server_never_grows_the_backoff_nor_makes_the_agent_give_up() {
        use crate::session::Refused;
        let refusal = |code: &str, retry_after: Option<u64>| {
            anyhow::Error::from(Refused {
                code: code.into(),
                reason: "r".into(),
                retry_after: retry_after.map(Duration::from_secs),
            })
            .context("cannot open a session")
        };
        assert_eq!(
            AfterFailure::of(&refusal("Unavailable", Some(4))),
            AfterFailure::Busy(Duration::from_secs(4))
        );
        assert_eq!(
            AfterFailure::of(&refusal("Revoked", None)),
            AfterFailure::GiveUp
        );
        assert_eq!(
            AfterFailure::of(&refusal("UnknownMachine", None)),
            AfterFailure::GiveUp
        );
        assert_eq!(
            AfterFailure::of(&refusal("InvalidProof", None)),
            AfterFailure::Failed
        );
        assert_eq!(
            AfterFailure::of(&anyhow::anyhow!("TLS handshake failed")),
            AfterFailure::Failed
        );

        let mut reconnect = Reconnect::new(RetryPolicy::new(Duration::from_secs(60)));
        for _ in 0..3 {
            reconnect.next_wait(None);
        }
        assert_eq!(reconnect.attempt(), 3);
        // A hundred refusals of a busy server: each wait at least the hint,
        // and the failures counted stay where they were.
        for _ in 0..100 {
            let wait = reconnect.next_wait(Some(Duration::from_secs(2)));
            assert!(wait >= Duration::from_secs(2), "{wait:?}");
            assert!(wait <= Duration::from_secs(4), "{wait:?}");
        }
        assert_eq!(reconnect.attempt(), 3);
        reconnect.connected();
        assert_eq!(reconnect.attempt(), 0);
        assert!(reconnect.next_wait(None) <= BASE);
    }

    #[test]
    fn retry_after_is_read_in_seconds() {
        assert_eq!(parse_retry_after(" 7 "), Some(Duration::from_secs(7)));
        assert_eq!(parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"), None);
        assert_eq!(parse_retry_after("-1"), None);
    }
}
