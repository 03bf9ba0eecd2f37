//! Where a request waits during a pause: the per-service **wait** and **pending** queues.
//!
//! Every bdev's backend ("service") sits behind a [`ServiceQueue`] on each reactor channel. A
//! request first enters the channel's wait queue; it moves to the pending queue when it is
//! forwarded to the service and leaves pending when the service completes it. The control plane
//! (see `upgrade`) drives every channel of a service through one atomic control word
//! ([`Control`]: paused bit + backend generation) that each channel reads once per `submit` and
//! `poll` — no lock on the data path:
//!
//! - **running**: the wait queue is forwarded in order as soon as possible;
//! - **paused**: nothing is forwarded, new requests accumulate in wait, pending drains as the
//!   service completes it;
//! - **new generation** (backend swapped): every request still held by the old service — it did
//!   not complete, whether it was executed or not — is taken back (`BackendChannel::abort`), put
//!   back at the head of the wait queue in submission order, the old channel is dropped and one is
//!   opened on the new backend; forwarding starts again (these are the *replayed* requests).
//!
//! Nothing is failed by this layer: callers only see latency. The channel publishes its queue
//! lengths in a [`ChannelState`] (single-writer atomics) so the control plane can tell when a
//! pause has drained, and what is still pending when it has not.
//!
//! Ordering (see docs/upgrade.md for the argument):
//! - the wait queue is strictly FIFO, so the service receives requests in submission order and a
//!   replay sends them again in that order, ahead of anything newer;
//! - a flush is a barrier: it is forwarded only once no write, write-zeroes or unmap forwarded
//!   before it is still pending (and, FIFO, nothing behind it overtakes it);
//! - a request is acknowledged only when it leaves pending, and only requests still pending are
//!   replayed, so a replayed write can never land after a newer write to the same blocks that was
//!   acknowledged: the submitter could only have issued that newer write concurrently with it.

use super::bdev::{
    BackendChannel, BdevBackend, BdevError, Completions, IoKind, IoRequest, IoStatus,
};
use super::ticks;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// The control word every channel of a service follows: backend generation and paused bit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Control(u64);

impl Control {
    /// A control word.
    pub fn new(generation: u64, paused: bool) -> Control {
        Control(generation << 1 | u64::from(paused))
    }
    /// Which backend the channels must use.
    pub fn generation(self) -> u64 {
        self.0 >> 1
    }
    /// Whether forwarding is stopped.
    pub fn paused(self) -> bool {
        self.0 & 1 != 0
    }
}

/// What one channel publishes for the control plane. Written only by the channel's reactor.
#[derive(Debug, Default)]
pub struct ChannelState {
    seen: AtomicU64,
    waiting: AtomicU64,
    pending: AtomicU64,
    pending_writes: AtomicU64,
    oldest_pending_tick: AtomicU64,
    held: AtomicU64,
    replayed: AtomicU64,
    forwarded: AtomicU64,
    barrier_waits: AtomicU64,
    next_ready: AtomicU64,
    closed: AtomicBool,
    error: Mutex<Option<String>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[inline(always)]
fn bump(c: &AtomicU64, v: u64) {
    // Single writer (the channel's reactor).
    c.store(c.load(Ordering::Relaxed).wrapping_add(v), Ordering::Relaxed);
}

/// Sum of the [`ChannelState`]s of a service's open channels.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct QueueSnapshot {
    /// Open channels.
    pub channels: usize,
    /// Channels that have acted on the current control word.
    pub acked: usize,
    /// Channels whose channel to the backend being prepared is ready.
    pub prepared: usize,
    /// Requests in wait queues now.
    pub waiting: u64,
    /// Requests forwarded and not completed now.
    pub pending: u64,
    /// Of those, writes / write-zeroes / unmaps.
    pub pending_writes: u64,
    /// Age of the oldest pending request, in ticks (0 = none).
    pub oldest_pending_ticks: u64,
    /// Requests that had to wait for a pause or a missing service (total).
    pub held: u64,
    /// Requests sent again to a new backend (total).
    pub replayed: u64,
    /// Requests forwarded (total, replays included).
    pub forwarded: u64,
    /// Times a flush waited for earlier writes (total).
    pub barrier_waits: u64,
    /// Channels that could not open the current backend, with the reason.
    pub errors: Vec<String>,
}

