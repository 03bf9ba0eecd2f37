//! Storage: reactors, the block-device (bdev) layer, its backends and per-VM disk routing.
//!
//! - [`reactor`]: one reactor per storage lcore (or plain thread in tests); pollers + messages.
//! - [`bdev`]: the asynchronous block-device interface, requests, per-reactor IO channels, stats.
//! - [`registry`]: storage systems by type name; [`malloc`], [`null`], [`file`], [`nbd`],
//!   [`rbd`] (Ceph, through [`ceph`], the only caller of `rbd-sys`).
//! - [`routing`]: the VM/disk config and the bdevs created from it.
//! - [`convert`]: online format conversion (qcow2/vmdk/raw → raw) while the VM runs.
//! - [`bdevperf`]: `hostplane bench bdev`; [`qosbench`]: `hostplane bench qos`.
//! - [`vhost`]: vhost-user-blk controllers (own vhost-user back-end, split rings, inflight).
//! - [`qos`]: credit buckets, classes from quota, per-slice allocation (pure logic).
//! - [`qos_gate`]: QoS on the IO path: each bdev's limits and queue on its owner reactor.
//! - [`service_queue`]: per-service wait/pending queues (where a request waits during a pause);
//!   [`upgrade`]: pause → drain → swap backend → replay → resume.
//!
//! See docs/storage.md.

pub mod bdev;
pub mod bdevperf;
pub mod ceph;
pub mod client;
pub mod convert;
pub mod file;
pub mod malloc;
pub mod manager;
pub mod nbd;
pub mod null;
pub mod qos;
pub mod qos_gate;
pub mod qosbench;
pub mod rbd;
pub mod reactor;
pub mod registry;
pub mod routing;
pub mod service_queue;
pub mod upgrade;
pub mod vhost;

pub use bdev::{Bdev, BdevError, BdevInfo, IoBuf, IoChannel, IoKind, IoRequest, IoStat, IoStatus};
pub use reactor::{
    PollStatus, Poller, Reactor, ReactorHandle, ReactorOptions, ReactorSet, ReactorStats,
};
pub use registry::BackendRegistry;

use std::sync::OnceLock;

/// The storage clock: TSC ticks (works without EAL; the instruction needs no setup).
#[inline(always)]
pub fn ticks() -> u64 {
    crate::env::tsc()
}

/// Ticks per second: EAL's measurement when EAL is up, else a one-off 20 ms calibration.
pub fn ticks_hz() -> u64 {
    static HZ: OnceLock<u64> = OnceLock::new();
    *HZ.get_or_init(|| {
        let eal = crate::env::tsc_hz();
        if eal > 0 {
            return eal;
        }
        let t0 = std::time::Instant::now();
        let c0 = ticks();
        std::thread::sleep(std::time::Duration::from_millis(20));
        let c1 = ticks();
        let ns = t0.elapsed().as_nanos().max(1);
        ((u128::from(c1.wrapping_sub(c0)) * 1_000_000_000) / ns) as u64
    })
}
