//! The virtio-blk device: feature bits, config space, request parsing from a descriptor chain, and
//! the [`BlockTarget`] trait that decouples it from the bdev layer.
//!
//! A request reaches the target as a [`BlkIo`]: operation, byte offset and length, and the guest
//! buffers (bounds-checked, kept mapped while the `BlkIo` lives). The target completes it later,
//! on the same thread, with [`BlkIo::complete`]; completions may come in any order. A `BlkIo`
//! dropped without completing completes with [`BlkStatus::IoErr`].

use super::memory::GuestMemory;
use super::virtq::Seg;
use std::cell::RefCell;
use std::collections::VecDeque;
use std::rc::Rc;
use std::sync::Arc;

/// virtio-blk feature bits we offer.
pub mod feat {
    /// `seg_max` is valid.
    pub const SEG_MAX: u64 = 1 << 2;
    /// Read-only device.
    pub const RO: u64 = 1 << 5;
    /// `blk_size` is valid.
    pub const BLK_SIZE: u64 = 1 << 6;
    /// FLUSH requests.
    pub const FLUSH: u64 = 1 << 9;
    /// Several queues (`num_queues`).
    pub const MQ: u64 = 1 << 12;
    /// DISCARD requests.
    pub const DISCARD: u64 = 1 << 13;
    /// WRITE_ZEROES requests.
    pub const WRITE_ZEROES: u64 = 1 << 14;
    /// Indirect descriptors.
    pub const RING_INDIRECT_DESC: u64 = 1 << 28;
    /// used_event / avail_event.
    pub const RING_EVENT_IDX: u64 = 1 << 29;
    /// Virtio 1.0.
    pub const VERSION_1: u64 = 1 << 32;
}

/// Request types.
pub mod req_type {
    /// Read.
    pub const IN: u32 = 0;
    /// Write.
    pub const OUT: u32 = 1;
    /// Flush.
    pub const FLUSH: u32 = 4;
    /// Device id (serial).
    pub const GET_ID: u32 = 8;
    /// Discard.
    pub const DISCARD: u32 = 11;
    /// Write zeroes.
    pub const WRITE_ZEROES: u32 = 13;
}

/// Sector size of the virtio-blk protocol.
pub const SECTOR: u64 = 512;
/// Length of the GET_ID answer.
pub const ID_LEN: usize = 20;
/// Data segments we advertise per request (`seg_max`).
pub const SEG_MAX: u32 = 126;
/// Largest data transfer of one request; larger ones fail with IOERR.
pub const MAX_TRANSFER: u64 = 32 << 20;
/// Largest discard / write-zeroes range, in sectors.
pub const MAX_DISCARD_SECTORS: u32 = 0x3f_ffff;
/// Bytes of config space we define (up to `unused1`); reads beyond it return zeros.
pub const CONFIG_LEN: usize = 60;

/// Status of a completed request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlkStatus {
    /// VIRTIO_BLK_S_OK.
    Ok,
    /// VIRTIO_BLK_S_IOERR.
    IoErr,
    /// VIRTIO_BLK_S_UNSUPP.
    Unsupp,
}

impl BlkStatus {
    /// The status byte.
    pub fn byte(self) -> u8 {
        match self {
            BlkStatus::Ok => 0,
            BlkStatus::IoErr => 1,
            BlkStatus::Unsupp => 2,
        }
    }
}

/// What a request asks of the target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlkOp {
    /// Read into the guest buffers.
    Read,
    /// Write the guest buffers.
    Write,
    /// Make completed writes durable.
    Flush,
    /// Discard a range.
    Discard,
    /// Zero a range.
    WriteZeroes,
}

/// A block device that serves virtio-blk requests (the bdev adapter, or an in-memory disk).
pub trait BlockTarget {
    /// Logical block size in bytes (a multiple of 512).
    fn block_size(&self) -> u32;
    /// Size in blocks.
    fn num_blocks(&self) -> u64;
    /// Whether the target refuses writes.
    fn readonly(&self) -> bool {
        false
    }
    /// Whether the target serves this operation (DISCARD / WRITE_ZEROES / FLUSH are offered to
    /// the guest only if so).
    fn supports(&self, _op: BlkOp) -> bool {
        true
    }
    /// Starts a request; complete it later with [`BlkIo::complete`] (never required inline).
    fn submit(&mut self, io: BlkIo);
    /// Drives the target (polls its channel); returns the work done.
    fn poll(&mut self) -> usize {
        0
    }
}

