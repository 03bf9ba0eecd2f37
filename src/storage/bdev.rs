//! The block-device layer: one asynchronous interface whatever stores the bytes.
//!
//! A [`Bdev`] is shared (`Arc`) and immutable on the IO path. IO goes through an [`IoChannel`],
//! opened on the reactor that will use it and owned by it: a reactor's channel has its own
//! backend state (an io_uring, an NBD connection, ...) and its own statistics, so reactors never
//! share mutable state while doing IO. Stats are summed on read.
//!
//! An [`IoRequest`] owns its buffer and its completion callback. The callback fires exactly once:
//! from [`IoChannel::poll`] on the channel's reactor (never from inside `submit`, so a callback may
//! resubmit without recursion), or — if the request is dropped anywhere before completing (a
//! backend shutting down, a queue being torn down) — from its `Drop` with [`IoStatus::Aborted`].
//! The request comes back to the callback, buffer included, so layers above (QoS metering, the
//! pause/replay queues) can hold, meter and resubmit it.
//!
//! Requests are validated before they reach a backend: out of range, not aligned to the block
//! size, a write to a read-only bdev, or a missing/mis-sized buffer complete with an error status
//! and bump a counter; no input makes this layer panic.

use super::qos_gate::QosGate;
use super::reactor::Reactor;
use super::ticks;
use serde::Serialize;
use std::alloc::Layout;
use std::collections::VecDeque;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// Alignment of [`IoBuf`] memory: a page, enough for O_DIRECT on any device.
pub const IOBUF_ALIGN: usize = 4096;

/// A zero-initialised, page-aligned byte buffer owned by one request at a time.
pub struct IoBuf {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: IoBuf uniquely owns its allocation (like Box<[u8]>); moving it between threads is fine.
unsafe impl Send for IoBuf {}
// SAFETY: shared references only give `&[u8]`.
unsafe impl Sync for IoBuf {}

impl IoBuf {
    fn layout(len: usize) -> Option<Layout> {
        Layout::from_size_align(len, IOBUF_ALIGN).ok()
    }

    /// A zeroed buffer of `len` bytes. Panics only if the allocator fails (like `Vec`).
    pub fn new(len: usize) -> IoBuf {
        if len == 0 {
            return IoBuf {
                ptr: NonNull::dangling(),
                len: 0,
            };
        }
        let layout =
            Self::layout(len).unwrap_or_else(|| panic!("IoBuf of {len} bytes is too large"));
        // SAFETY: layout has non-zero size.
        let p = unsafe { std::alloc::alloc_zeroed(layout) };
        let ptr = NonNull::new(p).unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
        IoBuf { ptr, len }
    }

    /// A buffer holding a copy of `data`.
    pub fn from_slice(data: &[u8]) -> IoBuf {
        let mut b = IoBuf::new(data.len());
        b.as_mut_slice().copy_from_slice(data);
        b
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True for a zero-length buffer.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr is valid for len initialised bytes (zeroed at allocation) while self lives.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    /// The bytes, mutably.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as above, and &mut self guarantees exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }

    /// Raw pointer for a kernel IO (io_uring). Valid while the buffer lives and is not moved out of
    /// its owner... the allocation itself never moves, so the pointer stays valid while `self` lives.
    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }
}

impl Drop for IoBuf {
    fn drop(&mut self) {
        if let Some(layout) = Self::layout(self.len).filter(|_| self.len > 0) {
            // SAFETY: allocated in `new` with exactly this layout.
            unsafe { std::alloc::dealloc(self.ptr.as_ptr(), layout) };
        }
    }
}

impl Clone for IoBuf {
    fn clone(&self) -> Self {
        IoBuf::from_slice(self.as_slice())
    }
}

impl std::fmt::Debug for IoBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "IoBuf({} bytes)", self.len)
    }
}

/// The operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum IoKind {
    /// Read into the buffer.
    Read,
    /// Write the buffer.
    Write,
    /// Make completed writes durable.
    Flush,
    /// Discard a range (reads back as zeros on malloc, null and regular files).
    Unmap,
    /// Zero a range without a data buffer.
    WriteZeroes,
}

impl IoKind {
    /// Whether it modifies data (refused on a read-only bdev).
    pub fn is_write(self) -> bool {
        matches!(self, IoKind::Write | IoKind::Unmap | IoKind::WriteZeroes)
    }
}

