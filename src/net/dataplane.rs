//! The net lcore: polls its (port, rx queue) pairs in bursts of 32, runs MAC-NAT on each frame
//! and transmits on its own tx queue of the output port. No locks, no allocation.
//!
//! Mbuf ownership: a received mbuf is owned by the rx burst, then either moved into the tx
//! burst of its output port or dropped (freed) with a counted reason. `TxQueue::tx_burst` takes
//! only what the driver accepted; after a few retries the rest is freed and counted as
//! `tx_full`. Nothing is freed twice and nothing leaks.

use super::macnat::MacNatReader;
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
    pub fn run_with(&mut self, stop: &AtomicBool, mut on_rx: impl FnMut(&mut [Mbuf])) {
        let mut rx_burst = MbufBurst::new();
        let mut tx_bursts: Vec<MbufBurst> = (0..self.tx.len().min(MAX_PORTS))
            .map(|_| MbufBurst::new())
            .collect();
        let mut verdicts = [Verdict::Drop(nat::DropReason::UnknownIp); nat::BURST];
        self.table.online();
        while !stop.load(Ordering::Relaxed) {
            let mut busy = false;
            for (rxq, role) in self.rx.iter_mut() {
                let role = *role;
                let n = rxq.rx_burst(&mut rx_burst);
                if n == 0 {
                    continue;
                }
                busy = true;
                on_rx(rx_burst.as_mut_slice());
                let in_port = rxq.port();
                let c = &self.counters;
                c.rx.add(n as u64);
                if let Some(p) = c.port_rx.get(in_port as usize) {
                    p.add(n as u64);
                }
                let table = self.table.get();
                let frames = rx_burst.as_mut_slice();
                let all = match role {
                    PortRole::Uplink => {
                        nat::ingress_burst(frames, table, &self.policy, &mut verdicts)
                    }
                    PortRole::Vm => {
                        nat::egress_burst(frames, in_port, table, &self.policy, &mut verdicts)
                    }
                };
                // The common case: every frame translated towards one port. Send the burst as
                // it came in.
                if let Some(Some(txq)) = all.and_then(|p| self.tx.get_mut(usize::from(p))) {
                    match role {
                        PortRole::Vm => c.egress_translated.add(n as u64),
                        PortRole::Uplink => c.ingress_translated.add(n as u64),
                    }
                    flush(txq, &mut rx_burst, c);
                    continue;
                }
                let mut verdicts = verdicts.iter();
                while let Some(m) = rx_burst.pop_front() {
                    let v = verdicts
                        .next()
                        .copied()
                        .unwrap_or(Verdict::Drop(nat::DropReason::UnknownIp));
                    match v {
                        Verdict::Forward { port, translated } => {
                            match (translated, role) {
                                (true, PortRole::Vm) => c.egress_translated.add(1),
                                (true, PortRole::Uplink) => c.ingress_translated.add(1),
                                (false, _) => c.untouched.add(1),
                            }
                            let p = port as usize;
                            let (Some(txb), Some(Some(txq))) =
                                (tx_bursts.get_mut(p), self.tx.get_mut(p))
                            else {
                                // A verdict for a port we cannot send on: the table names a port
                                // that is not configured. Count as unknown and free.
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
                for (txb, txq) in tx_bursts.iter_mut().zip(self.tx.iter_mut()) {
                    if let (false, Some(txq)) = (txb.is_empty(), txq) {
                        flush(txq, txb, c);
                    }
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
