//! Method handlers, one module per area. Each has a `register(&mut Registry, ...)` that adds
//! its methods (and its `save_config` subsystem) with the handles it needs.
//!

pub mod convert;
pub mod framework;
pub mod net;
pub mod rbd;
pub mod storage;
pub mod upgrade;
pub mod vhost;
