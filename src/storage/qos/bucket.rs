//! [`CreditBucket`]: the one rate limiter used for every QoS limit (Firecracker's `TokenBucket`
//! is the model).
//!
//! Credits are kept in nano-units (10^-9 of a unit) and time in nanoseconds, so a refill is the
//! exact integer `elapsed_ns * rate`: a bucket of 1234 units/s yields exactly 12340 units in
//! 10 s, with no rounding of the rate (SPDK rounds IOPS limits to multiples of 1000; this does
//! not).
//!
//! A request larger than the depth can never find that many credits, so it is let through when
//! the bucket is full and the bucket goes into debt (negative credits), which the refill pays back
//! before anything else passes. The long-run rate stays exact for any request size.

use super::clock::NS_PER_SEC;

const NANO: i128 = NS_PER_SEC as i128;

/// A credit (token) bucket: `rate` units per second, holding at most `depth` units.
#[derive(Debug, Clone)]
pub struct CreditBucket {
    rate: u64,
    depth: u64,
    /// Nano-units; negative while paying back an over-depth request.
    credits: i128,
    /// Time of the last refill.
    last_ns: u64,
}

impl CreditBucket {
    /// A full bucket refilling at `rate` units/s up to `depth` units. A rate of 0 never refills
    /// (use `Option<CreditBucket>` for "unlimited").
    pub fn new(rate: u64, depth: u64, now: u64) -> Self {
        CreditBucket {
            rate,
            depth,
            credits: i128::from(depth) * NANO,
            last_ns: now,
        }
    }

    /// An empty bucket (nothing passes until it has refilled).
    pub fn new_empty(rate: u64, depth: u64, now: u64) -> Self {
        CreditBucket {
            rate,
            depth,
            credits: 0,
            last_ns: now,
        }
    }

    /// Refill rate, units per second.
    pub fn rate(&self) -> u64 {
        self.rate
    }

    /// Depth (burst), units.
    pub fn depth(&self) -> u64 {
        self.depth
    }

    /// Adds the credits earned since the last refill, up to the depth.
    #[inline]
    pub fn refill(&mut self, now: u64) {
        let dt = now.saturating_sub(self.last_ns);
        if dt == 0 {
            return;
        }
        self.last_ns = now;
        let full = i128::from(self.depth) * NANO;
        if self.credits < full {
            let earned = i128::from(dt) * i128::from(self.rate);
            self.credits = (self.credits + earned).min(full);
        }
    }

    /// Whether `n` units may be taken now (call [`CreditBucket::refill`] first): the bucket holds
    /// `n`, or `n` exceeds the depth and the bucket is full. An empty bucket passes nothing, so
    /// a depth-0 bucket (a zero device share) blocks everything but zero-sized requests.
    #[inline]
    pub fn can_consume(&self, n: u64) -> bool {
        n == 0 || (self.credits > 0 && self.credits >= i128::from(n.min(self.depth)) * NANO)
    }

    /// Takes `n` units unconditionally (may go into debt). Pair with [`CreditBucket::can_consume`]
    /// when several buckets must all agree before any is charged.
    #[inline]
    pub fn consume(&mut self, n: u64) {
        self.credits -= i128::from(n) * NANO;
    }

    /// Refills, then takes `n` units if allowed. Returns whether it did.
    #[inline]
    pub fn try_consume(&mut self, n: u64, now: u64) -> bool {
        self.refill(now);
        let ok = self.can_consume(n);
        if ok {
            self.consume(n);
        }
        ok
    }

    /// Whole units available now (after the last refill); negative while in debt.
    pub fn available(&self) -> i64 {
        i64::try_from(self.credits.div_euclid(NANO)).unwrap_or(if self.credits < 0 {
            i64::MIN
        } else {
            i64::MAX
        })
    }

    /// Available credit in nano-units, clamped at 0 (for estimates).
    pub fn available_nano(&self) -> u128 {
        u128::try_from(self.credits).unwrap_or(0)
    }

    /// Nanoseconds from `now` until `n` units may be taken (`u64::MAX` if never).
    pub fn wait_ns(&self, n: u64, now: u64) -> u64 {
        let earned = i128::from(now.saturating_sub(self.last_ns)) * i128::from(self.rate);
        let have = (self.credits + earned).min(i128::from(self.depth) * NANO);
        if n == 0 {
            return 0;
        }
        // As in `can_consume`: the credit must also be positive.
        let need = (i128::from(n.min(self.depth)) * NANO).max(1) - have;
        if need <= 0 {
            return 0;
        }
        if self.rate == 0 || self.depth == 0 {
            return u64::MAX;
        }
        let rate = i128::from(self.rate);
        u64::try_from((need + rate - 1) / rate).unwrap_or(u64::MAX)
    }