/// How a request ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum IoStatus {
    /// Done.
    Success,
    /// Beyond the end of the bdev.
    OutOfRange,
    /// Offset or length not a multiple of the block size.
    Unaligned,
    /// A write-type request on a read-only bdev.
    ReadOnly,
    /// Malformed: zero length, missing or mis-sized buffer, larger than the bdev's maximum.
    Invalid,
    /// The backend cannot do this kind of request.
    Unsupported,
    /// The backend failed it (an errno, or `EIO` when there is none).
    IoError(i32),
    /// Dropped before completion (shutdown, or a remote that stayed unreachable).
    Aborted,
}

impl IoStatus {
    /// Whether it succeeded.
    pub fn is_ok(self) -> bool {
        self == IoStatus::Success
    }
}

/// A completion callback; runs on the reactor that submitted the request.
pub type Completion = Box<dyn FnOnce(IoRequest, IoStatus)>;

/// One block IO. Owns its buffer; its callback fires exactly once (see the module docs).
pub struct IoRequest {
    /// What to do.
    pub kind: IoKind,
    /// Byte offset (multiple of the block size).
    pub offset: u64,
    /// Byte length (multiple of the block size; the buffer's length for reads and writes).
    pub len: u64,
    /// Data buffer (reads and writes only).
    pub buf: Option<IoBuf>,
    /// Free for the submitter (e.g. a virtqueue head index).
    pub tag: u64,
    /// Set by the bdev's service queue (submission order, for replay); not for submitters.
    pub queue_seq: u64,
    submit_tick: u64,
    cb: Option<Completion>,
}

impl IoRequest {
    fn with(kind: IoKind, offset: u64, len: u64, buf: Option<IoBuf>, cb: Completion) -> IoRequest {
        IoRequest {
            kind,
            offset,
            len,
            buf,
            tag: 0,
            queue_seq: 0,
            submit_tick: 0,
            cb: Some(cb),
        }
    }

    /// Read `buf.len()` bytes at `offset` into `buf`.
    pub fn read(
        offset: u64,
        buf: IoBuf,
        cb: impl FnOnce(IoRequest, IoStatus) + 'static,
    ) -> IoRequest {
        let len = buf.len() as u64;
        Self::with(IoKind::Read, offset, len, Some(buf), Box::new(cb))
    }

    /// Write `buf` at `offset`.
    pub fn write(
        offset: u64,
        buf: IoBuf,
        cb: impl FnOnce(IoRequest, IoStatus) + 'static,
    ) -> IoRequest {
        let len = buf.len() as u64;
        Self::with(IoKind::Write, offset, len, Some(buf), Box::new(cb))
    }

    /// Flush.
    pub fn flush(cb: impl FnOnce(IoRequest, IoStatus) + 'static) -> IoRequest {
        Self::with(IoKind::Flush, 0, 0, None, Box::new(cb))
    }

    /// Discard `len` bytes at `offset`.
    pub fn unmap(
        offset: u64,
        len: u64,
        cb: impl FnOnce(IoRequest, IoStatus) + 'static,
    ) -> IoRequest {
        Self::with(IoKind::Unmap, offset, len, None, Box::new(cb))
    }

    /// Zero `len` bytes at `offset`.
    pub fn write_zeroes(
        offset: u64,
        len: u64,
        cb: impl FnOnce(IoRequest, IoStatus) + 'static,
    ) -> IoRequest {
        Self::with(IoKind::WriteZeroes, offset, len, None, Box::new(cb))
    }

    /// Replaces the callback (to resubmit a completed request, or to wrap it in a layer above).
    /// Returns the previous one, if the request had not completed.
    pub fn set_callback(
        &mut self,
        cb: impl FnOnce(IoRequest, IoStatus) + 'static,
    ) -> Option<Completion> {
        self.cb.replace(Box::new(cb))
    }

    /// Whether a callback is still armed (false once completed).
    pub fn armed(&self) -> bool {
        self.cb.is_some()
    }

    /// Tick at which it was submitted to a channel.
    pub fn submit_tick(&self) -> u64 {
        self.submit_tick
    }

    /// Completes the request: fires the callback (once; later calls do nothing).
    pub fn complete(mut self, status: IoStatus) {
        if let Some(cb) = self.cb.take() {
            cb(self, status);
        }
    }
}

