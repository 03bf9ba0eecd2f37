//! Owned packet buffers and bursts of them.
//!
//! Ownership rule: an [`Mbuf`] owns exactly one reference to a DPDK mbuf and frees it on drop.
//! [`MbufBurst`] owns a contiguous run of them. `EthPort::tx_burst` takes ownership only of the
//! mbufs the driver accepted and leaves the rest in the burst, where the caller decides to retry
//! or drop (free) them — an mbuf is never freed twice and never leaked.

use std::mem::MaybeUninit;
use std::ptr::NonNull;

/// Packets per rx/tx burst.
pub const BURST_SIZE: usize = 32;

/// An owned mbuf. Frees itself on drop.
#[repr(transparent)]
pub struct Mbuf(NonNull<dpdk_sys::rte_mbuf>);

// SAFETY: an Mbuf is an exclusive owner of its buffer; moving it to another lcore moves ownership
// (this is how DPDK apps pass mbufs through rings). Freeing from any lcore is allowed.
unsafe impl Send for Mbuf {}

impl Mbuf {
    /// Takes ownership of a raw mbuf.
    ///
    /// # Safety
    /// `p` must point to a valid mbuf that nobody else will free or use.
    #[inline]
    pub unsafe fn from_raw(p: NonNull<dpdk_sys::rte_mbuf>) -> Mbuf {
        Mbuf(p)
    }

    /// Gives up ownership; the caller must free the mbuf (or hand it to a driver).
    #[inline]
    pub fn into_raw(self) -> NonNull<dpdk_sys::rte_mbuf> {
        let p = self.0;
        std::mem::forget(self);
        p
    }

    /// Bytes in the first segment.
    #[inline(always)]
    pub fn data_len(&self) -> usize {
        // SAFETY: we own a valid mbuf; the field layout is checked against C at EAL init
        // (`layout_matches_c`).
        unsafe { (*self.0.as_ptr()).data_len as usize }
    }

    /// Total packet length over all segments.
    #[inline(always)]
    pub fn pkt_len(&self) -> usize {
        // SAFETY: as in data_len.
        unsafe { (*self.0.as_ptr()).pkt_len as usize }
    }

    /// Number of segments.
    #[inline(always)]
    pub fn segments(&self) -> u16 {
        // SAFETY: as in data_len.
        unsafe { (*self.0.as_ptr()).nb_segs }
    }

    /// Start of the first segment's data (rte_pktmbuf_mtod).
    #[inline(always)]
    fn data_ptr(&self) -> *mut u8 {
        // SAFETY: as in data_len; buf_addr + data_off stays inside the mbuf's buffer (DPDK
        // keeps data_off <= buf_len).
        unsafe {
            let m = self.0.as_ptr();
            (*m).buf_addr.cast::<u8>().add(usize::from((*m).data_off))
        }
    }

    /// The first segment's data.
    #[inline(always)]
    pub fn data(&self) -> &[u8] {
        // SAFETY: data_ptr points at data_len initialised bytes inside the mbuf's buffer, which
        // we own for the lifetime of &self.
        unsafe { std::slice::from_raw_parts(self.data_ptr(), self.data_len()) }
    }

    /// The first segment's data, writable.
    #[inline(always)]
    pub fn data_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in data(); &mut self guarantees exclusive access. hostplane never creates
        // refcnt > 1 (cloned) mbufs, so the bytes are not shared.
        unsafe { std::slice::from_raw_parts_mut(self.data_ptr(), self.data_len()) }
    }

    /// Appends `len` bytes at the end and returns them; `None` without enough tailroom.
    pub fn append(&mut self, len: usize) -> Option<&mut [u8]> {
        let len16 = u16::try_from(len).ok()?;
        // SAFETY: we own the mbuf; append returns NULL if tailroom is insufficient.
        let p = unsafe { dpdk_sys::hp_pktmbuf_append(self.0.as_ptr(), len16) };
        // SAFETY: a non-null result points at `len` bytes of tailroom now counted in data_len.
        NonNull::new(p).map(|p| unsafe { std::slice::from_raw_parts_mut(p.as_ptr().cast(), len) })
    }

    /// Removes `len` bytes from the end. False if the packet is shorter.
    pub fn trim(&mut self, len: usize) -> bool {
        let Ok(len16) = u16::try_from(len) else {
            return false;
        };
        // SAFETY: we own the mbuf; trim checks the length.
        unsafe { dpdk_sys::hp_pktmbuf_trim(self.0.as_ptr(), len16) == 0 }
    }

    /// The NIC's RSS hash, 0 when the driver gave none.
    #[inline]
    pub fn rss_hash(&self) -> u32 {
        // SAFETY: we own a valid mbuf.
        unsafe { dpdk_sys::hp_pktmbuf_rss_hash(self.0.as_ptr()) }
    }

    /// Prefetches the packet data's first cache line.
    #[inline(always)]
    pub fn prefetch_data(&self) {
        super::prefetch(self.data_ptr());
    }
}

/// True when the rte_mbuf field offsets Rust reads directly match the C compiler's.
pub(crate) fn layout_matches_c() -> bool {
    use std::mem::offset_of;
    let mut c = [0usize; 5];
    // SAFETY: writes five size_t values into `c`.
    unsafe { dpdk_sys::hp_mbuf_layout(c.as_mut_ptr()) };
    let rust = [
        offset_of!(dpdk_sys::rte_mbuf, buf_addr),
        offset_of!(dpdk_sys::rte_mbuf, data_off),
        offset_of!(dpdk_sys::rte_mbuf, nb_segs),
        offset_of!(dpdk_sys::rte_mbuf, pkt_len),
        offset_of!(dpdk_sys::rte_mbuf, data_len),
    ];
    c == rust
}

