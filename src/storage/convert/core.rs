//! The conversion state machine. Owned by one reactor (no locks, no atomics on the IO path except
//! the single-writer progress counters); every other thread talks to it by message.
//!
//! Per grain: converted (bit persisted), or idle-unconverted, or busy — being copied (a [`Copy`]
//! in flight: source read → target write → durable) or claimed by a VM write that covers it whole.
//! Requests that need a busy grain wait on it (a waiter list per busy grain) and are re-evaluated
//! when it changes stage, so a grain is never copied twice.
//!
//! Durability pipeline, shared by copies and whole-grain VM writes ("units"):
//! 1. target write completes → unit queued for a target flush;
//! 2. one flush at a time covers every unit queued before it (group commit) → the units' grains
//!    are set in `durable`;
//! 3. one map persist at a time writes the `durable` words touching those grains and fdatasyncs the
//!    map (helper thread) → the grains are set in `converted`, busy state cleared, waiters woken,
//!    a whole-grain VM write is completed (acknowledged) only now.
//!
//! VM writes into a grain run only once its bit is durable (step 3), so a restart never copies
//! source data over an acknowledged VM write.

use super::map::{Bitmap, MapCommand, MapDone, MapWriter};
use super::source::{Chunk, SourceReader, SourceReply, SourceRequest};
use super::ConvertStats;
use crate::storage::bdev::{IoChannel, IoKind, IoRequest, IoStatus};
use crate::storage::qos::CreditBucket;
use ahash::AHashMap;
use std::cell::RefCell;
use std::collections::VecDeque;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

/// Completed VM requests of one convert channel, waiting for that channel's poll.
pub(super) type Out = Rc<RefCell<VecDeque<(IoRequest, IoStatus)>>>;

/// Background copies in flight at most (each up to [`BG_RUN_BYTES`]); 1 while VM IO is active.
const BG_DEPTH: usize = 16;
/// Bytes per background copy (consecutive grains read and written at once).
const BG_RUN_BYTES: u64 = super::source::POOL_BUF as u64;
/// Times a VM request re-tries after the copy it waited for failed, before it fails.
const MAX_RETRIES: u32 = 3;

/// What the target channel's callbacks report (they run inside `target.poll()`, while the core is
/// borrowed, so they only queue an event).
enum Event {
    /// A copy's target write finished (its buffer comes back for reuse).
    CopyWritten(u64, Option<crate::storage::bdev::IoBuf>, IoStatus),
    Flushed(IoStatus),
    OpDone(u64, IoRequest, IoStatus),
}
type Events = Rc<RefCell<Vec<Event>>>;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Stage {
    Reading,
    Writing,
    Written,
}

