//! Split virtqueues: the ring state we own, descriptor-chain walking with every bound checked,
//! used-ring publication honouring EVENT_IDX, and inflight tracking in the shared inflight region
//! (vhost-user "Inflight I/O tracking", split layout).
//!
//! [`VringState`] is plain data (indices, addresses as the front-end gave them, eventfds): it is
//! what a handover passes to a new process. The host pointers derived from it live in a
//! [`RingMap`], rebuilt whenever the ring starts or the memory table changes.

use super::memory::{access, GuestMemory, MemError, SharedMapping};
use std::os::fd::OwnedFd;
use std::sync::atomic::{fence, Ordering};
use std::sync::Arc;

/// Descriptor continues via `next`.
pub const VRING_DESC_F_NEXT: u16 = 1;
/// Device-writable buffer.
pub const VRING_DESC_F_WRITE: u16 = 2;
/// Buffer is a table of descriptors.
pub const VRING_DESC_F_INDIRECT: u16 = 4;
/// Driver asks for no interrupts (without EVENT_IDX).
pub const VRING_AVAIL_F_NO_INTERRUPT: u16 = 1;
/// Device asks for no kicks (without EVENT_IDX).
pub const VRING_USED_F_NO_NOTIFY: u16 = 1;
/// Largest queue a front-end may configure.
pub const MAX_QUEUE_SIZE: u16 = 32768;

/// Bytes per inflight descriptor entry (DescStateSplit).
pub const INFLIGHT_DESC_LEN: u64 = 16;
/// Bytes of the per-queue inflight header (QueueRegionSplit without desc[]).
pub const INFLIGHT_HDR_LEN: u64 = 16;
/// Version written into a fresh inflight queue region.
pub const INFLIGHT_VERSION: u16 = 1;

/// Per-queue stride of the inflight region: `align64(16 + 16 * queue_size)`.
pub fn inflight_queue_stride(queue_size: u16) -> u64 {
    (INFLIGHT_HDR_LEN + INFLIGHT_DESC_LEN * u64::from(queue_size)).div_ceil(64) * 64
}

/// The state of one vring that hostplane owns (plain data: a handover serialises it).
#[derive(Debug, Default)]
pub struct VringState {
    /// Queue size (0 until SET_VRING_NUM).
    pub size: u16,
    /// Descriptor table, front-end virtual address.
    pub desc_addr: u64,
    /// Available ring, front-end virtual address.
    pub avail_addr: u64,
    /// Used ring, front-end virtual address.
    pub used_addr: u64,
    /// SET_VRING_ADDR flags (logging is not supported; kept for completeness).
    pub addr_flags: u32,
    /// Next available-ring index to fetch.
    pub last_avail_idx: u16,
    /// Our copy of the used ring's idx (what we last published).
    pub used_idx: u16,
    /// The used idx at the last call signal (EVENT_IDX), if any.
    pub signalled_used: Option<u16>,
    /// Inflight fetch-order counter (next value to write).
    pub inflight_counter: u64,
    /// Heads still to resubmit after a reconnect, in fetch order.
    pub resubmit: Vec<u16>,
    /// Requests fetched and not yet published.
    pub outstanding: usize,
    /// Kick eventfd (we poll, so it is only kept for a handover).
    pub kick: Option<OwnedFd>,
    /// Call eventfd (completion interrupts).
    pub call: Option<OwnedFd>,
    /// Error eventfd.
    pub err: Option<OwnedFd>,
    /// SET_VRING_ENABLE state.
    pub enabled: bool,
    /// Started by SET_VRING_KICK, stopped by GET_VRING_BASE.
    pub started: bool,
    /// Incremented on every start, so completions from an earlier incarnation are ignored.
    pub generation: u64,
}

/// Why a ring cannot be processed any more (the device needs a reset).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RingError {
    /// The ring addresses are not inside guest memory.
    #[error("ring addresses are not inside guest memory")]
    BadAddress,
    /// The available index ran more than a queue size ahead of us.
    #[error("available index {avail} is more than a queue ahead of {last}")]
    AvailOverrun {
        /// The driver's index.
        avail: u16,
        /// Ours.
        last: u16,
    },
    /// An available-ring entry names a descriptor outside the table.
    #[error("available ring entry names descriptor {0} outside the table")]
    BadHead(u16),
}

