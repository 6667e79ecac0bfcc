//! Admission control: bounds on the work in progress that costs the most
//! (TLS handshakes, agent session set-ups, enrollments), separate from the
//! connection caps of `conns.rs`, which count connections, not work.
//!
//! When 50,000 agents reconnect at once (the server restarted), every one
//! of them is a connection the caps take; started all together, their
//! handshakes and set-ups would share the CPU and the store so thinly that
//! each one took longer than its peer waits, and most would fail and come
//! back at once. Each kind of work instead goes through a [`Gate`]: at most
//! so many in progress, the rest wait in line (first come, first served)
//! for a short, bounded time, and those still waiting then are turned away
//! with a time to come back ([`Busy::retry_after`]). The times handed out
//! follow a schedule paced at the rate the gate admitted work lately, so a
//! crowd turned away comes back spread over the next seconds rather than
//! all at once again; each is jittered and at most [`MAX_RETRY_AFTER`].
//!
//! A TLS handshake has no channel to carry such a time yet: one still
//! waiting at its deadline is closed (the agent's own backoff applies).
//! Agents' handshakes (announced by ALPN) and everyone else's wait in
//! separate lines, so that a storm of agents doesn't keep API clients out.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::conns::LogLimiter;

/// The longest time to come back the server hands out, by default.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(30);

/// The bounds, as configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// TLS handshakes in progress at once, in each line (agents', others').
    pub tls_handshakes: usize,
    /// Agent session set-ups in progress at once (from the agent's hello
    /// to its pending actions sent).
    pub session_setups: usize,
    /// Enrollments in progress at once.
    pub enrollments: usize,
    /// How long work over its bound waits for a place before it is turned
    /// away.
    pub queue_timeout: Duration,
    /// The longest time to come back handed out (whole seconds, at least 1).
    pub max_retry_after: Duration,
}

impl Settings {
    /// The defaults for a machine with `cores` cores. A TLS handshake holds
    /// its place across its round trips, not only while it computes, so
    /// its bound is well above the cores (measured: 8 per core closed
    /// handshakes of a 5,000-agent burst that 64 per core let in at once,
    /// and the burst took 8 s rather than 6); session set-ups mostly wait
    /// for the store's group commits (a commit carries every write waiting
    /// for it).
    pub fn for_cores(cores: usize) -> Settings {
        let cores = cores.max(1);
        Settings {
            tls_handshakes: 64 * cores,
            session_setups: 64 * cores,
            enrollments: 16 * cores,
            queue_timeout: Duration::from_secs(5),
            max_retry_after: MAX_RETRY_AFTER,
        }
    }
}

impl Default for Settings {
    fn default() -> Settings {
        Settings::for_cores(std::thread::available_parallelism().map_or(1, |n| n.get()))
    }
}

/// The gates of a running server.
pub struct Admission {
    /// TLS handshakes of connections that announced an agent's session.
    pub tls_agents: Arc<Gate>,
    /// TLS handshakes of every other connection.
    pub tls_others: Arc<Gate>,
    pub sessions: Arc<Gate>,
    pub enrollments: Arc<Gate>,
}

impl Admission {
    pub fn new(settings: &Settings) -> Admission {
        let gate = |what, capacity| {
            Gate::new(
                what,
                capacity,
                settings.queue_timeout,
                settings.max_retry_after,
            )
        };
        Admission {
            tls_agents: gate("TLS handshake (agent)", settings.tls_handshakes),
            tls_others: gate("TLS handshake", settings.tls_handshakes),
            sessions: gate("session set-up", settings.session_setups),
            enrollments: gate("enrollment", settings.enrollments),
        }
    }
}

/// Turned away: come back in `retry_after` seconds (1 to the gate's
/// longest, 30 by default).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Busy {
    pub retry_after: u64,
}

/// What a gate holds and has done, for tests and operators.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GateStats {
    pub capacity: usize,
    pub in_progress: usize,
    pub waiting: usize,
    /// Admitted since start.
    pub admitted: u64,
    /// Turned away since start.
    pub turned_away: u64,
}

