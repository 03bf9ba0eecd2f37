//! The per-slice allocation of device time between the disks of one device.
//!
//! Inputs per disk (a [`DemandReport`], all in device picoseconds per second): demand for the
//! coming slice, the most its own limits let it use, its reservation and its class weight.
//! Output per disk: a [`Grant`], the share of device time it may use during the slice.
//!
//! 1. If the summed demand (each capped by its limit) fits the capacity, every disk gets it.
//! 2. Otherwise water-filling (the mClock reservation/weight/limit rule): each disk gets
//!    `clamp(λ·weight, min(reservation, cap), cap)` with `cap = min(demand, limit)` and the
//!    level λ chosen so the grants add up to the capacity. Reservations are met first (scaled
//!    down proportionally if even they do not fit); capacity a disk cannot use (it is capped) is
//!    spread over the others by weight, so nothing is left idle while someone is waiting.
//! 3. Capacity still left over (every disk has its demand) is spread by weight as headroom for
//!    arrivals above the estimate, each disk capped by its limit.
//!
//! Exact integer arithmetic throughout: grants never sum to more than the capacity and never
//! exceed a disk's limit; rounding loses at most one picosecond per disk per second.

use super::clock::NS_PER_SEC;
use super::limits::{DeviceCapacity, DEVICE_PS_PER_SEC};

/// Default slice: 1 ms.
pub const DEFAULT_SLICE_NS: u64 = 1_000_000;
/// Shortest slice accepted: 10 µs.
pub const MIN_SLICE_NS: u64 = 10_000;
/// Longest slice accepted: 1 s.
pub const MAX_SLICE_NS: u64 = NS_PER_SEC;

/// What one disk tells the allocator at the end of a slice (a small `Copy` message).
/// Rates are device picoseconds per second ([`DEVICE_PS_PER_SEC`] = the whole device).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DemandReport {
    /// Class weight (0 is treated as 1).
    pub weight: u32,
    /// Reserved device time.
    pub reservation: u64,
    /// Estimated demand for the next slice: queued work plus expected arrivals.
    pub demand: u64,
    /// The most the disk's own limits let it use in the next slice.
    pub limit: u64,
}

/// What the allocator tells one disk for the coming slice (a small `Copy` message).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grant {
    /// The device's cost model (disks charge IOs with it).
    pub device: DeviceCapacity,
    /// The slice length.
    pub slice_ns: u64,
    /// Device picoseconds per second the disk may use; `None` = not shared (unlimited device).
    pub share: Option<u64>,
}

impl Grant {
    /// No device sharing (only the disk's own limits apply).
    pub const UNLIMITED: Grant = Grant {
        device: DeviceCapacity::UNLIMITED,
        slice_ns: DEFAULT_SLICE_NS,
        share: None,
    };
}

/// The slice length is outside [`MIN_SLICE_NS`]..=[`MAX_SLICE_NS`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("slice of {0} ns is outside {MIN_SLICE_NS}..={MAX_SLICE_NS}")]
pub struct InvalidSlice(pub u64);

/// Checks a slice length.
pub fn check_slice(slice_ns: u64) -> Result<u64, InvalidSlice> {
    if (MIN_SLICE_NS..=MAX_SLICE_NS).contains(&slice_ns) {
        Ok(slice_ns)
    } else {
        Err(InvalidSlice(slice_ns))
    }
}

#[derive(Clone, Copy, Debug)]
struct Event {
    /// The level λ = value / weight at which it happens.
    value: u128,
    weight: u128,
    disk: u32,
    /// true: the disk leaves its floor; false: it reaches its cap.
    start: bool,
}

/// Reusable buffers for [`allocate`] (so a steady-state allocation allocates nothing).
#[derive(Debug, Default, Clone)]
pub struct Scratch {
    events: Vec<Event>,
    w: Vec<u128>,
    state: Vec<u8>,
    lo: Vec<u128>,
    hi: Vec<u128>,
    out: Vec<u128>,
}

const FLOOR: u8 = 0;
const ACTIVE: u8 = 1;
const CAPPED: u8 = 2;