/// The first segment's bytes, as [`Mbuf::data`]: lets byte-level code (MAC-NAT's burst
/// functions) take mbufs and plain buffers alike.
impl AsRef<[u8]> for Mbuf {
    #[inline(always)]
    fn as_ref(&self) -> &[u8] {
        self.data()
    }
}

/// As [`Mbuf::data_mut`].
impl AsMut<[u8]> for Mbuf {
    #[inline(always)]
    fn as_mut(&mut self) -> &mut [u8] {
        self.data_mut()
    }
}

impl Drop for Mbuf {
    #[inline]
    fn drop(&mut self) {
        // SAFETY: we are the sole owner of this mbuf reference.
        unsafe { dpdk_sys::hp_pktmbuf_free(self.0.as_ptr()) }
    }
}

/// Up to [`BURST_SIZE`] owned mbufs: slots `[head, len)` are live. Drop frees the live ones.
pub struct MbufBurst {
    slots: [MaybeUninit<Mbuf>; BURST_SIZE],
    head: usize,
    len: usize,
}

impl Default for MbufBurst {
    fn default() -> Self {
        Self::new()
    }
}

impl MbufBurst {
    /// An empty burst.
    #[inline]
    pub fn new() -> Self {
        MbufBurst {
            slots: [const { MaybeUninit::uninit() }; BURST_SIZE],
            head: 0,
            len: 0,
        }
    }

    /// Live mbufs.
    #[inline]
    pub fn len(&self) -> usize {
        self.len - self.head
    }

    /// True when empty.
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.len == self.head
    }

    /// True when no more mbufs fit.
    #[inline]
    pub fn is_full(&self) -> bool {
        self.len == BURST_SIZE
    }

    /// Adds an mbuf; gives it back if full.
    #[inline]
    pub fn push(&mut self, m: Mbuf) -> Result<(), Mbuf> {
        if self.len == BURST_SIZE {
            if self.head == 0 {
                return Err(m);
            }
            self.compact();
        }
        self.slots[self.len].write(m);
        self.len += 1;
        Ok(())
    }

    /// Removes the first live mbuf.
    #[inline]
    pub fn pop_front(&mut self) -> Option<Mbuf> {
        if self.head == self.len {
            return None;
        }
        // SAFETY: slot `head` is live; advancing head marks it moved-out so it is not read again.
        let m = unsafe { self.slots[self.head].assume_init_read() };
        self.head += 1;
        if self.head == self.len {
            self.head = 0;
            self.len = 0;
        }
        Some(m)
    }

    /// Live mbufs as a slice.
    #[inline]
    pub fn as_slice(&self) -> &[Mbuf] {
        // SAFETY: slots [head, len) are initialised; MaybeUninit<Mbuf> has Mbuf's layout.
        unsafe { std::slice::from_raw_parts(self.slots.as_ptr().add(self.head).cast(), self.len()) }
    }

    /// Live mbufs as a mutable slice.
    #[inline]
    pub fn as_mut_slice(&mut self) -> &mut [Mbuf] {
        let n = self.len();
        // SAFETY: as in as_slice, with exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.slots.as_mut_ptr().add(self.head).cast(), n) }
    }

    /// Frees every live mbuf; returns how many.
    #[inline]
    pub fn drop_all(&mut self) -> usize {
        let n = self.len();
        while self.pop_front().is_some() {}
        n
    }

    fn compact(&mut self) {
        let n = self.len();
        // SAFETY: moves the live slots to the front; regions may overlap so use ptr::copy.
        // The moved-from slots are treated as uninitialised afterwards.
        unsafe {
            std::ptr::copy(
                self.slots.as_ptr().add(self.head),
                self.slots.as_mut_ptr(),
                n,
            )
        };
        self.head = 0;
        self.len = n;
    }

    /// For rx: the free tail as raw pointers to fill, after compacting.
    #[inline]
    pub(crate) fn spare_raw(&mut self) -> (*mut *mut dpdk_sys::rte_mbuf, usize) {
        if self.head != 0 {
            self.compact();
        }
        // SAFETY: `len <= BURST_SIZE`, so the pointer is in bounds or one past the end.
        let p = unsafe { self.slots.as_mut_ptr().add(self.len) }.cast();
        (p, BURST_SIZE - self.len)
    }

    /// For rx: `n` slots after the live ones were filled by the driver with owned mbufs.
    ///
    /// # Safety
    /// Exactly `n` slots following the live ones must now hold valid, owned, non-null mbufs.
    #[inline]
    pub(crate) unsafe fn commit_filled(&mut self, n: usize) {
        self.len += n;
    }

    /// For tx: live mbufs as raw pointers.
    #[inline]
    pub(crate) fn live_raw(&mut self) -> (*mut *mut dpdk_sys::rte_mbuf, usize) {
        (
            // SAFETY: head <= len <= BURST_SIZE.
            unsafe { self.slots.as_mut_ptr().add(self.head) }.cast(),
            self.len(),
        )
    }

    /// For tx: the driver took ownership of the first `n` live mbufs.
    ///
    /// # Safety
    /// The first `n` live mbufs must have been handed to (and now be owned by) the driver.
    #[inline]
    pub(crate) unsafe fn forget_front(&mut self, n: usize) {
        self.head += n;
        if self.head == self.len {
            self.head = 0;
            self.len = 0;
        }
    }
}

impl Drop for MbufBurst {
    fn drop(&mut self) {
        self.drop_all();
    }
}