/// Why a descriptor chain is unusable (its request fails, or the device is reset if it has no
/// usable status byte).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    /// `next` (or the head) is outside the descriptor table.
    #[error("descriptor index out of the table")]
    IndexOutOfRange,
    /// Longer than the cap (covers loops).
    #[error("chain too long or looping")]
    TooLong,
    /// A buffer is not inside guest memory (or crosses a region boundary).
    #[error("buffer outside guest memory")]
    OutOfRange,
    /// Indirect table malformed (size, nesting, NEXT together with INDIRECT).
    #[error("bad indirect descriptor")]
    BadIndirect,
    /// Indirect table outside guest memory.
    #[error("indirect table outside guest memory")]
    IndirectOutOfRange,
}

/// One guest buffer of a chain, translated.
#[derive(Debug, Clone, Copy)]
pub struct Seg {
    /// Host address of the first byte.
    pub ptr: *mut u8,
    /// Length in bytes.
    pub len: u32,
    /// Device-writable.
    pub writable: bool,
}

/// Host pointers of a started ring and the memory they point into.
#[derive(Debug)]
pub struct RingMap {
    /// The guest memory the pointers are valid in.
    pub mem: Arc<GuestMemory>,
    desc: *mut u8,
    avail: *mut u8,
    used: *mut u8,
    size: u16,
    inflight: Option<InflightQueue>,
}

/// The inflight region of one queue (inside a mapping kept alive by the Arc).
#[derive(Debug)]
pub struct InflightQueue {
    _map: Arc<SharedMapping>,
    base: *mut u8,
    desc_num: u16,
}

impl InflightQueue {
    /// The region of queue `q` inside `map`, if it fits.
    pub fn new(map: Arc<SharedMapping>, q: usize, queue_size: u16) -> Option<InflightQueue> {
        let stride = inflight_queue_stride(queue_size) as usize;
        let off = stride.checked_mul(q)?;
        if off.checked_add(stride)? > map.len() {
            return None;
        }
        let base = map.base().wrapping_add(off);
        Some(InflightQueue {
            _map: map,
            base,
            desc_num: queue_size,
        })
    }

    fn hdr(&self, off: usize) -> *mut u8 {
        self.base.wrapping_add(off)
    }
    fn desc(&self, i: u16, off: usize) -> *mut u8 {
        self.base
            .wrapping_add(INFLIGHT_HDR_LEN as usize + INFLIGHT_DESC_LEN as usize * i as usize + off)
    }
    fn version(&self) -> u16 {
        // SAFETY: the header lies inside the mapping (checked in `new`).
        unsafe { access::r16(self.hdr(8)) }
    }
    fn set_header(&self, version: u16, desc_num: u16) {
        // SAFETY: header inside the mapping.
        unsafe {
            access::w64(self.hdr(0), 0);
            access::w16(self.hdr(10), desc_num);
            access::w16(self.hdr(8), version);
        }
    }
    fn last_batch_head(&self) -> u16 {
        // SAFETY: header inside the mapping.
        unsafe { access::r16(self.hdr(12)) }
    }
    fn set_last_batch_head(&self, v: u16) {
        // SAFETY: header inside the mapping.
        unsafe { access::w16(self.hdr(12), v) }
    }
    fn used_idx(&self) -> u16 {
        // SAFETY: header inside the mapping.
        unsafe { access::r16(self.hdr(14)) }
    }
    fn set_used_idx(&self, v: u16) {
        // SAFETY: header inside the mapping.
        unsafe { access::w16(self.hdr(14), v) }
    }
    fn inflight(&self, i: u16) -> bool {
        if i >= self.desc_num {
            return false;
        }
        // SAFETY: i < desc_num, so the entry is inside the queue's stride.
        unsafe { std::ptr::read_volatile(self.desc(i, 0)) == 1 }
    }
    fn set_inflight(&self, i: u16, v: bool) {
        if i < self.desc_num {
            // SAFETY: entry inside the stride.
            unsafe { std::ptr::write_volatile(self.desc(i, 0), u8::from(v)) }
        }
    }
    fn next(&self, i: u16) -> u16 {
        if i >= self.desc_num {
            return 0;
        }
        // SAFETY: entry inside the stride.
        unsafe { access::r16(self.desc(i, 6)) }
    }
    fn set_next(&self, i: u16, v: u16) {
        if i < self.desc_num {
            // SAFETY: entry inside the stride.
            unsafe { access::w16(self.desc(i, 6), v) }
        }
    }
    fn counter(&self, i: u16) -> u64 {
        // SAFETY: callers pass i < desc_num (entry inside the stride).
        unsafe { access::r64(self.desc(i, 8)) }
    }
    fn set_counter(&self, i: u16, v: u64) {
        if i < self.desc_num {
            // SAFETY: entry inside the stride.
            unsafe { access::w64(self.desc(i, 8), v) }
        }
    }
}

