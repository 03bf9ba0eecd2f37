//! vhost-user-blk: VM disks served over vhost-user, with all connection state owned here.
//!
//! - [`msg`]: message framing (header, body, SCM_RIGHTS fds) over a non-blocking Unix socket.
//! - [`memory`]: guest memory regions mapped by us; bounds-checked address translation.
//! - [`virtq`]: split virtqueues, descriptor chains, used ring, EVENT_IDX, inflight tracking.
//! - [`blk`]: virtio-blk features, config space, request parsing, the [`BlockTarget`] trait.
//! - [`backend`]: the vhost-user state machine of one connection ([`ConnState`]).
//! - [`controller`]: the socket, one connection at a time, `poll()` for a reactor.
//! - [`snapshot`]: a controller's state as data + fds, for a process handover.
//! - [`bdev_target`]: [`BdevTarget`], the [`BlockTarget`] over a reactor's bdev IO channel.
//! - [`service`]: controllers on the storage reactors ([`VhostPoller`]) and their control
//!   plane ([`VhostControl`]: create, list, delete, save).
//!
//! See docs/vhost-blk.md.

pub mod backend;
pub mod bdev_target;
pub mod blk;
pub mod controller;
pub mod memory;
pub mod msg;
pub mod service;
pub mod snapshot;
pub mod virtq;

#[cfg(test)]
mod tests;

pub use backend::{Backend, ConnState, InflightState};
pub use bdev_target::BdevTarget;
pub use blk::{BlkIo, BlkOp, BlkStatus, BlockTarget, MemTarget};
pub use controller::{ControllerStats, VhostBlkController, VhostBlkControllerConfig};
pub use service::{BdevLookup, CreateBlkController, VhostControl, VhostError, VhostPoller};