impl Drop for IoRequest {
    fn drop(&mut self) {
        if let Some(cb) = self.cb.take() {
            // Never completed: fail it now, handing the caller its buffer back.
            let req = IoRequest {
                kind: self.kind,
                offset: self.offset,
                len: self.len,
                buf: self.buf.take(),
                tag: self.tag,
                queue_seq: self.queue_seq,
                submit_tick: self.submit_tick,
                cb: None,
            };
            cb(req, IoStatus::Aborted);
        }
    }
}

impl std::fmt::Debug for IoRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "IoRequest({:?} off {} len {} tag {})",
            self.kind, self.offset, self.len, self.tag
        )
    }
}

/// Completed requests waiting for their callbacks, which [`IoChannel::poll`] runs.
#[derive(Default)]
pub struct Completions(VecDeque<(IoRequest, IoStatus)>);

impl Completions {
    /// Queues a completion.
    #[inline]
    pub fn push(&mut self, req: IoRequest, st: IoStatus) {
        self.0.push_back((req, st));
    }

    /// Takes the oldest completion (for a layer that wraps another backend channel).
    #[inline]
    pub fn pop(&mut self) -> Option<(IoRequest, IoStatus)> {
        self.0.pop_front()
    }

    /// Number queued.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// True when none is queued.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Errors creating or opening a bdev.
#[derive(Debug, thiserror::Error)]
pub enum BdevError {
    /// Bad or missing parameters.
    #[error("{0}")]
    Params(String),
    /// No backend type of that name.
    #[error("unknown storage system {name:?} (known: {known})")]
    UnknownType {
        /// The name asked for.
        name: String,
        /// Registered names.
        known: String,
    },
    /// The storage system could not be reached or opened.
    #[error("{what}: {err}")]
    Io {
        /// What was being done.
        what: String,
        /// Why it failed.
        err: std::io::Error,
    },
    /// Another error from a backend.
    #[error("{0}")]
    Backend(String),
}

/// Geometry and flags of a bdev.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct BdevInfo {
    /// Bytes per block.
    pub block_size: u32,
    /// Number of blocks.
    pub num_blocks: u64,
    /// Refuses writes, unmaps and write-zeroes.
    pub read_only: bool,
    /// Largest request in bytes the backend accepts (0 = no limit).
    pub max_io_bytes: u64,
}

impl BdevInfo {
    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.num_blocks.saturating_mul(u64::from(self.block_size))
    }

    /// Checks a request against the geometry. Pure; the reason for every refusal is a status.
    pub fn validate(
        &self,
        kind: IoKind,
        offset: u64,
        len: u64,
        buf_len: Option<usize>,
    ) -> Result<(), IoStatus> {
        if kind == IoKind::Flush {
            return Ok(());
        }
        if kind.is_write() && self.read_only {
            return Err(IoStatus::ReadOnly);
        }
        match (kind, buf_len) {
            (IoKind::Read | IoKind::Write, Some(b)) if b as u64 == len => {}
            (IoKind::Read | IoKind::Write, _) => return Err(IoStatus::Invalid),
            _ => {}
        }
        if len == 0
            || (self.max_io_bytes > 0
                && len > self.max_io_bytes
                && matches!(kind, IoKind::Read | IoKind::Write))
        {
            return Err(IoStatus::Invalid);
        }
        let bs = u64::from(self.block_size.max(1));
        if !offset.is_multiple_of(bs) || !len.is_multiple_of(bs) {
            return Err(IoStatus::Unaligned);
        }
        match offset.checked_add(len) {
            Some(end) if end <= self.size() => Ok(()),
            _ => Err(IoStatus::OutOfRange),
        }
    }
}

/// A storage system's per-reactor IO state (an io_uring, a connection, ...).
///
/// Requests reaching it are validated. It completes each exactly once by pushing it to `done`
/// (possibly during `submit`); [`IoChannel`] runs the callbacks.
pub trait BackendChannel {
    /// Starts a request.
    fn submit(&mut self, req: IoRequest, done: &mut Completions);
    /// Makes progress; returns a count of work done (0 = idle).
    fn poll(&mut self, done: &mut Completions) -> usize;
    /// Requests accepted and not yet pushed to `done`.
    fn inflight(&self) -> usize;
    /// Hands every request still held to `done` with [`IoStatus::Aborted`] (shutdown).
    fn abort(&mut self, done: &mut Completions);
    /// Whether a request submitted now could be sent at once (e.g. the connection is up). An
    /// upgrade opens the new backend's channels early and switches when they are ready.
    fn ready(&self) -> bool {
        true
    }
}

