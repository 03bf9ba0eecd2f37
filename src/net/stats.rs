//! Per-lcore network counters: each lcore writes only its own (no atomic read-modify-write on
//! the fast path), readers sum them.

use super::nat::DropReason;
use super::packet::Malformed;
use std::sync::atomic::{AtomicU64, Ordering};

/// Ports tracked per lcore.
pub const MAX_PORTS: usize = 16;

/// A counter with a single writer: `add` is a plain load + store, readers see a recent value.
#[derive(Default, Debug)]
pub struct Counter(AtomicU64);

impl Counter {
    /// Adds `n` (single writer only).
    #[inline(always)]
    pub fn add(&self, n: u64) {
        self.0.store(
            self.0.load(Ordering::Relaxed).wrapping_add(n),
            Ordering::Relaxed,
        );
    }
    /// Current value.
    #[inline]
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

const NON_MALFORMED: [DropReason; 5] = [
    DropReason::UnknownIp,
    DropReason::Spoofed,
    DropReason::MacMismatch,
    DropReason::Control,
    DropReason::NoFloodPort,
];
/// Number of drop reasons.
pub const N_DROP_REASONS: usize = Malformed::ALL.len() + NON_MALFORMED.len();

/// Every drop reason, in counter order.
pub fn drop_reasons() -> impl Iterator<Item = DropReason> {
    Malformed::ALL
        .iter()
        .map(|m| DropReason::Malformed(*m))
        .chain(NON_MALFORMED)
}

/// Counter index of a drop reason.
#[inline(always)]
pub fn drop_index(r: DropReason) -> usize {
    match r {
        DropReason::Malformed(m) => m as usize,
        DropReason::UnknownIp => Malformed::ALL.len(),
        DropReason::Spoofed => Malformed::ALL.len() + 1,
        DropReason::MacMismatch => Malformed::ALL.len() + 2,
        DropReason::Control => Malformed::ALL.len() + 3,
        DropReason::NoFloodPort => Malformed::ALL.len() + 4,
    }
}

/// One lcore's counters, on their own cache lines.
#[repr(align(64))]
#[derive(Default, Debug)]
pub struct LcoreCounters {
    /// Frames received.
    pub rx: Counter,
    /// Frames the drivers accepted for transmit.
    pub tx: Counter,
    /// Frames dropped because a tx queue stayed full.
    pub tx_full: Counter,
    /// Egress frames translated local→global.
    pub egress_translated: Counter,
    /// Ingress frames translated global→local.
    pub ingress_translated: Counter,
    /// Frames forwarded untouched (broadcast/multicast, control and unknowns by policy).
    pub untouched: Counter,
    /// Drops by reason (see [`drop_index`]).
    pub drops: [Counter; N_DROP_REASONS],
    /// Per-port received frames.
    pub port_rx: [Counter; MAX_PORTS],
    /// Per-port transmitted frames.
    pub port_tx: [Counter; MAX_PORTS],
    /// Polls that found work / all polls (utilisation).
    pub busy_polls: Counter,
    /// All polls.
    pub polls: Counter,
}

/// A plain-number copy of counters, summable.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct CountersSnapshot {
    /// Frames received.
    pub rx: u64,
    /// Frames transmitted.
    pub tx: u64,
    /// Tx-full drops.
    pub tx_full: u64,
    /// Egress translations.
    pub egress_translated: u64,
    /// Ingress translations.
    pub ingress_translated: u64,
    /// Forwarded untouched.
    pub untouched: u64,
    /// Drops by reason name (only non-zero).
    pub drops: Vec<(&'static str, u64)>,
    /// Per port id: (rx, tx).
    pub ports: Vec<(u64, u64)>,
    /// Busy polls.
    pub busy_polls: u64,
    /// All polls.
    pub polls: u64,
}

impl CountersSnapshot {
    /// Total drops of every reason (tx-full included).
    pub fn dropped(&self) -> u64 {
        self.drops.iter().map(|(_, n)| n).sum::<u64>() + self.tx_full
    }

    /// Drops of one reason.
    pub fn drop_count(&self, name: &str) -> u64 {
        self.drops
            .iter()
            .filter(|(n, _)| *n == name)
            .map(|(_, c)| c)
            .sum()
    }

    /// Adds another snapshot into this one.
    pub fn add(&mut self, o: &CountersSnapshot) {
        self.rx += o.rx;
        self.tx += o.tx;
        self.tx_full += o.tx_full;
        self.egress_translated += o.egress_translated;
        self.ingress_translated += o.ingress_translated;
        self.untouched += o.untouched;
        self.busy_polls += o.busy_polls;
        self.polls += o.polls;
        for (name, n) in &o.drops {
            match self.drops.iter_mut().find(|(m, _)| m == name) {
                Some((_, c)) => *c += n,
                None => self.drops.push((name, *n)),
            }
        }
        if self.ports.len() < o.ports.len() {
            self.ports.resize(o.ports.len(), (0, 0));
        }
        for (i, (r, t)) in o.ports.iter().enumerate() {
            self.ports[i].0 += r;
            self.ports[i].1 += t;
        }
    }
}

impl LcoreCounters {
    /// Reads every counter.
    pub fn snapshot(&self) -> CountersSnapshot {
        CountersSnapshot {
            rx: self.rx.get(),
            tx: self.tx.get(),
            tx_full: self.tx_full.get(),
            egress_translated: self.egress_translated.get(),
            ingress_translated: self.ingress_translated.get(),
            untouched: self.untouched.get(),
            drops: drop_reasons()
                .zip(self.drops.iter())
                .filter(|(_, c)| c.get() > 0)
                .map(|(r, c)| (r.as_str(), c.get()))
                .collect(),
            ports: self
                .port_rx
                .iter()
                .zip(self.port_tx.iter())
                .map(|(r, t)| (r.get(), t.get()))
                .collect(),
            busy_polls: self.busy_polls.get(),
            polls: self.polls.get(),
        }
    }
}