/// Shared by every channel of one service and its control plane.
pub struct ServiceShared {
    ctl: AtomicU64,
    // Current backend and its generation. Channels lock it only when the generation changes.
    backend: Mutex<(u64, Arc<dyn BdevBackend>)>,
    // The backend an upgrade is preparing (generation, backend), announced by `prepare`: the
    // channels open it early so the switch does not wait for connections.
    next: Mutex<Option<(u64, Arc<dyn BdevBackend>)>>,
    prepare: AtomicU64,
    channels: Mutex<Vec<Arc<ChannelState>>>,
}

impl ServiceShared {
    /// A running service on `backend` (generation 0).
    pub fn new(backend: Arc<dyn BdevBackend>) -> Arc<ServiceShared> {
        Arc::new(ServiceShared {
            ctl: AtomicU64::new(Control::new(0, false).0),
            backend: Mutex::new((0, backend)),
            next: Mutex::new(None),
            prepare: AtomicU64::new(0),
            channels: Mutex::new(Vec::new()),
        })
    }

    /// The control word now.
    pub fn control(&self) -> Control {
        Control(self.ctl.load(Ordering::Acquire))
    }

    /// Stops or restarts forwarding (channels act on their next submit or poll).
    pub fn set_paused(&self, paused: bool) -> Control {
        let c = if paused {
            self.ctl.fetch_or(1, Ordering::AcqRel) | 1
        } else {
            self.ctl.fetch_and(!1, Ordering::AcqRel) & !1
        };
        Control(c)
    }

    /// Makes `backend` current under a new generation, with the paused bit set to `paused`.
    /// Channels swap (replaying what the old backend still holds) on their next submit or poll.
    pub fn install(&self, backend: Arc<dyn BdevBackend>, paused: bool) -> Control {
        let mut b = lock(&self.backend);
        let generation = b.0 + 1;
        *b = (generation, backend);
        let c = Control::new(generation, paused);
        self.ctl.store(c.0, Ordering::Release);
        self.prepare.store(0, Ordering::Release);
        *lock(&self.next) = None;
        c
    }

    /// Announces the next backend: channels open their channel to it now (while still
    /// forwarding to the current one) and report when it is ready ([`QueueSnapshot::prepared`]).
    pub fn prepare(&self, backend: Arc<dyn BdevBackend>) -> u64 {
        let generation = lock(&self.backend).0 + 1;
        *lock(&self.next) = Some((generation, backend.clone()));
        self.prepare.store(generation, Ordering::Release);
        generation
    }

    /// Forgets a prepared backend (channels close what they opened).
    pub fn cancel_prepare(&self) {
        self.prepare.store(0, Ordering::Release);
        *lock(&self.next) = None;
    }

    /// The current backend and its generation.
    pub fn current(&self) -> (u64, Arc<dyn BdevBackend>) {
        let b = lock(&self.backend);
        (b.0, b.1.clone())
    }

    /// Sums the open channels' states (and forgets closed channels).
    pub fn snapshot(&self) -> QueueSnapshot {
        let ctl = self.ctl.load(Ordering::Acquire);
        let prep = self.prepare.load(Ordering::Acquire);
        let now = ticks();
        let mut s = QueueSnapshot::default();
        let mut v = match self.channels.lock() {
            Ok(v) => v,
            Err(p) => p.into_inner(),
        };
        v.retain(|c| !c.closed.load(Ordering::Acquire));
        let l = |c: &AtomicU64| c.load(Ordering::Relaxed);
        for c in v.iter() {
            s.channels += 1;
            s.acked += usize::from(c.seen.load(Ordering::Acquire) == ctl);
            s.prepared += usize::from(prep != 0 && c.next_ready.load(Ordering::Acquire) == prep);
            s.waiting += l(&c.waiting);
            s.pending += l(&c.pending);
            s.pending_writes += l(&c.pending_writes);
            let t = l(&c.oldest_pending_tick);
            if t != 0 {
                s.oldest_pending_ticks = s.oldest_pending_ticks.max(now.saturating_sub(t));
            }
            s.held += l(&c.held);
            s.replayed += l(&c.replayed);
            s.forwarded += l(&c.forwarded);
            s.barrier_waits += l(&c.barrier_waits);
            if let Ok(e) = c.error.lock() {
                s.errors.extend(e.clone());
            }
        }
        s
    }
}

