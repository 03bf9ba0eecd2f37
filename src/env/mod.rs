//! The environment layer: the only module that calls into DPDK (`dpdk-sys`).
//!
//! Everything above it (net, storage, control) uses these safe types: [`Eal`] for process-wide
//! EAL state, [`lcore`] to run closures on worker lcores, [`Mempool`] and [`Mbuf`] for packet
//! buffers with ownership in the type system, [`EthPort`] for ethdev ports and [`ring`] for
//! messages between lcores.

pub mod eal;
pub mod ethdev;
pub mod lcore;
pub mod mbuf;
pub mod mempool;
pub mod ring;

pub use eal::Eal;
pub use ethdev::{EthPort, LinkStatus, PortConfig, PortStats};
pub use mbuf::{Mbuf, MbufBurst, BURST_SIZE};
pub use mempool::Mempool;

use std::ffi::CStr;

/// Errors from the DPDK environment.
#[derive(Debug, thiserror::Error)]
pub enum EnvError {
    /// `rte_eal_init` failed; the string is DPDK's reason.
    #[error("EAL initialisation failed: {0}")]
    EalInit(String),
    /// EAL can be initialised once per process.
    #[error("EAL is already initialised in this process")]
    EalAlreadyInitialised,
    /// An argument could not be passed to C (contains a NUL byte).
    #[error("argument contains a NUL byte: {0:?}")]
    BadArgument(String),
    /// A mempool or ring could not be created.
    #[error("cannot create {what} {name:?}: {reason}")]
    Create {
        /// "mempool" or "ring".
        what: &'static str,
        /// The object's name.
        name: String,
        /// DPDK's reason.
        reason: String,
    },
    /// The mempool has no free buffers.
    #[error("mempool exhausted")]
    PoolExhausted,
    /// An ethdev call failed.
    #[error("port {port}: {op} failed: {reason}")]
    Port {
        /// Port id.
        port: u16,
        /// The operation that failed.
        op: &'static str,
        /// DPDK's reason.
        reason: String,
    },
    /// No port with that name or id.
    #[error("no such port: {0}")]
    NoSuchPort(String),
    /// The lcore is not a worker lcore of this EAL, or is busy.
    #[error("cannot launch on lcore {lcore}: {reason}")]
    Launch {
        /// lcore id.
        lcore: u32,
        /// Why.
        reason: String,
    },
}

/// DPDK's text for an errno value (positive or negative).
pub fn strerror(errnum: i32) -> String {
    // SAFETY: rte_strerror returns a pointer to a static or thread-local NUL-terminated string
    // for any input value; we copy it out immediately.
    unsafe { CStr::from_ptr(dpdk_sys::rte_strerror(errnum.abs())) }
        .to_string_lossy()
        .into_owned()
}

/// The calling thread's `rte_errno`.
pub fn last_errno() -> i32 {
    // SAFETY: reads the per-lcore errno variable; valid on any thread.
    unsafe { dpdk_sys::hp_errno() }
}

/// DPDK's version string, e.g. "DPDK 22.11.11".
pub fn dpdk_version() -> String {
    // SAFETY: rte_version returns a pointer to a static NUL-terminated string.
    unsafe { CStr::from_ptr(dpdk_sys::rte_version()) }
        .to_string_lossy()
        .into_owned()
}

/// TSC cycle counter (rdtsc).
#[inline(always)]
pub fn tsc() -> u64 {
    // SAFETY: reads the CPU timestamp counter; no memory is touched.
    unsafe { dpdk_sys::hp_rdtsc() }
}

/// TSC ticks per second as measured by EAL (valid after EAL init).
pub fn tsc_hz() -> u64 {
    // SAFETY: returns a value computed at EAL init; harmless before init (returns 0).
    unsafe { dpdk_sys::rte_get_tsc_hz() }
}

/// Spin-wait hint for poll loops.
#[inline(always)]
pub fn cpu_pause() {
    // SAFETY: executes the `pause` instruction; no memory is touched.
    unsafe { dpdk_sys::hp_pause() }
}

/// Prefetch a cache line into all cache levels.
#[inline(always)]
pub fn prefetch<T>(p: *const T) {
    // SAFETY: prefetch is a hint and never faults, even for invalid addresses.
    unsafe { dpdk_sys::hp_prefetch0(p.cast()) }
}
