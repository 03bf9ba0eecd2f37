//! `hostplane bench macnat`: MAC-NAT against a plain MAC swap on `net_null`, in one process, so
//! the printed ratio compares like with like on this machine.
//!
//! net_null hands out mbufs without real headers, so each worker writes a 64 B Ethernet/IPv4/UDP
//! frame (source MAC and IP of a table entry, in a random order over the table) into every
//! received mbuf before processing it — standing in for the NIC's DMA. Both modes do exactly the
//! same fill; they differ only in the processing: swap the two MACs (baseline) or the full
//! MAC-NAT egress path (parse, hashed lookup, checks, rewrite).

use crate::cli::BenchMacnatArgs;
use crate::env::ethdev::{RxQueue, TxQueue};
use crate::env::{lcore, tsc_hz, Eal, EthPort, Mbuf, MbufBurst, Mempool, PortConfig};
use crate::net::dataplane::{NetLcore, PortRole};
use crate::net::macnat::{MacNatEntry, MacNatTable};
use crate::net::nat::{Disposition, Policy};
use crate::net::packet::{IpKey, MacAddr};
use crate::net::stats::LcoreCounters;
use crate::runtime::Error;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

/// What a worker does to each frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    MacSwap,
    MacNat,
}

struct Queues {
    rx: RxQueue,
    tx: TxQueue,
}

fn entry_ip(i: u32) -> u32 {
    0x0a00_0000 + i + 1
}

fn entry_local(i: u32) -> MacAddr {
    let b = i.to_be_bytes();
    MacAddr([0x52, 0x54, b[0], b[1], b[2], b[3]])
}

/// A deterministic permutation-ish sequence of entry indexes (xorshift), so lookups are spread
/// over the whole table the way many flows would be.
fn index_sequence(entries: u32, len: usize) -> Vec<u32> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % u64::from(entries)) as u32
        })
        .collect()
}

#[inline(always)]
fn fill(frame: &mut [u8], template: &[u8; 64], idx: u32) {
    if frame.len() < 64 {
        return;
    }
    frame[..42].copy_from_slice(&template[..42]);
    frame[6..12].copy_from_slice(&entry_local(idx).0);
    frame[26..30].copy_from_slice(&entry_ip(idx).to_be_bytes());
}

#[allow(clippy::too_many_arguments)]
fn worker(
    q: Queues,
    mode: Mode,
    table: Option<crate::net::macnat::MacNatReader>,
    policy: Policy,
    seq: Arc<Vec<u32>>,
    offset: usize,
    stop: Arc<AtomicBool>,
    done: Arc<AtomicU64>,
    back: mpsc::Sender<Queues>,
) -> i32 {
    let template: [u8; 64] = {
        let f = crate::net::frames::ipv4_udp(
            MacAddr([2, 0, 0, 0, 0, 0xfe]),
            entry_local(0),
            [10, 0, 0, 1],
            [10, 9, 9, 9],
            64,
        );
        let mut t = [0u8; 64];
        t.copy_from_slice(&f[..64]);
        t
    };
    let mut pos = offset % seq.len().max(1);
    // The "NIC" writes each frame (same cost in both modes: the closure works on locals, so
    // it compiles to the same loop whether it is called here or from inside the dataplane).
    let mut nic = |frames: &mut [Mbuf]| {
        let (seq, mut p) = (&seq[..], pos);
        for m in frames {
            if let Some(&idx) = seq.get(p) {
                fill(m.data_mut(), &template, idx);
            }
            p = if p + 1 >= seq.len() { 0 } else { p + 1 };
        }
        pos = p;
    };
    let (q, sent, ok) = match (mode, table) {
        (Mode::MacNat, Some(reader)) => {
            // The dataplane's own lcore loop, on a VM-side port whose frames leave on the uplink.
            let out_port = q.tx.port();
            let mut tx: Vec<Option<TxQueue>> = (0..out_port).map(|_| None).collect();
            tx.push(Some(q.tx));
            let mut lcore = NetLcore {
                rx: vec![(q.rx, PortRole::Vm)],
                tx,
                policy,
                table: reader,
                counters: Arc::new(LcoreCounters::default()),
            };
            lcore.run_with(&stop, &mut nic);
            let c = lcore.counters.snapshot();
            // Every frame must have been translated and sent (bench setup check).
            let ok =
                c.egress_translated == c.rx && c.tx == c.rx && c.drops.iter().all(|(_, d)| *d == 0);
            let (Some((rx, _)), Some(Some(tx))) = (lcore.rx.pop(), lcore.tx.pop()) else {
                return 1;
            };
            (Queues { rx, tx }, c.tx, ok)
        }
        _ => {
            // testpmd's macswap: swap in place, send the burst, free what the driver refused.
            let mut q = q;
            let mut rxb = MbufBurst::new();
            let mut sent: u64 = 0;
            while !stop.load(Ordering::Relaxed) {
                if q.rx.rx_burst(&mut rxb) == 0 {
                    continue;
                }
                nic(rxb.as_mut_slice());
                for m in rxb.as_mut_slice() {
                    let d = m.data_mut();
                    if d.len() >= 12 {
                        let mut tmp = [0u8; 6];
                        tmp.copy_from_slice(&d[0..6]);
                        d.copy_within(6..12, 0);
                        d[6..12].copy_from_slice(&tmp);
                    }
                }
                sent += q.tx.tx_burst(&mut rxb) as u64;
                rxb.drop_all();
            }
            (q, sent, true)
        }
    };
    done.fetch_add(sent, Ordering::SeqCst);
    let _ = back.send(q);
    if ok {
        0
    } else {
        1
    }
}

