//! Golden test: MAC-NAT through real `net_pcap` ports (run by tests/macnat_golden.rs and,
//! with a table beyond the cache, tests/macnat_golden_big.rs).
//!
//! The test writes an uplink and a VM input capture, runs the dataplane on them (one net lcore,
//! so order is kept per port), and compares the two output captures frame by frame with frames
//! built independently from docs/macnat-frames.md: an expected egress frame is the input frame
//! *built again with the global MAC* (Ethernet source, ARP SHA, ND options, ICMPv6 checksum
//! computed by the builder), never the output of the code under test. Drop counters must equal
//! the number of frames sent of each kind. Then `tcpdump` must read the outputs, and every frame
//! of the shared captures (`../shared/pcaps`, read in place) goes through both ports of a
//! `hostplane run` subprocess with `rx == tx + drops`.
//!
//! EAL starts once per process: each test file that runs it holds exactly one `#[test]`.

use crate::common;

use hostplane::cli::EalArgs;
use hostplane::config::Config;
use hostplane::net::frames as f;
use hostplane::net::packet::MacAddr;
use hostplane::net::pcap;
use hostplane::runtime::Dataplane;
use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

const L1: MacAddr = MacAddr([0x52, 0x54, 0x00, 0x00, 0x00, 0x02]);
const G1: MacAddr = MacAddr([0x02, 0x00, 0x00, 0x00, 0x00, 0x01]);
const L2: MacAddr = MacAddr([0x52, 0x54, 0x00, 0x00, 0x00, 0x03]);
const G2: MacAddr = MacAddr([0x02, 0x00, 0x00, 0x00, 0x00, 0x02]);
/// A MAC no VM has.
const STRANGER: MacAddr = MacAddr([0x52, 0x54, 0x00, 0x00, 0x00, 0x99]);
/// The router on the uplink side.
const R: MacAddr = MacAddr([0x02, 0x00, 0x00, 0x00, 0x00, 0xfe]);
const SWITCH: MacAddr = MacAddr([0x00, 0x1b, 0x21, 0x00, 0x00, 0x01]);
const BCAST: MacAddr = MacAddr::BROADCAST;
const ZERO: MacAddr = MacAddr::ZERO;

const VM1_4: [u8; 4] = [10, 0, 0, 2];
const VM2_4: [u8; 4] = [10, 0, 0, 3];
const R_4: [u8; 4] = [10, 0, 0, 1];
const UNKNOWN_4: [u8; 4] = [10, 0, 0, 99];
const VM1_6: [u8; 16] = v6(0xfd00, 2);
const VM2_6: [u8; 16] = v6(0xfd00, 3);
const R_6: [u8; 16] = v6(0xfd00, 1);
const UNKNOWN_6: [u8; 16] = v6(0xfd00, 0x99);
const ALL_NODES: [u8; 16] = v6(0xff02, 1);
const ALL_ROUTERS: [u8; 16] = v6(0xff02, 2);
/// fe80::5054:ff:fe00:2, VM1's EUI-64 link-local address (not in the table: found by MAC).
const VM1_LL: [u8; 16] = [
    0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0x50, 0x54, 0, 0xff, 0xfe, 0, 0, 2,
];
const UNSPECIFIED: [u8; 16] = [0; 16];

const fn v6(prefix: u16, last: u8) -> [u8; 16] {
    let p = prefix.to_be_bytes();
    [p[0], p[1], 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, last]
}

/// What must come out for one input frame.
enum Expect {
    /// This exact frame on the other port.
    Out(Vec<u8>),
    /// Nothing; the named drop counter goes up by one.
    Drop(&'static str),
}

struct Case {
    name: &'static str,
    input: Vec<u8>,
    expect: Expect,
}

fn out(name: &'static str, input: Vec<u8>, expected: Vec<u8>) -> Case {
    Case {
        name,
        input,
        expect: Expect::Out(expected),
    }
}

fn drop(name: &'static str, input: Vec<u8>, reason: &'static str) -> Case {
    Case {
        name,
        input,
        expect: Expect::Drop(reason),
    }
}

fn eth(dst: MacAddr, src: MacAddr, ethertype: u16, payload: &[u8]) -> Vec<u8> {
    f::padded(f::ethernet(dst, src, &[], ethertype, payload))
}

fn tagged(
    dst: MacAddr,
    src: MacAddr,
    tags: &[(u16, u16)],
    ethertype: u16,
    payload: &[u8],
) -> Vec<u8> {
    f::padded(f::ethernet(dst, src, tags, ethertype, payload))
}

fn cut(mut frame: Vec<u8>, len: usize) -> Vec<u8> {
    frame.truncate(len);
    frame
}

fn payload(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i % 251) as u8).collect()
}