    /// Changes rate and depth from `now` on: credits earned so far at the old rate are kept (up to
    /// the new depth), so a change never grants or loses more than the old bucket held.
    pub fn set_rate(&mut self, rate: u64, depth: u64, now: u64) {
        self.refill(now);
        self.last_ns = self.last_ns.max(now);
        self.rate = rate;
        self.depth = depth;
        self.credits = self.credits.min(i128::from(depth) * NANO);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const S: u64 = NS_PER_SEC;

    #[test]
    fn exact_rate_without_rounding() {
        // Empty at 0, polled every 10 µs: over 10 s, take one unit whenever possible. (Depth 2 so
        // credit earned between a unit becoming available and the next poll is not clipped.)
        let mut b = CreditBucket::new_empty(1234, 2, 0);
        let mut taken = 0u64;
        let mut t = 0;
        while t <= 10 * S {
            while b.try_consume(1, t) {
                taken += 1;
            }
            t += 10_000;
        }
        assert_eq!(taken, 12_340);
    }

    #[test]
    fn burst_then_rate() {
        let mut b = CreditBucket::new(1000, 50, 0);
        let mut n = 0;
        while b.try_consume(1, 0) {
            n += 1;
        }
        assert_eq!(n, 50);
        assert!(!b.try_consume(1, 999_999));
        assert!(b.try_consume(1, 1_000_000));
        assert_eq!(b.wait_ns(1, 1_000_000), 1_000_000);
        assert_eq!(b.wait_ns(1, 1_999_999), 1);
        assert_eq!(b.wait_ns(1, 2_000_000), 0);
    }

    #[test]
    fn oversized_request_passes_when_full_and_is_paid_back() {
        let mut b = CreditBucket::new(100, 10, 0);
        assert!(b.try_consume(30, 0));
        assert_eq!(b.available(), -20);
        // Needs 20 units of debt + 1 unit back: 210 ms.
        assert!(!b.try_consume(1, 209_999_999));
        assert!(b.try_consume(1, 210_000_000));
    }

    #[test]
    fn rate_change_keeps_earned_credit_clamped_to_new_depth() {
        let mut b = CreditBucket::new_empty(1000, 100, 0);
        b.set_rate(10, 5, S / 10); // earned 100 at the old rate, clamped to 5
        assert_eq!(b.available(), 5);
        b.set_rate(1_000_000, 1_000_000, S / 10);
        b.refill(S / 10 + 1000);
        assert_eq!(b.available(), 6);
    }

    #[test]
    fn zero_depth_or_rate_blocks() {
        let b = CreditBucket::new(0, 0, 0);
        assert!(!b.can_consume(1));
        assert!(b.can_consume(0));
        let mut b = CreditBucket::new(1000, 0, 0);
        assert!(!b.try_consume(1, S));
        assert_eq!(b.wait_ns(1, S), u64::MAX);
    }

    #[test]
    fn zero_rate_never_refills() {
        let mut b = CreditBucket::new(0, 2, 0);
        assert!(b.try_consume(2, 0));
        assert!(!b.try_consume(1, u64::MAX));
        assert_eq!(b.wait_ns(1, 5), u64::MAX);
    }

    proptest! {
        /// Whatever the request pattern, what passes by time t is at most
        /// depth + rate*t + (the one oversized request that may put it in debt).
        #[test]
        fn never_exceeds_depth_plus_rate(rate in 1u64..1_000_000, depth in 0u64..10_000,
                                         reqs in proptest::collection::vec((0u64..5_000_000, 1u64..20_000), 1..200)) {
            let mut b = CreditBucket::new(rate, depth, 0);
            let mut t = 0u64;
            let mut passed: u128 = 0;
            let mut largest: u128 = 0;
            for (dt, n) in reqs {
                t += dt;
                if b.try_consume(n, t) {
                    passed += u128::from(n);
                    largest = largest.max(u128::from(n));
                }
                let bound = u128::from(depth) + u128::from(rate) * u128::from(t) / u128::from(S) + 1;
                prop_assert!(passed <= bound + largest, "passed {} bound {}", passed, bound);
            }
        }
    }
}
