//! Time for the QoS code: `u64` nanoseconds from an injectable [`Clock`], and the slice timer.
//!
//! Every QoS type takes `now` as an argument instead of reading a clock itself, so the same code
//! runs on a reactor (which reads its clock once per loop iteration) and in simulations (which
//! advance a [`ManualClock`]).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// Nanoseconds per second.
pub const NS_PER_SEC: u64 = 1_000_000_000;

/// A source of monotonic time in nanoseconds (the origin is arbitrary but fixed).
pub trait Clock {
    /// Nanoseconds since the clock's origin; never decreases.
    fn now_ns(&self) -> u64;
}

impl<C: Clock + ?Sized> Clock for &C {
    fn now_ns(&self) -> u64 {
        (**self).now_ns()
    }
}

impl<C: Clock + ?Sized> Clock for std::sync::Arc<C> {
    fn now_ns(&self) -> u64 {
        (**self).now_ns()
    }
}

/// The real clock: `std::time::Instant` (CLOCK_MONOTONIC) since construction.
#[derive(Debug, Clone, Copy)]
pub struct MonotonicClock {
    origin: Instant,
}

impl MonotonicClock {
    /// A clock whose origin is now.
    pub fn new() -> Self {
        MonotonicClock {
            origin: Instant::now(),
        }
    }
}

impl Default for MonotonicClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for MonotonicClock {
    fn now_ns(&self) -> u64 {
        u64::try_from(self.origin.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }
}

/// A simulated clock that moves only when told to. Shareable between threads (`Sync`).
#[derive(Debug, Default)]
pub struct ManualClock {
    now: AtomicU64,
}

impl ManualClock {
    /// A clock reading `start_ns`.
    pub fn new(start_ns: u64) -> Self {
        ManualClock {
            now: AtomicU64::new(start_ns),
        }
    }

    /// Moves the clock to `ns` (ignored if that would move it backwards).
    pub fn set(&self, ns: u64) {
        self.now.fetch_max(ns, Ordering::Relaxed);
    }

    /// Moves the clock forward by `ns`.
    pub fn advance(&self, ns: u64) {
        let _ = self
            .now
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |t| {
                Some(t.saturating_add(ns))
            });
    }
}

impl Clock for ManualClock {
    fn now_ns(&self) -> u64 {
        self.now.load(Ordering::Relaxed)
    }
}

/// Fires once per slice: [`SliceTimer::due`] is true on the first call at or after each boundary.
/// Boundaries missed entirely (a stalled reactor) are skipped, not replayed.
#[derive(Debug, Clone, Copy)]
pub struct SliceTimer {
    slice_ns: u64,
    next_ns: u64,
}

impl SliceTimer {
    /// A timer with period `slice_ns` (at least 1) whose first boundary is `now + slice_ns`.
    pub fn new(slice_ns: u64, now: u64) -> Self {
        let slice_ns = slice_ns.max(1);
        SliceTimer {
            slice_ns,
            next_ns: now.saturating_add(slice_ns),
        }
    }

    /// Whether a boundary has passed since the last time this returned true.
    #[inline]
    pub fn due(&mut self, now: u64) -> bool {
        if now < self.next_ns {
            return false;
        }
        let missed = (now - self.next_ns) / self.slice_ns;
        self.next_ns = self
            .next_ns
            .saturating_add((missed + 1).saturating_mul(self.slice_ns));
        true
    }

    /// The next boundary.
    pub fn next_ns(&self) -> u64 {
        self.next_ns
    }

    /// The period.
    pub fn slice_ns(&self) -> u64 {
        self.slice_ns
    }

    /// Changes the period; the next boundary moves to `now + slice_ns`.
    pub fn set_slice(&mut self, slice_ns: u64, now: u64) {
        *self = SliceTimer::new(slice_ns, now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manual_clock_moves_only_forward() {
        let c = ManualClock::new(10);
        c.advance(5);
        assert_eq!(c.now_ns(), 15);
        c.set(3);
        assert_eq!(c.now_ns(), 15);
        c.set(100);
        assert_eq!(Clock::now_ns(&&c), 100); // via the blanket impl for &C
    }

    #[test]
    fn monotonic_clock_does_not_go_back() {
        let c = MonotonicClock::new();
        let a = c.now_ns();
        assert!(c.now_ns() >= a);
    }

    #[test]
    fn slice_timer_fires_once_per_boundary_and_skips_missed_ones() {
        let mut t = SliceTimer::new(1000, 0);
        assert!(!t.due(999));
        assert!(t.due(1000));
        assert!(!t.due(1999));
        assert!(t.due(5500));
        assert_eq!(t.next_ns(), 6000);
        assert!(!t.due(5999));
    }
}