#[derive(Clone, Copy, Debug)]
struct PendingEntry {
    seq: u64,
    tick: u64,
    write: bool,
    done: bool,
}

/// Requests forwarded to the service and not completed, in forwarding order (which is
/// submission order: the wait queue is FIFO). Completion marks an entry by binary search on its
/// sequence number; completed entries leave from the front. No allocation once warmed up.
#[derive(Debug, Default)]
pub struct PendingQueue {
    q: VecDeque<PendingEntry>,
    live: usize,
    writes: usize,
}

impl PendingQueue {
    fn push(&mut self, seq: u64, tick: u64, write: bool) {
        debug_assert!(self.q.back().is_none_or(|e| e.seq < seq));
        self.q.push_back(PendingEntry {
            seq,
            tick,
            write,
            done: false,
        });
        self.live += 1;
        self.writes += usize::from(write);
    }

    /// Marks `seq` completed; false if it was not pending.
    fn complete(&mut self, seq: u64) -> bool {
        let Ok(i) = self.q.binary_search_by_key(&seq, |e| e.seq) else {
            return false;
        };
        let e = &mut self.q[i];
        if e.done {
            return false;
        }
        e.done = true;
        self.live -= 1;
        self.writes -= usize::from(e.write);
        while self.q.front().is_some_and(|e| e.done) {
            self.q.pop_front();
        }
        true
    }

    fn clear(&mut self) {
        self.q.clear();
        self.live = 0;
        self.writes = 0;
    }

    /// Requests pending.
    pub fn len(&self) -> usize {
        self.live
    }

    /// True when nothing is pending.
    pub fn is_empty(&self) -> bool {
        self.live == 0
    }

    /// Write-type requests pending.
    pub fn writes(&self) -> usize {
        self.writes
    }

    fn oldest_tick(&self) -> u64 {
        self.q.front().map_or(0, |e| e.tick.max(1))
    }
}

/// One reactor's wait/pending queues in front of its channel to the service.
pub struct ServiceQueue {
    shared: Arc<ServiceShared>,
    state: Arc<ChannelState>,
    inner: Option<Box<dyn BackendChannel>>,
    inner_gen: u64,
    inner_done: Completions,
    // A channel to the backend being prepared, opened early.
    next: Option<Box<dyn BackendChannel>>,
    next_gen: u64,
    prepare_seen: u64,
    wait: VecDeque<IoRequest>,
    pending: PendingQueue,
    ctl: Control,
    next_seq: u64,
}

impl ServiceQueue {
    /// Opens a channel on the service's current backend (on the calling reactor).
    pub fn open(shared: Arc<ServiceShared>) -> Result<ServiceQueue, BdevError> {
        let ctl = shared.control();
        let (generation, backend) = shared.current();
        let inner = backend.open_channel()?;
        let state = Arc::new(ChannelState::default());
        state.seen.store(ctl.0, Ordering::Release);
        if let Ok(mut v) = shared.channels.lock() {
            v.push(state.clone());
        }
        Ok(ServiceQueue {
            shared,
            state,
            inner: Some(inner),
            inner_gen: generation,
            inner_done: Completions::default(),
            next: None,
            next_gen: 0,
            prepare_seen: 0,
            wait: VecDeque::with_capacity(256),
            pending: PendingQueue::default(),
            ctl,
            next_seq: 1,
        })
    }

    /// Requests waiting, oldest first (for a handover: their `tag`s name the virtqueue heads).
    pub fn waiting(&self) -> impl Iterator<Item = &IoRequest> {
        self.wait.iter()
    }

    /// The pending queue.
    pub fn pending(&self) -> &PendingQueue {
        &self.pending
    }

    /// Acts on a new control word or a prepared backend. Returns work done.
    #[inline]
    fn sync(&mut self, done: &mut Completions) -> usize {
        let prep = self.shared.prepare.load(Ordering::Acquire);
        if prep != self.prepare_seen {
            self.prepare(prep);
        }
        let ctl = self.shared.control();
        if ctl == self.ctl {
            return 0;
        }
        self.ctl = ctl;
        if ctl.generation() != self.inner_gen {
            self.swap(done);
        }
        self.state.seen.store(ctl.0, Ordering::Release);
        1
    }