struct Copy {
    g0: u64,
    g1: u64,
    stage: Stage,
    zero: bool,
    background: bool,
    /// Counts in `bg_inflight` (a background copy until its data is on the target).
    counted: bool,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Busy {
    Copy(u64),
    Claim(u64),
}

struct GrainState {
    busy: Busy,
    waiters: Vec<u64>,
}

struct Op {
    /// Held here while waiting, or while its durability unit is in flight; `None` while in the
    /// target. Its own callback stays armed except while the target holds it.
    req: Option<IoRequest>,
    out: Out,
    claims: Vec<u64>,
    retries: u32,
}

struct Unit {
    g0: u64,
    g1: u64,
    copy: Option<u64>,
    op: Option<u64>,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Phase {
    Converting,
    Finishing,
    Done,
}

/// Everything [`Core::new`] needs, prepared on the control plane (it is `Send`).
pub(super) struct CoreInit {
    pub source: SourceReader,
    pub map: MapWriter,
    pub converted: Bitmap,
    pub grain: u64,
    pub src_size: u64,
    pub stats: Arc<ConvertStats>,
    /// The target was created (or was empty) by this run: unconverted grains read as zeros.
    pub zero_target: bool,
}

/// One conversion, on its reactor.
pub(super) struct Core {
    target: IoChannel,
    grain: u64,
    src_size: u64,
    ngrains: u64,
    converted: Bitmap,
    durable: Bitmap,
    busy: AHashMap<u64, GrainState>,
    copies: AHashMap<u64, Copy>,
    ops: AHashMap<u64, Op>,
    next_id: u64,
    events: Events,
    source: Option<SourceReader>,
    map: Option<MapWriter>,
    to_flush: Vec<Unit>,
    flushing: Option<Vec<Unit>>,
    to_persist: Vec<Unit>,
    persisting: Option<Vec<Unit>>,
    persist_seq: u64,
    ready: Vec<u64>,
    cursor: u64,
    bg_inflight: usize,
    bucket: CreditBucket,
    bucket_rate: u64,
    clock: Instant,
    stats: Arc<ConvertStats>,
    phase: Phase,
    stopping: bool,
    zero_target: bool,
    /// Grains a failed or abandoned VM write may have touched: with a zero target, their zero
    /// copies are still written.
    maybe_dirty: ahash::AHashSet<u64>,
}

impl Core {
    pub(super) fn new(target: IoChannel, init: CoreInit) -> Core {
        let ngrains = init.converted.len();
        let durable = init.converted.clone();
        // A map with every bit set (a crash right before it was deleted) finishes on the first
        // poll.
        let phase = Phase::Converting;
        Core {
            target,
            grain: init.grain,
            src_size: init.src_size,
            ngrains,
            converted: init.converted,
            durable,
            busy: AHashMap::new(),
            copies: AHashMap::new(),
            ops: AHashMap::new(),
            next_id: 1,
            events: Rc::new(RefCell::new(Vec::new())),
            source: Some(init.source),
            map: Some(init.map),
            to_flush: Vec::new(),
            flushing: None,
            to_persist: Vec::new(),
            persisting: None,
            persist_seq: 0,
            ready: Vec::new(),
            cursor: 0,
            bg_inflight: 0,
            bucket: CreditBucket::new(0, 0, 0),
            bucket_rate: u64::MAX,
            clock: Instant::now(),
            stats: init.stats,
            phase,
            stopping: false,
            zero_target: init.zero_target,
            maybe_dirty: ahash::AHashSet::new(),
        }
    }

    /// Requests and copies not finished (shutdown waits for these).
    pub(super) fn inflight(&self) -> usize {
        self.ops.len() + self.copies.len() + usize::from(self.phase == Phase::Finishing)
    }

    /// Shutdown began: start no background copy.
    pub(super) fn stop(&mut self) {
        self.stopping = true;
    }

    #[inline]
    fn is_converted(&self, g: u64) -> bool {
        g >= self.ngrains || self.converted.get(g)
    }

    fn grain_end(&self, g: u64) -> u64 {
        ((g + 1) * self.grain).min(self.src_size)
    }

    fn id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    /// A VM request from a convert channel; its completion goes to `out`.
    pub(super) fn submit(&mut self, req: IoRequest, out: &Out) {
        if self.phase == Phase::Done || req.kind == IoKind::Flush {
            self.pass_through(req, out);
            return;
        }
        let id = self.id();
        self.ops.insert(
            id,
            Op {
                req: Some(req),
                out: out.clone(),
                claims: Vec::new(),
                retries: 0,
            },
        );
        self.eval(id);
    }

    /// Submits to the target; the completion goes straight back to `out`.
    fn pass_through(&mut self, mut req: IoRequest, out: &Out) {
        let orig = req.set_callback(|_, _| {});
        let out = out.clone();
        req.set_callback(move |mut r: IoRequest, st| {
            if let Some(cb) = orig {
                r.set_callback(cb);
            }
            out.borrow_mut().push_back((r, st));
        });
        self.target.submit(req);
    }