/// Cycles per read of a random 64 B line from a `bytes`-sized table (2 MiB aligned, transparent
/// huge pages advised, as the MAC-NAT table), with a prefetch issued 16 reads ahead and a little
/// work per read, and the same loop over a cache-resident 16 KiB table. The difference is what
/// memory alone adds per lookup at that table size on this machine, however well the lookups
/// are prefetched: the floor under MAC-NAT's cost at 10^6 entries.
fn memory_probe(bytes: usize) -> (f64, f64) {
    const AHEAD: usize = 16;
    let lines = bytes / 64;
    let Some(map) = crate::net::ipv4map::HugeZeroed::new(bytes).filter(|_| lines >= 1024) else {
        return (f64::NAN, f64::NAN);
    };
    // SAFETY: the mapping holds `bytes` zero-filled bytes (a valid [u64]), 2 MiB aligned, and
    // nothing else refers to it while `map` lives (it outlives `table`).
    let table: &mut [u64] =
        unsafe { std::slice::from_raw_parts_mut(map.as_ptr().cast::<u64>(), bytes / 8) };
    for (i, v) in table.iter_mut().enumerate() {
        *v = i as u64;
    }
    let n = 2_000_000usize;
    let idx: Vec<usize> = index_sequence(lines as u32, n)
        .into_iter()
        .map(|l| l as usize * 8)
        .collect();
    let run = |mask: usize| -> f64 {
        let mut acc = 0u64;
        let t0 = crate::env::tsc();
        for k in 0..n {
            if let Some(&a) = idx.get(k + AHEAD) {
                let p = table.as_ptr().wrapping_add(a & mask);
                #[cfg(target_arch = "x86_64")]
                // SAFETY: prefetch is a hint that never faults; p points into the table.
                unsafe {
                    std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(p.cast())
                };
                #[cfg(not(target_arch = "x86_64"))]
                let _ = p;
            }
            // About the arithmetic a lookup does around its read (hash, compares).
            let v = table[idx[k] & mask];
            acc = acc.wrapping_add(std::hint::black_box(
                v.wrapping_mul(0x9e37_79b9).rotate_left(7),
            ));
        }
        std::hint::black_box(acc);
        (crate::env::tsc() - t0) as f64 / n as f64
    };
    let cold = run(usize::MAX);
    let hot = run(2047);
    drop(map);
    (cold, hot)
}

