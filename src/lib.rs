//! hostplane: a kernel-bypass host dataplane on DPDK.
//!
//! - [`env`]: the only code that calls DPDK (EAL, lcores, mempools, mbufs, ethdev, rings).
//! - [`net`]: frame parsing and MAC-NAT, the table, the poll-mode lcore loop.
//! - [`storage`]: vhost-user-blk (our own vhost-user back-end, split rings, inflight tracking).
//! - [`config`], [`lcores`], [`cli`], [`runtime`]: configuration and the `run` command.

pub mod bench;
pub mod cli;
pub mod config;
pub mod env;
pub mod lcores;
pub mod net;
pub mod runtime;
pub mod signals;
pub mod storage;