/// A storage system behind a bdev: geometry plus a factory for per-reactor channels.
pub trait BdevBackend: Send + Sync {
    /// The registered type name ("malloc", "file", ...).
    fn type_name(&self) -> &'static str;
    /// Geometry as the storage system reports it.
    fn info(&self) -> BdevInfo;
    /// Opens a channel for the calling reactor. Must not block for long (no network round trips).
    fn open_channel(&self) -> Result<Box<dyn BackendChannel>, BdevError>;
    /// The concrete backend, for layers that look for their own wrapper (the service queue).
    fn as_any(&self) -> Option<&dyn std::any::Any> {
        None
    }
}

/// Per-kind counters of one channel (single writer: the channel's reactor).
#[derive(Default, Debug)]
struct KindCounters {
    bytes: AtomicU64,
    ops: AtomicU64,
    ticks: AtomicU64,
    max: AtomicU64,
    min: AtomicU64, // 0 = none yet
}

#[inline(always)]
fn add(c: &AtomicU64, v: u64) {
    c.store(c.load(Ordering::Relaxed).wrapping_add(v), Ordering::Relaxed);
}

impl KindCounters {
    #[inline]
    fn record(&self, bytes: u64, lat: u64) {
        add(&self.bytes, bytes);
        add(&self.ops, 1);
        add(&self.ticks, lat);
        if lat > self.max.load(Ordering::Relaxed) {
            self.max.store(lat, Ordering::Relaxed);
        }
        let m = self.min.load(Ordering::Relaxed);
        if m == 0 || lat < m {
            self.min.store(lat.max(1), Ordering::Relaxed);
        }
    }
}

/// Counters of one channel.
#[derive(Default, Debug)]
pub struct ChannelStats {
    read: KindCounters,
    write: KindCounters,
    unmap: KindCounters,
    flush: KindCounters,
    zeroes: KindCounters,
    out_of_range: AtomicU64,
    unaligned: AtomicU64,
    read_only: AtomicU64,
    invalid: AtomicU64,
    unsupported: AtomicU64,
    io_error: AtomicU64,
    aborted: AtomicU64,
}

/// Error counters (`bdev_get_iostat`'s `io_error`, broken down by cause).
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct IoErrorStat {
    /// Requests beyond the end.
    pub out_of_range: u64,
    /// Requests not aligned to the block size.
    pub unaligned: u64,
    /// Write-type requests on a read-only bdev.
    pub read_only: u64,
    /// Malformed requests.
    pub invalid: u64,
    /// Kinds the backend cannot do.
    pub unsupported: u64,
    /// Failed by the storage system.
    pub io_error: u64,
    /// Dropped before completion.
    pub aborted: u64,
}

impl IoErrorStat {
    /// All errors.
    pub fn total(&self) -> u64 {
        self.out_of_range
            + self.unaligned
            + self.read_only
            + self.invalid
            + self.unsupported
            + self.io_error
            + self.aborted
    }
}

/// One bdev's IO statistics, with the field names of SPDK's `bdev_get_iostat` (successful IO
/// only, as there), plus flush/write-zeroes counts and error counters.
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct IoStat {
    /// Bdev name.
    pub name: String,
    /// Bytes read.
    pub bytes_read: u64,
    /// Reads.
    pub num_read_ops: u64,
    /// Bytes written.
    pub bytes_written: u64,
    /// Writes.
    pub num_write_ops: u64,
    /// Bytes unmapped.
    pub bytes_unmapped: u64,
    /// Unmaps.
    pub num_unmap_ops: u64,
    /// Sum of read latencies, in ticks.
    pub read_latency_ticks: u64,
    /// Largest read latency.
    pub max_read_latency_ticks: u64,
    /// Smallest read latency.
    pub min_read_latency_ticks: u64,
    /// Sum of write latencies.
    pub write_latency_ticks: u64,
    /// Largest write latency.
    pub max_write_latency_ticks: u64,
    /// Smallest write latency.
    pub min_write_latency_ticks: u64,
    /// Sum of unmap latencies.
    pub unmap_latency_ticks: u64,
    /// Largest unmap latency.
    pub max_unmap_latency_ticks: u64,
    /// Smallest unmap latency.
    pub min_unmap_latency_ticks: u64,
    /// Flushes.
    pub num_flush_ops: u64,
    /// Write-zeroes requests.
    pub num_write_zeroes_ops: u64,
    /// Bytes zeroed.
    pub bytes_zeroed: u64,
    /// Errors by cause.
    pub io_error: IoErrorStat,
    /// Ticks per second of the latency fields.
    pub tick_rate: u64,
}

