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
use crate::net::macnat::{MacNatEntry, MacNatReader, MacNatTable};
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

/// The frame the "NIC" writes, as four 16-byte words, with the per-frame fields (bytes 8..12 of
/// the source MAC, the source IP at 26..30) zeroed.
#[derive(Clone, Copy)]
struct FrameWords([[u8; 16]; 4]);

impl FrameWords {
    fn new(frame: &[u8; 64]) -> FrameWords {
        let mut f = *frame;
        f[8..12].fill(0);
        f[26..30].fill(0);
        let mut w = [[0u8; 16]; 4];
        for (w, c) in w.iter_mut().zip(f.chunks_exact(16)) {
            w.copy_from_slice(c);
        }
        FrameWords(w)
    }
}

/// Writes frame `idx` (source MAC and IP of table entry `idx`) into `frame` the way a NIC's DMA
/// does, as whole words: four 16-byte stores. (Field by field stores would make every later load
/// of a field that spans two of them wait for the store buffer to drain, since a load is only
/// forwarded from a single store: a cost of this stand-in for the NIC that a NIC-fed dataplane
/// never pays, and one that falls on whichever mode's loads happen to span stores.)
#[inline(always)]
fn fill(frame: &mut [u8], words: &FrameWords, idx: u32) {
    let Some(frame) = frame.get_mut(..64) else {
        return;
    };
    let mac = u64::from(u32::from_ne_bytes(idx.to_be_bytes()));
    let ip = u64::from(u32::from_ne_bytes(entry_ip(idx).to_be_bytes())) << 16;
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{
            __m128i, _mm_loadu_si128, _mm_or_si128, _mm_set_epi64x, _mm_storeu_si128,
        };
        let p = frame.as_mut_ptr().cast::<__m128i>();
        let w = &words.0;
        // SAFETY: SSE2 is part of x86_64. The loads read the four 16-byte arrays of `words`; the
        // stores write `frame`'s first 64 bytes, which `get_mut(..64)` proved exist (unaligned
        // access allowed by loadu/storeu).
        unsafe {
            let w0 = _mm_or_si128(
                _mm_loadu_si128(w[0].as_ptr().cast()),
                _mm_set_epi64x(mac as i64, 0),
            );
            let w1 = _mm_or_si128(
                _mm_loadu_si128(w[1].as_ptr().cast()),
                _mm_set_epi64x(ip as i64, 0),
            );
            _mm_storeu_si128(p, w0);
            _mm_storeu_si128(p.add(1), w1);
            _mm_storeu_si128(p.add(2), _mm_loadu_si128(w[2].as_ptr().cast()));
            _mm_storeu_si128(p.add(3), _mm_loadu_si128(w[3].as_ptr().cast()));
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let mut f = [0u8; 64];
        for (c, w) in f.chunks_exact_mut(16).zip(&words.0) {
            c.copy_from_slice(w);
        }
        f[8..12].copy_from_slice(&idx.to_be_bytes());
        f[26..30].copy_from_slice(&entry_ip(idx).to_be_bytes());
        frame.copy_from_slice(&f);
    }
}

/// The stand-in for the NIC: writes the frame of the next table entry of a sequence into each
/// received mbuf. Every mode of a comparison gets the same `Nic` work.
struct Nic {
    words: FrameWords,
    seq: Arc<Vec<u32>>,
    pos: usize,
}

impl Nic {
    fn new(seq: Arc<Vec<u32>>, offset: usize) -> Nic {
        let f = crate::net::frames::ipv4_udp(
            MacAddr([2, 0, 0, 0, 0, 0xfe]),
            entry_local(0),
            [10, 0, 0, 1],
            [10, 9, 9, 9],
            64,
        );
        let mut t = [0u8; 64];
        t.copy_from_slice(&f[..64]);
        Nic {
            words: FrameWords::new(&t),
            pos: offset % seq.len().max(1),
            seq,
        }
    }

    #[inline(always)]
    fn write(&mut self, frames: &mut [Mbuf]) {
        let (seq, mut p) = (&self.seq[..], self.pos);
        for m in frames {
            if let Some(&idx) = seq.get(p) {
                fill(m.data_mut(), &self.words, idx);
            }
            p = if p + 1 >= seq.len() { 0 } else { p + 1 };
        }
        self.pos = p;
    }
}