/// Identifies a request's virtqueue slot and connection incarnation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IoToken {
    /// Connection generation.
    pub conn: u64,
    /// Queue index.
    pub queue: u16,
    /// Ring incarnation.
    pub ring_gen: u64,
    /// Head descriptor.
    pub head: u16,
    /// Status byte (host address inside `mem`).
    pub(crate) status: *mut u8,
    /// Bytes written to device-writable buffers on success, excluding the status byte.
    pub(crate) written: u32,
}

/// Where finished requests wait for the controller's next poll.
pub type CompletionQueue = Rc<RefCell<VecDeque<(IoToken, BlkStatus, Arc<GuestMemory>)>>>;

/// One virtio-blk request handed to a [`BlockTarget`].
pub struct BlkIo {
    /// The operation.
    pub op: BlkOp,
    /// Byte offset on the device.
    pub offset: u64,
    /// Byte length (data length for reads/writes, the range for discard/write-zeroes).
    pub len: u64,
    segs: Vec<(*mut u8, usize)>,
    mem: Option<Arc<GuestMemory>>,
    token: IoToken,
    sink: CompletionQueue,
}

impl std::fmt::Debug for BlkIo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "BlkIo({:?} off={} len={} q={} head={})",
            self.op, self.offset, self.len, self.token.queue, self.token.head
        )
    }
}

impl BlkIo {
    /// The guest data buffers as raw `(pointer, length)` pairs, valid while `self` lives (the
    /// mapping is kept alive by it). Guest memory may change under the device at any time: use
    /// them for kernel IO (io_uring) or copies, never as Rust references.
    pub fn segments(&self) -> &[(*mut u8, usize)] {
        &self.segs
    }

    /// Copies `src` into the guest buffers (a read's data); returns the bytes copied.
    pub fn copy_to_guest(&mut self, src: &[u8]) -> usize {
        let mut done = 0;
        for &(p, l) in &self.segs {
            let n = l.min(src.len() - done);
            // SAFETY: (p, l) was translated inside a mapping that `self.mem` keeps alive; n ≤ l.
            unsafe { std::ptr::copy_nonoverlapping(src.as_ptr().add(done), p, n) };
            done += n;
            if done == src.len() {
                break;
            }
        }
        done
    }

    /// Copies the guest buffers into `dst` (a write's data); returns the bytes copied.
    pub fn copy_from_guest(&self, dst: &mut [u8]) -> usize {
        let mut done = 0;
        for &(p, l) in &self.segs {
            let n = l.min(dst.len() - done);
            // SAFETY: as in copy_to_guest.
            unsafe { std::ptr::copy_nonoverlapping(p, dst.as_mut_ptr().add(done), n) };
            done += n;
            if done == dst.len() {
                break;
            }
        }
        done
    }

    /// Completes the request; the controller publishes it on its next poll.
    pub fn complete(mut self, status: BlkStatus) {
        self.finish(status);
    }

    fn finish(&mut self, status: BlkStatus) {
        if let Some(mem) = self.mem.take() {
            self.sink.borrow_mut().push_back((self.token, status, mem));
        }
    }
}

impl Drop for BlkIo {
    fn drop(&mut self) {
        self.finish(BlkStatus::IoErr);
    }
}

/// Device parameters that shape features and config space.
#[derive(Debug, Clone)]
pub struct BlkGeometry {
    /// Logical block size.
    pub block_size: u32,
    /// Size in blocks.
    pub num_blocks: u64,
    /// Read-only.
    pub readonly: bool,
    /// Queues offered.
    pub num_queues: u16,
    /// Serial returned by GET_ID (up to 20 bytes).
    pub serial: [u8; ID_LEN],
    /// DISCARD offered.
    pub discard: bool,
    /// WRITE_ZEROES offered.
    pub write_zeroes: bool,
    /// FLUSH offered.
    pub flush: bool,
}

impl BlkGeometry {
    /// Capacity in bytes.
    pub fn capacity(&self) -> u64 {
        self.num_blocks.saturating_mul(u64::from(self.block_size))
    }

    /// The virtio feature bits offered (before VHOST_USER_F_PROTOCOL_FEATURES).
    pub fn features(&self) -> u64 {
        let mut f = feat::SEG_MAX
            | feat::BLK_SIZE
            | feat::MQ
            | feat::RING_INDIRECT_DESC
            | feat::RING_EVENT_IDX
            | feat::VERSION_1;
        if self.flush {
            f |= feat::FLUSH;
        }
        if self.readonly {
            f |= feat::RO;
        } else {
            if self.discard {
                f |= feat::DISCARD;
            }
            if self.write_zeroes {
                f |= feat::WRITE_ZEROES;
            }
        }
        f
    }

