//! [`DiskQos`]: one virtual disk's limits, its FIFO queue and its share of the device.
//!
//! Owned by the reactor that owns the disk; nothing in here is shared or locked. An IO is
//! charged to every bucket it draws from (IOPS; read+write bytes; read or write bytes; device
//! time) and proceeds only if all of them have credit; otherwise it waits, in arrival order,
//! and comes out of a later [`DiskQos::poll`]. QoS never fails an IO.

use super::alloc::{DemandReport, Grant};
use super::bucket::CreditBucket;
use super::class::MAX_WEIGHT;
use super::clock::NS_PER_SEC;
use super::limits::{DiskLimits, Limit, Reservation};
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;

/// How an IO is charged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QosOp {
    /// Draws IOPS, read+write bytes and read bytes.
    Read,
    /// Draws IOPS, read+write bytes and write bytes.
    Write,
    /// Flush, unmap, write-zeroes...: draws IOPS only (and one IO of device time).
    Other,
}

/// What the QoS layer needs to know about a request. The storage layer implements it for its
/// request type.
pub trait QosIo {
    /// How the request is charged.
    fn qos_op(&self) -> QosOp;
    /// Bytes moved (ignored for [`QosOp::Other`]).
    fn qos_bytes(&self) -> u64;
}

/// The result of [`DiskQos::submit`].
#[derive(Debug, PartialEq, Eq)]
#[must_use = "a Proceed(io) must be sent to the device"]
pub enum Admission<T> {
    /// Send it to the device now.
    Proceed(T),
    /// Held in the disk's queue; a later `poll` releases it.
    Queued,
}

/// A disk's QoS settings, as the control plane sets them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskQosConfig {
    /// The quota.
    #[serde(default)]
    pub limits: DiskLimits,
    /// Class weight, 1..=[`MAX_WEIGHT`] (normally from a [`super::ClassTable`]).
    pub weight: u32,
    /// Minimum device time.
    #[serde(default)]
    pub reservation: Reservation,
}

impl Default for DiskQosConfig {
    fn default() -> Self {
        DiskQosConfig {
            limits: DiskLimits::UNLIMITED,
            weight: 1,
            reservation: Reservation::default(),
        }
    }
}

/// Why a disk configuration was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// Weight 0 or above [`MAX_WEIGHT`].
    #[error("weight {0} not in 1..={MAX_WEIGHT}")]
    Weight(u32),
}

/// Counters and estimates of one disk, for the read-side RPC.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct DiskQosStats {
    /// IOs submitted.
    pub submitted_ios: u64,
    /// IOs released to the device.
    pub released_ios: u64,
    /// Bytes released.
    pub released_bytes: u64,
    /// Read bytes released.
    pub released_read_bytes: u64,
    /// Write bytes released.
    pub released_write_bytes: u64,
    /// IOs waiting now.
    pub queued_ios: u64,
    /// Bytes waiting now.
    pub queued_bytes: u64,
    /// Released IOs per second (smoothed over recent slices).
    pub achieved_ios_per_sec: f64,
    /// Released bytes per second (smoothed over recent slices).
    pub achieved_bytes_per_sec: f64,
    /// Device share of the current slice, picoseconds per second (`None` = not shared).
    pub share: Option<u64>,
}

/// Weight of the newest slice in the moving averages.
const EWMA_ALPHA: f64 = 0.25;
/// IO size assumed before a disk has done any IO (for converting an IOPS reservation).
const DEFAULT_IO_BYTES: f64 = 4096.0;

/// Usage vector: IOs, bytes, read bytes, write bytes, device picoseconds.
type Usage = [u64; 5];
const IOS: usize = 0;
const BYTES: usize = 1;
const RBYTES: usize = 2;
const WBYTES: usize = 3;
/// The device-time bucket; the other indices are the limit buckets.
const SHARE: usize = 4;

fn usage_of<T: QosIo>(io: &T) -> [u64; 4] {
    match io.qos_op() {
        QosOp::Read => {
            let b = io.qos_bytes();
            [1, b, b, 0]
        }
        QosOp::Write => {
            let b = io.qos_bytes();
            [1, b, 0, b]
        }
        QosOp::Other => [1, 0, 0, 0],
    }
}

fn add(acc: &mut [u64; 4], u: &[u64; 4]) {
    for (a, v) in acc.iter_mut().zip(u) {
        *a = a.saturating_add(*v);
    }
}

