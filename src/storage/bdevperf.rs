//! `hostplane bench bdev`: a bdevperf-like load generator on the storage reactors.
//!
//! One job per reactor keeps `qd` requests in flight on its own IO channel for `time` seconds,
//! resubmitting each request from its completion; it records every latency (submit to
//! completion seen by the job) in a log-linear histogram. Prints IOPS, MiB/s, mean and p99
//! latency. With `--fio` on a `file` bdev it then runs `fio --ioengine=io_uring` on the same
//! file with the same block size, queue depth, pattern and O_DIRECT setting, pinned to the same
//! CPU, and prints the ratio.

use super::bdev::{Bdev, IoBuf, IoChannel, IoKind, IoRequest, IoStatus};
use super::client::Rng;
use super::reactor::{PollStatus, Poller, Reactor, ReactorOptions, ReactorSet};
use super::registry::{parse_spec, BackendRegistry};
use super::{ticks, ticks_hz};
use crate::cli::BenchBdevArgs;
use crate::runtime::Error;
use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

/// Access pattern.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Pattern {
    /// Sequential reads.
    Read,
    /// Sequential writes.
    Write,
    /// Random reads.
    Randread,
    /// Random writes.
    Randwrite,
    /// Sequential, 50 % reads.
    Rw,
    /// Random, 50 % reads.
    Randrw,
}

impl Pattern {
    fn fio_name(self) -> &'static str {
        match self {
            Pattern::Read => "read",
            Pattern::Write => "write",
            Pattern::Randread => "randread",
            Pattern::Randwrite => "randwrite",
            Pattern::Rw => "rw",
            Pattern::Randrw => "randrw",
        }
    }
    fn random(self) -> bool {
        matches!(
            self,
            Pattern::Randread | Pattern::Randwrite | Pattern::Randrw
        )
    }
}

const SUB: u32 = 32; // sub-buckets per power of two: ~3 % resolution

/// A log-linear latency histogram (values in ticks).
#[derive(Clone, Debug)]
pub struct Histogram {
    buckets: Vec<u64>,
    count: u64,
    sum: u128,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            buckets: vec![0; (64 * SUB) as usize],
            count: 0,
            sum: 0,
        }
    }
}

impl Histogram {
    #[inline]
    fn index(v: u64) -> usize {
        if v < u64::from(SUB) {
            return v as usize;
        }
        let e = 63 - v.leading_zeros(); // >= 5
        let sub = (v >> (e - 5)) & u64::from(SUB - 1);
        ((e - 4) * SUB) as usize + sub as usize
    }

    fn lower_bound(i: usize) -> u64 {
        let i = i as u64;
        let s = u64::from(SUB);
        if i < s {
            return i;
        }
        let e = i / s + 4;
        let sub = i % s;
        (1u64 << e) | (sub << (e - 5))
    }

    /// Records one value.
    #[inline]
    pub fn record(&mut self, v: u64) {
        let i = Self::index(v).min(self.buckets.len() - 1);
        self.buckets[i] += 1;
        self.count += 1;
        self.sum += u128::from(v);
    }

    /// Adds another histogram.
    pub fn merge(&mut self, o: &Histogram) {
        for (a, b) in self.buckets.iter_mut().zip(&o.buckets) {
            *a += b;
        }
        self.count += o.count;
        self.sum += o.sum;
    }

    /// Values recorded.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// Mean.
    pub fn mean(&self) -> f64 {
        if self.count == 0 {
            0.0
        } else {
            self.sum as f64 / self.count as f64
        }
    }

    /// The value below which a fraction `q` (0..1) of the values lie (bucket lower bound).
    pub fn quantile(&self, q: f64) -> u64 {
        let target = ((self.count as f64) * q).ceil().max(1.0) as u64;
        let mut acc = 0;
        for (i, &b) in self.buckets.iter().enumerate() {
            acc += b;
            if acc >= target {
                return Self::lower_bound(i);
            }
        }
        0
    }
}

/// What a job measured.
#[derive(Clone, Debug, Default)]
pub struct JobResult {
    /// Completed IOs.
    pub ios: u64,
    /// Failed IOs.
    pub errors: u64,
    /// Latencies.
    pub hist: Histogram,
    /// Ticks from first submit to last completion.
    pub ticks: u64,
}

