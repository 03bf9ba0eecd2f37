//! Storage reactors, in SPDK's model: one reactor per storage lcore, owning its data and running
//! pollers; other threads reach it only by message (a boxed closure on its MPSC ring).
//!
//! A reactor runs either on a DPDK lcore with an `rte_ring` for messages (production, see
//! [`ReactorSet::launch_lcores`]) or on a plain thread with a crossbeam channel (unit tests and
//! tools that must not start EAL, see [`ReactorSet::spawn_threads`]). Everything else is the same.
//!
//! Each loop iteration drains up to [`MSG_BURST`] messages and calls every poller once; the
//! iteration's TSC ticks count as busy when any message ran or any poller reported
//! [`PollStatus::Busy`], idle otherwise. Those are the counters SPDK's `framework_get_reactors`
//! shows.
//!
//! Shutdown ([`ReactorSet::stop`]): each reactor runs its remaining messages, calls
//! [`Poller::stop`] on every poller (stop submitting new IO), polls until no poller reports
//! in-flight IO or the drain timeout passes, then drops the pollers. Dropping an IO channel fails
//! whatever is still in flight (see `bdev`), so every request completes exactly once.

use crate::env::ring;
use serde::Serialize;
use std::any::{Any, TypeId};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A message: a closure run on the reactor, with the reactor itself as argument.
pub type Msg = Box<dyn FnOnce(&mut Reactor) + Send>;

/// Messages run per loop iteration at most, so pollers keep getting turns under a message flood.
pub const MSG_BURST: usize = 32;

/// Capacity of a reactor's message ring.
pub const MSG_RING_SIZE: u32 = 4096;

/// What a poller did this turn.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PollStatus {
    /// Did work (completed IO, moved a request).
    Busy,
    /// Found nothing to do.
    Idle,
}

impl PollStatus {
    /// Busy if `n > 0`.
    pub fn from_count(n: usize) -> PollStatus {
        if n > 0 {
            PollStatus::Busy
        } else {
            PollStatus::Idle
        }
    }
}

/// Something a reactor calls on every loop iteration. Lives on one reactor for its whole life.
pub trait Poller {
    /// Does one round of work.
    fn poll(&mut self, reactor: &mut Reactor) -> PollStatus;
    /// The reactor is stopping: submit no new IO from now on.
    fn stop(&mut self, _reactor: &mut Reactor) {}
    /// IO submitted and not yet completed; the reactor keeps polling until it is 0 (or the drain
    /// timeout passes) before dropping the poller.
    fn inflight(&self) -> usize {
        0
    }
    /// Whether the poller is finished and can be removed.
    fn done(&self) -> bool {
        false
    }
}

/// Identifies a registered poller (for [`Reactor::unregister`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PollerId(u64);

/// Busy/idle ticks of one reactor, written only by the reactor, read by anyone.
#[derive(Debug, Default)]
pub struct ReactorCounters {
    busy_tsc: AtomicU64,
    idle_tsc: AtomicU64,
    iterations: AtomicU64,
    msgs: AtomicU64,
    pollers: AtomicUsize,
}

#[inline(always)]
fn bump(c: &AtomicU64, v: u64) {
    // Single writer (the reactor): a plain load+store avoids a locked instruction.
    c.store(c.load(Ordering::Relaxed).wrapping_add(v), Ordering::Relaxed);
}

/// One line of `framework_get_reactors`.
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct ReactorStats {
    /// Reactor index (0..N).
    pub id: u32,
    /// The lcore it runs on (`None` on a plain thread).
    pub lcore: Option<u32>,
    /// TSC ticks spent in iterations that did work.
    pub busy: u64,
    /// TSC ticks spent in iterations that found nothing.
    pub idle: u64,
    /// Loop iterations.
    pub iterations: u64,
    /// Messages run.
    pub msgs: u64,
    /// Registered pollers.
    pub pollers: usize,
}

impl ReactorStats {
    /// busy / (busy + idle), 0..1.
    pub fn utilisation(&self) -> f64 {
        let t = self.busy + self.idle;
        if t == 0 {
            0.0
        } else {
            self.busy as f64 / t as f64
        }
    }
}

/// Sending side of a reactor's message queue.
pub enum MsgSender {
    /// An `rte_ring` producer (MPSC).
    Dpdk(ring::Producer<Msg>),
    /// A crossbeam channel (reactor on a plain thread).
    Channel(crossbeam_channel::Sender<Msg>),
}