struct Measurement {
    mpps: f64,
    cycles_per_pkt: f64,
}

#[allow(clippy::too_many_arguments)]
fn measure(
    lcores: &[u32],
    queues: &mut Vec<Queues>,
    mode: Mode,
    table: Option<&MacNatTable>,
    policy: Policy,
    seq: &Arc<Vec<u32>>,
    secs: f64,
) -> Result<Measurement, Error> {
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let (tx, rx) = mpsc::channel();
    let mut handles = Vec::new();
    for (i, lc) in lcores.iter().enumerate() {
        let q = queues.remove(0);
        let reader = match table {
            Some(t) => Some(t.reader(i).ok_or("reader slot")?),
            None => None,
        };
        let (stop, done, back, seq) = (stop.clone(), done.clone(), tx.clone(), seq.clone());
        let offset = i * 7919;
        handles.push(lcore::launch(*lc, move || {
            worker(q, mode, reader, policy, seq, offset, stop, done, back)
        })?);
    }
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_secs_f64(secs));
    stop.store(true, Ordering::SeqCst);
    let mut failed = false;
    for h in handles {
        failed |= h.join().map(|rc| rc != 0).unwrap_or(true);
    }
    let elapsed = t0.elapsed().as_secs_f64();
    drop(tx);
    queues.extend(rx.iter());
    if failed {
        return Err(format!(
            "{mode:?}: a worker saw frames that were not translated (bench setup is wrong)"
        )
        .into());
    }
    let pkts = done.load(Ordering::SeqCst) as f64;
    let mpps = pkts / elapsed / 1e6;
    let cycles = tsc_hz() as f64 * elapsed * lcores.len() as f64 / pkts.max(1.0);
    Ok(Measurement {
        mpps,
        cycles_per_pkt: cycles,
    })
}

/// One mode at one lcore count over the rounds.
struct Series {
    lcores: usize,
    /// Table size, None for the swap.
    entries: Option<usize>,
    /// Mpps per round.
    mpps: Vec<f64>,
    /// Per round, MAC-NAT over the swap measured just before it.
    ratios: Vec<f64>,
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    match s.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => s[n / 2],
        n => (s[n / 2 - 1] + s[n / 2]) / 2.0,
    }
}

fn print_row(
    round: usize,
    mode: &str,
    lcores: usize,
    n: Option<usize>,
    m: &Measurement,
    ratio: Option<f64>,
) {
    println!(
        "{:<10} {:>8} {:>10} {:>11.2} {:>14.1} {:>9}   (round {})",
        mode,
        lcores,
        n.map_or("-".to_string(), |n| n.to_string()),
        m.mpps,
        m.cycles_per_pkt,
        ratio.map_or("1.00".to_string(), |r| format!("{r:.3}")),
        round + 1
    );
}

