//! Builders for well-formed frames: the embedded default's generated traffic, the benchmark's
//! frame template and the integration tests' inputs.

use super::packet::MacAddr;

/// Ethernet header + payload.
fn eth(dst: MacAddr, src: MacAddr, ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(14 + payload.len());
    f.extend_from_slice(&dst.0);
    f.extend_from_slice(&src.0);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// Internet checksum (RFC 1071) over `data`, starting from `sum`.
pub fn inet_checksum(data: &[u8], mut sum: u32) -> u16 {
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        sum += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [b] = chunks.remainder() {
        sum += u32::from(*b) << 8;
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// IPv4 header (checksummed) + payload.
pub fn ipv4(src: [u8; 4], dst: [u8; 4], proto: u8, payload: &[u8]) -> Vec<u8> {
    let total = 20 + payload.len();
    let mut h = vec![
        0x45,
        0,
        (total >> 8) as u8,
        total as u8,
        0,
        1,
        0x40,
        0,
        64,
        proto,
        0,
        0,
    ];
    h.extend_from_slice(&src);
    h.extend_from_slice(&dst);
    let c = inet_checksum(&h, 0);
    h[10..12].copy_from_slice(&c.to_be_bytes());
    h.extend_from_slice(payload);
    h
}

/// UDP header (checksum 0 = none, valid for IPv4) + payload.
pub fn udp(sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let len = (8 + payload.len()) as u16;
    let mut u = Vec::with_capacity(len as usize);
    u.extend_from_slice(&sport.to_be_bytes());
    u.extend_from_slice(&dport.to_be_bytes());
    u.extend_from_slice(&len.to_be_bytes());
    u.extend_from_slice(&[0, 0]);
    u.extend_from_slice(payload);
    u
}

/// Ethernet/IPv4/UDP frame padded to at least `min_len` bytes (60 = minimum without FCS).
pub fn ipv4_udp(dst: MacAddr, src: MacAddr, sip: [u8; 4], dip: [u8; 4], min_len: usize) -> Vec<u8> {
    let base = 14 + 20 + 8;
    let pad = min_len.saturating_sub(base);
    let payload: Vec<u8> = (0..pad).map(|i| i as u8).collect();
    eth(
        dst,
        src,
        0x0800,
        &ipv4(sip, dip, 17, &udp(4000, 5000, &payload)),
    )
}

/// Ethernet/ARP (Ethernet/IPv4) frame, padded to 60 bytes.
pub fn arp(
    dst: MacAddr,
    src: MacAddr,
    op: u16,
    sha: MacAddr,
    spa: [u8; 4],
    tha: MacAddr,
    tpa: [u8; 4],
) -> Vec<u8> {
    let mut a = vec![0, 1, 8, 0, 6, 4];
    a.extend_from_slice(&op.to_be_bytes());
    a.extend_from_slice(&sha.0);
    a.extend_from_slice(&spa);
    a.extend_from_slice(&tha.0);
    a.extend_from_slice(&tpa);
    a.resize(46, 0);
    eth(dst, src, 0x0806, &a)
}

/// Ethernet header with VLAN tags (`(TPID, TCI)` pairs, outermost first) + payload, unpadded.
pub fn ethernet(
    dst: MacAddr,
    src: MacAddr,
    tags: &[(u16, u16)],
    ethertype: u16,
    payload: &[u8],
) -> Vec<u8> {
    let mut f = Vec::with_capacity(14 + 4 * tags.len() + payload.len());
    f.extend_from_slice(&dst.0);
    f.extend_from_slice(&src.0);
    for (tpid, tci) in tags {
        f.extend_from_slice(&tpid.to_be_bytes());
        f.extend_from_slice(&tci.to_be_bytes());
    }
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// Pads a frame with zeros to the 60-byte Ethernet minimum (without FCS).
pub fn padded(mut frame: Vec<u8>) -> Vec<u8> {
    if frame.len() < 60 {
        frame.resize(60, 0);
    }
    frame
}

/// One's-complement sum of the IPv4 or IPv6 pseudo-header for an upper-layer packet.
fn pseudo_header_sum(src: &[u8], dst: &[u8], proto: u8, len: usize) -> u32 {
    let mut p = Vec::with_capacity(40);
    p.extend_from_slice(src);
    p.extend_from_slice(dst);
    p.extend_from_slice(&(len as u32).to_be_bytes());
    p.extend_from_slice(&[0, 0, 0, proto]);
    // Unfolded sum: inet_checksum folds and complements, so add the words here.
    p.chunks_exact(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], c[1]])))
        .sum()
}

/// Fills the 16-bit checksum at `off` of an upper-layer `segment` (UDP, TCP, ICMPv6) from the
/// pseudo-header of `src`/`dst` (4 or 16 bytes each).
pub fn fill_l4_checksum(segment: &mut [u8], off: usize, src: &[u8], dst: &[u8], proto: u8) {
    segment[off] = 0;
    segment[off + 1] = 0;
    let mut c = inet_checksum(segment, pseudo_header_sum(src, dst, proto, segment.len()));
    // UDP transmits a computed 0 as 0xffff (0 means "no checksum").
    if proto == 17 && c == 0 {
        c = 0xffff;
    }
    segment[off..off + 2].copy_from_slice(&c.to_be_bytes());
}