/// A vring: the owned state plus, while started, its host mapping.
#[derive(Debug, Default)]
pub struct Vring {
    /// Owned state.
    pub state: VringState,
    /// Host pointers while started.
    pub map: Option<RingMap>,
    /// EVENT_IDX negotiated.
    pub event_idx: bool,
}

impl Vring {
    /// Whether the ring is processed now.
    pub fn ready(&self) -> bool {
        self.state.started && self.state.enabled && self.map.is_some()
    }

    /// Builds the host mapping for the current addresses in `mem`; with `inflight`, also runs the
    /// reconnect recovery (resume position, resubmit list). Called on SET_VRING_KICK.
    pub fn start(
        &mut self,
        mem: &Arc<GuestMemory>,
        inflight: Option<InflightQueue>,
    ) -> Result<(), RingError> {
        self.remap(mem)?;
        let st = &mut self.state;
        let Some(map) = self.map.as_mut() else {
            return Err(RingError::BadAddress);
        };
        // SAFETY: used ring header inside the mapping (translated with its full length).
        st.used_idx = unsafe { access::r16(map.used.wrapping_add(2)) };
        st.signalled_used = None;
        st.resubmit.clear();
        st.outstanding = 0;
        st.generation = st.generation.wrapping_add(1);
        st.started = true;
        if !self.event_idx {
            // We poll: ask the driver not to kick (with EVENT_IDX, `pop` moves avail_event).
            // SAFETY: used flags are the first bytes of the used ring (in the mapping).
            unsafe { access::w16(map.used, VRING_USED_F_NO_NOTIFY) };
        }
        if let Some(inf) = inflight {
            recover_inflight(st, &inf, st.size);
            map.inflight = Some(inf);
        }
        Ok(())
    }

    /// Re-translates the ring addresses in (new) guest memory, keeping the inflight view.
    pub fn remap(&mut self, mem: &Arc<GuestMemory>) -> Result<(), RingError> {
        let st = &self.state;
        let n = u64::from(st.size);
        if n == 0 {
            return Err(RingError::BadAddress);
        }
        let tr = |a: u64, l: u64| {
            mem.translate_uva(a, l)
                .map_err(|_: MemError| RingError::BadAddress)
        };
        let desc = tr(st.desc_addr, 16 * n)?;
        let avail = tr(st.avail_addr, 6 + 2 * n)?;
        let used = tr(st.used_addr, 6 + 8 * n)?;
        let inflight = self.map.take().and_then(|m| m.inflight);
        self.map = Some(RingMap {
            mem: mem.clone(),
            desc,
            avail,
            used,
            size: st.size,
            inflight,
        });
        Ok(())
    }

    /// Stops the ring (GET_VRING_BASE); returns the index to resume from.
    pub fn stop(&mut self) -> u16 {
        self.state.started = false;
        self.map = None;
        self.state.last_avail_idx
    }

    /// Fetches the next available head, marking it inflight. `Ok(None)` when the ring is empty.
    pub fn pop(&mut self) -> Result<Option<u16>, RingError> {
        let Some(map) = self.map.as_ref() else {
            return Ok(None);
        };
        let st = &mut self.state;
        if let Some(h) = (!st.resubmit.is_empty()).then(|| st.resubmit.remove(0)) {
            st.outstanding += 1;
            return Ok(Some(h));
        }
        // SAFETY: avail header inside the mapping.
        let avail_idx = unsafe { access::r16(map.avail.wrapping_add(2)) };
        if avail_idx == st.last_avail_idx {
            return Ok(None);
        }
        if avail_idx.wrapping_sub(st.last_avail_idx) > map.size {
            return Err(RingError::AvailOverrun {
                avail: avail_idx,
                last: st.last_avail_idx,
            });
        }
        // Read the ring entry only after seeing the index.
        fence(Ordering::Acquire);
        let slot = usize::from(st.last_avail_idx % map.size);
        // SAFETY: slot < size; the ring has 2 * size bytes after its 4-byte header.
        let head = unsafe { access::r16(map.avail.wrapping_add(4 + 2 * slot)) };
        if head >= map.size {
            return Err(RingError::BadHead(head));
        }
        st.last_avail_idx = st.last_avail_idx.wrapping_add(1);
        if let Some(inf) = &map.inflight {
            inf.set_counter(head, st.inflight_counter);
            st.inflight_counter += 1;
            fence(Ordering::Release);
            inf.set_inflight(head, true);
        }
        st.outstanding += 1;
        if self.event_idx {
            // We poll: keep avail_event just behind so the driver never needs to kick.
            // SAFETY: avail_event is the u16 after the used ring's elements (in the mapping).
            unsafe {
                access::w16(
                    map.used.wrapping_add(4 + 8 * usize::from(map.size)),
                    st.last_avail_idx.wrapping_sub(1),
                )
            };
        }
        Ok(Some(head))
    }

