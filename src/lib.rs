//! hostplane: a kernel-bypass host dataplane on DPDK.
//!
//! - [`env`]: the only code that calls DPDK (EAL, lcores, mempools, mbufs, ethdev, rings).
//! - [`net`]: frame parsing and MAC-NAT, the table, the poll-mode lcore loop.
//! - [`control`]: the JSON-RPC control socket, `hostplane rpc`, config save/load.
//! - [`storage`]: reactors, the bdev layer and its backends, per-VM disk routing,
//!   vhost-user-blk (our own vhost-user back-end, split rings, inflight tracking).
//! - [`config`], [`lcores`], [`cli`], [`runtime`]: configuration and the `run` command.

pub mod bench;
pub mod cli;
pub mod config;
pub mod control;
pub mod env;
pub mod handover;
pub mod lcores;
pub mod net;
pub mod runtime;
pub mod scm;
pub mod signals;
pub mod storage;