    /// Opens a channel to the prepared backend `generation` (0: none; drop what was opened).
    fn prepare(&mut self, generation: u64) {
        self.prepare_seen = generation;
        self.next = None;
        self.next_gen = 0;
        self.state.next_ready.store(0, Ordering::Release);
        if generation <= self.inner_gen {
            return;
        }
        let next = lock(&self.shared.next).clone();
        if let Some((g, b)) = next.filter(|(g, _)| *g == generation) {
            match b.open_channel() {
                Ok(ch) => {
                    self.next = Some(ch);
                    self.next_gen = g;
                }
                Err(e) => log::warn!("service queue: cannot open the prepared backend: {e}"),
            }
        }
    }

    /// Moves to the current backend: whatever the old one still holds goes back to the head of
    /// the wait queue, in submission order.
    fn swap(&mut self, done: &mut Completions) {
        let mut back = Completions::default();
        if let Some(mut old) = self.inner.take() {
            // Completions the old service already produced count: they are not replayed.
            old.poll(&mut self.inner_done);
            self.collect(done);
            old.abort(&mut back);
        }
        let mut replay = Vec::with_capacity(back.len());
        while let Some((req, st)) = back.pop() {
            if st != IoStatus::Aborted {
                // The old backend finished it while closing (file: the kernel completed it): a
                // real completion, not a replay.
                self.pending.complete(req.queue_seq);
                done.push(req, st);
                continue;
            }
            if self.pending.complete(req.queue_seq) {
                replay.push(req);
            } else {
                // Not ours to replay (a backend that reported it twice?): complete it as told.
                log::error!("service queue: {req:?} came back from the old backend unasked");
                done.push(req, st);
            }
        }
        if !self.pending.is_empty() {
            // Only a backend that drops requests without returning them gets here; their
            // callbacks already fired (Aborted) from IoRequest's Drop.
            log::error!(
                "service queue: old backend lost {} pending requests",
                self.pending.len()
            );
        }
        self.pending.clear();
        replay.sort_unstable_by_key(|r| r.queue_seq);
        bump(&self.state.replayed, replay.len() as u64);
        for r in replay.into_iter().rev() {
            self.wait.push_front(r);
        }
        let (generation, backend) = self.shared.current();
        self.inner_gen = generation;
        let early = self.next.take().filter(|_| self.next_gen == generation);
        self.next_gen = 0;
        self.state.next_ready.store(0, Ordering::Release);
        match early.map_or_else(|| backend.open_channel(), Ok) {
            Ok(ch) => {
                self.inner = Some(ch);
                if let Ok(mut e) = self.state.error.lock() {
                    *e = None;
                }
            }
            Err(err) => {
                log::error!("service queue: cannot open the new backend: {err}; holding IO");
                if let Ok(mut e) = self.state.error.lock() {
                    *e = Some(err.to_string());
                }
            }
        }
    }

    /// Hands the service's completions up. Returns how many.
    #[inline]
    fn collect(&mut self, done: &mut Completions) -> usize {
        let mut n = 0;
        while let Some((req, st)) = self.inner_done.pop() {
            self.pending.complete(req.queue_seq);
            done.push(req, st);
            n += 1;
        }
        n
    }

    /// Forwards the wait queue, in order, while running. Returns how many were forwarded.
    #[inline]
    fn forward(&mut self, done: &mut Completions) -> usize {
        if self.ctl.paused() {
            return 0;
        }
        let Some(inner) = self.inner.as_mut() else {
            return 0;
        };
        let mut n = 0;
        while let Some(front) = self.wait.front() {
            if front.kind == IoKind::Flush && self.pending.writes() > 0 {
                break; // the barrier: earlier writes first
            }
            let Some(req) = self.wait.pop_front() else {
                break;
            };
            self.pending
                .push(req.queue_seq, ticks(), req.kind.is_write());
            inner.submit(req, &mut self.inner_done);
            n += 1;
        }
        if n > 0 {
            bump(&self.state.forwarded, n as u64);
            self.collect(done);
        }
        n
    }

    #[inline]
    fn publish(&self) {
        let s = &self.state;
        s.waiting.store(self.wait.len() as u64, Ordering::Relaxed);
        s.pending
            .store(self.pending.len() as u64, Ordering::Relaxed);
        s.pending_writes
            .store(self.pending.writes() as u64, Ordering::Relaxed);
        s.oldest_pending_tick
            .store(self.pending.oldest_tick(), Ordering::Relaxed);
    }
}

