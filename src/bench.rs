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
use crate::env::{lcore, tsc_hz, Eal, EthPort, MbufBurst, Mempool, PortConfig};
use crate::net::macnat::{MacNatEntry, MacNatTable};
use crate::net::nat::{self, Disposition, Policy, Verdict};
use crate::net::packet::{IpKey, MacAddr};
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
    mut q: Queues,
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
    let mut table = table;
    if let Some(t) = table.as_mut() {
        t.online();
    }
    let mut rxb = MbufBurst::new();
    let mut txb = MbufBurst::new();
    let mut pos = offset % seq.len().max(1);
    let mut sent: u64 = 0;
    let mut bad: u64 = 0;
    while !stop.load(Ordering::Relaxed) {
        if q.rx.rx_burst(&mut rxb) == 0 {
            continue;
        }
        // The "NIC" writes each frame (same cost in both modes).
        for m in rxb.as_mut_slice() {
            fill(m.data_mut(), &template, seq[pos]);
            pos = if pos + 1 == seq.len() { 0 } else { pos + 1 };
        }
        match (mode, table.as_mut()) {
            (Mode::MacNat, Some(reader)) => {
                let t = reader.get();
                // As the dataplane does: a prefetch pass over the burst, then the work.
                for m in rxb.as_slice() {
                    nat::prefetch_egress(m.data(), t);
                }
                while let Some(mut m) = rxb.pop_front() {
                    match nat::egress(m.data_mut(), 1, t, &policy) {
                        Verdict::Forward {
                            translated: true, ..
                        } => {
                            let _ = txb.push(m);
                        }
                        _ => bad += 1,
                    }
                }
                reader.quiescent();
            }
            _ => {
                while let Some(mut m) = rxb.pop_front() {
                    let d = m.data_mut();
                    if d.len() >= 12 {
                        let mut tmp = [0u8; 6];
                        tmp.copy_from_slice(&d[0..6]);
                        d.copy_within(6..12, 0);
                        d[6..12].copy_from_slice(&tmp);
                    }
                    let _ = txb.push(m);
                }
            }
        }
        sent += q.tx.tx_burst(&mut txb) as u64;
        txb.drop_all();
    }
    if let Some(t) = table.as_mut() {
        t.offline();
    }
    done.fetch_add(sent, Ordering::SeqCst);
    let _ = back.send(q);
    if bad > 0 {
        1
    } else {
        0
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
    let table: &mut [u64] = unsafe { std::slice::from_raw_parts_mut(map.as_ptr().cast::<u64>(), bytes / 8) };
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
            acc = acc.wrapping_add(std::hint::black_box(v.wrapping_mul(0x9e37_79b9).rotate_left(7)));
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
    let mut rows: Vec<(String, usize, String, Measurement, Option<f64>)> = Vec::new();
    let lcore_sets: Vec<Vec<u32>> = if args.scaling {
        vec![workers[..1].to_vec(), workers[..2].to_vec()]
    } else {
        vec![workers[..1].to_vec()]
    };
    for lcs in &lcore_sets {
        let seq1 = Arc::new(index_sequence(1, 1));
        let swap = |queues: &mut Vec<Queues>| {
            measure(lcs, queues, Mode::MacSwap, None, policy, &seq1, args.time)
        };
        let base1 = swap(&mut queues)?;
        let mut nat_rows = Vec::new();
        for &n in &args.entries {
            let n32 = u32::try_from(n).map_err(|_| "entries too large")?.max(1);
            let entries: Vec<MacNatEntry> = (0..n32)
                .map(|i| MacNatEntry {
                    ip: IpKey::V4(entry_ip(i).to_be_bytes()),
                    local: entry_local(i),
                    global: MacAddr([2, 0, 0, 0, 0, 1]),
                    port: 1,
                })
                .collect();
            let table = MacNatTable::new(&entries, lcs.len())?;
            let seq = Arc::new(index_sequence(n32, (n32 as usize).clamp(4096, 1 << 20)));
            let m = measure(
                lcs,
                &mut queues,
                Mode::MacNat,
                Some(&table),
                policy,
                &seq,
                args.time,
            )?;
            nat_rows.push((n, m));
        }
        let base2 = swap(&mut queues)?;
        let base = Measurement {
            mpps: (base1.mpps + base2.mpps) / 2.0,
            cycles_per_pkt: (base1.cycles_per_pkt + base2.cycles_per_pkt) / 2.0,
        };
        let drift = (base1.mpps - base2.mpps).abs() / base.mpps.max(1e-9);
        println!(
            "{:<10} {:>8} {:>10} {:>11.2} {:>14.1} {:>9}",
            "macswap",
            lcs.len(),
            "-",
            base.mpps,
            base.cycles_per_pkt,
            "1.00"
        );
        for (n, m) in nat_rows {
            let ratio = m.mpps / base.mpps.max(1e-9);
            println!(
                "{:<10} {:>8} {:>10} {:>11.2} {:>14.1} {:>9.3}",
                "macnat",
                lcs.len(),
                n,
                m.mpps,
                m.cycles_per_pkt,
                ratio
            );
            rows.push(("macnat".into(), lcs.len(), n.to_string(), m, Some(ratio)));
        }
        println!(
            "  (baseline measured before and after: {:.2} / {:.2} Mpps, drift {:.1} %)",
            base1.mpps,
            base2.mpps,
            drift * 100.0
        );
        rows.push(("macswap".into(), lcs.len(), "-".into(), base, None));
    }
    if args.scaling {
        let one: Vec<&(String, usize, String, Measurement, Option<f64>)> =
            rows.iter().filter(|r| r.1 == 1).collect();
        for r2 in rows.iter().filter(|r| r.1 == 2) {
            if let Some(r1) = one.iter().find(|r| r.0 == r2.0 && r.2 == r2.2) {
                println!(
                    "scaling {} {}: 2 lcores / 1 lcore = {:.2}x",
                    r2.0,
                    r2.2,
                    r2.3.mpps / r1.3.mpps.max(1e-9)
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