/// Receiving side of a reactor's message queue.
pub enum MsgReceiver {
    /// An `rte_ring` consumer.
    Dpdk(ring::Consumer<Msg>),
    /// A crossbeam channel.
    Channel(crossbeam_channel::Receiver<Msg>),
}

/// Message-queue errors.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SendError {
    /// The ring stayed full (the reactor is stuck or flooded).
    #[error("reactor message ring is full")]
    Full,
    /// The reactor has stopped.
    #[error("reactor has stopped")]
    Stopped,
}

/// Errors of [`ReactorHandle::call_timeout`].
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CallError {
    /// The message could not be sent.
    #[error("{0}")]
    Send(SendError),
    /// No answer in time.
    #[error("reactor did not answer within {0:?}")]
    Timeout(Duration),
}

/// Creates a message queue: an `rte_ring` when `dpdk` is true (EAL must be up), else a channel.
pub fn msg_queue(name: &str, dpdk: bool) -> Result<(MsgSender, MsgReceiver), crate::env::EnvError> {
    if dpdk {
        let (p, c) = ring::mpsc::<Msg>(name, MSG_RING_SIZE)?;
        Ok((MsgSender::Dpdk(p), MsgReceiver::Dpdk(c)))
    } else {
        let (s, r) = crossbeam_channel::unbounded();
        Ok((MsgSender::Channel(s), MsgReceiver::Channel(r)))
    }
}

impl MsgSender {
    fn try_send(&self, m: Msg) -> Result<(), (Msg, SendError)> {
        match self {
            MsgSender::Dpdk(p) => p.send(m).map_err(|m| (m, SendError::Full)),
            MsgSender::Channel(s) => s.send(m).map_err(|e| (e.0, SendError::Stopped)),
        }
    }

    fn try_clone(&self) -> Option<MsgSender> {
        match self {
            MsgSender::Dpdk(p) => p.try_clone().map(MsgSender::Dpdk),
            MsgSender::Channel(s) => Some(MsgSender::Channel(s.clone())),
        }
    }
}

impl MsgReceiver {
    #[inline]
    fn recv(&self) -> Option<Msg> {
        match self {
            MsgReceiver::Dpdk(c) => c.recv(),
            MsgReceiver::Channel(r) => r.try_recv().ok(),
        }
    }
}

/// A handle to send messages to one reactor, from any thread. Clone it per thread (it is `Send`,
/// not `Sync`, like the ring producer under it).
pub struct ReactorHandle {
    id: u32,
    tx: MsgSender,
    running: Arc<AtomicBool>,
}

impl Clone for ReactorHandle {
    fn clone(&self) -> Self {
        // An MPSC producer is always cloneable.
        let tx = self
            .tx
            .try_clone()
            .unwrap_or_else(|| unreachable!("reactor rings are multi-producer"));
        ReactorHandle {
            id: self.id,
            tx,
            running: self.running.clone(),
        }
    }
}

impl ReactorHandle {
    /// Reactor index.
    pub fn id(&self) -> u32 {
        self.id
    }

    /// Sends a closure to run on the reactor. Retries for up to 100 ms while the ring is full.
    pub fn send(&self, f: impl FnOnce(&mut Reactor) + Send + 'static) -> Result<(), SendError> {
        self.send_msg(Box::new(f))
    }

    /// Sends a boxed message (see [`ReactorHandle::send`]).
    pub fn send_msg(&self, mut m: Msg) -> Result<(), SendError> {
        if !self.running.load(Ordering::Acquire) {
            return Err(SendError::Stopped);
        }
        let deadline = Instant::now() + Duration::from_millis(100);
        loop {
            match self.tx.try_send(m) {
                Ok(()) => return Ok(()),
                Err((back, SendError::Full)) if Instant::now() < deadline => {
                    m = back;
                    std::thread::yield_now();
                }
                Err((_, e)) => return Err(e),
            }
        }
    }