impl BackendChannel for ServiceQueue {
    #[inline]
    fn submit(&mut self, mut req: IoRequest, done: &mut Completions) {
        self.sync(done);
        req.queue_seq = self.next_seq;
        self.next_seq += 1;
        let flush = req.kind == IoKind::Flush;
        self.wait.push_back(req);
        if self.ctl.paused() || self.inner.is_none() {
            bump(&self.state.held, 1);
        } else if flush && self.pending.writes() > 0 {
            bump(&self.state.barrier_waits, 1);
        }
        self.forward(done);
        self.publish();
    }

    #[inline]
    fn poll(&mut self, done: &mut Completions) -> usize {
        let mut work = self.sync(done);
        if let Some(inner) = self.inner.as_mut() {
            work += inner.poll(&mut self.inner_done);
        }
        if let Some(next) = self.next.as_mut() {
            // No requests yet: this only lets it connect.
            let mut none = Completions::default();
            work += next.poll(&mut none);
            if next.ready() {
                self.state
                    .next_ready
                    .store(self.next_gen, Ordering::Release);
            }
        }
        work += self.collect(done);
        work += self.forward(done);
        self.publish();
        work
    }

    fn inflight(&self) -> usize {
        self.wait.len() + self.pending.len()
    }

    fn abort(&mut self, done: &mut Completions) {
        self.collect(done);
        if let Some(inner) = self.inner.as_mut() {
            inner.abort(&mut self.inner_done);
        }
        self.collect(done);
        self.pending.clear();
        while let Some(r) = self.wait.pop_front() {
            done.push(r, IoStatus::Aborted);
        }
        self.publish();
    }
}