type DoneList = Rc<RefCell<Vec<(IoRequest, IoStatus)>>>;

struct Job {
    ch: IoChannel,
    done: DoneList,
    rng: Rng,
    pattern: Pattern,
    bs: u64,
    units: u64,
    next_seq: u64,
    qd: usize,
    duration: u64,
    start: u64,
    end: u64,
    res: JobResult,
    tx: Option<crossbeam_channel::Sender<JobResult>>,
    started: bool,
}

impl Job {
    fn arm(&mut self, mut req: IoRequest) {
        let unit = if self.pattern.random() {
            self.rng.below(self.units)
        } else {
            let u = self.next_seq;
            self.next_seq = if u + 1 >= self.units { 0 } else { u + 1 };
            u
        };
        req.offset = unit * self.bs;
        req.kind = match self.pattern {
            Pattern::Read | Pattern::Randread => IoKind::Read,
            Pattern::Write | Pattern::Randwrite => IoKind::Write,
            Pattern::Rw | Pattern::Randrw if self.rng.next_u64() & 1 == 0 => IoKind::Read,
            Pattern::Rw | Pattern::Randrw => IoKind::Write,
        };
        let d = self.done.clone();
        req.set_callback(move |r, st| d.borrow_mut().push((r, st)));
        self.ch.submit(req);
    }
}

impl Poller for Job {
    fn poll(&mut self, r: &mut Reactor) -> PollStatus {
        if !self.started {
            self.started = true;
            self.start = ticks();
            self.end = self.start + self.duration;
            let mut fill = Rng::new(u64::from(r.id()) + 1);
            for _ in 0..self.qd {
                let mut b = IoBuf::new(self.bs as usize);
                fill.fill(b.as_mut_slice());
                let req = IoRequest::read(0, b, |_, _| {});
                self.arm(req);
            }
        }
        let n = self.ch.poll();
        if n == 0 {
            return PollStatus::Idle;
        }
        let mut batch = std::mem::take(&mut *self.done.borrow_mut());
        let now = ticks();
        let stopping = now >= self.end || r.stopping();
        for (req, st) in batch.drain(..) {
            if st.is_ok() {
                self.res.ios += 1;
                self.res.hist.record(now.saturating_sub(req.submit_tick()));
            } else {
                self.res.errors += 1;
            }
            if !stopping {
                self.arm(req);
            }
        }
        // Give the (empty) vector back to avoid reallocating it.
        let mut d = self.done.borrow_mut();
        if d.is_empty() {
            *d = batch;
        }
        drop(d);
        if stopping && self.ch.inflight() == 0 {
            if let Some(tx) = self.tx.take() {
                self.res.ticks = now - self.start;
                let _ = tx.send(std::mem::take(&mut self.res));
            }
        }
        PollStatus::Busy
    }
    fn inflight(&self) -> usize {
        self.ch.inflight()
    }
    fn done(&self) -> bool {
        self.tx.is_none() && self.ch.inflight() == 0
    }
}

/// One run's numbers.
#[derive(Clone, Debug, Default)]
pub struct Summary {
    /// IOs per second.
    pub iops: f64,
    /// MiB per second.
    pub mibs: f64,
    /// Mean latency, µs.
    pub mean_us: f64,
    /// p99 latency, µs.
    pub p99_us: f64,
    /// Failed IOs.
    pub errors: u64,
}

/// Starts one job on reactor `h` against `bdev` (opening its channel there); its result goes to
/// `tx` when it ends after `secs` seconds.
pub fn start_job(
    h: &super::reactor::ReactorHandle,
    bdev: &Arc<Bdev>,
    pattern: Pattern,
    bs: u64,
    qd: usize,
    secs: f64,
    tx: crossbeam_channel::Sender<JobResult>,
) -> Result<(), Error> {
    let info = bdev.info().clone();
    let duration = (secs * ticks_hz() as f64) as u64;
    let b = bdev.clone();
    let units = info.size() / bs;
    h.call(move |r| -> Result<(), String> {
        let ch = b.open_channel(r).map_err(|e| e.to_string())?;
        let job = Job {
            ch,
            done: Rc::new(RefCell::new(Vec::with_capacity(qd))),
            rng: Rng::new(0x1234_5678 + u64::from(r.id())),
            pattern,
            bs,
            units,
            // Sequential jobs start spread over the device (reactor i at i/8 of it).
            next_seq: units * u64::from(r.id() % 8) / 8,
            qd,
            duration,
            start: 0,
            end: 0,
            res: JobResult::default(),
            tx: Some(tx),
            started: false,
        };
        r.register(Box::new(job));
        Ok(())
    })??;
    Ok(())
}