/// Runs the MAC-NAT benchmark and prints Mpps, cycles/packet and ratios against MAC swap.
pub fn macnat(args: &BenchMacnatArgs) -> Result<(), Error> {
    let workers_wanted = if args.scaling { 2 } else { 1 };
    let mut eal_args: Vec<String> = Vec::new();
    match (&args.eal.lcore_list, &args.eal.lcores) {
        (Some(l), _) => eal_args.extend(["-l".into(), l.clone()]),
        (None, Some(m)) => eal_args.extend(["--lcores".into(), m.clone()]),
        // The main lcore only sleeps; put it on CPU 0 beside the first worker.
        (None, None) if args.scaling => eal_args.extend(["--lcores".into(), "0@0,1@0,2@1".into()]),
        (None, None) => eal_args.extend(["--lcores".into(), "0@0,1@1".into()]),
    }
    if let Some(m) = args.eal.main_lcore {
        eal_args.extend(["--main-lcore".into(), m.to_string()]);
    }
    eal_args.extend([
        "--vdev".into(),
        "net_null0".into(),
        "--vdev".into(),
        "net_null1".into(),
    ]);
    eal_args.extend(args.eal.eal.iter().cloned());
    let hp = !eal_args.iter().any(|a| a == "--no-huge") && crate::runtime::hugepages_free() > 0;
    if !hp && !eal_args.iter().any(|a| a == "--no-huge") {
        eal_args.extend([
            "--no-huge".into(),
            "--no-shconf".into(),
            "-m".into(),
            "512".into(),
        ]);
    }
    let eal = Eal::init(&eal_args)?;
    let workers: Vec<u32> = eal.worker_lcores();
    if workers.len() < workers_wanted {
        return Err(format!(
            "need {workers_wanted} worker lcores, EAL has {}",
            workers.len()
        )
        .into());
    }
    let rx_port = EthPort::by_name("net_null0")?;
    let tx_port = EthPort::by_name("net_null1")?;
    let pool = Mempool::pktmbuf("bench_pool", 16383, 256, 2048 + 128, -1)?;
    let pc = PortConfig {
        rx_queues: 2,
        tx_queues: 2,
        rx_desc: 1024,
        tx_desc: 1024,
        promiscuous: false,
    };
    let (rxqs, _) = rx_port.configure(&pc, pool)?;
    let (_, txqs) = tx_port.configure(&pc, pool)?;
    rx_port.start()?;
    tx_port.start()?;
    let all_queues: Vec<Queues> = rxqs
        .into_iter()
        .zip(txqs)
        .map(|(rx, tx)| Queues { rx, tx })
        .collect();
    let mut queues = all_queues;

    let policy = Policy {
        uplink: tx_port.id(),
        flood_port: None,
        unknown_ip: Disposition::Drop,
        spoofed: Disposition::Drop,
        control: Disposition::Drop,
    };
    println!(
        "bench macnat: net_null -> net_null, 64 B Ethernet/IPv4/UDP, bursts of 32, {}, TSC {:.2} GHz, {} s per run",
        if hp { "hugepages" } else { "no hugepages (--no-huge: expect ~2x lower absolute numbers)" },
        tsc_hz() as f64 / 1e9,
        args.time
    );
    println!(
        "{:<10} {:>8} {:>10} {:>11} {:>14} {:>9}",
        "mode", "lcores", "entries", "Mpps", "cycles/pkt", "ratio"
    );
    let rounds = args.rounds.max(1);
    let mut summary: Vec<Series> = Vec::new();
    let lcore_sets: Vec<Vec<u32>> = if args.scaling {
        vec![workers[..1].to_vec(), workers[..2].to_vec()]
    } else {
        vec![workers[..1].to_vec()]
    };
    let mut tables = Vec::new();
    for &n in &args.entries {
        let n32 = u32::try_from(n).map_err(|_| "entries too large")?.max(1);
        let entries: Vec<MacNatEntry> = (0..n32)
            .map(|i| MacNatEntry {
                ip: IpKey::V4(entry_ip(i).to_be_bytes()),
                local: entry_local(i),
                global: MacAddr([2, 0, 0, 0, 0, 1]),
                port: rx_port.id(),
            })
            .collect();
        let table = MacNatTable::new(&entries, workers_wanted)?;
        let seq = Arc::new(index_sequence(n32, (n32 as usize).clamp(4096, 1 << 20)));
        tables.push((n, table, seq));
    }
    let seq1 = Arc::new(index_sequence(1, 1));
    for lcs in &lcore_sets {
        let mut swaps = Vec::new();
        let mut nats: Vec<(Vec<f64>, Vec<f64>)> = vec![(Vec::new(), Vec::new()); tables.len()];
        for round in 0..rounds {
            let s = measure(
                lcs,
                &mut queues,
                Mode::MacSwap,
                None,
                policy,
                &seq1,
                args.time,
            )?;
            print_row(round, "macswap", lcs.len(), None, &s, None);
            for ((n, table, seq), (mpps, ratios)) in tables.iter().zip(nats.iter_mut()) {
                let m = measure(
                    lcs,
                    &mut queues,
                    Mode::MacNat,
                    Some(table),
                    policy,
                    seq,
                    args.time,
                )?;
                let ratio = m.mpps / s.mpps.max(1e-9);
                print_row(round, "macnat", lcs.len(), Some(*n), &m, Some(ratio));
                mpps.push(m.mpps);
                ratios.push(ratio);
            }
            swaps.push(s.mpps);
        }
        summary.push(Series {
            lcores: lcs.len(),
            entries: None,
            mpps: swaps,
            ratios: Vec::new(),
        });
        for ((n, _, _), (mpps, ratios)) in tables.iter().zip(nats) {
            summary.push(Series {
                lcores: lcs.len(),
                entries: Some(*n),
                mpps,
                ratios,
            });
        }
    }
    println!(
        "summary over {rounds} rounds. median: Mpps, and MAC-NAT / the swap measured just before it; best: fastest round of each mode, and their ratio"
    );
    println!(
        "{:<10} {:>8} {:>10} {:>11} {:>14} {:>9} {:>15} {:>11} {:>14} {:>10}",
        "mode",
        "lcores",
        "entries",
        "Mpps",
        "cycles/pkt",
        "ratio",
        "ratio min-max",
        "best Mpps",
        "best cyc/pkt",
        "best ratio"
    );
    let hz = tsc_hz() as f64;
    let cycles = |lcores: usize, mpps: f64| hz * lcores as f64 / (mpps * 1e6).max(1.0);
    let best = |v: &[f64]| v.iter().cloned().fold(0.0, f64::max);
    for r in &summary {
        let (m, b) = (median(&r.mpps), best(&r.mpps));
        let swap_best = summary
            .iter()
            .find(|s| s.lcores == r.lcores && s.entries.is_none())
            .map_or(f64::NAN, |s| best(&s.mpps));
        let (entries, ratio, range) = match r.entries {
            None => ("-".to_string(), "1.00".to_string(), String::new()),
            Some(n) => (
                n.to_string(),
                format!("{:.3}", median(&r.ratios)),
                format!(
                    "{:.3}-{:.3}",
                    r.ratios.iter().cloned().fold(f64::INFINITY, f64::min),
                    best(&r.ratios)
                ),
            ),
        };
        println!(
            "{:<10} {:>8} {:>10} {:>11.2} {:>14.1} {:>9} {:>15} {:>11.2} {:>14.1} {:>10.3}",
            if r.entries.is_some() {
                "macnat"
            } else {
                "macswap"
            },
            r.lcores,
            entries,
            m,
            cycles(r.lcores, m),
            ratio,
            range,
            b,
            cycles(r.lcores, b),
            b / swap_best
        );
    }
    if args.scaling {
        for two in summary.iter().filter(|r| r.lcores == 2) {
            if let Some(one) = summary
                .iter()
                .find(|r| r.lcores == 1 && r.entries == two.entries)
            {
                println!(
                    "scaling {} {}: 2 lcores / 1 lcore = {:.2}x",
                    if two.entries.is_some() {
                        "macnat"
                    } else {
                        "macswap"
                    },
                    two.entries.map_or("-".to_string(), |n| n.to_string()),
                    median(&two.mpps) / median(&one.mpps).max(1e-9)
                );
            }
        }
    }
    // The memory floor, on the first worker's CPU, for the largest table measured.
    if let Some(&n) = args.entries.iter().max().filter(|&&n| n >= 100_000) {
        let bytes = (n * 3 / 2 / 3).next_power_of_two() * 64;
        let (tx, rx) = mpsc::channel();
        let h = lcore::launch(workers[0], move || {
            let _ = tx.send(memory_probe(bytes));
            0
        })?;
        let _ = h.join();
        if let Ok((cold, hot)) = rx.recv() {
            println!(
                "memory probe: random 64 B lines from a {} MiB table (the bucket array of {n} entries), prefetched {} ahead: {cold:.1} cycles/read vs {hot:.1} from cache: memory adds {:.1} cycles per lookup at best",
                bytes >> 20,
                16,
                cold - hot
            );
        }
    }
    rx_port.stop()?;
    tx_port.stop()?;
    drop(eal);
    Ok(())
}