/// Neighbor Solicitation from `src` for `target`, to its solicited-node group.
fn ns_frame(eth_src: MacAddr, src: [u8; 16], target: [u8; 16], slla: Option<MacAddr>) -> Vec<u8> {
    let group = f::solicited_node(target);
    eth(
        f::ipv6_multicast_mac(group),
        eth_src,
        0x86dd,
        &f::icmpv6(src, group, &f::neighbor_solicit(target, slla)),
    )
}

/// Frames a VM sends (egress: expected on the uplink, local → global).
fn vm_cases() -> Vec<Case> {
    let qinq = [(0x88a8, 200), (0x8100, 100)];
    let udp4 = |src: [u8; 4], dst: [u8; 4]| f::ipv4_udp_packet(src, dst, 4000, 5000, &payload(18));
    let udp6 = |src: [u8; 16], dst: [u8; 16]| f::ipv6_udp(src, dst, 4000, 5000, &payload(18));
    let tcp4 = |src: [u8; 4], dst: [u8; 4]| f::ipv4_tcp(src, dst, 40000, 80, 0x02, &[]);
    let cdp_llc = [0xaa, 0xaa, 0x03, 0x00, 0x00, 0x0c, 0x20, 0x00, 0x02, 0xb4];
    let cdp = |src: MacAddr| {
        f::padded(f::ethernet(
            MacAddr([0x01, 0x00, 0x0c, 0xcc, 0xcc, 0xcc]),
            src,
            &[],
            cdp_llc.len() as u16,
            &cdp_llc,
        ))
    };
    let mut bad_nd_opt = f::neighbor_solicit(R_6, None);
    bad_nd_opt.extend_from_slice(&[1, 0, 0, 0, 0, 0, 0, 0]);
    let mut two_sllas = f::neighbor_solicit(R_6, Some(L1));
    two_sllas.extend(f::nd_lla_option(1, L1));
    let mut bad_arp = f::arp(BCAST, L1, 1, L1, VM1_4, ZERO, R_4);
    bad_arp[18] = 8; // hlen 8
    let mut bad_ipv4 = f::ipv4_udp(R, L1, VM1_4, R_4, 60);
    bad_ipv4[14] = 0x55; // version 5
    let short_ns = {
        let m = f::neighbor_solicit(R_6, None);
        f::icmpv6(VM1_6, f::solicited_node(R_6), &m[..16])
    };
    vec![
        out(
            "ipv4/udp",
            f::ipv4_udp(R, L1, VM1_4, R_4, 60),
            f::ipv4_udp(R, G1, VM1_4, R_4, 60),
        ),
        out(
            "ipv4/tcp vm2",
            eth(R, L2, 0x0800, &tcp4(VM2_4, R_4)),
            eth(R, G2, 0x0800, &tcp4(VM2_4, R_4)),
        ),
        out(
            "arp request (broadcast)",
            f::arp(BCAST, L1, 1, L1, VM1_4, ZERO, R_4),
            f::arp(BCAST, G1, 1, G1, VM1_4, ZERO, R_4),
        ),
        out(
            "arp reply",
            f::arp(R, L1, 2, L1, VM1_4, R, R_4),
            f::arp(R, G1, 2, G1, VM1_4, R, R_4),
        ),
        out(
            "arp probe (spa 0.0.0.0)",
            f::arp(BCAST, L2, 1, L2, [0; 4], ZERO, VM2_4),
            f::arp(BCAST, G2, 1, G2, [0; 4], ZERO, VM2_4),
        ),
        out(
            "ipv6/udp",
            eth(R, L1, 0x86dd, &udp6(VM1_6, R_6)),
            eth(R, G1, 0x86dd, &udp6(VM1_6, R_6)),
        ),
        out(
            "ns with slla",
            ns_frame(L1, VM1_6, R_6, Some(L1)),
            ns_frame(G1, VM1_6, R_6, Some(G1)),
        ),
        out(
            "na with tlla",
            eth(
                R,
                L1,
                0x86dd,
                &f::icmpv6(VM1_6, R_6, &f::neighbor_advert(0x60, VM1_6, Some(L1))),
            ),
            eth(
                R,
                G1,
                0x86dd,
                &f::icmpv6(VM1_6, R_6, &f::neighbor_advert(0x60, VM1_6, Some(G1))),
            ),
        ),
        out(
            "rs with slla",
            eth(
                f::ipv6_multicast_mac(ALL_ROUTERS),
                L2,
                0x86dd,
                &f::icmpv6(VM2_6, ALL_ROUTERS, &f::router_solicit(Some(L2))),
            ),
            eth(
                f::ipv6_multicast_mac(ALL_ROUTERS),
                G2,
                0x86dd,
                &f::icmpv6(VM2_6, ALL_ROUTERS, &f::router_solicit(Some(G2))),
            ),
        ),
        out(
            "dad ns from ::",
            ns_frame(L1, UNSPECIFIED, VM1_6, None),
            ns_frame(G1, UNSPECIFIED, VM1_6, None),
        ),
        out(
            "802.1q ipv4",
            tagged(R, L1, &[(0x8100, 100)], 0x0800, &udp4(VM1_4, R_4)),
            tagged(R, G1, &[(0x8100, 100)], 0x0800, &udp4(VM1_4, R_4)),
        ),
        out(
            "qinq ipv4/tcp",
            tagged(R, L2, &qinq, 0x0800, &tcp4(VM2_4, R_4)),
            tagged(R, G2, &qinq, 0x0800, &tcp4(VM2_4, R_4)),
        ),
        out(
            "qinq ns with slla",
            tagged(
                f::ipv6_multicast_mac(f::solicited_node(R_6)),
                L1,
                &qinq,
                0x86dd,
                &f::icmpv6(
                    VM1_6,
                    f::solicited_node(R_6),
                    &f::neighbor_solicit(R_6, Some(L1)),
                ),
            ),
            tagged(
                f::ipv6_multicast_mac(f::solicited_node(R_6)),
                G1,
                &qinq,
                0x86dd,
                &f::icmpv6(
                    VM1_6,
                    f::solicited_node(R_6),
                    &f::neighbor_solicit(R_6, Some(G1)),
                ),
            ),
        ),
        out(
            "802.1q arp request",
            tagged(
                BCAST,
                L1,
                &[(0x8100, 7)],
                0x0806,
                &f::arp(BCAST, L1, 1, L1, VM1_4, ZERO, R_4)[14..42],
            ),
            tagged(
                BCAST,
                G1,
                &[(0x8100, 7)],
                0x0806,
                &f::arp(BCAST, G1, 1, G1, VM1_4, ZERO, R_4)[14..42],
            ),
        ),
        out(
            "broadcast ipv4",
            eth(BCAST, L1, 0x0800, &udp4(VM1_4, [10, 0, 0, 255])),
            eth(BCAST, G1, 0x0800, &udp4(VM1_4, [10, 0, 0, 255])),
        ),
        out(
            "multicast ipv4 (mdns)",
            eth(
                MacAddr([1, 0, 0x5e, 0, 0, 0xfb]),
                L2,
                0x0800,
                &udp4(VM2_4, [224, 0, 0, 251]),
            ),
            eth(
                MacAddr([1, 0, 0x5e, 0, 0, 0xfb]),
                G2,
                0x0800,
                &udp4(VM2_4, [224, 0, 0, 251]),
            ),
        ),
        out(
            "multicast ipv6",
            eth(
                f::ipv6_multicast_mac(ALL_NODES),
                L1,
                0x86dd,
                &udp6(VM1_6, ALL_NODES),
            ),
            eth(
                f::ipv6_multicast_mac(ALL_NODES),
                G1,
                0x86dd,
                &udp6(VM1_6, ALL_NODES),
            ),
        ),
        // The DHCP client hardware address (chaddr) is payload: per the spec it stays local.
        out(
            "dhcp discover from 0.0.0.0",
            f::dhcp_discover(L1, L1, 0x1234),
            f::dhcp_discover(G1, L1, 0x1234),
        ),
        out("llc (cdp) by source mac", cdp(L2), cdp(G2)),
        out(
            "other ethertype by source mac",
            eth(BCAST, L1, 0x88b5, &payload(46)),
            eth(BCAST, G1, 0x88b5, &payload(46)),
        ),
        // 9000 B exceed the 2048 B mbuf data room: net_pcap chains segments on rx, the dataplane
        // parses the first (headers), net_pcap's tx writes every segment.
        out(
            "jumbo 9000 ipv4/udp",
            f::ipv4_udp(R, L1, VM1_4, R_4, 9000),
            f::ipv4_udp(R, G1, VM1_4, R_4, 9000),
        ),
        drop(
            "unknown ipv4 source",
            f::ipv4_udp(R, L1, UNKNOWN_4, R_4, 60),
            "unknown_ip",
        ),
        drop(
            "unknown ipv6 source",
            eth(R, L1, 0x86dd, &udp6(UNKNOWN_6, R_6)),
            "unknown_ip",
        ),
        // Link-local sources identify no entry: the VM is found by its local MAC.
        out(
            "link-local rs (found by mac)",
            eth(
                f::ipv6_multicast_mac(ALL_ROUTERS),
                L1,
                0x86dd,
                &f::icmpv6(VM1_LL, ALL_ROUTERS, &f::router_solicit(Some(L1))),
            ),
            eth(
                f::ipv6_multicast_mac(ALL_ROUTERS),
                G1,
                0x86dd,
                &f::icmpv6(VM1_LL, ALL_ROUTERS, &f::router_solicit(Some(G1))),
            ),
        ),
        drop(
            "dhcp discover from unknown mac",
            f::dhcp_discover(STRANGER, STRANGER, 9),
            "unknown_ip",
        ),
        drop(
            "spoofed: known ip, unknown mac",
            f::ipv4_udp(R, STRANGER, VM1_4, R_4, 60),
            "spoofed",
        ),
        drop(
            "spoofed: vm2 claims vm1's ip",
            f::ipv4_udp(R, L2, VM1_4, R_4, 60),
            "spoofed",
        ),
        drop(
            "spoofed arp",
            f::arp(BCAST, L2, 1, L2, VM1_4, ZERO, R_4),
            "spoofed",
        ),
        drop("spoofed ns", ns_frame(L2, VM1_6, R_6, Some(L2)), "spoofed"),
        drop("lldp from vm", f::lldp(L1), "control"),
        drop("stp from vm", f::stp_bpdu(L1), "control"),
        drop("truncated: 10 bytes", payload(10), "truncated"),
        drop(
            "truncated: ipv4 header",
            cut(f::ipv4_udp(R, L1, VM1_4, R_4, 60), 14 + 12),
            "truncated",
        ),
        drop(
            "truncated: arp",
            cut(f::arp(BCAST, L1, 1, L1, VM1_4, ZERO, R_4), 14 + 20),
            "truncated",
        ),
        drop(
            "truncated: ns",
            cut(ns_frame(L1, VM1_6, R_6, Some(L1)), 14 + 40 + 24 + 4),
            "truncated",
        ),
        drop(
            "truncated: after vlan tag",
            cut(tagged(R, L1, &[(0x8100, 5)], 0x0800, &udp4(VM1_4, R_4)), 17),
            "truncated",
        ),
        drop(
            "three vlan tags",
            tagged(
                R,
                L1,
                &[(0x88a8, 1), (0x8100, 2), (0x8100, 3)],
                0x0800,
                &udp4(VM1_4, R_4),
            ),
            "too_many_tags",
        ),
        drop("arp hlen 8", bad_arp, "bad_arp"),
        drop("ipv4 version 5", bad_ipv4, "bad_ipv4"),
        drop(
            "ipv6 ethertype, version 4",
            eth(R, L1, 0x86dd, &udp4(VM1_4, R_4)),
            "bad_ipv6",
        ),
        drop(
            "ns shorter than its fixed part",
            eth(R, L1, 0x86dd, &short_ns),
            "bad_nd",
        ),
        drop(
            "nd option length 0",
            eth(R, L1, 0x86dd, &f::icmpv6(VM1_6, R_6, &bad_nd_opt)),
            "bad_nd_option",
        ),
        drop(
            "nd with two sllas",
            eth(R, L1, 0x86dd, &f::icmpv6(VM1_6, R_6, &two_sllas)),
            "bad_nd_option",
        ),
    ]
}

