//! Raw bindings to Ceph's librbd and librados C APIs (Ceph 16.2 on Debian 12). The safe layer is
//! `hostplane::storage::rbd`; nothing else should call these.
#![allow(
    non_upper_case_globals,
    non_camel_case_types,
    non_snake_case,
    dead_code
)]
#![allow(clippy::all)]
#![allow(clippy::undocumented_unsafe_blocks)]

include!(concat!(env!("OUT_DIR"), "/bindings.rs"));