/// Starts `n` reactors for a benchmark: on EAL lcores (main on CPU 0, reactor i on CPU
/// (i+1) mod ncpu, `--no-huge`: the data path uses no DPDK memory) or, with `threads`, on plain
/// threads. Drop the set before the returned EAL.
pub fn start_reactors(
    n: usize,
    threads: bool,
    eal_extra: &[String],
    idle_sleep: Option<std::time::Duration>,
) -> Result<(ReactorSet, Option<crate::env::Eal>), Error> {
    let ropts = ReactorOptions {
        idle_sleep,
        ..ReactorOptions::default()
    };
    if threads {
        return Ok((ReactorSet::spawn_threads(n, ropts)?, None));
    }
    let ncpu = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let mut map = vec!["0@0".to_string()];
    for i in 0..n {
        map.push(format!("{}@{}", i + 1, (i + 1) % ncpu));
    }
    let mut args = vec![
        "--lcores".to_string(),
        map.join(","),
        "--main-lcore".into(),
        "0".into(),
    ];
    args.extend(
        [
            "--no-huge",
            "--no-pci",
            "--no-shconf",
            "-m",
            "256",
            "--log-level",
            "lib.eal:warning",
        ]
        .map(String::from),
    );
    args.extend([
        "--file-prefix".into(),
        format!("hp-bench-bdev-{}", std::process::id()),
    ]);
    args.extend(eal_extra.iter().cloned());
    let e = crate::env::Eal::init(&args)?;
    let lcores: Vec<u32> = (1..=n as u32).collect();
    let s = ReactorSet::launch_lcores(&lcores, ropts)?;
    Ok((s, Some(e)))
}

/// Runs the jobs on every reactor of `set` against `bdev`.
pub fn run_jobs(
    set: &ReactorSet,
    bdev: &Arc<Bdev>,
    pattern: Pattern,
    bs: u64,
    qd: usize,
    secs: f64,
) -> Result<Summary, Error> {
    let info = bdev.info().clone();
    if bs == 0 || !bs.is_multiple_of(u64::from(info.block_size)) || bs > info.size() {
        return Err(format!(
            "--bs {bs} must be a non-zero multiple of the block size {} and at most the bdev size",
            info.block_size
        )
        .into());
    }
    if info.read_only && pattern != Pattern::Read && pattern != Pattern::Randread {
        return Err("the bdev is read-only: use --rw read or randread".into());
    }
    let (tx, rx) = crossbeam_channel::unbounded();
    for i in 0..set.len() {
        let h = set.handle(i).ok_or("reactor")?;
        start_job(&h, bdev, pattern, bs, qd, secs, tx.clone())?;
    }
    drop(tx);
    let mut total = JobResult::default();
    let mut max_ticks = 0;
    for _ in 0..set.len() {
        let r = rx
            .recv_timeout(Duration::from_secs_f64(secs + 60.0))
            .map_err(|_| "a job did not finish")?;
        total.ios += r.ios;
        total.errors += r.errors;
        total.hist.merge(&r.hist);
        max_ticks = max_ticks.max(r.ticks);
    }
    let hz = ticks_hz();
    let elapsed = max_ticks as f64 / hz as f64;
    let iops = total.ios as f64 / elapsed.max(1e-9);
    let to_us = |t: f64| t * 1e6 / hz as f64;
    Ok(Summary {
        iops,
        mibs: iops * bs as f64 / (1 << 20) as f64,
        mean_us: to_us(total.hist.mean()),
        p99_us: to_us(total.hist.quantile(0.99) as f64),
        errors: total.errors,
    })
}