/// Frames from the network (ingress: expected on the VM port, global → local).
fn uplink_cases() -> Vec<Case> {
    let qinq = [(0x88a8, 200), (0x8100, 100)];
    let udp4 = |src: [u8; 4], dst: [u8; 4]| f::ipv4_udp_packet(src, dst, 5000, 4000, &payload(18));
    let udp6 =
        |src: [u8; 16], dst: [u8; 16], n: usize| f::ipv6_udp(src, dst, 5000, 4000, &payload(n));
    let tcp4 = |src: [u8; 4], dst: [u8; 4]| f::ipv4_tcp(src, dst, 80, 40000, 0x12, &[]);
    let na = |dst_mac: MacAddr, dst: [u8; 16], target: [u8; 16], tlla: MacAddr, flags: u8| {
        eth(
            dst_mac,
            R,
            0x86dd,
            &f::icmpv6(R_6, dst, &f::neighbor_advert(flags, target, Some(tlla))),
        )
    };
    let ns_unicast = |dst_mac: MacAddr| {
        eth(
            dst_mac,
            R,
            0x86dd,
            &f::icmpv6(R_6, VM1_6, &f::neighbor_solicit(VM1_6, Some(R))),
        )
    };
    vec![
        out(
            "ipv4/udp to vm1",
            f::ipv4_udp(G1, R, R_4, VM1_4, 60),
            f::ipv4_udp(L1, R, R_4, VM1_4, 60),
        ),
        out(
            "ipv4/tcp to vm2",
            eth(G2, R, 0x0800, &tcp4(R_4, VM2_4)),
            eth(L2, R, 0x0800, &tcp4(R_4, VM2_4)),
        ),
        out(
            "arp request (broadcast, flooded)",
            f::arp(BCAST, R, 1, R, R_4, ZERO, VM1_4),
            f::arp(BCAST, R, 1, R, R_4, ZERO, VM1_4),
        ),
        out(
            "arp reply",
            f::arp(G1, R, 2, R, R_4, G1, VM1_4),
            f::arp(L1, R, 2, R, R_4, L1, VM1_4),
        ),
        out(
            "arp request unicast",
            f::arp(G2, R, 1, R, R_4, ZERO, VM2_4),
            f::arp(L2, R, 1, R, R_4, ZERO, VM2_4),
        ),
        out(
            "ipv6/udp to vm1",
            eth(G1, R, 0x86dd, &udp6(R_6, VM1_6, 18)),
            eth(L1, R, 0x86dd, &udp6(R_6, VM1_6, 18)),
        ),
        out(
            "ns multicast (flooded)",
            ns_frame(R, R_6, VM1_6, Some(R)),
            ns_frame(R, R_6, VM1_6, Some(R)),
        ),
        out("ns unicast (nud)", ns_unicast(G1), ns_unicast(L1)),
        out(
            "na solicited, tlla of the router",
            na(G1, VM1_6, R_6, R, 0x60),
            na(L1, VM1_6, R_6, R, 0x60),
        ),
        out(
            "na solicited, tlla = global",
            na(G2, VM2_6, VM2_6, G2, 0x40),
            na(L2, VM2_6, VM2_6, L2, 0x40),
        ),
        out(
            "na unsolicited (flooded)",
            na(f::ipv6_multicast_mac(ALL_NODES), ALL_NODES, R_6, R, 0x20),
            na(f::ipv6_multicast_mac(ALL_NODES), ALL_NODES, R_6, R, 0x20),
        ),
        out(
            "802.1q ipv4 to vm1",
            tagged(G1, R, &[(0x8100, 100)], 0x0800, &udp4(R_4, VM1_4)),
            tagged(L1, R, &[(0x8100, 100)], 0x0800, &udp4(R_4, VM1_4)),
        ),
        out(
            "qinq ipv4/tcp to vm2",
            tagged(G2, R, &qinq, 0x0800, &tcp4(R_4, VM2_4)),
            tagged(L2, R, &qinq, 0x0800, &tcp4(R_4, VM2_4)),
        ),
        out(
            "broadcast ipv4 (flooded)",
            eth(BCAST, R, 0x0800, &udp4(R_4, [10, 0, 0, 255])),
            eth(BCAST, R, 0x0800, &udp4(R_4, [10, 0, 0, 255])),
        ),
        out(
            "multicast ipv6 (flooded)",
            eth(
                f::ipv6_multicast_mac(ALL_NODES),
                R,
                0x86dd,
                &udp6(R_6, ALL_NODES, 18),
            ),
            eth(
                f::ipv6_multicast_mac(ALL_NODES),
                R,
                0x86dd,
                &udp6(R_6, ALL_NODES, 18),
            ),
        ),
        out(
            "dhcp offer unicast",
            eth(
                G1,
                R,
                0x0800,
                &f::ipv4_udp_packet(R_4, VM1_4, 67, 68, &payload(240)),
            ),
            eth(
                L1,
                R,
                0x0800,
                &f::ipv4_udp_packet(R_4, VM1_4, 67, 68, &payload(240)),
            ),
        ),
        out(
            "jumbo 9000 ipv6/udp",
            eth(G1, R, 0x86dd, &udp6(R_6, VM1_6, 9000 - 62)),
            eth(L1, R, 0x86dd, &udp6(R_6, VM1_6, 9000 - 62)),
        ),
        // net.control is "drop" by default, in both directions.
        drop("lldp from the switch", f::lldp(SWITCH), "control"),
        drop("stp from the switch", f::stp_bpdu(SWITCH), "control"),
        drop(
            "unknown ipv4 destination",
            f::ipv4_udp(G1, R, R_4, UNKNOWN_4, 60),
            "unknown_ip",
        ),
        drop(
            "unknown ipv6 destination",
            eth(G1, R, 0x86dd, &udp6(R_6, UNKNOWN_6, 18)),
            "unknown_ip",
        ),
        drop(
            "vm1's ip at vm2's global mac",
            f::ipv4_udp(G2, R, R_4, VM1_4, 60),
            "mac_mismatch",
        ),
        drop(
            "vm1's ip at its local mac",
            f::ipv4_udp(L1, R, R_4, VM1_4, 60),
            "mac_mismatch",
        ),
        drop("truncated: 5 bytes", payload(5), "truncated"),
        drop(
            "truncated: ipv6 header",
            cut(eth(G1, R, 0x86dd, &udp6(R_6, VM1_6, 18)), 14 + 30),
            "truncated",
        ),
        drop(
            "three vlan tags",
            tagged(
                G1,
                R,
                &[(0x8100, 1), (0x8100, 2), (0x8100, 3)],
                0x0800,
                &udp4(R_4, VM1_4),
            ),
            "too_many_tags",
        ),
    ]
}

