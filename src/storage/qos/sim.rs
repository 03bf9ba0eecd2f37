//! Simulated-time scenarios: the "must show" items, run on a [`ManualClock`] with
//! simulated demand through the same [`DeviceQos`] path a reactor uses. The device itself is
//! ideal (completes instantly), so what is measured is exactly what QoS releases.

use super::*;
use proptest::prelude::*;

const MS: u64 = 1_000_000;
const S: u64 = NS_PER_SEC;
const KIB: u64 = 1024;

#[derive(Debug, Clone, PartialEq, Eq)]
struct Io {
    seq: u64,
    op: QosOp,
    bytes: u64,
}

impl QosIo for Io {
    fn qos_op(&self) -> QosOp {
        self.op
    }
    fn qos_bytes(&self) -> u64 {
        self.bytes
    }
}

/// How a simulated guest drives one disk.
#[derive(Debug, Clone, Copy)]
enum Load {
    /// Keeps `depth` IOs waiting in QoS at all times (always backlogged).
    Closed { depth: usize, op: QosOp, bytes: u64 },
    /// Submits nothing.
    Idle,
}

struct Sim<'c> {
    clock: &'c ManualClock,
    qos: DeviceQos<Io, &'c ManualClock>,
    disks: Vec<DiskId>,
    loads: Vec<Load>,
    /// Per disk: release times.
    released: Vec<Vec<u64>>,
    seq: u64,
    out: Vec<(DiskId, Io)>,
    step: u64,
}

impl<'c> Sim<'c> {
    fn new(clock: &'c ManualClock, capacity: DeviceCapacity) -> Self {
        Sim {
            clock,
            qos: DeviceQos::new(clock, capacity, DEFAULT_SLICE_NS).unwrap(),
            disks: vec![],
            loads: vec![],
            released: vec![],
            seq: 0,
            out: vec![],
            step: 10_000,
        }
    }

    fn add(&mut self, config: DiskQosConfig, load: Load) -> usize {
        self.disks.push(self.qos.add_disk(config).unwrap());
        self.loads.push(load);
        self.released.push(vec![]);
        self.disks.len() - 1
    }

    fn now(&self) -> u64 {
        self.clock.now_ns()
    }

    /// One step: poll (ends the slice when due), then guests top up their queues.
    fn tick(&mut self) {
        let now = self.now();
        self.qos.poll(&mut self.out);
        for (id, _) in self.out.drain(..) {
            let i = self.disks.iter().position(|d| *d == id).unwrap();
            self.released[i].push(now);
        }
        for i in 0..self.disks.len() {
            if let Load::Closed { depth, op, bytes } = self.loads[i] {
                while self.qos.disk(self.disks[i]).unwrap().queued_ios() < depth {
                    self.seq += 1;
                    let io = Io {
                        seq: self.seq,
                        op,
                        bytes,
                    };
                    if let Admission::Proceed(_) = self.qos.submit(self.disks[i], io).unwrap() {
                        self.released[i].push(now);
                    }
                }
            }
        }
    }

    /// Runs until `t`, ticking every `step`.
    fn run_until(&mut self, t: u64) {
        while self.now() < t {
            self.clock.set((self.now() + self.step).min(t));
            self.tick();
        }
    }

    /// IOs disk `i` released in `(from, to]`.
    fn count(&self, i: usize, from: u64, to: u64) -> u64 {
        self.released[i]
            .iter()
            .filter(|&&t| t > from && t <= to)
            .count() as u64
    }
}

fn limits(ios: u64, bytes: u64) -> DiskLimits {
    DiskLimits {
        rw_ios: Limit::rate(ios),
        rw_bytes: Limit::rate(bytes),
        ..DiskLimits::UNLIMITED
    }
}

fn cfg(limits: DiskLimits) -> DiskQosConfig {
    DiskQosConfig {
        limits,
        ..DiskQosConfig::default()
    }
}

fn closed(bytes: u64) -> Load {
    Load::Closed {
        depth: 64,
        op: QosOp::Read,
        bytes,
    }
}