fn fio_summary(
    path: &std::path::Path,
    a: &BenchBdevArgs,
    direct: bool,
    size: u64,
    cpu: Option<usize>,
) -> Result<Summary, Error> {
    let mut cmd = std::process::Command::new("fio");
    cmd.args([
        "--name=hp",
        "--ioengine=io_uring",
        "--thread",
        "--numjobs=1",
        "--time_based",
        "--output-format=json",
        "--randrepeat=0",
        "--norandommap",
        "--group_reporting",
    ])
    .arg(format!("--filename={}", path.display()))
    .arg(format!("--rw={}", a.rw.fio_name()))
    .arg(format!("--bs={}", a.bs))
    .arg(format!("--iodepth={}", a.qd))
    .arg(format!("--runtime={}", a.time.ceil() as u64))
    .arg(format!("--size={size}"))
    .arg(format!("--direct={}", u8::from(direct)));
    if let Some(c) = cpu {
        cmd.arg(format!("--cpus_allowed={c}"));
    }
    let out = cmd
        .output()
        .map_err(|e| format!("cannot run fio ({e}): apt-get install fio"))?;
    if !out.status.success() {
        return Err(format!("fio failed: {}", String::from_utf8_lossy(&out.stderr)).into());
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let start = text.find('{').ok_or("fio printed no JSON")?;
    let v: serde_json::Value = serde_json::from_str(&text[start..])?;
    let job = &v["jobs"][0];
    let mut s = Summary::default();
    let mut n = 0.0;
    let mut p99: f64 = 0.0;
    for dir in ["read", "write"] {
        let d = &job[dir];
        let iops = d["iops"].as_f64().unwrap_or(0.0);
        if iops > 0.0 {
            s.iops += iops;
            s.mibs += d["bw_bytes"].as_f64().unwrap_or(0.0) / (1 << 20) as f64;
            s.mean_us += d["lat_ns"]["mean"].as_f64().unwrap_or(0.0) / 1e3 * iops;
            n += iops;
            p99 = p99.max(
                d["clat_ns"]["percentile"]["99.000000"]
                    .as_f64()
                    .unwrap_or(0.0)
                    / 1e3,
            );
        }
        s.errors += job["error"].as_u64().unwrap_or(0);
    }
    s.mean_us /= n.max(1e-9);
    s.p99_us = p99;
    Ok(s)
}

fn print_row(label: &str, s: &Summary, ratio: Option<f64>) {
    println!(
        "{label:<24} {:>12.0} {:>10.1} {:>10.2} {:>10.2} {:>7} {:>7}",
        s.iops,
        s.mibs,
        s.mean_us,
        s.p99_us,
        s.errors,
        ratio
            .map(|r| format!("{r:.3}"))
            .unwrap_or_else(|| "-".into())
    );
}

/// If the file bdev's file is sparse, writes it fully (so both hostplane and fio read real
/// blocks, not holes).
fn prefill(path: &std::path::Path) -> Result<(), Error> {
    use std::io::Write;
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path)?;
    if !m.is_file() || m.blocks() * 512 >= m.len() {
        return Ok(());
    }
    println!(
        "prefilling {} ({} MiB) so reads hit allocated blocks",
        path.display(),
        m.len() >> 20
    );
    let mut f = std::fs::OpenOptions::new().write(true).open(path)?;
    let mut rng = Rng::new(42);
    let mut buf = vec![0u8; 1 << 20];
    let mut left = m.len();
    while left > 0 {
        rng.fill(&mut buf);
        let n = left.min(buf.len() as u64) as usize;
        f.write_all(&buf[..n])?;
        left -= n as u64;
    }
    f.sync_all()?;
    Ok(())
}