fn merge_min(a: u64, b: u64) -> u64 {
    match (a, b) {
        (0, x) | (x, 0) => x,
        (x, y) => x.min(y),
    }
}

impl IoStat {
    fn add(&mut self, s: &ChannelStats) {
        let l = |c: &AtomicU64| c.load(Ordering::Relaxed);
        self.bytes_read += l(&s.read.bytes);
        self.num_read_ops += l(&s.read.ops);
        self.read_latency_ticks += l(&s.read.ticks);
        self.max_read_latency_ticks = self.max_read_latency_ticks.max(l(&s.read.max));
        self.min_read_latency_ticks = merge_min(self.min_read_latency_ticks, l(&s.read.min));
        self.bytes_written += l(&s.write.bytes);
        self.num_write_ops += l(&s.write.ops);
        self.write_latency_ticks += l(&s.write.ticks);
        self.max_write_latency_ticks = self.max_write_latency_ticks.max(l(&s.write.max));
        self.min_write_latency_ticks = merge_min(self.min_write_latency_ticks, l(&s.write.min));
        self.bytes_unmapped += l(&s.unmap.bytes);
        self.num_unmap_ops += l(&s.unmap.ops);
        self.unmap_latency_ticks += l(&s.unmap.ticks);
        self.max_unmap_latency_ticks = self.max_unmap_latency_ticks.max(l(&s.unmap.max));
        self.min_unmap_latency_ticks = merge_min(self.min_unmap_latency_ticks, l(&s.unmap.min));
        self.num_flush_ops += l(&s.flush.ops);
        self.num_write_zeroes_ops += l(&s.zeroes.ops);
        self.bytes_zeroed += l(&s.zeroes.bytes);
        let e = &mut self.io_error;
        e.out_of_range += l(&s.out_of_range);
        e.unaligned += l(&s.unaligned);
        e.read_only += l(&s.read_only);
        e.invalid += l(&s.invalid);
        e.unsupported += l(&s.unsupported);
        e.io_error += l(&s.io_error);
        e.aborted += l(&s.aborted);
    }
}

static BDEV_IDS: AtomicU64 = AtomicU64::new(1);

/// A block device: a name, geometry, and the storage system behind it.
pub struct Bdev {
    id: u64,
    open: AtomicUsize,
    name: String,
    info: BdevInfo,
    backend: Box<dyn BdevBackend>,
    // Control plane only: a channel registers its counters here when it opens.
    channels: Mutex<Vec<Arc<ChannelStats>>>,
}

impl std::fmt::Debug for Bdev {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Bdev({:?}, {}, {:?})",
            self.name,
            self.backend.type_name(),
            self.info
        )
    }
}

impl Bdev {
    /// Wraps a backend; `read_only` forces read-only on top of what the backend reports.
    pub fn new(
        name: impl Into<String>,
        backend: Box<dyn BdevBackend>,
        read_only: bool,
    ) -> Arc<Bdev> {
        let mut info = backend.info();
        info.read_only |= read_only;
        Arc::new(Bdev {
            id: BDEV_IDS.fetch_add(1, Ordering::Relaxed),
            open: AtomicUsize::new(0),
            name: name.into(),
            info,
            backend,
            channels: Mutex::new(Vec::new()),
        })
    }

    /// Name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Geometry and flags.
    pub fn info(&self) -> &BdevInfo {
        &self.info
    }

