//! The net lcore: polls its (port, rx queue) pairs in bursts of 32, runs MAC-NAT on each frame
//! and transmits on its own tx queue of the output port. No locks, no allocation.
//!
//! Mbuf ownership: a received mbuf is owned by the rx burst, then either moved into the tx
//! burst of its output port or dropped (freed) with a counted reason. `TxQueue::tx_burst` takes
//! only what the driver accepted; after a few retries the rest is freed and counted as
//! `tx_full`. Nothing is freed twice and nothing leaks.

use super::macnat::{MacNatReader, MacNatVersion};
use super::nat::{self, Policy, Verdict};
use super::stats::{drop_index, LcoreCounters, MAX_PORTS};
use crate::env::ethdev::{RxQueue, TxQueue};
use crate::env::{Mbuf, MbufBurst};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Which side of MAC-NAT a port is on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PortRole {
    /// The physical network: frames from it are ingress.
    Uplink,
    /// VM-facing: frames from it are egress.
    Vm,
}

/// Tx retries before unsent frames are dropped.
const TX_RETRIES: usize = 4;

/// Everything one net lcore owns.
pub struct NetLcore {
    /// Rx queues this lcore polls, with the role of their port.
    pub rx: Vec<(RxQueue, PortRole)>,
    /// This lcore's tx queue on each port, indexed by port id.
    pub tx: Vec<Option<TxQueue>>,
    /// Forwarding policy.
    pub policy: Policy,
    /// MAC-NAT table read handle.
    pub table: MacNatReader,
    /// This lcore's counters.
    pub counters: Arc<LcoreCounters>,
}

impl NetLcore {
    /// Polls until `stop` is set. Returns 0.
    pub fn run(mut self, stop: &AtomicBool) -> i32 {
        self.run_with(stop, |_| {});
        0
    }

    /// [`Self::run`], calling `on_rx` with every received burst before MAC-NAT sees it (`bench
    /// macnat` writes its frames there, standing in for the NIC's DMA). Leaves `self` with its
    /// queues, so a benchmark can poll them again.
    ///
    /// With a table too big for the cache, a poll receives up to two bursts from a queue: the
    /// first burst's table lines load while the second is received and its own lookups start,
    /// then both are processed in order (the rx/tx calls stay bursts of 32).
    pub fn run_with(&mut self, stop: &AtomicBool, mut on_rx: impl FnMut(&mut [Mbuf])) {
        let mut bursts = [MbufBurst::new(), MbufBurst::new()];
        let mut pre = [nat::Prefetched::NONE, nat::Prefetched::NONE];
        let mut out = Outputs {
            bursts: (0..self.tx.len().min(MAX_PORTS))
                .map(|_| MbufBurst::new())
                .collect(),
            verdicts: [Verdict::Drop(nat::DropReason::UnknownIp); nat::BURST],
        };
        self.table.online();
        while !stop.load(Ordering::Relaxed) {
            let mut busy = false;
            for (rxq, role) in self.rx.iter_mut() {
                let role = *role;
                let in_port = rxq.port();
                let c = &self.counters;
                let table = self.table.get();
                // A table that fits in cache: one burst, looked up as it is processed.
                // A bigger one: up to two bursts, the first one's lookups started before the
                // second is received.
                let mut got = 0;
                for (burst, pre) in bursts.iter_mut().zip(pre.iter_mut()) {
                    let n = rxq.rx_burst(burst);
                    if n == 0 {
                        break;
                    }
                    got += 1;
                    on_rx(burst.as_mut_slice());
                    c.rx.add(n as u64);
                    if let Some(p) = c.port_rx.get(in_port as usize) {
                        p.add(n as u64);
                    }
                    // Starts nothing (and forgets an earlier burst's) when the table fits in cache.
                    pre.start(burst.as_mut_slice(), role == PortRole::Vm, table);
                    if !pre.is_active() {
                        break;
                    }
                }
                busy |= got > 0;
                let io = Io {
                    role,
                    in_port,
                    table,
                    policy: &self.policy,
                    counters: c,
                };
                for (burst, pre) in bursts.iter_mut().zip(pre.iter()).take(got) {
                    io.process(burst, pre, &mut self.tx, &mut out);
                }
            }
            self.table.quiescent();
            self.counters.polls.add(1);
            if busy {
                self.counters.busy_polls.add(1);
            }
        }
        self.table.offline();
    }
}