    /// [`ReactorHandle::call`], giving up after `timeout` (the closure may still run later).
    pub fn call_timeout<R: Send + 'static>(
        &self,
        timeout: Duration,
        f: impl FnOnce(&mut Reactor) -> R + Send + 'static,
    ) -> Result<R, CallError> {
        let (tx, rx) = crossbeam_channel::bounded(1);
        self.send(move |r| {
            let _ = tx.send(f(r));
        })
        .map_err(CallError::Send)?;
        rx.recv_timeout(timeout).map_err(|e| match e {
            crossbeam_channel::RecvTimeoutError::Timeout => CallError::Timeout(timeout),
            crossbeam_channel::RecvTimeoutError::Disconnected => {
                CallError::Send(SendError::Stopped)
            }
        })
    }

    /// Runs `f` on the reactor and waits for its result (control plane only: it blocks).
    pub fn call<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Reactor) -> R + Send + 'static,
    ) -> Result<R, SendError> {
        let (tx, rx) = crossbeam_channel::bounded(1);
        self.send(move |r| {
            let _ = tx.send(f(r));
        })?;
        // A reactor that stops before running the message drops it, which disconnects `rx`.
        rx.recv().map_err(|_| SendError::Stopped)
    }
}

/// Options for a reactor loop.
#[derive(Clone, Debug)]
pub struct ReactorOptions {
    /// Sleep this long after [`ReactorOptions::idle_spins`] idle iterations in a row (`None` =
    /// spin, as on a dedicated lcore). Plain-thread reactors in tests use a short sleep so they
    /// don't starve a two-core machine.
    pub idle_sleep: Option<Duration>,
    /// Idle iterations before sleeping.
    pub idle_spins: u32,
    /// How long shutdown waits for in-flight IO before failing it.
    pub drain_timeout: Duration,
}

impl Default for ReactorOptions {
    fn default() -> Self {
        ReactorOptions {
            idle_sleep: None,
            idle_spins: 1000,
            drain_timeout: Duration::from_secs(5),
        }
    }
}

impl ReactorOptions {
    /// Options for plain-thread reactors in tests: sleep 50 µs when idle.
    pub fn polite() -> Self {
        ReactorOptions {
            idle_sleep: Some(Duration::from_micros(50)),
            ..Default::default()
        }
    }
}

/// One reactor: its pollers, its message queue and its counters. Owned by the thread it runs on.
pub struct Reactor {
    id: u32,
    lcore: Option<u32>,
    pollers: Vec<(PollerId, Box<dyn Poller>)>,
    added: Vec<(PollerId, Box<dyn Poller>)>,
    removed: Vec<PollerId>,
    next_poller: u64,
    rx: MsgReceiver,
    counters: Arc<ReactorCounters>,
    stop: Arc<AtomicBool>,
    stopping: bool,
    opts: ReactorOptions,
    /// Reactor-local values by type (e.g. the QoS table of the bdevs it owns).
    locals: HashMap<TypeId, Box<dyn Any>>,
}

impl Reactor {
    /// A reactor that has not started running yet.
    pub fn new(
        id: u32,
        lcore: Option<u32>,
        rx: MsgReceiver,
        stop: Arc<AtomicBool>,
        counters: Arc<ReactorCounters>,
        opts: ReactorOptions,
    ) -> Reactor {
        Reactor {
            id,
            lcore,
            pollers: Vec::new(),
            added: Vec::new(),
            removed: Vec::new(),
            next_poller: 0,
            rx,
            counters,
            stop,
            stopping: false,
            opts,
            locals: HashMap::new(),
        }
    }

    /// A reactor that is never run, for unit tests that need one to open IO channels on.
    #[cfg(test)]
    pub(crate) fn detached() -> Reactor {
        let (_tx, rx) = crossbeam_channel::unbounded();
        Reactor::new(
            0,
            None,
            MsgReceiver::Channel(rx),
            Arc::new(AtomicBool::new(false)),
            Arc::new(ReactorCounters::default()),
            ReactorOptions::default(),
        )
    }