    /// Runs a VM request as far as it can go now.
    fn eval(&mut self, id: u64) {
        let Some(op) = self.ops.get(&id) else { return };
        let Some(req) = op.req.as_ref() else { return };
        let (kind, off, len) = (req.kind, req.offset, req.len);
        if len == 0 {
            self.start_op(id);
            return;
        }
        let g0 = off / self.grain;
        let g1 = ((off + len - 1) / self.grain + 1).min(self.ngrains.max(g0));
        let write = kind.is_write();
        let mut blocked = None;
        let mut idle = Vec::new();
        for g in g0..g1 {
            if self.is_converted(g) {
                continue;
            }
            match self.busy.get(&g).map(|s| s.busy) {
                None => idle.push(g),
                Some(Busy::Claim(o)) if o == id => {}
                Some(Busy::Copy(c)) if !write => {
                    let on_target = self
                        .copies
                        .get(&c)
                        .is_some_and(|c| c.stage == Stage::Written);
                    if !on_target && blocked.is_none() {
                        blocked = Some(g);
                    }
                }
                Some(_) => {
                    if blocked.is_none() {
                        blocked = Some(g);
                    }
                    if write {
                        break;
                    }
                }
            }
        }
        if write {
            if let Some(g) = blocked {
                self.wait_on(g, id);
                return;
            }
            // Claim the grains the write covers whole (no copy needed); copy the others.
            let mut first_copy = None;
            for g in idle {
                let whole = off <= g * self.grain && off + len >= self.grain_end(g);
                if whole {
                    self.busy.insert(
                        g,
                        GrainState {
                            busy: Busy::Claim(id),
                            waiters: Vec::new(),
                        },
                    );
                    if let Some(op) = self.ops.get_mut(&id) {
                        op.claims.push(g);
                    }
                } else {
                    self.start_copy(g, g + 1, false);
                    first_copy.get_or_insert(g);
                }
            }
            match first_copy {
                Some(g) => self.wait_on(g, id),
                None => self.start_op(id),
            }
            return;
        }
        // Reads: copy every idle grain (in runs), wait until all are on the target.
        let mut i = 0;
        while i < idle.len() {
            let mut j = i + 1;
            while j < idle.len() && idle[j] == idle[j - 1] + 1 {
                j += 1;
            }
            self.start_copy(idle[i], idle[j - 1] + 1, false);
            blocked.get_or_insert(idle[i]);
            i = j;
        }
        match blocked {
            Some(g) => self.wait_on(g, id),
            None => self.start_op(id),
        }
    }

    fn wait_on(&mut self, g: u64, id: u64) {
        if let Some(s) = self.busy.get_mut(&g) {
            s.waiters.push(id);
        } else {
            self.ready.push(id);
        }
    }

    fn wake(&mut self, g: u64) {
        if let Some(s) = self.busy.get_mut(&g) {
            self.ready.append(&mut s.waiters);
        }
    }

    /// Sends the VM request to the target.
    fn start_op(&mut self, id: u64) {
        let Some(op) = self.ops.get_mut(&id) else {
            return;
        };
        let Some(mut req) = op.req.take() else { return };
        let orig = req.set_callback(|_, _| {});
        let ev = self.events.clone();
        req.set_callback(move |mut r: IoRequest, st| {
            if let Some(cb) = orig {
                r.set_callback(cb);
            }
            ev.borrow_mut().push(Event::OpDone(id, r, st));
        });
        self.target.submit(req);
    }

    fn complete_op(&mut self, id: u64, st: IoStatus) {
        if let Some(mut op) = self.ops.remove(&id) {
            if let Some(req) = op.req.take() {
                op.out.borrow_mut().push_back((req, st));
            }
        }
    }

    fn start_copy(&mut self, g0: u64, g1: u64, background: bool) {
        let id = self.id();
        for g in g0..g1 {
            self.busy.insert(
                g,
                GrainState {
                    busy: Busy::Copy(id),
                    waiters: Vec::new(),
                },
            );
        }
        self.copies.insert(
            id,
            Copy {
                g0,
                g1,
                stage: Stage::Reading,
                zero: false,
                background,
                counted: background,
            },
        );
        if background {
            self.bg_inflight += 1;
        }
        let offset = g0 * self.grain;
        let len = self.grain_end(g1 - 1) - offset;
        let sent = self
            .source
            .as_ref()
            .is_some_and(|s| s.request(SourceRequest { id, offset, len }, !background));
        if !sent {
            self.fail_copy(id, libc::EIO);
        }
    }

