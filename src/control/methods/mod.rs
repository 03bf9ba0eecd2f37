//! Method handlers, one module per area. Each has a `register(&mut Registry, ...)` that adds
//! its methods (and its `save_config` subsystem) with the handles it needs.
//!
//! Storage methods (see [`super::registry::PENDING`]) are wired by a `storage` module here,
//! one `reg.register_typed("bdev_malloc_create", ...)` line per method.

pub mod framework;
pub mod net;
pub mod rbd;
pub mod upgrade;