    /// Walks the chain starting at `head` into `segs` (cleared first). On error, `segs` holds the
    /// buffers walked so far, so the caller can still find a status byte.
    pub fn walk(&self, head: u16, segs: &mut Vec<Seg>) -> Result<(), ChainError> {
        segs.clear();
        let Some(map) = self.map.as_ref() else {
            return Err(ChainError::OutOfRange);
        };
        let cap = usize::from(map.size).max(128);
        let mut table = map.desc;
        let mut table_len = u32::from(map.size);
        let mut idx = u32::from(head);
        let mut indirect = false;
        let mut seen = 0usize;
        loop {
            if idx >= table_len {
                return Err(ChainError::IndexOutOfRange);
            }
            seen += 1;
            if seen > cap {
                return Err(ChainError::TooLong);
            }
            let d = table.wrapping_add(16 * idx as usize);
            // SAFETY: idx < table_len and the table was translated with 16 * table_len bytes.
            let (addr, len, flags, next) = unsafe {
                (
                    access::r64(d),
                    access::r32(d.wrapping_add(8)),
                    access::r16(d.wrapping_add(12)),
                    access::r16(d.wrapping_add(14)),
                )
            };
            if flags & VRING_DESC_F_INDIRECT != 0 {
                if indirect || flags & VRING_DESC_F_NEXT != 0 || len == 0 || len % 16 != 0 {
                    return Err(ChainError::BadIndirect);
                }
                if (len / 16) as usize > cap {
                    return Err(ChainError::TooLong);
                }
                table = map
                    .mem
                    .translate_gpa(addr, u64::from(len))
                    .map_err(|_| ChainError::IndirectOutOfRange)?;
                table_len = len / 16;
                idx = 0;
                indirect = true;
                continue;
            }
            if len > 0 {
                let ptr = map
                    .mem
                    .translate_gpa(addr, u64::from(len))
                    .map_err(|_| ChainError::OutOfRange)?;
                segs.push(Seg {
                    ptr,
                    len,
                    writable: flags & VRING_DESC_F_WRITE != 0,
                });
            }
            if flags & VRING_DESC_F_NEXT == 0 {
                return Ok(());
            }
            idx = u32::from(next);
        }
    }

    /// Publishes completed heads as one batch and tells whether the driver wants an interrupt.
    /// Inflight entries are cleared after the used index is visible (spec order).
    pub fn publish(&mut self, done: &[(u16, u32)]) -> bool {
        let Some(map) = self.map.as_ref() else {
            return false;
        };
        if done.is_empty() {
            return false;
        }
        let st = &mut self.state;
        let size = usize::from(map.size);
        for (k, &(head, len)) in done.iter().enumerate() {
            if let Some(inf) = &map.inflight {
                inf.set_next(head, inf.last_batch_head());
                inf.set_last_batch_head(head);
            }
            let slot = usize::from(st.used_idx.wrapping_add(k as u16)) % size;
            let e = map.used.wrapping_add(4 + 8 * slot);
            // SAFETY: slot < size; the used ring has 8 * size bytes of elements after 4 bytes.
            unsafe {
                access::w32(e, u32::from(head));
                access::w32(e.wrapping_add(4), len);
            }
        }
        let new = st.used_idx.wrapping_add(done.len() as u16);
        fence(Ordering::Release);
        // SAFETY: used header inside the mapping.
        unsafe { access::w16(map.used.wrapping_add(2), new) };
        st.used_idx = new;
        st.outstanding = st.outstanding.saturating_sub(done.len());
        if let Some(inf) = &map.inflight {
            fence(Ordering::Release);
            for &(head, _) in done {
                inf.set_inflight(head, false);
            }
            fence(Ordering::Release);
            inf.set_used_idx(new);
        }
        // The driver's used_event / flags must be read after our idx store is visible.
        fence(Ordering::SeqCst);
        if self.event_idx {
            let old = st.signalled_used.replace(new);
            let Some(old) = old else { return true };
            // SAFETY: used_event is the u16 after the avail ring entries (in the mapping).
            let event = unsafe { access::r16(map.avail.wrapping_add(4 + 2 * size)) };
            new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
        } else {
            // SAFETY: avail flags inside the mapping.
            let flags = unsafe { access::r16(map.avail) };
            flags & VRING_AVAIL_F_NO_INTERRUPT == 0
        }
    }
}