fn within(got: f64, want: f64, tol: f64) -> bool {
    (got - want).abs() <= want * tol
}

/// A device that does ~110k 4 KiB IOPS (200k tiny IOPS, 1 GB/s).
const DEVICE: DeviceCapacity = DeviceCapacity {
    ios_per_sec: 200_000,
    bytes_per_sec: 1_000_000_000,
};

#[test]
fn single_disk_achieves_iops_and_bandwidth_limits_within_0_1_percent() {
    // (limits, IO, device, which limit binds, its rate)
    let rw = |b| Load::Closed {
        depth: 64,
        op: QosOp::Write,
        bytes: b,
    };
    let cases: Vec<(DiskLimits, Load, DeviceCapacity, bool, u64)> = vec![
        // 1234 IOPS (not a multiple of 1000) with a byte limit that does not bind.
        (
            limits(1234, 50 * MIB),
            closed(4 * KIB),
            DeviceCapacity::UNLIMITED,
            true,
            1234,
        ),
        // M = 3,000,000 bytes/s binds (16 KiB IOs: ~183 IOPS < 1234).
        (
            limits(1234, 3_000_000),
            closed(16 * KIB),
            DeviceCapacity::UNLIMITED,
            false,
            3_000_000,
        ),
        // Read-only and write-only limits.
        (
            DiskLimits {
                r_bytes: Limit::rate(7_777_777),
                ..DiskLimits::UNLIMITED
            },
            closed(64 * KIB),
            DEVICE,
            false,
            7_777_777,
        ),
        (
            DiskLimits {
                w_bytes: Limit::rate(1_234_567),
                ..DiskLimits::UNLIMITED
            },
            rw(4 * KIB),
            DEVICE,
            false,
            1_234_567,
        ),
        // The same IOPS limit with device sharing active (it must not get in the way).
        (limits(1234, 50 * MIB), closed(4 * KIB), DEVICE, true, 1234),
    ];
    for (l, load, device, iops, rate) in cases {
        let clock = ManualClock::new(0);
        let mut sim = Sim::new(&clock, device);
        let d = sim.add(cfg(l), load);
        sim.tick(); // t = 0: the initial burst
        sim.run_until(10 * S);
        let Load::Closed { bytes, .. } = load else {
            unreachable!()
        };
        // After the initial burst (released at t = 0), 10 s at the rate.
        let ios = sim.count(d, 0, 10 * S);
        let got = if iops { ios } else { ios * bytes };
        let want = rate * 10;
        assert!(
            within(got as f64, want as f64, 0.001),
            "{l:?}: got {got}, want {want}"
        );
        if iops {
            assert!(got.abs_diff(want) <= 1, "exact: got {got}, want {want}");
        } else {
            assert!(
                got <= want + bytes,
                "never above the limit by more than one IO: {got} vs {want}"
            );
        }
        // What passed at t = 0 was the burst (the bucket depth).
        let burst = sim.released[d].iter().filter(|&&t| t == 0).count() as u64;
        if iops {
            assert_eq!(burst, l.rw_ios.depth());
        }
    }
}

#[test]
fn bursts_up_to_depth_pass_immediately_then_settle_at_rate() {
    let clock = ManualClock::new(0);
    let mut sim = Sim::new(&clock, DeviceCapacity::UNLIMITED);
    let l = DiskLimits {
        rw_ios: Limit {
            per_sec: 1000,
            burst: 200,
        },
        ..DiskLimits::UNLIMITED
    };
    let d = sim.add(
        cfg(l),
        Load::Closed {
            depth: 1000,
            op: QosOp::Read,
            bytes: 4 * KIB,
        },
    );
    sim.tick();
    assert_eq!(sim.released[d].len(), 200, "the whole burst at t = 0");
    for t in [MS / 2, 10 * MS, 123 * MS, S, 3 * S] {
        sim.run_until(t);
        let want = 200 + 1000 * t / S;
        assert!(
            (sim.released[d].len() as u64).abs_diff(want) <= 1,
            "t={t}: {} vs {want}",
            sim.released[d].len()
        );
    }
    // The guest stops; once its queue has drained, 300 ms idle refill the bucket to its depth
    // (not beyond): the next burst is 200 again.
    sim.loads[d] = Load::Idle;
    while sim.qos.disk(sim.disks[d]).unwrap().queued_ios() > 0 {
        sim.run_until(sim.now() + MS);
    }
    sim.run_until(sim.now() + 300 * MS);
    let before = sim.released[d].len();
    sim.loads[d] = Load::Closed {
        depth: 1000,
        op: QosOp::Read,
        bytes: 4 * KIB,
    };
    sim.tick();
    assert_eq!(sim.released[d].len() - before, 200);
}