    /// A copy failed: its grains go back to idle; whoever waited re-evaluates (and gives up after
    /// [`MAX_RETRIES`]).
    fn fail_copy(&mut self, id: u64, errno: i32) {
        let Some(c) = self.copies.remove(&id) else {
            return;
        };
        if c.counted {
            self.bg_inflight -= 1;
        }
        self.stats.errors.fetch_add(1, Ordering::Relaxed);
        for g in c.g0..c.g1 {
            if let Some(s) = self.busy.remove(&g) {
                for w in s.waiters {
                    let give_up = self.ops.get_mut(&w).is_some_and(|op| {
                        op.retries += 1;
                        op.retries > MAX_RETRIES
                    });
                    if give_up {
                        self.release_claims(w);
                        self.complete_op(w, IoStatus::IoError(errno));
                    } else {
                        self.ready.push(w);
                    }
                }
            }
        }
    }

    fn release_claims(&mut self, id: u64) {
        let claims = self
            .ops
            .get_mut(&id)
            .map(|op| std::mem::take(&mut op.claims))
            .unwrap_or_default();
        for g in claims {
            self.maybe_dirty.insert(g);
            if let Some(s) = self.busy.remove(&g) {
                self.ready.extend(s.waiters);
            }
        }
    }

    fn on_source(&mut self, rep: SourceReply) {
        let Some((g0, g1)) = self.copies.get(&rep.id).map(|c| (c.g0, c.g1)) else {
            return;
        };
        let offset = g0 * self.grain;
        let len = self.grain_end(g1 - 1) - offset;
        let chunk = match rep.result {
            Ok(ch) => ch,
            Err(e) => {
                self.fail_copy(rep.id, e);
                return;
            }
        };
        if let Some(c) = self.copies.get_mut(&rep.id) {
            c.stage = Stage::Writing;
            c.zero = matches!(chunk, Chunk::Zero);
        }
        // Reads waiting inside this copy are served from the fetched data right away.
        self.serve_reads_from(g0, g1, &chunk);
        let id = rep.id;
        let ev = self.events.clone();
        self.stats.bytes_copied.fetch_add(len, Ordering::Relaxed);
        if matches!(chunk, Chunk::Zero)
            && self.zero_target
            && (g0..g1).all(|g| !self.maybe_dirty.contains(&g))
        {
            // A fresh target reads as zeros already: nothing to write.
            ev.borrow_mut()
                .push(Event::CopyWritten(id, None, IoStatus::Success));
            return;
        }
        let cb = move |mut r: IoRequest, st| {
            ev.borrow_mut()
                .push(Event::CopyWritten(id, r.buf.take(), st))
        };
        let req = match chunk {
            Chunk::Zero => IoRequest::write_zeroes(offset, len, cb),
            Chunk::Data(buf) => IoRequest::write(offset, buf, cb),
        };
        self.target.submit(req);
    }

    fn serve_reads_from(&mut self, g0: u64, g1: u64, chunk: &Chunk) {
        let start = g0 * self.grain;
        let end = self.grain_end(g1 - 1);
        let mut served = Vec::new();
        for g in g0..g1 {
            let Some(s) = self.busy.get_mut(&g) else {
                continue;
            };
            let ops = &mut self.ops;
            s.waiters.retain(|&w| {
                let Some(op) = ops.get_mut(&w) else {
                    return false;
                };
                let Some(req) = op.req.as_mut() else {
                    return true;
                };
                if req.kind != IoKind::Read || req.offset < start || req.offset + req.len > end {
                    return true;
                }
                let from = (req.offset - start) as usize;
                if let Some(b) = req.buf.as_mut() {
                    let n = b.len();
                    match chunk {
                        Chunk::Data(d) => b
                            .as_mut_slice()
                            .copy_from_slice(&d.as_slice()[from..from + n]),
                        Chunk::Zero => b.as_mut_slice().fill(0),
                    }
                }
                served.push(w);
                false
            });
        }
        for w in served {
            self.stats.reads_from_copy.fetch_add(1, Ordering::Relaxed);
            self.complete_op(w, IoStatus::Success);
        }
    }