/// Per-port tx bursts and a burst's verdicts: the lcore's scratch space for frames that do not
/// all go one way.
struct Outputs {
    bursts: Vec<MbufBurst>,
    verdicts: [Verdict; nat::BURST],
}

/// What processing a burst from one rx queue needs.
struct Io<'a> {
    role: PortRole,
    in_port: u16,
    table: &'a MacNatVersion,
    policy: &'a Policy,
    counters: &'a LcoreCounters,
}

impl Io<'_> {
    /// MAC-NAT on a received burst and its transmission; leaves `burst` empty. Inlined into
    /// the poll loop (one call level less per burst, measurable at 1 k entries).
    #[inline(always)]
    fn process(
        &self,
        burst: &mut MbufBurst,
        pre: &nat::Prefetched,
        tx: &mut [Option<TxQueue>],
        out: &mut Outputs,
    ) {
        let c = self.counters;
        let n = burst.len() as u64;
        let frames = burst.as_mut_slice();
        let all = match self.role {
            PortRole::Uplink => {
                nat::ingress_burst(frames, self.table, self.policy, pre, &mut out.verdicts)
            }
            PortRole::Vm => nat::egress_burst(
                frames,
                self.in_port,
                self.table,
                self.policy,
                pre,
                &mut out.verdicts,
            ),
        };
        // The common case: every frame translated towards one port. Send the burst as it came
        // in.
        if let Some(Some(txq)) = all.and_then(|p| tx.get_mut(usize::from(p))) {
            match self.role {
                PortRole::Vm => c.egress_translated.add(n),
                PortRole::Uplink => c.ingress_translated.add(n),
            }
            flush(txq, burst, c);
            return;
        }
        let mut verdicts = out.verdicts.iter();
        while let Some(m) = burst.pop_front() {
            let v = verdicts
                .next()
                .copied()
                .unwrap_or(Verdict::Drop(nat::DropReason::UnknownIp));
            match v {
                Verdict::Forward { port, translated } => {
                    match (translated, self.role) {
                        (true, PortRole::Vm) => c.egress_translated.add(1),
                        (true, PortRole::Uplink) => c.ingress_translated.add(1),
                        (false, _) => c.untouched.add(1),
                    }
                    let p = port as usize;
                    let (Some(txb), Some(Some(txq))) = (out.bursts.get_mut(p), tx.get_mut(p))
                    else {
                        // A verdict for a port we cannot send on: the table names a port that
                        // is not configured. Count as unknown and free.
                        c.drops[drop_index(nat::DropReason::UnknownIp)].add(1);
                        continue;
                    };
                    if let Err(m) = txb.push(m) {
                        flush(txq, txb, c);
                        // After a flush the burst has room unless the queue kept all 32.
                        if txb.push(m).is_err() {
                            c.tx_full.add(1);
                        }
                    }
                }
                Verdict::Drop(r) => {
                    c.drops[drop_index(r)].add(1);
                    drop(m);
                }
            }
        }
        for (txb, txq) in out.bursts.iter_mut().zip(tx.iter_mut()) {
            if let (false, Some(txq)) = (txb.is_empty(), txq) {
                flush(txq, txb, c);
            }
        }
    }
}

/// Transmits a burst with a few retries; what the queue still refuses is freed and counted.
#[inline]
fn flush(txq: &mut TxQueue, txb: &mut MbufBurst, c: &LcoreCounters) {
    let mut sent = 0;
    for _ in 0..TX_RETRIES {
        sent += txq.tx_burst(txb);
        if txb.is_empty() {
            break;
        }
    }
    c.tx.add(sent as u64);
    if let Some(p) = c.port_tx.get(txq.port() as usize) {
        p.add(sent as u64);
    }
    if !txb.is_empty() {
        c.tx_full.add(txb.drop_all() as u64);
    }
}
