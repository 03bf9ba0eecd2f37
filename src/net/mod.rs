//! The network dataplane: frame parsing and rewriting ([`packet`], pure), the MAC-NAT table
//! ([`macnat`], RCU-published), the per-frame decision ([`nat`]) and the poll-mode lcore loop
//! ([`dataplane`]).

pub mod dataplane;
pub mod frames;
pub mod ipv4map;
pub mod macnat;
pub mod nat;
pub mod packet;
pub mod pcap;
pub mod rcu;
pub mod stats;
