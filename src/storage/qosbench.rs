//! `hostplane bench qos`: QoS on the real IO path, real clock, malloc bdevs.
//!
//! Everything goes through the same code as `hostplane run`: bdevs are created and limited by
//! [`StorageControl`] (the RPC methods' back end), IO runs on reactors through channels opened
//! on each bdev's owner reactor, metered by [`super::qos_gate`].
//!
//! 1. Limits: one disk at 5,000 / 20,000 / 77,777 IOPS (4 KiB random reads) and 50 MiB/s
//!    (64 KiB random reads), `--time` seconds each after a short warm-up: achieved vs limit.
//! 2. Weights: two disks with weights 3 and 1, both backlogged, sharing a device capped at
//!    `--device-iops`: the ratio of their rates (target 3).
//! 3. Overhead: an unlimited disk with QoS on (metered, a limit far above what it can reach) vs
//!    one with QoS off, alternating, best of two runs each: the ratio (target >= 0.95).
//!
//! Each line also prints the process's CPU share during the measurement: the reactor spins, so
//! well below 100 % means it was descheduled (a loaded machine), and a token bucket then loses
//! what it cannot save beyond its burst. Ends with a `RESULT {json}` line for scripts and tests.

use super::bdevperf::{start_job, start_reactors, JobResult, Pattern};
use super::manager::{CreateBdev, DiskQosSection, QosDeviceSection, QosSection, StorageControl};
use super::qos::QosLimitParams;
use crate::cli::BenchQosArgs;
use crate::runtime::Error;
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::{Duration, Instant};

const WARMUP: Duration = Duration::from_millis(500);

thread_local! {
    /// CPU share of the process during the last measurement.
    static LAST_CPU_SHARE: std::cell::Cell<f64> = const { std::cell::Cell::new(0.0) };
}

fn last_cpu_share() -> f64 {
    LAST_CPU_SHARE.with(|c| c.get())
}

fn malloc(c: &StorageControl, name: &str, qos: DiskQosSection) -> Result<(), Error> {
    c.create(CreateBdev {
        name: name.into(),
        system: "malloc".into(),
        params: json!({"size_mib": 64, "block_size": 4096}),
        read_only: false,
        reactor: Some(0),
        qos,
        saved_as: None,
        uuid: None,
    })?;
    Ok(())
}

fn ops_bytes(c: &StorageControl, name: &str) -> Result<(u64, u64), Error> {
    let (b, _) = c.bdev(name).ok_or("bench bdev vanished")?;
    let s = b.iostat();
    Ok((
        s.num_read_ops + s.num_write_ops,
        s.bytes_read + s.bytes_written,
    ))
}