impl Drop for ServiceQueue {
    fn drop(&mut self) {
        self.state.closed.store(true, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    //! The queue state machine against a scripted service: any interleaving of submit,
    //! complete, pause, service-gone, resume and upgrade completes every request exactly once,
    //! successfully, in order where order is promised, with the data a well-behaved submitter
    //! expects.

    use super::*;
    use crate::storage::bdev::{Bdev, BdevInfo, IoBuf, IoChannel, IoStatus};
    use crate::storage::registry::{BackendType, Params};
    use crate::storage::upgrade::ServiceBackend;
    use proptest::prelude::*;
    use std::cell::RefCell;
    use std::collections::{BTreeSet, HashMap};
    use std::rc::Rc;

    const BS: u64 = 512;
    const BLOCKS: u64 = 8;

    /// One instance of the scripted service.
    #[derive(Default)]
    struct Svc {
        alive: bool,
        held: Vec<IoRequest>,
        ready: Vec<(IoRequest, IoStatus)>,
        received: Vec<u64>,
    }

    /// The service side and what the submitter has seen, per test thread.
    #[derive(Default)]
    struct World {
        disk: Vec<u64>,
        svcs: Vec<Svc>,
        paused: bool,
        fired: HashMap<u64, (u32, IoStatus)>,
        write_tags: BTreeSet<u64>,
        // Completed by a service (acknowledged to the queue).
        svc_done: BTreeSet<u64>,
        // Services finish what they hold when closed (like `file`) instead of returning it.
        finish_on_abort: bool,
        violations: Vec<String>,
    }

    thread_local! {
        static W: RefCell<World> = RefCell::new(World::default());
    }

    fn with<R>(f: impl FnOnce(&mut World) -> R) -> R {
        W.with(|w| f(&mut w.borrow_mut()))
    }

    fn value_of(r: &IoRequest) -> u64 {
        match (r.kind, &r.buf) {
            (IoKind::Write, Some(b)) => {
                u64::from_le_bytes(b.as_slice()[..8].try_into().unwrap_or_default())
            }
            _ => 0,
        }
    }

    struct FakeBackend(usize);
    struct FakeChannel(usize);

    impl BdevBackend for FakeBackend {
        fn type_name(&self) -> &'static str {
            "fake"
        }
        fn info(&self) -> BdevInfo {
            BdevInfo {
                block_size: BS as u32,
                num_blocks: BLOCKS,
                read_only: false,
                max_io_bytes: 0,
            }
        }
        fn open_channel(&self) -> Result<Box<dyn BackendChannel>, BdevError> {
            Ok(Box::new(FakeChannel(self.0)))
        }
    }

    impl BackendChannel for FakeChannel {
        fn submit(&mut self, req: IoRequest, _done: &mut Completions) {
            with(|w| {
                let tag = req.tag;
                if w.paused {
                    w.violations
                        .push(format!("tag {tag} forwarded while paused"));
                }
                if w.svc_done.contains(&tag) {
                    w.violations
                        .push(format!("tag {tag} forwarded after it completed"));
                }
                if req.kind == IoKind::Flush {
                    if let Some(t) = w.write_tags.range(..tag).find(|t| !w.svc_done.contains(t)) {
                        w.violations
                            .push(format!("flush {tag} forwarded before write {t} completed"));
                    }
                }
                let s = &mut w.svcs[self.0];
                if s.received.last().is_some_and(|&l| l >= tag) {
                    w.violations.push(format!(
                        "service {} got tag {tag} after {:?}",
                        self.0,
                        s.received.last()
                    ));
                }
                s.received.push(tag);
                // A live service executes writes at once (the ack may still be lost later).
                if s.alive && req.kind.is_write() {
                    let v = value_of(&req);
                    let b = (req.offset / BS) as usize;
                    w.disk[b] = v;
                }
                w.svcs[self.0].held.push(req);
            })
        }
        fn poll(&mut self, done: &mut Completions) -> usize {
            with(|w| {
                let r = std::mem::take(&mut w.svcs[self.0].ready);
                let n = r.len();
                for (q, s) in r {
                    done.push(q, s);
                }
                n
            })
        }
        fn inflight(&self) -> usize {
            with(|w| w.svcs[self.0].held.len() + w.svcs[self.0].ready.len())
        }
        fn abort(&mut self, done: &mut Completions) {
            let (held, finish) =
                with(|w| (std::mem::take(&mut w.svcs[self.0].held), w.finish_on_abort));
            for r in held {
                if finish {
                    with(|w| w.svc_done.insert(r.tag));
                    done.push(r, IoStatus::Success);
                } else {
                    done.push(r, IoStatus::Aborted);
                }
            }
        }
    }

    fn new_service() -> usize {
        with(|w| {
            w.svcs.push(Svc {
                alive: true,
                ..Default::default()
            });
            w.svcs.len() - 1
        })
    }

    /// Completes the `k`-th request held by service `svc` (if it is alive).
    fn complete(svc: usize, k: usize) {
        with(|w| {
            let s = &mut w.svcs[svc];
            if !s.alive || s.held.is_empty() {
                return;
            }
            let mut r = s.held.remove(k % s.held.len());
            if r.kind == IoKind::Read {
                let v = w.disk[(r.offset / BS) as usize];
                if let Some(b) = r.buf.as_mut() {
                    b.as_mut_slice()[..8].copy_from_slice(&v.to_le_bytes());
                }
            }
            w.svc_done.insert(r.tag);
            w.svcs[svc].ready.push((r, IoStatus::Success));
        })
    }

    const NO_CREATE: BackendType = BackendType {
        check: |_| Ok(()),
        create: |_| Err(BdevError::Backend("tests install backends directly".into())),
    };

    /// The submitter's model: the last acknowledged value of each block, and the blocks with
    /// IO in flight (it never issues two IOs to one block at once, like a careful guest).
    #[derive(Default)]
    struct Model {
        acked: Vec<u64>,
        busy: BTreeSet<u64>,
    }

    struct Harness {
        bdev: Arc<Bdev>,
        ch: IoChannel,
        model: Rc<RefCell<Model>>,
        svc: usize,
        next_tag: u64,
    }

    impl Harness {
        fn new() -> Harness {
            with(|w| {
                *w = World {
                    disk: vec![0; BLOCKS as usize],
                    ..Default::default()
                }
            });
            let svc = new_service();
            let backend = ServiceBackend::new(NO_CREATE, Params::Null, Box::new(FakeBackend(svc)));
            let bdev = Bdev::new("t", Box::new(backend), false);
            let ch = bdev
                .open_channel(&mut crate::storage::reactor::Reactor::detached())
                .unwrap();
            Harness {
                bdev,
                ch,
                model: Rc::new(RefCell::new(Model {
                    acked: vec![0; BLOCKS as usize],
                    ..Default::default()
                })),
                svc,
                next_tag: 1,
            }
        }

        fn shared(&self) -> Arc<ServiceShared> {
            ServiceBackend::of(&self.bdev).unwrap().shared().clone()
        }

        fn submit(&mut self, kind: u8, block: u64) {
            let tag = self.next_tag;
            let value = 1000 + tag;
            let (kind, needs_block) = match kind % 6 {
                0 | 1 => (IoKind::Write, true),
                2 => (IoKind::Read, true),
                3 => (IoKind::Flush, false),
                4 => (IoKind::Unmap, true),
                _ => (IoKind::WriteZeroes, true),
            };
            if needs_block && !self.model.borrow_mut().busy.insert(block) {
                return; // the block has IO in flight: a careful submitter waits
            }
            self.next_tag += 1;
            let m = self.model.clone();
            let cb = move |req: IoRequest, st: IoStatus| {
                let mut m = m.borrow_mut();
                with(|w| {
                    let e = w.fired.entry(req.tag).or_insert((0, st));
                    e.0 += 1;
                    if e.0 > 1 {
                        w.violations
                            .push(format!("tag {} completed twice", req.tag));
                    }
                    if !st.is_ok() {
                        w.violations.push(format!("tag {} failed: {st:?}", req.tag));
                    }
                });
                if req.kind == IoKind::Flush {
                    return;
                }
                let b = req.offset / BS;
                m.busy.remove(&b);
                match req.kind {
                    IoKind::Write => m.acked[b as usize] = value_of(&req),
                    IoKind::Unmap | IoKind::WriteZeroes => m.acked[b as usize] = 0,
                    _ => {
                        let got = req
                            .buf
                            .as_ref()
                            .map(|x| u64::from_le_bytes(x.as_slice()[..8].try_into().unwrap()));
                        if got != Some(m.acked[b as usize]) {
                            with(|w| {
                                w.violations.push(format!(
                                    "read of block {b} (tag {}) got {got:?}, expected {}",
                                    req.tag, m.acked[b as usize]
                                ))
                            });
                        }
                    }
                }
            };
            let off = block * BS;
            let mut req = match kind {
                IoKind::Write => {
                    let mut buf = IoBuf::new(BS as usize);
                    buf.as_mut_slice()[..8].copy_from_slice(&value.to_le_bytes());
                    IoRequest::write(off, buf, cb)
                }
                IoKind::Read => IoRequest::read(off, IoBuf::new(BS as usize), cb),
                IoKind::Flush => IoRequest::flush(cb),
                IoKind::Unmap => IoRequest::unmap(off, BS, cb),
                IoKind::WriteZeroes => IoRequest::write_zeroes(off, BS, cb),
            };
            req.tag = tag;
            if kind.is_write() {
                with(|w| w.write_tags.insert(tag));
            }
            self.ch.submit(req);
        }

        fn pause(&self) {
            self.shared().set_paused(true);
            with(|w| w.paused = true);
        }

        fn resume(&self) {
            with(|w| w.paused = false);
            self.shared().set_paused(false);
        }

        fn gone(&self) {
            with(|w| w.svcs[self.svc].alive = false);
        }

        fn upgrade(&mut self) {
            self.svc = new_service();
            with(|w| w.paused = false);
            self.shared()
                .install(Arc::new(FakeBackend(self.svc)), false);
        }

        /// Completes everything: upgrade away from a dead service, resume, complete, poll.
        fn finish(&mut self) {
            if with(|w| !w.svcs[self.svc].alive) {
                self.upgrade();
            }
            self.resume();
            for _ in 0..1000 {
                self.ch.poll();
                complete(self.svc, 0);
                if self.ch.inflight() == 0 {
                    break;
                }
            }
            assert_eq!(self.ch.inflight(), 0, "requests left behind");
        }

        fn check(&self) {
            let submitted = self.next_tag - 1;
            with(|w| {
                assert!(w.violations.is_empty(), "{:#?}", w.violations);
                assert_eq!(
                    w.fired.len() as u64,
                    submitted,
                    "not every request completed"
                );
                assert!(w.fired.values().all(|&(n, st)| n == 1 && st.is_ok()));
                // The backing store holds exactly what was acknowledged.
                assert_eq!(w.disk, self.model.borrow().acked, "data differs");
            });
            let s = self.shared().snapshot();
            assert_eq!((s.waiting, s.pending), (0, 0));
        }
    }

    #[derive(Clone, Debug)]
    enum Op {
        Submit(u8, u64),
        Complete(usize),
        Poll,
        Pause,
        Resume,
        Gone,
        Upgrade,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            8 => (any::<u8>(), 0..BLOCKS).prop_map(|(k, b)| Op::Submit(k, b)),
            6 => any::<usize>().prop_map(Op::Complete),
            3 => Just(Op::Poll),
            1 => Just(Op::Pause),
            1 => Just(Op::Resume),
            1 => Just(Op::Gone),
            1 => Just(Op::Upgrade),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]
        #[test]
        fn any_interleaving_loses_nothing(ops in proptest::collection::vec(op(), 0..120)) {
            let mut h = Harness::new();
            for o in ops {
                match o {
                    Op::Submit(k, b) => h.submit(k, b),
                    Op::Complete(k) => complete(h.svc, k),
                    Op::Poll => { h.ch.poll(); }
                    Op::Pause => h.pause(),
                    Op::Resume => h.resume(),
                    Op::Gone => h.gone(),
                    Op::Upgrade => h.upgrade(),
                }
            }
            h.finish();
            h.check();
        }
    }