/// Three disks classed by quota (gold 500, silver 200, bronze 90 MiB/s: weights 4/2/1), all
/// backlogged with 4 KiB reads on a device that cannot serve them all.
fn three_classes(clock: &ManualClock, reservations: [u64; 3]) -> (Sim<'_>, [usize; 3]) {
    let table = ClassTable::gold_silver_bronze();
    let mut sim = Sim::new(clock, DEVICE);
    let mut ids = [0; 3];
    for (k, (mib, r)) in [500, 200, 90].into_iter().zip(reservations).enumerate() {
        let limits = DiskLimits {
            rw_bytes: Limit::rate(mib * MIB),
            ..DiskLimits::UNLIMITED
        };
        let weight = table.classify(&limits).weight;
        let reservation = Reservation {
            ios_per_sec: r,
            bytes_per_sec: 0,
        };
        ids[k] = sim.add(
            DiskQosConfig {
                limits,
                weight,
                reservation,
            },
            closed(4 * KIB),
        );
    }
    (sim, ids)
}

/// 4 KiB IOs per second the device can do.
fn device_iops() -> f64 {
    DEVICE_PS_PER_SEC as f64 / DEVICE.cost(1, 4 * KIB) as f64
}

#[test]
fn contending_classes_get_weighted_shares_and_reservations() {
    let clock = ManualClock::new(0);
    let (mut sim, [g, s, b]) = three_classes(&clock, [10_000, 10_000, 12_000]);
    sim.run_until(2100 * MS);
    let rate = |i| sim.count(i, 100 * MS, 2100 * MS) as f64 / 2.0;
    let total = device_iops();
    let (rg, rs, rb) = (rate(g), rate(s), rate(b));
    assert!(
        within(rg + rs + rb, total, 0.01),
        "device fully used: {} of {total}",
        rg + rs + rb
    );
    assert!(within(rg, total * 4.0 / 7.0, 0.01), "gold {rg}");
    assert!(within(rs, total * 2.0 / 7.0, 0.01), "silver {rs}");
    assert!(within(rb, total / 7.0, 0.01), "bronze {rb}");
    for (r, min) in [(rg, 10_000.0), (rs, 10_000.0), (rb, 12_000.0)] {
        assert!(r >= min, "{r} below reservation {min}");
    }

    // Bronze reserves more than its weighted share (~15.7k): it gets the reservation, gold and
    // silver share the rest 2:1.
    let clock = ManualClock::new(0);
    let (mut sim, [g, s, b]) = three_classes(&clock, [10_000, 10_000, 20_000]);
    sim.run_until(2100 * MS);
    let rate = |i| sim.count(i, 100 * MS, 2100 * MS) as f64 / 2.0;
    let (rg, rs, rb) = (rate(g), rate(s), rate(b));
    assert!(
        rb >= 20_000.0 * 0.999 && within(rb, 20_000.0, 0.01),
        "bronze {rb}"
    );
    assert!(within(rg / rs, 2.0, 0.01), "gold/silver {rg}/{rs}");
    assert!(within(rg + rs + rb, total, 0.01));
}