    /// struct virtio_blk_config up to `unused1` (60 bytes), `writeback` as last set.
    pub fn config_space(&self, writeback: u8) -> [u8; CONFIG_LEN] {
        let mut c = [0u8; CONFIG_LEN];
        let put32 = |c: &mut [u8; CONFIG_LEN], off: usize, v: u32| {
            c[off..off + 4].copy_from_slice(&v.to_le_bytes())
        };
        c[0..8].copy_from_slice(&(self.capacity() / SECTOR).to_le_bytes());
        put32(&mut c, 12, SEG_MAX);
        put32(&mut c, 20, self.block_size);
        c[32] = writeback;
        c[34..36].copy_from_slice(&self.num_queues.to_le_bytes());
        let align = (self.block_size / SECTOR as u32).max(1);
        put32(&mut c, 36, MAX_DISCARD_SECTORS);
        put32(&mut c, 40, 1);
        put32(&mut c, 44, align);
        put32(&mut c, 48, MAX_DISCARD_SECTORS);
        put32(&mut c, 52, 1);
        c
    }
}

/// What parsing a chain led to.
pub enum Parsed {
    /// A request for the target.
    Io(BlkIo),
    /// Finished without the target (GET_ID, or an error): write `status`, publish `written + 1`.
    Done {
        /// Status byte address.
        status: *mut u8,
        /// The status.
        st: BlkStatus,
        /// Bytes written before the status byte.
        written: u32,
    },
    /// No usable status byte: the device must be reset.
    NoStatus,
}