fn hex(b: &[u8]) -> String {
    b.iter()
        .map(|x| format!("{x:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Compares an output capture with the expected frames, naming the case of the first mismatch.
fn compare(side: &str, got: &[Vec<u8>], cases: &[Case]) {
    let expected: Vec<(&str, &Vec<u8>)> = cases
        .iter()
        .filter_map(|c| match &c.expect {
            Expect::Out(e) => Some((c.name, e)),
            Expect::Drop(_) => None,
        })
        .collect();
    for (i, ((name, want), have)) in expected.iter().zip(got).enumerate() {
        if *want != have {
            let at = want
                .iter()
                .zip(have.iter())
                .position(|(a, b)| a != b)
                .unwrap_or(want.len().min(have.len()));
            panic!(
                "{side} frame {i} ({name}): differs at byte {at} (lengths: expected {}, got {})\n expected: {}\n got:      {}",
                want.len(),
                have.len(),
                hex(&want[..want.len().min(at + 32)]),
                hex(&have[..have.len().min(at + 32)])
            );
        }
    }
    assert_eq!(
        got.len(),
        expected.len(),
        "{side}: {} frames out, {} expected",
        got.len(),
        expected.len()
    );
}

fn expected_drops(cases: &[&[Case]]) -> BTreeMap<&'static str, u64> {
    let mut m = BTreeMap::new();
    for c in cases.iter().flat_map(|c| c.iter()) {
        if let Expect::Drop(r) = c.expect {
            *m.entry(r).or_insert(0) += 1;
        }
    }
    m
}

fn golden_config(up_in: &Path, up_out: &Path, vm_in: &Path, vm_out: &Path) -> Config {
    let entry = |ip: &str, l: MacAddr, g: MacAddr| {
        format!("[[macnat]]\nip = \"{ip}\"\nlocal_mac = \"{l}\"\nglobal_mac = \"{g}\"\nport = \"vm0\"\n")
    };
    let toml = format!(
        "[[port]]\nname = \"uplink\"\ndevice = \"net_pcap0\"\nargs = \"rx_pcap={},tx_pcap={}\"\nrole = \"uplink\"\n\n\
         [[port]]\nname = \"vm0\"\ndevice = \"net_pcap1\"\nargs = \"rx_pcap={},tx_pcap={}\"\nrole = \"vm\"\n\n{}{}{}{}",
        up_in.display(),
        up_out.display(),
        vm_in.display(),
        vm_out.display(),
        entry("10.0.0.2", L1, G1),
        entry("fd00::2", L1, G1),
        entry("10.0.0.3", L2, G2),
        entry("fd00::3", L2, G2),
    );
    Config::parse(&toml, "golden").expect("golden config")
}

/// Runs `tcpdump -r <file> -nn -e`; None (with a message) when tcpdump is not installed.
fn tcpdump(file: &Path) -> Option<String> {
    let out = match Command::new("tcpdump")
        .args(["-nn", "-e", "-r"])
        .arg(file)
        .output()
    {
        Ok(o) => o,
        Err(e) => {
            println!("skipped: tcpdump check ({e}; apt-get install tcpdump)");
            return None;
        }
    };
    assert!(
        out.status.success(),
        "tcpdump -r {} failed: {}",
        file.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    Some(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// tcpdump's text of the uplink output: every line's link-layer source is a global MAC, and a
/// local MAC appears only as a DHCP client hardware address (payload the spec leaves alone).
fn check_tcpdump_uplink(file: &Path, n_frames: usize) {
    let Some(text) = tcpdump(file) else { return };
    let globals = [G1.to_string(), G2.to_string()];
    let locals = [L1.to_string(), L2.to_string(), STRANGER.to_string()];
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| !l.starts_with(' ') && !l.starts_with('\t'))
        .collect();
    assert_eq!(
        lines.len(),
        n_frames,
        "tcpdump printed {} frames, the capture has {n_frames}:\n{text}",
        lines.len()
    );
    for line in &lines {
        let src = line.split_whitespace().nth(1).unwrap_or("");
        assert!(
            globals.iter().any(|g| g == src),
            "uplink frame with a non-global source: {line}"
        );
        if !line.contains("BOOTP/DHCP, Request from") {
            assert!(
                !locals.iter().any(|l| line.contains(l.as_str())),
                "local MAC in tcpdump output: {line}"
            );
        }
    }
}

/// Feeds every frame of each shared capture through both ports of a `hostplane run` subprocess.
fn shared_captures(dir: &Path, tmp: &Path) {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .expect("read shared pcaps")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "pcap" || x == "pcapng"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no captures in {}", dir.display());
    for (i, file) in files.iter().enumerate() {
        // libpcap reads pcapng too; our reader counts classic pcap only.
        let n = pcap::read_frames(file).ok().map(|f| f.len() as u64);
        let cfg = tmp.join(format!("shared-{i}.toml"));
        // Table entries for addresses that appear in the captures, so some frames translate.
        let toml = format!(
            "[[port]]\nname = \"uplink\"\ndevice = \"net_pcap0\"\nargs = \"rx_pcap={f}\"\nrole = \"uplink\"\n\n\
             [[port]]\nname = \"vm0\"\ndevice = \"net_pcap1\"\nargs = \"rx_pcap={f}\"\nrole = \"vm\"\n\n\
             [[macnat]]\nip = \"10.0.0.2\"\nlocal_mac = \"{L1}\"\nglobal_mac = \"{G1}\"\nport = \"vm0\"\n",
            f = file.display()
        );
        std::fs::write(&cfg, toml).expect("write config");
        let started = Instant::now();
        let res = Command::new(env!("CARGO_BIN_EXE_hostplane"))
            .args([
                "run",
                "--duration",
                "0.6",
                "--stats-interval",
                "0",
                "-l",
                "0-1",
                "--config",
            ])
            .arg(&cfg)
            .arg("--")
            .args(common::eal_test_args(&format!("golden-shared{i}")))
            .env("RUST_LOG", "warn")
            .env(
                "HOSTPLANE_RPC_SOCKET",
                common::rpc_socket(&format!("golden-shared{i}")),
            )
            .output()
            .expect("spawn hostplane");
        let stdout = String::from_utf8_lossy(&res.stdout);
        assert!(
            res.status.success(),
            "{}: hostplane failed ({}):\n{stdout}\n{}",
            file.display(),
            res.status,
            String::from_utf8_lossy(&res.stderr)
        );
        let total = stdout
            .lines()
            .find(|l| l.starts_with("total:"))
            .unwrap_or_else(|| panic!("{}: no total line:\n{stdout}", file.display()));
        let num = |key: &str| -> u64 {
            let mut it = total.split_whitespace();
            it.position(|w| w == key)
                .and_then(|_| it.next())
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("no {key} in {total:?}"))
        };
        let (rx, tx, dropped) = (num("rx"), num("tx"), num("dropped"));
        println!(
            "shared {}: rx {rx} tx {tx} dropped {dropped} ({:.1}s)",
            file.file_name().unwrap_or_default().to_string_lossy(),
            started.elapsed().as_secs_f64()
        );
        assert_eq!(
            rx,
            tx + dropped,
            "{}: rx {rx} != tx {tx} + dropped {dropped}",
            file.display()
        );
        match n {
            Some(n) => assert_eq!(
                rx,
                2 * n,
                "{}: {n} frames in the file, each sent on both ports",
                file.display()
            ),
            None => assert!(rx > 0, "{}: nothing received", file.display()),
        }
    }
}

/// Runs the golden frames through a dataplane whose table has `filler` more entries (none for
/// these frames' addresses); `name` keeps temp dirs and EAL prefixes apart.
pub fn golden(name: &str, filler: u32) {
    let t0 = Instant::now();
    let tmp = common::temp_dir(name);
    let (up_in, up_out, vm_in, vm_out) = (
        tmp.join("uplink-in.pcap"),
        tmp.join("uplink-out.pcap"),
        tmp.join("vm-in.pcap"),
        tmp.join("vm-out.pcap"),
    );
    let vm = vm_cases();
    let up = uplink_cases();
    pcap::write_frames(
        &vm_in,
        &vm.iter().map(|c| c.input.clone()).collect::<Vec<_>>(),
    )
    .expect("write vm input");
    pcap::write_frames(
        &up_in,
        &up.iter().map(|c| c.input.clone()).collect::<Vec<_>>(),
    )
    .expect("write uplink input");

    let mut cfg = golden_config(&up_in, &up_out, &vm_in, &vm_out);
    cfg.macnat.extend((0..filler).map(|i| {
        let [_, _, a, b] = i.to_be_bytes();
        hostplane::config::MacNatSection {
            ip: format!("10.200.{a}.{b}"),
            local_mac: format!("52:54:02:00:{a:02x}:{b:02x}"),
            global_mac: format!("02:00:02:00:{a:02x}:{b:02x}"),
            port: "vm0".into(),
        }
    }));
    let cli = EalArgs {
        lcore_list: Some("0-1".into()),
        eal: common::eal_test_args(name),
        ..Default::default()
    };
    let dp = Dataplane::start(&cfg, &cli).expect("start dataplane");
    let (uplink, vm_port) = (dp.ports[0].id, dp.ports[1].id);
    let sent = (vm.len() + up.len()) as u64;
    // net_pcap replays each file once: wait until rx stops growing (or has everything).
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut last = (u64::MAX, Instant::now());
    loop {
        std::thread::sleep(Duration::from_millis(20));
        let rx = dp.totals().rx;
        if rx != last.0 {
            last = (rx, Instant::now());
        }
        if (rx == sent && last.1.elapsed() > Duration::from_millis(100))
            || last.1.elapsed() > Duration::from_secs(2)
            || Instant::now() > deadline
        {
            break;
        }
    }
    let totals = dp.stop().expect("stop dataplane");
    println!("golden totals: {totals:?}");

    assert_eq!(totals.rx, sent, "every input frame received");
    assert_eq!(
        totals.ports[vm_port as usize].0,
        vm.len() as u64,
        "vm port rx"
    );
    assert_eq!(
        totals.ports[uplink as usize].0,
        up.len() as u64,
        "uplink rx"
    );
    let n_out = |cases: &[Case]| {
        cases
            .iter()
            .filter(|c| matches!(c.expect, Expect::Out(_)))
            .count() as u64
    };
    assert_eq!(totals.ports[uplink as usize].1, n_out(&vm), "uplink tx");
    assert_eq!(totals.ports[vm_port as usize].1, n_out(&up), "vm port tx");
    assert_eq!(totals.tx_full, 0);
    let got_drops: BTreeMap<&str, u64> = totals.drops.iter().copied().collect();
    assert_eq!(
        got_drops,
        expected_drops(&[&vm, &up]),
        "drop counters by reason"
    );
    assert_eq!(totals.rx, totals.tx + totals.dropped());

    let up_got = pcap::read_frames(&up_out).expect("read uplink output");
    let vm_got = pcap::read_frames(&vm_out).expect("read vm output");
    compare("uplink (egress)", &up_got, &vm);
    compare("vm port (ingress)", &vm_got, &up);
    // Translated vs untouched: ingress frames that come out changed were translated.
    let changed = |cases: &[Case]| {
        cases
            .iter()
            .filter(|c| matches!(&c.expect, Expect::Out(e) if *e != c.input))
            .count() as u64
    };
    assert_eq!(
        totals.egress_translated,
        n_out(&vm),
        "every forwarded egress frame is translated"
    );
    assert_eq!(
        totals.ingress_translated,
        changed(&up),
        "ingress translations"
    );
    assert_eq!(
        totals.untouched,
        n_out(&up) - changed(&up),
        "flooded ingress frames are untouched"
    );
    // No byte run of a local MAC in any uplink frame, except the DHCP chaddr.
    for (i, fr) in up_got.iter().enumerate() {
        let leak = [L1, L2, STRANGER]
            .iter()
            .any(|l| fr.windows(6).any(|w| w == l.0));
        let is_dhcp =
            fr.len() > 42 && fr[12..14] == [8, 0] && fr[23] == 17 && fr[36..38] == [0, 67];
        assert!(
            !leak || is_dhcp,
            "uplink frame {i} carries a local MAC: {}",
            hex(fr)
        );
    }
    check_tcpdump_uplink(&up_out, up_got.len());
    let _ = tcpdump(&vm_out);
    println!(
        "golden: {} + {} frames checked in {:.1}s",
        vm.len(),
        up.len(),
        t0.elapsed().as_secs_f64()
    );

    // The shared captures only once (the small table).
    match common::shared_pcaps() {
        Some(dir) if filler == 0 => shared_captures(&dir, &tmp),
        Some(_) => {}
        None => println!("skipped: ../shared/pcaps absent (shared captures not fed)"),
    }
    let _ = std::fs::remove_dir_all(&tmp);
    println!("macnat_golden: {:.1}s", t0.elapsed().as_secs_f64());
}