/// `hostplane bench bdev`.
pub fn bench(a: &BenchBdevArgs) -> Result<(), Error> {
    let registry = BackendRegistry::with_builtin();
    let mut rbd_params = None;
    let (bdev, file_path, direct) = match (&a.bdev, &a.config, &a.disk) {
        (Some(spec), None, _) => {
            let (t, p) = parse_spec(spec)?;
            if t == "rbd" {
                rbd_params = Some(p.clone());
            }
            let path = (t == "file")
                .then(|| p["path"].as_str().map(std::path::PathBuf::from))
                .flatten();
            let direct = p["direct"].as_bool().unwrap_or(true);
            let b = registry.create(&t, &format!("bench-{t}"), &p, false)?;
            (b, path, direct)
        }
        (None, Some(cfg), Some(disk)) => {
            let c = crate::config::Config::load(cfg)?;
            let (vm, d) = disk.split_once('/').ok_or("--disk VM/DISK")?;
            let ds = c
                .vms
                .iter()
                .find(|v| v.name == vm)
                .and_then(|v| v.disks.iter().find(|x| x.name == d))
                .ok_or_else(|| format!("no disk {disk} in {}", cfg.display()))?;
            let p = serde_json::to_value(&ds.params)?;
            if ds.system == "rbd" {
                rbd_params = Some(p.clone());
            }
            let path = (ds.system == "file")
                .then(|| p["path"].as_str().map(std::path::PathBuf::from))
                .flatten();
            let direct = p["direct"].as_bool().unwrap_or(true);
            (
                registry.create(&ds.system, disk, &p, ds.read_only)?,
                path,
                direct,
            )
        }
        _ => return Err("give --bdev TYPE:key=value,... or --config FILE --disk VM/DISK".into()),
    };
    if let Some(p) = &file_path {
        prefill(p)?;
    }
    let ncpu = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let idle_sleep =
        (a.idle_sleep_us > 0).then(|| std::time::Duration::from_micros(a.idle_sleep_us));
    let (set, eal) = start_reactors(a.reactors, a.threads, &a.eal, idle_sleep)?;
    let info = bdev.info().clone();
    println!(
        "bench bdev: {} ({}, {} MiB, block {} B{}), {:?} bs {} qd {} x {} reactor(s) on {}, {} s, TSC {:.2} GHz",
        bdev.name(),
        bdev.type_name(),
        info.size() >> 20,
        info.block_size,
        if file_path.is_some() { if direct { ", O_DIRECT" } else { ", buffered" } } else { "" },
        a.rw,
        a.bs,
        a.qd,
        a.reactors,
        if a.threads { "threads" } else { "EAL lcores" },
        a.time,
        ticks_hz() as f64 / 1e9
    );
    println!(
        "{:<24} {:>12} {:>10} {:>10} {:>10} {:>7} {:>7}",
        "run", "IOPS", "MiB/s", "mean us", "p99 us", "errors", "ratio"
    );
    let ours = run_jobs(&set, &bdev, a.rw, a.bs, a.qd, a.time)?;
    print_row(&format!("hostplane {}", bdev.type_name()), &ours, None);
    let mut set = set;
    let failed = set.stop();
    drop(set);
    drop(eal);
    // Close the image (and release its lock) before another client benchmarks it.
    drop(bdev);
    if !failed.is_empty() {
        return Err(failed.join("; ").into());
    }
    if a.fio {
        let Some(path) = &file_path else {
            return Err("--fio compares a file bdev: give --bdev file:path=...".into());
        };
        let cpu = if a.threads { None } else { Some(1 % ncpu) };
        let f = fio_summary(path, a, direct, info.size(), cpu)?;
        print_row("fio io_uring", &f, None);
        let ratio = ours.iops / f.iops.max(1e-9);
        println!(
            "ratio hostplane/fio IOPS: {ratio:.3} (target >= 0.9); mean latency {:.2} vs {:.2} us",
            ours.mean_us, f.mean_us
        );
    }
    if a.rbd_bench {
        let Some(p) = &rbd_params else {
            return Err(
                "--rbd-bench compares an rbd bdev: give --bdev rbd:pool=...,image=...".into(),
            );
        };
        // About as long as our run: rbd bench stops after an amount of IO, not a time.
        let total = ((ours.iops * a.time) as u64).max(1000) * a.bs;
        let r = rbd_bench_summary(p, a, total)?;
        print_row("rbd bench", &r, None);
        let ratio = ours.iops / r.iops.max(1e-9);
        println!(
            "ratio hostplane/rbd-bench IOPS: {ratio:.3} (target >= 0.9); mean latency {:.2} us (hostplane)",
            ours.mean_us
        );
    }
    if ours.errors > 0 {
        return Err(format!("{} IOs failed", ours.errors).into());
    }
    Ok(())
}