/// testpmd's macswap: swap in place, send the burst, free what the driver refused. Polls while
/// `more()` says so; returns the frames sent. Not inlined, like [`nat_loop`]: each mode's code
/// is its own function, for profilers.
#[inline(never)]
fn swap_loop(q: &mut Queues, nic: &mut Nic, mut more: impl FnMut() -> bool) -> u64 {
    let mut rxb = MbufBurst::new();
    let mut sent: u64 = 0;
    while more() {
        if q.rx.rx_burst(&mut rxb) == 0 {
            continue;
        }
        nic.write(rxb.as_mut_slice());
        for m in rxb.as_mut_slice() {
            if let Some(h) = m.data_mut().first_chunk_mut::<12>() {
                swap_macs(h);
            }
        }
        sent += q.tx.tx_burst(&mut rxb) as u64;
        rxb.drop_all();
    }
    sent
}

/// Swaps the destination and source MACs in registers, as testpmd's macswap does with one
/// 16-byte shuffle: two loads, two stores, no temporary in memory.
#[inline(always)]
fn swap_macs(h: &mut [u8; 12]) {
    let (w, t) = h.split_at_mut(8);
    let (Some(w), Some(t)) = (w.first_chunk_mut::<8>(), t.first_chunk_mut::<4>()) else {
        return;
    };
    // a: D0..D5 S0 S1, b: S2..S5 (little-endian lanes).
    let a = u64::from_le_bytes(*w);
    let b = u64::from(u32::from_le_bytes(*t));
    *w = ((a >> 48) | (b << 16) | (a << 48)).to_le_bytes();
    *t = ((a >> 16) as u32).to_le_bytes();
}

/// What a MAC-NAT run hands back: the queues and table reader, for the next run.
struct NatRun {
    q: Queues,
    reader: MacNatReader,
    /// Frames sent.
    sent: u64,
    /// Every frame received was translated and sent (the bench's setup check).
    all_translated: bool,
}

/// The dataplane's own lcore loop on a VM-side port whose frames leave on the uplink, until
/// `stop` is set, or after `bursts` received bursts (it then sets `stop` itself). None if the
/// lcore did not give its queues back (a bug).
#[inline(never)]
fn nat_loop(
    q: Queues,
    reader: MacNatReader,
    policy: Policy,
    nic: &mut Nic,
    stop: &AtomicBool,
    bursts: Option<u64>,
) -> Option<NatRun> {
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
    let mut left = bursts.unwrap_or(u64::MAX);
    lcore.run_with(stop, |frames| {
        nic.write(frames);
        left -= 1;
        if left == 0 {
            stop.store(true, Ordering::Relaxed);
        }
    });
    let c = lcore.counters.snapshot();
    let all_translated =
        c.egress_translated == c.rx && c.tx == c.rx && c.drops.iter().all(|(_, d)| *d == 0);
    let NetLcore {
        mut rx,
        mut tx,
        table,
        ..
    } = lcore;
    let (Some((rx, _)), Some(Some(tx))) = (rx.pop(), tx.pop()) else {
        return None;
    };
    Some(NatRun {
        q: Queues { rx, tx },
        reader: table,
        sent: c.tx,
        all_translated,
    })
}