/// Turns a walked chain into a request. `walk_ok` is false when the walk failed (the request
/// then fails with IOERR if its last walked buffer can take a status byte).
pub fn parse_request(
    segs: &[Seg],
    walk_ok: bool,
    geo: &BlkGeometry,
    mem: &Arc<GuestMemory>,
    token: IoToken,
    sink: &CompletionQueue,
) -> Parsed {
    // The status is the last byte of the last buffer, which must be device-writable.
    let Some(last) = segs.last().filter(|s| s.writable && s.len >= 1) else {
        return Parsed::NoStatus;
    };
    let status = last.ptr.wrapping_add(last.len as usize - 1);
    let fail = |st| Parsed::Done {
        status,
        st,
        written: 0,
    };
    if !walk_ok {
        return fail(BlkStatus::IoErr);
    }
    // Device-readable buffers must all precede device-writable ones.
    let n_read = segs.iter().take_while(|s| !s.writable).count();
    if segs[n_read..].iter().any(|s| !s.writable) {
        return fail(BlkStatus::IoErr);
    }
    let (rd, wr) = segs.split_at(n_read);
    let mut hdr = [0u8; 16];
    if gather(rd, 0, &mut hdr) < 16 {
        return fail(BlkStatus::IoErr);
    }
    let rtype = u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]);
    let mut s8 = [0u8; 8];
    s8.copy_from_slice(&hdr[8..16]);
    let sector = u64::from_le_bytes(s8);
    let rd_data = slice_segs(rd, 16, u64::MAX);
    // Writable bytes excluding the status byte.
    let wr_total: u64 = wr.iter().map(|s| u64::from(s.len)).sum::<u64>() - 1;
    let wr_data = slice_segs(wr, 0, wr_total);
    let rd_len: u64 = rd_data.iter().map(|s| s.1 as u64).sum();
    let cap = geo.capacity();
    let bs = u64::from(geo.block_size);
    let range_ok = |off: u64, len: u64| {
        off.checked_add(len).is_some_and(|e| e <= cap)
            && off.is_multiple_of(bs)
            && len.is_multiple_of(bs)
    };
    let mut token = token;
    token.status = status;
    let io = |op, offset, len, segs, written| {
        let mut t = token;
        t.written = written;
        Parsed::Io(BlkIo {
            op,
            offset,
            len,
            segs,
            mem: Some(mem.clone()),
            token: t,
            sink: sink.clone(),
        })
    };
    match rtype {
        req_type::IN | req_type::OUT => {
            let (data, len, written) = if rtype == req_type::IN {
                if rd_len != 0 {
                    return fail(BlkStatus::IoErr);
                }
                (wr_data, wr_total, wr_total as u32)
            } else {
                if wr_total != 0 {
                    return fail(BlkStatus::IoErr);
                }
                (rd_data, rd_len, 0)
            };
            let Some(off) = sector.checked_mul(SECTOR) else {
                return fail(BlkStatus::IoErr);
            };
            if len == 0 || len > MAX_TRANSFER || !range_ok(off, len) {
                return fail(BlkStatus::IoErr);
            }
            if rtype == req_type::OUT && geo.readonly {
                return fail(BlkStatus::IoErr);
            }
            let op = if rtype == req_type::IN {
                BlkOp::Read
            } else {
                BlkOp::Write
            };
            io(op, off, len, data, written)
        }
        req_type::FLUSH => {
            if !geo.flush {
                return fail(BlkStatus::Unsupp);
            }
            io(BlkOp::Flush, 0, 0, Vec::new(), 0)
        }
        req_type::GET_ID => {
            let n = (wr_total as usize).min(ID_LEN);
            let mut left = n;
            for &(p, l) in &wr_data {
                let k = l.min(left);
                // SAFETY: (p, l) is a translated writable guest buffer; k ≤ l; the serial has n
                // ≥ (n - left) + k bytes.
                unsafe { std::ptr::copy_nonoverlapping(geo.serial.as_ptr().add(n - left), p, k) };
                left -= k;
                if left == 0 {
                    break;
                }
            }
            Parsed::Done {
                status,
                st: BlkStatus::Ok,
                written: n as u32,
            }
        }
        req_type::DISCARD | req_type::WRITE_ZEROES => {
            let discard = rtype == req_type::DISCARD;
            if (discard && !geo.discard) || (!discard && !geo.write_zeroes) {
                return fail(BlkStatus::Unsupp);
            }
            if geo.readonly {
                return fail(BlkStatus::IoErr);
            }
            // Exactly one 16-byte segment {sector u64, num_sectors u32, flags u32}.
            let mut seg = [0u8; 16];
            if rd_len != 16 || gather(rd, 16, &mut seg) != 16 || wr_total != 0 {
                return fail(BlkStatus::IoErr);
            }
            s8.copy_from_slice(&seg[0..8]);
            let start = u64::from_le_bytes(s8);
            let num = u32::from_le_bytes([seg[8], seg[9], seg[10], seg[11]]);
            let flags = u32::from_le_bytes([seg[12], seg[13], seg[14], seg[15]]);
            // Only write-zeroes may carry the unmap flag (bit 0); other bits are reserved.
            if (discard && flags != 0) || (!discard && flags & !1 != 0) {
                return fail(BlkStatus::Unsupp);
            }
            if num == 0 || num > MAX_DISCARD_SECTORS {
                return fail(BlkStatus::IoErr);
            }
            let (Some(off), len) = (start.checked_mul(SECTOR), u64::from(num) * SECTOR) else {
                return fail(BlkStatus::IoErr);
            };
            if !range_ok(off, len) {
                return fail(BlkStatus::IoErr);
            }
            let op = if discard {
                BlkOp::Discard
            } else {
                BlkOp::WriteZeroes
            };
            io(op, off, len, Vec::new(), 0)
        }
        _ => fail(BlkStatus::Unsupp),
    }
}

/// Copies up to `out.len()` bytes starting `skip` bytes into `segs`; returns bytes copied.
fn gather(segs: &[Seg], skip: u64, out: &mut [u8]) -> usize {
    let mut done = 0;
    for (p, l) in slice_segs(segs, skip, out.len() as u64) {
        // SAFETY: (p, l) lies inside a translated guest buffer; l ≤ out.len() - done by slicing.
        unsafe { std::ptr::copy_nonoverlapping(p, out.as_mut_ptr().add(done), l) };
        done += l;
    }
    done
}

/// The byte range `[skip, skip + max)` of the concatenated `segs`, as pointer/length pairs.
fn slice_segs(segs: &[Seg], mut skip: u64, mut max: u64) -> Vec<(*mut u8, usize)> {
    let mut out = Vec::new();
    for s in segs {
        if max == 0 {
            break;
        }
        let l = u64::from(s.len);
        if skip >= l {
            skip -= l;
            continue;
        }
        let take = (l - skip).min(max);
        out.push((s.ptr.wrapping_add(skip as usize), take as usize));
        max -= take;
        skip = 0;
    }
    out
}

/// An in-memory [`BlockTarget`] for tests and demos. Clones share the disk; requests wait in a
/// queue until [`MemTarget::complete_next`] / [`MemTarget::complete_where`] or (in auto mode)
/// the next `poll`, so tests can complete them in any order.
#[derive(Clone)]
pub struct MemTarget {
    inner: Rc<RefCell<MemDisk>>,
}

