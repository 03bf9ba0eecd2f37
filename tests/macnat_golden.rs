//! MAC-NAT golden frames through `net_pcap` ports, small table (see tests/golden/mod.rs).
//! EAL starts once per process: one `#[test]` here.

mod common;
mod golden;

#[test]
fn macnat_golden_through_net_pcap() {
    golden::golden("golden", 0);
}