    /// This reactor's value of type `T` (created with `Default` on first use). Only code running
    /// on the reactor can reach it: state that lives here is owned by the reactor.
    pub fn local<T: Default + 'static>(&mut self) -> &mut T {
        self.locals
            .entry(TypeId::of::<T>())
            .or_insert_with(|| Box::new(T::default()))
            .downcast_mut::<T>()
            .unwrap_or_else(|| unreachable!("locals are keyed by their own TypeId"))
    }

    /// Reactor index.
    pub fn id(&self) -> u32 {
        self.id
    }

    /// The lcore it runs on, if any.
    pub fn lcore(&self) -> Option<u32> {
        self.lcore
    }

    /// True once shutdown began: pollers must not start new IO.
    pub fn stopping(&self) -> bool {
        self.stopping
    }

    /// The counters (shared with readers on other threads).
    pub fn counters(&self) -> Arc<ReactorCounters> {
        self.counters.clone()
    }

    /// Adds a poller; it runs from the next iteration on.
    pub fn register(&mut self, p: Box<dyn Poller>) -> PollerId {
        let id = PollerId(self.next_poller);
        self.next_poller += 1;
        self.added.push((id, p));
        id
    }

    /// Removes a poller after the current iteration (it is dropped, failing its in-flight IO).
    pub fn unregister(&mut self, id: PollerId) {
        self.removed.push(id);
    }

    fn apply_changes(&mut self) {
        if !self.added.is_empty() {
            self.pollers.append(&mut self.added);
        }
        if !self.removed.is_empty() {
            let removed = std::mem::take(&mut self.removed);
            self.pollers.retain(|(id, _)| !removed.contains(id));
        }
        self.pollers.retain(|(_, p)| !p.done());
        self.counters
            .pollers
            .store(self.pollers.len(), Ordering::Relaxed);
    }

    /// One loop iteration: messages then pollers. Returns whether anything was busy.
    pub fn iterate(&mut self) -> bool {
        let mut busy = false;
        let mut n = 0;
        while n < MSG_BURST {
            let Some(m) = self.rx.recv() else { break };
            m(self);
            n += 1;
        }
        if n > 0 {
            busy = true;
            bump(&self.counters.msgs, n as u64);
        }
        let mut pollers = std::mem::take(&mut self.pollers);
        for (_, p) in pollers.iter_mut() {
            busy |= p.poll(self) == PollStatus::Busy;
        }
        // Pollers registered during this iteration went to `added`; keep order: old then new.
        pollers.append(&mut self.pollers);
        self.pollers = pollers;
        self.apply_changes();
        busy
    }

    /// Runs until the stop flag is set, then shuts down (see the module docs).
    pub fn run(mut self) {
        let tick = super::ticks;
        let mut idle_run = 0u32;
        let mut last = tick();
        while !self.stop.load(Ordering::Relaxed) {
            let busy = self.iterate();
            let now = tick();
            let dt = now.wrapping_sub(last);
            last = now;
            bump(&self.counters.iterations, 1);
            if busy {
                bump(&self.counters.busy_tsc, dt);
                idle_run = 0;
            } else {
                bump(&self.counters.idle_tsc, dt);
                idle_run += 1;
                if idle_run >= self.opts.idle_spins {
                    match self.opts.idle_sleep {
                        Some(s) => std::thread::sleep(s),
                        // Free on a dedicated core; when two processes' reactors share a CPU
                        // (a hot upgrade), the busy one gets it at once instead of after a slice.
                        None => std::thread::yield_now(),
                    }
                }
            }
        }
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.stopping = true;
        // Run what is queued (callers waiting in `call` get their answers).
        while let Some(m) = self.rx.recv() {
            m(self);
        }
        self.apply_changes();
        let mut pollers = std::mem::take(&mut self.pollers);
        for (_, p) in pollers.iter_mut() {
            p.stop(self);
        }
        pollers.append(&mut self.pollers);
        self.pollers = pollers;
        self.apply_changes();
        let deadline = Instant::now() + self.opts.drain_timeout;
        while self.pollers.iter().any(|(_, p)| p.inflight() > 0) && Instant::now() < deadline {
            if !self.iterate() {
                std::thread::sleep(Duration::from_micros(20));
            }
        }
        let left: usize = self.pollers.iter().map(|(_, p)| p.inflight()).sum();
        if left > 0 {
            log::warn!(
                "reactor {}: {left} IOs still in flight after {:?}: failing them",
                self.id,
                self.opts.drain_timeout
            );
        }
        // Dropping the pollers drops their IO channels, which fail what is left.
        self.pollers.clear();
        self.added.clear();
        self.locals.clear();
        // Messages that arrived meanwhile: dropped (a `call` waiting on one sees Stopped).
        while self.rx.recv().is_some() {}
        self.counters.pollers.store(0, Ordering::Relaxed);
    }
}

enum Runner {
    Thread(std::thread::JoinHandle<()>),
    Lcore(crate::env::lcore::LcoreHandle),
}