    fn on_event(&mut self, e: Event) {
        match e {
            Event::CopyWritten(id, buf, st) => {
                if let (Some(buf), Some(src)) = (buf, self.source.as_ref()) {
                    src.recycle(buf);
                }
                let Some(c) = self.copies.get_mut(&id) else {
                    return;
                };
                if !st.is_ok() {
                    let errno = match st {
                        IoStatus::IoError(e) => e,
                        _ => libc::EIO,
                    };
                    log::warn!("convert: target write of grains {}..{}: {st:?}", c.g0, c.g1);
                    self.fail_copy(id, errno);
                    return;
                }
                c.stage = Stage::Written;
                // The background may start the next copy while this one waits for durability.
                if c.counted {
                    c.counted = false;
                    self.bg_inflight -= 1;
                }
                let (g0, g1) = (c.g0, c.g1);
                self.to_flush.push(Unit {
                    g0,
                    g1,
                    copy: Some(id),
                    op: None,
                });
                for g in g0..g1 {
                    self.wake(g);
                }
            }
            Event::OpDone(id, req, st) => {
                let claims = self.ops.get(&id).map(|o| o.claims.clone());
                match claims {
                    None => drop(req),
                    Some(cl) if cl.is_empty() => {
                        if let Some(op) = self.ops.get_mut(&id) {
                            op.req = Some(req);
                        }
                        self.complete_op(id, st);
                    }
                    Some(cl) => {
                        if let Some(op) = self.ops.get_mut(&id) {
                            op.req = Some(req);
                        }
                        if st.is_ok() {
                            // Acknowledged only once the claimed grains' bits are durable.
                            for g in cl {
                                self.to_flush.push(Unit {
                                    g0: g,
                                    g1: g + 1,
                                    copy: None,
                                    op: Some(id),
                                });
                            }
                        } else {
                            self.release_claims(id);
                            self.complete_op(id, st);
                        }
                    }
                }
            }
            Event::Flushed(st) => {
                let units = self.flushing.take().unwrap_or_default();
                if st.is_ok() {
                    for u in &units {
                        for g in u.g0..u.g1 {
                            self.durable.set(g);
                        }
                    }
                    self.to_persist.extend(units);
                } else {
                    log::warn!("convert: target flush failed ({st:?}); retrying");
                    let mut again = units;
                    again.append(&mut self.to_flush);
                    self.to_flush = again;
                }
            }
        }
    }

    fn on_persisted(&mut self, d: MapDone) {
        if d.seq == u64::MAX {
            // The map is gone: the bdev is a plain target bdev now.
            if let Err(e) = d.result {
                log::warn!("convert: removing the map failed (errno {e})");
            }
            self.map = None;
            self.phase = Phase::Done;
            self.stats.set_done();
            return;
        }
        let units = self.persisting.take().unwrap_or_default();
        if d.result.is_err() {
            log::warn!("convert: map write failed ({:?}); retrying", d.result);
            let mut again = units;
            again.append(&mut self.to_persist);
            self.to_persist = again;
            return;
        }
        // An op with several claimed grains completes when its last unit is persisted.
        let mut ops_done = Vec::new();
        for u in units {
            for g in u.g0..u.g1 {
                if self.converted.set(g) {
                    self.stats.done_grains.fetch_add(1, Ordering::Relaxed);
                }
                if let Some(s) = self.busy.remove(&g) {
                    self.ready.extend(s.waiters);
                }
            }
            if let Some(c) = u.copy.and_then(|c| self.copies.remove(&c)) {
                if c.counted {
                    self.bg_inflight -= 1;
                }
                if c.background {
                    self.stats.bg_copies.fetch_add(1, Ordering::Relaxed);
                } else {
                    self.stats.vm_copies.fetch_add(1, Ordering::Relaxed);
                }
            }
            if let Some(o) = u.op {
                if let Some(op) = self.ops.get_mut(&o) {
                    op.claims.retain(|&g| g < u.g0 || g >= u.g1);
                    if op.claims.is_empty() {
                        ops_done.push(o);
                    }
                }
            }
        }
        for o in ops_done {
            self.complete_op(o, IoStatus::Success);
        }
    }

