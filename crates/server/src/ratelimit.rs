//! Per-caller, per-endpoint rate limits: so many calls a minute and an hour.
//!
//! Fixed windows that start at a caller's first call: simple to reason
//! about, and `Retry-After` is exactly the time until the window that is
//! full ends. A refused call does not count.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

pub struct RateLimiter {
    per_minute: u32,
    per_hour: u32,
    windows: Mutex<HashMap<(String, String), Windows>>,
}

#[derive(Clone, Copy)]
struct Window {
    start: Instant,
    count: u32,
}

struct Windows {
    minute: Window,
    hour: Window,
}

impl Window {
    /// Counts one call unless the window is full; `Err(seconds to wait)`.
    fn admit(&mut self, now: Instant, length: Duration, limit: u32) -> Result<(), u64> {
        if limit == 0 {
            return Ok(());
        }
        if now.duration_since(self.start) >= length {
            *self = Window {
                start: now,
                count: 0,
            };
        }
        if self.count >= limit {
            let left = length.saturating_sub(now.duration_since(self.start));
            return Err(left.as_secs_f64().ceil().max(1.0) as u64);
        }
        Ok(())
    }
}

impl RateLimiter {
    /// `0` turns a limit off.
    pub fn new(per_minute: u32, per_hour: u32) -> RateLimiter {
        RateLimiter {
            per_minute,
            per_hour,
            windows: Mutex::new(HashMap::new()),
        }
    }

    /// Admits one call of `caller` to `endpoint`, or says how many seconds
    /// to wait.
    pub fn check(&self, caller: &str, endpoint: &str) -> Result<(), u64> {
        if self.per_minute == 0 && self.per_hour == 0 {
            return Ok(());
        }
        let now = Instant::now();
        let mut windows = self.windows.lock().expect("rate limiter lock");
        if windows.len() > 100_000 {
            // Forget callers whose hour is over, so the map can't grow without bound.
            windows.retain(|_, w| now.duration_since(w.hour.start) < Duration::from_secs(3600));
        }
        let entry = windows
            .entry((caller.to_owned(), endpoint.to_owned()))
            .or_insert(Windows {
                minute: Window {
                    start: now,
                    count: 0,
                },
                hour: Window {
                    start: now,
                    count: 0,
                },
            });
        let (mut minute, mut hour) = (entry.minute, entry.hour);
        minute.admit(now, Duration::from_secs(60), self.per_minute)?;
        hour.admit(now, Duration::from_secs(3600), self.per_hour)?;
        minute.count += 1;
        hour.count += 1;
        entry.minute = minute;
        entry.hour = hour;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_each_caller_and_endpoint_separately() {
        let limiter = RateLimiter::new(3, 5);
        for _ in 0..3 {
            assert!(limiter.check("a", "GET /x").is_ok());
        }
        let wait = limiter.check("a", "GET /x").unwrap_err();
        assert!((1..=60).contains(&wait), "{wait}");
        assert!(limiter.check("a", "GET /y").is_ok());
        assert!(limiter.check("b", "GET /x").is_ok());
    }

    #[test]
    fn zero_turns_a_limit_off() {
        let limiter = RateLimiter::new(0, 2);
        assert!(limiter.check("a", "e").is_ok());
        assert!(limiter.check("a", "e").is_ok());
        assert!(limiter.check("a", "e").unwrap_err() > 60, "hour window");
        let off = RateLimiter::new(0, 0);
        for _ in 0..1000 {
            assert!(off.check("a", "e").is_ok());
        }
    }
}