fn limit_bucket(l: &Limit, old: Option<CreditBucket>, now: u64) -> Option<CreditBucket> {
    if !l.is_limited() {
        return None;
    }
    Some(match old {
        Some(mut b) => {
            b.set_rate(l.per_sec, l.depth(), now);
            b
        }
        None => CreditBucket::new(l.per_sec, l.depth(), now),
    })
}

/// One disk's QoS state. `T` is the storage layer's request type.
#[derive(Debug)]
pub struct DiskQos<T> {
    config: DiskQosConfig,
    grant: Grant,
    /// Indexed by IOS, BYTES, RBYTES, WBYTES, SHARE; `None` = unlimited.
    buckets: [Option<CreditBucket>; 5],
    queue: VecDeque<T>,
    queued: [u64; 4],
    slice_start: u64,
    arrived: [u64; 4],
    released: [u64; 4],
    /// Per-second arrival rates, smoothed.
    arrival_rate: Option<[f64; 4]>,
    achieved: [f64; 2],
    stats: DiskQosStats,
}

impl<T: QosIo> DiskQos<T> {
    /// A disk with `config`, charging device time per `grant` (from its device's allocator, or
    /// [`Grant::UNLIMITED`]). Limit buckets start full.
    pub fn new(config: DiskQosConfig, grant: Grant, now: u64) -> Result<Self, ConfigError> {
        check_weight(config.weight)?;
        let mut d = DiskQos {
            config,
            grant: Grant::UNLIMITED,
            buckets: [None, None, None, None, None],
            queue: VecDeque::with_capacity(256),
            queued: [0; 4],
            slice_start: now,
            arrived: [0; 4],
            released: [0; 4],
            arrival_rate: None,
            achieved: [0.0; 2],
            stats: DiskQosStats::default(),
        };
        d.set_limit_buckets(now);
        d.apply_grant(grant, now);
        Ok(d)
    }

    /// The current configuration.
    pub fn config(&self) -> &DiskQosConfig {
        &self.config
    }

    /// The current grant.
    pub fn grant(&self) -> &Grant {
        &self.grant
    }

    /// Changes limits, weight and reservation at runtime. Limit changes apply at once (credit
    /// already earned is kept, clamped to the new depth; a new limit starts with a full burst);
    /// the weight and reservation reach the allocator with the next report.
    pub fn set_config(&mut self, config: DiskQosConfig, now: u64) -> Result<(), ConfigError> {
        check_weight(config.weight)?;
        self.config = config;
        self.set_limit_buckets(now);
        Ok(())
    }

    fn set_limit_buckets(&mut self, now: u64) {
        let l = self.config.limits;
        for (i, lim) in [l.rw_ios, l.rw_bytes, l.r_bytes, l.w_bytes]
            .iter()
            .enumerate()
        {
            self.buckets[i] = limit_bucket(lim, self.buckets[i].take(), now);
        }
    }

    /// Installs the allocator's grant for the coming slice.
    pub fn apply_grant(&mut self, grant: Grant, now: u64) {
        self.grant = grant;
        self.stats.share = grant.share;
        self.buckets[SHARE] = grant.share.map(|rate| {
            // One slice of the share may be saved up, no more.
            let depth = u128::from(rate) * u128::from(grant.slice_ns) / u128::from(NS_PER_SEC);
            let depth = u64::try_from(depth).unwrap_or(u64::MAX);
            match self.buckets[SHARE].take() {
                Some(mut b) => {
                    b.set_rate(rate, depth, now);
                    b
                }
                None => CreditBucket::new(rate, depth, now),
            }
        });
    }

    /// Offers an IO. It proceeds at once if nothing is queued ahead of it and every bucket it
    /// draws from has credit; otherwise it is queued (never refused).
    pub fn submit(&mut self, io: T, now: u64) -> Admission<T> {
        let u = usage_of(&io);
        self.stats.submitted_ios += 1;
        add(&mut self.arrived, &u);
        if self.queue.is_empty() && self.admit(&u, now) {
            return Admission::Proceed(io);
        }
        add(&mut self.queued, &u);
        self.queue.push_back(io);
        Admission::Queued
    }