    fn kick_pipeline(&mut self) {
        if self.flushing.is_none() && !self.to_flush.is_empty() {
            self.flushing = Some(std::mem::take(&mut self.to_flush));
            let ev = self.events.clone();
            self.target.submit(IoRequest::flush(move |_, st| {
                ev.borrow_mut().push(Event::Flushed(st))
            }));
        }
        if self.persisting.is_none() && !self.to_persist.is_empty() {
            let units = std::mem::take(&mut self.to_persist);
            let mut idx: Vec<u64> = Vec::new();
            for u in &units {
                for w in u.g0 / 64..=(u.g1 - 1) / 64 {
                    idx.push(w);
                }
            }
            idx.sort_unstable();
            idx.dedup();
            let words = idx.iter().map(|&w| (w, self.durable.word(w))).collect();
            self.persist_seq += 1;
            let seq = self.persist_seq;
            let sent = self
                .map
                .as_ref()
                .is_some_and(|m| m.send(MapCommand::Persist { seq, words }));
            if sent {
                self.persisting = Some(units);
            } else {
                log::error!("convert: map writer is gone");
                self.to_persist = units;
            }
        }
    }

    fn background(&mut self) {
        if self.stopping || self.phase != Phase::Converting || self.source.is_none() {
            return;
        }
        if self.stats.paused.load(Ordering::Relaxed) {
            return;
        }
        let depth = if self.ops.is_empty() { BG_DEPTH } else { 1 };
        if self.bg_inflight >= depth {
            return;
        }
        let rate = self.stats.rate_bytes.load(Ordering::Relaxed);
        // The clock is read only when a copy may start (this runs on every reactor poll).
        let now = self.clock.elapsed().as_nanos() as u64;
        if rate != self.bucket_rate {
            self.bucket = CreditBucket::new_empty(rate, BG_RUN_BYTES.max(self.grain) * 2, now);
            self.bucket_rate = rate;
        }
        let run = (BG_RUN_BYTES / self.grain).max(1);
        let mut wrapped = false;
        while self.bg_inflight < depth {
            let Some(g) = self.next_idle(self.cursor) else {
                if wrapped || self.cursor == 0 {
                    break;
                }
                wrapped = true;
                self.cursor = 0;
                continue;
            };
            let mut end = g + 1;
            while end < self.ngrains
                && end - g < run
                && !self.converted.get(end)
                && !self.busy.contains_key(&end)
            {
                end += 1;
            }
            let bytes = self.grain_end(end - 1) - g * self.grain;
            if rate > 0 && !self.bucket.try_consume(bytes, now) {
                break;
            }
            self.start_copy(g, end, true);
            self.cursor = end;
        }
    }

    fn next_idle(&self, from: u64) -> Option<u64> {
        let mut g = from;
        loop {
            let c = self.converted.next_clear(g)?;
            if !self.busy.contains_key(&c) {
                return Some(c);
            }
            g = c + 1;
        }
    }

    fn check_finished(&mut self) {
        if self.phase == Phase::Converting
            && self.converted.ones() == self.ngrains
            && self.busy.is_empty()
            && self.copies.is_empty()
        {
            // Every grain's data is durable (flushed before its bit): drop the source, delete the map.
            self.source = None;
            self.phase = Phase::Finishing;
            let sent = self
                .map
                .as_ref()
                .is_some_and(|m| m.send(MapCommand::Remove));
            if !sent {
                self.phase = Phase::Done;
                self.stats.set_done();
            }
        }
    }

    /// One round: target completions, source data, map acks, woken requests, background.
    pub(super) fn poll(&mut self) -> usize {
        let mut work = self.target.poll();
        while let Some(rep) = self.source.as_ref().and_then(|s| s.try_reply()) {
            self.on_source(rep);
            work += 1;
        }
        loop {
            let evs = std::mem::take(&mut *self.events.borrow_mut());
            if evs.is_empty() {
                break;
            }
            work += evs.len();
            for e in evs {
                self.on_event(e);
            }
        }
        while let Some(d) = self.map.as_ref().and_then(|m| m.try_done()) {
            self.on_persisted(d);
            work += 1;
        }
        while !self.ready.is_empty() {
            let ready = std::mem::take(&mut self.ready);
            work += ready.len();
            for id in ready {
                self.eval(id);
            }
        }
        self.kick_pipeline();
        self.background();
        self.check_finished();
        work
    }
}