/// Water-filling: `out[i] = clamp(λ·w[i], lo[i], hi[i])` with λ the largest level at which
/// `Σ out ≤ cap` (floored to integers). Requires `lo[i] <= hi[i]`. If `Σ lo ≥ cap` the floors
/// are scaled down proportionally instead; if `Σ hi ≤ cap`, `out = hi`.
fn water_fill(cap: u128, w: &[u128], lo: &[u128], hi: &[u128], out: &mut [u128], s: &mut Scratch) {
    let sum_lo: u128 = lo.iter().sum();
    if sum_lo >= cap {
        for (o, &l) in out.iter_mut().zip(lo) {
            *o = (l * cap).checked_div(sum_lo).unwrap_or(0);
        }
        return;
    }
    if hi.iter().sum::<u128>() <= cap {
        out.copy_from_slice(hi);
        return;
    }
    s.events.clear();
    s.state.clear();
    s.state.resize(w.len(), FLOOR);
    for (i, ((&wi, &l), &h)) in w.iter().zip(lo).zip(hi).enumerate() {
        let disk = i as u32;
        s.events.push(Event {
            value: l,
            weight: wi,
            disk,
            start: true,
        });
        s.events.push(Event {
            value: h,
            weight: wi,
            disk,
            start: false,
        });
    }
    // By level; at equal levels a disk's start before its end (its segment is empty then).
    s.events.sort_unstable_by(|a, b| {
        (a.value * b.weight)
            .cmp(&(b.value * a.weight))
            .then(b.start.cmp(&a.start))
            .then(a.disk.cmp(&b.disk))
    });
    // On the current segment, Σ out(λ) = fixed + λ·active_w.
    let mut fixed = sum_lo;
    let mut active_w = 0u128;
    for e in &s.events {
        // Does the sum reach cap by this event's level? fixed + (value/weight)·active_w ≥ cap.
        if active_w > 0 && fixed * e.weight + e.value * active_w >= cap * e.weight {
            break;
        }
        let i = e.disk as usize;
        if e.start {
            fixed -= lo[i];
            active_w += w[i];
            s.state[i] = ACTIVE;
        } else {
            fixed += hi[i];
            active_w -= w[i];
            s.state[i] = CAPPED;
        }
    }
    let rest = cap.saturating_sub(fixed);
    for (i, o) in out.iter_mut().enumerate() {
        *o = match s.state[i] {
            ACTIVE => (rest * w[i] / active_w.max(1)).clamp(lo[i], hi[i]),
            CAPPED => hi[i],
            _ => lo[i],
        };
    }
}

/// Computes every disk's share of `capacity` (device picoseconds per second) for one slice, as
/// described in the module documentation. `grants[i]` is for `reports[i]`.
pub fn allocate(capacity: u64, reports: &[DemandReport], grants: &mut Vec<u64>, s: &mut Scratch) {
    let cap = u128::from(capacity);
    let n = reports.len();
    let mut w = std::mem::take(&mut s.w);
    w.clear();
    w.extend(
        reports
            .iter()
            .map(|r| u128::from(r.weight.clamp(1, super::class::MAX_WEIGHT))),
    );
    let mut lo = std::mem::take(&mut s.lo);
    let mut hi = std::mem::take(&mut s.hi);
    let mut out = std::mem::take(&mut s.out);
    lo.clear();
    hi.clear();
    out.clear();
    out.resize(n, 0);
    // Phase 1: demand, capped by limit; floors are reservations.
    for r in reports {
        let h = u128::from(r.demand.min(r.limit)).min(cap);
        hi.push(h);
        lo.push(u128::from(r.reservation).min(h));
    }
    water_fill(cap, &w, &lo, &hi, &mut out, s);
    // Phase 2: leftover capacity as headroom, by weight, up to each limit.
    let used: u128 = out.iter().sum();
    if used < cap {
        std::mem::swap(&mut lo, &mut out);
        hi.clear();
        hi.extend(
            reports
                .iter()
                .zip(&lo)
                .map(|(r, &l)| u128::from(r.limit).min(cap).max(l)),
        );
        water_fill(cap, &w, &lo, &hi, &mut out, s);
    }
    grants.clear();
    grants.extend(out.iter().map(|&g| u64::try_from(g).unwrap_or(u64::MAX)));
    s.w = w;
    s.lo = lo;
    s.hi = hi;
    s.out = out;
}

/// The allocator for one device, owned by one reactor. Disks' reactors send it
/// [`DemandReport`]s ([`SliceAllocator::report`]); once per slice it computes
/// ([`SliceAllocator::allocate`]) and the owner sends each disk its [`Grant`]. It uses the latest
/// report of each disk, so a late report costs that disk at most one slice of accuracy.
#[derive(Debug, Clone)]
pub struct SliceAllocator {
    capacity: DeviceCapacity,
    slice_ns: u64,
    reports: Vec<Option<DemandReport>>,
    // Scratch, kept between slices.
    dense: Vec<DemandReport>,
    dense_grants: Vec<u64>,
    grants: Vec<(usize, Grant)>,
    scratch: Scratch,
}