#[test]
fn idle_disks_share_is_redistributed_within_one_slice() {
    let clock = ManualClock::new(0);
    let (mut sim, [g, s, b]) = three_classes(&clock, [0, 0, 0]);
    sim.run_until(1000 * MS + MS / 2);
    sim.loads[b] = Load::Idle;
    // Bronze drains its queue, then the first slice that sees it idle gives its share away.
    let mut t_idle = None;
    while t_idle.is_none() {
        let boundary = clock.now_ns().is_multiple_of(MS);
        sim.run_until(clock.now_ns() + sim.step);
        if boundary && sim.qos.last_reports().get(b).is_some_and(|r| r.demand == 0) {
            t_idle = Some(clock.now_ns() - clock.now_ns() % MS);
        }
    }
    let t_idle = t_idle.unwrap();
    let t_last = *sim.released[b].last().unwrap();
    assert!(
        t_idle > t_last && t_idle <= t_last + MS,
        "idle detected at {t_idle}, last IO at {t_last}"
    );
    // Nothing but the allocator's rounding remainder (< 1 ns of device time per second).
    assert!(sim.qos.disk(sim.disks[b]).unwrap().grant().share.unwrap() < 1000);
    sim.run_until(t_idle + 101 * MS);
    let total = device_iops();
    // The very next slice already runs at the full device rate (±2 IOs of discreteness)...
    let first = (sim.count(g, t_idle, t_idle + MS) + sim.count(s, t_idle, t_idle + MS)) as f64;
    assert!(
        (first - total / 1000.0).abs() <= 2.0,
        "first slice after idle: {first}"
    );
    // ...and so does every one after it, split 2:1.
    let (rg, rs) = (
        sim.count(g, t_idle + MS, t_idle + 101 * MS) as f64,
        sim.count(s, t_idle + MS, t_idle + 101 * MS) as f64,
    );
    assert!(
        within((rg + rs) * 10.0, total, 0.01),
        "{}",
        (rg + rs) * 10.0
    );
    assert!(within(rg / rs, 2.0, 0.01));
    assert_eq!(sim.count(b, t_idle, t_idle + 101 * MS), 0);
}