    /// Releases queued IOs, in order, while the buckets allow; appends them to `out` and returns
    /// how many. Allocates nothing once `out` has grown to its working size.
    pub fn poll(&mut self, now: u64, out: &mut Vec<T>) -> usize {
        let mut n = 0;
        while let Some(io) = self.queue.front() {
            let u = usage_of(io);
            if !self.admit(&u, now) {
                break;
            }
            for (q, v) in self.queued.iter_mut().zip(&u) {
                *q -= v;
            }
            if let Some(io) = self.queue.pop_front() {
                out.push(io);
                n += 1;
            }
        }
        n
    }

    /// Nanoseconds from `now` until the head of the queue could be released (0 if it can go now,
    /// `None` if the queue is empty, `u64::MAX` if it waits for a grant). A reactor may use it
    /// to sleep; a new grant or config can only shorten it.
    pub fn wait_ns(&self, now: u64) -> Option<u64> {
        let io = self.queue.front()?;
        let u = self.charge(&usage_of(io));
        let w = self
            .buckets
            .iter()
            .zip(&u)
            .filter(|(_, &n)| n > 0)
            .filter_map(|(b, &n)| b.as_ref().map(|b| b.wait_ns(n, now)));
        Some(w.max().unwrap_or(0))
    }

    fn charge(&self, u: &[u64; 4]) -> Usage {
        [
            u[IOS],
            u[BYTES],
            u[RBYTES],
            u[WBYTES],
            self.grant.device.cost(u[IOS], u[BYTES]),
        ]
    }

    /// Charges `u` to every bucket if all have credit.
    #[inline]
    fn admit(&mut self, u: &[u64; 4], now: u64) -> bool {
        let c = self.charge(u);
        for (b, &n) in self.buckets.iter_mut().zip(&c) {
            if let (Some(b), true) = (b, n > 0) {
                b.refill(now);
                if !b.can_consume(n) {
                    return false;
                }
            }
        }
        for (b, &n) in self.buckets.iter_mut().zip(&c) {
            if let Some(b) = b {
                b.consume(n);
            }
        }
        add(&mut self.released, u);
        let s = &mut self.stats;
        s.released_ios += u[IOS];
        s.released_bytes += u[BYTES];
        s.released_read_bytes += u[RBYTES];
        s.released_write_bytes += u[WBYTES];
        true
    }

    /// IOs waiting.
    pub fn queued_ios(&self) -> usize {
        self.queue.len()
    }

    /// Counters and estimates.
    pub fn stats(&self) -> DiskQosStats {
        DiskQosStats {
            queued_ios: self.queued[IOS],
            queued_bytes: self.queued[BYTES],
            ..self.stats
        }
    }

    /// Takes every queued IO out (disk removal: the caller completes them, e.g. as aborted).
    pub fn drain(&mut self) -> impl Iterator<Item = T> + '_ {
        self.queued = [0; 4];
        self.queue.drain(..)
    }

    /// Ends the current slice: updates the estimates and returns the report for the allocator.
    ///
    /// Demand = queued work (to be served within the next slice) + expected arrivals (a moving
    /// average of past arrival rates; 0 if nothing arrived during the slice just ended, so an
    /// idle disk's share is handed to others at once). Limit = what the limit buckets allow in
    /// the next slice (rate + saved credit), converted to device time at the recent IO mix.
    pub fn close_slice(&mut self, now: u64) -> DemandReport {
        let elapsed = now.saturating_sub(self.slice_start).max(1) as f64;
        let per_sec = NS_PER_SEC as f64;
        let slice = self.grant.slice_ns.max(1) as f64;
        let rate = |v: u64| v as f64 * per_sec / elapsed;
        let arrived = self.arrived.map(rate);
        let released = self.released.map(rate);
        let alpha = EWMA_ALPHA;
        for (a, r) in self.achieved.iter_mut().zip(&released) {
            *a += alpha * (r - *a);
        }
        self.stats.achieved_ios_per_sec = self.achieved[0];
        self.stats.achieved_bytes_per_sec = self.achieved[1];
        let smoothed = match self.arrival_rate {
            Some(mut s) => {
                for (s, a) in s.iter_mut().zip(&arrived) {
                    *s += alpha * (a - *s);
                }
                s
            }
            None if self.arrived[IOS] > 0 => arrived,
            None => [0.0; 4],
        };
        if self.arrived[IOS] > 0 || self.arrival_rate.is_some() {
            self.arrival_rate = Some(smoothed);
        }
        let expected = if self.arrived[IOS] > 0 {
            smoothed
        } else {
            [0.0; 4]
        };
        let mut demand = [0.0; 4];
        for ((d, q), e) in demand.iter_mut().zip(&self.queued).zip(&expected) {
            *d = *q as f64 * per_sec / slice + e;
        }
        // The IO mix: this slice's demand, else the longer history.
        let profile = if demand[IOS] > 0.0 { demand } else { smoothed };
        let device = self.grant.device;
        let profile_cost = device.cost_f(profile[IOS], profile[BYTES]);
        // How many times the profile's rates the limits allow, per second.
        let mut scale = f64::INFINITY;
        for (b, p) in self.buckets[..SHARE].iter_mut().zip(&profile) {
            if let (Some(b), true) = (b, *p > 0.0) {
                b.refill(now);
                let allow = b.rate() as f64 + b.available_nano() as f64 / slice;
                scale = scale.min(allow / p);
            }
        }
        let limit = if scale.is_finite() {
            scale * profile_cost
        } else {
            f64::INFINITY
        };
        let avg_io = if profile[IOS] > 0.0 {
            profile[BYTES] / profile[IOS]
        } else {
            DEFAULT_IO_BYTES
        };
        let r = self.config.reservation;
        let (r_ios, r_bytes) = (r.ios_per_sec as f64, r.bytes_per_sec as f64);
        let reservation = device
            .cost_f(r_ios, r_ios * avg_io)
            .max(device.cost_f(r_bytes / avg_io.max(1.0), r_bytes));
        self.slice_start = now;
        self.arrived = [0; 4];
        self.released = [0; 4];
        // `as` saturates: f64 infinity becomes u64::MAX.
        DemandReport {
            weight: self.config.weight,
            reservation: reservation as u64,
            demand: device.cost_f(demand[IOS], demand[BYTES]) as u64,
            limit: limit as u64,
        }
    }
}