    #[test]
    fn pause_holds_and_resume_forwards_in_order() {
        let mut h = Harness::new();
        h.submit(0, 0);
        h.pause();
        for b in 1..5 {
            h.submit(0, b);
        }
        h.ch.poll();
        assert_eq!(with(|w| w.svcs[0].received.clone()), vec![1]);
        let s = h.shared().snapshot();
        assert_eq!((s.waiting, s.pending, s.held), (4, 1, 4));
        complete(0, 0);
        h.ch.poll();
        assert_eq!(
            h.shared().snapshot().pending,
            0,
            "pending drains while paused"
        );
        h.resume();
        h.ch.poll();
        assert_eq!(with(|w| w.svcs[0].received.clone()), vec![1, 2, 3, 4, 5]);
        h.finish();
        h.check();
    }

    #[test]
    fn service_gone_replays_pending_first_in_order() {
        let mut h = Harness::new();
        for b in 0..4 {
            h.submit(0, b); // tags 1..=4
        }
        complete(0, 1); // tag 2 done
        h.ch.poll();
        h.pause();
        h.submit(0, 5); // tag 5 waits
        h.gone();
        h.upgrade();
        h.ch.poll();
        assert_eq!(with(|w| w.svcs[1].received.clone()), vec![1, 3, 4, 5]);
        assert_eq!(h.shared().snapshot().replayed, 3);
        h.finish();
        h.check();
    }