#[test]
fn ten_limit_changes_while_io_runs_each_take_effect_within_one_slice() {
    let clock = ManualClock::new(0);
    let mut sim = Sim::new(&clock, DEVICE);
    let d = sim.add(cfg(limits(1000, 0)), closed(4 * KIB));
    let id = sim.disks[d];
    // SPDK bdev_set_qos_limit parameter sets; an absent field keeps its value, 0 disables.
    let p = |ios: Option<u64>, mib: Option<u64>| QosLimitParams {
        rw_ios_per_sec: ios,
        rw_mbytes_per_sec: mib,
        ..Default::default()
    };
    let changes = [
        p(Some(1234), None),
        p(Some(5000), None),
        p(Some(777), None),
        p(Some(20_000), None),
        p(Some(77_777), None),
        p(Some(3333), Some(100)), // 3333 IOPS binds (100 MiB/s is 25600 x 4 KiB)
        p(Some(0), None),         // IOPS off: 100 MiB/s binds
        p(None, Some(0)),         // all off: the device binds
        p(Some(50_000), None),
        p(Some(1), None),
    ];
    let mut limits = sim.qos.disk(id).unwrap().config().limits;
    sim.run_until(200 * MS + 123_456);
    for change in changes {
        let t_c = clock.now_ns();
        limits = change.apply(limits);
        sim.qos.set_config(id, cfg(limits)).unwrap();
        let want = match (limits.rw_ios.per_sec, limits.rw_bytes.per_sec) {
            (0, 0) => device_iops(),
            (0, b) => (b / (4 * KIB)) as f64,
            (i, 0) => i as f64,
            (i, b) => (i as f64).min((b / (4 * KIB)) as f64),
        };
        let end = t_c + 200 * MS;
        sim.run_until(end);
        // From one slice after the change on, at every 250 µs, the released count follows the new
        // rate: never below it (by more than 2 IOs + 0.5 %), never above it by more than the
        // new burst (credit the IOPS bucket may have saved while the old grant still applied).
        let burst = match (limits.rw_ios.is_limited(), limits.rw_bytes.is_limited()) {
            (true, _) => limits.rw_ios.depth() as f64,
            (false, true) => (limits.rw_bytes.depth() / (4 * KIB)) as f64,
            // Only the device share binds: its bucket holds one slice.
            (false, false) => want / 1000.0,
        };
        let from = t_c + MS;
        let mut t = from;
        while t <= end {
            let got = sim.count(d, from, t) as f64;
            let exp = want * (t - from) as f64 / S as f64;
            let slack = 2.0 + exp * 0.005;
            assert!(
                got >= exp - slack && got <= exp + burst + slack,
                "{change:?} at +{}: {got} vs {exp}",
                t - t_c
            );
            t += MS / 4;
        }
        // And over the whole window, within 1 % (plus the burst).
        let got = sim.count(d, from, end) as f64;
        let exp = want * (end - from) as f64 / S as f64;
        let ok = got >= exp * 0.99 - 2.0 && got <= exp * 1.01 + burst + 2.0;
        assert!(ok, "{change:?}: {got} vs {exp}");
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// Random disks, limits, device and IO mix: once the guests stop, every queued IO comes
    /// out exactly once, in per-disk submission order.
    #[test]
    fn every_queued_io_is_released_exactly_once(
        device in prop_oneof![
            Just(DeviceCapacity::UNLIMITED),
            (1_000u64..50_000, 0u64..200_000_000).prop_map(|(i, b)| DeviceCapacity { ios_per_sec: i, bytes_per_sec: b }),
        ],
        disks in proptest::collection::vec(
            (0u64..5_000, 0u64..20_000_000, 0u64..10_000_000, 0u64..10_000_000, 1u32..8, 0u64..2_000),
            1..4,
        ),
        ios in proptest::collection::vec((0usize..4, 0u8..3, 512u64..65_536, 0u64..200_000), 1..150),
    ) {
        let clock = ManualClock::new(0);
        let mut qos: DeviceQos<Io, &ManualClock> = DeviceQos::new(&clock, device, DEFAULT_SLICE_NS).unwrap();
        let mut ids = vec![];
        for &(i, b, r, w, weight, res) in &disks {
            // Byte limits of at least 1 MiB/s so the drain stays short.
            let lim = |v: u64| Limit::rate(if v == 0 { 0 } else { v.max(MIB) });
            let limits = DiskLimits { rw_ios: Limit::rate(i), rw_bytes: lim(b), r_bytes: lim(r), w_bytes: lim(w) };
            let reservation = Reservation { ios_per_sec: res, bytes_per_sec: 0 };
            ids.push(qos.add_disk(DiskQosConfig { limits, weight, reservation }).unwrap());
        }
        let mut submitted: Vec<Vec<u64>> = vec![vec![]; ids.len()];
        let mut released: Vec<Vec<u64>> = vec![vec![]; ids.len()];
        let mut out = vec![];
        let record = |out: &mut Vec<(DiskId, Io)>, released: &mut Vec<Vec<u64>>| {
            for (id, io) in out.drain(..) {
                released[id.0 as usize].push(io.seq);
            }
        };
        for (seq, &(k, op, bytes, dt)) in ios.iter().enumerate() {
            clock.advance(dt);
            let k = k % ids.len();
            let op = [QosOp::Read, QosOp::Write, QosOp::Other][op as usize];
            let io = Io { seq: seq as u64, op, bytes };
            submitted[k].push(io.seq);
            if let Admission::Proceed(io) = qos.submit(ids[k], io).unwrap() {
                out.push((ids[k], io));
            }
            qos.poll(&mut out);
            record(&mut out, &mut released);
        }
        // Demand stops; poll until drained (bounded: 120 s of simulated time).
        let deadline = clock.now_ns() + 120 * S;
        while ids.iter().any(|&id| qos.disk(id).unwrap().queued_ios() > 0) && clock.now_ns() < deadline {
            clock.advance(250_000);
            qos.poll(&mut out);
            record(&mut out, &mut released);
        }
        for (k, id) in ids.iter().enumerate() {
            prop_assert_eq!(&released[k], &submitted[k], "disk {}: FIFO, each exactly once", k);
            let st = qos.stats(*id).unwrap();
            prop_assert_eq!(st.queued_ios, 0);
            prop_assert_eq!(st.released_ios, submitted[k].len() as u64);
        }
    }
}