    /// The storage system's type name.
    pub fn type_name(&self) -> &'static str {
        self.backend.type_name()
    }

    /// A process-unique id (reactor-local tables are keyed by it).
    pub fn id(&self) -> u64 {
        self.id
    }

    /// IO channels open now (a bdev with open channels is in use and cannot be deleted).
    pub fn open_channels(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// The backend (see [`BdevBackend::as_any`]).
    pub fn backend(&self) -> &dyn BdevBackend {
        self.backend.as_ref()
    }

    /// Opens an IO channel on reactor `r` (the caller runs on it); the channel belongs to that
    /// reactor. On the bdev's owner reactor the channel goes through the bdev's QoS.
    pub fn open_channel(self: &Arc<Self>, r: &mut Reactor) -> Result<IoChannel, BdevError> {
        let backend = self.backend.open_channel()?;
        let stats = Arc::new(ChannelStats::default());
        if let Ok(mut v) = self.channels.lock() {
            v.push(stats.clone());
        }
        self.open.fetch_add(1, Ordering::Relaxed);
        Ok(IoChannel {
            bdev: self.clone(),
            backend,
            done: Completions::default(),
            stats,
            inflight: 0,
            qos: super::qos_gate::attach(r, self.id),
            released: Vec::new(),
        })
    }

    /// Statistics summed over every channel ever opened.
    pub fn iostat(&self) -> IoStat {
        let mut s = IoStat {
            name: self.name.clone(),
            tick_rate: super::ticks_hz(),
            ..Default::default()
        };
        if let Ok(v) = self.channels.lock() {
            for c in v.iter() {
                s.add(c);
            }
        }
        s
    }
}

/// One reactor's handle for IO on one bdev. Not `Send`: it lives and dies on its reactor.
pub struct IoChannel {
    bdev: Arc<Bdev>,
    backend: Box<dyn BackendChannel>,
    done: Completions,
    stats: Arc<ChannelStats>,
    inflight: usize,
    qos: Option<QosGate>,
    released: Vec<IoRequest>,
}

impl IoChannel {
    /// The bdev.
    pub fn bdev(&self) -> &Arc<Bdev> {
        &self.bdev
    }

    /// Submits a request. Its callback runs from a later [`IoChannel::poll`] on this reactor.
    /// A request over the bdev's QoS limits waits in the bdev's queue and goes to the backend
    /// from a later poll (its latency includes the wait).
    #[inline]
    pub fn submit(&mut self, mut req: IoRequest) {
        let now = ticks();
        req.submit_tick = now;
        self.inflight += 1;
        match self.bdev.info.validate(
            req.kind,
            req.offset,
            req.len,
            req.buf.as_ref().map(IoBuf::len),
        ) {
            Ok(()) => match &self.qos {
                None => self.backend.submit(req, &mut self.done),
                Some(q) => {
                    if let Some(req) = q.submit(req, now) {
                        self.backend.submit(req, &mut self.done)
                    }
                }
            },
            Err(st) => self.done.push(req, st),
        }
    }

    /// Submits what QoS released, polls the backend and runs the callbacks of completed
    /// requests. Returns the work done. Requests resubmitted by those callbacks complete in a
    /// later poll.
    pub fn poll(&mut self) -> usize {
        let mut work = 0;
        if let Some(q) = &self.qos {
            q.release(ticks(), &mut self.released);
            work += self.released.len();
            for req in self.released.drain(..) {
                self.backend.submit(req, &mut self.done);
            }
        }
        work += self.backend.poll(&mut self.done);
        let n = self.done.len();
        if n == 0 {
            return work;
        }
        let now = ticks();
        for _ in 0..n {
            let Some((req, st)) = self.done.0.pop_front() else {
                break;
            };
            self.inflight -= 1;
            self.account(&req, st, now);
            req.complete(st);
        }
        work + n
    }

    /// Requests submitted whose callbacks have not run.
    pub fn inflight(&self) -> usize {
        self.inflight
    }

    #[inline]
    fn account(&self, req: &IoRequest, st: IoStatus, now: u64) {
        let s = &self.stats;
        let lat = now.saturating_sub(req.submit_tick);
        match st {
            IoStatus::Success => match req.kind {
                IoKind::Read => s.read.record(req.len, lat),
                IoKind::Write => s.write.record(req.len, lat),
                IoKind::Unmap => s.unmap.record(req.len, lat),
                IoKind::Flush => s.flush.record(0, lat),
                IoKind::WriteZeroes => s.zeroes.record(req.len, lat),
            },
            IoStatus::OutOfRange => add(&s.out_of_range, 1),
            IoStatus::Unaligned => add(&s.unaligned, 1),
            IoStatus::ReadOnly => add(&s.read_only, 1),
            IoStatus::Invalid => add(&s.invalid, 1),
            IoStatus::Unsupported => add(&s.unsupported, 1),
            IoStatus::IoError(_) => add(&s.io_error, 1),
            IoStatus::Aborted => add(&s.aborted, 1),
        }
    }
}

