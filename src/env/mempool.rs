//! Packet buffer pools.

use super::{last_errno, strerror, EnvError, Mbuf};
use std::ffi::CString;
use std::ptr::NonNull;

/// A handle to a DPDK pktmbuf pool.
///
/// Pools live until EAL cleanup: a pool is never freed while the process runs, so an [`Mbuf`]
/// can never outlive its pool. The handle is `Copy` and can be sent to any lcore.
#[derive(Clone, Copy)]
pub struct Mempool(NonNull<dpdk_sys::rte_mempool>);

// SAFETY: rte_mempool is designed for concurrent get/put from many lcores (per-lcore caches plus
// a lock-free ring); the handle is a plain pointer to a pool that is never freed.
unsafe impl Send for Mempool {}
// SAFETY: see Send: every operation on the pool is thread-safe.
unsafe impl Sync for Mempool {}

impl Mempool {
    /// Creates a pktmbuf pool of `n` buffers with `data_room` bytes of data room (headroom
    /// included) and a per-lcore cache of `cache` buffers, on NUMA `socket` (-1 = any).
    pub fn pktmbuf(
        name: &str,
        n: u32,
        cache: u32,
        data_room: u16,
        socket: i32,
    ) -> Result<Mempool, EnvError> {
        let cname = CString::new(name).map_err(|_| EnvError::BadArgument(name.into()))?;
        // SAFETY: cname is a valid C string for the duration of the call; EAL copies the name.
        let p = unsafe {
            dpdk_sys::rte_pktmbuf_pool_create(cname.as_ptr(), n, cache, 0, data_room, socket)
        };
        NonNull::new(p)
            .map(Mempool)
            .ok_or_else(|| EnvError::Create {
                what: "mempool",
                name: name.into(),
                reason: strerror(last_errno()),
            })
    }

    /// Allocates one mbuf; [`EnvError::PoolExhausted`] when none is free.
    #[inline]
    pub fn alloc(&self) -> Result<Mbuf, EnvError> {
        // SAFETY: the pool pointer is valid for the process lifetime.
        let m = unsafe { dpdk_sys::hp_pktmbuf_alloc(self.0.as_ptr()) };
        NonNull::new(m)
            .map(|p| {
                // SAFETY: a non-null result is a freshly allocated mbuf that we now own exclusively.
                unsafe { Mbuf::from_raw(p) }
            })
            .ok_or(EnvError::PoolExhausted)
    }

    /// Buffers currently free in the pool (cache included).
    pub fn avail(&self) -> u32 {
        // SAFETY: pool pointer valid; the count is a racy snapshot, which is fine for stats.
        unsafe { dpdk_sys::rte_mempool_avail_count(self.0.as_ptr()) }
    }

    /// Raw pointer for the env layer (queue setup).
    pub(crate) fn as_ptr(&self) -> *mut dpdk_sys::rte_mempool {
        self.0.as_ptr()
    }
}