fn check_weight(w: u32) -> Result<(), ConfigError> {
    if (1..=MAX_WEIGHT).contains(&w) {
        Ok(())
    } else {
        Err(ConfigError::Weight(w))
    }
}

#[cfg(test)]
mod tests {
    use super::super::limits::DeviceCapacity;
    use super::*;

    #[derive(Debug, PartialEq, Eq)]
    struct Io(QosOp, u64);

    impl QosIo for Io {
        fn qos_op(&self) -> QosOp {
            self.0
        }
        fn qos_bytes(&self) -> u64 {
            self.1
        }
    }

    fn disk(limits: DiskLimits) -> DiskQos<Io> {
        let config = DiskQosConfig {
            limits,
            ..DiskQosConfig::default()
        };
        DiskQos::new(config, Grant::UNLIMITED, 0).unwrap()
    }

    const MS: u64 = 1_000_000;

    #[test]
    fn reads_and_writes_draw_only_their_own_byte_bucket() {
        let l = DiskLimits {
            r_bytes: Limit {
                per_sec: 1000,
                burst: 100,
            },
            w_bytes: Limit {
                per_sec: 1000,
                burst: 100,
            },
            ..DiskLimits::UNLIMITED
        };
        let mut d = disk(l);
        assert_eq!(
            d.submit(Io(QosOp::Read, 100), 0),
            Admission::Proceed(Io(QosOp::Read, 100))
        );
        assert_eq!(
            d.submit(Io(QosOp::Write, 100), 0),
            Admission::Proceed(Io(QosOp::Write, 100))
        );
        // Both byte buckets empty; an unmap draws neither.
        assert_eq!(
            d.submit(Io(QosOp::Other, 1 << 30), 0),
            Admission::Proceed(Io(QosOp::Other, 1 << 30))
        );
        assert_eq!(d.submit(Io(QosOp::Read, 1), 0), Admission::Queued);
    }

    #[test]
    fn fifo_head_of_line_and_wait() {
        let mut d = disk(DiskLimits {
            rw_ios: Limit {
                per_sec: 1000,
                burst: 1,
            },
            ..DiskLimits::UNLIMITED
        });
        let mut out = vec![];
        assert!(matches!(
            d.submit(Io(QosOp::Read, 1), 0),
            Admission::Proceed(_)
        ));
        assert_eq!(d.submit(Io(QosOp::Read, 2), 0), Admission::Queued);
        assert_eq!(d.submit(Io(QosOp::Read, 3), 0), Admission::Queued);
        assert_eq!(d.wait_ns(0), Some(MS));
        assert_eq!(d.poll(MS - 1, &mut out), 0);
        assert_eq!(d.poll(MS, &mut out), 1);
        // Even with credit, a new IO may not overtake the queue.
        assert_eq!(d.submit(Io(QosOp::Read, 4), 10 * MS), Admission::Queued);
        assert_eq!(d.poll(10 * MS, &mut out), 1);
        assert_eq!(out, vec![Io(QosOp::Read, 2), Io(QosOp::Read, 3)]);
        assert_eq!(d.stats().queued_ios, 1);
        assert_eq!(d.drain().collect::<Vec<_>>(), vec![Io(QosOp::Read, 4)]);
        assert_eq!(d.stats().queued_ios, 0);
        assert_eq!(d.wait_ns(10 * MS), None);
    }