    #[test]
    fn requests_finished_while_closing_complete_instead_of_replaying() {
        let mut h = Harness::new();
        with(|w| w.finish_on_abort = true);
        for b in 0..3 {
            h.submit(0, b);
        }
        h.upgrade();
        h.ch.poll();
        assert_eq!(h.shared().snapshot().replayed, 0);
        assert!(with(|w| w.svcs[1].received.is_empty()));
        h.finish();
        h.check();
    }

    #[test]
    fn flush_waits_for_earlier_writes() {
        let mut h = Harness::new();
        h.submit(0, 0); // write, tag 1
        h.submit(3, 0); // flush, tag 2
        h.submit(2, 1); // read, tag 3: behind the flush
        h.ch.poll();
        assert_eq!(with(|w| w.svcs[0].received.clone()), vec![1]);
        assert_eq!(h.shared().snapshot().barrier_waits, 1);
        complete(0, 0);
        h.ch.poll();
        h.ch.poll();
        assert_eq!(with(|w| w.svcs[0].received.clone()), vec![1, 2, 3]);
        h.finish();
        h.check();
    }

    #[test]
    fn dropping_the_channel_fails_waiting_requests_once() {
        let mut h = Harness::new();
        h.pause();
        h.submit(0, 0);
        h.submit(2, 1);
        let Harness { ch, .. } = h;
        drop(ch);
        with(|w| {
            assert_eq!(w.fired.len(), 2);
            assert!(w
                .fired
                .values()
                .all(|&(n, st)| n == 1 && st == IoStatus::Aborted));
        });
    }
}