/// TCP header (20 bytes, no options) + payload; the checksum is filled by [`ipv4_tcp`].
pub fn tcp(sport: u16, dport: u16, seq: u32, flags: u8, payload: &[u8]) -> Vec<u8> {
    let mut t = Vec::with_capacity(20 + payload.len());
    t.extend_from_slice(&sport.to_be_bytes());
    t.extend_from_slice(&dport.to_be_bytes());
    t.extend_from_slice(&seq.to_be_bytes());
    t.extend_from_slice(&0u32.to_be_bytes());
    t.extend_from_slice(&[0x50, flags, 0xff, 0xff, 0, 0, 0, 0]);
    t.extend_from_slice(payload);
    t
}

/// IPv4/TCP packet with a correct TCP checksum.
pub fn ipv4_tcp(
    src: [u8; 4],
    dst: [u8; 4],
    sport: u16,
    dport: u16,
    flags: u8,
    payload: &[u8],
) -> Vec<u8> {
    let mut t = tcp(sport, dport, 1, flags, payload);
    fill_l4_checksum(&mut t, 16, &src, &dst, 6);
    ipv4(src, dst, 6, &t)
}

/// IPv4/UDP packet with a correct UDP checksum.
pub fn ipv4_udp_packet(
    src: [u8; 4],
    dst: [u8; 4],
    sport: u16,
    dport: u16,
    payload: &[u8],
) -> Vec<u8> {
    let mut u = udp(sport, dport, payload);
    fill_l4_checksum(&mut u, 6, &src, &dst, 17);
    ipv4(src, dst, 17, &u)
}

/// IPv6 header (hop limit 255) + payload.
pub fn ipv6(src: [u8; 16], dst: [u8; 16], next_header: u8, payload: &[u8]) -> Vec<u8> {
    let mut p = vec![0x60, 0, 0, 0];
    p.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    p.extend_from_slice(&[next_header, 255]);
    p.extend_from_slice(&src);
    p.extend_from_slice(&dst);
    p.extend_from_slice(payload);
    p
}

/// IPv6/UDP packet with the (mandatory) UDP checksum.
pub fn ipv6_udp(src: [u8; 16], dst: [u8; 16], sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut u = udp(sport, dport, payload);
    fill_l4_checksum(&mut u, 6, &src, &dst, 17);
    ipv6(src, dst, 17, &u)
}

/// IPv6 packet carrying the ICMPv6 `message` (checksum field ignored and filled in).
pub fn icmpv6(src: [u8; 16], dst: [u8; 16], message: &[u8]) -> Vec<u8> {
    let mut m = message.to_vec();
    fill_l4_checksum(&mut m, 2, &src, &dst, 58);
    ipv6(src, dst, 58, &m)
}

/// ND link-layer address option: 1 = source (SLLA), 2 = target (TLLA).
pub fn nd_lla_option(kind: u8, mac: MacAddr) -> Vec<u8> {
    let mut o = vec![kind, 1];
    o.extend_from_slice(&mac.0);
    o
}

/// Neighbor Solicitation message (RFC 4861 4.3), optionally with an SLLA option.
pub fn neighbor_solicit(target: [u8; 16], slla: Option<MacAddr>) -> Vec<u8> {
    let mut m = vec![135, 0, 0, 0, 0, 0, 0, 0];
    m.extend_from_slice(&target);
    if let Some(mac) = slla {
        m.extend(nd_lla_option(1, mac));
    }
    m
}

/// Neighbor Advertisement message (RFC 4861 4.4) with `flags` (0x40 solicited, 0x20 override),
/// optionally with a TLLA option.
pub fn neighbor_advert(flags: u8, target: [u8; 16], tlla: Option<MacAddr>) -> Vec<u8> {
    let mut m = vec![136, 0, 0, 0, flags, 0, 0, 0];
    m.extend_from_slice(&target);
    if let Some(mac) = tlla {
        m.extend(nd_lla_option(2, mac));
    }
    m
}

/// Router Solicitation message (RFC 4861 4.1), optionally with an SLLA option.
pub fn router_solicit(slla: Option<MacAddr>) -> Vec<u8> {
    let mut m = vec![133, 0, 0, 0, 0, 0, 0, 0];
    if let Some(mac) = slla {
        m.extend(nd_lla_option(1, mac));
    }
    m
}

/// The solicited-node multicast group of `addr` (ff02::1:ffXX:XXXX).
pub fn solicited_node(addr: [u8; 16]) -> [u8; 16] {
    let mut g = [0xff, 0x02, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0xff, 0, 0, 0];
    g[13..16].copy_from_slice(&addr[13..16]);
    g
}