impl SliceAllocator {
    /// An allocator for a device of `capacity`, slicing time into `slice_ns`.
    pub fn new(capacity: DeviceCapacity, slice_ns: u64) -> Result<Self, InvalidSlice> {
        Ok(SliceAllocator {
            capacity,
            slice_ns: check_slice(slice_ns)?,
            reports: Vec::new(),
            dense: Vec::new(),
            dense_grants: Vec::new(),
            grants: Vec::new(),
            scratch: Scratch::default(),
        })
    }

    /// The device capacity.
    pub fn capacity(&self) -> DeviceCapacity {
        self.capacity
    }

    /// Changes the capacity (used from the next allocation on).
    pub fn set_capacity(&mut self, capacity: DeviceCapacity) {
        self.capacity = capacity;
    }

    /// The slice length.
    pub fn slice_ns(&self) -> u64 {
        self.slice_ns
    }

    /// Changes the slice length (the owner also resets its slice timer).
    pub fn set_slice(&mut self, slice_ns: u64) -> Result<(), InvalidSlice> {
        self.slice_ns = check_slice(slice_ns)?;
        Ok(())
    }

    /// Records disk `disk`'s latest report (replacing the previous one).
    pub fn report(&mut self, disk: usize, report: DemandReport) {
        if self.reports.len() <= disk {
            self.reports.resize(disk + 1, None);
        }
        self.reports[disk] = Some(report);
    }

    /// Forgets a removed disk.
    pub fn forget(&mut self, disk: usize) {
        if let Some(r) = self.reports.get_mut(disk) {
            *r = None;
        }
    }