/// Everything the control plane keeps of one running reactor.
struct ReactorEntry {
    handle: ReactorHandle,
    lcore: Option<u32>,
    counters: Arc<ReactorCounters>,
    stop: Arc<AtomicBool>,
    runner: Option<Runner>,
}

/// Reads every reactor's counters from any thread (they are single-writer atomics).
#[derive(Clone, Debug)]
pub struct ReactorMonitor {
    reactors: Vec<(u32, Option<u32>, Arc<ReactorCounters>)>,
}

impl ReactorMonitor {
    /// Per-reactor busy/idle counters.
    pub fn stats(&self) -> Vec<ReactorStats> {
        self.reactors
            .iter()
            .map(|(id, lcore, c)| ReactorStats {
                id: *id,
                lcore: *lcore,
                busy: c.busy_tsc.load(Ordering::Relaxed),
                idle: c.idle_tsc.load(Ordering::Relaxed),
                iterations: c.iterations.load(Ordering::Relaxed),
                msgs: c.msgs.load(Ordering::Relaxed),
                pollers: c.pollers.load(Ordering::Relaxed),
            })
            .collect()
    }
}

/// The running reactors. With lcore reactors, drop (or stop) the set and every
/// [`ReactorHandle`] before the [`Eal`](crate::env::Eal): their rings are freed with them.
pub struct ReactorSet {
    reactors: Vec<ReactorEntry>,
}

static RING_SEQ: AtomicU64 = AtomicU64::new(0);

impl ReactorSet {
    /// Starts `n` reactors on plain threads with channel message queues (no EAL needed).
    pub fn spawn_threads(n: usize, opts: ReactorOptions) -> std::io::Result<ReactorSet> {
        let mut reactors = Vec::new();
        for i in 0..n as u32 {
            let (tx, rx) = msg_queue("", false).map_err(std::io::Error::other)?;
            let stop = Arc::new(AtomicBool::new(false));
            let running = Arc::new(AtomicBool::new(true));
            let counters = Arc::new(ReactorCounters::default());
            let (c, st, o) = (counters.clone(), stop.clone(), opts.clone());
            let run_flag = running.clone();
            let t = std::thread::Builder::new()
                .name(format!("reactor{i}"))
                .spawn(move || {
                    Reactor::new(i, None, rx, st, c, o).run();
                    run_flag.store(false, Ordering::Release);
                })?;
            reactors.push(ReactorEntry {
                handle: ReactorHandle { id: i, tx, running },
                lcore: None,
                counters,
                stop,
                runner: Some(Runner::Thread(t)),
            });
        }
        Ok(ReactorSet { reactors })
    }

    /// Starts one reactor on each of `lcores` (EAL worker lcores), with `rte_ring` message queues.
    pub fn launch_lcores(
        lcores: &[u32],
        opts: ReactorOptions,
    ) -> Result<ReactorSet, crate::env::EnvError> {
        let mut set = ReactorSet {
            reactors: Vec::new(),
        };
        for (i, &lc) in lcores.iter().enumerate() {
            let name = format!(
                "hp_reactor_{}_{}",
                i,
                RING_SEQ.fetch_add(1, Ordering::Relaxed)
            );
            let (tx, rx) = msg_queue(&name, true)?;
            let stop = Arc::new(AtomicBool::new(false));
            let running = Arc::new(AtomicBool::new(true));
            let counters = Arc::new(ReactorCounters::default());
            let (c, st, o) = (counters.clone(), stop.clone(), opts.clone());
            let run_flag = running.clone();
            let h = crate::env::lcore::launch(lc, move || {
                Reactor::new(i as u32, Some(lc), rx, st, c, o).run();
                run_flag.store(false, Ordering::Release);
                0
            });
            let h = match h {
                Ok(h) => h,
                Err(e) => {
                    set.stop();
                    return Err(e);
                }
            };
            set.reactors.push(ReactorEntry {
                handle: ReactorHandle {
                    id: i as u32,
                    tx,
                    running,
                },
                lcore: Some(lc),
                counters,
                stop,
                runner: Some(Runner::Lcore(h)),
            });
        }
        Ok(set)
    }

    /// Number of reactors.
    pub fn len(&self) -> usize {
        self.reactors.len()
    }