impl Drop for IoChannel {
    fn drop(&mut self) {
        // Fail whatever QoS and the backend still hold, then run every pending callback once.
        if let Some(q) = self.qos.take() {
            for req in q.close() {
                self.done.push(req, IoStatus::Aborted);
            }
        }
        self.backend.abort(&mut self.done);
        let now = ticks();
        while let Some((req, st)) = self.done.0.pop_front() {
            self.inflight = self.inflight.saturating_sub(1);
            self.account(&req, st, now);
            req.complete(st);
        }
        self.bdev.open.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;
    use std::rc::Rc;

    #[test]
    fn validation() {
        let i = BdevInfo {
            block_size: 512,
            num_blocks: 8,
            read_only: false,
            max_io_bytes: 0,
        };
        assert_eq!(i.validate(IoKind::Read, 0, 512, Some(512)), Ok(()));
        assert_eq!(i.validate(IoKind::Read, 3584, 512, Some(512)), Ok(()));
        assert_eq!(
            i.validate(IoKind::Read, 3584, 1024, Some(1024)),
            Err(IoStatus::OutOfRange)
        );
        assert_eq!(
            i.validate(IoKind::Read, u64::MAX - 510, 512, Some(512)),
            Err(IoStatus::Unaligned)
        );
        assert_eq!(
            i.validate(IoKind::Read, u64::MAX - 1023, 512, Some(512)),
            Err(IoStatus::OutOfRange)
        );
        assert_eq!(
            i.validate(IoKind::Read, 100, 512, Some(512)),
            Err(IoStatus::Unaligned)
        );
        assert_eq!(
            i.validate(IoKind::Write, 0, 100, Some(100)),
            Err(IoStatus::Unaligned)
        );
        assert_eq!(
            i.validate(IoKind::Write, 0, 512, Some(1024)),
            Err(IoStatus::Invalid)
        );
        assert_eq!(
            i.validate(IoKind::Write, 0, 512, None),
            Err(IoStatus::Invalid)
        );
        assert_eq!(
            i.validate(IoKind::Unmap, 0, 0, None),
            Err(IoStatus::Invalid)
        );
        assert_eq!(i.validate(IoKind::Flush, 99, 1, None), Ok(()));
        let ro = BdevInfo {
            read_only: true,
            ..i.clone()
        };
        assert_eq!(
            ro.validate(IoKind::Write, 0, 512, Some(512)),
            Err(IoStatus::ReadOnly)
        );
        assert_eq!(
            ro.validate(IoKind::WriteZeroes, 0, 512, None),
            Err(IoStatus::ReadOnly)
        );
        assert_eq!(ro.validate(IoKind::Read, 0, 512, Some(512)), Ok(()));
        let lim = BdevInfo {
            max_io_bytes: 1024,
            ..i
        };
        assert_eq!(
            lim.validate(IoKind::Read, 0, 2048, Some(2048)),
            Err(IoStatus::Invalid)
        );
    }

    #[test]
    fn callback_fires_exactly_once_even_when_dropped() {
        let seen = Rc::new(RefCell::new(Vec::new()));
        let s = seen.clone();
        let r = IoRequest::read(0, IoBuf::new(512), move |mut req, st| {
            s.borrow_mut().push((req.buf.take().map(|b| b.len()), st))
        });
        drop(r);
        assert_eq!(*seen.borrow(), vec![(Some(512), IoStatus::Aborted)]);
        let s = seen.clone();
        let r = IoRequest::flush(move |_, st| s.borrow_mut().push((None, st)));
        r.complete(IoStatus::Success);
        assert_eq!(seen.borrow().len(), 2);
        assert_eq!(seen.borrow()[1].1, IoStatus::Success);
    }

    #[test]
    fn iobuf_is_aligned_and_zeroed() {
        let mut b = IoBuf::new(5000);
        assert_eq!(b.as_mut_ptr() as usize % IOBUF_ALIGN, 0);
        assert!(b.as_slice().iter().all(|&x| x == 0));
        b.as_mut_slice()[4999] = 7;
        assert_eq!(b.clone().as_slice()[4999], 7);
        assert!(IoBuf::new(0).is_empty());
    }
}