/// Runs `rbd bench` on the image an rbd bdev spec names, with the same io size, depth and
/// pattern, for `total` bytes. `rbd bench` has no latency output: only IOPS and MiB/s are set.
fn rbd_bench_summary(
    p: &serde_json::Value,
    a: &BenchBdevArgs,
    total: u64,
) -> Result<Summary, Error> {
    let r: crate::storage::rbd::RbdParams = crate::storage::registry::parse_params("rbd", p)?;
    let key = r.cluster_key()?;
    let (io_type, pattern) = match a.rw {
        Pattern::Read => ("read", "seq"),
        Pattern::Write => ("write", "seq"),
        Pattern::Randread => ("read", "rand"),
        Pattern::Randwrite => ("write", "rand"),
        Pattern::Rw => ("readwrite", "seq"),
        Pattern::Randrw => ("readwrite", "rand"),
    };
    let mut cmd = std::process::Command::new("rbd");
    if let Some(f) = &key.config_file {
        cmd.args(["-c", f]);
    }
    if let Some(u) = &key.user_id {
        cmd.args(["--id", u]);
    }
    if let Some(k) = &key.key_file {
        cmd.args(["--keyring", k]);
    }
    for (k, v) in &key.config {
        cmd.arg(format!("--{k}={v}"));
    }
    cmd.args(["bench", "--io-type", io_type, "--io-pattern", pattern])
        .arg(format!("--io-size={}", a.bs))
        .arg(format!("--io-threads={}", a.qd))
        .arg(format!("--io-total={total}"))
        .arg(format!("{}/{}", r.pool_name, r.rbd_name));
    if io_type == "readwrite" {
        cmd.arg("--rw-mix-read=50");
    }
    let out = cmd
        .output()
        .map_err(|e| format!("rbd bench: {e} (apt-get install ceph-common)"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        return Err(format!(
            "rbd bench failed: {}{}",
            text,
            String::from_utf8_lossy(&out.stderr)
        )
        .into());
    }
    // Last line: "elapsed: 3   ops: 16384   ops/sec: 4352.82   bytes/sec: 17 MiB/s"
    let iops = text
        .lines()
        .rev()
        .find_map(|l| {
            let i = l.find("ops/sec:")?;
            l[i + 8..].split_whitespace().next()?.parse::<f64>().ok()
        })
        .ok_or_else(|| format!("rbd bench: no ops/sec in its output: {text}"))?;
    Ok(Summary {
        iops,
        mibs: iops * a.bs as f64 / (1 << 20) as f64,
        mean_us: 0.0,
        p99_us: 0.0,
        errors: 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_quantiles() {
        let mut h = Histogram::default();
        for v in 1..=10_000u64 {
            h.record(v);
        }
        assert_eq!(h.count(), 10_000);
        assert!((h.mean() - 5000.5).abs() < 1e-6);
        let p99 = h.quantile(0.99);
        assert!((9_600..=9_900).contains(&p99), "{p99}");
        let p50 = h.quantile(0.5);
        assert!((4_800..=5_000).contains(&p50), "{p50}");
        for v in [0u64, 1, 31, 32, 33, 63, 64, 1000, 1 << 40, u64::MAX] {
            let i = Histogram::index(v);
            assert!(Histogram::lower_bound(i) <= v, "{v}");
            assert!(i < 64 * SUB as usize);
        }
    }

    #[test]
    fn malloc_on_threads() {
        let set = ReactorSet::spawn_threads(1, ReactorOptions::polite()).unwrap();
        let b = BackendRegistry::with_builtin()
            .create("malloc", "m", &serde_json::json!({"size_mib": 4}), false)
            .unwrap();
        let s = run_jobs(&set, &b, Pattern::Randrw, 4096, 8, 0.2).unwrap();
        assert!(s.iops > 1000.0 && s.errors == 0, "{s:?}");
        let st = b.iostat();
        assert!(st.num_read_ops > 0 && st.num_write_ops > 0);
    }
}