/// The Ethernet address of an IPv6 multicast group (33:33 + its last 32 bits).
pub fn ipv6_multicast_mac(group: [u8; 16]) -> MacAddr {
    MacAddr([0x33, 0x33, group[12], group[13], group[14], group[15]])
}

/// LLDP frame (chassis ID and port ID as MAC addresses, TTL 120) to the nearest-bridge group.
pub fn lldp(src: MacAddr) -> Vec<u8> {
    let tlv = |t: u8, v: &[u8]| {
        let h = (u16::from(t) << 9) | v.len() as u16;
        let mut out = h.to_be_bytes().to_vec();
        out.extend_from_slice(v);
        out
    };
    let mut p = Vec::new();
    p.extend(tlv(1, &[&[4u8][..], &src.0].concat()));
    p.extend(tlv(2, &[&[3u8][..], &src.0].concat()));
    p.extend(tlv(3, &120u16.to_be_bytes()));
    p.extend(tlv(0, &[]));
    padded(ethernet(
        MacAddr([0x01, 0x80, 0xc2, 0, 0, 0x0e]),
        src,
        &[],
        0x88cc,
        &p,
    ))
}

/// 802.1D configuration BPDU (802.3 length + LLC 42/42/03) to 01:80:c2:00:00:00.
pub fn stp_bpdu(src: MacAddr) -> Vec<u8> {
    let mut llc = vec![0x42, 0x42, 0x03];
    // Protocol 0, version 0, type 0 (config), flags, root id, path cost, bridge id, port id,
    // message age, max age 20 s, hello 2 s, forward delay 15 s (times in 1/256 s).
    llc.extend_from_slice(&[0, 0, 0, 0, 0]);
    llc.extend_from_slice(&[0x80, 0]);
    llc.extend_from_slice(&src.0);
    llc.extend_from_slice(&[0, 0, 0, 0]);
    llc.extend_from_slice(&[0x80, 0]);
    llc.extend_from_slice(&src.0);
    llc.extend_from_slice(&[0x80, 0x01, 0, 0, 20, 0, 2, 0, 15, 0]);
    padded(ethernet(
        MacAddr([0x01, 0x80, 0xc2, 0, 0, 0]),
        src,
        &[],
        llc.len() as u16,
        &llc,
    ))
}

/// DHCPDISCOVER from 0.0.0.0:68 to 255.255.255.255:67, broadcast, client hardware address `chaddr`.
pub fn dhcp_discover(src: MacAddr, chaddr: MacAddr, xid: u32) -> Vec<u8> {
    let mut b = vec![1, 1, 6, 0];
    b.extend_from_slice(&xid.to_be_bytes());
    b.extend_from_slice(&[0, 0, 0x80, 0]); // secs, flags: broadcast
    b.extend_from_slice(&[0; 16]); // ciaddr yiaddr siaddr giaddr
    b.extend_from_slice(&chaddr.0);
    b.extend_from_slice(&[0; 10 + 64 + 128]); // chaddr padding, sname, file
    b.extend_from_slice(&[99, 130, 83, 99, 53, 1, 1, 255]); // magic cookie, DHCPDISCOVER, end
    let ip = ipv4_udp_packet([0; 4], [255; 4], 68, 67, &b);
    ethernet(MacAddr::BROADCAST, src, &[], 0x0800, &ip)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::packet;

    const MAC: MacAddr = MacAddr([0x52, 0x54, 0, 0, 0, 2]);

    /// The builders' checksums agree with the parser's independent verifiers.
    #[test]
    fn builder_checksums_verify() {
        let src = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
        let dst = solicited_node([0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
        for msg in [
            neighbor_solicit(dst, Some(MAC)),
            neighbor_advert(0x60, src, Some(MAC)),
            router_solicit(None),
        ] {
            let f = padded(ethernet(
                ipv6_multicast_mac(dst),
                MAC,
                &[(0x8100, 5)],
                0x86dd,
                &icmpv6(src, dst, &msg),
            ));
            let info = packet::parse(&f).unwrap();
            assert!(packet::icmpv6_checksum_ok(&f, &info));
        }
        let f = dhcp_discover(MAC, MAC, 7);
        let info = packet::parse(&f).unwrap();
        assert!(packet::ipv4_header_checksum_ok(&f, &info));
        // UDP over IPv4: the checksum over pseudo-header + datagram folds to 0xffff.
        let udp = &f[34..];
        assert_eq!(
            inet_checksum(udp, pseudo_header_sum(&[0; 4], &[255; 4], 17, udp.len())),
            0
        );
        assert!(matches!(
            packet::parse(&lldp(MAC)).unwrap().l3,
            packet::L3::Control(packet::Control::Lldp)
        ));
        assert!(matches!(
            packet::parse(&stp_bpdu(MAC)).unwrap().l3,
            packet::L3::Control(packet::Control::Stp)
        ));
    }
}
