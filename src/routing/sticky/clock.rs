//! The records' clock: milliseconds since the table started. A record stores this tick in 6
//! bytes rather than an [`Instant`] (16 bytes on Linux).
//!
//! Why milliseconds: expiry is judged to the millisecond, so a short `user_expire` (tests use
//! 2 s) behaves as configured; 48 bits of them last 8,900 years of uptime. Instants before the
//! table's start (a caller's `now` taken just before it was made) count as its start.

use std::time::{Duration, Instant};

/// Converts between instants and ticks.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    start: Instant,
}

impl Clock {
    /// A clock whose tick 0 is now.
    pub fn new() -> Self {
        Clock {
            start: Instant::now(),
        }
    }

    /// The tick of `at`, rounded down to the millisecond.
    pub fn tick(&self, at: Instant) -> u64 {
        let ms = at.saturating_duration_since(self.start).as_millis();
        u64::try_from(ms).unwrap_or(u64::MAX)
    }

    /// The instant of `tick`.
    pub fn instant(&self, tick: u64) -> Instant {
        self.start + Duration::from_millis(tick)
    }
}

impl Default for Clock {
    fn default() -> Self {
        Clock::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_milliseconds_since_the_start() {
        let c = Clock::new();
        let t = c.instant(0);
        assert_eq!(c.tick(t + Duration::from_micros(1999)), 1);
        assert_eq!(c.tick(t + Duration::from_secs(2)), 2000);
        // An instant before the start is the start.
        assert_eq!(
            c.tick(t.checked_sub(Duration::from_secs(1)).unwrap_or(t)),
            0
        );
        assert_eq!(c.instant(2000), t + Duration::from_secs(2));
    }
}
