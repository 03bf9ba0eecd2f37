//! The control plane: an SPDK-compatible JSON-RPC 2.0 server on a Unix socket, its method
//! registry, the `hostplane rpc` client, and config save/load in SPDK's JSON format.
//!
//! - [`stream`]: splits a byte stream into JSON values (no framing needed, bounded memory).
//! - [`jsonrpc`]: request checks, error codes, responses.
//! - [`registry`]: name → handler, `save_config`/`load_config`, methods pending a feature.
//! - [`server`]: the socket (0600, stale/live detection), connection threads, limits.
//! - [`methods`]: handlers by area (framework, net; storage when it lands).
//! - [`json_config`]: the `{"subsystems": [...]}` file format.
//! - [`client`]: `hostplane rpc`.
//!
//! The RPC threads never touch data-path state: the MAC-NAT table is published by RCU, counters
//! are single-writer atomics read by anyone, and anything an lcore or reactor owns is changed by
//! sending it a message.

pub mod client;
pub mod json_config;
pub mod jsonrpc;
pub mod methods;
pub mod registry;
pub mod server;
pub mod stream;

pub use json_config::{ConfigCall, JsonConfig};
pub use jsonrpc::RpcError;
pub use registry::Registry;
pub use server::{Limits, RpcListener, RpcServer, DEFAULT_SOCKET};
