//! Virtual-disk IO QoS: per-disk limits as credit buckets, classes from quota, and a per-slice
//! allocation of contended device time. Pure logic on an injectable clock; no DPDK, no locks.
//!
//! # Model
//! - Every limit is a [`CreditBucket`] (rate + depth, exact integer refill). A disk has up to
//!   four limit buckets, named after SPDK's `bdev_set_qos_limit` parameters (`rw_ios_per_sec`,
//!   `rw_mbytes_per_sec`, `r_mbytes_per_sec`, `w_mbytes_per_sec`; 0 = unlimited), plus one
//!   device-time bucket whose rate is the disk's current share of its device.
//! - A [`DiskQos`] admits an IO when every bucket it draws from has credit; otherwise the IO waits
//!   in the disk's FIFO queue and a later poll releases it. QoS never fails an IO.
//! - The device is described by a [`DeviceCapacity`] (linear cost model: device time of an IO =
//!   `1/ios_per_sec + bytes/bytes_per_sec`). Once per slice (default 1 ms) each disk reports its
//!   demand, limit, reservation and class weight ([`DemandReport`]); [`allocate`] shares the
//!   device time (demand if it fits, else reservations first, then water-filling by weight capped
//!   by limit and demand, work-conserving) and each disk gets a [`Grant`].
//! - Weights come from a [`ClassTable`] that maps quota (bandwidth or IOPS) ranges to classes.
//!
//! # Threads: who owns what
//! Each piece of state has exactly one owner, in SPDK's style:
//! - A disk's [`DiskQos`] (buckets, queue, estimates) is owned by the reactor that owns the disk.
//!   `submit` and `poll` run there and touch nothing else: no lock, no atomic read-modify-write,
//!   no allocation once the queue and output vector have grown to their working size.
//! - A device's [`SliceAllocator`] is owned by one reactor (any; the one owning most of the
//!   device's disks saves messages). Every slice, each disk's reactor calls
//!   [`DiskQos::close_slice`] and sends the resulting [`DemandReport`] (a `Copy` value) to the
//!   allocator's reactor, which stores it with [`SliceAllocator::report`]. At its own slice tick
//!   the allocator runs [`SliceAllocator::allocate`] once and sends each disk's [`Grant`] (also
//!   `Copy`) back by message; the disk's reactor installs it with [`DiskQos::apply_grant`].
//!   A report or grant that arrives late costs one slice of accuracy, never safety: a disk keeps
//!   its last grant, and its own limit buckets are always enforced locally.
//! - Configuration (limits, weight from the class table, reservation, capacity, slice length)
//!   travels the same way: the control plane sends it to the owner ([`DiskQos::set_config`] on
//!   the disk's reactor, [`SliceAllocator::set_capacity`] on the allocator's). Limits apply at
//!   once; weight and reservation with the next report; capacity with the next allocation.
//! - [`DeviceQos`] is the same protocol with the messages replaced by calls, for a device whose
//!   disks all live on one reactor, and for deterministic simulation with a [`ManualClock`].
//!
//! See docs/qos.md for parameters, guarantees and the mapping to SPDK.

mod alloc;
mod bucket;
mod class;
mod clock;
mod device;
mod disk;
mod limits;
#[cfg(test)]
mod sim;

pub use alloc::{
    allocate, check_slice, DemandReport, Grant, InvalidSlice, Scratch, SliceAllocator,
    DEFAULT_SLICE_NS, MAX_SLICE_NS, MIN_SLICE_NS,
};
pub use bucket::CreditBucket;
pub use class::{ClassTable, ClassTableConfig, ClassTableError, QosClass, QuotaBasis, MAX_WEIGHT};
pub use clock::{Clock, ManualClock, MonotonicClock, SliceTimer, NS_PER_SEC};
pub use device::{DeviceQos, DiskId, QosError};
pub use disk::{Admission, ConfigError, DiskQos, DiskQosConfig, DiskQosStats, QosIo, QosOp};
pub use limits::{
    DeviceCapacity, DiskLimits, Limit, QosLimitParams, Reservation, DEFAULT_BURST_NS,
    DEVICE_PS_PER_SEC, MIB,
};