/// The reconnect algorithm: fix up the last batch, compute the resume position as
/// `used_idx + inflight entries`, and list the inflight heads in fetch order for resubmission.
/// A never-used region (version 0) is initialised instead.
fn recover_inflight(st: &mut VringState, inf: &InflightQueue, size: u16) {
    if inf.version() == 0 {
        inf.set_header(INFLIGHT_VERSION, inf.desc_num);
        inf.set_used_idx(st.used_idx);
        st.inflight_counter = 0;
        return;
    }
    let limit = inf.desc_num.min(size);
    if inf.used_idx() != st.used_idx {
        // The used idx moved but the entries of that batch were not all cleared yet.
        let batch = st.used_idx.wrapping_sub(inf.used_idx()).min(inf.desc_num);
        let mut i = inf.last_batch_head();
        for _ in 0..batch {
            if i >= inf.desc_num {
                break;
            }
            inf.set_inflight(i, false);
            i = inf.next(i);
        }
        fence(Ordering::Release);
        inf.set_used_idx(st.used_idx);
    }
    let mut pending: Vec<(u64, u16)> = (0..limit)
        .filter(|&i| inf.inflight(i))
        .map(|i| (inf.counter(i), i))
        .collect();
    pending.sort_unstable();
    st.last_avail_idx = st.used_idx.wrapping_add(pending.len() as u16);
    st.inflight_counter = pending.last().map_or(0, |&(c, _)| c + 1);
    st.resubmit = pending.into_iter().map(|(_, i)| i).collect();
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::vhost::memory::memfd;

    /// A crash between publishing a used batch and clearing its inflight entries: recovery
    /// clears the batch (walking `next` from `last_batch_head`), resumes at used + inflight, and
    /// resubmits the rest in fetch order.
    #[test]
    fn recovery_fixes_the_last_batch_and_orders_by_counter() {
        let qs = 8u16;
        let fd = memfd("t", inflight_queue_stride(qs)).unwrap();
        let map = Arc::new(SharedMapping::map(&fd, 0, inflight_queue_stride(qs)).unwrap());
        let inf = InflightQueue::new(map, 0, qs).unwrap();
        inf.set_header(INFLIGHT_VERSION, qs);
        for (i, c) in [(1u16, 7u64), (3, 5), (5, 6), (6, 2)] {
            inf.set_inflight(i, true);
            inf.set_counter(i, c);
        }
        // Last batch: 6 then 3 (3 is the head of the list), used idx moved 10 → 12.
        inf.set_next(6, 0);
        inf.set_next(3, 6);
        inf.set_last_batch_head(3);
        inf.set_used_idx(10);
        let mut st = VringState {
            used_idx: 12,
            last_avail_idx: 12,
            ..VringState::default()
        };
        recover_inflight(&mut st, &inf, qs);
        assert!(!inf.inflight(3) && !inf.inflight(6));
        assert_eq!(inf.used_idx(), 12);
        assert_eq!(st.resubmit, vec![5, 1]);
        assert_eq!(st.last_avail_idx, 14);
        assert_eq!(st.inflight_counter, 8);

        // A fresh (zeroed) region is initialised and nothing is resubmitted.
        let fd2 = memfd("t2", inflight_queue_stride(qs)).unwrap();
        let map2 = Arc::new(SharedMapping::map(&fd2, 0, inflight_queue_stride(qs)).unwrap());
        let inf2 = InflightQueue::new(map2, 0, qs).unwrap();
        let mut st2 = VringState {
            used_idx: 3,
            last_avail_idx: 3,
            ..VringState::default()
        };
        recover_inflight(&mut st2, &inf2, qs);
        assert_eq!(inf2.version(), INFLIGHT_VERSION);
        assert!(st2.resubmit.is_empty());
        assert_eq!(st2.last_avail_idx, 3);
    }

    #[test]
    fn inflight_layout_matches_spec() {
        // align64(16 + 16 * queue_size): QEMU's 128-entry queue: 2064 → 2112.
        assert_eq!(inflight_queue_stride(128), 2112);
        assert_eq!(inflight_queue_stride(1), 64);
        assert_eq!(inflight_queue_stride(2), 64);
        assert_eq!(inflight_queue_stride(3), 64);
        assert_eq!(inflight_queue_stride(4), 128);
    }
}