/// Runs one job per named bdev for warm-up + `secs`; returns each one's (IOPS, bytes/s) over
/// the measured window.
fn measure(
    c: &StorageControl,
    names: &[&str],
    bs: u64,
    qd: usize,
    secs: f64,
) -> Result<Vec<(f64, f64)>, Error> {
    let (tx, rx) = crossbeam_channel::unbounded::<JobResult>();
    let total = WARMUP.as_secs_f64() + secs + 0.2;
    for n in names {
        let (b, reactor) = c.bdev(n).ok_or("bench bdev vanished")?;
        start_job(
            &c.handle(reactor)?,
            &b,
            Pattern::Randread,
            bs,
            qd,
            total,
            tx.clone(),
        )?;
    }
    drop(tx);
    std::thread::sleep(WARMUP);
    let cpu0 = cpu_secs();
    let t0 = Instant::now();
    let s0: Vec<(u64, u64)> = names
        .iter()
        .map(|n| ops_bytes(c, n))
        .collect::<Result<_, _>>()?;
    std::thread::sleep(Duration::from_secs_f64(secs));
    let s1: Vec<(u64, u64)> = names
        .iter()
        .map(|n| ops_bytes(c, n))
        .collect::<Result<_, _>>()?;
    let dt = t0.elapsed().as_secs_f64();
    let share = (cpu_secs() - cpu0) / dt;
    LAST_CPU_SHARE.with(|c| c.set(share));
    for _ in names {
        let r = rx
            .recv_timeout(Duration::from_secs_f64(total + 60.0))
            .map_err(|_| "a bench job did not finish")?;
        if r.errors > 0 {
            return Err(format!("{} IOs failed", r.errors).into());
        }
    }
    // Let the channels close (the jobs' pollers are removed after their last completion).
    for n in names {
        let (b, _) = c.bdev(n).ok_or("bench bdev vanished")?;
        let deadline = Instant::now() + Duration::from_secs(5);
        while b.open_channels() > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    Ok(s0
        .iter()
        .zip(&s1)
        .map(|(a, b)| ((b.0 - a.0) as f64 / dt, (b.1 - a.1) as f64 / dt))
        .collect())
}

/// CPU seconds this process has used (the reactor spins, so during a measurement its share of
/// one CPU is about this over wall time: below ~100 % the reactor was descheduled).
fn cpu_secs() -> f64 {
    // SAFETY: getrusage fills the struct we pass; RUSAGE_SELF is always valid.
    let ru = unsafe {
        let mut ru: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut ru);
        ru
    };
    let t = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
    t(ru.ru_utime) + t(ru.ru_stime)
}

fn pct(achieved: f64, target: f64) -> f64 {
    (achieved / target - 1.0) * 100.0
}

/// `hostplane bench qos`.
pub fn bench(a: &BenchQosArgs) -> Result<(), Error> {
    let (mut set, eal) = start_reactors(1, a.threads, &a.eal, None)?;
    let handles: Vec<_> = (0..set.len()).filter_map(|i| set.handle(i)).collect();
    let on = StorageControl::new(handles.clone(), set.monitor(), 0, &QosSection::default())?;
    let off = StorageControl::new(
        handles,
        set.monitor(),
        0,
        &QosSection {
            enabled: false,
            ..QosSection::default()
        },
    )?;
    let r = run(a, &on, &off);
    drop((on, off));
    let failed = set.stop();
    drop(set);
    drop(eal);
    if !failed.is_empty() {
        return Err(failed.join("; ").into());
    }
    let summary = r?;
    println!("RESULT {summary}");
    Ok(())
}

