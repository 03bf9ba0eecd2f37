//! Storage: vhost-user-blk serving VM disks (the reactors and the bdev layer arrive on the
//! `storage` branch; on merge this file gains their modules).

pub mod vhost;