    /// True when there is no reactor.
    pub fn is_empty(&self) -> bool {
        self.reactors.is_empty()
    }

    /// A handle to reactor `i`.
    pub fn handle(&self, i: usize) -> Option<ReactorHandle> {
        self.reactors.get(i).map(|r| r.handle.clone())
    }

    /// Per-reactor busy/idle counters (`framework_get_reactors`).
    pub fn stats(&self) -> Vec<ReactorStats> {
        self.monitor().stats()
    }

    /// A reader of the counters for other threads (the RPC methods).
    pub fn monitor(&self) -> ReactorMonitor {
        ReactorMonitor {
            reactors: self
                .reactors
                .iter()
                .map(|r| (r.handle.id, r.lcore, r.counters.clone()))
                .collect(),
        }
    }

    /// Stops every reactor (each drains or fails its in-flight IO) and waits for them.
    /// Returns the reactors that panicked.
    pub fn stop(&mut self) -> Vec<String> {
        for r in &self.reactors {
            r.stop.store(true, Ordering::SeqCst);
        }
        let mut failed = Vec::new();
        for r in &mut self.reactors {
            match r.runner.take() {
                Some(Runner::Thread(t)) => failed.extend(
                    t.join()
                        .err()
                        .map(|_| format!("reactor {} panicked", r.handle.id)),
                ),
                Some(Runner::Lcore(h)) => failed.extend(h.join().err()),
                None => {}
            }
            r.handle.running.store(false, Ordering::Release);
        }
        failed
    }
}

impl Drop for ReactorSet {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;
    use std::rc::Rc;

    struct Counter {
        n: Rc<Cell<u32>>,
        limit: u32,
    }
    impl Poller for Counter {
        fn poll(&mut self, _r: &mut Reactor) -> PollStatus {
            if self.n.get() < self.limit {
                self.n.set(self.n.get() + 1);
                PollStatus::Busy
            } else {
                PollStatus::Idle
            }
        }
    }

    #[test]
    fn messages_run_on_the_reactor_and_counters_move() {
        let mut set = ReactorSet::spawn_threads(2, ReactorOptions::polite()).unwrap();
        let h = set.handle(1).unwrap();
        let id = h.call(|r| r.id()).unwrap();
        assert_eq!(id, 1);
        let name = h
            .call(|_| std::thread::current().name().map(String::from))
            .unwrap();
        assert_eq!(name.as_deref(), Some("reactor1"));
        // A poller that is busy 1000 times then idle.
        let n = h
            .call(|r| {
                let n = Rc::new(Cell::new(0));
                r.register(Box::new(Counter {
                    n: n.clone(),
                    limit: 1000,
                }));
                // Rc stays on the reactor: hand back nothing but a marker.
                1
            })
            .unwrap();
        assert_eq!(n, 1);
        std::thread::sleep(Duration::from_millis(50));
        let s = set.stats();
        assert_eq!(s.len(), 2);
        assert!(s[1].busy > 0 && s[1].idle > 0, "{s:?}");
        assert_eq!(s[1].pollers, 1);
        assert!(s[1].msgs >= 3);
        assert!(set.stop().is_empty());
        assert_eq!(h.send(|_| {}), Err(SendError::Stopped));
    }

    struct Inflight {
        left: u32,
        stopped: Arc<AtomicBool>,
    }
    impl Poller for Inflight {
        fn poll(&mut self, _r: &mut Reactor) -> PollStatus {
            if self.stopped.load(Ordering::Relaxed) && self.left > 0 {
                self.left -= 1;
                return PollStatus::Busy;
            }
            PollStatus::Idle
        }
        fn stop(&mut self, _r: &mut Reactor) {
            self.stopped.store(true, Ordering::Relaxed);
        }
        fn inflight(&self) -> usize {
            self.left as usize
        }
    }

    #[test]
    fn shutdown_drains_inflight() {
        let mut set = ReactorSet::spawn_threads(1, ReactorOptions::polite()).unwrap();
        let stopped = Arc::new(AtomicBool::new(false));
        let s2 = stopped.clone();
        set.handle(0)
            .unwrap()
            .call(move |r| {
                r.register(Box::new(Inflight {
                    left: 10,
                    stopped: s2,
                }))
            })
            .unwrap();
        assert!(set.stop().is_empty());
        assert!(stopped.load(Ordering::Relaxed));
    }
}