struct MemDisk {
    data: Vec<u8>,
    block_size: u32,
    readonly: bool,
    auto: bool,
    pending: VecDeque<BlkIo>,
    executed: u64,
}

impl MemTarget {
    /// A zeroed disk of `num_blocks` blocks that completes requests on every poll.
    pub fn new(block_size: u32, num_blocks: u64) -> MemTarget {
        MemTarget {
            inner: Rc::new(RefCell::new(MemDisk {
                data: vec![0; (u64::from(block_size) * num_blocks) as usize],
                block_size,
                readonly: false,
                auto: true,
                pending: VecDeque::new(),
                executed: 0,
            })),
        }
    }

    /// Read-only variant.
    pub fn readonly(self, ro: bool) -> MemTarget {
        self.inner.borrow_mut().readonly = ro;
        self
    }

    /// In manual mode requests wait until the test completes them.
    pub fn set_auto(&self, auto: bool) {
        self.inner.borrow_mut().auto = auto;
    }

    /// Requests waiting.
    pub fn pending(&self) -> usize {
        self.inner.borrow().pending.len()
    }

    /// Requests executed so far (each resubmission counts).
    pub fn executed(&self) -> u64 {
        self.inner.borrow().executed
    }

    /// Offsets and ops of waiting requests, in submission order.
    pub fn pending_ops(&self) -> Vec<(BlkOp, u64)> {
        self.inner
            .borrow()
            .pending
            .iter()
            .map(|io| (io.op, io.offset))
            .collect()
    }

    /// Executes and completes the first waiting request matching `f`; false if none.
    pub fn complete_where(&self, f: impl Fn(BlkOp, u64) -> bool) -> bool {
        let io = {
            let mut d = self.inner.borrow_mut();
            let Some(i) = d.pending.iter().position(|io| f(io.op, io.offset)) else {
                return false;
            };
            d.pending.remove(i)
        };
        match io {
            Some(io) => {
                self.execute(io);
                true
            }
            None => false,
        }
    }

    /// Drops every waiting request without executing it (each completes with IOERR through
    /// its `Drop`, as a bdev aborting on shutdown does); returns how many.
    pub fn abort_pending(&self) -> usize {
        let v: Vec<BlkIo> = self.inner.borrow_mut().pending.drain(..).collect();
        v.len()
    }

    /// A copy of the disk bytes.
    pub fn snapshot(&self, offset: usize, len: usize) -> Vec<u8> {
        self.inner.borrow().data[offset..offset + len].to_vec()
    }

    fn execute(&self, mut io: BlkIo) {
        let mut d = self.inner.borrow_mut();
        d.executed += 1;
        let (off, len) = (io.offset as usize, io.len as usize);
        if off + len > d.data.len() {
            drop(d);
            io.complete(BlkStatus::IoErr);
            return;
        }
        let st = match io.op {
            BlkOp::Read => {
                let n = io.copy_to_guest(&d.data[off..off + len]);
                if n == len {
                    BlkStatus::Ok
                } else {
                    BlkStatus::IoErr
                }
            }
            _ if d.readonly => BlkStatus::IoErr,
            BlkOp::Write => {
                let n = io.copy_from_guest(&mut d.data[off..off + len]);
                if n == len {
                    BlkStatus::Ok
                } else {
                    BlkStatus::IoErr
                }
            }
            BlkOp::Flush => BlkStatus::Ok,
            BlkOp::Discard | BlkOp::WriteZeroes => {
                d.data[off..off + len].fill(0);
                BlkStatus::Ok
            }
        };
        drop(d);
        io.complete(st);
    }
}

impl BlockTarget for MemTarget {
    fn block_size(&self) -> u32 {
        self.inner.borrow().block_size
    }
    fn num_blocks(&self) -> u64 {
        let d = self.inner.borrow();
        d.data.len() as u64 / u64::from(d.block_size)
    }
    fn readonly(&self) -> bool {
        self.inner.borrow().readonly
    }
    fn submit(&mut self, io: BlkIo) {
        self.inner.borrow_mut().pending.push_back(io);
    }
    fn poll(&mut self) -> usize {
        if !self.inner.borrow().auto {
            return 0;
        }
        let mut n = 0;
        loop {
            let io = self.inner.borrow_mut().pending.pop_front();
            let Some(io) = io else { break };
            self.execute(io);
            n += 1;
        }
        n
    }
}