#[allow(clippy::too_many_arguments)]
fn worker(
    mut q: Queues,
    mode: Mode,
    table: Option<MacNatReader>,
    policy: Policy,
    seq: Arc<Vec<u32>>,
    offset: usize,
    stop: Arc<AtomicBool>,
    done: Arc<AtomicU64>,
    back: mpsc::Sender<Queues>,
) -> i32 {
    let mut nic = Nic::new(seq, offset);
    let (q, sent, ok) = match (mode, table) {
        (Mode::MacNat, Some(reader)) => {
            let Some(run) = nat_loop(q, reader, policy, &mut nic, &stop, None) else {
                return 1;
            };
            (run.q, run.sent, run.all_translated)
        }
        _ => {
            let sent = swap_loop(&mut q, &mut nic, || !stop.load(Ordering::Relaxed));
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

/// Per table: cycles per frame of each swap slice and of the MAC-NAT slice run right after it.
type SlicePairs = Vec<Vec<(f64, f64)>>;

/// One lcore alternating, for each table in turn, `slice` bursts of the swap and `slice` bursts
/// of MAC-NAT, both fed by the same `Nic` stream, until `secs` have passed. Neighbours' noise
/// changes slowly next to a slice (about a millisecond), so the two halves of a pair see the
/// same machine.
fn interleaved_worker(
    mut q: Queues,
    readers: Vec<MacNatReader>,
    policy: Policy,
    seqs: Vec<Arc<Vec<u32>>>,
    secs: f64,
    slice: u64,
) -> (Option<Queues>, Result<SlicePairs, String>) {
    let mut nics: Vec<Nic> = seqs.into_iter().map(|s| Nic::new(s, 0)).collect();
    let mut readers: Vec<Option<MacNatReader>> = readers.into_iter().map(Some).collect();
    let mut pairs: SlicePairs = vec![Vec::new(); nics.len()];
    let hz = tsc_hz() as f64;
    let end = crate::env::tsc() + (secs * hz) as u64;
    // Which half of a pair runs first is drawn at random (xorshift), so that neither mode
    // always follows the other (cache state) or falls into step with a neighbour's period.
    let mut coin: u64 = 0x2545_f491_4f6c_dd1d;
    while crate::env::tsc() < end {
        for ((nic, reader), pairs) in nics
            .iter_mut()
            .zip(readers.iter_mut())
            .zip(pairs.iter_mut())
        {
            coin ^= coin << 13;
            coin ^= coin >> 7;
            coin ^= coin << 17;
            let (mut swap, mut nat) = (0.0, 0.0);
            for nat_turn in [coin & 1 == 0, coin & 1 == 1] {
                if !nat_turn {
                    let mut left = slice;
                    let t0 = crate::env::tsc();
                    let sent = swap_loop(&mut q, nic, || {
                        left -= 1;
                        left > 0
                    });
                    swap = (crate::env::tsc() - t0) as f64 / sent.max(1) as f64;
                    continue;
                }
                let stop = AtomicBool::new(false);
                // The reader moves into the lcore and back.
                let Some(r) = reader.take() else {
                    return (Some(q), Err("a table reader went missing".into()));
                };
                let t0 = crate::env::tsc();
                let Some(run) = nat_loop(q, r, policy, nic, &stop, Some(slice)) else {
                    return (None, Err("the net lcore kept its queues".into()));
                };
                nat = (crate::env::tsc() - t0) as f64 / run.sent.max(1) as f64;
                q = run.q;
                *reader = Some(run.reader);
                if !run.all_translated {
                    return (
                        Some(q),
                        Err(
                            "MAC-NAT saw frames it did not translate (bench setup is wrong)".into(),
                        ),
                    );
                }
            }
            pairs.push((swap, nat));
        }
    }
    (Some(q), Ok(pairs))
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
    let table: &mut [u64] =
        // SAFETY: the mapping holds `bytes` zero-filled bytes (a valid [u64]), 2 MiB aligned, and
        // nothing else refers to it while `map` lives (it outlives `table`).
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
        "bench macnat: net_null -> net_null, 64 B Ethernet/IPv4/UDP, bursts of 32, {}, TSC {:.2} GHz",
        if hp { "hugepages" } else { "no hugepages (--no-huge: expect ~2x lower absolute numbers)" },
        tsc_hz() as f64 / 1e9,
    );
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
    let costs = interleaved(workers[0], &mut queues, &tables, policy, args)?;
    if args.scaling {
        scaling(&workers, &mut queues, &tables, policy, args)?;
    }
    // The memory floor, on the first worker's CPU, for the largest table measured.
    if let Some(&n) = args.entries.iter().max().filter(|&&n| n >= 100_000) {
        let ours = (n * 3 / 2 / 3).next_power_of_two() * 64;
        // The least any table of n entries could be: the two MACs of each, 12 bytes.
        let least = n * 12;
        let (tx, rx) = mpsc::channel();
        let h = lcore::launch(workers[0], move || {
            let _ = tx.send((memory_probe(ours), memory_probe(least)));
            0
        })?;
        let _ = h.join();
        if let Ok(((cold, hot), (lcold, lhot))) = rx.recv() {
            println!(
                "memory probe: a random 64 B line, prefetched 16 ahead, costs {cold:.1} cycles from a {:.0} MiB table (the bucket array of {n} entries) and {lcold:.1} from a {:.0} MiB one ({n} x 12 B: the MACs alone, the least any table could hold), against {:.1} from a cached 16 KiB one",
                ours as f64 / 1048576.0,
                least as f64 / 1048576.0,
                hot.min(lhot)
            );
            let floor = lcold - lhot;
            let big = costs.iter().find(|c| c.entries == n);
            let small = costs
                .iter()
                .filter(|c| c.entries <= 8192)
                .min_by_key(|c| c.entries);
            if let (Some(big), Some(small)) = (big, small) {
                // Cycles over the swap that a ratio of 0.8 allows, and what MAC-NAT needs
                // before memory: its cost over the swap with a cached table.
                let budget = big.swap / 0.8 - big.swap;
                let need = (small.nat - small.swap) + floor;
                println!(
                    "0.8 x the swap at {n} entries allows {budget:.1} cycles/frame over the swap; MAC-NAT at {} entries takes {:.1} over it with no memory cost, plus at least {floor:.1} for a line of even the least table: {need:.1}, {}",
                    small.entries,
                    small.nat - small.swap,
                    if need > budget {
                        "beyond the budget on this machine"
                    } else {
                        "within the budget"
                    }
                );
            }
        }
    }
    rx_port.stop()?;
    tx_port.stop()?;
    drop(eal);
    Ok(())
}

/// Separate runs of each mode on one lcore and on two, in rounds: Mpps per mode and lcore count,
/// and what a second lcore adds.
fn scaling(
    workers: &[u32],
    queues: &mut Vec<Queues>,
    tables: &[(usize, MacNatTable, Arc<Vec<u32>>)],
    policy: Policy,
    args: &BenchMacnatArgs,
) -> Result<(), Error> {
    let rounds = args.rounds.max(1);
    let secs = args.time / rounds as f64;
    let lcore_sets: Vec<Vec<u32>> = vec![workers[..1].to_vec(), workers[..2].to_vec()];
    println!(
        "scaling: {rounds} rounds of separate {secs:.2} s runs of each mode on 1 and on 2 lcores"
    );
    print_header(&[]);
    let mut summary: Vec<Series> = Vec::new();
    let seq1 = Arc::new(index_sequence(1, 1));
    for lcs in &lcore_sets {
        let mut swaps = Vec::new();
        let mut nats: Vec<(Vec<f64>, Vec<f64>)> = vec![(Vec::new(), Vec::new()); tables.len()];
        for round in 0..rounds {
            let s = measure(lcs, queues, Mode::MacSwap, None, policy, &seq1, secs)?;
            print_row(round, "macswap", lcs.len(), None, &s, None);
            for ((n, table, seq), (mpps, ratios)) in tables.iter().zip(nats.iter_mut()) {
                let m = measure(lcs, queues, Mode::MacNat, Some(table), policy, seq, secs)?;
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
    print_header(&[
        ("ratio min-max", 15),
        ("best Mpps", 11),
        ("best cyc/pkt", 14),
        ("best ratio", 10),
    ]);
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
    {
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
    Ok(())
}

/// The columns every table of `bench macnat` starts with, and their widths.
const LEAD_COLUMNS: [(&str, usize); 6] = [
    ("mode", 10),
    ("lcores", 8),
    ("entries", 10),
    ("Mpps", 11),
    ("cycles/pkt", 14),
    ("ratio", 9),
];

/// A table header: [`LEAD_COLUMNS`], then `more`; the first column left-aligned, the others
/// right-aligned, each to its width.
fn print_header(more: &[(&str, usize)]) {
    let line: Vec<String> = LEAD_COLUMNS
        .iter()
        .chain(more)
        .enumerate()
        .map(|(i, (name, w))| match i {
            0 => format!("{name:<w$}"),
            _ => format!("{name:>w$}"),
        })
        .collect();
    println!("{}", line.join(" "));
}

/// The `p`-quantile (0..=1) of `v`, by nearest rank.
fn quantile(v: &[f64], p: f64) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    match s.len() {
        0 => f64::NAN,
        n => s[((n - 1) as f64 * p).round() as usize],
    }
}

/// The one-lcore comparison: swap and MAC-NAT alternate on one lcore in slices (see
/// [`interleaved_worker`]); prints each mode's median cycles/frame and Mpps, and the ratio
/// MAC-NAT / swap of each pair: its median and its 10th–90th percentiles.
fn interleaved(
    lcore_id: u32,
    queues: &mut Vec<Queues>,
    tables: &[(usize, MacNatTable, Arc<Vec<u32>>)],
    policy: Policy,
    args: &BenchMacnatArgs,
) -> Result<Vec<Costs>, Error> {
    let q = queues.remove(0);
    let readers = tables
        .iter()
        .map(|(_, t, _)| t.reader(0).ok_or("reader slot"))
        .collect::<Result<Vec<_>, _>>()?;
    let seqs: Vec<_> = tables.iter().map(|(_, _, s)| s.clone()).collect();
    let (secs, slice) = (args.time, args.slice.max(1));
    let (tx, rx) = mpsc::channel();
    let h = lcore::launch(lcore_id, move || {
        let _ = tx.send(interleaved_worker(q, readers, policy, seqs, secs, slice));
        0
    })?;
    let _ = h.join();
    let (q, pairs) = rx.recv().map_err(|_| "the bench lcore died")?;
    queues.extend(q);
    let pairs = pairs?;
    let hz = tsc_hz() as f64;
    println!(
        "one lcore, {secs} s: the swap and MAC-NAT alternate every {slice} bursts, each pair fed the same frames; Mpps, cycles/pkt: medians over the slices; ratio: median over the pairs of MAC-NAT Mpps / swap Mpps, and its 10th-90th percentiles; quiet: each mode's fastest tenth of slices (10th percentile of cycles/pkt), the least disturbed by neighbours, and their ratio"
    );
    print_header(&[
        ("ratio p10-p90", 15),
        ("pairs", 8),
        ("quiet cyc", 11),
        ("quiet ratio", 11),
    ]);
    let mut costs = Vec::new();
    for ((n, _, _), pairs) in tables.iter().zip(&pairs) {
        let swap: Vec<f64> = pairs.iter().map(|p| p.0).collect();
        let nat: Vec<f64> = pairs.iter().map(|p| p.1).collect();
        let ratios: Vec<f64> = pairs.iter().map(|(s, m)| s / m.max(1e-9)).collect();
        let (cs, cn) = (median(&swap), median(&nat));
        let (qs, qn) = (quantile(&swap, 0.1), quantile(&nat, 0.1));
        println!(
            "{:<10} {:>8} {:>10} {:>11.2} {:>14.1} {:>9} {:>15} {:>8} {:>11.1} {:>11}",
            "macswap",
            1,
            n,
            hz / cs.max(1e-9) / 1e6,
            cs,
            "1.00",
            "",
            pairs.len(),
            qs,
            "1.00"
        );
        println!(
            "{:<10} {:>8} {:>10} {:>11.2} {:>14.1} {:>9.3} {:>15} {:>8} {:>11.1} {:>11.3}",
            "macnat",
            1,
            n,
            hz / cn.max(1e-9) / 1e6,
            cn,
            median(&ratios),
            format!(
                "{:.3}-{:.3}",
                quantile(&ratios, 0.1),
                quantile(&ratios, 0.9)
            ),
            pairs.len(),
            qn,
            qs / qn.max(1e-9)
        );
        costs.push(Costs {
            entries: *n,
            swap: cs,
            nat: cn,
        });
    }
    Ok(costs)
}

/// Median cycles per frame of the swap and of MAC-NAT at one table size, one lcore.
struct Costs {
    entries: usize,
    swap: f64,
    nat: f64,
}

#[cfg(test)]
mod tests {
    #[test]
    fn swap_macs_swaps() {
        let mut h = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12];
        super::swap_macs(&mut h);
        assert_eq!(h, [7, 8, 9, 10, 11, 12, 1, 2, 3, 4, 5, 6]);
    }
}