    #[test]
    fn a_new_limit_applies_at_once_and_zero_removes_it() {
        let mut d = disk(DiskLimits::UNLIMITED);
        let limited = DiskLimits {
            rw_ios: Limit {
                per_sec: 10,
                burst: 1,
            },
            ..DiskLimits::UNLIMITED
        };
        d.set_config(
            DiskQosConfig {
                limits: limited,
                ..*d.config()
            },
            0,
        )
        .unwrap();
        assert!(matches!(
            d.submit(Io(QosOp::Read, 1), 0),
            Admission::Proceed(_)
        ));
        assert_eq!(d.submit(Io(QosOp::Read, 1), 0), Admission::Queued);
        d.set_config(DiskQosConfig::default(), 1).unwrap();
        let mut out = vec![];
        assert_eq!(d.poll(1, &mut out), 1);
        let bad = DiskQosConfig {
            weight: 0,
            ..DiskQosConfig::default()
        };
        assert_eq!(d.set_config(bad, 1), Err(ConfigError::Weight(0)));
    }

    const DEVICE_PS: u64 = super::super::limits::DEVICE_PS_PER_SEC;

    /// A grant of `share` on a device that does 1000 IOPS (1 ms of device time per IO).
    fn share_of_1000_iops_device(share: u64) -> Grant {
        let device = DeviceCapacity {
            ios_per_sec: 1000,
            bytes_per_sec: 0,
        };
        Grant {
            device,
            slice_ns: MS,
            share: Some(share),
        }
    }

    #[test]
    fn device_share_gates_and_charges_device_time() {
        let grant = share_of_1000_iops_device(DEVICE_PS / 2);
        let mut d: DiskQos<Io> = DiskQos::new(DiskQosConfig::default(), grant, 0).unwrap();
        // Half the device = 500 IOs/s; the bucket holds one slice (0.5 IO), so one IO passes
        // when full and the debt is paid back over 2 ms.
        assert!(matches!(
            d.submit(Io(QosOp::Read, 0), 0),
            Admission::Proceed(_)
        ));
        assert_eq!(d.submit(Io(QosOp::Read, 0), 0), Admission::Queued);
        let mut out = vec![];
        assert_eq!(d.poll(2 * MS - 1, &mut out), 0);
        assert_eq!(d.poll(2 * MS, &mut out), 1);
    }

    #[test]
    fn report_demand_limit_reservation() {
        let grant = share_of_1000_iops_device(0);
        let config = DiskQosConfig {
            limits: DiskLimits {
                rw_ios: Limit {
                    per_sec: 100,
                    burst: 1,
                },
                ..DiskLimits::UNLIMITED
            },
            weight: 3,
            reservation: Reservation {
                ios_per_sec: 50,
                bytes_per_sec: 0,
            },
        };
        let mut d: DiskQos<Io> = DiskQos::new(config, grant, 0).unwrap();
        for _ in 0..4 {
            let _ = d.submit(Io(QosOp::Read, 4096), 0);
        }
        let r = d.close_slice(MS);
        assert_eq!(r.weight, 3);
        // 50 IOPS of a 1000-IOPS device: 5 % of device time.
        assert_eq!(r.reservation, DEVICE_PS / 20);
        // The limit allows 100 IOPS + 1 saved credit over the next 1 ms slice: 1100 IOPS worth.
        assert_eq!(r.limit, DEVICE_PS * 11 / 10);
        // 4 queued to serve in 1 ms + 4 expected arrivals per ms = 8000 IOPS worth.
        assert_eq!(r.demand, DEVICE_PS * 8);
        // A slice without arrivals and with an empty queue: no demand.
        let _ = d.drain().count();
        assert_eq!(d.close_slice(2 * MS).demand, 0);
    }
}
