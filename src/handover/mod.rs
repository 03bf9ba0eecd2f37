//! Process hot upgrade: a running hostplane hands its vhost-user connections, guest memory,
//! eventfds, inflight regions, listening sockets and live config to a new hostplane process
//! over a Unix socket, so the guests never see a disconnect. See docs/upgrade.md.
//!
//! - [`fdpass`]: JSON messages with any number of fds (SCM_RIGHTS).

pub mod fdpass;