    /// Computes this slice's grants for every disk that has reported.
    pub fn allocate(&mut self) -> &[(usize, Grant)] {
        self.grants.clear();
        let base = Grant {
            device: self.capacity,
            slice_ns: self.slice_ns,
            share: None,
        };
        if self.capacity.is_unlimited() {
            self.grants.extend(
                self.reports
                    .iter()
                    .enumerate()
                    .filter(|(_, r)| r.is_some())
                    .map(|(i, _)| (i, base)),
            );
            return &self.grants;
        }
        self.dense.clear();
        self.dense.extend(self.reports.iter().flatten().copied());
        allocate(
            DEVICE_PS_PER_SEC,
            &self.dense,
            &mut self.dense_grants,
            &mut self.scratch,
        );
        let ids = self
            .reports
            .iter()
            .enumerate()
            .filter(|(_, r)| r.is_some())
            .map(|(i, _)| i);
        self.grants
            .extend(ids.zip(&self.dense_grants).map(|(i, &g)| {
                (
                    i,
                    Grant {
                        share: Some(g),
                        ..base
                    },
                )
            }));
        &self.grants
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn rep(weight: u32, reservation: u64, demand: u64, limit: u64) -> DemandReport {
        DemandReport {
            weight,
            reservation,
            demand,
            limit,
        }
    }

    fn run(cap: u64, reports: &[DemandReport]) -> Vec<u64> {
        let mut g = Vec::new();
        allocate(cap, reports, &mut g, &mut Scratch::default());
        g
    }

    #[test]
    fn demand_that_fits_is_granted_then_headroom_by_weight() {
        let g = run(1000, &[rep(1, 0, 100, 500), rep(1, 0, 200, 250)]);
        // Phase 1: 100 + 200; phase 2 spreads 700 by weight capped at limits: 250 cap for #2.
        assert_eq!(g, vec![500, 250]);
    }

    #[test]
    fn contended_by_weight() {
        let g = run(
            700,
            &[
                rep(4, 0, 1000, 1000),
                rep(2, 0, 1000, 1000),
                rep(1, 0, 1000, 1000),
            ],
        );
        assert_eq!(g, vec![400, 200, 100]);
    }

    #[test]
    fn reservation_is_a_floor_and_the_rest_goes_by_weight() {
        let g = run(
            700,
            &[
                rep(4, 0, 1000, 1000),
                rep(2, 0, 1000, 1000),
                rep(1, 250, 1000, 1000),
            ],
        );
        assert_eq!(g[2], 250);
        assert_eq!(g[0] + g[1], 450);
        assert_eq!(g[0], 300);
    }

    #[test]
    fn what_a_capped_disk_cannot_use_goes_to_the_others() {
        let g = run(
            700,
            &[
                rep(4, 0, 1000, 1000),
                rep(2, 0, 1000, 1000),
                rep(1, 0, 10, 1000),
            ],
        );
        assert_eq!(g[2], 10); // phase 1 left nothing over
        assert_eq!(g[0] + g[1], 690);
        assert_eq!(g[0], 460);
    }

    #[test]
    fn oversubscribed_reservations_scale_down() {
        let g = run(100, &[rep(1, 60, 1000, 1000), rep(1, 90, 1000, 1000)]);
        assert_eq!(g, vec![40, 60]);
    }

    #[test]
    fn idle_disk_gets_nothing_when_contended() {
        let g = run(
            700,
            &[
                rep(4, 0, 1000, 1000),
                rep(2, 0, 1000, 1000),
                rep(1, 50, 0, 1000),
            ],
        );
        assert_eq!(&g[..2], &[466, 233]);
        assert!(
            g[2] <= 1,
            "only the rounding remainder may go to the idle disk: {g:?}"
        );
    }

    #[test]
    fn allocator_publishes_grants_by_disk_id() {
        let mut a = SliceAllocator::new(
            DeviceCapacity {
                ios_per_sec: 1000,
                bytes_per_sec: 0,
            },
            DEFAULT_SLICE_NS,
        )
        .unwrap();
        a.report(3, rep(1, 0, u64::MAX, u64::MAX));
        a.report(1, rep(3, 0, u64::MAX, u64::MAX));
        let g = a.allocate().to_vec();
        assert_eq!(g.len(), 2);
        assert_eq!((g[0].0, g[0].1.share), (1, Some(750_000_000_000)));
        assert_eq!((g[1].0, g[1].1.share), (3, Some(250_000_000_000)));
        a.forget(1);
        assert_eq!(a.allocate().len(), 1);
        a.set_capacity(DeviceCapacity::UNLIMITED);
        assert_eq!(a.allocate()[0].1.share, None);
        assert!(a.set_slice(1).is_err());
        assert!(SliceAllocator::new(DeviceCapacity::UNLIMITED, 2 * NS_PER_SEC).is_err());
    }

    fn reports() -> impl Strategy<Value = Vec<DemandReport>> {
        proptest::collection::vec(
            (0u32..20, 0u64..2_000, 0u64..3_000, 0u64..3_000)
                .prop_map(|(w, r, d, l)| rep(w, r, d, l)),
            1..12,
        )
    }

    proptest! {
        #[test]
        fn never_exceeds_capacity_or_limits(cap in 0u64..10_000, rs in reports()) {
            let g = run(cap, &rs);
            prop_assert!(g.iter().sum::<u64>() <= cap);
            for (gi, r) in g.iter().zip(&rs) {
                prop_assert!(*gi <= r.limit, "grant {} over limit {}", gi, r.limit);
            }
        }

        #[test]
        fn reservations_and_fitting_demand_are_honoured(cap in 0u64..10_000, rs in reports()) {
            let g = run(cap, &rs);
            let want = |r: &DemandReport| r.demand.min(r.limit);
            let floors: u64 = rs.iter().map(|r| r.reservation.min(want(r))).sum();
            let wants: u64 = rs.iter().map(want).sum();
            for (gi, r) in g.iter().zip(&rs) {
                if floors <= cap {
                    prop_assert!(*gi >= r.reservation.min(want(r)));
                }
                if wants <= cap {
                    prop_assert!(*gi >= want(r));
                }
            }
        }

        #[test]
        fn work_conserving_and_weighted(cap in 1u64..10_000, rs in reports()) {
            let g = run(cap, &rs);
            let used: u64 = g.iter().sum();
            let n = rs.len() as u64;
            // Capacity is left idle only when every disk has all its limit allows.
            if used + n < cap {
                for (gi, r) in g.iter().zip(&rs) {
                    prop_assert!(*gi >= r.limit.min(cap), "idle capacity while disk below limit");
                }
            }
            // Two disks neither at their floor nor their cap have grants in weight proportion.
            let want = |r: &DemandReport| r.demand.min(r.limit);
            let free: Vec<usize> = (0..rs.len())
                .filter(|&i| g[i] > rs[i].reservation.min(want(&rs[i])) && g[i] < want(&rs[i]))
                .collect();
            for &i in &free {
                for &j in &free {
                    let (wi, wj) = (u128::from(rs[i].weight.max(1)), u128::from(rs[j].weight.max(1)));
                    // g_i/w_i and g_j/w_j equal up to flooring (one unit each).
                    let lhs = u128::from(g[i]) * wj;
                    let rhs = u128::from(g[j]) * wi;
                    prop_assert!(lhs.abs_diff(rhs) <= wi.max(wj), "{:?} {:?}", rs, g);
                }
            }
        }
    }
}
