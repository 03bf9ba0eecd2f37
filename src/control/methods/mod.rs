//! Method handlers, one module per area. Each has a `register(&mut Registry, ...)` that adds
//! its methods (and its `save_config` subsystem) with the handles it needs.
//!
//! Methods still waiting for a feature are listed in [`super::registry::PENDING`].

pub mod convert;
pub mod framework;
pub mod net;
pub mod rbd;
pub mod storage;
pub mod vhost;