/// A bound on one kind of work in progress, with a line to wait in.
pub struct Gate {
    what: &'static str,
    places: Arc<Semaphore>,
    capacity: usize,
    wait: Duration,
    max_retry_after: Duration,
    waiting: AtomicUsize,
    admitted: AtomicU64,
    turned_away: AtomicU64,
    pacer: Mutex<Pacer>,
    log: LogLimiter,
}

/// A place in a gate; dropping it gives the place back.
#[derive(Debug)]
pub struct Place(#[allow(dead_code)] OwnedSemaphorePermit);

/// Counts the caller out of the line, however its wait ends (also when
/// the waiting future is dropped: the peer went away).
struct InLine<'a>(&'a AtomicUsize);

impl Drop for InLine<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Gate {
    pub fn new(
        what: &'static str,
        capacity: usize,
        wait: Duration,
        max_retry_after: Duration,
    ) -> Arc<Gate> {
        let capacity = capacity.clamp(1, Semaphore::MAX_PERMITS);
        Arc::new(Gate {
            what,
            places: Arc::new(Semaphore::new(capacity)),
            capacity,
            wait,
            max_retry_after: max_retry_after.max(Duration::from_secs(1)),
            waiting: AtomicUsize::new(0),
            admitted: AtomicU64::new(0),
            turned_away: AtomicU64::new(0),
            pacer: Mutex::new(Pacer::new(Instant::now())),
            log: LogLimiter::new(Duration::from_secs(10)),
        })
    }

    /// What the gate admits, for log lines.
    pub fn what(&self) -> &'static str {
        self.what
    }

    fn pacer(&self) -> std::sync::MutexGuard<'_, Pacer> {
        self.pacer.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn admit(&self, permit: OwnedSemaphorePermit) -> Place {
        self.admitted.fetch_add(1, Ordering::Relaxed);
        self.pacer().record(Instant::now());
        Place(permit)
    }

    /// A place, at once or after waiting in line up to the gate's queue
    /// timeout; past it, [`Busy`] with a time to come back (logged once
    /// every ten seconds with the count held back).
    pub async fn enter(&self) -> Result<Place, Busy> {
        if let Ok(permit) = self.places.clone().try_acquire_owned() {
            return Ok(self.admit(permit));
        }
        self.waiting.fetch_add(1, Ordering::Relaxed);
        let in_line = InLine(&self.waiting);
        let waited = tokio::time::timeout(self.wait, self.places.clone().acquire_owned()).await;
        drop(in_line);
        match waited {
            Ok(Ok(permit)) => Ok(self.admit(permit)),
            // Timed out (the semaphore is never closed).
            _ => {
                let busy = self.turn_away();
                if let Some(suppressed) = self.log.allow("turned away") {
                    let stats = self.stats();
                    tracing::warn!(
                        work = self.what,
                        in_progress = stats.in_progress,
                        waiting = stats.waiting,
                        turned_away = stats.turned_away,
                        retry_after = busy.retry_after,
                        suppressed,
                        "turned away: the server has as much of this work in progress as it takes"
                    );
                }
                Err(busy)
            }
        }
    }

    /// Counts one caller turned away and gives it its time to come back.
    pub fn turn_away(&self) -> Busy {
        self.turned_away.fetch_add(1, Ordering::Relaxed);
        self.retry_hint()
    }

    /// The next time to come back on the gate's schedule, without
    /// counting a refusal (for callers refused for another reason, such as
    /// a full share of connections).
    pub fn retry_hint(&self) -> Busy {
        let waiting = self.waiting.load(Ordering::Relaxed);
        let jitter = random_fraction();
        Busy {
            retry_after: self.pacer().retry_after(
                Instant::now(),
                waiting,
                self.wait,
                self.max_retry_after,
                jitter,
            ),
        }
    }

    pub fn stats(&self) -> GateStats {
        GateStats {
            capacity: self.capacity,
            in_progress: self.capacity - self.places.available_permits(),
            waiting: self.waiting.load(Ordering::Relaxed),
            admitted: self.admitted.load(Ordering::Relaxed),
            turned_away: self.turned_away.load(Ordering::Relaxed),
        }
    }
}