fn run(
    a: &BenchQosArgs,
    on: &Arc<StorageControl>,
    off: &Arc<StorageControl>,
) -> Result<Value, Error> {
    println!(
        "bench qos: malloc bdevs, random reads, qd {}, {} s per measurement after {} ms warm-up, 1 reactor on {}, slice 1 ms, TSC {:.2} GHz",
        a.qd,
        a.time,
        WARMUP.as_millis(),
        if a.threads { "a thread" } else { "an EAL lcore" },
        super::ticks_hz() as f64 / 1e9
    );
    // 1. Limits.
    let mut limits = Vec::new();
    let cases: [(&str, QosLimitParams, u64); 4] = [
        (
            "rw_ios_per_sec=5000",
            QosLimitParams {
                rw_ios_per_sec: Some(5000),
                ..Default::default()
            },
            4096,
        ),
        (
            "rw_ios_per_sec=20000",
            QosLimitParams {
                rw_ios_per_sec: Some(20000),
                ..Default::default()
            },
            4096,
        ),
        (
            "rw_ios_per_sec=77777",
            QosLimitParams {
                rw_ios_per_sec: Some(77777),
                ..Default::default()
            },
            4096,
        ),
        (
            "rw_mbytes_per_sec=50",
            QosLimitParams {
                rw_mbytes_per_sec: Some(50),
                ..Default::default()
            },
            65536,
        ),
    ];
    malloc(on, "qos-limit", DiskQosSection::default())?;
    for (label, p, bs) in cases {
        on.set_qos_limit("qos-limit", p)?;
        let (iops, bps) = measure(on, &["qos-limit"], bs, a.qd, a.time)?[0];
        let (achieved, target, unit) = match p.rw_ios_per_sec {
            Some(t) => (iops, t as f64, "IOPS"),
            None => (
                bps / (1u64 << 20) as f64,
                p.rw_mbytes_per_sec.unwrap_or(0) as f64,
                "MiB/s",
            ),
        };
        let err = pct(achieved, target);
        let cpu = last_cpu_share() * 100.0;
        println!(
            "limit {label:<22} bs {bs:>5}: achieved {achieved:>10.1} {unit:<5} (limit {target}), error {err:+.3} % (target within 1 %), reactor CPU {cpu:.0} %"
        );
        limits.push(json!({"limit": label, "target": target, "achieved": achieved, "unit": unit, "error_pct": err, "reactor_cpu_pct": cpu}));
    }
    on.set_qos_limit(
        "qos-limit",
        QosLimitParams {
            rw_ios_per_sec: Some(0),
            rw_mbytes_per_sec: Some(0),
            ..Default::default()
        },
    )?;
    on.delete("qos-limit", None)?;

    // 2. Weights 3:1 on a capped device.
    on.set_device(&QosDeviceSection {
        name: "bench-dev".into(),
        ios_per_sec: a.device_iops,
        mbytes_per_sec: 0,
        reactor: Some(0),
    })?;
    for (n, w) in [("qos-w3", 3), ("qos-w1", 1)] {
        malloc(
            on,
            n,
            DiskQosSection {
                weight: Some(w),
                device: Some("bench-dev".into()),
                ..Default::default()
            },
        )?;
    }
    let r = measure(on, &["qos-w3", "qos-w1"], 4096, a.qd, a.time)?;
    let ratio = r[0].0 / r[1].0.max(1e-9);
    let total = r[0].0 + r[1].0;
    let ratio_err = pct(ratio, 3.0);
    let cpu = last_cpu_share() * 100.0;
    println!(
        "weights 3:1 on a device of {} IOPS: disk w3 {:.0} IOPS, disk w1 {:.0} IOPS, total {:.0} ({:+.2} % of capacity), ratio {ratio:.3} (target 3, error {ratio_err:+.2} %, within 5 %), reactor CPU {cpu:.0} %",
        a.device_iops,
        r[0].0,
        r[1].0,
        total,
        pct(total, a.device_iops as f64)
    );
    for n in ["qos-w3", "qos-w1"] {
        on.delete(n, None)?;
    }
    on.delete_device("bench-dev")?;

    // 3. Overhead: metered (limit far above reach) vs not metered, alternating.
    malloc(
        on,
        "qos-on",
        DiskQosSection {
            rw_ios_per_sec: Some(1_000_000_000),
            ..Default::default()
        },
    )?;
    malloc(off, "qos-off", DiskQosSection::default())?;
    let secs = a.time.min(5.0);
    let (mut best_on, mut best_off) = (0f64, 0f64);
    for _ in 0..2 {
        best_off = best_off.max(measure(off, &["qos-off"], 4096, a.qd, secs)?[0].0);
        best_on = best_on.max(measure(on, &["qos-on"], 4096, a.qd, secs)?[0].0);
    }
    let overhead = best_on / best_off.max(1e-9);
    println!(
        "overhead: unlimited 4 KiB random reads, QoS enabled {best_on:.0} IOPS vs disabled {best_off:.0} IOPS (best of 2 each), ratio {overhead:.3} (target >= 0.95)"
    );
    on.delete("qos-on", None)?;
    off.delete("qos-off", None)?;
    Ok(json!({
        "limits": limits,
        "weights": {"device_iops": a.device_iops, "w3_iops": r[0].0, "w1_iops": r[1].0, "ratio": ratio, "error_pct": ratio_err, "reactor_cpu_pct": cpu},
        "overhead": {"enabled_iops": best_on, "disabled_iops": best_off, "ratio": overhead},
    }))
}