/// A uniform random number in [0, 1).
fn random_fraction() -> f64 {
    let bytes = crate::crypto::random_bytes::<8>();
    (u64::from_le_bytes(bytes) >> 11) as f64 / (1u64 << 53) as f64
}

/// Seconds of admissions the rate is measured over.
const WINDOW: u64 = 5;
/// The rate assumed at least, admissions a second, so that a gate that
/// admitted nothing lately still spreads its crowd over the longest wait.
const MIN_RATE: f64 = 1.0;
/// The share of the measured rate promised to callers turned away; the
/// rest is left for newcomers.
const RETURN_SHARE: f64 = 0.75;

/// Admissions per second lately, and the schedule of promised returns.
struct Pacer {
    started: Instant,
    /// Admissions in each of the last seconds: (second since start, count).
    seconds: [(u64, u64); WINDOW as usize + 1],
    /// When the next caller turned away is asked to come back, at the
    /// earliest.
    next_return: Instant,
}

impl Pacer {
    fn new(now: Instant) -> Pacer {
        Pacer {
            started: now,
            seconds: [(u64::MAX, 0); WINDOW as usize + 1],
            next_return: now,
        }
    }

    fn second(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.started).as_secs()
    }

    fn record(&mut self, now: Instant) {
        let second = self.second(now);
        let bucket = &mut self.seconds[(second % (WINDOW + 1)) as usize];
        if bucket.0 != second {
            *bucket = (second, 0);
        }
        bucket.1 += 1;
    }

    /// Admissions per second over the last [`WINDOW`] seconds (fewer just
    /// after start).
    fn rate(&self, now: Instant) -> f64 {
        let second = self.second(now);
        let count: u64 = self
            .seconds
            .iter()
            .filter(|(s, _)| *s != u64::MAX && *s + WINDOW >= second && *s <= second)
            .map(|(_, n)| n)
            .sum();
        // The window: WINDOW whole seconds and the current one's part.
        let elapsed = now.saturating_duration_since(self.started).as_secs_f64();
        let span = elapsed.min(WINDOW as f64 + elapsed.fract()).max(0.25);
        count as f64 / span
    }

    /// Seconds until the next return on the schedule (1 to `max`), which
    /// it then moves on: the callers waiting in line go first (for as long
    /// as they may wait, `queue_timeout`: those still waiting then are
    /// turned away and get places on the schedule themselves), and returns
    /// are spaced at [`RETURN_SHARE`] of the measured rate. Beyond `max`
    /// the caller gets a random time in its second half and the schedule
    /// stays (it will be turned away again and placed then). `jitter` is a
    /// random number in [0, 1): up to a second more.
    fn retry_after(
        &mut self,
        now: Instant,
        waiting: usize,
        queue_timeout: Duration,
        max: Duration,
        jitter: f64,
    ) -> u64 {
        let rate = self.rate(now).max(MIN_RATE);
        let line = Duration::from_secs_f64(waiting as f64 / rate).min(queue_timeout);
        let queue_clears = now + line;
        let slot = self.next_return.max(queue_clears);
        let ahead = slot.saturating_duration_since(now);
        let max_secs = max.as_secs().max(1);
        if ahead >= max {
            let half = max_secs.div_ceil(2);
            return half + ((max_secs - half + 1) as f64 * jitter) as u64;
        }
        self.next_return = slot + Duration::from_secs_f64(1.0 / (rate * RETURN_SHARE));
        ((ahead.as_secs_f64() + jitter).ceil() as u64).clamp(1, max_secs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The queue timeout of these tests.
    const WAIT: Duration = Duration::from_secs(5);

    #[test]
    fn a_crowd_turned_away_is_spread_at_the_admission_rate() {
        let start = Instant::now();
        let mut pacer = Pacer::new(start);
        // 1,000 admissions a second for five seconds.
        for ms in 0..5_000u64 {
            pacer.record(start + Duration::from_millis(ms));
        }
        let now = start + Duration::from_millis(5_000);
        let rate = pacer.rate(now);
        assert!((900.0..=1_100.0).contains(&rate), "{rate}");
        // 10,000 turned away at once come back over about 13 s (at 3/4 of
        // the rate), no second getting more than its share.
        let hints: Vec<u64> = (0..10_000)
            .map(|i| pacer.retry_after(now, 0, WAIT, MAX_RETRY_AFTER, (i % 10) as f64 / 10.0))
            .collect();
        assert!(hints.iter().all(|h| (1..=30).contains(h)), "in range");
        let latest = *hints.iter().max().unwrap();
        assert!((13..=15).contains(&latest), "{latest}");
        let mut per_second = [0usize; 31];
        for h in &hints {
            per_second[*h as usize] += 1;
        }
        assert!(per_second.iter().all(|n| *n <= 800), "{per_second:?}");
        // The queue still waiting goes first: with 2,000 in line (2 s of
        // work), the first hint after a fresh schedule is beyond them…
        let fresh = || {
            let mut pacer = Pacer::new(start);
            for ms in 0..5_000u64 {
                pacer.record(start + Duration::from_millis(ms));
            }
            pacer
        };
        let first = fresh().retry_after(now, 2_000, WAIT, MAX_RETRY_AFTER, 0.0);
        assert_eq!(first, 2);
        // …but only for as long as they may wait: 20,000 in line are not
        // all served from it (most will be turned away and scheduled then).
        let first = fresh().retry_after(now, 20_000, WAIT, MAX_RETRY_AFTER, 0.0);
        assert_eq!(first, 5);
    }

    #[test]
    fn beyond_the_longest_wait_the_hints_are_random_in_its_second_half() {
        let start = Instant::now();
        let mut pacer = Pacer::new(start);
        // Nothing admitted: the minimum rate, one a second.
        let hints: Vec<u64> = (0..200)
            .map(|i| pacer.retry_after(start, 0, WAIT, MAX_RETRY_AFTER, (i % 100) as f64 / 100.0))
            .collect();
        assert!(hints.iter().all(|h| (1..=30).contains(h)), "{hints:?}");
        let late = &hints[40..];
        assert!(late.iter().all(|h| *h >= 15), "{late:?}");
        assert!(late.iter().any(|h| *h != late[0]), "jittered");
        // Once time passes, the schedule is near again.
        let later = start + Duration::from_secs(60);
        assert!(pacer.retry_after(later, 0, WAIT, MAX_RETRY_AFTER, 0.0) <= 1);
    }

    #[tokio::test]
    async fn work_over_the_bound_waits_then_is_turned_away() {
        let gate = Gate::new("test", 2, Duration::from_millis(100), MAX_RETRY_AFTER);
        let first = gate.enter().await.unwrap();
        let _second = gate.enter().await.unwrap();
        // A place given back within the wait is taken by the next in line.
        let waiter = tokio::spawn({
            let gate = gate.clone();
            async move { gate.enter().await.map(|_| ()) }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(gate.stats().waiting, 1);
        drop(first);
        assert_eq!(waiter.await.unwrap(), Ok(()));
        // With no place given back, the wait ends in a refusal with a time.
        let _third = gate.enter().await.unwrap();
        let busy = gate.enter().await.unwrap_err();
        assert!((1..=30).contains(&busy.retry_after), "{busy:?}");
        let stats = gate.stats();
        assert_eq!(
            (
                stats.in_progress,
                stats.waiting,
                stats.admitted,
                stats.turned_away
            ),
            (2, 0, 4, 1)
        );
    }
}
